"""genreflow.progress: a bar on a terminal, plain lines at intervals everywhere else."""

from __future__ import annotations

import io
import re

from genreflow import progress
from genreflow.progress import LogProgress, format_bytes, format_duration, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_on_a_terminal():
    from tqdm import tqdm

    terminal = _Terminal()
    with progress_bar(10, desc="pack", unit="clip", file=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.update(10)
    assert "\r" in terminal.getvalue()

    log = io.StringIO()
    with progress_bar(10, desc="pack", unit="clip", file=log) as bar:
        assert isinstance(bar, LogProgress)
        bar.update(10)
    assert "\r" not in log.getvalue()
    assert re.fullmatch(r"pack: 10/10 clips in \d+ s, \S+ clips/s\n", log.getvalue())


def test_log_lines_say_done_total_rate_and_time_left(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = LogProgress(1000, desc="pack", unit="clip", file=out, interval_s=30)
    clock[0] += 10
    bar.update(100)  # before the interval: nothing yet
    clock[0] += 30
    bar.update(300)  # 400 in 40 s: 10 clips/s, 600 left
    clock[0] += 60
    bar.update(600)  # done: the closing line says it
    bar.close()
    bar.close()  # a second close writes nothing more
    assert out.getvalue().splitlines() == [
        "pack: 400/1000 clips (40%), 10 clips/s, 1 min 0 s left",
        "pack: 1000/1000 clips in 1 min 40 s, 10 clips/s",
    ]


def test_bytes_resumed_and_disabled(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    # Resumed at 1 MiB: the rate counts only what this run fetched.
    bar = LogProgress(4 << 20, desc="genres.tar.gz", unit="B", initial=1 << 20, file=out)
    clock[0] += progress.LOG_INTERVAL_S
    bar.update(1 << 20)
    assert out.getvalue() == "genres.tar.gz: 2.0 MiB/4.0 MiB (50%), 34.1 KiB/s, 1 min 0 s left\n"

    quiet = io.StringIO()
    with progress_bar(5, desc="x", file=_Terminal(), enabled=False) as off:
        off.update(5)
    with progress_bar(5, desc="x", file=quiet, enabled=False) as off:
        off.update(5)
    assert quiet.getvalue() == ""


def test_formats():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 7500)] == [
        "0 s",
        "59 s",
        "1 min 1 s",
        "59 min 59 s",
        "2 h 05 min",
    ]
    assert format_duration(float("inf")) == "?"
    assert [format_bytes(b) for b in (512, 1536, 5 << 30)] == ["512 B", "1.5 KiB", "5.0 GiB"]
