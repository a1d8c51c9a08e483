"""Training-step throughput: train.py's step against the same model run the seed's way.

Both run the seed's recipe on the same packed clips (Transfer_Cnn14 with every parameter
trained, Adam lr 1e-4 with amsgrad, mixup alpha 1 on pairs, clip_nll), from the same
weights:

- ours, as `genreflow train` runs it (genreflow.train): the precision `--precision`
  resolves to (auto: bf16 autocast where the CPU or GPU has native bf16, else fp32), the
  memory format chosen for the device, the fused Adam, torch threads capped at the
  usable cores, freed memory kept for the next step, clips held in memory and read with
  one fancy index per batch;
- the seed's way (panns_transfer_to_gtzan): float32, the default memory format, the
  for-loop Adam, the process as it starts, and each clip read by reopening the HDF5 file,
  as its data set's __getitem__ does (there, in DataLoader workers; here, in the step).

Each way runs in its own process, since threads and the allocator are process-wide: the
settings of one must not help (or hurt) the other. The two take turns, one step each, so
a change in the machine's load hits both alike.

Clips per second count the clips a step draws (with mixup, twice the batch), as
summary.json's clips_per_second does. Evaluation: train.py's `evaluate` (eval mode under
torch.inference_mode) against eval-mode forward passes with autograd still recording, and
with torch.no_grad (what the seed does). With a GPU, the same comparisons run there too.

    python bench/bench_train_step.py [--quick] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import common

OURS, SEED = "ours", "seed's way"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8, help="clips after mixup (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="clip length (default 5)")
    p.add_argument("--steps", type=int, help="timed steps of each: 2 (--quick) or 5")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU even if there is one")
    args = p.parse_args()
    steps = args.steps or (2 if args.quick else 5)

    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_step."))
    tables = []
    try:
        clips_per_genre = max(2, -(-4 * args.batch_size // 10))  # a few batches' worth
        features = common.packed_features(
            workdir, clips_per_genre=clips_per_genre, seconds=args.seconds
        )
        devices = ["cpu"]
        if torch.cuda.is_available() and not args.cpu_only:
            devices.append("cuda")
        for device in devices:
            tables.append(compare(features, device, args, steps))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for table in tables:
        table.print(common.command_line())


# --- one way of training, in its own process ---------------------------------------------
def serve(way: str, connection, features: str, device_name: str, batch_size: int, precision):
    """Build one way's model, optimiser and data, then time what the parent asks for."""
    import torch

    from genreflow.runtime import cpu_threads_for_training, freed_memory_kept

    with contextlib.ExitStack() as stack:
        if way == OURS:  # what train_fold wraps a run in
            stack.enter_context(cpu_threads_for_training())
            stack.enter_context(freed_memory_kept())
        runs = _build(way, features, torch.device(device_name), batch_size, precision)
        connection.send({"ready": True, "precision": runs.pop("precision")})
        while (request := connection.recv()) is not None:
            started = time.perf_counter()
            runs[request]()
            if device_name == "cuda":
                torch.cuda.synchronize()
            connection.send(time.perf_counter() - started)


def _build(way: str, features: str, device, batch_size: int, precision: str) -> dict:
    import h5py
    import numpy as np
    import torch

    from genreflow.audio import int16_to_float32
    from genreflow.data.genres import GENRES
    from genreflow.models.cnn14 import Mixup
    from genreflow.models.transfer import TransferCnn14
    from genreflow.runtime import autocast_for, resolve_precision
    from genreflow.train import (
        ADAM,
        EpochSampler,
        PackedClips,
        evaluate,
        make_optimizer,
        prepare_for_training,
        read_fold_index,
        training_step,
    )

    drawn = 2 * batch_size
    index = read_fold_index(features, fold=1)
    one_hot = np.eye(len(GENRES), dtype=np.float32)[index.targets]
    eval_rows = np.arange(len(index.names))[:drawn]
    sampler, mixup = EpochSampler(index.train_rows, 0), Mixup(1.0, seed=1)
    torch.manual_seed(0)  # the same initial weights in both processes
    model = TransferCnn14(classes_num=len(GENRES))

    if way == OURS:
        precision = resolve_precision(precision, device)
        prepare_for_training(model, device, precision)
        amp = autocast_for(device, precision)
        optimizer = make_optimizer(model, 1e-4)
        waveforms = PackedClips(features, np.arange(len(index.names)))

        def read(rows):
            return waveforms.on_device(rows, device)
    else:
        precision = "fp32"
        model.to(device).train()
        amp = contextlib.nullcontext
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=1e-4, **ADAM, foreach=False)

        def read(rows):
            clips = []
            for row in rows:
                with h5py.File(features, "r") as hf:
                    clips.append(int16_to_float32(hf["waveform"][row]))
            return torch.from_numpy(np.stack(clips)).to(device)

    def step() -> None:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = way == OURS  # the seed never turns it on
        rows = sampler.next_batch(drawn)
        batch = read(rows)
        target = torch.from_numpy(one_hot[rows]).to(device)
        weights = torch.from_numpy(mixup.get_lambda(drawn).astype(np.float32)).to(device)
        training_step(model, optimizer, batch, target, weights, amp).item()

    def plain_eval(grad_mode) -> None:
        model.eval()
        with grad_mode():
            for start in range(0, len(eval_rows), batch_size):
                output = model(read(eval_rows[start : start + batch_size]))
                output["clipwise_output"].exp().detach().cpu()
        model.train()

    def ours_eval() -> None:
        evaluate(model, waveforms, eval_rows, batch_size=batch_size, device=device, amp=amp)

    runs = {
        "step": step,
        "read": lambda: read(sampler.next_batch(drawn)),
        "adam": optimizer.step,  # on the gradients the last step left
        "precision": precision,
    }
    if way == OURS:
        runs["eval"] = ours_eval
    else:
        runs["eval, autograd on"] = lambda: plain_eval(torch.enable_grad)
        runs["eval"] = lambda: plain_eval(torch.no_grad)
    return runs


