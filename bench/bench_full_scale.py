"""GTZAN's full scale on this CPU: the frozen-base 10-fold CV end to end, bf16 against fp32.

On a synthetic GTZAN-shaped set of 1000 clips of 30 s (made once, then cached), the
pipeline's steps run as its components call them, download to report: download (the
archive over file://), pack, embed every clip once, the ten fold heads, aggregate. Twice,
taking turns phase by phase:

- ours: the pipeline's defaults, `precision=auto` (bf16 autocast where the CPU has native
  bf16; then torch.compile of the base where the step embeds 3 h of audio or more);
- baseline: `precision=fp32`, the embed step's numbers as they were before bf16.

It prints each phase's seconds for both, the embed's clips/s and its achieved GFLOP/s
(Cnn14's FLOPs per clip counted by torch.utils.flop_counter on one clip) against this
machine's peak measured in the same run (the best of a large matmul and a Cnn14-sized
convolution, in fp32 and in bf16), the CPU's flags, the accuracies of both runs fold by
fold with the paired test `genreflow compare` uses, and how far the bf16 embeddings are
from the fp32 ones. The goal (issue 19): download to report within 12 minutes at full scale
on a 2-core CPU with native bf16.

What it leaves out: making the synthetic set (cached), and what kfp.local adds around the
steps (a process per task, MLflow logging), which the issue's pipeline run put at a few
seconds per step.

    python bench/bench_full_scale.py [--quick] [--cache DIR]    # --quick: 200 clips
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import common

SECONDS = 30.0
FOLDS = list(range(1, 11))
GOAL_SECONDS = 12 * 60
PHASES = ("download", "pack", "embed", "heads", "aggregate")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--cache",
        type=Path,
        default=common.REPO / "workspace" / "bench-full-scale",
        help="where the synthetic set is kept between runs (default workspace/bench-full-scale)",
    )
    p.add_argument("--clips-per-genre", type=int, help="default 100, or 20 with --quick")
    args = p.parse_args()
    clips_per_genre = args.clips_per_genre or (20 if args.quick else 100)

    import torch

    archive, sha256 = cached_set(args.cache, clips_per_genre)
    peak = measured_peak()
    flops_per_clip = cnn14_flops_per_clip(SECONDS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_full_scale."))
    try:
        runs = run_pipelines(archive, sha256, workdir, ("auto", "fp32"))
        agreement = embedding_agreement(runs["auto"]["embeddings"], runs["fp32"]["embeddings"])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    ours, base = runs["auto"], runs["fp32"]
    clips = ours["clips"]
    table = common.Table(
        f"Frozen-base 10-fold CV end to end, {clips} clips of {SECONDS:g} s: "
        f"precision auto ({ours['precision']}{', compiled' if ours['compiled'] else ''}) "
        "vs fp32",
        args.load_at_start,
    )
    total = {name: sum(run["seconds"].values()) for name, run in runs.items()}
    table.add("download to report", total["auto"], total["fp32"], "s", higher_is_better=False)
    for phase in PHASES:
        table.add(
            phase, ours["seconds"][phase], base["seconds"][phase], "s", higher_is_better=False
        )
    table.add(
        "embed rate",
        clips / ours["seconds"]["embed"],
        clips / base["seconds"]["embed"],
        "clips/s",
    )
    table.add(
        "embed: achieved GFLOP/s",
        flops_per_clip * clips / ours["seconds"]["embed"] / 1e9,
        flops_per_clip * clips / base["seconds"]["embed"] / 1e9,
        "GFLOP/s",
    )
    table.note(
        f"goal: download to report within {GOAL_SECONDS // 60} minutes at full scale "
        f"(1000 clips); this run: {total['auto']:.0f} s for {clips} clips"
        + (
            f", {'met' if total['auto'] <= GOAL_SECONDS else 'MISSED'}"
            if clips >= 1000
            else f" (--quick: the goal is for the full run; x{1000 / clips:g} would be "
            f"about {total['auto'] * 1000 / clips:.0f} s)"
        )
    )
    for name, label in (("auto", "ours"), ("fp32", "fp32")):
        run = runs[name]
        gflops = flops_per_clip * clips / run["seconds"]["embed"] / 1e9
        machine_peak = peak[run["precision"]]
        table.note(
            f"{label}: embed in {run['precision']}"
            f"{' (compiled, compile included)' if run['compiled'] else ''}, "
            f"{gflops:.0f} GFLOP/s = {gflops / machine_peak['gflops']:.0%} of this machine's "
            f"measured {run['precision']} peak ({machine_peak['gflops']:.0f} GFLOP/s, "
            f"{machine_peak['kernel']}); accuracy {run['accuracy_mean']:.3f} +- "
            f"{run['accuracy_std']:.3f} over 10 folds"
        )
    table.note(
        f"Cnn14's forward: {flops_per_clip / 1e9:.1f} GFLOP per {SECONDS:g} s clip "
        "(torch.utils.flop_counter: convolutions and matmuls, 2 FLOPs per multiply-add)"
    )
    table.note(
        "peaks measured in this run: "
        + "; ".join(
            f"{precision} matmul {peak[precision]['matmul']:.0f}, conv "
            f"{peak[precision]['conv']:.0f} GFLOP/s"
            for precision in ("fp32", "bf16")
        )
    )
    test = paired(ours, base)
    table.note(
        "per-fold accuracy, ours - fp32: "
        + ", ".join(f"{d:+.2f}" for d in test["differences"].values())
        + f"; mean {test['mean_difference']:+.4f}, corrected 95% interval "
        f"[{test['corrected_ci']['low']:+.4f}, {test['corrected_ci']['high']:+.4f}], "
        f"p = {test['p_value']:.2f} (the Nadeau-Bengio paired test of genreflow compare)"
    )
    table.note(
        f"embeddings, ours vs fp32: cosine similarity >= {agreement['min_cosine']:.6f}, "
        f"relative error <= {agreement['max_relative_error']:.4f} (worst clip)"
    )
    flags = cpu_flags()
    table.note(
        "CPU flags: " + ", ".join(f"{flag} {'yes' if flags[flag] else 'no'}" for flag in flags)
    )
    table.note(f"torch threads: {torch.get_num_threads()} (genreflow caps them at the CPU quota)")
    table.print(common.command_line())


def cached_set(cache: Path, clips_per_genre: int) -> tuple[Path, str]:
    """The synthetic set's archive and sha256, made once per size and kept in `cache`."""
    from genreflow.data.synth import make_synthetic_gtzan

    folder = cache / f"synthetic-{clips_per_genre * 10}x{SECONDS:g}s"
    record = folder / "sha256.json"
    if record.is_file():
        known = json.loads(record.read_text())
        archive = Path(known["archive"])
        if archive.is_file() and archive.stat().st_size == known["bytes"]:
            common.log(f"synthetic set: cached, {archive}")
            return archive, known["sha256"]
    started = time.perf_counter()
    archive, sha256 = make_synthetic_gtzan(
        folder,
        clips_per_genre=clips_per_genre,
        seconds=SECONDS,
        seed=0,
        workers=common.cores(),
    )
    record.write_text(
        json.dumps({"archive": str(archive), "sha256": sha256, "bytes": archive.stat().st_size})
    )
    common.log(
        f"synthetic set: {clips_per_genre * 10} clips of {SECONDS:g} s made in "
        f"{time.perf_counter() - started:.0f} s (not timed below) -> {archive}"
    )
    return archive, sha256


