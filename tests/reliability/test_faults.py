"""Fault injection with real components: each fault is caused for real, never mocked.

- the MLflow tracking server dies while a model is registered (a real `mlflow server`);
- the DVC remote is unreachable for `attnflow data push` (real DVC, an S3 endpoint on a
  closed port);
- the feedback log's disk fills up under a real model service (a real tmpfs);
- a model's weights are corrupted on disk and in the registry's artifact store;
- a DVC cache object is corrupted (`attnflow data verify` names it).

Each test states what must hold after the fault: a clear one-line error, nothing lost,
nothing half done, and recovery once the fault is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_repo, venv_env

ATTNFLOW = str(Path(sys.executable).parent / "attnflow")


def _cli(
    args: list[str], cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`attnflow <args>` in `cwd`, as an operator would run it."""
    return subprocess.run(
        [ATTNFLOW, *args],
        cwd=cwd,
        env=venv_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt one byte of `path` in place (the middle one by default)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _tree_digest(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under `folders`, by path: what must survive a fault unchanged."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# --- DVC: an unreachable remote, a corrupted cache object ----------------------------------------


@pytest.fixture(scope="module")
def data_clone(tmp_path_factory) -> Path:
    """A copy of the repository whose data stages (ingest, validate, split) ran on small data."""
    root = copy_repo(tmp_path_factory.mktemp("faults-clone"))
    (root / "dvc.lock").unlink(missing_ok=True)  # this clone's own data versions only
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["dataset"] = "synthetic"
    params["ingest"]["synthetic"].update(n_users=200, n_items=80, events_per_user=12)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "split"],
        cwd=root,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return root


def test_push_to_an_unreachable_remote_fails_clearly_and_loses_nothing(data_clone):
    """`attnflow data push` to an S3 endpoint nobody listens on: one line, non-zero, data intact."""
    from services.launch import free_port

    root = data_clone
    watched = (root / "data", root / ".dvc" / "cache")
    before = _tree_digest(*watched)
    assert any("/data/split/" in p for p in before) and any("/cache/" in p for p in before)
    proc = _cli(
        ["data", "push"],
        root,
        timeout=240,
        ATTNFLOW_DVC_REMOTE="s3://attnflow-faults/data",
        ATTNFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",  # closed: nothing listens
        AWS_ACCESS_KEY_ID="faults",
        AWS_SECRET_ACCESS_KEY="faults-secret",
        AWS_MAX_ATTEMPTS="2",
    )
    assert proc.returncode == 75, proc.stderr  # transient: an orchestrator retries it
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert "remote is unreachable" in errors[0] and "127.0.0.1" in errors[0], errors[0]
    assert _tree_digest(*watched) == before  # nothing in the workspace or the cache changed
    assert (
        "Data and pipelines are up to date"
        in subprocess.run(
            [sys.executable, "-m", "dvc", "status", "ingest", "validate", "split"],
            cwd=root,
            env=venv_env(),
            capture_output=True,
            text=True,
        ).stdout
    )


def test_warm_push_to_an_unreachable_remote_is_transient_and_loses_nothing(data_clone, monkeypatch):
    """The retrain flow's push through DVC's API: the same closed endpoint is a
    TransientError naming it (the flow reports it and carries on), data intact."""
    from pipelines.errors import TransientError
    from pipelines.versioning import push_in_process
    from services.launch import free_port

    root = data_clone
    watched = (root / "data", root / ".dvc" / "cache")
    before = _tree_digest(*watched)
    endpoint = f"http://127.0.0.1:{free_port()}"
    for key, value in {
        "ATTNFLOW_DVC_REMOTE": "s3://attnflow-faults/data",
        "ATTNFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "faults",
        "AWS_SECRET_ACCESS_KEY": "faults-secret",
        "AWS_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TransientError, match="remote is unreachable") as failed:
        push_in_process(root)
    assert endpoint in str(failed.value)
    assert _tree_digest(*watched) == before


def test_data_verify_names_a_corrupted_cache_object(data_clone):
    """A healthy cache passes; one flipped byte in a file inside `data/split` is named, exit 3."""
    root = data_clone
    ok = _cli(["data", "verify"], root)
    assert ok.returncode == 0, ok.stderr
    assert "cache ok" in ok.stdout

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    split = next(o for o in lock["stages"]["split"]["outs"] if o["path"] == "data/split")
    cache = root / ".dvc" / "cache" / "files" / "md5"
    manifest = json.loads((cache / split["md5"][:2] / split["md5"][2:]).read_text())
    victim = max(manifest, key=lambda e: e["relpath"])  # any file of the directory output
    obj = cache / victim["md5"][:2] / victim["md5"][2:]
    # DVC may hardlink or protect cache objects: write a new file in its place.
    data = bytearray(obj.read_bytes())
    obj.chmod(0o644)
    obj.unlink()
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))

    bad = _cli(["data", "verify"], root)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, bad.stderr
    assert f"data/split/{victim['relpath']}" in lines[0] and str(obj) in lines[0]
    assert victim["md5"] in lines[0]


