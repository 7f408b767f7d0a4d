"""User-facing errors: one line, naming the file or target and what is wrong."""


class HintscopeError(Exception):
    """An error the CLI prints as a single line (no traceback) and exits with status 2."""

    exit_code = 2

    def __init__(self, message: str):
        # Guest-produced text may end up in the message: keep it on one line.
        super().__init__(" ".join(str(message).split()))


class BundleError(HintscopeError):
    """A bundle (or one of its files) cannot be read."""
