"""Progress of a long prepare: a bar on a terminal, a plain line every so often otherwise.

Counts bytes read of the total (on disk, so compressed inputs count as stored), documents and
tokens; the rate and the ETA come from what was done since this run started (chunks reused by
--resume count as done but not towards the rate).  It prints only; it never changes the work.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

_BAR = 30


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def _rate(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """update(bytes, documents, tokens) with increments; close() ends the bar's line.
    `unit` names what the third count counts, `label` starts each plain line."""

    def __init__(self, total_bytes: int, *, done_bytes: int = 0, stream: TextIO | None = None,
                 tty: bool | None = None, interval: float = 10.0,
                 log: Callable[[str], None] | None = None, label: str = "prepare", unit: str = "tokens"):
        self.label, self.unit = label, unit
        self.total, self.bytes, self.documents, self.tokens = total_bytes, done_bytes, 0, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log = log or (lambda line: print(line, file=self.stream, flush=True))
        # A terminal redraws often; a log file gets a line per interval.
        self.interval = 0.2 if self.tty else interval
        self._start_bytes = done_bytes
        self._start = self._last = time.perf_counter()
        self._drawn = False

    def update(self, nbytes: int, documents: int, tokens: int) -> None:
        self.bytes += nbytes
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        share = self.bytes / self.total if self.total else 1.0
        new = self.bytes - self._start_bytes
        left = self.total - self.bytes
        eta = _clock(left * elapsed / new) if new > 0 else "?"
        stats = (f"{self.documents:,} documents, {_rate(self.tokens / elapsed)} {self.unit}/s, "
                 f"ETA {eta}")
        if self.tty:
            filled = int(_BAR * min(share, 1.0))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (_BAR - filled)}] {share:4.0%} "
                              f"{_size(self.bytes)}/{_size(self.total)} {stats}\033[K")
            self.stream.flush()
            self._drawn = True
        else:
            self.log(f"{self.label}: {share:.0%} ({_size(self.bytes)} of {_size(self.total)}), {stats}")

    def close(self) -> None:
        if self._drawn:
            self._show(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
