"""`genreflow submit`: arguments, the package it sends, the backend check and the requests it makes.

No Kubeflow Pipelines backend runs here. What is under test is our code and what it sends:
a small HTTP server on 127.0.0.1 answers the KFP REST endpoints the client calls and records
every request, and the tests check those requests (the run's package, its arguments, the
bearer token) and what a user sees (stdout, stderr, exit status) for each answer.
"""

import json
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import free_port

from genreflow.cli import main
from genreflow.errors import GenreflowError
from genreflow.pipelines.compile import compile_pipeline, parse_toleration
from genreflow.pipelines.cv import CACHE_PERIOD_DAYS, cache_epoch
from genreflow.pipelines.submit import (
    Credentials,
    SubmitError,
    check_accelerator,
    check_arguments,
    parse_params,
    parse_version,
    pipeline_parameters,
    resolve_credentials,
    submit,
)

TOKEN = "tok-3f9c1b7e5d2a48c6-never-shown"
SOURCE = "gs://genreflow-data/genres.tar.gz"
MLFLOW = "http://mlflow.genreflow.svc.cluster.local:5000"
IMAGE_CPU = "registry.example/genreflow@sha256:" + "a" * 64
IMAGE_GPU = "registry.example/genreflow-cuda@sha256:" + "b" * 64
IMAGES = dict(image_cpu=IMAGE_CPU, image_gpu=IMAGE_GPU)


def compiled(out, **settings):
    """The package as submit compiles it: compile_pipeline, with pushed images by default."""
    return compile_pipeline(out, **{**IMAGES, **settings})


