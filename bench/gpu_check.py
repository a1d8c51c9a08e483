"""The GPU check: the seed recipe's fine-tune training step on one GPU, in one command.

What the performance goal needs, from one run of `make gpu-check` (within 8 minutes on one
GPU): genreflow's fine-tune training step (genreflow.train: Transfer_Cnn14 with every
parameter trained, the seed's recipe: 30 s clips, batch 32 with mixup, so 64 clips drawn
per step and mixed two by two, Adam lr 1e-4 with amsgrad, clip_nll) in clips/s for

- fp32 (what PyTorch does by default: cuDNN convolutions may use TF32 tensor cores on
  Ampere and newer, torch.backends.cudnn.allow_tf32; matmuls do not),
- bf16 autocast,
- bf16 autocast + channels_last (genreflow's default on a CUDA GPU with bf16),
- bf16 autocast + channels_last + torch.compile,

with each one's peak GPU memory, its FLOP/s (the step's FLOPs counted by
torch.utils.flop_counter) as a fraction of the GPU's datasheet peak (PEAK_TFLOPS, by
device name; an unknown device is said to be one), which setting won, and the 10-fold seed
recipe's time extrapolated from the measured steps: 10 folds x 10,000 iterations (the
seed's runme.sh: stop_iteration=10000), training steps only (its evaluations, every 200
iterations, add a forward pass over about 200 clips: under 1% of the FLOPs, stated in the
output).

Then one real fine-tune fold of the seed's recipe through genreflow.train.train_fold
(genreflow's defaults on the device: bf16 autocast and channels_last where the GPU has
bf16), FOLD_ITERATIONS iterations on a synthetic GTZAN-shaped set of 30 s clips
(genreflow.data.synth, packed by genreflow.features.pack), an evaluation at iteration 200
and at the end: clips/s over the fold's wall time, the share of that time in reading
batches, training steps, evaluation, writing checkpoints and waiting for their upload
(`--fold-out gs://BUCKET/PREFIX` uploads them to a bucket, in the background as a
pipeline's fold does; by default they stay in a local folder), the peak memory, and the
10-fold seed recipe's time extrapolated from it against the goal of 8-10 minutes.

Without a CUDA device it is a dry run on the CPU: tiny clips, batch 2, few steps, no
torch.compile unless --compile-on-cpu, a fold of a few iterations. It says DRY RUN, and
its figures are not a GPU's; the suite runs it to keep the code and its arithmetic working
until a GPU is lent.

    python bench/gpu_check.py [--dry-run] [--json FILE] [--steps N] [--fold-iterations N]
        [--fold-out DIR|gs://BUCKET/PREFIX] [--no-fold]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

SEED_ITERATIONS, FOLDS = 10_000, 10  # the seed's runme.sh (stop_iteration) and 10-fold CV
SEED_SECONDS, SEED_BATCH = 30.0, 32  # clip length; clips per step after mixup
EVAL_EVERY, EVAL_CLIPS = 200, 200  # an evaluation: the validation and test folds' clips
TIME_LIMIT = 8 * 60  # what the whole check must fit in on a GPU
FOLD_ITERATIONS = 300  # the real fold's: evaluations at 200 (the seed's interval) and 300
FOLD_CLIPS_PER_GENRE = 10  # 100 clips, 10 a fold: 80 train, 10 choose, 10 are reported
GOAL_SECONDS = (8 * 60, 10 * 60)  # 10 folds of the seed recipe, the performance goal

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (fp32, tf32, bf16); None where
# the GPU has no such arithmetic. The datasheets print the tensor-core figures "with
# sparsity", twice the dense ones given here.
PEAK_TFLOPS: dict[str, tuple[float, float | None, float | None, str]] = {
    "H100 SXM": (67.0, 494.7, 989.4, "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM)"),
    "H100 PCIe": (51.0, 378.0, 756.0, "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe)"),
    "H100 NVL": (60.0, 417.5, 835.0, "NVIDIA H100 Tensor Core GPU datasheet (H100 NVL)"),
    "H200 SXM": (67.0, 494.7, 989.4, "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM)"),
    "H200 NVL": (60.0, 417.5, 835.0, "NVIDIA H200 Tensor Core GPU datasheet (H200 NVL)"),
    "A100": (19.5, 156.0, 312.0, "NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe alike)"),
    "L4": (30.3, 60.0, 121.0, "NVIDIA L4 Tensor Core GPU datasheet"),
    "T4": (8.1, None, None, "NVIDIA T4 Tensor Core GPU datasheet (no TF32 or bf16)"),
    "V100 SXM2": (15.7, None, None, "NVIDIA V100 Tensor Core GPU datasheet (no TF32 or bf16)"),
    "V100 PCIe": (14.0, None, None, "NVIDIA V100 Tensor Core GPU datasheet (no TF32 or bf16)"),
}

FP32, BF16, CHANNELS_LAST, COMPILED = (
    "fp32",
    "bf16 autocast",
    "bf16 + channels_last",
    "bf16 + channels_last + compile",
)
SETTINGS = {  # name: (precision, channels_last, compiled)
    FP32: ("fp32", False, False),
    BF16: ("bf16", False, False),
    CHANNELS_LAST: ("bf16", True, False),
    COMPILED: ("bf16", True, True),
}
# genreflow's fine-tune default on a CUDA GPU with bf16 (genreflow.train.prepare_for_training).
DEFAULT_ON_CUDA = CHANNELS_LAST


# --- the arithmetic ----------------------------------------------------------------------
def datasheet_key(device_name: str) -> str | None:
    """PEAK_TFLOPS's key for a torch.cuda.get_device_name() string, or None if unknown.

    Examples: "NVIDIA H100 80GB HBM3" (the SXM part) -> "H100 SXM", "NVIDIA H100 PCIe" ->
    "H100 PCIe", "NVIDIA A100-SXM4-80GB" -> "A100", "Tesla V100-PCIE-32GB" -> "V100 PCIe",
    "NVIDIA L40S" -> None (not the L4).
    """
    name = device_name.upper()
    for model in ("H100", "H200"):
        if model in name:
            if "NVL" in name:
                return f"{model} NVL"
            return f"{model} PCIe" if "PCIE" in name else f"{model} SXM"
    if "A100" in name:
        return "A100"
    if "V100" in name:
        return "V100 PCIe" if "PCIE" in name else "V100 SXM2"
    for model in ("L4", "T4"):
        if re.search(rf"(?<![A-Z0-9]){model}(?![A-Z0-9])", name):
            return model
    return None


def peak_tflops(device_name: str, precision: str, tf32: bool) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, what it is and its source) for a precision on a device, or None
    for an unknown device or arithmetic the device lacks. fp32 with `tf32` on counts the
    TF32 tensor-core peak where the device has one (the convolutions run there)."""
    key = datasheet_key(device_name)
    if key is None:
        return None
    fp32, tf32_peak, bf16, source = PEAK_TFLOPS[key]
    if precision == "bf16":
        return (bf16, f"{key} bf16 dense, {source}") if bf16 else None
    if tf32 and tf32_peak:
        return tf32_peak, f"{key} TF32 dense, {source}"
    return fp32, f"{key} fp32, {source}"


