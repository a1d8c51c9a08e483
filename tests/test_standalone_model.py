"""The registered fold ensemble stands alone (issue 27): a version copied out of the registry
serves with its tracking server stopped, its weights stored once (in the model, the fold runs
pointing to them), its requirements on PyTorch's CPU index; its aggregate metrics rank logged
models; an empty tracking URI falls back to the MLFLOW_TRACKING_URI the platform injects.

The ensemble is the frozen-base path's, the pipeline's default: a random Cnn14 base (seed 0)
and two heads, each in a real fold run of a real MLflow server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import free_port, serving, start_run_arguments
from kfp import dsl
from mlflow.tracking import MlflowClient

from genreflow import storage
from genreflow.audio import SAMPLE_RATE
from genreflow.data.genres import GENRES
from genreflow.tracking.names import (
    CHECKPOINT_MODEL_TAG,
    CHECKPOINT_PATH_TAG,
    FOLD_ROLE,
    FOLD_TAG,
    GIT_COMMIT_TAG,
    LOGGED_TAG,
    PARENT_RUN_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SHA256_TAG_PREFIX,
)

CLIP = 2 * SAMPLE_RATE
MLFLOW = Path(sys.executable).with_name("mlflow")


def tracking_server(root: Path):
    """An MLflow server of this test's own (sqlite, artifacts served), to stop at will."""
    root.mkdir(exist_ok=True)
    port = free_port()
    command = [
        str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    return serving(command, "/health", root / "server.log", port=port, env=env, timeout=240)


def frozen_ensemble(folder: Path, folds=(1, 2)) -> tuple[Path, dict[int, Path]]:
    """base.pth (a random Cnn14, as embed-features writes it) and one head.pth per fold (as
    train-head writes it: the seed's form plus genreflow's metadata naming the base)."""
    from genreflow.models.transfer import TransferCnn14

    torch.manual_seed(0)
    base = TransferCnn14(classes_num=len(GENRES), freeze_base=True).base.eval()
    base_path = folder / "base.pth"
    torch.save({"model": {k: v.detach() for k, v in base.state_dict().items()}}, base_path)
    base_sha256 = storage.sha256_of(base_path)
    heads = {}
    for fold in folds:
        head = torch.nn.Linear(base.embedding_size, len(GENRES))
        heads[fold] = folder / f"fold{fold}" / "head.pth"
        heads[fold].parent.mkdir()
        metadata = {"path": "frozen_base", "genres": list(GENRES), "fold": fold}
        checkpoint = {
            "iteration": 0,
            "model": {
                "fc_transfer.weight": head.weight.detach(),
                "fc_transfer.bias": head.bias.detach(),
            },
            "genreflow": {**metadata, "base_sha256": base_sha256},
        }
        torch.save(checkpoint, heads[fold])
    return base_path, heads


def fold_runs(client: MlflowClient, experiment: str, parent: str, heads: dict[int, Path]):
    """One finished fold run per head under the parent, holding it as the fold step logs
    it (the fold's tags, the file and its SHA-256 tag, `genreflow.logged` last)."""
    runs = {}
    for fold, head in heads.items():
        tags = {PARENT_TAG: parent, ROLE_TAG: FOLD_ROLE, FOLD_TAG: str(fold)}
        run = client.create_run(experiment, tags=tags).info.run_id
        client.set_tag(run, SHA256_TAG_PREFIX + head.name, storage.sha256_of(head))
        client.log_metric(run, "final_accuracy", 0.5 + fold / 10)
        client.log_artifact(run, str(head))
        client.set_tag(run, LOGGED_TAG, "true")
        client.set_terminated(run)
        runs[fold] = run
    return runs


def synthetic_clip(genre: str) -> bytes:
    """A synthetic GTZAN clip of `genre` (genreflow synth's recipe), as its .au file."""
    from genreflow.data.synth.recipes import synthesize_clip

    clip = synthesize_clip(genre, 0, seconds=3.0, seed=0)
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, 22050, format="AU", subtype="PCM_16")
    return buffer.getvalue()


def version_tags(parent: str, accuracy: float) -> dict[str, str]:
    return {
        "protocol": "cv10", "selection": "validation", "partial": "false", "folds": "1,2",
        "accuracy_mean": f"{accuracy:.4f}", GIT_COMMIT_TAG: "0" * 40, PARENT_RUN_TAG: parent,
    }  # fmt: skip