# --- MLflow: the tracking server goes away while a model is registered ----------------------------


def _start_mlflow(root: Path, port: int):
    """A real `mlflow server` on 127.0.0.1:`port` over `root`'s SQLite file and artifacts."""
    import httpx

    from tests.conftest import spawn_mlflow

    handle = spawn_mlflow(root, port)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{handle.url}/health", timeout=2, trust_env=False).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        assert handle.alive(), handle.log_tail()
        time.sleep(0.3)
    handle.kill()
    raise AssertionError(f"mlflow server not up after 120 s:\n{handle.log_tail()}")


@pytest.fixture
def mlflow_project(tmp_path, monkeypatch):
    """A project folder with a tiny synthetic split, talking to its own MLflow server."""
    from pipelines.config import SyntheticConfig
    from services.launch import free_port
    from tests.model.conftest import make_split

    make_split(
        tmp_path / "data" / "split",
        SyntheticConfig(
            n_users=200, n_items=80, n_topics=4, events_per_user=12, pattern_prob=0.7, seed=11
        ),
    )
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "MLFLOW_TRACKING_URI": url,
        "ATTNFLOW_STATE_DIR": str(tmp_path / ".attnflow"),
        "ATTNFLOW_MODEL_NAME": "attnflow-faults",
        # attnflow's own retries are what is under test: MLflow's are switched off,
        # and a hung server answers nothing within 3 s
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
        "ATTNFLOW_REGISTRY_RETRIES": "3",
        "ATTNFLOW_REGISTRY_BACKOFF_S": "0.2",
    }.items():
        monkeypatch.setenv(key, value)
    servers = [_start_mlflow(tmp_path, port)]
    try:
        yield {"root": tmp_path, "port": port, "url": url, "servers": servers}
    finally:
        for server in servers:
            if server.alive():
                os.killpg(server.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
                server.kill()


def _train_tiny(root: Path):
    """One epoch through the real train stage: reports/train.json, the model, an MLflow run."""
    from pipelines import train
    from tests.model.conftest import small_config

    cfg = small_config(**{"train.epochs": 1, "ingest.dataset": "synthetic"})
    train.run(cfg, root)
    return cfg, json.loads((root / "reports" / "train.json").read_text())["mlflow_run_id"]


def _versions_in_db(root: Path) -> list[tuple[str, int]]:
    """(name, version) rows of the server's backend store, read directly."""
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("SELECT name, version FROM model_versions").fetchall()


# Two MLflow server starts, a training run and a CLI start: about 100 s on 2 loaded cores.
@pytest.mark.slow
def test_registration_survives_the_tracking_server_dying(mlflow_project, caplog):
    """Hung mid-way, then down: retried with backoff, one clear error (75 via the CLI).
    Back on the same store: nothing half registered; a rerun finishes the same version once."""
    from mlflow import MlflowClient

    from pipelines.registry import (
        CHAMPION,
        COMPLETE,
        PENDING,
        REGISTRATION_TAG,
        RegistryUnavailable,
        aliases,
        register_candidate,
        registered_version_of_run,
    )

    root, port, servers = mlflow_project["root"], mlflow_project["port"], mlflow_project["servers"]
    cfg, run_id = _train_tiny(root)

    # 1. the server hangs (SIGSTOP) right after the version is created, mid-registration
    outcome: dict = {}

    def registering() -> None:
        try:
            outcome["out"] = register_candidate(cfg, root)
        except Exception as exc:  # the assertion below says what it was
            outcome["error"] = exc

    worker = threading.Thread(target=registering)
    worker.start()
    deadline = time.monotonic() + 120
    while not _versions_in_db(root) and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(servers[-1].pid, signal.SIGSTOP)
    worker.join(timeout=120)
    assert isinstance(outcome.get("error"), RegistryUnavailable), outcome
    assert "unreachable (Read timed out)" in str(outcome["error"])

    # 2. the server is down (killed): a rerun retries with backoff, then fails clearly
    os.killpg(servers[-1].pid, signal.SIGCONT)
    servers[-1].kill()
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="pipelines.registry")
    with pytest.raises(RegistryUnavailable) as err:
        register_candidate(cfg, root)
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert "unreachable (Connection refused)" in message and "4 attempts" in message
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert [r.getMessage().split("retry ")[1][:3] for r in retries] == ["1/3", "2/3", "3/3"]
    proc = _cli(["register"], root, timeout=180)
    assert proc.returncode == 75, proc.stderr  # transient: the orchestrator retries
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "unreachable" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr

    # 3. back on the same store: no alias on a partial version, every version has lineage
    servers.append(_start_mlflow(root, port))
    mlc = MlflowClient(mlflow_project["url"])
    versions = mlc.search_model_versions("name='attnflow-faults'")
    assert len(versions) == 1
    partial = versions[0]
    assert partial.tags[REGISTRATION_TAG] == PENDING
    assert partial.tags["mlflow_run_id"] == run_id and "git_commit" in partial.tags
    assert aliases(root=root) == {}  # the cut-short registration moved no alias
    assert registered_version_of_run(run_id, root) is None  # the retrain flow will rerun it

    # 4. a rerun finishes that same version; another rerun changes nothing
    out = register_candidate(cfg, root)
    assert out["version"] == str(partial.version) and out["resumed"] and out["alias"] == CHAMPION
    again = register_candidate(cfg, root)
    assert again["version"] == out["version"] and again["already_registered"]
    versions = mlc.search_model_versions("name='attnflow-faults'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags[REGISTRATION_TAG] == COMPLETE and tags["gate.passed"] == "true"
    assert aliases(root=root) == {CHAMPION: out["version"]}
    assert registered_version_of_run(run_id, root)["version"] == out["version"]


# --- the feedback log's disk fills up under a real model service --------------------------------


@pytest.fixture(scope="module")
def feedback_service(tiny_model, tmp_path_factory):
    """A real model service whose feedback log lives in its own folder (`fb/`)."""
    from services.launch import start_model_service

    root = tmp_path_factory.mktemp("faults-feedback")
    (root / "fb").mkdir()
    handle = start_model_service(
        tiny_model.folder,
        feedback_log=root / "fb" / "events.jsonl",
        env={"BENTOML_HOME": str(root / "bentoml")},
        log_dir=root / "logs",
        timeout=180,
    )
    try:
        yield {"url": handle.url, "dir": root / "fb", "log": root / "fb" / "events.jsonl"}
    finally:
        handle.stop()


def _events(tag: str, n: int) -> list[dict]:
    """`n` click events with ids `tag-<i>`, each about 100 bytes in the log."""
    return [
        {
            "user_id": f"user-{tag}-{i}",
            "item_id": f"item-{i}",
            "event": "click",
            "event_id": f"{tag}-{i}",
        }
        for i in range(n)
    ]


def _post_feedback(url: str, events: list[dict]):
    import httpx

    return httpx.post(f"{url}/feedback", json={"events": events}, timeout=30, trust_env=False)


def _logged_ids(path: Path) -> list[str]:
    """The event ids in the log; every line must parse (a torn line fails the test)."""
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines()]


