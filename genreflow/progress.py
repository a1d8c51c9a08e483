"""Progress of the long steps (download, pack, embed, synth): one helper for all of them.

Where a person watches (stderr is a terminal) it is a tqdm bar. Elsewhere (a pod's log,
CI, kfp.local's subprocesses, a file) carriage-return updates would pile up as one huge
line, so the step writes a plain line at intervals instead, and one when it ends:

    pack: 120/1000 clips (12%), 4.1 clips/s, 3 min 34 s left
    pack: 1000/1000 clips in 4 min 2 s, 4.1 clips/s
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO

# Seconds between two log lines when stderr is not a terminal.
LOG_INTERVAL_S = 30.0
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def progress_bar(
    total: int | None,
    *,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    unit_scale: bool = False,
    leave: bool = True,
    file: IO[str] | None = None,
):
    """A bar on a terminal, log lines elsewhere, nothing when not ``enabled``.

    Both have the part of tqdm's interface the steps use: ``update(n)``, ``close()`` and
    use as a context manager. ``unit_scale`` with ``unit="B"`` counts bytes (KiB, MiB...).
    """
    file = sys.stderr if file is None else file
    if enabled and _is_terminal(file):
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            unit_scale=unit_scale,
            unit_divisor=1024 if unit_scale else 1000,
            file=file,
            leave=leave,
        )
    return LogProgress(total, desc=desc, unit=unit, initial=initial, file=file, enabled=enabled)


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LogProgress:
    """Counts like a tqdm bar; writes "done/total, rate, time left" every LOG_INTERVAL_S."""

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        file: IO[str] | None = None,
        enabled: bool = True,
        interval_s: float | None = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.file = sys.stderr if file is None else file
        self.enabled = enabled
        self.interval_s = LOG_INTERVAL_S if interval_s is None else interval_s
        self.started = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        finished = self.total is not None and self.n >= self.total  # close() says it
        if self.enabled and not finished and now - self._last >= self.interval_s:
            self._last = now
            self._write(self.line(now))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled and self.n > self.initial:
            self._write(self.final_line(time.monotonic()))

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def rate(self, now: float) -> float:
        """Units per second since this bar started (units done before it excluded)."""
        return (self.n - self.initial) / max(now - self.started, 1e-9)

    def line(self, now: float) -> str:
        rate = self.rate(now)
        done = self._amount(self.n)
        if self.total:
            done = f"{self._counted(f'{done}/{self._amount(self.total)}')} "
            done += f"({100 * self.n / self.total:.0f}%)"
        else:
            done = self._counted(done)
        parts = [f"{self.desc}: {done}", self._rate(rate)]
        if self.total and rate > 0:
            parts.append(f"{format_duration((self.total - self.n) / rate)} left")
        return ", ".join(parts)

    def final_line(self, now: float) -> str:
        done = self._amount(self.n) + (f"/{self._amount(self.total)}" if self.total else "")
        return (
            f"{self.desc}: {self._counted(done)} in {format_duration(now - self.started)}, "
            f"{self._rate(self.rate(now))}"
        )

    def _bytes(self) -> bool:
        return self.unit == "B"

    def _amount(self, value: float | None) -> str:
        return format_bytes(value) if self._bytes() else str(value)

    def _counted(self, amount: str) -> str:
        """'12/100' -> '12/100 clips'; byte amounts carry their unit already."""
        if self._bytes():
            return amount
        return f"{amount} {self._units()}"

    def _units(self) -> str:
        return self.unit + "s" if self.unit == "clip" else self.unit

    def _rate(self, rate: float) -> str:
        if self._bytes():
            return f"{format_bytes(rate)}/s"
        return f"{rate:.3g} {self._units()}/s" if rate < 100 else f"{rate:.0f} {self._units()}/s"

    def _write(self, text: str) -> None:
        print(text, file=self.file, flush=True)


def format_duration(seconds: float) -> str:
    """'45 s', '3 min 34 s', '2 h 05 min'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(value: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in _BINARY_UNITS:
        if abs(value) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