def peak_fraction(flops_per_step: float, step_seconds: float, peak: float) -> float:
    """Achieved FLOP/s over the peak (in TFLOP/s)."""
    return flops_per_step / step_seconds / (peak * 1e12)


def extrapolated_seconds(
    step_seconds: float, iterations: int = SEED_ITERATIONS, folds: int = FOLDS
) -> float:
    """The seed recipe's training time: folds x iterations x one step."""
    return step_seconds * iterations * folds


def evaluation_share(
    forward_flops_per_clip: float,
    flops_per_step: float,
    batch: int = SEED_BATCH,
    iterations: int = SEED_ITERATIONS,
    eval_every: int = EVAL_EVERY,
    eval_clips: int = EVAL_CLIPS,
) -> float:
    """The FLOPs a fold's evaluations add, as a fraction of its training steps', for the
    seed's batch (`flops_per_step` was counted at `batch`; both at one clip length)."""
    evaluations = iterations // eval_every
    seed_step = flops_per_step * SEED_BATCH / batch
    return evaluations * eval_clips * forward_flops_per_clip / (iterations * seed_step)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


# --- the measurement ---------------------------------------------------------------------
def measure(setting: str, device, *, seconds: float, batch: int, steps: int, warmup: int):
    """One setting's training step: seconds per step (median of `steps`), peak memory."""
    import statistics

    import numpy as np
    import torch

    from genreflow.audio import SAMPLE_RATE
    from genreflow.data.genres import GENRES
    from genreflow.models.cnn14 import Mixup
    from genreflow.models.transfer import TransferCnn14
    from genreflow.runtime import autocast_for, resolve_precision
    from genreflow.train import make_optimizer, training_step

    precision, channels_last, compiled = SETTINGS[setting]
    precision = resolve_precision(precision, device)
    torch.manual_seed(0)
    model = TransferCnn14(classes_num=len(GENRES), freeze_base=False).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step_model = torch.compile(model) if compiled else model
    optimizer = make_optimizer(model, 1e-4)
    amp = autocast_for(device, precision)
    mixup = Mixup(1.0, seed=1)
    drawn = batch * 2
    generator = torch.Generator().manual_seed(0)
    waveform = (torch.rand(drawn, int(seconds * SAMPLE_RATE), generator=generator) - 0.5).to(device)
    target = torch.eye(len(GENRES))[torch.arange(drawn) % len(GENRES)].to(device)

    def step() -> None:
        weights = torch.from_numpy(mixup.get_lambda(drawn).astype(np.float32)).to(device)
        training_step(step_model, optimizer, waveform, target, weights, amp)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):  # cuDNN's algorithm search, torch.compile's compile
        step()
    synchronize()
    warmup_seconds = time.perf_counter() - started
    timed = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        synchronize()
        timed.append(time.perf_counter() - started)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "precision": precision,
        "step_seconds": statistics.median(timed),
        "steps": timed,
        "warmup_seconds": warmup_seconds,
        "clips_per_second": drawn / statistics.median(timed),
        "peak_memory_bytes": memory,
    }


