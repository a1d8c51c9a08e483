"""A fold's checkpoint uploads to gs://: in the background on a schedule, against the loop
waiting for each.

The tiny recipe (the whole Cnn14 fine-tuned, so resume.pt has its real size, 1.3 GB;
short clips, batch 2, an evaluation every 2 iterations) through `train_fold` into a gs://
prefix of a GCS emulator started here (gcp-storage-emulator, the one the tests use), three
ways taking turns:

- baseline: the loop as it was, every evaluation's resume.pt (and best.pth when it
  improved) uploaded before the next step (`on_checkpoint=folder.publish`);
- background, every evaluation: genreflow.publisher, resume_every_seconds=0;
- background, on the schedule: genreflow.publisher with the default resume_every_seconds
  (300 s: this tiny fold writes its state once, at its first evaluation).

Each gives the fold's wall time, the seconds the loop spent on checkpoints (writing them,
and for the baseline uploading them), the fold's end waiting for the uploads, and the bytes
uploaded per fold (the final outputs included). The emulator is one Python process serving
from memory on this machine, so its rate is not a bucket's; the loop's seconds per
checkpoint and the bytes are what carry over.

    python bench/bench_checkpoint_upload.py [--quick] [--iterations 8]
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import common
from bench_features import start_emulator

ROUNDS = {True: 1, False: 2}
SECONDS, CLIPS_PER_GENRE = 2.0, 3  # 30 clips, 3 a fold: 24 train, 3 choose, 3 report
BASELINE, EVERY_EVALUATION, SCHEDULED = (
    "synchronous, every evaluation (before)",
    "background, every evaluation",
    "background, every 300 s (default)",
)


def cpu_flags() -> str:
    """The CPU's vector and bf16 flags, as /proc/cpuinfo lists them."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.partition(":")[2].split())
                return ", ".join(f"{flag} {'yes' if flag in have else 'no'}" for flag in wanted)
    except OSError:
        pass
    return "unknown"


def run_fold(way: str, config, bucket: str) -> dict:
    """One fold trained into a fresh prefix: its clock, the bytes sent, the prefix removed."""
    from genreflow import storage
    from genreflow.runtime import cpu_threads_for_training, freed_memory_kept
    from genreflow.train import PhaseClock, _train_fold_in, train_fold

    prefix = f"fold-{uuid.uuid4().hex[:8]}"
    config = dataclasses.replace(config, out=f"gs://{bucket}/{prefix}")
    clock = PhaseClock()
    sent_in_loop = 0
    if way == BASELINE:
        config = dataclasses.replace(config, resume_every_seconds=0)
        opened = storage.output_folder(config.out, commit="summary.json", transient=("resume.pt",))
        with opened as f:

            def publish_now(*names: str) -> None:
                nonlocal sent_in_loop
                sent_in_loop += sum((f.path / name).stat().st_size for name in names)
                f.publish(*names)

            with cpu_threads_for_training(), freed_memory_kept():
                _train_fold_in(config, f.path, on_checkpoint=publish_now, clock=clock)
    else:
        if way == EVERY_EVALUATION:
            config = dataclasses.replace(config, resume_every_seconds=0)
        train_fold(config, clock=clock)
        sent_in_loop = clock.uploads.bytes
    client = storage.gcs_client()
    blobs = list(client.list_blobs(bucket, prefix=f"{prefix}/"))
    final = sum(blob.size for blob in blobs)
    for blob in blobs:  # the emulator holds every object in memory
        blob.delete()
    return {
        "wall": clock.wall_seconds(),
        "checkpoint": clock.seconds["checkpoint"],
        "upload_wait": clock.seconds["upload_wait"],
        "bytes": sent_in_loop + final,
        "in_loop_bytes": sent_in_loop,
    }


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=8, help="per fold (default 8: 3 states)")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-upload-"))
    process = None
    try:
        from genreflow import storage
        from genreflow.recipe import TrainConfig

        features = common.packed_features(workdir, clips_per_genre=CLIPS_PER_GENRE, seconds=SECONDS)
        process, url = start_emulator(workdir / "emulator.log")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "genreflow-bench")
        os.environ["GENREFLOW_CACHE"] = str(workdir / "cache")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        storage.gcs_client().create_bucket(bucket)
        config = TrainConfig(
            features=str(features),
            fold=1,
            out="",
            iterations=args.iterations,
            batch_size=2,
            eval_every=2,
            precision="fp32",
            device="cpu",
        )
        results: dict[str, list[dict]] = {BASELINE: [], EVERY_EVALUATION: [], SCHEDULED: []}

        def way(name: str):
            return lambda: results[name].append(run_fold(name, config, bucket))

        common.alternate({name: way(name) for name in results}, ROUNDS[args.quick])
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=20)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return common.median([r[key] for r in results[name]])

    states = (args.iterations - 1) // 2  # evaluations but the last write a state
    table = common.Table(
        f"A fold's checkpoint uploads through gs:// (emulator): the whole Cnn14, "
        f"{args.iterations} iterations, a state at each of {states} evaluations",
        args.load_at_start,
    )
    rows = (("fold wall time", "wall", 1, "s"), ("loop's checkpoint seconds", "checkpoint", 1, "s"))
    rows += (("MB uploaded per fold", "bytes", 1e6, "MB"),)
    for name in (EVERY_EVALUATION, SCHEDULED):
        for measure, key, scale, unit in rows:
            ours, baseline = med(name, key) / scale, med(BASELINE, key) / scale
            table.add(f"{measure}, {name}", ours, baseline, unit, higher_is_better=False)
    for name in results:
        table.note(
            f"{name}: wall {common.spread([r['wall'] for r in results[name]])} s, the end "
            f"waiting for uploads {med(name, 'upload_wait'):.2f} s, "
            f"{med(name, 'in_loop_bytes') / 1e6:.0f} MB sent while training"
        )
    table.note(f"CPU flags: {cpu_flags()}")
    table.print(common.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
