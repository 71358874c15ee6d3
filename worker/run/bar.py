"""The progress line's parts: the rate over the last minute, and a line that fits the
terminal (the richest frame that does, then as many fields as the room left allows).

Apart from :mod:`worker.run.progress` so that what is drawn can be read, and tested,
without the run it is drawn for.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

#: The span the rate (and so the ETA) is measured over.
RATE_WINDOW = 60.0
#: Before this much of a window is seen, the rate is the average since the start.
RATE_MIN_SPAN = 5.0
_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
_COUNT = "{desc}: {n_fmt} [{elapsed}{postfix}]"
#: The line's frames, richest first: the first that fits the terminal is drawn, and the
#: fields of the postfix fill what it leaves. A narrow terminal loses words, never the
#: line's end (tqdm would cut a frame wider than the terminal mid-word).
BARS = (
    _BAR,
    "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
    "{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
    "{percentage:3.0f}% {n_fmt}/{total_fmt}",
    "{n_fmt}/{total_fmt}",
)
COUNTS = (_COUNT, "{n_fmt} [{elapsed}{postfix}]", "{n_fmt}")


class SteadyRate:
    """Emails per second over the last :data:`RATE_WINDOW` seconds, and the ETA from it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> float:
        """Record ``done`` emails so far; the rate now."""
        now = self._clock()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        first_at, first_done = self._samples[0]
        if now - first_at < RATE_MIN_SPAN:  # too short a span: the run's average
            span = now - self._started
            return done / span if span > 0 else 0.0
        return (done - first_done) / (now - first_at)

    @staticmethod
    def eta(left: int, rate: float) -> float | None:
        """Seconds until ``left`` more are done at ``rate``; None when it cannot be told."""
        return left / rate if rate > 0 and left >= 0 else None


#: The narrowest the bar itself may get before fields are left out of the line.
BAR_MIN = 6


def columns() -> int:
    """The terminal's width now (it may be resized during a run); 120 when unknown."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or 120
    except (OSError, ValueError):
        return 120


def fit(parts: list[str], room: int) -> str:
    """``parts`` joined with " | ", as many as fit in ``room`` characters, in order."""
    text = ""
    for part in parts:
        longer = f"{text} | {part}" if text else part
        if len(longer) > room:
            break
        text = longer
    return text


def frame(
    formats: tuple[str, ...], columns: int, *, want: int = 0, **values: Any
) -> tuple[str, int]:
    """The richest of ``formats`` that fits ``columns`` (with a bar of :data:`BAR_MIN`) and
    leaves ``want`` columns for the postfix (else the richest that fits), and the room it
    leaves for the postfix's fields (0: none)."""
    fitting: list[tuple[str, int]] = []
    for fmt in formats:
        used = len(fmt.format(bar="", postfix="", **values)) + BAR_MIN * ("{bar}" in fmt)
        if used <= columns:
            room = max(0, columns - used - 2) if "{postfix}" in fmt else 0  # 2: ", "
            if room >= want:
                return fmt, room
            fitting.append((fmt, room))
    return fitting[0] if fitting else (formats[-1], 0)


def duration_text(seconds: float) -> str:
    """``45s``, ``3m 20s``, ``2h 05m``: short, and steady in width."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