def counted_flops(device, *, seconds: float, batch: int) -> tuple[float, float]:
    """(FLOPs of one training step at `batch`, FLOPs of one clip's eval forward), as
    torch.utils.flop_counter counts them (convolutions, matmuls; 2 per multiply-add).

    Counted on a step of batch 2 and scaled: every counted operation is linear in the
    batch, and a GPU too small for the seed's batch in fp32 can still count it."""
    counted_batch = 2
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from genreflow.audio import SAMPLE_RATE
    from genreflow.data.genres import GENRES
    from genreflow.models.cnn14 import Mixup
    from genreflow.models.transfer import TransferCnn14
    from genreflow.train import make_optimizer, training_step

    model = TransferCnn14(classes_num=len(GENRES), freeze_base=False).to(device).train()
    optimizer = make_optimizer(model, 1e-4)
    drawn = counted_batch * 2
    waveform = torch.zeros(drawn, int(seconds * SAMPLE_RATE), device=device)
    target = torch.eye(len(GENRES), device=device)[torch.arange(drawn) % len(GENRES)]
    weights = torch.from_numpy(Mixup(1.0, seed=1).get_lambda(drawn).astype(np.float32))
    step_counter = FlopCounterMode(display=False)
    with step_counter:
        training_step(
            model, optimizer, waveform, target, weights.to(device), contextlib.nullcontext
        )
    forward_counter = FlopCounterMode(display=False)
    model.eval()
    with torch.inference_mode(), forward_counter:
        model(waveform[:1])
    step_flops = float(step_counter.get_total_flops()) * batch / counted_batch
    return step_flops, float(forward_counter.get_total_flops())