def test_a_copied_version_serves_with_its_tracking_server_stopped(tmp_path, monkeypatch):
    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd

    from genreflow.registry import register_version
    from genreflow.serving import TORCH_INDEX, log_ensemble

    base, heads = frozen_ensemble(tmp_path)
    copy = tmp_path / "copy"
    with tracking_server(tmp_path / "server") as uri:
        client = MlflowClient(uri)
        experiment = client.create_experiment("standalone")
        parent = client.create_run(experiment).info.run_id
        runs = fold_runs(client, experiment, parent, heads)
        logged = log_ensemble(
            uri, parent, heads, clip_samples=CLIP, base=base, workdir=tmp_path / "work"
        )
        register_version(
            uri, "standalone", logged.model_id, parent_run_id=parent, tags=version_tags(parent, 0.5)
        )

        # Stored once: every checkpoint in the model, none left in the fold runs, which
        # point to their copy in the model instead (the SHA-256 tag as it was).
        stored = logged.stored
        assert stored["artifacts/base.pth"] == base.stat().st_size
        assert sorted(logged.moved) == sorted(runs.values())
        for fold, run_id in runs.items():
            path = f"artifacts/folds/fold{fold:02d}/head.pth"
            assert stored[path] == heads[fold].stat().st_size
            assert [a.path for a in client.list_artifacts(run_id)] == []
            tags = client.get_run(run_id).data.tags
            assert tags[CHECKPOINT_MODEL_TAG] == logged.model_id
            assert tags[CHECKPOINT_PATH_TAG] == path
            assert tags[SHA256_TAG_PREFIX + "head.pth"] == storage.sha256_of(heads[fold])
        checkpoints = sum(p.stat().st_size for p in (base, *heads.values()))
        assert checkpoints <= sum(stored.values()) < checkpoints + (2 << 20)  # + code, env

        # The registry's models:/ URIs resolve through the process-wide URI.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.artifacts.download_artifacts("models:/standalone/1", dst_path=str(copy))
    with pytest.raises(urllib.error.URLError):  # the server is gone
        urllib.request.urlopen(f"{uri}/health", timeout=5)

    requirements = (copy / "requirements.txt").read_text().splitlines()
    assert requirements[0] == f"--extra-index-url {TORCH_INDEX}"
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    port = free_port()
    command = [str(MLFLOW), "models", "serve", "-m", str(copy), "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    # The server runs uvicorn from PATH (this environment's, as with an activated venv); the
    # tracking URI names the stopped server: the copy must not need it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    clips = [synthetic_clip("metal"), synthetic_clip("classical")]
    rows = [[base64.b64encode(clip).decode()] for clip in clips]
    body = {"dataframe_split": {"columns": ["audio"], "data": rows}}
    with serving(command, "/ping", tmp_path / "serve.log", port=port, timeout=240, env=env) as url:
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            rows = json.loads(answer.read())["predictions"]
    assert [set(row) for row in rows] == [{"genre", *GENRES}] * 2
    assert all(row["genre"] in GENRES for row in rows)
    # The same numbers as the copy loaded in this process.
    local = mlflow.pyfunc.load_model(str(copy)).predict(pd.DataFrame({"audio": clips}))
    for row, (_, mine) in zip(rows, local.iterrows(), strict=True):
        assert row["genre"] == mine["genre"]
        served = [row[g] for g in GENRES]
        np.testing.assert_allclose(served, mine[list(GENRES)].to_numpy(float), atol=1e-6)


def test_a_copied_model_whose_weights_changed_is_refused(tmp_path, mlflow_server, monkeypatch):
    """The copy's checkpoints are checked against the SHA-256 logged with the model."""
    import mlflow.artifacts
    import mlflow.pyfunc

    from genreflow.errors import GenreflowError
    from genreflow.serving import log_ensemble

    base, heads = frozen_ensemble(tmp_path, folds=(1,))
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"tampered-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment).info.run_id
    logged = log_ensemble(
        mlflow_server, parent, heads, clip_samples=CLIP, base=base, workdir=tmp_path / "work"
    )
    assert logged.moved == []  # no fold run held it: nothing to move
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # models:/ resolves through it
    copy = Path(
        mlflow.artifacts.download_artifacts(
            logged.model_uri, dst_path=str(tmp_path / "copy"), tracking_uri=mlflow_server
        )
    )
    head = copy / "artifacts" / "folds" / "fold01" / "head.pth"
    checkpoint = torch.load(head, weights_only=True)
    checkpoint["model"]["fc_transfer.bias"] += 1
    torch.save(checkpoint, head)
    with pytest.raises(GenreflowError, match=r"fold 1's checkpoint .*head.pth: SHA-256 "):
        mlflow.pyfunc.load_model(str(copy))


def test_search_logged_models_ranks_registered_ensembles_by_accuracy(mlflow_server):
    import mlflow

    from genreflow.registry import register_version
    from genreflow.steps.report import evaluation_dataset
    from genreflow.tracking.models import log_model_metrics

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"ranking-{uuid.uuid4().hex[:8]}")
    name = f"ranking-{uuid.uuid4().hex[:8]}"
    report = {"protocol": "cv10", "data_sha256": "d" * 64}
    dataset = evaluation_dataset(report)
    models = {}
    for accuracy in (0.71, 0.84):
        parent = client.create_run(experiment).info.run_id
        model = client.create_logged_model(experiment, name="fold-ensemble", source_run_id=parent)
        metrics = {"accuracy_mean": accuracy, "accuracy_std": 0.05}
        log_model_metrics(mlflow_server, parent, model.model_id, metrics, dataset=dataset)
        tags = version_tags(parent, accuracy)
        register_version(mlflow_server, name, model.model_id, parent_run_id=parent, tags=tags)
        models[accuracy] = model.model_id
        # On the run too, as before: the runs table still shows them.
        assert client.get_run(parent).data.metrics["accuracy_mean"] == accuracy

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        ranked = mlflow.search_logged_models(
            experiment_ids=[experiment],
            order_by=[{"field_name": "metrics.accuracy_mean", "ascending": False}],
            output_format="list",
        )
        assert [m.model_id for m in ranked] == [models[0.84], models[0.71]]
        on_the_data = mlflow.search_logged_models(
            experiment_ids=[experiment],
            filter_string="metrics.accuracy_mean > 0.8",
            datasets=[{"dataset_name": "gtzan-cv10", "dataset_digest": "d" * 16}],
            output_format="list",
        )
        assert [m.model_id for m in on_the_data] == [models[0.84]]
    (metric,) = [m for m in ranked[0].metrics if m.key == "accuracy_mean"]
    assert (metric.dataset_name, metric.dataset_digest) == ("gtzan-cv10", "d" * 16)
    versions = client.search_model_versions(f"name = '{name}'")
    assert {v.source for v in versions} == {f"models:/{m}" for m in models.values()}


