"""The ``hintscope`` command.

Each area module provides ``add_parser(subparsers)`` (which sets ``func``) so that commands
live next to the code they run.  User errors are :class:`HintscopeError`: one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hintscope import __version__
from hintscope.errors import HintscopeError

# (group, command word, module) in help order; group None = top-level command.  Only the modules of
# the command being run are imported: `analyze` or `probe host` must not depend on the lab importing.
COMMANDS: list[tuple[str | None, str, str]] = [
    ("probe", "probe", "hintscope.probes.host"),
    ("probe", "probe", "hintscope.probes.guest"),
    ("lab", "lab", "hintscope.lab.cli"),
    ("lab", "lab", "hintscope.lab.hintguest"),
    ("lab", "lab", "hintscope.lab.image"),
    (None, "tap", "hintscope.tap.cli"),
    (None, "analyze", "hintscope.analysis.cli"),
    (None, "simulate", "hintscope.sim.cli"),
    (None, "report", "hintscope.report.cli"),
    (None, "compare", "hintscope.report.compare"),
    (None, "fleet", "hintscope.fleet.cli"),
    (None, "export", "hintscope.report.perfetto"),
    (None, "demo", "hintscope.report.demo"),
]

EPILOG = """examples:
  hintscope demo                                  # report + plots + Perfetto trace from the bundled samples
  hintscope probe host --pid $(pidof qemu-system-x86_64) -o run1   # trace a VMM's dirty-log ioctls (root)
  hintscope lab migrate --guest dirtier -o run2   # a real KVM migration on loopback, probed (root)
  hintscope tap --listen unix:/tmp/tap.sock --forward unix:/tmp/dst.sock -o run3   # decode a migration's page sends
  hintscope analyze run1 --fail-on hazard         # per-sync table, accounting, findings; CI gate
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a command word) just that command's modules are imported."""
    ap = argparse.ArgumentParser(prog="hintscope", description="Observe free page hinting against KVM dirty-log syncs during live migration.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"hintscope {__version__}")
    top = ap.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for group, word, modname in COMMANDS:
        if only is not None and word != only:
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:  # an area not built yet
                continue
            raise
        if group is None:
            mod.add_parser(top)
        else:
            if group not in groups:
                g = top.add_parser(group, help=f"{group} commands")
                groups[group] = g.add_subparsers(dest=f"{group}_command", metavar="WHAT", required=True)
            mod.add_parser(groups[group])
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    word = next((a for a in argv if not a.startswith("-")), None)
    ap = build_parser(word if any(word == w for _, w, _ in COMMANDS) else None)
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        rc = args.func(args)
    except HintscopeError as e:
        print(f"hintscope: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
