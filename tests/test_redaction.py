"""No secret in a URI is recorded or printed: userinfo, a signed URL's query string, path
parameters and fragments; and credentials are refused in a URI where one enters.

`storage.redacted` is tested with passwords holding every reserved character of RFC 3986
(gen-delims and sub-delims), raw as users write them, in the contexts messages put URIs
in. Then the steps run for real with such URIs (the download component over HTTP, the
start_run component and a fold against a real MLflow server, signed in through MLflow's
variables), and everything they left is searched: stdout and stderr, the KFP artifact's
metadata, the files they wrote, the MLflow runs' params and tags, and their artifacts.
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
from genreflow.errors import GenreflowError
from genreflow.fold_result import FoldSummary, write_summary
from genreflow.pipelines.profiles import run_arguments
from genreflow.pipelines.submit import tracked_arguments
from genreflow.steps.fold import tracked_fold

SIGNATURE, PASSWORD = "S1GNATURE-S3CRET", "PASSW0RD-S3CRET"
SECRETS = (SIGNATURE, PASSWORD)
# RFC 3986: gen-delims, then sub-delims. Userinfo may hold sub-delims and ":" as they are;
# the rest must be percent-encoded, but a password pasted into a URL often is not.
RESERVED = ":/?#[]@" + "!$&'()*+,;="
ADDRESS = "host.example:8443/data/genres.tar.gz"


def _password(char: str) -> str:
    return f"QUUX{char}ZORB{char}VEXT"


def _leaked(text: str, char: str) -> list[str]:
    return [part for part in ("QUUX", "ZORB", "VEXT") if part in text]


@pytest.mark.parametrize("char", RESERVED, ids=lambda c: f"{ord(c):02x}")
def test_a_password_with_any_reserved_character_is_redacted_everywhere(char):
    for scheme in ("https", "http", "postgresql+psycopg2", "gs"):
        uri = f"{scheme}://alice:{_password(char)}@{ADDRESS}"
        assert storage.redacted(uri) == f"{scheme}://REDACTED@{ADDRESS}"
        assert storage.redacted(uri.upper()).endswith(f"@{ADDRESS.upper()}")
        contexts = [
            f"failed: {uri}",
            f"'{uri}'",
            f'"{uri}"',
            f"({uri})",
            f"[{uri}]",
            f"<{uri}>",
            f"{uri}, then {uri}.",
            f"at {uri}: timeout",
            json.dumps({"source": uri, "others": [uri, uri]}),
            repr({"source": uri}),
        ]
        for text in contexts:
            shown = storage.redacted_text(text)
            assert _leaked(shown, char) == [], (text, shown)
            assert f"{scheme}://REDACTED@{ADDRESS}" in shown, (text, shown)
        assert storage.redacted_values({"a": [uri, {"b": (uri,)}], "n": 1}) == {
            "a": [f"{scheme}://REDACTED@{ADDRESS}", {"b": [f"{scheme}://REDACTED@{ADDRESS}"]}],
            "n": 1,
        }
    # The context around a URI stays as it was.
    assert storage.redacted_text(f"('https://a:{_password(char)}@h/x', 2)") == (
        "('https://REDACTED@h/x', 2)"
    )


def test_queries_path_parameters_and_fragments_are_dropped():
    signed = f"https://storage.googleapis.com/b/genres.tar.gz?X-Goog-Signature={SIGNATURE}"
    assert storage.redacted(signed) == "https://storage.googleapis.com/b/genres.tar.gz?REDACTED"
    session = f"https://h.example/a/b.tar.gz;jsessionid={SIGNATURE}?sig={SIGNATURE}#{SIGNATURE}"
    assert storage.redacted(session) == "https://h.example/a/b.tar.gz?REDACTED"
    assert storage.redacted(f"https://h/a;token={SIGNATURE}/b#k={SIGNATURE}") == "https://h/a/b"
    oauth = f"https://app.example/cb#access_token={SIGNATURE}&state=1"
    assert storage.redacted(oauth) == "https://app.example/cb"
    # A web app's page is kept (KFP's run link is a tag), less any query of its own.
    kfp = "https://kfp.example/#/runs/details/run-42"
    assert storage.redacted(kfp) == kfp
    mlflow = f"http://127.0.0.1:5000/#/experiments/1/runs/r?token={SIGNATURE}"
    assert storage.redacted(mlflow) == "http://127.0.0.1:5000/#/experiments/1/runs/r?REDACTED"
    azure = f"https://acct.blob.core.windows.net/c/g.tar.gz?sv=2024&sig={SIGNATURE}"
    assert storage.redacted(azure) == "https://acct.blob.core.windows.net/c/g.tar.gz?REDACTED"
    text = f"download of {session} failed (HTTP 403); see also <{signed}>."
    assert SIGNATURE not in storage.redacted_text(text)
    for kept in (
        "gs://bucket/run/fold1",
        "/data/genres.tar.gz",
        "/data/odd;name#1.tar.gz",
        "file:///data/g.tar.gz",
        "http://mlflow:5000/x",
        "sqlite:////work/workspace/mlflow.db",
    ):
        assert storage.redacted(kept) == kept
    assert storage.redacted_text("no URI here: a@b, c:d") == "no URI here: a@b, c:d"


# --- credentials refused where a URI enters ------------------------------------------------
@pytest.mark.parametrize("char", "('/#?@", ids=lambda c: f"{ord(c):02x}")
def test_a_source_or_tracking_uri_with_userinfo_is_refused(char, tmp_path, capsys):
    password = _password(char)
    source = f"https://alice:{password}@{ADDRESS}"
    with pytest.raises(GenreflowError) as err:
        storage.fetch(source, tmp_path / "a.tar.gz", progress=False)
    assert "netrc" in str(err.value) and _leaked(str(err.value), char) == []
    assert not (tmp_path / "a.tar.gz").exists()
    with pytest.raises(GenreflowError, match="netrc"):
        run_arguments("demo", {"source": source, "tracking_uri": ""})

    tracking = f"http://alice:{password}@mlflow.example:5000"
    with pytest.raises(GenreflowError) as err:
        run_arguments("demo", {"source": "/data/g.tar.gz", "tracking_uri": tracking})
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in str(err.value)
    with pytest.raises(GenreflowError, match="MLFLOW_TRACKING_PASSWORD"):
        tracked_arguments({}, environ={"MLFLOW_TRACKING_URI": tracking}, no_tracking=False)
    # The commands say so on one line, before any step runs.
    workspace = tmp_path / "workspace"
    run = ["run", "--workspace", str(workspace), "--source", "/data/g.tar.gz"]
    assert main([*run, "--tracking-uri", tracking]) == 2
    assert main(["ui", "--tracking-uri", tracking, "--no-serve"]) == 2
    assert main(["download", "--source", source, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 3 and _leaked(err, char) == [], err
    assert err.count("a user or password in the URI is refused") == 3
    assert not (workspace / "kfp").exists()  # no step ran


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
    # Signed in as the pipeline's steps are (the Secret's variables; the test server
    # accepts anyone), not through the URI: that is refused (above).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    tracking = mlflow_server
    with pytest.raises(GenreflowError, match="MLFLOW_TRACKING_USERNAME"):
        start_run.python_func(
            tracking_uri=_with_password(mlflow_server),
            mlflow_run=dsl.Markdown(uri=str(tmp_path / "refused.md")),
            **start_run_arguments(),
        )

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