def run_check(args: argparse.Namespace) -> dict:
    """Every setting measured, the FLOPs counted; the figures the report prints."""
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if gpu else "cpu")
    seconds, batch = (SEED_SECONDS, SEED_BATCH) if gpu else (args.cpu_seconds, 2)
    steps = args.steps or (10 if gpu else 1)
    warmup = 3 if gpu else 1
    name = torch.cuda.get_device_name(device) if gpu else "CPU (dry run)"
    tf32 = bool(gpu and torch.backends.cudnn.allow_tf32)
    started = time.monotonic()
    result = {
        "dry_run": not gpu,
        "device": name,
        "clip_seconds": seconds,
        "batch": batch,
        "clips_per_step": batch * 2,
        "steps": steps,
        "cudnn_tf32": tf32,
        "torch": torch.__version__,
        "settings": {},
        "skipped": {},
    }
    flops, forward_flops = counted_flops(device, seconds=seconds, batch=batch)
    result["flops_per_step"], result["forward_flops_per_clip"] = flops, forward_flops
    for setting, (precision, _, compiled) in SETTINGS.items():
        if compiled and not gpu and not args.compile_on_cpu:
            result["skipped"][setting] = "dry run: torch.compile skipped (--compile-on-cpu)"
            continue
        if precision == "bf16" and gpu and not _cuda_bf16():
            result["skipped"][setting] = f"{name} has no bf16 arithmetic"
            continue
        if gpu and time.monotonic() - started > TIME_LIMIT * 0.75:
            result["skipped"][setting] = "out of time (the check must fit in 8 minutes)"
            continue
        try:
            measured = measure(
                setting, device, seconds=seconds, batch=batch, steps=steps, warmup=warmup
            )
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            result["skipped"][setting] = f"out of GPU memory at batch {batch}"
            continue
        peak = peak_tflops(name, measured["precision"], tf32) if gpu else None
        if peak is None and args.assume_device:
            peak = peak_tflops(args.assume_device, measured["precision"], tf32)
        measured["peak_tflops"], measured["peak_source"] = peak or (None, None)
        measured["peak_fraction"] = (
            peak_fraction(flops, measured["step_seconds"], peak[0]) if peak else None
        )
        measured["seed_recipe_seconds"] = extrapolated_seconds(measured["step_seconds"])
        result["settings"][setting] = measured
        print(f"[gpu-check] {setting}: {measured['clips_per_second']:.2f} clips/s", file=sys.stderr)
    result["winner"] = max(
        result["settings"],
        key=lambda s: result["settings"][s]["clips_per_second"],
        default=None,
    )
    result["evaluation_share"] = evaluation_share(forward_flops, flops, batch)
    if not args.no_fold:
        result["fold"] = real_fold(args, device, gpu)
    result["seconds"] = time.monotonic() - started
    return result


