"""The frozen-base embed on CPU: each lever as a ratio against the fp32 forward, in one process.

On the same synthetic batch (noise shaped like music would change nothing here: the
network's cost does not depend on the values), each way runs Cnn14's eval forward and the
ways take turns in every round, so a change in the machine's load hits all alike:

- fp32: the embed step as it was (inference_mode, default memory format), the baseline;
- fp32 no_grad: the seed's grad mode, for what inference_mode gives;
- fp32 channels_last;
- bf16: autocast to bf16 (what --precision auto picks on a CPU with native bf16);
- bf16 channels_last;
- bf16 compiled: torch.compile (inductor, weights frozen) of the base under bf16 autocast,
  its compile time reported apart (paid once per embed step);
- the bf16 way at other batch sizes, and on one thread against two;
- reading the batch (HDF5 int16 -> float32) against its forward pass: the most that
  overlapping reading with computing could save.

    python bench/bench_embed.py [--quick] [--seconds 10] [--batch-size 8] [--compile]
"""

from __future__ import annotations

import contextlib
import time

import common

FP32 = "fp32"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward (default 8)")
    p.add_argument("--rounds", type=int, help="default 2 (--quick) or 3")
    p.add_argument("--compile", action="store_true", help="also torch.compile (minutes)")
    p.add_argument("--batches", default="4,16", help="other batch sizes for bf16")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)

    import torch

    from genreflow.embedding import _build_base
    from genreflow.runtime import cpu_threads, torch_threads

    base = _build_base(None, None, seed=0)
    samples = int(args.seconds * 32000)
    batch = torch.randn(args.batch_size, samples, generator=torch.Generator().manual_seed(0))
    batch = batch.clamp_(-1, 1) * 0.5
    threads = cpu_threads()

    def forward(model, memory_format=None, bf16=False, grad=torch.inference_mode):
        def run() -> None:
            with (
                grad(),
                torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext(),
            ):
                model(batch)["embedding"].float()

        return run

    import copy

    channels_last = copy.deepcopy(base).to(memory_format=torch.channels_last)
    ways = {
        FP32: forward(base),
        "fp32 no_grad": forward(base, grad=torch.no_grad),
        "fp32 channels_last": forward(channels_last),
        "bf16": forward(base, bf16=True),
        "bf16 channels_last": forward(channels_last, bf16=True),
    }
    compile_seconds = None
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(copy.deepcopy(channels_last))
        started = time.perf_counter()
        forward(compiled, bf16=True)()
        compile_seconds = time.perf_counter() - started
        common.log(f"torch.compile: first call {compile_seconds:.1f} s")
        ways["bf16 channels_last compiled"] = forward(compiled, bf16=True)

    with torch_threads(threads):
        for run in ways.values():  # one warm-up each
            run()
        seconds = common.alternate(ways, rounds)

    table = common.Table(
        f"Frozen-base embed on CPU: Cnn14 eval forward, {args.batch_size} clips of "
        f"{args.seconds:g} s, {threads} threads",
        args.load_at_start,
    )
    clips = args.batch_size
    base_rate = clips / common.median(seconds[FP32])
    for name in ways:
        if name == FP32:
            continue
        table.add(f"{name} vs fp32", clips / common.median(seconds[name]), base_rate, "clips/s")
    table.note(
        "the same ratios from each way's fastest round (the least disturbed): "
        + "; ".join(
            f"{name} {min(seconds[FP32]) / min(values):.2f}x"
            for name, values in seconds.items()
            if name != FP32
        )
    )
    table.note(
        "seconds per batch: "
        + "; ".join(f"{name} {common.spread(values)}" for name, values in seconds.items())
    )
    if compile_seconds is not None:
        table.note(f"torch.compile's first call (compile included): {compile_seconds:.1f} s")

    # Batch size and threads, for bf16 (the CPU's default where it is native).
    others = {}
    for size in [int(s) for s in args.batches.split(",") if s]:
        other = batch[:1].repeat(size, 1)
        others[f"bf16 batch {size}"] = (
            size,
            lambda other=other: _bf16_forward(base, other),
        )
    others["bf16 1 thread"] = (clips, lambda: _bf16_forward(base, batch, threads=1))
    reference = {"bf16": (clips, lambda: _bf16_forward(base, batch))}
    with torch_threads(threads):
        for _, run in {**reference, **others}.values():
            run()
        timed = common.alternate({k: v[1] for k, v in {**reference, **others}.items()}, rounds)
    bf16_rate = clips / common.median(timed["bf16"])
    for name, (size, _) in others.items():
        table.add(
            f"{name} vs bf16 batch {clips}, {threads} threads",
            size / common.median(timed[name]),
            bf16_rate,
            "clips/s",
        )

    read = _read_seconds(args.batch_size, samples)
    table.note(
        f"reading a batch of {clips} (HDF5 int16 -> float32): {read * 1000:.0f} ms, "
        f"{read / common.median(seconds['bf16']):.1%} of its bf16 forward: the most that "
        "overlapping reading and computing can save"
    )
    table.print(common.command_line())


def _bf16_forward(base, batch, threads: int | None = None) -> None:
    import torch

    from genreflow.runtime import torch_threads

    with torch_threads(threads), torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        base(batch)["embedding"].float()


def _read_seconds(clips: int, samples: int) -> float:
    """Seconds to read `clips` rows of int16 from an HDF5 file as the embed step does."""
    import tempfile
    from pathlib import Path

    import h5py
    import numpy as np

    from genreflow.audio import int16_to_float32

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.h5"
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as hf:
            hf["waveform"] = rng.integers(-20000, 20000, size=(clips, samples), dtype=np.int16)
        best = float("inf")
        for _ in range(3):
            with h5py.File(path, "r") as hf:
                started = time.perf_counter()
                int16_to_float32(hf["waveform"][0:clips])
                best = min(best, time.perf_counter() - started)
    return best


if __name__ == "__main__":
    main()
