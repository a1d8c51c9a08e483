"""The KFP side: every component compiles on its own, and the pipeline's IR has the shape a
backend needs (the fold loop, GPU requests, retries, caching), with everything a cluster
needs fixed in it: loaded back with kfp, every image, Secret, placement, resource, timeout
and security setting is the one asked for, and no image is a name no registry serves."""

import json

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler, components
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from genreflow.cli import main
from genreflow.cluster import (
    MLFLOW_CLIENT_LABEL,
    MLFLOW_CREDENTIALS_ENV,
    MLFLOW_CREDENTIALS_SECRET,
    PIPELINE_STEP_LABEL,
    REUSE_KEY_SECRET,
    REUSE_KEY_SECRET_ENV,
)
from genreflow.components.images import CPU_IMAGE, GPU_IMAGE, IMAGE_UID
from genreflow.errors import GenreflowError
from genreflow.pipelines.compile import compile_pipeline, parse_step_resources
from genreflow.pipelines.cv import COMPONENTS, FOLDS, PIPELINE_TTL_SECONDS, RESOURCES

IMAGE_CPU = "registry.example/genreflow@sha256:" + "a" * 64
IMAGE_GPU = "registry.example/genreflow-cuda@sha256:" + "b" * 64
IMAGES = dict(image_cpu=IMAGE_CPU, image_gpu=IMAGE_GPU)
GPU_EXECUTORS = {"exec-embed", "exec-train"}
# Steps that talk to MLflow (sign in with the Secret, carry the client label).
TRACKED = {"start-run", "train-head", "train", "aggregate", "close-run"}
# The steps that sign fold runs and check a run's record before reusing it.
FOLD_STEPS = {"train-head", "train"}


def _secrets(config) -> dict:
    """A step's Secrets taken into its environment, by name."""
    return {
        s.secret_name or s.secret_name_parameter.runtime_value.constant.string_value: s
        for s in config.secret_as_env
    }


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
    path = compile_pipeline(tmp_path / "pipeline.yaml", parallelism=3, **IMAGES)
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
    assert train["image"] == IMAGE_GPU
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


def _loaded(path) -> tuple[pipeline_spec_pb2.PipelineSpec, dict, dict]:
    """The compiled file as kfp loads it for a run (a YamlComponent), and each executor's
    Kubernetes settings parsed into kfp-kubernetes' own message (unknown fields fail)."""
    loaded = components.load_component_from_file(str(path))
    platform = json_format.MessageToDict(loaded.platform_spec)["platforms"]["kubernetes"]
    placed = {}
    for name, config in platform["deploymentSpec"]["executors"].items():
        message = kubernetes_executor_config_pb2.KubernetesExecutorConfig()
        json_format.ParseDict(config, message)
        placed[name] = message
    return loaded.pipeline_spec, placed, platform


def _step_name(executor: str) -> str:
    """exec-aggregate-2 -> aggregate: the step an executor runs."""
    name = executor.removeprefix("exec-")
    return name if name in RESOURCES else name.rsplit("-", 1)[0]


