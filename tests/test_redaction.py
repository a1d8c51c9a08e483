"""No secret in a URI is recorded or printed: a signed URL's query string and user:password@.

The steps run for real with such URIs (the download component over HTTP, the start_run
component and a fold against a real MLflow server reached as user:password@), then
everything they left is searched: stdout and stderr, the KFP artifact's metadata, the files
they wrote, the MLflow runs' params and tags, and their artifacts.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import start_run_arguments
from kfp import dsl
from mlflow.tracking import MlflowClient

from genreflow import storage
from genreflow.cli import main
from genreflow.components.download import download
from genreflow.components.start_run import start_run
from genreflow.data.genres import GENRES
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.fold_result import FoldSummary, write_summary
from genreflow.steps.fold import tracked_fold

SIGNATURE, PASSWORD = "S1GNATURE-S3CRET", "PASSW0RD-S3CRET"
SECRETS = (SIGNATURE, PASSWORD)


def test_redacted_drops_the_query_and_the_password_only():
    signed = f"https://storage.googleapis.com/b/genres.tar.gz?X-Goog-Signature={SIGNATURE}"
    assert storage.redacted(signed) == "https://storage.googleapis.com/b/genres.tar.gz?REDACTED"
    assert storage.redacted(f"http://ci:{PASSWORD}@mlflow:5000/x") == "http://mlflow:5000/x"
    for kept in ("gs://bucket/run/fold1", "/data/genres.tar.gz", "file:///data/g.tar.gz"):
        assert storage.redacted(kept) == kept
    text = json.dumps({"a": f"see http://u:{PASSWORD}@h/p", "b": [signed]})
    assert not any(secret in storage.redacted_text(text) for secret in SECRETS)
    assert "http://h/p" in storage.redacted_text(text)


class _Archive(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):
        body = self.server.files.get(self.path.split("?")[0])  # signed: any query goes
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def archive_server(tmp_path):
    archive, _ = make_synthetic_gtzan(tmp_path / "source", clips_per_genre=1, seconds=0.5)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Archive)
    server.files = {"/genres.tar.gz": archive.read_bytes()}
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://pipeline:{PASSWORD}@{rest}"


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def _files_text(folder: Path) -> str:
    return "\n".join(
        path.read_bytes().decode("utf-8", "replace") for path in folder.rglob("*") if path.is_file()
    )


def test_no_step_records_or_prints_a_uri_secret(
    archive_server, mlflow_server, tmp_path, capfd, monkeypatch
):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    signed = f"{archive_server}/genres.tar.gz?X-Goog-Signature={SIGNATURE}&X-Goog-Expires=600"
    pretrained = f"https://user:{PASSWORD}@weights.example/Cnn14.pth?sig={SIGNATURE}"
    tracking = _with_password(mlflow_server)

    # The download step, as KFP runs it: its artifact's metadata and folder.
    dataset = dsl.Dataset(uri=str(tmp_path / "dataset"))
    download.python_func(source=signed, sha256="", md5="", cache_epoch="", dataset=dataset)
    assert (tmp_path / "dataset" / "genres").is_dir()
    recorded = json.dumps(dataset.metadata) + _files_text(tmp_path / "dataset")

    # A refused download, as the command reports it.
    assert (
        main(
            [
                "download",
                "--source",
                signed.replace("genres", "absent"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )

    # The pipeline's parent run, through its component, then one fold logged under it.
    markdown = dsl.Markdown(uri=str(tmp_path / "run.md"))
    arguments = start_run_arguments(
        experiment="test-redaction",
        pipeline_run_id="kfp-redaction",
        source=signed,
        pretrained=pretrained,
        freeze_base=False,
    )
    parent = start_run.python_func(tracking_uri=tracking, mlflow_run=markdown, **arguments)
    recorded += (tmp_path / "run.md").read_text()

    def train(on_evaluation=None):
        fold = tmp_path / "fold1"
        fold.mkdir()
        (fold / "metrics.csv").write_text("iteration,test_accuracy,seconds\n10,0.5,1.0\n")
        rows = [
            f"{g}.00000.au,1,{g}," + ",".join("1" if h == g else "0" for h in GENRES)
            for g in GENRES
        ]
        (fold / "predictions.csv").write_text(
            "\n".join([f"audio_name,fold,genre,{','.join(GENRES)}", *rows, ""])
        )
        summary = FoldSummary(
            fold=1,
            path="fine-tune",
            protocol="cv10",
            selection="validation",
            iterations=10,
            final_accuracy=0.5,
            valid_accuracy=0.5,
            selected_iteration=10,
            peak_test_accuracy=0.5,
            peak_test_iteration=10,
            n_train=8,
            n_test=10,
            split={},
            split_sha256="0" * 64,
            data_sha256="0" * 64,
            seeds={"config": 0},
            clips_per_second=1.0,
            wall_seconds=1.0,
            device="cpu",
            config={"features": signed, "pretrained": pretrained},
            genreflow_version="test",
            pretrained=pretrained,
        )
        (fold / "best.pth").write_bytes(b"weights")
        return write_summary(fold, summary)  # the fold steps' own writer

    tracked_fold(
        train,
        out=tmp_path / "fold1",
        fold=1,
        inputs=[tmp_path / "run.md"],
        settings={"features": signed, "pretrained": pretrained},
        tracking_uri=tracking,
        parent_run_id=parent,
    )

    client = MlflowClient(mlflow_server)
    runs = [client.get_run(parent)] + client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert len(runs) == 2
    for run in runs:
        recorded += json.dumps([run.data.params, run.data.tags])
        for artifact in client.list_artifacts(run.info.run_id):
            if not artifact.is_dir:
                local = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
                recorded += Path(local).read_bytes().decode("utf-8", "replace")
    assert runs[0].data.params["source"].endswith("/genres.tar.gz?REDACTED")

    printed = capfd.readouterr()
    assert "absent.tar.gz?REDACTED: HTTP 404" in printed.err  # the rest of the line kept
    assert _leaks(printed.out + printed.err) == [], [
        line for line in (printed.out + printed.err).splitlines() if _leaks(line)
    ]
    assert _leaks(recorded) == [], [
        recorded[max(0, i - 150) : i + 20]
        for secret in SECRETS
        if (i := recorded.find(secret)) >= 0
    ]
