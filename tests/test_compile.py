"""The KFP side: every component compiles on its own, and the pipeline's IR has the shape a
backend needs (the fold loop, GPU requests, retries, caching, the images named once)."""

import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.pipeline_spec import pipeline_spec_pb2

from genreflow.cli import main
from genreflow.components.images import CPU_IMAGE, GPU_IMAGE
from genreflow.pipelines.compile import compile_pipeline
from genreflow.pipelines.cv import COMPONENTS, FOLDS


def _load_spec(path) -> tuple[dict, pipeline_spec_pb2.PipelineSpec]:
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(docs[0], spec)  # fails on anything the IR schema does not know
    return docs[0], spec


def test_each_component_compiles_on_its_own(tmp_path):
    for component in COMPONENTS:
        out = tmp_path / f"{component.name}.yaml"
        compiler.Compiler().compile(component, str(out))
        doc, spec = _load_spec(out)
        executor = next(iter(doc["deploymentSpec"]["executors"].values()))
        assert executor["container"]["image"] in (CPU_IMAGE, GPU_IMAGE)
        # The image carries kfp: no pip install at start, so pods need no network.
        assert "pip install" not in " ".join(executor["container"]["command"])


def _tasks(dag: dict) -> dict:
    return dag["dag"]["tasks"]


