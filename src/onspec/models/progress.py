"""Progress of the slow first-use steps, on stderr: assembling a named model's GGUF file from its
wheels, hashing it, converting it (minutes for the default pair on a fresh machine).

A terminal gets a rich bar with sizes, speed and time left. Anything else (a pipe, a log file, a
Ray worker) gets plain lines: one when the step has run `SHOW_AFTER_S`, one every
`PLAIN_EVERY_S`, one at the end. A step done within `SHOW_AFTER_S` prints nothing, so a warm
cache stays silent. Nothing goes to stdout, where the CLI's JSON lines are.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

SHOW_AFTER_S = 1.0
PLAIN_EVERY_S = 10.0


def human_size(n: float) -> str:
    """Decimal units, as rich's DownloadColumn shows them: 124 B, 503 MB, 1.12 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def note(message: str) -> None:
    """One line on stderr, for a slow step with no measure of its own."""
    print(f"onspec: {message}", file=sys.stderr, flush=True)


class StepProgress:
    """`with StepProgress("hashing x.gguf", total_bytes) as p: ... p.advance(n) ...`"""

    def __init__(self, what: str, total: int, label: str | None = None) -> None:
        self.what, self.total = what, max(int(total), 1)
        self.label = label or what.split(" ", 1)[0]
        """The bar's short name (80 columns hold it); `what` is printed in full above the bar."""
        self.done = 0
        self.t0 = self.last_line = time.monotonic()
        self.shown = False
        self.bar: Progress | None = None

    def __enter__(self) -> StepProgress:
        self.t0 = self.last_line = time.monotonic()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.shown:
            if now - self.t0 < SHOW_AFTER_S:
                return
            self._show()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif now - self.last_line >= PLAIN_EVERY_S:
            self._line(now)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            self.bar.stop()
        elif self.shown:
            took = time.monotonic() - self.t0
            end = "failed" if exc_type is not None else "done"
            note(f"{self.what}: {end}, {human_size(self.done)} in {took:.0f} s")

    def _show(self) -> None:
        self.shown = True
        console = Console(file=sys.stderr)
        if console.is_terminal:
            note(f"{self.what}, {human_size(self.total)}")
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(self.label, total=self.total, completed=self.done)
            self.bar.start()
        else:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last_line = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"about {left:.0f} s left" if left != float("inf") else "time left unknown"
        note(f"{self.what}: {self.done / self.total:.0%} ({human_size(self.done)} of {human_size(self.total)}), "
             f"{human_size(rate)}/s, {eta}")
