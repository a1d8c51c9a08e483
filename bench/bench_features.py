"""What a fold pays to fetch its features: log-mel files against waveform files, via gs://.

On a cluster every fine-tune fold runs in a fresh pod that downloads the packed file from
the bucket, then reads its clips into memory (genreflow.train: `storage.input_path`, then
`PackedClips`). This bench packs one synthetic set of 30 s clips both ways
(`pack --representation waveform|logmel`), uploads both to a GCS emulator started here
(gcp-storage-emulator on 127.0.0.1, the one tests/test_gcs.py uses), and times that fetch
for each with an empty cache, the two taking turns:

- ours: the log-mel file (float16, frames x 64 mel bins);
- baseline: the waveform file (int16, the seed's form).

It also prints the bytes per clip of each and the pack time each took (the log-mel's
front end runs once there, in the pack workers, instead of in every training step).
The emulator is a single Python process serving from memory on this machine, so its
transfer rate is not a bucket's: the ratio of bytes is the figure that carries over.

    python bench/bench_features.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import common

ROUNDS = {True: 3, False: 5}
CLIPS_PER_GENRE = {True: 5, False: 20}
SECONDS = 30.0


def start_emulator(log_path: Path):
    """A gcp-storage-emulator process on a free port of 127.0.0.1: (process, its URL)."""
    import socket
    import subprocess
    import urllib.request

    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    if not executable.exists():
        raise SystemExit(
            f"{executable} not found: install the test extras (pip install -e '.[test]')"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(executable), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise SystemExit(f"{url}: the emulator did not answer within 60 s (log: {log_path})")


def fetch(uri: str, cache: Path) -> dict[str, float]:
    """A fold's fetch with an empty cache: download, then the clips into memory."""
    import numpy as np

    from genreflow import storage
    from genreflow.features import read_index
    from genreflow.train import PackedClips

    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    path = storage.cached(uri, cache_dir=cache, progress=False)
    downloaded = time.perf_counter()
    clips = PackedClips(str(path), np.arange(len(read_index(path)[0])))
    assert clips.in_memory
    clips.close()
    return {"download": downloaded - started, "read": time.perf_counter() - downloaded}


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    from genreflow import storage
    from genreflow.features import pack, read_index

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-features-"))
    process = None
    try:
        root = common.synth_dataset(
            workdir, clips_per_genre=CLIPS_PER_GENRE[args.quick], seconds=SECONDS
        )
        files, pack_seconds = {}, {}
        for representation in ("waveform", "logmel"):
            out = workdir / f"{representation}.h5"
            summary = pack(
                root,
                out,
                clip_seconds=SECONDS,
                representation=representation,
                progress=False,
            )
            common.log(str(summary))
            files[representation], pack_seconds[representation] = out, summary.seconds
        clips = len(read_index(files["waveform"])[0])

        process, url = start_emulator(workdir / "emulator.log")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "genreflow-bench")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        storage.gcs_client().create_bucket(bucket)
        uris = {}
        for representation, path in files.items():
            uris[representation] = f"gs://{bucket}/{representation}.h5"
            with storage.output_file(uris[representation]) as staging:
                shutil.copy(path, staging)

        parts: dict[str, list[dict[str, float]]] = {"logmel": [], "waveform": []}

        def run(representation: str):
            return lambda: parts[representation].append(
                fetch(uris[representation], workdir / "cache" / representation)
            )

        seconds = common.alternate(
            {"logmel": run("logmel"), "waveform": run("waveform")}, ROUNDS[args.quick]
        )
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=20)

    size = {kind: path.stat().st_size / clips for kind, path in files.items()}
    table = common.Table(
        f"A fold's features fetch through gs:// (emulator): {clips} clips of {SECONDS:g} s",
        args.load_at_start,
    )
    table.add(
        "bytes per clip (file size / clips)",
        size["logmel"],
        size["waveform"],
        "B",
        higher_is_better=False,
    )
    table.add(
        "fetch: download + clips into memory",
        common.median(seconds["logmel"]),
        common.median(seconds["waveform"]),
        "s",
        higher_is_better=False,
    )
    for part in ("download", "read"):
        table.add(
            f"  of which {part}",
            common.median([p[part] for p in parts["logmel"]]),
            common.median([p[part] for p in parts["waveform"]]),
            "s",
            higher_is_better=False,
        )
    table.add(
        "pack (once per dataset)",
        pack_seconds["logmel"],
        pack_seconds["waveform"],
        "s",
        higher_is_better=False,
    )
    table.note(common.machine())
    table.note(
        f"median of {ROUNDS[args.quick]} rounds, the two taking turns; fetch seconds: "
        f"log-mel {common.spread(seconds['logmel'])}, waveform {common.spread(seconds['waveform'])}"
    )
    table.note(
        "the emulator (gcp-storage-emulator, one Python process on this machine) is not a "
        "bucket: its rate is this machine's, the bytes are what every fold pod downloads"
    )
    print(table.render())
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