def run_pipelines(archive: Path, sha256: str, workdir: Path, precisions: tuple) -> dict:
    """The frozen-base branch's steps, as its components call them, once per precision;
    seconds per phase. The runs take turns phase by phase, so that a change in the
    machine's load falls on both alike."""
    from genreflow.aggregate import aggregate
    from genreflow.data.download import download
    from genreflow.embedding import embed_features
    from genreflow.features import pack
    from genreflow.head import train_head
    from genreflow.pipelines.cv import REPRESENTATION  # what the pipeline packs by default
    from genreflow.recipe import HeadConfig

    def heads(embedded: dict, folder: Path) -> list[Path]:
        for fold in FOLDS:
            train_head(HeadConfig(embedded["embeddings"], fold, str(folder / f"fold{fold}")))
        return [folder / f"fold{fold}" for fold in FOLDS]

    steps = {
        "download": lambda run, folder: download(
            archive.as_uri(), folder / "dataset", sha256=sha256, progress=False
        ),
        "pack": lambda run, folder: (
            pack(
                run["download"],
                folder / "features.h5",
                clip_seconds=SECONDS,
                representation=REPRESENTATION,
                progress=False,
            ).path
        ),
        "embed": lambda run, folder: embed_features(
            run["pack"], folder / "embeddings", precision=run["asked"], seed=0
        ),
        "heads": lambda run, folder: heads(run["embed"], folder),
        "aggregate": lambda run, folder: aggregate(run["heads"], folder / "report"),
    }
    runs = {precision: {"asked": precision, "seconds": {}} for precision in precisions}
    for phase, step in steps.items():
        for precision, run in runs.items():
            started = time.perf_counter()
            run[phase] = step(run, workdir / precision)
            run["seconds"][phase] = time.perf_counter() - started
            common.log(f"precision {precision}: {phase} {run['seconds'][phase]:.1f} s")
    for run in runs.values():
        embedded, accuracies = run["embed"], report_accuracies(run["aggregate"])
        run.update(
            clips=embedded["clips"],
            precision=embedded["precision"],
            compiled=embedded["compiled"],
            embeddings=embedded["embeddings"],
            fold_accuracy=accuracies,
            accuracy_mean=sum(accuracies.values()) / len(accuracies),
            accuracy_std=_std(list(accuracies.values())),
        )
    return runs


