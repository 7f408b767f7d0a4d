"""What ``hintscope probe host`` tells its user while it runs (stderr only: stdout carries ATTACHED).

* live status (rich, refreshed ~1/s) when stderr is a terminal or with ``--progress``:
  events/s, rows per table, syncs seen (sync_fetch_begin), hint applies, lost per source;
  ``--progress`` on a non-terminal prints the same status as one plain line per second;
* a warning line as soon as a source loses events (at most one per source per second), always,
  so a lab log shows when the capture became incomplete, not only the end summary.
"""

from __future__ import annotations

import sys
import time

TICK_S = 1.0
PREFIX = "hintscope: probe host:"


def status_text(events_per_s: float, rows: dict[str, int], syncs: int, hints: int, lost: dict[str, int]) -> str:
    tables = " ".join(f"{t}={n}" for t, n in sorted(rows.items())) or "-"
    lost_txt = " ".join(f"{s}={n}" for s, n in sorted(lost.items())) or "0"
    return (f"{events_per_s:,.0f} ev/s | rows {tables} | syncs {syncs} | hint applies {hints} | "
            f"lost {lost_txt}")


class ProgressView:
    """``tick(probe)`` after every poll; ``close()`` before the final summary."""

    def __init__(self, force: bool = False, stream=None):
        self.stream = stream or sys.stderr
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.live = None
        self.plain_status = force and not is_tty
        if is_tty:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._Text = Text
            self.console = Console(file=self.stream)
            self.live = Live(Text("attaching..."), console=self.console, refresh_per_second=1, transient=True)
            self.live.start()
        self._t = time.monotonic()
        self._events = 0

    def tick(self, probe, force: bool = False) -> None:
        now = time.monotonic()
        dt = now - self._t
        if dt < TICK_S and not force:
            return
        for source, n in sorted(probe.take_new_lost().items()):
            self._line(f"{PREFIX} WARNING: lost {n} {source} events in the last {dt:.1f} s "
                       f"(total {probe.lost.get(source, n)}; ring full? try a larger --ring-mb)")
        rate = (probe.events - self._events) / dt if dt > 0 else 0.0
        self._t, self._events = now, probe.events
        text = status_text(rate, dict(probe.w.rows), probe.syncs, probe.hint_applies, dict(probe.lost))
        if self.live is not None:
            self.live.update(self._Text(text, no_wrap=True, overflow="ellipsis"))
        elif self.plain_status:
            self._line(f"{PREFIX} {text}")

    def _line(self, text: str) -> None:
        if self.live is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def close(self, probe=None) -> None:
        if probe is not None:
            self.tick(probe, force=True)     # warnings about the last drain
        if self.live is not None:
            self.live.stop()
            self.live = None
