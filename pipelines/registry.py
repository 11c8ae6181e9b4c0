"""The MLflow model registry: versions with lineage, aliases, and their history.

One registered model (`attnflow`, or `ATTNFLOW_MODEL_NAME`) holds every trained
version. Aliases say what is served: `champion` (all traffic) and `challenger` (the
candidate in a canary). Every alias move made through attnflow is appended to an
alias history (JSON lines in the state folder) that `attnflow history` prints,
because MLflow keeps only the current alias, not who held it before.

A model is fetched by URI (`models:/attnflow@champion`, `models:/attnflow/3`) or as a
local folder; an alias is resolved to a pinned version once, at fetch time, so a
service keeps serving the version it started with even if the alias moves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipelines.errors import AttnflowError, TransientError

log = logging.getLogger(__name__)

MODEL_NAME_ENV = "ATTNFLOW_MODEL_NAME"
STATE_ENV = "ATTNFLOW_STATE_DIR"
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
RETRIES_ENV = "ATTNFLOW_REGISTRY_RETRIES"  # retries after the first attempt (default 4)
BACKOFF_ENV = "ATTNFLOW_REGISTRY_BACKOFF_S"  # first wait; it doubles each retry (default 2)
# A version is created `pending` and marked `complete` once gated and aliased, so a
# registration cut short (the server went away) is found and finished by a rerun.
REGISTRATION_TAG = "attnflow.registration"
PENDING, COMPLETE = "pending", "complete"
T = TypeVar("T")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


class RegistryError(AttnflowError):
    """The registry cannot do what was asked (unknown alias, version, bad URI)."""


class RegistryUnavailable(TransientError):
    """The MLflow tracking server did not answer, even after retries with backoff."""


# How requests / urllib3 / MLflow word "the server is not there (or hangs)".
_UNREACHABLE = (  # the most specific first: the first one found is the reason given
    "Connection refused",
    "Read timed out",
    "timeout exception",
    "Connection aborted",
    "RemoteDisconnected",
    "Connection reset",
    "TEMPORARILY_UNAVAILABLE",
    "NewConnectionError",
    "Max retries exceeded",
)


def _unreachable_reason(exc: BaseException) -> str | None:
    """A short reason if `exc` means the server could not be reached, else None."""
    import requests

    text = str(getattr(exc, "message", "") or exc)
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return next((sign for sign in _UNREACHABLE if sign in text), type(exc).__name__)
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException | ConnectionError):
        if getattr(exc, "error_code", "") == "TEMPORARILY_UNAVAILABLE":
            return "TEMPORARILY_UNAVAILABLE"
        return next((sign for sign in _UNREACHABLE if sign in text), None)
    return None


def with_retries(what: str, fn: Callable[[], T], uri: str = "") -> T:
    """`fn()`, retried with exponential backoff while the tracking server is unreachable.

    Bounded by `ATTNFLOW_REGISTRY_RETRIES` and `ATTNFLOW_REGISTRY_BACKOFF_S`; any other
    error is raised at once. When the retries run out, one `RegistryUnavailable` (a
    transient error: exit code 75, orchestrators retry) says what could not be reached.
    """
    retries = max(0, int(os.environ.get(RETRIES_ENV, "4")))
    delay = max(0.0, float(os.environ.get(BACKOFF_ENV, "2")))
    started = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            reason = _unreachable_reason(exc)
            if reason is None:
                raise
            if attempt == retries:
                raise RegistryUnavailable(
                    f"the MLflow tracking server {uri or ''} is unreachable ({reason}) for "
                    f"{what}: gave up after {attempt + 1} attempts in "
                    f"{time.monotonic() - started:.1f} s; rerun once it is back, and the "
                    "registration resumes where it stopped"
                ) from None
            log.warning(
                "MLflow %s unreachable (%s) during %s; retry %d/%d in %.1f s",
                uri,
                reason,
                what,
                attempt + 1,
                retries,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
    raise AssertionError("unreachable")  # the loop returns or raises


class _RetryingClient:
    """An MlflowClient whose every call goes through `with_retries`; `raw` is the client."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.uri = raw._tracking_client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.raw, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return with_retries(name, lambda: attr(*args, **kwargs), self.uri)

        return call


