"""infra/: the compose file and the Kubernetes manifests of the scaled-out stack.

Nothing here starts a container (there is no Docker engine or cluster in CI). What can be
checked offline is checked:

- the compose file against the Compose Specification's JSON schema (as vendored by
  check-jsonschema), every Kubernetes manifest against the Kubernetes JSON schemas of
  the oldest and newest supported versions (bundled by kubernetes-validate, strict: an
  unknown field is an error), and `kubectl kustomize` output where kubectl exists;
- what matters for this stack: GPU reservations, the autoscaler's target, a healthcheck
  or probe on every long-running service, secrets only from infra/.env or the Secret;
- that both describe the same stack (commands, settings, volumes, ports) and refer to
  code, Dockerfiles, work pools and pins that exist in this repository.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import functools
import json
import re
import shutil
import subprocess
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
NAMESPACE = "attnflow"
SECRET_NAME = "attnflow-secrets"
CONFIG_NAME = "attnflow-config"
# The oldest Kubernetes release the manifests promise to work on, and the newest whose
# schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# Settings in infra/.env.example that are not secrets (compose-only knobs).
NOT_SECRET = {"ATTNFLOW_TAG", "NUM_GPUS"}
# An environment variable whose value is a credential.
SECRET_NAME_RE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ENCRYPTION_KEY|_USER$")
# A host:port inside a URL (scheme://[credentials@]host:port).
URL_RE = re.compile(r"[a-z0-9+]+://(?:[^@/\s]+@)?([A-Za-z0-9.-]+):(\d+)")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
CLUSTER_SCOPED = {"Namespace"}


# --- loading -----------------------------------------------------------------------------------


# Parsed once per session; tests that change a document change a deep copy.
@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text(encoding="utf-8"))


@functools.cache
def _k8s_docs(path: Path) -> list[dict[str, Any]]:
    docs = yaml.safe_load_all(path.read_text(encoding="utf-8"))
    return [d for d in docs if d]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def _k8s() -> list[dict[str, Any]]:
    """Every resource the stack applies (kustomization resources; not the Secret example)."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    return [doc for name in kust["resources"] for doc in _k8s_docs(K8S / name)]


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _secret_example() -> dict[str, str]:
    (secret,) = _k8s_docs(K8S / "secrets.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    return {k: str(v) for k, v in secret["stringData"].items()}


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOAD_KINDS}


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(workload)["containers"]
    return container