def test_the_compiled_file_loads_back_with_what_was_asked_for(tmp_path):
    out = compile_pipeline(
        tmp_path / "pipeline.yaml",
        gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        gpu_tolerations=[{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}],
        mlflow_secret="team-mlflow",
        resources=parse_step_resources(["aggregate:memory=16Gi,timeout=2h"]),
        ttl_seconds=3600,
        **IMAGES,
    )
    spec, placed, platform = _loaded(out)
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    assert {_step_name(name) for name in executors} == set(RESOURCES)  # every step is here
    assert set(placed) == set(executors)
    for name, executor in executors.items():
        container = executor.struct_value.fields["container"].struct_value.fields
        step = _step_name(name)
        wanted = IMAGE_GPU if name in GPU_EXECUTORS else IMAGE_CPU
        assert container["image"].string_value == wanted, name
        # Requests equal to limits, from RESOURCES or the --step override; a timeout.
        sized = RESOURCES[step]
        if step == "aggregate":
            sized = type(sized)(sized.cpu, "16Gi", 7200)
        resources = container["resources"].struct_value.fields
        for kind, value in (("Cpu", sized.cpu), ("Memory", sized.memory)):
            for bound in ("Request", "Limit"):
                assert resources[f"resource{kind}{bound}"].string_value == value, (name, kind)
        config = placed[name]
        assert config.active_deadline_seconds == sized.timeout_seconds, name
        # The images' non-root user; the step label the runner's policies select.
        security = config.security_context
        assert (security.run_as_user, security.run_as_group) == (IMAGE_UID, IMAGE_UID), name
        assert security.run_as_non_root is True, name
        labels = dict(config.pod_metadata.labels)
        assert PIPELINE_STEP_LABEL.items() <= labels.items(), name
        # The MLflow Secret, named as asked and optional: a missing one cannot keep the
        # pod from starting (CreateContainerConfigError).
        secrets = _secrets(config)
        # The reuse key's Secret on the fold steps alone, optional (without it no fold is
        # reused, none fails to start).
        if step in FOLD_STEPS:
            reuse = secrets.pop(REUSE_KEY_SECRET)
            assert reuse.optional is True
            assert {m.secret_key: m.env_var for m in reuse.key_to_env} == REUSE_KEY_SECRET_ENV
        assert REUSE_KEY_SECRET not in secrets, name
        if step in TRACKED:
            (secret,) = secrets.values()
            assert secret.secret_name_parameter.runtime_value.constant.string_value == (
                "team-mlflow"
            )
            assert secret.optional is True
            keys = {m.secret_key: m.env_var for m in secret.key_to_env}
            assert keys == MLFLOW_CREDENTIALS_ENV
            assert MLFLOW_CLIENT_LABEL.items() <= labels.items(), name
        else:
            assert not secrets, name
            assert not MLFLOW_CLIENT_LABEL.items() <= labels.items(), name
        # GPU placement on exactly the GPU steps.
        if name in GPU_EXECUTORS:
            assert resources["accelerator"].struct_value.fields["resourceType"].string_value == (
                "nvidia.com/gpu"
            )
            assert dict(config.node_selector.labels) == {
                "cloud.google.com/gke-accelerator": "nvidia-l4"
            }
            (toleration,) = config.tolerations
            assert (toleration.key, toleration.operator, toleration.effect) == (
                "nvidia.com/gpu",
                "Exists",
                "NoSchedule",
            )
            (scratch,) = config.empty_dir_mounts
            assert scratch.mount_path == "/home/genreflow/.cache/genreflow"
        else:
            assert "accelerator" not in resources, name
            assert not config.node_selector.labels and not config.tolerations, name
    assert platform["pipelineConfig"]["resourceTtlOnCompletion"] == 3600
    # No name that no registry serves, anywhere in the file.
    text = out.read_text()
    assert CPU_IMAGE not in text and GPU_IMAGE not in text


def test_defaults_no_secret_and_no_ttl(tmp_path):
    _, placed, platform = _loaded(compile_pipeline(tmp_path / "p.yaml", **IMAGES))
    (secret,) = placed["exec-start-run"].secret_as_env
    assert secret.secret_name == MLFLOW_CREDENTIALS_SECRET
    assert set(_secrets(placed["exec-train"])) == {MLFLOW_CREDENTIALS_SECRET, REUSE_KEY_SECRET}
    assert platform["pipelineConfig"]["resourceTtlOnCompletion"] == PIPELINE_TTL_SECONDS
    assert placed["exec-pack"].active_deadline_seconds == RESOURCES["pack"].timeout_seconds
    # '' for a server without sign-in: no Secret at all; 0: no time to live.
    out = compile_pipeline(tmp_path / "q.yaml", mlflow_secret="", ttl_seconds=0, **IMAGES)
    _, placed, platform = _loaded(out)
    assert not any(set(_secrets(config)) - {REUSE_KEY_SECRET} for config in placed.values())
    assert "pipelineConfig" not in platform