def model_name() -> str:
    """The registered model's name."""
    return os.environ.get(MODEL_NAME_ENV, "attnflow")


def state_dir(root: Path = Path(".")) -> Path:
    """Where attnflow keeps run state (`ATTNFLOW_STATE_DIR`, default `<root>/.attnflow`)."""
    path = Path(os.environ.get(STATE_ENV) or Path(root) / ".attnflow")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class FetchedModel:
    """A model version materialised as a local folder."""

    folder: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None


def _client(root: Path = Path(".")) -> Any:
    """The project's MlflowClient, retrying while its server is unreachable."""
    from pipelines.tracking import client

    return _RetryingClient(client(root))


def resolve(uri: str, root: Path = Path(".")) -> tuple[str, str, str | None]:
    """`models:/name@alias` or `models:/name/version` -> (name, version, alias)."""
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(f"{uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = m.group("name"), m.group("alias"), m.group("version")
    mlc = _client(root)
    from mlflow.exceptions import MlflowException

    try:
        if alias:
            mv = mlc.get_model_version_by_alias(name, alias)
        else:
            mv = mlc.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {exc.message.splitlines()[0]}") from None
    return name, str(mv.version), alias


def _verify(folder: Path, source: str) -> None:
    """Refuse a fetched model whose files differ from its manifest (corrupt or tampered with).

    Checked here, before anything is started for it, so a corrupt version is refused
    by the rollout up front instead of by a model service that never gets ready.
    """
    from pipelines.model import ModelCorrupted, verify_model_files

    try:
        verify_model_files(folder)
    except ModelCorrupted as exc:
        raise ModelCorrupted(f"{source} is corrupt: {exc}") from None


def fetch_model(
    source: str | Path, root: Path = Path("."), dest: Path | None = None
) -> FetchedModel:
    """A local folder for `source`: a model folder as is, or a registry URI downloaded.

    The folder is the attnflow model (spec.json, weights.safetensors, ...), ready for
    `pipelines.inference.ServedModel.load`; nothing in it is unpickled. A registry
    version is checked against its manifest's SHA-256s (`ModelCorrupted` names the file).
    """
    source = str(source)
    if not source.startswith("models:/"):
        folder = Path(source)
        if not (folder / "spec.json").exists():
            raise RegistryError(f"{folder} is not an attnflow model folder (no spec.json)")
        return FetchedModel(folder=folder)
    name, version, alias = resolve(source, root)
    mlc = _client(root)
    mv = mlc.get_model_version(name, version)
    import mlflow

    target = Path(dest) if dest else state_dir(root) / "models" / f"{name}-v{version}"
    marker = target / ".complete"
    if not marker.exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        local = Path(
            with_retries(
                "download_artifacts",
                lambda: mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{name}/{version}",
                    dst_path=str(tmp),
                    tracking_uri=mlc.uri,
                ),
                mlc.uri,
            )
        )
        folder = next(p.parent for p in local.rglob("spec.json"))
        import shutil

        try:
            _verify(folder, source)
        except AttnflowError:
            shutil.rmtree(tmp, ignore_errors=True)  # never cached: a retry downloads afresh
            raise
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(folder), str(target))
        shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text(json.dumps({"name": name, "version": version}))
    else:
        _verify(target, source)  # the cached copy may have rotted since it was fetched
    return FetchedModel(folder=target, name=name, version=version, alias=alias, run_id=mv.run_id)


# --- alias history -------------------------------------------------------------------------


@dataclass
class AliasMove:
    """One alias change: which version the alias left and which it now points to."""

    ts: float
    alias: str
    version: str | None  # None: the alias was removed
    previous: str | None
    actor: str
    reason: str = ""


def history_path(root: Path = Path(".")) -> Path:
    return state_dir(root) / "alias_history.jsonl"