def _selects(service: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return service["spec"]["selector"].items() <= labels.items()


def _configmap(docs: list[dict[str, Any]]) -> dict[str, str]:
    return _find(docs, "ConfigMap", CONFIG_NAME)["data"]


def _k8s_env(container: dict[str, Any], config: dict[str, str]) -> dict[str, Any]:
    """Name -> value (ConfigMap references resolved; Secret references as ("secret", key))."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == CONFIG_NAME
        env.update(config)
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {})
        if "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["name"] == SECRET_NAME
            env[entry["name"]] = ("secret", ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            assert ref["configMapKeyRef"]["name"] == CONFIG_NAME
            env[entry["name"]] = config[ref["configMapKeyRef"]["key"]]
        else:
            env[entry["name"]] = entry["value"]
    return env


def _argv_compose(service: dict[str, Any]) -> list[str]:
    def as_list(v):
        return [] if v is None else [v] if isinstance(v, str) else list(v)

    return as_list(service.get("entrypoint")) + as_list(service.get("command"))


def _argv_k8s(container: dict[str, Any]) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def _normalise(text: str) -> str:
    """Compose's ${VAR...} and $$, Kubernetes' $(VAR): both as {VAR}, to compare them."""
    text = re.sub(r"(?<!\$)\$\{(\w+)[^}]*\}", r"{\1}", text)
    text = re.sub(r"\$\((\w+)\)", r"{\1}", text)
    return text.replace("$$", "$")


def _compose_refs(text: str) -> set[str]:
    """Variables compose interpolates in `text` ($$ is a literal dollar)."""
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{?(\w+)", text))


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("attnflow/")
    }


# --- schemas -----------------------------------------------------------------------------------


@functools.cache
def _compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))


def _compose_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(_compose_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_compose_matches_the_compose_specification():
    assert _compose_errors(_compose()) == []


def test_compose_schema_check_catches_mistakes():
    # the check is only worth something if it can fail: a misspelt key, a wrong type
    bad = copy.deepcopy(_compose())
    bad["services"]["gateway"]["helthcheck"] = bad["services"]["gateway"].pop("healthcheck")
    bad["services"]["postgres"]["depends_on"] = {"minio": {"condition": "when_ready"}}
    errors = _compose_errors(bad)
    assert any("helthcheck" in e for e in errors), errors
    assert any("when_ready" in e for e in errors), errors


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_k8s_manifests_match_the_kubernetes_schemas(path, version):
    docs = _k8s_docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc}")


def test_k8s_schema_check_catches_mistakes():
    deployment = copy.deepcopy(_workloads(_k8s())["gateway"])
    _container(deployment)["readinesProbe"] = _container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(_workloads(_k8s())["gateway"])
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_example():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kust["kind"] == "Kustomization" and kust["namespace"] == NAMESPACE
    expected = {p.name for p in _manifest_files()} - {"secrets.example.yaml"}
    assert sorted(kust["resources"]) == sorted(expected)
    for doc in _k8s():
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]
    # every image the manifests run can be retargeted at a registry from one place
    images = {_container(w)["image"].split(":")[0] for w in _workloads(_k8s()).values()}
    managed = {i["name"] for i in kust["images"]}
    assert {i for i in images if i.startswith("attnflow/")} == managed


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_build_renders_valid_manifests():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(_k8s())
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "attnflow"


# --- what matters ------------------------------------------------------------------------------


def test_every_long_running_compose_service_has_a_healthcheck():
    for name, svc in _compose()["services"].items():
        if svc.get("restart") == "no":  # a one-shot job: others wait for it to complete
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"


def test_every_k8s_container_has_probes():
    docs = _k8s()
    services = [d for d in docs if d["kind"] == "Service"]
    for name, workload in _workloads(docs).items():
        if workload["kind"] == "Job":
            continue
        container = _container(workload)
        assert "livenessProbe" in container, f"{name} has no liveness probe"
        # behind a Service: only ready pods may get traffic
        if any(_selects(s, workload) for s in services):
            assert "readinessProbe" in container, f"{name} has no readiness probe"


def test_model_services_probe_readyz_and_livez():
    docs = _k8s()
    for name in ("model-champion", "model-challenger"):
        container = _container(_workloads(docs)[name])
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["limits"]["memory"]


def test_compose_gpu_worker_reserves_nvidia_gpus():
    svc = _compose()["services"]["worker-gpu"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # torchrun starts as many processes as the worker reserves GPUs
    assert _compose_refs(str(device["count"])) == {"NUM_GPUS"}
    assert device["count"] == svc["environment"]["NUM_GPUS"]
    assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile.gpu"
    assert svc["profiles"] == ["gpu"]  # a host without GPUs can bring the rest up
    assert svc["shm_size"]  # NCCL needs more /dev/shm than Docker's 64 MB
    assert svc["command"][:6] == ["prefect", "worker", "start", "--pool", "gpu", "--type"]


def test_k8s_gpu_worker_lands_on_a_gpu_node_with_its_gpus():
    workload = _workloads(_k8s())["worker-gpu"]
    pod, container = _pod(workload), _container(workload)
    assert any(key.startswith("nvidia.com/gpu") for key in pod["nodeSelector"])
    taints = {(t["key"], t["effect"]) for t in pod["tolerations"]}
    assert ("nvidia.com/gpu", "NoSchedule") in taints
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1
    assert container["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus
    env = _k8s_env(container, _configmap(_k8s()))
    assert int(env["NUM_GPUS"]) == int(gpus)
    shm = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["image"].startswith("attnflow/app-gpu:")
    assert workload["spec"]["strategy"]["type"] == "Recreate"


def test_hpa_scales_the_champion_model_service():
    docs = _k8s()
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] == "model-champion"
    workload = _find(docs, "Deployment", target["name"])
    assert _argv_k8s(_container(workload))[:3] == [
        "bentoml",
        "serve",
        "services.model_service:ModelService",
    ]
    # the autoscaler owns the replica count; CPU utilisation is relative to the request
    assert "replicas" not in workload["spec"]
    assert _container(workload)["resources"]["requests"]["cpu"]
    metric = hpa["spec"]["metrics"][0]["resource"]
    assert metric["name"] == "cpu" and 0 < metric["target"]["averageUtilization"] <= 100
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_challenger_is_off_by_default():
    assert _workloads(_k8s())["model-challenger"]["spec"]["replicas"] == 0
    assert _compose()["services"]["model-challenger"]["profiles"] == ["challenger"]


def test_gateway_is_a_single_replica():
    # canary weight and window stats live in the process; admin calls must reach all of it
    assert _workloads(_k8s())["gateway"]["spec"]["replicas"] == 1


# --- secrets -----------------------------------------------------------------------------------


def test_compose_takes_every_secret_from_the_env_file():
    compose = _compose()
    declared = set(_env_example())
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME_RE.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}: {key}={value}"
        for text in _strings(svc):
            for host in URL_RE.finditer(text):
                creds = text[: host.start(1)].rpartition("://")[2]
                if creds:  # credentials in a URL come from variables, never literals
                    assert re.fullmatch(r"(\$\{[^}]+\}:?)+@", creds), f"{name}: {text}"
    used = set()
    for text in _strings(compose):
        used |= _compose_refs(text)
    # every interpolated variable is declared in the example (a forgotten $$ shows up here)
    assert used <= declared, f"not in infra/.env.example: {sorted(used - declared)}"
    assert declared <= used, f"unused in compose.yaml: {sorted(declared - used)}"


def test_k8s_takes_every_secret_from_the_secret():
    docs = _k8s()
    config = _configmap(docs)
    secret_keys = set(_secret_example())
    assert not [k for k in config if SECRET_NAME_RE.search(k)], "a secret in the ConfigMap"
    for name, workload in _workloads(docs).items():
        container = _container(workload)
        env = _k8s_env(container, config)
        for key, value in env.items():
            if SECRET_NAME_RE.search(key):
                assert isinstance(value, tuple), f"{name}: {key} is not from the Secret"
                assert value[1] in secret_keys, f"{name}: {key} -> unknown key {value[1]}"
        defined: list[str] = []
        for entry in container.get("env", []):
            refs = re.findall(r"\$\((\w+)\)", entry.get("value", ""))
            # Kubernetes expands $(VAR) only from entries defined earlier in the list
            assert set(refs) <= set(defined), f"{name}: {entry['name']} uses {refs}"
            defined.append(entry["name"])
        for arg in _argv_k8s(container):
            assert set(re.findall(r"\$\((\w+)\)", arg)) <= set(env), f"{name}: {arg}"
        for text in _argv_k8s(container) + [str(v) for v in env.values()]:
            for host in URL_RE.finditer(text):
                creds = text[: host.start(1)].rpartition("://")[2]
                if creds:
                    assert re.fullmatch(r"(\$\(\w+\):?)+@", creds), f"{name}: {text}"


def test_secret_example_and_env_example_hold_the_same_placeholders():
    env, secret = _env_example(), _secret_example()
    assert set(secret) == set(env) - NOT_SECRET
    for key, value in secret.items():
        assert env[key] == value, key
        if key != "POSTGRES_USER":  # a name, not a credential
            assert value.startswith("change-me"), f"{key} is not a placeholder"
    # the example is kept out of `kubectl apply -k` so it can never replace the real one
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "secrets.example.yaml" not in kust["resources"]


def test_the_real_env_file_is_never_committed():
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "infra/.env"], cwd=REPO, capture_output=True
    )
    assert ignored.returncode == 0, "infra/.env is not git-ignored"
    tracked = subprocess.run(
        ["git", "ls-files", "infra/.env", "infra/k8s/secrets.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert tracked.stdout == ""
    for ignore in ("Dockerfile.dockerignore", "Dockerfile.gpu.dockerignore"):
        patterns = (INFRA / "docker" / ignore).read_text(encoding="utf-8").splitlines()
        assert {"infra/.env", "**/.env", ".venv", "data", ".attnflow"} <= set(patterns)


# --- the two descriptions agree ----------------------------------------------------------------


def test_compose_and_k8s_run_the_same_components():
    compose, workloads = _compose(), _workloads(_k8s())
    assert set(compose["services"]) == set(workloads)


@pytest.mark.parametrize("name", sorted(_compose()["services"]))
def test_compose_and_k8s_run_the_same_command(name):
    svc, container = _compose()["services"][name], _container(_workloads(_k8s())[name])
    compose_argv = [_normalise(a) for a in _argv_compose(svc)]
    k8s_argv = [_normalise(a) for a in _argv_k8s(container)]
    assert compose_argv == k8s_argv
    image = container["image"].split(":")[0]
    assert str(svc["image"]).split(":")[0] == image


@pytest.mark.parametrize("name", sorted(_app_services(_compose())))
def test_compose_and_k8s_give_the_same_settings(name):
    docs = _k8s()
    svc, container = _compose()["services"][name], _container(_workloads(docs)[name])
    config = _configmap(docs)
    compose_env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
    k8s_env = _k8s_env(container, config)
    missing = set(compose_env) - set(k8s_env)
    assert not missing, f"{name}: only in compose: {sorted(missing)}"
    # Kubernetes-only entries: the shared ConfigMap, and Secret values that other entries
    # or the arguments use as $(VAR) where compose interpolates ${VAR} directly
    expanded = set(re.findall(r"\$\((\w+)\)", " ".join(_argv_k8s(container) + _strings(k8s_env))))
    extra = set(k8s_env) - set(compose_env) - set(config) - expanded
    assert not extra, f"{name}: only in Kubernetes: {sorted(extra)}"
    for key in expanded:
        assert isinstance(k8s_env[key], tuple), f"{name}: $({key}) is not from the Secret"
        assert key in _compose_refs(" ".join(_strings(svc))), f"{name}: compose lacks ${{{key}}}"
    for key, value in compose_env.items():
        theirs = k8s_env[key]
        if isinstance(theirs, tuple):  # a Secret reference: compose must read the same var
            assert _compose_refs(value) == {theirs[1]}, f"{name}: {key}"
        elif key == "MLFLOW_SERVER_ALLOWED_HOSTS":  # k8s adds the cluster DNS names
            assert set(value.split(",")) <= set(theirs.split(","))
        else:
            default = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
            ours = default.group(1) if default else value
            assert _normalise(ours) == _normalise(theirs), f"{name}: {key}"


@pytest.mark.parametrize("name", sorted(_app_services(_compose())))
def test_compose_and_k8s_mount_the_same_paths(name):
    svc, workload = _compose()["services"][name], _workloads(_k8s())[name]
    compose_paths = {v.split(":")[1] for v in svc.get("volumes", [])}
    k8s_paths = {m["mountPath"] for m in _container(workload).get("volumeMounts", [])}
    assert compose_paths == k8s_paths - {"/dev/shm"}  # compose sizes /dev/shm with shm_size


def _host_allowed(allowed: str, host: str) -> bool:
    # MLflow 3's Host-header check (mlflow/server/security_utils.py, is_allowed_host_header):
    # a pattern with `*` is matched with fnmatch, any other must be equal.
    patterns = [p.strip() for p in allowed.split(",")]
    return any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in patterns)


def test_mlflow_accepts_the_host_names_its_clients_send():
    compose, docs = _compose(), _k8s()
    config = _configmap(docs)
    ours = compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    theirs = _k8s_env(_container(_workloads(docs)["mlflow"]), config)
    clients = {
        urlsplit(str(v)).netloc
        for svc in compose["services"].values()
        for k, v in (svc.get("environment") or {}).items()
        if k == "MLFLOW_TRACKING_URI"
    }
    assert clients == {"mlflow:5000"}
    for host in clients | {"localhost:5000", "127.0.0.1:5000"}:  # + the published UI
        assert _host_allowed(ours, host), host
    in_cluster = {
        urlsplit(config["MLFLOW_TRACKING_URI"]).netloc,
        "mlflow.attnflow.svc.cluster.local:5000",
        "localhost:5000",  # kubectl port-forward
    }
    for host in in_cluster:
        assert _host_allowed(theirs["MLFLOW_SERVER_ALLOWED_HOSTS"], host), host
    assert not _host_allowed(ours, "evil.example.com:5000")  # the guard is still on


def test_postgres_init_creates_the_databases_the_servers_use():
    sql = (INFRA / "postgres" / "init.sql").read_text(encoding="utf-8")
    created = set(re.findall(r"CREATE DATABASE (\w+);", sql))
    used = set()
    for text in _strings(_compose()) + _strings(_k8s()):
        used |= set(re.findall(r"postgresql\+\w+://\S+@postgres:5432/(\w+)", text))
    assert created == used == {"mlflow", "prefect"}
    init = _find(_k8s(), "ConfigMap", "postgres-init")["data"]
    assert list(init.values()) == [sql]  # the inlined copy has not drifted


def test_minio_init_creates_the_buckets_the_stack_uses():
    used = set()
    for text in _strings(_compose()) + _strings(_k8s()):
        used |= set(re.findall(r"s3://([a-z0-9.-]+)", text))
    assert used == {"mlflow-artifacts", "dvc"}
    scripts = [
        _argv_compose(_compose()["services"]["minio-init"])[-1],
        _argv_k8s(_container(_workloads(_k8s())["minio-init"]))[-1],
    ]
    for script in scripts:
        made = re.search(r"mc mb --ignore-existing (.+)", script).group(1).split()
        assert {m.removeprefix("local/") for m in made} == used


def test_urls_name_services_and_ports_that_exist():
    docs = _k8s()
    service_ports = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]}
        for s in docs
        if s["kind"] == "Service"
    }
    compose = _compose()
    texts = _strings(compose["services"]) + _strings([d for d in docs if d["kind"] != "Service"])
    seen = set()
    for text in texts:
        for match in URL_RE.finditer(text):
            host, port = match.group(1), int(match.group(2))
            if host in LOCAL_HOSTS:
                continue
            seen.add(host)
            assert host in compose["services"], f"no compose service {host}: {text}"
            assert port in service_ports.get(host, set()), f"no Service {host}:{port}: {text}"
    assert {"postgres", "minio", "mlflow", "prefect", "model-champion"} <= seen


def test_k8s_service_ports_reach_their_containers():
    docs = _k8s()
    workloads = _workloads(docs)
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"]
        selected = [w for w in workloads.values() if _selects(svc, w)]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        ports = {p["name"]: p["containerPort"] for p in _container(selected[0])["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: no container port {port['targetPort']}"
            assert ports[port["targetPort"]] == port["port"], name
        argv = _argv_k8s(_container(selected[0]))
        if "--port" in argv:
            assert int(argv[argv.index("--port") + 1]) in ports.values(), name


def test_compose_healthchecks_probe_the_port_the_service_listens_on():
    for name, svc in _compose()["services"].items():
        argv = _argv_compose(svc)
        if "--port" not in argv:
            continue
        port = argv[argv.index("--port") + 1]
        probe = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/" in probe, f"{name} listens on {port}: {probe}"


def test_compose_wiring():
    compose = _compose()
    services = compose["services"]
    assert list(compose["networks"]) == ["attnflow"]  # one network, every service on it
    declared_volumes = set(compose["volumes"])
    used_volumes = set()
    for name, svc in services.items():
        assert svc["networks"] == ["attnflow"], name
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            # a dependency in a profile would make `up` refuse to start this service
            assert not services[dep].get("profiles"), f"{name} depends on optional {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is not a one-shot job"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount of a file of this repository
                assert (INFRA / source).is_file(), f"{name} mounts missing {source}"
            else:
                used_volumes.add(source)
    assert used_volumes == declared_volumes


# --- references into the repository ------------------------------------------------------------


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return any(isinstance(n, kinds) and n.name == name for n in tree.body)


def _runs_main(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))


def test_commands_run_code_that_exists():
    pools = {d["work_pool"]["name"] for d in _prefect_yaml()["deployments"]}
    for name, svc in _compose()["services"].items():
        argv = _argv_compose(svc)
        if argv[:2] == ["python", "-m"]:
            module = REPO / (argv[2].replace(".", "/") + ".py")
            assert module.is_file() and _runs_main(module), f"{name}: {argv[2]}"
        if argv[:2] == ["bentoml", "serve"]:
            module, _, cls = argv[2].partition(":")
            path = REPO / (module.replace(".", "/") + ".py")
            assert path.is_file() and _defines(path, cls), f"{name}: {argv[2]}"
        if argv[:3] == ["prefect", "worker", "start"]:
            assert argv[argv.index("--pool") + 1] in pools, f"{name}: unknown pool"
            assert argv[argv.index("--type") + 1] == "process"
    workers = {
        svc["command"][svc["command"].index("--pool") + 1]
        for svc in _compose()["services"].values()
        if svc.get("command", [])[:3] == ["prefect", "worker", "start"]
    }
    assert workers == pools  # every pool of prefect.yaml has a worker
    script = _argv_compose(_compose()["services"]["prefect-deploy"])[-1]
    created = set(re.search(r"for pool in ([\w ]+);", script).group(1).split())
    assert created == pools  # and exists before `prefect deploy --all` needs it


def test_prefect_deployments_point_at_flows_that_exist():
    for deployment in _prefect_yaml()["deployments"]:
        path, _, func = deployment["entrypoint"].partition(":")
        assert (REPO / path).is_file() and _defines(REPO / path, func), deployment["entrypoint"]


def test_torchrun_command_of_the_readme_runs_the_cli():
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    assert "torchrun --standalone --nproc_per_node=$NUM_GPUS -m attnflow.cli train" in readme
    cli = REPO / "attnflow" / "cli.py"
    assert _runs_main(cli) and _defines(cli, "train")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["attnflow"] == "attnflow.cli:app"


def _pins() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {}
    for requirement in pyproject["project"]["dependencies"]:
        name, sep, version = requirement.partition("==")
        if sep:
            pins[name.strip()] = version.strip()
    return pins


def _dockerfile(path: Path) -> dict[str, Any]:
    lines = path.read_text(encoding="utf-8").splitlines()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    return {
        "from": re.findall(r"^FROM (\S+)", "\n".join(lines), re.M),
        "args": args,
        # with ${ARG} references resolved to the ARG defaults
        "user": [
            re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)
            for user in re.findall(r"^USER (\S+)", "\n".join(lines), re.M)
        ],
        "copy": re.findall(r"^COPY (?:--\S+ )*(\S+) ", "\n".join(lines), re.M),
    }


def test_images_are_built_from_dockerfiles_that_exist():
    pins = _pins()
    built, uids = {}, {}
    for name, svc in _compose()["services"].items():
        if "build" not in svc:
            assert "${" not in svc["image"] and ":" in svc["image"], f"{name}: unpinned image"
            assert not svc["image"].endswith(":latest"), name
            continue
        context = (INFRA / svc["build"]["context"]).resolve()
        dockerfile = context / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        image = str(svc["image"]).split(":")[0]
        assert built.setdefault(image, dockerfile) == dockerfile, f"{image}: two Dockerfiles"
        spec = _dockerfile(dockerfile)
        assert spec["user"], f"{dockerfile.name} runs as root"
        user = spec["user"][-1]
        # numeric and not 0: Kubernetes can only verify runAsNonRoot for a numeric user
        assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"{dockerfile.name}: USER {user}"
        uids[image] = int(user.split(":")[0])
        for base in spec["from"]:
            assert ":" in base and not base.endswith(":latest"), f"{dockerfile.name}: {base}"
        for source in spec["copy"]:
            assert (context / source).exists(), f"{dockerfile.name}: COPY {source}"
        # the image installs what pyproject.toml pins
        for arg, package in (("TORCH_VERSION", "torch"), ("MLFLOW_VERSION", "mlflow")):
            if arg in spec["args"]:
                assert spec["args"][arg] == pins[package], f"{dockerfile.name}: {arg}"
    assert set(built) == {"attnflow/app", "attnflow/app-gpu", "attnflow/mlflow"}
    assert "TORCH_VERSION" in _dockerfile(built["attnflow/app"])["args"]
    assert "TORCH_VERSION" in _dockerfile(built["attnflow/app-gpu"])["args"]
    assert "MLFLOW_VERSION" in _dockerfile(built["attnflow/mlflow"])["args"]
    # the k8s images are the ones compose builds, run as the user the image was made for
    for name, workload in _workloads(_k8s()).items():
        image = _container(workload)["image"].split(":")[0]
        if image.startswith("attnflow/"):
            assert image in built, image
            assert _pod(workload)["securityContext"]["runAsUser"] == uids[image], name
        assert _pod(workload)["securityContext"]["runAsNonRoot"] is True, name


def test_both_application_images_filter_their_build_context_alike():
    def patterns(name: str) -> list[str]:
        text = (INFRA / "docker" / name).read_text(encoding="utf-8")
        return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]

    assert patterns("Dockerfile.dockerignore") == patterns("Dockerfile.gpu.dockerignore")
