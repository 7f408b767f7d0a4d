"""Progress display for the report commands' long steps (rich on a terminal, one line per step otherwise).

``with steps() as step: with step("executing notebook") as update: ...`` shows a spinner per
step with its elapsed time; ``update(done, total)`` fills its bar (the notebook's cells).  Nested ``steps()`` reuse the outer display (rich allows one live display),
so ``demo`` can call ``render`` and ``compare`` inside its own.
"""

from __future__ import annotations

import contextlib
import sys
import time

_ACTIVE: list = []   # the step function of the outermost steps() context (rich allows one live display)


@contextlib.contextmanager
def steps(enabled: bool | None = None):
    """``with steps() as step: with step("doing x"): ...`` - a rich spinner per step with its time.

    Nested ``steps()`` reuse the outer display, so ``demo`` can call ``render`` inside its own.
    """
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if enabled is None:
        enabled = console.is_terminal
    if not enabled:
        @contextlib.contextmanager
        def plain(desc: str):
            t = time.monotonic()
            yield lambda done, total: None
            print(f"  {desc}: {time.monotonic() - t:.1f} s", file=sys.stderr)
        _ACTIVE.append(plain)
        try:
            yield plain
        finally:
            _ACTIVE.pop()
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as prog:
        @contextlib.contextmanager
        def step(desc: str):
            """Yields ``update(done, total)`` for steps that can count their parts (notebook cells)."""
            task = prog.add_task(desc, total=1)

            def update(done: int, total: int) -> None:
                prog.update(task, completed=done, total=total)
            try:
                yield update
            finally:
                t = prog.tasks[task].total or 1
                prog.update(task, completed=t)
        _ACTIVE.append(step)
        try:
            yield step
        finally:
            _ACTIVE.pop()