def real_fold(args: argparse.Namespace, device, gpu: bool) -> dict:
    """One fine-tune fold through train_fold on a synthetic set: its PhaseClock's figures,
    the peak memory and the 10-fold extrapolation (fold_extrapolation)."""
    import resource
    import tempfile

    import torch

    from genreflow.data.download import download
    from genreflow.data.synth import make_synthetic_gtzan
    from genreflow.features import default_workers, pack
    from genreflow.recipe import TrainConfig
    from genreflow.train import PhaseClock, train_fold

    seconds = SEED_SECONDS if gpu else args.cpu_seconds
    iterations = args.fold_iterations or (FOLD_ITERATIONS if gpu else 3)
    clips_per_genre = FOLD_CLIPS_PER_GENRE if gpu else 3
    batch = SEED_BATCH if gpu else 2
    eval_every = EVAL_EVERY if gpu else 2
    with tempfile.TemporaryDirectory(prefix="gpu-check-fold-") as work:
        work = Path(work)
        made = time.monotonic()
        archive, sha256 = make_synthetic_gtzan(
            work / "archive",
            clips_per_genre=clips_per_genre,
            seconds=seconds,
            workers=default_workers(),
        )
        dataset = download(archive, work / "dataset", sha256=sha256, progress=False)
        features = pack(dataset, work / "features.h5", clip_seconds=seconds, progress=False).path
        made = time.monotonic() - made
        print(
            f"[gpu-check] fold: {clips_per_genre * 10} synthetic clips in {made:.0f} s",
            file=sys.stderr,
        )
        config = TrainConfig(
            features=str(features),
            fold=1,
            out=args.fold_out or str(work / "fold"),
            iterations=iterations,
            batch_size=batch,
            eval_every=eval_every,
            device=device.type,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        clock = PhaseClock()
        summary = train_fold(config, clock=clock)
    if device.type == "cuda":
        memory, memory_kind = torch.cuda.max_memory_allocated(device), "GPU allocated"
    else:  # ru_maxrss is in KiB on Linux: the whole process's peak, the steps above included
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory_kind = "process RSS"
    wall = clock.wall_seconds()
    evaluations = len(range(eval_every, iterations, eval_every)) + 1
    fold = {
        "iterations": iterations,
        "clip_seconds": seconds,
        "batch": batch,
        "eval_every": eval_every,
        "evaluations": evaluations,
        "precision": summary["precision"],
        "out": config.out,
        "wall_seconds": wall,
        "clips": clock.clips,
        "clips_per_second": clock.clips / wall,
        "step_clips_per_second": clock.clips / max(clock.seconds["steps"], 1e-9),
        "phase_seconds": dict(clock.seconds),
        "shares": clock.shares(),
        "uploaded_bytes": clock.uploads.bytes,
        "upload_seconds": clock.uploads.seconds,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
    }
    fold["seed_recipe_seconds"] = fold_extrapolation(fold)
    return fold


def fold_extrapolation(
    fold: dict, iterations: int = SEED_ITERATIONS, folds: int = FOLDS, eval_every: int = EVAL_EVERY
) -> float:
    """The 10-fold seed recipe's time from one measured fold: its seconds per iteration
    (reading batches and steps) x the seed's iterations, plus its seconds per evaluation
    (the evaluation and the checkpoint written after it) x the seed's evaluations, per
    fold, folds one after another. The checkpoint counts at this run's average, in which
    one evaluation of few wrote the resume state: an upper bound where states are rarer."""
    phases = fold["phase_seconds"]
    per_iteration = (phases["data"] + phases["steps"]) / fold["iterations"]
    per_evaluation = (phases["evaluation"] + phases["checkpoint"]) / fold["evaluations"]
    per_fold = per_iteration * iterations + per_evaluation * (iterations // eval_every)
    return folds * per_fold


def _cuda_bf16() -> bool:
    from genreflow.runtime import _cuda_has_native_bf16

    return _cuda_has_native_bf16()


def report(result: dict) -> str:
    """The check's figures as text: a table, the winner, the extrapolation."""
    lines = []
    if result["dry_run"]:
        lines += [
            "DRY RUN on the CPU (no CUDA device, or --dry-run): "
            f"{result['clip_seconds']:g} s clips, batch {result['batch']}, "
            f"{result['steps']} steps; these are NOT a GPU's figures.",
            "",
        ]
    lines.append(
        f"## Fine-tune training step, {result['device']}: {result['clip_seconds']:g} s clips, "
        f"batch {result['batch']} with mixup ({result['clips_per_step']} clips drawn per step)"
    )
    lines.append("")
    header = (
        "setting",
        "clips/s",
        "s/step",
        "peak memory",
        "of peak FLOP/s",
        "10-fold seed recipe",
    )
    rows = [header]
    for setting, m in result["settings"].items():
        memory = m["peak_memory_bytes"]
        rows.append(
            (
                setting,
                f"{m['clips_per_second']:.2f}",
                f"{m['step_seconds']:.3f}",
                f"{memory / 2**30:.1f} GiB" if memory is not None else "n/a (CPU)",
                f"{m['peak_fraction']:.1%}" if m["peak_fraction"] is not None else "unknown",
                hours(m["seed_recipe_seconds"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    for setting, why in result["skipped"].items():
        lines.append(f"- {setting}: skipped ({why})")
    lines.append(
        f"- FLOPs per step: {result['flops_per_step'] / 1e12:.2f} TFLOP "
        "(torch.utils.flop_counter, forward and backward: convolutions and matmuls)"
    )
    sources = {m["peak_source"] for m in result["settings"].values() if m["peak_source"]}
    if sources:
        lines.append("- peaks: " + "; ".join(sorted(sources)))
    else:
        lines.append(
            f"- peak FLOP/s: unknown device ({result['device']}): no datasheet figure in "
            "bench/gpu_check.py's PEAK_TFLOPS, so no fraction"
        )
    if result["cudnn_tf32"]:
        lines.append(
            "- fp32: cuDNN may run its convolutions on TF32 tensor cores "
            "(torch.backends.cudnn.allow_tf32, PyTorch's default), so it is set against the "
            "TF32 peak"
        )
    lines.append(
        f"- 10-fold seed recipe: {FOLDS} folds x {SEED_ITERATIONS:,} iterations (the seed's "
        "runme.sh, stop_iteration=10000) x the measured step"
        + (" (of this dry run's batch and clips, not the seed's)" if result["dry_run"] else "")
        + "; training steps only: the "
        f"evaluations (every {EVAL_EVERY} iterations, about {EVAL_CLIPS} clips each) add "
        f"{result['evaluation_share']:.1%} of the FLOPs"
    )
    winner, settings = result["winner"], result["settings"]
    if "fold" in result:
        lines += ["", *fold_report(result["fold"]), ""]
    if winner is None:
        lines.append("- no setting could be measured (see skipped above)")
        lines.append(f"- the check took {result['seconds']:.0f} s; torch {result['torch']}")
        return "\n".join(lines)
    verdict = (
        f"- fastest: {winner}; genreflow's fine-tune default on a CUDA GPU with bf16 is "
        f"{DEFAULT_ON_CUDA} (genreflow.train.prepare_for_training)"
    )
    if winner != DEFAULT_ON_CUDA and DEFAULT_ON_CUDA in settings:
        verdict += (
            f": not the fastest here ({settings[winner]['clips_per_second']:.2f} against "
            f"{settings[DEFAULT_ON_CUDA]['clips_per_second']:.2f} clips/s), revisit it"
        )
    lines.append(verdict)
    lines.append(f"- the check took {result['seconds']:.0f} s; torch {result['torch']}")
    return "\n".join(lines)


def fold_report(fold: dict) -> list[str]:
    """The real fold's figures as text."""
    lines = [
        f"## One fine-tune fold through train_fold: {fold['iterations']} iterations, "
        f"{fold['clip_seconds']:g} s clips, batch {fold['batch']} with mixup, "
        f"{fold['precision']}, {fold['evaluations']} evaluations",
        "",
        f"- {fold['clips_per_second']:.2f} clips/s over the fold's {fold['wall_seconds']:.1f} s "
        f"({fold['step_clips_per_second']:.2f} clips/s in the training steps alone)",
        "- wall time: "
        + ", ".join(f"{share:.1%} {phase}" for phase, share in fold["shares"].items())
        + " (other: loading the data and the model, the report)",
        f"- checkpoints to {fold['out']}: {fold['uploaded_bytes'] / 1e6:.0f} MB uploaded in "
        f"the background in {fold['upload_seconds']:.1f} s"
        + ("" if fold["out"].startswith("gs://") else " (a local folder: no uploads)"),
        f"- peak memory: {fold['peak_memory_bytes'] / 2**30:.1f} GiB ({fold['peak_memory_kind']})",
    ]
    low, high = GOAL_SECONDS
    seed = fold["seed_recipe_seconds"]
    lines.append(
        f"- 10-fold seed recipe at this fold's pace: {hours(seed)} ({seed / 60:.0f} min; the "
        f"goal is {low // 60}-{high // 60} min, {seed / high:.1f}x the upper end)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="run on the CPU even with a GPU")
    p.add_argument("--steps", type=int, help="timed steps per setting: 10 (GPU) or 1 (CPU)")
    p.add_argument(
        "--cpu-seconds",
        type=float,
        default=0.7,
        help="dry run's clip length (default 0.7: SpecAugment's shortest)",
    )
    p.add_argument("--compile-on-cpu", action="store_true", help="dry run: compile too (slow)")
    p.add_argument(
        "--assume-device",
        metavar="NAME",
        help="dry run: set the CPU's figures against this GPU's peak (to check the arithmetic)",
    )
    p.add_argument(
        "--fold-iterations",
        type=int,
        help=f"the real fold's iterations: {FOLD_ITERATIONS} (GPU) or 3 (CPU)",
    )
    p.add_argument(
        "--fold-out",
        metavar="DIR|gs://BUCKET/PREFIX",
        help="where the real fold writes (default: a temporary folder; gs:// to time uploads)",
    )
    p.add_argument("--no-fold", action="store_true", help="leave out the real fold")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    result = run_check(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
