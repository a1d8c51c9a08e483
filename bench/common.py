"""What the benchmarks share: the machine's description, synthetic data, timing, the table.

Every benchmark measures its baseline in the same run, on the same data, alternating
rounds of the two so that a change in the machine's load hits both alike, and prints a
table: each figure, the baseline, and the ratio (ours / baseline, higher is better).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="fewer clips and rounds (what `make bench` runs)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the synthetic data goes (default: a temporary folder, removed after)",
    )
    # The load when the benchmark starts, for its table (args.load_at_start).
    p.set_defaults(load_at_start=load_average())
    return p


def cores() -> int:
    """The cores this process may use (its CPU set), as genreflow's defaults count them."""
    from genreflow.features import default_workers

    return default_workers()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine() -> str:
    """One line: CPU, cores, native bf16, torch and the GPU."""
    import torch

    from genreflow.runtime import cpu_has_native_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{cpu_model()}, {cores()} cores ({bf16}), torch {torch.__version__}, {gpu}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synth_dataset(workdir: Path, *, clips_per_genre: int, seconds: float) -> Path:
    """A synthetic GTZAN tree (genreflow.data.synth), extracted as `genreflow download`
    extracts it; returns the folder that holds the genre folders."""
    from genreflow.data.download import download
    from genreflow.data.synth import make_synthetic_gtzan

    started = time.perf_counter()
    archive, sha256 = make_synthetic_gtzan(
        workdir / "archive",
        clips_per_genre=clips_per_genre,
        seconds=seconds,
        seed=0,
        workers=cores(),
    )
    root = download(archive, workdir / "dataset", sha256=sha256, progress=False)
    log(
        f"synthetic set: {clips_per_genre * 10} clips of {seconds:g} s in "
        f"{time.perf_counter() - started:.1f} s -> {root}"
    )
    return root


def packed_features(workdir: Path, *, clips_per_genre: int, seconds: float) -> Path:
    """A synthetic set packed by `genreflow pack` into features.h5."""
    from genreflow.features import pack

    root = synth_dataset(workdir, clips_per_genre=clips_per_genre, seconds=seconds)
    summary = pack(root, workdir / "features.h5", clip_seconds=seconds, progress=False)
    log(str(summary))
    return summary.path


def busy_cpu_seconds() -> float:
    """CPU time every core of the machine has spent busy since boot (Linux), in seconds."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def alternate(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    busy: dict[str, list[float]] | None = None,
    settle: bool = False,
) -> dict[str, list[float]]:
    """Wall seconds of each run, `rounds` times, the runs taking turns within each round.

    With `busy`, also the machine's busy CPU seconds during each run (on a quiet machine,
    the CPU time a run costs, its child processes and the kernel's work for it included).
    With `settle`, every file written is flushed to disk after each run, untimed, so that
    the kernel does not write one run's output back during the next one.
    """
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(1, rounds + 1):
        for name, run in runs.items():
            cpu_before = busy_cpu_seconds()
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
            if busy is not None:
                busy.setdefault(name, []).append(busy_cpu_seconds() - cpu_before)
            if settle:
                os.sync()
            log(f"round {round_}/{rounds}: {name} {seconds[name][-1]:.2f} s")
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """The range of a measured figure, e.g. '3.1-3.4' (one value: '3.1')."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{min(values):.3g}-{max(values):.3g}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class Table:
    """A Markdown table of figures against their baselines."""

    HEADER = ("measure", "ours", "baseline", "ratio", "target")

    def __init__(self, title: str, load_at_start: float):
        self.title = title
        self.load_at_start = load_at_start
        self.rows: list[tuple[str, ...]] = []
        self.notes: list[str] = []

    def add(
        self,
        measure: str,
        ours: float,
        baseline: float,
        unit: str,
        *,
        target: float | None = None,
        higher_is_better: bool = True,
    ) -> float:
        """One row; returns the ratio (how many times better ours is)."""
        ratio = ours / baseline if higher_is_better else baseline / ours
        met = "" if target is None else f">= {target:g}x {'met' if ratio >= target else 'MISSED'}"
        shown = f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x"
        self.rows.append((measure, _figure(ours, unit), _figure(baseline, unit), shown, met))
        return ratio

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        lines = [f"### {self.title}", ""]
        widths = [max(len(r[i]) for r in (self.HEADER, *self.rows)) for i in range(5)]
        for index, row in enumerate((self.HEADER, *self.rows)):
            lines.append(
                "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
            )
            if index == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)

    def print(self, command: str) -> None:
        print()
        print(self.render())
        print()
        print(f"Machine: {machine()}.")
        print(
            f"Load average (1 min): {self.load_at_start:.2f} at the start, "
            f"{load_average():.2f} at the end."
        )
        print(f"Command: `{command}`")
        sys.stdout.flush()


def _figure(value: float, unit: str) -> str:
    if unit == "s" and value >= 3600:
        return f"{value / 3600:,.1f} h"
    if value >= 1000:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
