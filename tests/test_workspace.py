"""Everything a run writes on the default store lives under its workspace.

`genreflow run --workspace W` on the embedded sqlite store, started from another folder:
MLflow's default artifact root is ./mlruns of the folder a step runs in, so fold artifacts
(head.pth, predictions, pictures) and the registered model landed there, where neither
`make clean` nor deleting W removes them. Now the store's experiment keeps them beside the
database, W/mlartifacts, and `genreflow ui` serves them from there.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, serving
from mlflow.tracking import MlflowClient

from genreflow.cli import main
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.tracking.names import CHECKPOINT_PATH_TAG

pytestmark = pytest.mark.slow  # the whole DAG through kfp.local: minutes


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_run_on_the_default_store_writes_nothing_outside_its_workspace(tmp_path, monkeypatch):
    archive, sha256 = make_synthetic_gtzan(
        tmp_path / "source", clips_per_genre=4, seconds=2.0, seed=3
    )
    elsewhere, workspace = tmp_path / "elsewhere", tmp_path / "workspace"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    arguments = ["folds=[1,2]", "head_iterations=20", "head_eval_every=10"]
    command = ["run", "--workspace", str(workspace), "--source", archive.as_uri()]
    command += ["--sha256", sha256, *(f"--set={pair}" for pair in arguments)]
    assert main(command) == 0
    assert _files(elsewhere) == [] and list(elsewhere.iterdir()) == []

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "genreflow-gtzan"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and two folds
    root = workspace / "mlartifacts"
    for run in runs:
        assert run.info.artifact_uri.startswith(root.as_uri()), run.info.artifact_uri
    logged = _files(root)
    assert any(name.endswith("/head.pth") for name in logged), logged
    assert any(name.endswith("/predictions.csv") for name in logged), logged

    # genreflow ui serves the artifacts from there, and writes nothing where it starts.
    fold = next(run for run in runs if run.data.tags.get("fold") == "1")
    port = free_port()
    genreflow = Path(sys.executable).with_name("genreflow")
    ui = [str(genreflow), "ui", "--tracking-uri", uri, "--port", str(port)]
    # mlflow ui took 55 s to answer beside other work here (load 15): the server fixture's 240 s.
    with serving(ui, "/health", tmp_path / "ui.log", port=port, timeout=240) as url:
        query = f"run_id={fold.info.run_id}&path=predictions.csv"
        with urllib.request.urlopen(f"{url}/get-artifact?{query}") as response:
            assert response.read().startswith(b"audio_name,")
        with urllib.request.urlopen(
            f"{url}/ajax-api/2.0/mlflow/artifacts/list?run_id={fold.info.run_id}"
        ) as response:
            assert "predictions.csv" in json.dumps(json.load(response))
    # The fold's checkpoint moved into the registered model (stored once), under W too.
    assert fold.data.tags[CHECKPOINT_PATH_TAG].endswith("/head.pth")
    assert any(name.endswith(fold.data.tags[CHECKPOINT_PATH_TAG]) for name in logged), logged
    assert list(elsewhere.iterdir()) == []