def test_feedback_on_a_full_disk_answers_503_and_loses_nothing(feedback_service, tmp_path):
    """A genuinely full file system (a 256 KiB tmpfs under the log): 503, the earlier
    events intact, and accepted again once space is freed."""
    folder, log_file, url = (
        feedback_service["dir"],
        feedback_service["log"],
        feedback_service["url"],
    )
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}); see the unwritable test")
    try:
        first = _post_feedback(url, _events("before", 5))
        assert first.status_code == 200 and first.json()["written"] == 5, first.text
        size = log_file.stat().st_size
        # fill the file system to the last block
        with open(folder / "filler", "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC: the disk is genuinely full
        # a batch larger than the log's partly used last page cannot fit anywhere
        batch = _events("full", 100)
        r = _post_feedback(url, batch)
        assert r.status_code == 503, r.text
        assert "disk is full" in r.text
        assert log_file.stat().st_size == size  # rolled back: no torn line
        assert _logged_ids(log_file) == [f"before-{i}" for i in range(5)]

        (folder / "filler").unlink()  # space is freed: the same batch goes through
        r = _post_feedback(url, batch)
        assert r.status_code == 200 and r.json()["written"] == 100, r.text
        ids = _logged_ids(log_file)
        assert ids == [f"before-{i}" for i in range(5)] + [f"full-{i}" for i in range(100)]
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_feedback_to_an_unwritable_log_answers_503_and_recovers(feedback_service):
    """The log's folder replaced by a file (as when its volume is gone): 503, nothing lost."""
    folder, log_file, url = (
        feedback_service["dir"],
        feedback_service["log"],
        feedback_service["url"],
    )
    first = _post_feedback(url, _events("kept", 3))
    assert first.status_code == 200, first.text
    kept = folder.with_name("fb-moved")
    folder.rename(kept)
    folder.write_text("not a folder")
    try:
        r = _post_feedback(url, _events("lost", 3))
        assert r.status_code == 503 and "cannot be written" in r.text, r.text
        assert [i for i in _logged_ids(kept / "events.jsonl") if i.startswith("kept")] == [
            "kept-0",
            "kept-1",
            "kept-2",
        ]
    finally:
        folder.unlink()
        kept.rename(folder)
    r = _post_feedback(url, _events("lost", 3))  # the client's retry is accepted now
    assert r.status_code == 200 and r.json()["written"] == 3, r.text
    assert _logged_ids(log_file)[-6:] == [
        "kept-0",
        "kept-1",
        "kept-2",
        "lost-0",
        "lost-1",
        "lost-2",
    ]


# --- a corrupted model: refused at load, and refused by the rollout before any traffic ----------


def test_corrupted_weights_are_refused_at_load_and_by_the_model_service(tiny_model, tmp_path):
    """One flipped byte in weights.safetensors: load names the file; the service fails fast."""
    from pipelines.inference import ServedModel
    from pipelines.model import ModelCorrupted
    from services.launch import LaunchError, start_model_service

    folder = Path(shutil.copytree(tiny_model.folder, tmp_path / "model"))
    _flip_byte(folder / "weights.safetensors")
    with pytest.raises(ModelCorrupted, match=r"weights\.safetensors does not match its SHA-256"):
        ServedModel.load(folder)
    started = time.monotonic()
    with pytest.raises(LaunchError) as err:
        start_model_service(
            folder,
            env={"BENTOML_HOME": str(tmp_path / "bentoml")},
            log_dir=tmp_path / "logs",
            timeout=180,
        )
    assert "cannot serve" in str(err.value) and "weights.safetensors does not match" in str(
        err.value
    )
    assert time.monotonic() - started < 150  # the reason, not the readiness timeout


def _log_folder(root: Path, folder: Path, note: str) -> str:
    """Log a model folder in a new MLflow run and register it as a version (no gates)."""
    from pipelines.registry import register
    from pipelines.tracking import client, experiment_id, log_trained_model

    mlc = client(root)
    run = mlc.create_run(experiment_id(mlc, root), run_name=note)
    summary = {"best_metric": 0.0, "train_seconds": 0.0, "sequences_per_s": 0.0, "epochs_run": 1}
    uri = log_trained_model(root, run.info.run_id, folder, [{"epoch": 1, "loss": 1.0}], summary)
    return register(uri, run.info.run_id, {"note": note}, root)


# A real MLflow server, two model logs, a champion service, a gateway and Prefect's API.
@pytest.mark.slow
def test_a_corrupted_registered_version_is_refused_before_any_traffic(
    tiny_model, mlflow_project, monkeypatch
):
    """Bytes flipped in the artifact store: the rollout refuses it before the gateway moves."""
    import httpx
    from mlflow import MlflowClient

    from flows.rollout import rollout
    from pipelines.registry import CHALLENGER, CHAMPION, aliases, fetch_model, set_alias
    from pipelines.rollout import RolloutFailed
    from services.launch import free_port
    from services.stack import Stack

    root = mlflow_project["root"]
    token = "test-admin-" + os.urandom(8).hex()
    monkeypatch.setenv("ATTNFLOW_ADMIN_TOKEN", token)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"]["gateway_port"] = free_port()  # never the default port of a real stack
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    champion = _log_folder(root, tiny_model.folder, "champion")
    set_alias(CHAMPION, champion, "test", root=root)
    bad = _log_folder(root, tiny_model.folder, "to-be-corrupted")
    set_alias(CHALLENGER, bad, "test", root=root)
    source = MlflowClient(mlflow_project["url"]).get_model_version("attnflow-faults", bad).source
    model_id = source.removeprefix("models:/")  # the logged model's folder in the store
    stored = [p for p in (root / "mlartifacts").rglob("weights.safetensors") if model_id in str(p)]
    assert len(stored) == 1, stored
    _flip_byte(stored[0])

    stack = Stack(root)
    try:
        fetched = fetch_model(f"models:/attnflow-faults/{champion}", root)
        served = stack.start_model(champion, str(fetched.folder), role=CHAMPION)
        gateway = stack.start_gateway(served["url"])
        admin = {"Authorization": f"Bearer {token}"}
        seen: list[tuple[int, object]] = []
        stop = threading.Event()

        def watch() -> None:
            # what the gateway routes while the rollout runs
            with httpx.Client(timeout=5, trust_env=False, headers=admin) as http:
                while not stop.is_set():
                    try:
                        state = http.get(f"{gateway['url']}/admin/state").json()
                        seen.append((state["weight"], state["backends"][CHALLENGER]))
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                    stop.wait(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with pytest.raises(RolloutFailed, match=r"weights\.safetensors does not match") as err:
                rollout(version=bad, root=str(root), actor="faults test")
        finally:
            stop.set()
            watcher.join(timeout=10)
        assert "refused before any traffic" in str(err.value)
        assert seen and all(weight == 0 and backend is None for weight, backend in seen), seen
        assert CHALLENGER not in stack.served()
        assert aliases(root=root) == {CHAMPION: champion, CHALLENGER: bad}  # none moved
        tags = MlflowClient(mlflow_project["url"]).get_model_version("attnflow-faults", bad).tags
        assert tags["rollout.status"] == "refused"
        assert "weights.safetensors does not match" in tags["rollout.reason"]
        assert not list((root / ".attnflow" / "models").glob(f"attnflow-faults-v{bad}*"))
    finally:
        stack.down()