def record_move(move: AliasMove, root: Path = Path(".")) -> None:
    """Append one alias move to the history (one JSON object per line, fsynced)."""
    path = history_path(root)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(move)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_history(root: Path = Path(".")) -> list[AliasMove]:
    """Every recorded alias move, oldest first (a torn last line is skipped)."""
    path = history_path(root)
    if not path.exists():
        return []
    moves = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            moves.append(AliasMove(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            log.warning("skipping an unreadable line of %s", path)
    return moves


def get_alias(alias: str, name: str | None = None, root: Path = Path(".")) -> str | None:
    """The version an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(root).get_model_version_by_alias(name or model_name(), alias).version)
    except MlflowException:
        return None


def set_alias(
    alias: str,
    version: str | None,
    actor: str,
    reason: str = "",
    name: str | None = None,
    root: Path = Path("."),
) -> AliasMove:
    """Point `alias` at `version` (None removes it) and record the move."""
    name = name or model_name()
    mlc = _client(root)
    previous = get_alias(alias, name, root)
    if version is None:
        if previous is not None:
            mlc.delete_registered_model_alias(name, alias)
    else:
        mlc.set_registered_model_alias(name, alias, str(version))
    move = AliasMove(
        ts=time.time(),
        alias=alias,
        version=None if version is None else str(version),
        previous=previous,
        actor=actor,
        reason=reason,
    )
    record_move(move, root)
    return move


def _server_url(root: Path) -> str | None:
    """The tracking server's base URL when the tracking URI is one (else None)."""
    from pipelines.tracking import tracking_uri

    uri = tracking_uri(root)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def _rest_get(base: str, endpoint: str, **params: str) -> dict[str, Any] | None:
    """GET one MLflow REST endpoint; None when the resource does not exist.

    For the reads that run every minute (the reconciler): `requests` against the
    server costs milliseconds where importing `mlflow` for a client costs about 2 s
    of CPU. Authentication and TLS follow MLflow's own environment variables.
    """
    import requests

    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (
            os.environ["MLFLOW_TRACKING_USERNAME"],
            os.environ.get("MLFLOW_TRACKING_PASSWORD", ""),
        )
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or verify
    resp = requests.get(
        f"{base}/api/2.0/mlflow/{endpoint}",
        params=params,
        headers=headers,
        auth=auth,
        verify=verify,
        timeout=30,
    )
    if resp.status_code == 404 or (
        resp.status_code == 400 and "RESOURCE_DOES_NOT_EXIST" in resp.text
    ):
        return None
    if resp.status_code == 503:  # MLflow's TEMPORARILY_UNAVAILABLE: retried like a refusal
        raise requests.exceptions.ConnectionError("TEMPORARILY_UNAVAILABLE")
    resp.raise_for_status()
    return resp.json()


def _read(
    root: Path,
    endpoint: str,
    params: dict[str, str],
    from_body: Callable[[dict[str, Any]], dict[str, str]],
    from_client: Callable[[Any], dict[str, str]],
) -> dict[str, str]:
    """One registry read: over REST from a tracking server, else through MlflowClient.

    A resource that does not exist reads as {}.
    """
    base = _server_url(root)
    if base:
        body = with_retries(endpoint, lambda: _rest_get(base, endpoint, **params), base)
        return from_body(body or {})
    from mlflow.exceptions import MlflowException

    try:
        return from_client(_client(root))
    except MlflowException:
        return {}


def aliases(name: str | None = None, root: Path = Path(".")) -> dict[str, str]:
    """Current aliases of the registered model: {alias: version}."""
    name = name or model_name()
    return _read(
        root,
        "registered-models/get",
        {"name": name},
        lambda body: {
            a["alias"]: str(a["version"])
            for a in body.get("registered_model", {}).get("aliases", [])
        },
        lambda mlc: {a: str(v) for a, v in (mlc.get_registered_model(name).aliases or {}).items()},
    )


def version_tags(version: str, name: str | None = None, root: Path = Path(".")) -> dict[str, str]:
    """The tags of one model version ({} if it does not exist)."""
    name = name or model_name()
    return _read(
        root,
        "model-versions/get",
        {"name": name, "version": str(version)},
        lambda body: {
            t["key"]: t.get("value", "") for t in body.get("model_version", {}).get("tags", [])
        },
        lambda mlc: dict(mlc.get_model_version(name, str(version)).tags),
    )


def register(
    model_uri: str,
    run_id: str,
    tags: dict[str, Any],
    root: Path = Path("."),
    name: str | None = None,
) -> str:
    """Register a logged model as a new version with lineage tags; returns the version.

    Safe to retry: the version carries a one-off registration id, so a retry after a
    reply lost on the way back finds the version the server did create instead of
    creating a second one.
    """
    import uuid

    from mlflow.exceptions import MlflowException

    name = name or model_name()
    mlc = _client(root)
    try:
        mlc.get_registered_model(name)
    except MlflowException:
        try:
            mlc.raw.create_registered_model(name, description="attnflow attention-flow Transformer")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a concurrent register made it
                raise
    # A tracking server wants the logged model's id with a models:/<model id> source.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    token = uuid.uuid4().hex
    all_tags = {k: str(v)[:5000] for k, v in tags.items()}
    all_tags["attnflow.registration_id"] = token

    def create() -> str:
        # the request may have reached the server before the connection broke
        for mv in mlc.raw.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if mv.tags.get("attnflow.registration_id") == token:
                return str(mv.version)
        mv = mlc.raw.create_model_version(
            name, model_uri, run_id=run_id, tags=all_tags, model_id=model_id
        )
        return str(mv.version)

    return with_retries("create_model_version", create, mlc.uri)


def tag_version(
    version: str, tags: dict[str, Any], name: str | None = None, root: Path = Path(".")
) -> None:
    """Set tags on a model version (gate results, rollout outcome)."""
    mlc = _client(root)
    for k, v in tags.items():
        mlc.set_model_version_tag(name or model_name(), str(version), k, str(v)[:5000])


# --- the register stage --------------------------------------------------------------------


def lineage_tags(lineage: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, str]:
    """Tags every version carries: code, data, params digest and test metrics."""
    import hashlib

    params = json.dumps(lineage.get("params", {}), sort_keys=True)
    tags = {
        "git_commit": lineage.get("git_commit", "unknown"),
        "git_dirty": str(lineage.get("git_dirty", False)).lower(),
        "dvc_data_hash": lineage.get("dvc_data_hash") or "unknown",
        "data_sha256": lineage.get("data_sha256", "unknown"),
        "dataset": lineage.get("dataset", "unknown"),
        "params_sha256": hashlib.sha256(params.encode()).hexdigest(),
        "mlflow_run_id": lineage.get("mlflow_run_id", ""),
    }
    for key in ("hidden", "layers", "objective", "max_len"):
        value = lineage.get("params", {}).get("model", {}).get(key)
        if value is not None:
            tags[f"param.model.{key}"] = str(value)
    if evaluation:
        for proto in ("full", "sampled"):
            for k, v in evaluation["model"][proto].items():
                if k in ("ndcg@10", "hr@10", "mrr"):
                    tags[f"metric.test_{proto}_{k.replace('@', '_at_')}"] = f"{v:.6f}"
    return tags


def _gate_summary_from_tags(tags: dict[str, str]) -> dict[str, Any]:
    """The gate summary of an already registered version, read back from its tags."""
    metrics = {}
    for key, value in tags.items():
        if key.startswith("gate.") and key not in ("gate.passed", "gate.reason"):
            try:
                metrics[key.removeprefix("gate.").replace("_at_", "@")] = float(value)
            except ValueError:
                continue
    return {
        "passed": tags.get("gate.passed") == "true",
        "reasons": [tags.get("gate.reason", "")],
        "metrics": metrics,
    }


def _versions_of_run(run_id: str, name: str, root: Path) -> list[Any]:
    """Every version registered from training run `run_id`, newest first."""
    found = _client(root).search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def _is_complete(mv: Any) -> bool:
    # versions registered without register_candidate (or before the tag existed) are whole
    return mv.tags.get(REGISTRATION_TAG, COMPLETE) == COMPLETE


def register_candidate(
    cfg, root: Path = Path("."), actor: str = "attnflow register"
) -> dict[str, Any]:
    """Register the trained model, gate it, and give it `challenger` (or `champion` if first).

    A version that fails its gates is still registered (so the failure is on record,
    as tags) but gets no alias, and `GateFailed` is raised.

    Idempotent per training run: a version is created `pending` and marked `complete`
    only after its gate tags and alias are set. A rerun for the same run finishes a
    pending version (if the tracking server went away mid-way) instead of creating
    another, and returns a complete one as it is.
    """
    from pipelines.errors import DataError
    from pipelines.gates import GateFailed, gate_candidate
    from pipelines.gates import summary as gate_summary
    from pipelines.model import load_extra

    train_report = Path(root) / cfg.paths.reports_dir / "train.json"
    if not train_report.exists():
        raise DataError(f"{train_report} does not exist: run `attnflow train` first")
    trained = json.loads(train_report.read_text(encoding="utf-8"))
    model_dir = Path(root) / cfg.paths.model_dir
    lineage = load_extra(model_dir, "lineage")
    if lineage.get("mlflow_run_id") != trained.get("mlflow_run_id"):
        raise DataError(
            f"{model_dir} was not produced by the run in {train_report}; rerun `attnflow train`"
        )
    run_id, name = trained["mlflow_run_id"], model_name()
    existing = _versions_of_run(run_id, name, root)
    done = next((mv for mv in existing if _is_complete(mv)), None)
    if done is not None:
        version = str(done.version)
        log.info("run %s is already registered as v%s", run_id, version)
        summary = _gate_summary_from_tags(done.tags)
        if not summary["passed"]:
            raise GateFailed(f"version {version} failed its gates: {done.tags.get('gate.reason')}")
        now = {v: a for a, v in aliases(name, root).items()}
        return {
            "version": version,
            "champion": get_alias(CHAMPION, root=root),
            "gates": summary,
            "alias": now.get(version),
            "resumed": False,
            "already_registered": True,
        }
    pending = next((mv for mv in existing if not _is_complete(mv)), None)
    if pending is not None:
        version = str(pending.version)
        log.warning("v%s of run %s was left pending; finishing its registration", version, run_id)
    else:
        eval_path = Path(root) / cfg.paths.reports_dir / "evaluate.json"
        evaluation = json.loads(eval_path.read_text()) if eval_path.exists() else None
        tags = {**lineage_tags(lineage, evaluation), REGISTRATION_TAG: PENDING}
        version = register(trained["model_uri"], run_id, tags, root)
    champion = get_alias(CHAMPION, root=root)
    # A first model whose `champion` alias was set before the server went away is
    # gated like a first model again (against the baselines), not against itself.
    against = champion if champion not in (None, version) else None
    source = f"models:/{name}@{CHAMPION}" if against else None
    result = gate_candidate(cfg, root, model_dir, source)
    tag_version(version, result.tags(), root=root)
    out = {
        "version": version,
        "champion": champion,
        "gates": gate_summary(result),
        "resumed": pending is not None,
    }
    if not result.passed:
        tag_version(version, {REGISTRATION_TAG: COMPLETE}, root=root)
        raise GateFailed(f"version {version} failed its gates: {'; '.join(result.reasons)}")
    if champion is None:
        set_alias(
            CHAMPION,
            version,
            actor,
            "first model: passed the baseline gate and smoke check",
            root=root,
        )
        out["alias"] = CHAMPION
    elif champion == version:
        out["alias"] = CHAMPION  # set by the run that was cut short
    else:
        if get_alias(CHALLENGER, root=root) != version:
            set_alias(
                CHALLENGER,
                version,
                actor,
                f"passed offline gates vs champion v{champion}",
                root=root,
            )
        out["alias"] = CHALLENGER
    tag_version(version, {REGISTRATION_TAG: COMPLETE}, root=root)
    return out


def registered_version_of_run(
    run_id: str, root: Path = Path("."), name: str | None = None
) -> dict[str, Any] | None:
    """The version completely registered from training run `run_id`, with its alias, if any.

    A version left `pending` (registration cut short) does not count: the caller is
    expected to run `register_candidate` again, which finishes it.
    """
    from mlflow.exceptions import MlflowException

    name = name or model_name()
    try:
        found = [mv for mv in _versions_of_run(run_id, name, root) if _is_complete(mv)]
    except MlflowException:
        return None
    if not found:
        return None
    mv = found[0]
    now = {v: a for a, v in aliases(name, root).items()}
    return {
        "version": str(mv.version),
        "alias": now.get(str(mv.version)),
        "gate_passed": mv.tags.get("gate.passed"),
    }