def test_an_empty_tracking_uri_falls_back_to_the_injected_one(tmp_path, monkeypatch):
    """KFP's MLflow integration injects MLFLOW_TRACKING_URI; an empty tracking_uri takes it,
    and without it tracking stays off."""
    from genreflow.components.start_run import start_run

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    arguments = start_run_arguments(experiment="fallback")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    off = dsl.Markdown(uri=str(tmp_path / "off.md"))
    assert start_run.python_func(tracking_uri="", mlflow_run=off, **arguments) == ""

    injected = f"sqlite:///{tmp_path / 'injected.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", injected)
    on = dsl.Markdown(uri=str(tmp_path / "on.md"))
    run_id = start_run.python_func(tracking_uri="", mlflow_run=on, **arguments)
    assert run_id and run_id in (tmp_path / "on.md").read_text()
    run = MlflowClient(injected).get_run(run_id)
    assert run.data.tags[GIT_COMMIT_TAG] and run.data.tags["version.mlflow"]

    # A tracking_uri given wins over the injected one.
    given = f"sqlite:///{tmp_path / 'given.db'}"
    elsewhere = dsl.Markdown(uri=str(tmp_path / "given.md"))
    run_id = start_run.python_func(tracking_uri=given, mlflow_run=elsewhere, **arguments)
    assert MlflowClient(given).get_run(run_id).info.run_id == run_id
