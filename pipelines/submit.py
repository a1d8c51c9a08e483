"""Submit the cross-validation pipeline to a Kubeflow Pipelines backend, or to Vertex AI.

1. compile   the pipeline into a temporary file, as `genreflow compile` does
2. check     the arguments against the compiled pipeline's own parameters
3. version   ask the backend its version and refuse one older than MIN_BACKEND
4. create    the run (creating the KFP experiment if needed); its address is returned
5. follow    with wait: poll the run to its end; a run that did not succeed is not an error
             here, the caller decides (the command exits 1)

The token comes from the environment (KF_PIPELINES_TOKEN) or, inside a cluster, from the
projected service-account token file KFP's own client reads; it is never printed, logged or
put in an error message.

One file past 600 lines: the five stages above are one transaction with the backend, each
stage's refusals beside it (most lines are those messages, which say what to change).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genreflow.errors import GenreflowError
from genreflow.pipelines.compile import compile_pipeline
from genreflow.pipelines.cv import ACCELERATOR, PIPELINE_NAME, cache_epoch
from genreflow.storage import TRACKING_CREDENTIALS, redacted, refuse_userinfo

# dsl.Collected and the final-status exit handler need a 2.14 backend; ParallelFor's
# parallelism needs 2.4. An older backend accepts the run and then fails it part way.
MIN_BACKEND = (2, 14)
MIN_BACKEND_WHY = "dsl.Collected and the exit handler need 2.14, loop parallelism 2.4"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
# The same variable and default path kfp.Client's in-cluster credentials use.
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kfp/token"
UI_ENV = "KF_PIPELINES_UI_ENDPOINT"
DEFAULT_EXPERIMENT = "genreflow"
HTTP_TIMEOUT_SECONDS = 15.0
FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")
# Polling a long run survives this many failed reads in a row (a restarting API server).
WAIT_READ_FAILURES = 5


class SubmitError(GenreflowError):
    """The run could not be prepared, submitted or followed."""


class BackendTooOld(SubmitError):
    """The Kubeflow Pipelines backend is older than the pipeline needs."""


# --- arguments ---------------------------------------------------------------------------
def parse_params(pairs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` strings -> {name: raw value text}; values are typed in `check_arguments`."""
    raw: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SubmitError(f"--param {pair!r}: expected NAME=VALUE")
        if name in raw:
            raise SubmitError(f"--param {name} is given twice")
        raw[name] = value
    return raw


