"""What a long stage shows on the console: one live tqdm bar on a terminal, a few lines elsewhere.

    with console.progress(total=60_000, desc="[extract] fmnist_resnet8/train", unit="img") as bar:
        for rows in ...:
            bar.update(rows)

On a terminal (stderr is a TTY) the stage draws one tqdm bar with its rate and ETA, and
leaves it as the stage's last line. Elsewhere (CI, ``ray job logs``, a pipe) a bar's redraws
would be hundreds of lines, so the stage prints a line only every
:data:`LINE_INTERVAL_S` seconds, and one at its end: a few lines per stage, each with the
count, the rate and (while running) the ETA. ``DTD_PROGRESS=bar|lines|off`` forces one way
(off: the end line only).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

# Seconds between two lines of a stage when the console is not a terminal.
LINE_INTERVAL_S = 30.0
MODES = ("bar", "lines", "off")


def mode(stream: TextIO | None = None) -> str:
    """``bar`` on a terminal, else ``lines``; ``DTD_PROGRESS`` overrides."""
    forced = os.environ.get("DTD_PROGRESS", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"DTD_PROGRESS={forced!r}: expected one of {', '.join(MODES)}")
        return forced
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def _rate(n: float, seconds: float, unit: str) -> str:
    if seconds <= 0 or n <= 0:
        return f"{unit}/s n/a"
    r = n / seconds
    return f"{r:,.0f} {unit}/s" if r >= 10 else f"{r:.2f} {unit}/s" if r >= 0.1 else f"{seconds / n:.1f} s/{unit}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


class Lines:
    """The bar's stand-in off a terminal: ``desc: n/total (p%), rate, ETA`` every ``interval`` s, and at the end."""

    def __init__(self, *, total: int | None, desc: str, unit: str, interval: float, stream: TextIO | None,
                 quiet: bool) -> None:
        # stream None: sys.stdout when a line is printed (whatever it is by then: a test's capture swaps it)
        self.total, self.desc, self.unit, self.interval, self.stream = total, desc, unit, interval, stream
        self.n = 0
        self.postfix = ""
        self.quiet = quiet
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.quiet and now - self._last >= self.interval and (self.total is None or self.n < self.total):
            self._last = now
            self._print(now, final=False)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def write(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(time.monotonic(), final=True)

    def _print(self, now: float, *, final: bool) -> None:
        elapsed = now - self._t0
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total is not None else "")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {_rate(self.n, elapsed, self.unit)}, {_clock(elapsed)}"
        if not final and self.total and self.n:
            tail += f", ETA {_clock(elapsed * (self.total - self.n) / self.n)}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{pct}{tail}{extra}", file=self.stream or sys.stdout, flush=True)

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(*, total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None,
             interval: float | None = None) -> Any:
    """A progress display for one stage (a context manager with ``update(n)``, ``set_postfix_str``,
    ``write(line)`` and ``close()``): a tqdm bar on a terminal, else :class:`Lines`."""
    how = mode(stream)
    if how == "bar":
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream or sys.stderr, dynamic_ncols=True,
                    unit_scale=unit in ("img", "row"), smoothing=0.1)
    return Lines(total=total, desc=desc, unit=unit, stream=stream, quiet=how == "off",
                 interval=LINE_INTERVAL_S if interval is None else interval)

