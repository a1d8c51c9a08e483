"""Frozen-base 10-fold cross-validation: embed once and train heads, against training each
fold through the frozen base.

On the same packed clips and the head's recipe (genreflow.head.DEFAULT_RECIPE: full
batch, AdamW, 1000 iterations per fold):

- ours, end to end as the pipeline runs it: `embed_features` (every clip through Cnn14
  once, eval mode), then `train_head` for each of the 10 folds; measured whole;
- naive, the same recipe with every training clip pushed through the frozen Cnn14 at
  every iteration of every fold (the very computation ours does, minus the reuse): its
  per-iteration cost is measured on a few iterations of fold 1 and extrapolated to 10
  folds x the same iterations (a full run would take hours here). After those
  iterations its head is compared with `train_head` run for as many iterations on the
  stored embeddings: the same head up to float rounding, hence the same accuracy;
- train.py --freeze-base, the seed's recipe for a frozen base (batch 32 with mixup, the
  base in train mode so SpecAugment and dropout stay on): per-iteration cost measured on
  a few iterations and extrapolated the same way. A different recipe, so its accuracy is
  not the same computation's; a run long enough to measure it does not fit here.

The extrapolations count training iterations only (no model loading, evaluation or
checkpoints), which favours the baselines.

    python bench/bench_frozen.py [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common

FOLDS = 10


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--clips-per-genre", type=int, help="default 10 (--quick) or 20")
    p.add_argument("--seconds", type=float, default=5.0, help="clip length (default 5)")
    p.add_argument("--measured", type=int, help="baseline iterations measured: 1 (--quick) or 3")
    args = p.parse_args()
    clips_per_genre = args.clips_per_genre or (10 if args.quick else 20)
    measured = args.measured or (1 if args.quick else 3)

    from genreflow.head import DEFAULT_RECIPE

    iterations = DEFAULT_RECIPE["iterations"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_frozen."))
    try:
        features = common.packed_features(
            workdir, clips_per_genre=clips_per_genre, seconds=args.seconds
        )
        ours = embed_once(features, workdir)
        naive = through_the_base(features, workdir, measured)
        seed_way = train_py_frozen(features, workdir, measured)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    table = common.Table(
        f"Frozen-base 10-fold CV, {clips_per_genre * 10} clips of {args.seconds:g} s, "
        f"{iterations} iterations per fold",
        args.load_at_start,
    )
    naive_total = statistics.median(naive["seconds"]) * iterations * FOLDS
    seed_total = statistics.median(seed_way["seconds"]) * iterations * FOLDS
    table.add(
        "end to end: embed once + 10 heads vs naive, same recipe (extrapolated)",
        ours["seconds"],
        naive_total,
        "s",
        target=20,
        higher_is_better=False,
    )
    table.add(
        "end to end: embed once + 10 heads vs train.py --freeze-base (extrapolated)",
        ours["seconds"],
        seed_total,
        "s",
        higher_is_better=False,
    )
    table.note(
        f"ours measured whole: embedding {ours['embed_seconds']:.1f} s "
        f"({ours['clips']} clips once), 10 heads {ours['heads_seconds']:.1f} s; held-out "
        f"accuracy {ours['accuracy']:.3f} +- {ours['accuracy_std']:.3f} over the 10 folds "
        "(a randomly initialised base: the published weights cannot be fetched here)"
    )
    table.note(
        f"naive, same recipe: EXTRAPOLATED from {common.plural(measured, 'measured iteration')}"
        " of fold 1 "
        f"({naive['clips']} training clips through Cnn14 each, "
        f"{common.spread(naive['seconds'])} s per iteration) to {iterations} iterations x "
        f"{FOLDS} folds; its head after {common.plural(measured, 'iteration')} matches "
        f"train_head's after as many (largest difference {naive['weight_difference']:.1e} "
        "of the weights' scale), so its accuracy is ours"
    )
    table.note(
        f"train.py --freeze-base (batch 32 with mixup, {seed_way['clips']} clips drawn per "
        f"iteration): EXTRAPOLATED from {common.plural(measured, 'measured iteration')} "
        "after one warm-up "
        f"({common.spread(seed_way['seconds'])} s per iteration) to {iterations} x {FOLDS}; "
        "accuracy not measured (another recipe, and its full run does not fit here)"
    )
    table.print(common.command_line())


def embed_once(features: Path, workdir: Path) -> dict:
    """The fast path end to end, as the pipeline runs it: embed, then 10 fold heads."""
    from genreflow.embedding import embed_features
    from genreflow.head import train_head
    from genreflow.recipe import HeadConfig

    started = time.perf_counter()
    embedded = embed_features(features, workdir / "embed", device="cpu", seed=0)
    embedded_at = time.perf_counter()
    accuracies = []
    for fold in range(1, FOLDS + 1):
        summary = train_head(HeadConfig(embedded["embeddings"], fold, str(workdir / f"head{fold}")))
        accuracies.append(summary["final_accuracy"])
    finished = time.perf_counter()
    common.log(f"embed once + {FOLDS} heads: {finished - started:.1f} s")
    return {
        "seconds": finished - started,
        "embed_seconds": embedded_at - started,
        "heads_seconds": finished - embedded_at,
        "clips": embedded["clips"],
        "accuracy": statistics.mean(accuracies),
        "accuracy_std": statistics.pstdev(accuracies),
    }


def through_the_base(features: Path, workdir: Path, measured: int) -> dict:
    """The head's recipe on fold 1 with every training clip through Cnn14 per iteration."""
    import h5py
    import numpy as np
    import torch

    from genreflow.audio import int16_to_float32
    from genreflow.embedding import _build_base
    from genreflow.head import (
        ADAM_BETAS,
        ADAM_EPS,
        DEFAULT_RECIPE,
        _standardisation,
        fold_standardisation,
        read_head,
        train_head,
    )
    from genreflow.recipe import HeadConfig
    from genreflow.train import read_fold_index

    index = read_fold_index(str(features), fold=1)
    with h5py.File(features, "r") as hf:
        waveforms = torch.from_numpy(int16_to_float32(hf["waveform"][index.train_rows]))
    one_hot = torch.eye(10)[torch.from_numpy(index.targets[index.train_rows])]
    # The very base that made the stored embeddings, in eval mode.
    base = _build_base(str(workdir / "embed" / "base.pth"), None, seed=0)
    head = torch.nn.Linear(2048, 10)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(
        head.parameters(),
        lr=DEFAULT_RECIPE["lr"],
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        weight_decay=DEFAULT_RECIPE["weight_decay"],
    )
    seconds = []
    for iteration in range(1, measured + 1):
        started = time.perf_counter()
        with torch.inference_mode():
            embedding = torch.cat(
                [base(batch)["embedding"] for batch in waveforms.split(16)]
            ).numpy()
        mean, scale = _standardisation(embedding)
        x = torch.from_numpy(((embedding - mean) / scale).astype(np.float32))
        loss = -torch.mean(torch.sum(one_hot * torch.log_softmax(head(x), dim=-1), dim=-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        common.log(f"naive iteration {iteration}/{measured}: {seconds[-1]:.2f} s")

    # The same number of iterations of the fast path, on the stored embeddings.
    reference = workdir / "reference_head"
    train_head(
        HeadConfig(
            str(workdir / "embed" / "embeddings.h5"),
            1,
            str(reference),
            iterations=measured,
            eval_every=measured,
        )
    )
    want, _, _ = read_head(reference / "head.pth")
    weight, _ = fold_standardisation(
        head.weight.detach().numpy(), head.bias.detach().numpy(), mean, scale
    )
    difference = float(np.abs(weight - want.numpy()).max() / np.abs(want.numpy()).max())
    return {"seconds": seconds, "clips": len(index.train_rows), "weight_difference": difference}


def train_py_frozen(features: Path, workdir: Path, measured: int) -> dict:
    """train.py's step with a frozen base at the seed's batch (32, mixup), timed."""
    import numpy as np
    import torch

    from genreflow.data.genres import GENRES
    from genreflow.models.checkpoints import load_pretrained
    from genreflow.models.cnn14 import Mixup
    from genreflow.models.transfer import TransferCnn14
    from genreflow.runtime import (
        autocast_for,
        cpu_threads_for_training,
        freed_memory_kept,
        resolve_precision,
    )
    from genreflow.train import (
        EpochSampler,
        PackedClips,
        make_optimizer,
        prepare_for_training,
        read_fold_index,
        training_step,
    )

    device = torch.device("cpu")
    index = read_fold_index(str(features), fold=1)
    one_hot = np.eye(len(GENRES), dtype=np.float32)[index.targets]
    batch_size = 32
    drawn = 2 * batch_size
    seconds = []
    with cpu_threads_for_training(), freed_memory_kept():
        torch.manual_seed(0)
        model = TransferCnn14(classes_num=len(GENRES), freeze_base=True)
        load_pretrained(model, workdir / "embed" / "base.pth")
        precision = resolve_precision("auto", device)
        prepare_for_training(model, device, precision)
        amp = autocast_for(device, precision)
        optimizer = make_optimizer(model, 1e-4)
        waveforms = PackedClips(str(features), index.train_rows)
        sampler, mixup = EpochSampler(index.train_rows, 0), Mixup(1.0, seed=1)
        for iteration in range(measured + 1):
            started = time.perf_counter()
            rows = sampler.next_batch(drawn)
            batch = waveforms.on_device(rows, device)
            target = torch.from_numpy(one_hot[rows])
            weights = torch.from_numpy(mixup.get_lambda(drawn).astype(np.float32))
            training_step(model, optimizer, batch, target, weights, amp).item()
            if iteration:  # the first is the warm-up
                seconds.append(time.perf_counter() - started)
            common.log(
                f"train.py --freeze-base iteration {iteration}/{measured}"
                f"{' (warm-up)' if not iteration else ''}: {time.perf_counter() - started:.2f} s"
            )
        waveforms.close()
    return {"seconds": seconds, "clips": drawn}


if __name__ == "__main__":
    main()