def report_accuracies(report: dict) -> dict[int, float]:
    """Fold number -> test accuracy, from aggregate's report."""
    from genreflow.aggregate import flat_metrics

    metrics = flat_metrics(report)
    return {fold: metrics[f"fold_{fold:02d}_accuracy"] for fold in FOLDS}


def _std(values: list[float]) -> float:
    import statistics

    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired(ours: dict, base: dict) -> dict:
    from genreflow.aggregate import paired_comparison

    return paired_comparison(ours["fold_accuracy"], base["fold_accuracy"], train_fraction=0.9)


def embedding_agreement(ours: str, base: str) -> dict:
    import numpy as np

    from genreflow.embedding import read_embeddings

    a = read_embeddings(ours).embedding.astype(np.float64)
    b = read_embeddings(base).embedding.astype(np.float64)
    norms = np.linalg.norm(b, axis=1)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * norms)
    return {
        "min_cosine": float(cosine.min()),
        "max_relative_error": float((np.linalg.norm(a - b, axis=1) / norms).max()),
    }


def cnn14_flops_per_clip(seconds: float) -> float:
    """FLOPs of Cnn14's eval forward on one clip, as torch's flop counter counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from genreflow.audio import SAMPLE_RATE
    from genreflow.models.cnn14 import Cnn14

    model = Cnn14().eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, int(seconds * SAMPLE_RATE)))
    return float(counter.get_total_flops())


def measured_peak(repeats: int = 5) -> dict[str, dict]:
    """This machine's best GFLOP/s in fp32 and bf16, on the threads genreflow uses: a
    2048 x 2048 matmul and a 3x3 convolution the size of Cnn14's third block (256 channels,
    a 30 s clip's 750 frames x 16 mel bins), each the fastest of `repeats`."""
    import torch

    from genreflow.runtime import cpu_threads, torch_threads

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 2048, generator=generator)
    b = torch.randn(2048, 2048, generator=generator)
    x = torch.randn(4, 256, 750, 16, generator=generator)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).eval()
    matmul_flops = 2 * 2048**3
    conv_flops = 2 * 4 * 256 * 256 * 9 * 750 * 16

    def best(run) -> float:
        run()  # warm-up: oneDNN picks and caches its kernels
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            fastest = min(fastest, time.perf_counter() - started)
        return fastest

    peaks = {}
    with torch_threads(cpu_threads()), torch.inference_mode():
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a_, b_, x_ = a.to(dtype), b.to(dtype), x.to(dtype)
            conv_ = conv.to(dtype)
            matmul = matmul_flops / best(lambda a_=a_, b_=b_: a_ @ b_) / 1e9
            convolution = conv_flops / best(lambda c=conv_, x_=x_: c(x_)) / 1e9
            kernel = "matmul" if matmul >= convolution else "conv"
            peaks[precision] = {
                "matmul": matmul,
                "conv": convolution,
                "gflops": max(matmul, convolution),
                "kernel": f"the {kernel}",
            }
            common.log(f"peak {precision}: matmul {matmul:.0f}, conv {convolution:.0f} GFLOP/s")
    return peaks


def cpu_flags() -> dict[str, bool]:
    """Which of CPU_FLAGS /proc/cpuinfo lists (all False where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    return {flag: flag in flags for flag in CPU_FLAGS}


if __name__ == "__main__":
    main()