def test_pipeline_structure(tmp_path):
    path = compile_pipeline(tmp_path / "pipeline.yaml", parallelism=3)
    doc, spec = _load_spec(path)
    root = doc["root"]
    assert root["inputDefinitions"]["parameters"]["folds"]["defaultValue"] == FOLDS
    for name in ("source", "freeze_base", "pretrained", "iterations", "tracking_uri"):
        assert name in root["inputDefinitions"]["parameters"]
    # Everything runs inside the exit handler; the handler closes the MLflow run after it,
    # whatever it ended with.
    top = _tasks(root)
    assert set(top) == {"close-run", "exit-handler-1"}
    closing = top["close-run"]
    assert closing["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert closing["dependentTasks"] == ["exit-handler-1"]
    assert closing["cachingOptions"].get("enableCache", False) is False
    guarded = _tasks(doc["components"]["comp-exit-handler-1"])
    assert {"start-run", "download", "pack"} <= set(guarded)
    assert any(name.startswith("condition-branches") for name in guarded)
    assert guarded["download"]["cachingOptions"].get("enableCache") is True
    assert guarded["start-run"]["cachingOptions"].get("enableCache", False) is False
    for name in ("protocol", "selection", "reuse_folds", "min_folds"):
        assert name in root["inputDefinitions"]["parameters"]
    assert root["inputDefinitions"]["parameters"]["protocol"]["defaultValue"] == "cv10"
    assert root["inputDefinitions"]["parameters"]["min_folds"]["defaultValue"] == 0  # all

    components = doc["components"]
    iterators = [
        t
        for c in components.values()
        if "dag" in c
        for t in c["dag"]["tasks"].values()
        if "parameterIterator" in t
    ]
    assert len(iterators) == 2  # one loop per branch (frozen base, fine-tune)
    for task in iterators:
        assert task["iteratorPolicy"]["parallelismLimit"] == 3

    executors = doc["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["image"] == GPU_IMAGE
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["resources"]["accelerator"]["resourceCount"] == "1"
    retried = [
        t
        for c in components.values()
        if "dag" in c
        for t in c["dag"]["tasks"].values()
        if "retryPolicy" in t
    ]
    assert {t["componentRef"]["name"] for t in retried} == {"comp-train", "comp-train-head"}
    assert spec.pipeline_info.name == "genreflow-cv"


def test_compile_cli_overrides_images(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    digest = "registry.example/genreflow-cuda@sha256:" + "a" * 64
    assert main(["compile", "--out", str(out), "--image-gpu", digest]) == 0
    doc, _ = _load_spec(out)
    images = {e["container"]["image"] for e in doc["deploymentSpec"]["executors"].values()}
    assert images == {CPU_IMAGE, digest}
    # The override lasts one compile: the components still name the default image.
    compile_pipeline(tmp_path / "q.yaml")
    doc, _ = _load_spec(tmp_path / "q.yaml")
    images = {e["container"]["image"] for e in doc["deploymentSpec"]["executors"].values()}
    assert images == {CPU_IMAGE, GPU_IMAGE}


def _task_inputs(doc: dict, component: str) -> dict:
    """The parameters the pipeline passes to the (only) task of `component`."""
    (task,) = [
        t
        for c in doc["components"].values()
        if "dag" in c
        for t in c["dag"]["tasks"].values()
        if t["componentRef"]["name"] == component
    ]
    return task["inputs"]["parameters"]


def test_recipe_parameters_come_from_the_recipe_and_the_head_has_its_own(tmp_path):
    from genreflow.recipe import HeadConfig, TrainConfig, defaults, pipeline_parameters

    doc, _ = _load_spec(compile_pipeline(tmp_path / "pipeline.yaml"))
    parameters = doc["root"]["inputDefinitions"]["parameters"]
    for name, _, default in pipeline_parameters():
        assert parameters[name]["defaultValue"] == default, name
    # freeze_base=true on its own (no demo profile): the heads take head_*, whose defaults
    # are the head's recipe, never the fine-tune's.
    head_inputs = _task_inputs(doc, "comp-train-head")
    tune_inputs = _task_inputs(doc, "comp-train")
    head, tune = defaults(HeadConfig), defaults(TrainConfig)
    for name in ("iterations", "batch_size", "lr", "weight_decay", "mixup", "eval_every"):
        source = head_inputs[name]["componentInputParameter"]
        assert source.endswith(f"head_{name}"), (name, source)
        assert parameters[f"head_{name}"]["defaultValue"] == head[name]
    for name in ("iterations", "batch_size", "lr", "mixup", "eval_every", "precision"):
        source = tune_inputs[name]["componentInputParameter"]
        assert source.endswith(name) and "head_" not in source, (name, source)
        assert parameters[name]["defaultValue"] == tune[name]
    assert head["iterations"] != tune["iterations"] and head["lr"] != tune["lr"]
    # One precision for both paths: the frozen base's embed step takes the pipeline's.
    embed_inputs = _task_inputs(doc, "comp-embed")
    assert embed_inputs["precision"]["componentInputParameter"].endswith("-precision")


def test_a_recipe_argument_the_run_would_ignore_is_refused():
    from genreflow.errors import GenreflowError
    from genreflow.pipelines.profiles import PROFILES, profile_arguments, run_arguments

    # Profiles hold what differs; the path's recipe is spelled out for the run's record.
    assert set(PROFILES["demo"]) == {"freeze_base", "clip_seconds"}
    demo = profile_arguments("demo")
    assert demo["head_iterations"] == 1000 and "iterations" not in demo
    assert profile_arguments("seed")["batch_size"] == 32
    assert run_arguments("demo", {"head_lr": 3e-3})["head_lr"] == 3e-3
    # precision serves both paths: the frozen base's embed computes in it.
    assert run_arguments("demo", {"precision": "fp32"})["precision"] == "fp32"
    assert demo["precision"] == "auto"
    for profile, given, hint in (
        ("demo", {"iterations": 100}, "head_iterations"),
        ("seed", {"head_lr": 1e-3}, "without freeze_base"),
        (None, {"freeze_base": "true", "lr": 1e-3}, "head_lr"),
    ):
        try:
            run_arguments(profile, given)
        except GenreflowError as exc:
            assert hint in str(exc) and "not used by this run" in str(exc)
        else:
            raise AssertionError(f"{profile} {given} was accepted")


def test_pack_takes_the_representation_the_pipeline_is_given(tmp_path):
    doc, _ = _load_spec(compile_pipeline(tmp_path / "pipeline.yaml"))
    parameters = doc["root"]["inputDefinitions"]["parameters"]
    assert parameters["representation"]["defaultValue"] == "logmel"
    guarded = _tasks(doc["components"]["comp-exit-handler-1"])
    for task in ("pack", "start-run"):
        given = guarded[task]["inputs"]["parameters"]["representation"]
        assert given["componentInputParameter"] == "pipelinechannel--representation"