# --- the comparison ----------------------------------------------------------------------
def compare(features: Path, device: str, args, steps: int) -> common.Table:
    import torch

    drawn = 2 * args.batch_size
    name = "CPU" if device == "cpu" else torch.cuda.get_device_name(0)
    # spawn: CUDA cannot be used in a forked child, and a fresh process is the point.
    context = multiprocessing.get_context("spawn")
    ways = {}
    for way in (SEED, OURS):
        parent, child = context.Pipe()
        process = context.Process(
            target=serve,
            args=(way, child, str(features), device, args.batch_size, args.precision),
            daemon=True,
        )
        process.start()
        ways[way] = (process, parent)
    try:
        precision = {way: ways[way][1].recv()["precision"] for way in ways}[OURS]

        def ask(way: str, request: str):
            def run() -> None:
                connection = ways[way][1]
                connection.send(request)
                seconds[way, request].append(connection.recv())

            return run

        seconds: dict[tuple[str, str], list[float]] = {}
        plan = [
            ("step", steps, [(SEED, "step"), (OURS, "step")]),
            ("eval", steps, [(SEED, "eval, autograd on"), (SEED, "eval"), (OURS, "eval")]),
            ("read", 5, [(SEED, "read"), (OURS, "read")]),
            ("adam", 3, [(SEED, "adam"), (OURS, "adam")]),
        ]
        common.log(f"{name}: ours in {precision}; one warm-up of each, then {steps} in turn")
        for label, rounds, pairs in plan:
            for pair in pairs:  # warm-up, not counted
                seconds[pair] = []
                ask(*pair)()
                seconds[pair] = []
            for round_ in range(1, rounds + 1):
                for pair in pairs:
                    ask(*pair)()
                common.log(
                    f"{label} round {round_}/{rounds}: "
                    + ", ".join(f"{w} {r} {seconds[w, r][-1]:.2f} s" for w, r in pairs)
                )
    finally:
        for process, connection in ways.values():
            with contextlib.suppress(OSError):
                connection.send(None)
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()

    def rate(way: str, request: str, clips: int) -> float:
        return clips / common.median(seconds[way, request])

    table = common.Table(
        f"Training step on {name}: Transfer_Cnn14, {args.seconds:g} s clips, batch "
        f"{args.batch_size} with mixup ({drawn} clips drawn per step)",
        args.load_at_start,
    )
    table.add(
        f"train step (fwd+bwd+Adam): ours ({precision}) vs the seed's way",
        rate(OURS, "step", drawn),
        rate(SEED, "step", drawn),
        "clips/s",
        target=1.2 if device == "cpu" else None,
    )
    table.add(
        "eval forward: ours (inference_mode) vs autograd on",
        rate(OURS, "eval", drawn),
        rate(SEED, "eval, autograd on", drawn),
        "clips/s",
    )
    table.add(
        "eval forward: ours (inference_mode) vs no_grad (the seed's)",
        rate(OURS, "eval", drawn),
        rate(SEED, "eval", drawn),
        "clips/s",
    )
    table.add(
        f"reading {drawn} clips: held in memory vs a file reopen per clip",
        rate(OURS, "read", drawn),
        rate(SEED, "read", drawn),
        "clips/s",
    )
    table.add(
        "Adam step, 81 M parameters: fused vs for-loop",
        1 / common.median(seconds[OURS, "adam"]),
        1 / common.median(seconds[SEED, "adam"]),
        "steps/s",
    )
    table.note(
        f"median of {steps} of each after one warm-up (reads: 5, Adam: 3); seconds per "
        f"training step: ours {common.spread(seconds[OURS, 'step'])}, the seed's way "
        f"{common.spread(seconds[SEED, 'step'])}; evaluation of {drawn} clips in batches "
        f"of {args.batch_size}, reading included"
    )
    if device == "cpu":
        from genreflow.runtime import cpu_has_native_bf16

        if precision == "fp32" and args.precision == "auto":
            table.note(
                "auto chose fp32: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 "
                "flag), and emulated bf16 is slower than fp32 (`--precision bf16` measures it)"
            )
        elif precision == "bf16" and not cpu_has_native_bf16():
            table.note("bf16 forced on a CPU without native bf16: oneDNN emulates it")
    return table


if __name__ == "__main__":
    main()