def parse_value(text: str):
    """JSON when the text parses as JSON (folds=[1,2], lr=3e-4, mixup=false), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class Parameter:
    """One input of the compiled pipeline."""

    name: str
    kind: str  # the IR's parameterType: STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN, ...
    required: bool
    default: object = None

    def describe(self) -> str:
        if self.required:
            return f"{self.name} ({_KIND_NAMES.get(self.kind, self.kind)}, required)"
        return f"{self.name}={json.dumps(self.default)}"


_KIND_NAMES = {
    "STRING": "a string",
    "NUMBER_INTEGER": "an integer",
    "NUMBER_DOUBLE": "a number",
    "BOOLEAN": "true or false",
    "LIST": "a JSON list",
    "STRUCT": "a JSON object",
}


def pipeline_parameters(package: str | Path) -> dict[str, Parameter]:
    """The parameters a compiled pipeline declares, read from its IR YAML."""
    with open(package) as f:
        spec = next(yaml.safe_load_all(f))
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    parameters = {}
    for name, info in declared.items():
        default = info.get("defaultValue")
        if info.get("parameterType") == "NUMBER_INTEGER" and isinstance(default, float):
            default = int(default)  # the IR stores every number as a double
        if info.get("parameterType") == "LIST" and isinstance(default, list):
            default = [int(v) if isinstance(v, float) and v.is_integer() else v for v in default]
        parameters[name] = Parameter(
            name=name,
            kind=info.get("parameterType", "STRING"),
            required=not info.get("isOptional", False),
            default=default,
        )
    return parameters


def check_arguments(arguments: Mapping[str, object], parameters: Mapping[str, Parameter]) -> dict:
    """Type the arguments by the pipeline's parameters; name what is unknown, missing or wrong.

    A value given as text (from `--param`) is read as JSON when it parses, except for string
    parameters, which take the text as it is (so sha256=0123 stays a string).
    """
    listing = ", ".join(p.describe() for p in sorted(parameters.values(), key=lambda p: p.name))
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        raise SubmitError(
            f"unknown pipeline parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; the pipeline's parameters are: {listing}"
        )
    missing = sorted(p.name for p in parameters.values() if p.required and p.name not in arguments)
    if missing:
        raise SubmitError(
            f"missing required pipeline parameter{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (--param NAME=VALUE); the pipeline's parameters are: {listing}"
        )
    return {name: _typed(parameters[name], value) for name, value in arguments.items()}


def _typed(parameter: Parameter, value: object):
    kind = parameter.kind
    if kind == "STRING":
        if isinstance(value, str):
            return value
    else:
        if isinstance(value, str):
            value = parse_value(value)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "NUMBER_INTEGER" and is_number and float(value).is_integer():
            return int(value)
        if kind == "NUMBER_DOUBLE" and is_number:
            return float(value)
        if kind == "BOOLEAN" and isinstance(value, bool):
            return value
        if kind == "LIST" and isinstance(value, list):
            return value
        if kind == "STRUCT" and isinstance(value, dict):
            return value
    expected = _KIND_NAMES.get(kind, kind)
    raise SubmitError(f"pipeline parameter {parameter.name} must be {expected}; got {value!r}")


# --- what a cluster run needs that a local one does not ----------------------------------
# Kubernetes names a GPU as an extended resource (vendor domain / name); Vertex AI by its
# own enum (google.cloud.aiplatform_v1.types.AcceleratorType): NVIDIA_L4, NVIDIA_H100_80GB...
KUBERNETES_RESOURCE = re.compile(r"^[a-z0-9][a-z0-9.-]*\.[a-z]+/[a-z0-9][a-z0-9._-]*$")
VERTEX_ACCELERATOR = re.compile(r"^(NVIDIA|TPU)_[A-Z0-9_]+$")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def check_accelerator(accelerator: str | None, *, vertex: bool) -> str:
    """The accelerator name, checked against the backend's naming; KFP's default if none."""
    if vertex:
        if not accelerator or not VERTEX_ACCELERATOR.match(accelerator):
            raise SubmitError(
                f"--accelerator {accelerator or '(none)'}: Vertex AI names its GPUs by type, "
                "e.g. --accelerator NVIDIA_L4 or NVIDIA_H100_80GB"
            )
        return accelerator
    accelerator = accelerator or ACCELERATOR
    if not KUBERNETES_RESOURCE.match(accelerator):
        raise SubmitError(
            f"--accelerator {accelerator}: Kubeflow Pipelines asks Kubernetes for a resource "
            f"such as {ACCELERATOR} or amd.com/gpu (names such as NVIDIA_L4 are Vertex AI's)"
        )
    return accelerator


def tracked_arguments(
    arguments: Mapping[str, object], *, environ: Mapping[str, str], no_tracking: bool
) -> dict:
    """The run's arguments with the MLflow server the pods log to: --param tracking_uri, else
    the submitter's MLFLOW_TRACKING_URI. Tracking is never off unless asked (--no-tracking),
    and a server on this machine is refused: the pods cannot reach it."""
    given = str(arguments.get("tracking_uri") or "")
    if no_tracking:
        if given:
            raise SubmitError(f"--no-tracking and --param tracking_uri={given}: choose one")
        return {**arguments, "tracking_uri": ""}
    uri = given or environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise SubmitError(
            "no MLflow server for the run: give --param tracking_uri=http://HOST:PORT (one the "
            "pipeline's pods reach) or set MLFLOW_TRACKING_URI; --no-tracking runs untracked"
        )
    refuse_userinfo(uri, what="tracking URI", instead=TRACKING_CREDENTIALS)
    scheme, _, rest = uri.partition("://")
    host = rest.split("/", 1)[0].rpartition("@")[2].rsplit(":", 1)[0].strip("[]")
    if scheme not in ("http", "https", "databricks") or host in LOCAL_HOSTS:
        source = "--param tracking_uri" if given else "MLFLOW_TRACKING_URI"
        raise SubmitError(
            f"{source}: {redacted(uri)} is on this machine; the pipeline's pods need a "
            "server they reach, e.g. http://mlflow.genreflow.svc.cluster.local:5000"
        )
    return {**arguments, "tracking_uri": uri}


# --- credentials and the backend's version -----------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """How requests authenticate; `repr` and `str` never show the token."""

    source: str
    token: str | None = field(default=None, repr=False)
    token_path: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def redact(self, text: str) -> str:
        """The text with the token (should a server echo it back) replaced."""
        return text.replace(self.token, "***") if self.token else text


def resolve_credentials(environ: Mapping[str, str] | None = None) -> Credentials:
    """KF_PIPELINES_TOKEN, else the in-cluster projected token file, else none (port-forward)."""
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return Credentials(source=TOKEN_ENV, token=token)
    path = environ.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    if os.path.isfile(path):
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise SubmitError(f"cannot read the service-account token {path}: {exc}") from None
        if token:
            return Credentials(source=f"token file {path}", token=token, token_path=path)
    return Credentials(source="none")


@dataclass(frozen=True)
class Backend:
    """What a KFP API says about itself on its healthz endpoint."""

    host: str
    tag: str
    version: tuple[int, ...] | None
    multi_user: bool | None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect from the API is a login page; following it would hand the token to it.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _get_json(url: str, credentials: Credentials, timeout: float) -> dict:
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", **credentials.headers()}
    )
    with opener.open(request, timeout=timeout) as response:
        body = response.read()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise _NotKfp(body[:80].decode("utf-8", "replace"))
    return data


class _NotKfp(Exception):
    pass


def parse_version(tag: str) -> tuple[int, ...] | None:
    """'2.14.0', 'v2.5.0-rc.1' -> (2, 14, 0), (2, 5, 0); 'unknown', 'master' -> None."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", tag or "")
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def backend_info(
    host: str, credentials: Credentials, timeout: float = HTTP_TIMEOUT_SECONDS
) -> Backend:
    """Ask the API server's healthz endpoint (v2beta1, else v1beta1) for its release tag.

    The API server answers {"tag_name", "commit_sha", "multi_user"}; the UI server, which
    proxies the API on the same address, answers {"apiServerTagName", ...}.
    """
    failure = None
    for api in ("v2beta1", "v1beta1"):
        url = f"{host}/apis/{api}/healthz"
        try:
            data = _get_json(url, credentials, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                failure = (
                    f"{host} has no Kubeflow Pipelines healthz endpoint (HTTP 404 for "
                    "/apis/v2beta1/healthz and /apis/v1beta1/healthz): is this the KFP address?"
                )
                continue  # a KFP 1.x server has only v1beta1
            failure = _http_failure(host, url, exc, credentials)
        except urllib.error.URLError as exc:
            failure = _unreachable(host, exc.reason)
        except (TimeoutError, OSError) as exc:
            failure = _unreachable(host, exc)
        except _NotKfp as exc:
            failure = (
                f"{url} does not answer like a Kubeflow Pipelines API (not JSON: {str(exc)!r}); "
                "is this the KFP address (the ml-pipeline-ui service, or its port-forward)?"
            )
        else:
            tag = str(data.get("tag_name") or data.get("apiServerTagName") or "")
            multi_user = data.get("multi_user", data.get("apiServerMultiUser"))
            return Backend(host=host, tag=tag, version=parse_version(tag), multi_user=multi_user)
        break
    # Raised outside the except blocks, so no chained exception carries a request's details.
    raise SubmitError(credentials.redact(failure))


def _unreachable(host: str, reason: object) -> str:
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return (
        f"cannot reach the Kubeflow Pipelines API at {host}: {text} (is the address right, "
        "and is the port-forward or VPN up?)"
    )


def _http_failure(host: str, url: str, exc: urllib.error.HTTPError, creds: Credentials) -> str:
    if exc.code in (301, 302, 303, 307, 308):
        where = exc.headers.get("Location", "elsewhere")
        return (
            f"{url} redirects to {where} (a login page?): set {TOKEN_ENV} to a token the "
            f"cluster accepts, or use an address that reaches the API directly"
        )
    if exc.code in (401, 403):
        return (
            f"the Kubeflow Pipelines API at {host} refused the credentials (HTTP {exc.code} "
            f"{exc.reason}; credentials from: {creds.source}): set {TOKEN_ENV} to a valid token"
        )
    return f"{url} answered HTTP {exc.code} {exc.reason}"


def check_backend(backend: Backend, minimum: tuple[int, ...] = MIN_BACKEND) -> None:
    """Refuse a backend older than `minimum`, or one that does not say its version."""
    need = ".".join(map(str, minimum))
    if backend.version is None:
        raise SubmitError(
            f"the Kubeflow Pipelines backend at {backend.host} does not say its version "
            f"(tag {backend.tag or 'missing'!r}); genreflow needs {need} or later "
            f"({MIN_BACKEND_WHY}). If you know it is new enough, add --skip-version-check"
        )
    if backend.version < tuple(minimum):
        raise BackendTooOld(
            f"the Kubeflow Pipelines backend at {backend.host} is {backend.tag}; genreflow's "
            f"pipeline needs {need} or later ({MIN_BACKEND_WHY}). Upgrade Kubeflow Pipelines"
        )


# --- the run -----------------------------------------------------------------------------
@dataclass
class SubmittedRun:
    """A run created on a backend: its id and address, and (after follow) its final state."""

    run_id: str
    url: str
    host: str = ""
    state: str = "PENDING"
    error: str = ""
    client: object = field(default=None, repr=False)
    credentials: Credentials = field(default_factory=lambda: Credentials("none"), repr=False)

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


def normalise_host(host: str) -> str:
    host = host.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", host):
        raise SubmitError(
            f"--host {host!r}: expected an http:// or https:// address, e.g. http://localhost:8080"
        )
    return host


def _kfp_client(host: str, credentials: Credentials, namespace: str | None):
    import warnings

    from kfp import Client

    kwargs: dict = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if credentials.token_path:
        # Re-reads the file before each request: the kubelet rotates projected tokens.
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(credentials.token_path)
    elif credentials.token:
        kwargs["existing_token"] = credentials.token
    with warnings.catch_warnings():
        # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": checked.
        warnings.simplefilter("ignore", FutureWarning)
        return Client(**kwargs)


@contextlib.contextmanager
def _kfp_calls(what: str, host: str, credentials: Credentials) -> Iterator[None]:
    """Turn what kfp and its HTTP stack raise into one SubmitError line, token redacted.

    kfp prints links on stdout; they go to stderr here, so stdout carries only our output.
    """
    from kfp_server_api.exceptions import ApiException

    failure = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except ApiException as exc:
        body = (exc.body or b"")[:300]
        body = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        failure = f"{what} at {host} failed: HTTP {exc.status} {exc.reason}: {body.strip()}"
    except (OSError, ValueError, TimeoutError) as exc:
        failure = f"{what} at {host} failed: {exc}"
    except Exception as exc:  # urllib3 and kfp raise many types for a lost connection
        if type(exc).__module__.split(".")[0] not in ("urllib3", "kfp", "kfp_server_api"):
            raise
        failure = f"{what} at {host} failed: {type(exc).__name__}: {exc}"
    if failure is not None:
        raise SubmitError(credentials.redact(" ".join(failure.split())))


def create_run(
    host: str,
    package: str | Path,
    arguments: Mapping[str, object],
    *,
    credentials: Credentials,
    namespace: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    service_account: str | None = None,
    pipeline_root: str | None = None,
    multi_user: bool | None = None,
) -> SubmittedRun:
    """Create one run of a compiled package on a KFP backend and return its id and address."""
    if multi_user and not namespace:
        raise SubmitError(
            f"the Kubeflow Pipelines backend at {host} is multi-user: pass --namespace "
            "(your Kubeflow profile's namespace)"
        )
    run_name = run_name or time.strftime(f"{PIPELINE_NAME}-%Y%m%d-%H%M%S")
    with _kfp_calls("connecting to Kubeflow Pipelines", host, credentials):
        client = _kfp_client(host, credentials, namespace)
    ui = (os.environ.get(UI_ENV) or host).rstrip("/")
    # The MLflow parent run links back to the KFP run's page.
    arguments = {"kfp_ui": ui, **arguments}
    with _kfp_calls(f"creating run {run_name!r}", host, credentials):
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            pipeline_root=pipeline_root,
            service_account=service_account,
        )
    return SubmittedRun(
        run_id=result.run_id,
        url=f"{ui}/#/runs/details/{result.run_id}",
        host=host,
        client=client,
        credentials=credentials,
    )