# --- a recording stand-in for the KFP REST API -------------------------------------------
class FakeKfp:
    """Answers the v2beta1 endpoints kfp.Client uses; records each request it receives."""

    def __init__(self, tag_name="2.15.0", multi_user=False, run_states=("SUCCEEDED",)):
        self.tag_name = tag_name
        self.multi_user = multi_user
        self.run_states = list(run_states)
        self.healthz_status = 200
        self.healthz_body = None  # None: the API server's own answer
        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _reply(self, status: int, body):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                record = {
                    "method": self.command,
                    "path": url.path,
                    "query": urllib.parse.parse_qs(url.query),
                    # Header names are case-insensitive (kfp's client sends "authorization").
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(raw) if raw else None,
                }
                fake.requests.append(record)
                return record

            def do_GET(self):
                request = self._record()
                path = request["path"]
                if path == "/apis/v1beta1/healthz" and fake.tag_name.startswith("1."):
                    return self._reply(200, {"tag_name": fake.tag_name, "multi_user": False})
                if path == "/apis/v2beta1/healthz" and not fake.tag_name.startswith("1."):
                    body = fake.healthz_body
                    if body is None:
                        body = {
                            "commit_sha": "0123abc",
                            "tag_name": fake.tag_name,
                            "multi_user": fake.multi_user,
                            "pipeline_store": "database",
                        }
                    return self._reply(fake.healthz_status, body)
                if path == "/apis/v2beta1/experiments":
                    return self._reply(200, {})  # none yet: the client creates it
                if path.startswith("/apis/v2beta1/runs/"):
                    state = (
                        fake.run_states.pop(0) if len(fake.run_states) > 1 else fake.run_states[0]
                    )
                    body = {"run_id": path.rsplit("/", 1)[1], "state": state}
                    if state == "FAILED":
                        body["error"] = {"code": 2, "message": "fold 3 ran out of memory"}
                    return self._reply(200, body)
                return self._reply(404, {"error": "not found", "code": 5})

            def do_POST(self):
                request = self._record()
                if request["path"] == "/apis/v2beta1/experiments":
                    body = {"experiment_id": "exp-1", **request["body"]}
                    return self._reply(200, body)
                if request["path"] == "/apis/v2beta1/runs":
                    return self._reply(200, {"run_id": "run-42", "state": "PENDING"})
                return self._reply(404, {"error": "not found", "code": 5})

        return Handler


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """The token in the environment; no in-cluster token file; a private HOME for kfp."""
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-such-token"))
    monkeypatch.delenv("KF_PIPELINES_UI_ENDPOINT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # kfp reads ~/.config/kfp/context.json
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW)  # the submitter's, passed on to the run


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`genreflow submit ARGV`, with pushed images unless ARGV names its own."""
    images = [] if any(a.startswith("--image") for a in argv) else ["--image-cpu", IMAGE_CPU]
    images += [] if any(a.startswith("--image") for a in argv) else ["--image-gpu", IMAGE_GPU]
    status = main(["submit", *argv, *images])
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err
    return status, out, err


# --- arguments ---------------------------------------------------------------------------
def test_params_are_json_when_they_parse_and_typed_by_the_pipeline(tmp_path):
    package = compiled(tmp_path / "p.yaml")
    parameters = pipeline_parameters(package)
    raw = parse_params(
        [f"source={SOURCE}", "folds=[1,2]", "lr=3e-4", "mixup=false", "sha256=0123", "seed=7"]
    )
    typed = check_arguments(raw, parameters)
    assert typed == {
        "source": SOURCE,
        "folds": [1, 2],
        "lr": 3e-4,
        "mixup": False,
        "sha256": "0123",  # a string parameter keeps the text, digits and all
        "seed": 7,
    }
    assert parameters["source"].required and not parameters["lr"].required
    assert parameters["iterations"].default == 10000


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["source"], "expected NAME=VALUE"),
        (["=x"], "expected NAME=VALUE"),
        ([f"source={SOURCE}", "source=other"], "given twice"),
    ],
)
def test_malformed_params_are_refused(pairs, message):
    with pytest.raises(SubmitError, match=message):
        parse_params(pairs)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([f"source={SOURCE}", "learning_rate=1e-3"], "unknown pipeline parameter learning_rate"),
        (["lr=1e-3"], "missing required pipeline parameter source"),
        ([f"source={SOURCE}", "iterations=many"], "iterations must be an integer; got 'many'"),
        ([f"source={SOURCE}", "iterations=2.5"], "iterations must be an integer"),
        ([f"source={SOURCE}", "folds=3"], "folds must be a JSON list"),
        ([f"source={SOURCE}", "mixup=yes"], "mixup must be true or false"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(environment, capsys, argv, message):
    # Nothing listens on this address: argument errors must come before any connection.
    params = [arg for pair in argv for arg in ("--param", pair)]
    status, out, err = run_cli(capsys, "--host", "http://127.0.0.1:9", *params)
    assert status == 2 and out == ""
    assert message in err and err.count("\n") == 1
    if "unknown" in message or "missing" in message:  # the pipeline's parameters are listed
        assert "source (a string, required)" in err and "iterations=10000" in err


def test_host_must_be_an_http_address(environment, capsys):
    status, _, err = run_cli(capsys, "--host", "kfp.example.com", "--param", f"source={SOURCE}")
    assert status == 2 and "expected an http:// or https:// address" in err


def test_tolerations_in_taint_syntax():
    assert parse_toleration("nvidia.com/gpu:NoSchedule") == {
        "effect": "NoSchedule",
        "key": "nvidia.com/gpu",
        "operator": "Exists",
    }
    assert parse_toleration("dedicated=gpu:NoExecute") == {
        "effect": "NoExecute",
        "key": "dedicated",
        "operator": "Equal",
        "value": "gpu",
    }
    for bad in ("nvidia.com/gpu", "nvidia.com/gpu:Sometimes", ":NoSchedule"):
        with pytest.raises(GenreflowError, match="KEY\\[=VALUE\\]:EFFECT"):
            parse_toleration(bad)


def test_versions_read_from_release_tags():
    assert parse_version("2.14.0") == (2, 14, 0)
    assert parse_version("v2.5.0-rc.1") == (2, 5, 0)
    assert parse_version("1.8") == (1, 8)
    assert parse_version("unknown") is None and parse_version("") is None


# --- the package it sends ----------------------------------------------------------------
def test_package_carries_images_parallelism_and_gpu_placement(tmp_path):
    package = compiled(
        tmp_path / "p.yaml",
        parallelism=3,
        image_cpu="registry.example/genreflow@sha256:" + "a" * 64,
        image_gpu="registry.example/genreflow-cuda@sha256:" + "b" * 64,
        gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        gpu_tolerations=[parse_toleration("nvidia.com/gpu:NoSchedule")],
    )
    spec, platform = yaml.safe_load_all(package.read_text())
    executors = spec["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert images["exec-train"].endswith("b" * 64) and images["exec-embed"].endswith("b" * 64)
    assert images["exec-pack"].endswith("a" * 64) and images["exec-aggregate"].endswith("a" * 64)
    text = package.read_text()
    assert "parallelismLimit: 3" in text or "parallelism_limit: 3" in text
    placed = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # Exactly the steps that ask for a GPU are placed, in the form kfp-kubernetes writes.
    gpu_steps = sorted(name for name, config in placed.items() if "nodeSelector" in config)
    assert gpu_steps == ["exec-embed", "exec-train"]
    assert placed["exec-train"]["nodeSelector"] == {
        "labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    }
    assert placed["exec-train"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    # Still a valid pipeline spec after the rewrite.
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())


def test_gpu_placement_matches_kfp_kubernetes(tmp_path):
    kubernetes = pytest.importorskip(
        "kfp.kubernetes", reason="kfp-kubernetes is not installed: the reference to compare with"
    )
    from kfp import compiler, dsl

    from genreflow.components.train import train

    @dsl.pipeline(name="reference")
    def reference(features: str):
        task = train(
            features=dsl.importer(artifact_uri=features, artifact_class=dsl.Dataset).output,
            fold=1, protocol="cv10", selection="validation", pretrained="", iterations=1,
            batch_size=1, lr=0.1, mixup=False, eval_every=1, seed=0, precision="auto",
            tracking_uri="", parent_run_id="", reuse_folds=False, expected_folds=[1], min_folds=0,
            work_root="", pipeline_root="",
        )  # fmt: skip
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.add_node_selector(task, "cloud.google.com/gke-accelerator", "nvidia-l4")
        kubernetes.add_toleration(
            task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"
        )

    compiler.Compiler().compile(reference, str(tmp_path / "reference.yaml"))
    expected = list(yaml.safe_load_all((tmp_path / "reference.yaml").read_text()))[1]
    ours = compiled(
        tmp_path / "ours.yaml",
        gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        gpu_tolerations=[parse_toleration("nvidia.com/gpu:NoSchedule")],
    )
    placed = list(yaml.safe_load_all(ours.read_text()))[1]
    executors = placed["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    want = expected["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert {k: executors["exec-train"][k] for k in want} == want


def test_steps_get_mlflow_credentials_limits_and_a_disk_of_their_own(tmp_path):
    from genreflow.cluster import (
        MLFLOW_CLIENT_LABEL,
        MLFLOW_CREDENTIALS_ENV,
        MLFLOW_CREDENTIALS_SECRET,
        PIPELINE_STEP_LABEL,
        REUSE_KEY_SECRET,
    )

    spec, platform = yaml.safe_load_all(compiled(tmp_path / "p.yaml").read_text())
    placed = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    talks_to_mlflow = ["exec-aggregate", "exec-close-run", "exec-start-run", "exec-train"]
    for name in [*talks_to_mlflow, "exec-train-head"]:
        config = placed[name]
        assert config["podMetadata"]["labels"] == {**MLFLOW_CLIENT_LABEL, **PIPELINE_STEP_LABEL}
        # The fold steps also take the reuse key's Secret (tests/test_compile.py reads it).
        secrets = {s["secretName"]: s for s in config["secretAsEnv"]}
        fold_step = name in ("exec-train", "exec-train-head")
        assert sorted(secrets) == sorted(
            [MLFLOW_CREDENTIALS_SECRET, *([REUSE_KEY_SECRET] if fold_step else [])]
        )
        secret = secrets[MLFLOW_CREDENTIALS_SECRET]
        assert secret["optional"] is True  # a missing Secret cannot keep the pod from starting
        assert {m["secretKey"]: m["envVar"] for m in secret["keyToEnv"]} == MLFLOW_CREDENTIALS_ENV
    for name in ("exec-download", "exec-pack", "exec-embed"):  # they never talk to MLflow
        assert "secretAsEnv" not in placed[name]
        assert MLFLOW_CLIENT_LABEL.items() - placed[name]["podMetadata"]["labels"].items()
    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-train", "exec-embed"):
        resources = executors[name]["container"]["resources"]
        assert resources["cpuLimit"] == resources["cpuRequest"] == 8
        assert resources["memoryLimit"] == resources["memoryRequest"]
        # An emptyDir: the images' user can write it (a fresh volume's root is root's).
        (volume,) = placed[name]["emptyDirMounts"]
        assert volume["mountPath"] == "/home/genreflow/.cache/genreflow"
        assert volume["sizeLimit"] == "50Gi"
    # Without the Secret (a server with no sign-in), the label stays.
    _, platform = yaml.safe_load_all(compiled(tmp_path / "q.yaml", mlflow_secret="").read_text())
    placed = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "secretAsEnv" not in placed["exec-aggregate"] and placed["exec-train"]["podMetadata"]
    assert [s["secretName"] for s in placed["exec-train"]["secretAsEnv"]] == [REUSE_KEY_SECRET]


# --- credentials -------------------------------------------------------------------------
def test_credentials_from_the_environment_or_the_in_cluster_token_file(tmp_path):
    from_env = resolve_credentials({"KF_PIPELINES_TOKEN": TOKEN})
    assert from_env.token == TOKEN and TOKEN not in repr(from_env) and TOKEN not in str(from_env)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    in_pod = resolve_credentials({"KF_PIPELINES_SA_TOKEN_PATH": str(token_file)})
    assert in_pod.token == TOKEN and in_pod.token_path == str(token_file)
    nothing = resolve_credentials({"KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "absent")})
    assert nothing.token is None and nothing.headers() == {}
    assert Credentials("x", token=TOKEN).redact(f"echo: Bearer {TOKEN}") == "echo: Bearer ***"


# --- the backend: version check, run creation, following the run ------------------------
def test_old_backend_is_refused_before_anything_is_created(environment, capsys):
    with FakeKfp(tag_name="2.3.0") as kfp:
        status, out, err = run_cli(capsys, "--host", kfp.url, "--param", f"source={SOURCE}")
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert f"the Kubeflow Pipelines backend at {kfp.url} is 2.3.0" in err and "2.14" in err
    assert [r["path"] for r in kfp.requests] == ["/apis/v2beta1/healthz"]
    assert kfp.requests[0]["headers"]["authorization"] == f"Bearer {TOKEN}"


def test_a_kfp_1_backend_is_found_on_the_v1_endpoint_and_refused(environment, capsys):
    with FakeKfp(tag_name="1.8.5") as kfp:
        status, _, err = run_cli(capsys, "--host", kfp.url, "--param", f"source={SOURCE}")
    assert status == 2 and f"backend at {kfp.url} is 1.8.5" in err
    paths = [r["path"] for r in kfp.requests]
    assert paths == ["/apis/v2beta1/healthz", "/apis/v1beta1/healthz"]


def test_a_backend_that_hides_its_version_needs_an_explicit_skip(environment, capsys):
    with FakeKfp(tag_name="unknown") as kfp:
        status, _, err = run_cli(capsys, "--host", kfp.url, "--param", f"source={SOURCE}")
        assert status == 2 and "does not say its version" in err and "--skip-version-check" in err
        assert not kfp.calls("POST", "/apis/v2beta1/runs")
        status, out, _ = run_cli(
            capsys, "--host", kfp.url, "--param", f"source={SOURCE}", "--skip-version-check"
        )
    assert status == 0 and out.strip().endswith("/#/runs/details/run-42")


def test_new_backend_gets_the_run_the_user_asked_for(environment, capsys, tmp_path):
    with FakeKfp(tag_name="2.15.0") as kfp:
        status, out, err = run_cli(
            capsys,
            "--host", kfp.url + "/",
            "--experiment", "gtzan-cv",
            "--run-name", "nightly",
            "--param", f"source={SOURCE}",
            "--param", "folds=[1,2]",
            "--param", "tracking_uri=http://mlflow.genreflow.svc.cluster.local:5000",
            "--parallelism", "2",
            "--image-cpu", IMAGE_CPU,
            "--image-gpu", "registry.example/genreflow-cuda@sha256:" + "c" * 64,
            "--gpu-toleration", "nvidia.com/gpu:NoSchedule",
            "--service-account", "genreflow-pipeline-runner",
            "--pipeline-root", "gs://genreflow-data/kfp",
            "--package-out", str(tmp_path / "sent.yaml"),
        )  # fmt: skip
    assert status == 0
    assert out == f"{kfp.url}/#/runs/details/run-42\n"  # stdout: the address only
    assert "Experiment details" in err  # kfp's own chatter goes to stderr
    for request in kfp.requests:
        assert request["headers"].get("authorization") == f"Bearer {TOKEN}"

    (experiment,) = kfp.calls("POST", "/apis/v2beta1/experiments")
    assert experiment["body"]["display_name"] == "gtzan-cv"
    (created,) = kfp.calls("POST", "/apis/v2beta1/runs")
    run = created["body"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert run["service_account"] == "genreflow-pipeline-runner"
    assert run["runtime_config"]["pipeline_root"] == "gs://genreflow-data/kfp"
    sent_parameters = run["runtime_config"]["parameters"]
    assert sent_parameters.pop("cache_epoch") == cache_epoch()  # see test_cache_and_lifecycle
    assert sent_parameters == {
        "source": SOURCE,
        "folds": [1, 2],
        "tracking_uri": "http://mlflow.genreflow.svc.cluster.local:5000",
        "kfp_ui": kfp.url,  # the MLflow parent run links back to the KFP run
    }
    sent = run["pipeline_spec"]
    assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "genreflow-cv"
    train_image = sent["pipeline_spec"]["deploymentSpec"]["executors"]["exec-train"]
    assert train_image["container"]["image"].endswith("c" * 64)
    placed = sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert placed["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # --package-out kept exactly what was sent.
    kept = list(yaml.safe_load_all((tmp_path / "sent.yaml").read_text()))
    assert kept[0]["pipelineInfo"] == sent["pipeline_spec"]["pipelineInfo"]


def test_in_cluster_token_file_is_sent_as_the_bearer(environment, capsys, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    monkeypatch.delenv("KF_PIPELINES_TOKEN")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    with FakeKfp() as kfp:
        status, _, _ = run_cli(capsys, "--host", kfp.url, "--param", f"source={SOURCE}")
    assert status == 0 and kfp.calls("POST", "/apis/v2beta1/runs")
    for request in kfp.requests:  # our version check and every call kfp's client makes
        assert request["headers"].get("authorization") == f"Bearer {TOKEN}"


def test_profile_gives_the_recipe_and_params_override_it(environment, capsys):
    with FakeKfp() as kfp:
        status, _, _ = run_cli(
            capsys, "--host", kfp.url, "--profile", "seed",
            "--param", f"source={SOURCE}", "--param", "iterations=500",
        )  # fmt: skip
        assert status == 0
        with pytest.raises(SystemExit) as refused:  # argparse's choices: a one-line error
            run_cli(capsys, "--host", kfp.url, "--profile", "nope")
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "invalid choice: 'nope' (choose from 'demo', 'seed')" in err
    (created,) = kfp.calls("POST", "/apis/v2beta1/runs")
    parameters = created["body"]["runtime_config"]["parameters"]
    assert parameters["profile"] == "seed" and parameters["iterations"] == 500
    assert parameters["pretrained"].startswith("https://zenodo.org/")
    assert parameters["freeze_base"] is False and parameters["batch_size"] == 32


def test_multi_user_backend_needs_a_namespace(environment, capsys):
    with FakeKfp(multi_user=True) as kfp:
        status, _, err = run_cli(capsys, "--host", kfp.url, "--param", f"source={SOURCE}")
        assert status == 2 and "is multi-user: pass --namespace" in err
        status, _, _ = run_cli(
            capsys, "--host", kfp.url, "--param", f"source={SOURCE}", "--namespace", "team-a"
        )
    assert status == 0
    (listing,) = kfp.calls("GET", "/apis/v2beta1/experiments")
    assert listing["query"]["namespace"] == ["team-a"]
    (experiment,) = kfp.calls("POST", "/apis/v2beta1/experiments")
    assert experiment["body"]["namespace"] == "team-a"


def test_wait_follows_the_run_and_exits_by_its_end(environment, capsys):
    with FakeKfp(run_states=("RUNNING", "SUCCEEDED")) as kfp:
        status, out, err = run_cli(
            capsys, "--host", kfp.url, "--param", f"source={SOURCE}",
            "--wait", "--poll-seconds", "0.1",
        )  # fmt: skip
        assert status == 0 and out.endswith("/#/runs/details/run-42\n")
        assert "run RUNNING" in err and "run SUCCEEDED" in err
        assert len(kfp.calls("GET", "/apis/v2beta1/runs/run-42")) == 2

    with FakeKfp(run_states=("FAILED",)) as kfp:
        status, out, err = run_cli(
            capsys, "--host", kfp.url, "--param", f"source={SOURCE}", "--wait"
        )
    assert status == 1 and out.endswith("/#/runs/details/run-42\n")
    assert "run run-42 ended FAILED (fold 3 ran out of memory)" in err


def test_wait_gives_up_after_the_timeout(environment, capsys):
    with FakeKfp(run_states=("RUNNING",)) as kfp:
        status, out, err = run_cli(
            capsys, "--host", kfp.url, "--param", f"source={SOURCE}",
            "--wait", "--timeout", "0.3", "--poll-seconds", "0.1",
        )  # fmt: skip
    assert status == 2 and out.endswith("/#/runs/details/run-42\n")
    assert "still RUNNING after 0 s; it goes on without us" in err


@pytest.mark.parametrize(
    "status_code, body, message",
    [
        (401, {"error": "bad token", "echo": f"Bearer {TOKEN}"}, "refused the credentials"),
        (403, {"error": f"forbidden for {TOKEN}"}, "refused the credentials (HTTP 403"),
        (500, {"error": "internal"}, "answered HTTP 500"),
        (404, {"error": "no such page"}, "has no Kubeflow Pipelines healthz endpoint"),
        (200, b"<html>Sign in</html>", "does not answer like a Kubeflow Pipelines API"),
    ],
)
def test_backend_errors_are_one_line_and_never_carry_the_token(
    environment, status_code, body, message
):
    with FakeKfp() as kfp:
        kfp.healthz_status, kfp.healthz_body = status_code, body
        with pytest.raises(SubmitError) as caught:
            submit(kfp.url, {"source": SOURCE}, image_cpu=IMAGE_CPU, image_gpu=IMAGE_GPU)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    error: BaseException | None = caught.value
    while error is not None:  # nor anywhere in the exception chain
        assert TOKEN not in str(error) and TOKEN not in repr(error)
        error = error.__cause__ or error.__context__


def test_unreachable_host_from_the_real_command(tmp_path):
    port = free_port()  # bound, then released: nothing listens there now
    env = {
        "KF_PIPELINES_TOKEN": TOKEN,
        "KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "none"),
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    genreflow = Path(sys.executable).with_name("genreflow")
    done = subprocess.run(
        [str(genreflow), "submit", "--host", f"http://127.0.0.1:{port}",
         "--param", f"source={SOURCE}", "--param", f"tracking_uri={MLFLOW}",
         "--image-cpu", IMAGE_CPU, "--image-gpu", IMAGE_GPU, "--wait"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"genreflow submit: error: cannot reach the Kubeflow Pipelines API at "
        f"http://127.0.0.1:{port}: Connection refused (is the address right, and is the "
        "port-forward or VPN up?)\n"
    )
    assert "Traceback" not in done.stderr and TOKEN not in done.stderr


def test_vertex_without_its_library_says_what_to_install(environment, capsys):
    try:
        import google.cloud.aiplatform  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("google-cloud-aiplatform is installed: its absence cannot be shown")
    status, _, err = run_cli(
        capsys, "--vertex", "my-project/europe-west4", "--param", f"source={SOURCE}",
        "--pipeline-root", "gs://genreflow-data/vertex", "--accelerator", "NVIDIA_L4",
    )  # fmt: skip
    assert status == 2 and "needs google-cloud-aiplatform" in err
    status, _, err = run_cli(capsys, "--vertex", "my-project", "--param", f"source={SOURCE}")
    assert status == 2 and "expected PROJECT/REGION" in err


# --- nothing silently off ----------------------------------------------------------------
def test_no_tracking_uri_is_refused_unless_asked(environment, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with FakeKfp() as kfp:
        status, out, err = run_cli(capsys, "--host", kfp.url, "--param", f"source={SOURCE}")
        assert status == 2 and out == "" and err.count("\n") == 1
        assert "no MLflow server for the run" in err and "--no-tracking" in err
        assert kfp.requests == []  # refused before anything was sent
        status, _, _ = run_cli(
            capsys, "--host", kfp.url, "--param", f"source={SOURCE}", "--no-tracking"
        )
        assert status == 0
    (created,) = kfp.calls("POST", "/apis/v2beta1/runs")
    assert created["body"]["runtime_config"]["parameters"]["tracking_uri"] == ""


def test_the_submitters_tracking_uri_is_passed_on(environment, capsys):
    with FakeKfp() as kfp:
        status, _, _ = run_cli(capsys, "--host", kfp.url, "--param", f"source={SOURCE}")
    assert status == 0
    (created,) = kfp.calls("POST", "/apis/v2beta1/runs")
    assert created["body"]["runtime_config"]["parameters"]["tracking_uri"] == MLFLOW


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///home/me/mlflow.db",
        "http://127.0.0.1:5000",
        "http://localhost:5000",  # with user:password@ it is refused first (test_redaction)
        "./mlruns",
    ],
)
def test_a_tracking_server_on_this_machine_is_refused(environment, capsys, uri):
    status, out, err = run_cli(
        capsys, "--host", "http://127.0.0.1:9", "--param", f"source={SOURCE}",
        "--param", f"tracking_uri={uri}",
    )  # fmt: skip
    assert status == 2 and out == "" and err.count("\n") == 1
    assert "is on this machine; the pipeline's pods need a server they reach" in err
    assert "s3cret" not in err
    status, _, err = run_cli(
        capsys, "--host", "http://127.0.0.1:9", "--param", f"source={SOURCE}",
        "--param", f"tracking_uri={MLFLOW}", "--no-tracking",
    )  # fmt: skip
    assert status == 2 and "--no-tracking and --param tracking_uri" in err


def test_placeholder_and_unpushed_images_are_refused(environment, capsys, tmp_path):
    from genreflow.components.images import CPU_IMAGE, GPU_IMAGE

    base = ["--host", "http://127.0.0.1:9", "--param", f"source={SOURCE}"]
    status, _, err = run_cli(capsys, *base, "--image-cpu", CPU_IMAGE, "--image-gpu", GPU_IMAGE)
    assert status == 2 and err.count("\n") == 1
    assert (
        f"no image a cluster can pull for the CPU and GPU steps (the components name {CPU_IMAGE}"
        in err
    )
    status, _, err = run_cli(capsys, *base, "--image-cpu", IMAGE_CPU)
    assert status == 2 and "for the GPU steps" in err and "--images workspace/images.json" in err

    built = {
        "pushed": False,
        **{k: {"ref": f"registry.example/x-{k}:0123abcd"} for k in ("cpu", "gpu")},
    }
    images = tmp_path / "images.json"
    images.write_text(json.dumps(built))
    status, _, err = run_cli(capsys, *base, "--images", str(images))
    assert status == 2 and "built but not pushed" in err
    images.write_text("{")
    status, _, err = run_cli(capsys, *base, "--images", str(images))
    assert status == 2 and f"{images}: not an images file of `make images`" in err


def test_pushed_images_from_make_images_are_the_ones_sent(environment, capsys, tmp_path):
    images = tmp_path / "images.json"
    refs = {"cpu": IMAGE_CPU, "gpu": IMAGE_GPU}
    images.write_text(json.dumps({"pushed": True, **{k: {"ref": r} for k, r in refs.items()}}))
    with FakeKfp() as kfp:
        status, _, _ = run_cli(
            capsys, "--host", kfp.url, "--param", f"source={SOURCE}", "--images", str(images)
        )
    assert status == 0
    (created,) = kfp.calls("POST", "/apis/v2beta1/runs")
    sent = created["body"]["pipeline_spec"]
    # kfp's client sends the spec itself, or {pipeline_spec, platform_spec} when there is one
    executors = sent.get("pipeline_spec", sent)["deploymentSpec"]["executors"]
    assert executors["exec-train"]["container"]["image"] == IMAGE_GPU
    assert executors["exec-pack"]["container"]["image"] == IMAGE_CPU


def test_accelerator_names_follow_the_backend():
    assert check_accelerator(None, vertex=False) == "nvidia.com/gpu"
    assert check_accelerator("amd.com/gpu", vertex=False) == "amd.com/gpu"
    assert check_accelerator("NVIDIA_H100_80GB", vertex=True) == "NVIDIA_H100_80GB"
    with pytest.raises(SubmitError, match="NVIDIA_L4 are Vertex AI's"):
        check_accelerator("NVIDIA_L4", vertex=False)
    for name in (None, "nvidia.com/gpu"):
        with pytest.raises(SubmitError, match="Vertex AI names its GPUs by type"):
            check_accelerator(name, vertex=True)


# --- cache and lifecycle -----------------------------------------------------------------
def test_cache_and_lifecycle_agree(tmp_path):
    """What KFP's cache serves must still exist: only download, pack and embed are cached,
    each keyed on the cache period, and the bucket keeps the pipeline root's objects
    longer than a period (infra/terraform)."""
    import re

    spec = next(yaml.safe_load_all(compiled(tmp_path / "p.yaml").read_text()))
    tasks = {}

    def walk(dag):
        for name, task in dag.get("tasks", {}).items():
            tasks[name] = task
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])

    walk(spec["root"]["dag"])
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"download", "pack", "embed"}
    for name in cached:
        parameter = tasks[name]["inputs"]["parameters"]["cache_epoch"]
        assert parameter["componentInputParameter"].endswith("cache_epoch")

    variables = (Path(__file__).parents[1] / "infra/terraform/variables.tf").read_text()
    block = variables[variables.index('variable "kfp_root_retention_days"') :]
    block = block[: block.index("\n}\n")]
    default = int(re.search(r"default\s*=\s*(\d+)", block).group(1))
    bound = int(re.search(r"kfp_root_retention_days > (\d+)", block).group(1))
    assert bound == CACHE_PERIOD_DAYS < default
    main_tf = (Path(__file__).parents[1] / "infra/terraform/main.tf").read_text()
    assert (
        "matches_prefix = [var.run_prefix]" in main_tf
        and "age            = var.kfp_root_retention_days" in main_tf
    )
    run_prefix = variables[variables.index('variable "run_prefix"') :]
    assert re.search(r'default\s*=\s*"kfp/"', run_prefix[: run_prefix.index("\n}\n")])

    day = 86400
    assert cache_epoch(0) == cache_epoch((CACHE_PERIOD_DAYS - 1) * day) == "0"
    assert cache_epoch(CACHE_PERIOD_DAYS * day) == "1"