def test_compile_cli_takes_images_from_flags_or_make_images(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no workspace/images.json here yet
    out = tmp_path / "p.yaml"

    def images_in(path) -> set[str]:
        spec, _, _ = _loaded(path)
        executors = spec.deployment_spec.fields["executors"].struct_value.fields
        return {
            e.struct_value.fields["container"].struct_value.fields["image"].string_value
            for e in executors.values()
        }

    # No image: refused, saying how to set one, and nothing written.
    assert main(["compile", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no image a cluster can pull for the CPU and GPU steps" in err
    assert "--images workspace/images.json" in err and err.count("\n") == 1
    assert not out.exists()
    # The components' own names are refused as well, naming them.
    assert (
        main(["compile", "--out", str(out), "--image-cpu", CPU_IMAGE, "--image-gpu", IMAGE_GPU])
        == 2
    )
    assert f"the components name {CPU_IMAGE}, which no registry serves" in capsys.readouterr().err
    # Both flags.
    assert (
        main(["compile", "--out", str(out), "--image-cpu", IMAGE_CPU, "--image-gpu", IMAGE_GPU])
        == 0
    )
    assert images_in(out) == {IMAGE_CPU, IMAGE_GPU}
    # What `make images IMAGE_BUILD_ARGS=--push` recorded, named or found in workspace/.
    recorded = {"pushed": True, "cpu": {"ref": IMAGE_CPU}, "gpu": {"ref": IMAGE_GPU}}
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace/images.json").write_text(json.dumps(recorded))
    out.unlink()
    assert main(["compile", "--out", str(out)]) == 0
    assert "workspace/images.json" in capsys.readouterr().err
    assert images_in(out) == {IMAGE_CPU, IMAGE_GPU}
    other = "registry.example/other@sha256:" + "c" * 64
    assert main(["compile", "--out", str(out), "--images", "workspace/images.json",
                 "--image-gpu", other]) == 0  # fmt: skip
    assert images_in(out) == {IMAGE_CPU, other}
    # Built but not pushed: no cluster can pull them.
    (tmp_path / "workspace/images.json").write_text(json.dumps({**recorded, "pushed": False}))
    assert main(["compile", "--out", str(out)]) == 2
    assert "built but not pushed" in capsys.readouterr().err


def test_compile_cli_places_gpu_steps_and_sizes_steps(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    argv = ["compile", "--out", str(out), "--image-cpu", IMAGE_CPU, "--image-gpu", IMAGE_GPU]
    placement = ["--gpu-node-selector", "pool=gpu", "--gpu-toleration", "dedicated=gpu:NoExecute"]
    sizes = ["--step", "pack:cpu=2,memory=6Gi", "--step", "train:timeout=12h", "--ttl", "1d"]
    assert main([*argv, *placement, "--mlflow-secret", "", *sizes]) == 0
    spec, placed, platform = _loaded(out)
    assert dict(placed["exec-train"].node_selector.labels) == {"pool": "gpu"}
    (toleration,) = placed["exec-embed"].tolerations
    assert (toleration.key, toleration.value, toleration.operator) == ("dedicated", "gpu", "Equal")
    assert not placed["exec-aggregate"].secret_as_env
    assert set(_secrets(placed["exec-train"])) == {REUSE_KEY_SECRET}
    assert placed["exec-train"].active_deadline_seconds == 12 * 3600
    assert platform["pipelineConfig"]["resourceTtlOnCompletion"] == 86400
    pack = json_format.MessageToDict(spec.deployment_spec)["executors"]["exec-pack"]
    assert pack["container"]["resources"]["resourceMemoryLimit"] == "6Gi"
    assert pack["container"]["resources"]["resourceCpuRequest"] == "2"
    for bad, message in (
        (["--step", "packer:cpu=2"], "NAME one of start-run, download, pack"),
        (["--step", "pack:cpu=two"], "'cpu=two' is not cpu=Q"),
        (["--step", "pack:timeout=soon"], "expected a duration"),
        (["--ttl", "3 days"], "--ttl '3 days': expected a duration"),
        (["--gpu-toleration", "nvidia.com/gpu"], "KEY[=VALUE]:EFFECT"),
        (["--parallelism", "0"], "--parallelism must be 1 or more"),
    ):
        assert main([*argv, *bad]) == 2, bad
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (bad, err)


def test_step_overrides_start_from_the_table():
    changed = parse_step_resources(["aggregate:memory=16Gi", "aggregate:timeout=90m"])
    assert changed == {
        "aggregate": type(RESOURCES["aggregate"])(RESOURCES["aggregate"].cpu, "16Gi", 5400)
    }
    with pytest.raises(GenreflowError, match="expected NAME:cpu=Q"):
        parse_step_resources(["aggregate"])


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

    doc, _ = _load_spec(compile_pipeline(tmp_path / "pipeline.yaml", **IMAGES))
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
    doc, _ = _load_spec(compile_pipeline(tmp_path / "pipeline.yaml", **IMAGES))
    parameters = doc["root"]["inputDefinitions"]["parameters"]
    assert parameters["representation"]["defaultValue"] == "logmel"
    guarded = _tasks(doc["components"]["comp-exit-handler-1"])
    for task in ("pack", "start-run"):
        given = guarded[task]["inputs"]["parameters"]["representation"]
        assert given["componentInputParameter"] == "pipelinechannel--representation"