def follow(
    run: SubmittedRun,
    *,
    timeout: float,
    poll_seconds: float = 30.0,
    on_state: Callable[[str], None] | None = None,
) -> SubmittedRun:
    """Poll the run until it ends (SUCCEEDED, FAILED, SKIPPED, CANCELED) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last, failures = None, 0
    while True:
        try:
            with _kfp_calls(f"reading run {run.run_id}", run.host, run.credentials):
                info = run.client.get_run(run.run_id)
            failures = 0
        except SubmitError:
            failures += 1
            if failures >= WAIT_READ_FAILURES:
                raise
            info = None
        if info is not None:
            run.state = str(info.state or "PENDING").upper()
            error = getattr(info, "error", None)
            run.error = run.credentials.redact(str(getattr(error, "message", "") or ""))
            if run.state != last and on_state:
                on_state(run.state)
            last = run.state
            if run.state in FINAL_STATES:
                return run
        if time.monotonic() >= deadline:
            raise SubmitError(
                f"run {run.run_id} is still {run.state} after {timeout:.0f} s; it goes on "
                f"without us: {run.url}"
            )
        time.sleep(max(0.0, min(poll_seconds, deadline - time.monotonic())))


def submit(
    host: str,
    arguments: Mapping[str, object],
    *,
    namespace: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    service_account: str | None = None,
    pipeline_root: str | None = None,
    accelerator: str | None = None,
    no_tracking: bool = False,
    skip_version_check: bool = False,
    keep_package: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    on_created: Callable[[SubmittedRun], None] | None = None,
    wait: bool = False,
    timeout: float = 12 * 3600,
    poll_seconds: float = 30.0,
    on_state: Callable[[str], None] | None = None,
    **cluster,
) -> SubmittedRun:
    """Compile, check and submit one run; with `wait`, follow it to its end. `cluster` is
    compile_pipeline's: the images (image_cpu, image_gpu), parallelism, GPU placement, the
    MLflow Secret, the steps' resources, the run's time to live.

    Returns the run; `run.succeeded` says how it ended when waited for. Raises a
    GenreflowError (SubmitError for the submission's own) for anything that stops the
    submission, with a one-line message: among them no tracking URI (see
    tracked_arguments), no image a cluster can pull (compile.check_pullable), an
    accelerator named the Vertex way.
    """
    host = normalise_host(host)
    environ = os.environ if environ is None else environ
    arguments = tracked_arguments(arguments, environ=environ, no_tracking=no_tracking)
    arguments = {"cache_epoch": cache_epoch(), **arguments}
    accelerator = check_accelerator(accelerator, vertex=False)
    credentials = resolve_credentials(environ)
    with tempfile.TemporaryDirectory(prefix="genreflow-submit-") as tmp:
        package = compile_pipeline(
            Path(tmp) / f"{PIPELINE_NAME}.yaml", accelerator=accelerator, **cluster
        )
        typed = check_arguments(arguments, pipeline_parameters(package))
        if keep_package:
            Path(keep_package).parent.mkdir(parents=True, exist_ok=True)
            Path(keep_package).write_bytes(package.read_bytes())
        backend = backend_info(host, credentials)
        if not skip_version_check:
            check_backend(backend)
        run = create_run(
            host,
            package,
            typed,
            credentials=credentials,
            namespace=namespace,
            experiment=experiment,
            run_name=run_name,
            service_account=service_account,
            pipeline_root=pipeline_root,
            multi_user=backend.multi_user,
        )
    if on_created:
        on_created(run)
    if wait:
        follow(run, timeout=timeout, poll_seconds=poll_seconds, on_state=on_state)
    return run


# --- Vertex AI Pipelines -----------------------------------------------------------------
def submit_vertex(
    project_region: str,
    arguments: Mapping[str, object],
    *,
    pipeline_root: str | None,
    run_name: str | None = None,
    service_account: str | None = None,
    accelerator: str | None = None,
    no_tracking: bool = False,
    environ: Mapping[str, str] | None = None,
    on_created: Callable[[SubmittedRun], None] | None = None,
    wait: bool = False,
    **cluster,
) -> SubmittedRun:
    """The same run on Vertex AI Pipelines, through google-cloud-aiplatform when installed.

    Vertex takes its own accelerator names (accelerator="NVIDIA_L4", say) and a gs://
    pipeline root; it places GPU steps itself, so no node selector applies. Credentials are
    Google's application default credentials. `cluster`: as for submit.
    """
    project, _, region = project_region.partition("/")
    if not project or not region or "/" in region:
        raise SubmitError(f"--vertex {project_region!r}: expected PROJECT/REGION")
    if not (pipeline_root or "").startswith("gs://"):
        raise SubmitError("Vertex AI needs --pipeline-root gs://BUCKET/PATH for the run's outputs")
    environ = os.environ if environ is None else environ
    arguments = tracked_arguments(arguments, environ=environ, no_tracking=no_tracking)
    arguments = {"cache_epoch": cache_epoch(), **arguments}
    accelerator = check_accelerator(accelerator, vertex=True)
    try:
        from google.cloud import aiplatform
    except ImportError:
        raise SubmitError(
            "--vertex needs google-cloud-aiplatform, which is not installed "
            "(pip install google-cloud-aiplatform)"
        ) from None
    run_name = run_name or time.strftime(f"{PIPELINE_NAME}-%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="genreflow-submit-") as tmp:
        package = compile_pipeline(
            Path(tmp) / f"{PIPELINE_NAME}.yaml", accelerator=accelerator, **cluster
        )
        typed = check_arguments(arguments, pipeline_parameters(package))
        aiplatform.init(project=project, location=region)
        job = aiplatform.PipelineJob(
            display_name=run_name,
            template_path=str(package),
            parameter_values=typed,
            pipeline_root=pipeline_root,
        )
        job.submit(service_account=service_account)
    run = SubmittedRun(
        run_id=job.resource_name,
        url=(
            f"https://console.cloud.google.com/vertex-ai/locations/{region}/pipelines/runs/"
            f"{job.resource_name.rsplit('/', 1)[-1]}?project={project}"
        ),
    )
    if on_created:
        on_created(run)
    if wait:
        try:
            job.wait()
        except RuntimeError as exc:  # aiplatform raises it for a failed or cancelled job
            run.error = str(exc).splitlines()[0]
        run.state = job.state.name.removeprefix("PIPELINE_STATE_")
    return run
