"""Shared fixtures: an isolated project folder, the data mirror, small datasets."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from tests.repo import REPO, copy_repo  # noqa: F401  (the tests import them from here)

# Make a relative mirror path (as .ci/run sets it) absolute before any test changes folder.
if os.environ.get("ATTNFLOW_DATA_MIRROR"):
    os.environ["ATTNFLOW_DATA_MIRROR"] = str(Path(os.environ["ATTNFLOW_DATA_MIRROR"]).resolve())
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Flows run on Prefect's ephemeral API with a throwaway home, never a user's server.
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each test project keeps its own store
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
# A loaded 2-core machine can take longer than Prefect's default to start its API.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="attnflow-prefect-"))
# Prefect fixes its settings when first imported. Import it now, with no server in the
# environment, so that in-process flows use the temporary API whichever test runs
# first (a module that starts a stack exports the stack's PREFECT_API_URL while it runs).
import prefect  # noqa: F401

# The gate (`make test`, CI) draws the same property-test examples every run, so a
# merge never fails on a new random draw; `make fuzz` explores fresh ones at length.
settings.register_profile("gate", derandomize=True, database=None)
settings.register_profile("fuzz", derandomize=False)
settings.load_profile(os.environ.get("ATTNFLOW_HYPOTHESIS_PROFILE", "gate"))


@contextlib.contextmanager
def restored_environ():
    """Undo every change made to os.environ inside the block.

    `LocalStack.up` exports the stack's URLs and secrets into this process (so that
    it talks to the servers it started); a module's stack must not leak them into
    the tests that run after it (monkeypatch's undo restores only the keys it set).
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _own_tracking_uri():
    """`tracking.client` exports the MLflow URI it settles on; it ends with the test.

    (Only this key: Prefect's temporary API server keeps its own state in the
    process environment across tests.)
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own download cache, so nothing leaks into ~/.cache."""
    monkeypatch.setenv("ATTNFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The shared data mirror; tests that need real datasets skip without it."""
    value = os.environ.get("ATTNFLOW_DATA_MIRROR")
    if not value or not (Path(value) / "SHA256SUMS").exists():
        pytest.skip("ATTNFLOW_DATA_MIRROR is not set to a data mirror")
    return Path(value)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A scratch project folder holding params.yaml, made the working directory."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(root: Path, overrides: dict) -> None:
    """Merge `overrides` (nested mapping) into root/params.yaml."""
    import yaml

    path = root / "params.yaml"
    data = yaml.safe_load(path.read_text()) if path.exists() else {}

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(data, overrides)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def venv_env(**extra: str) -> dict[str, str]:
    """The environment with this interpreter's bin first on PATH (for `dvc`, `attnflow`)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """The API of Prefect's temporary server (the one its Python client starts in tests),
    for tests that talk to it over REST."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server while pytest's streams are still open."""
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


# A canary quick enough for tests: two short steps, replayed traffic, no feedback needed
# (each test adds its own agreement and latency tolerances).
QUICK_ROLLOUT = {
    "steps": [50, 100],
    "bake_s": 3,
    "min_requests": 5,
    "replay_rps": 25,
    "replay_requests": 20,
    "min_feedback": 0,
}


def small_stack_params(clone: Path, **train) -> dict:
    """params.yaml of `clone` set for a small local stack: synthetic data, a tiny model,
    free ports for every server; `train` overrides the train section. Not written yet."""
    import yaml

    from services.launch import free_port

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["ingest"]["dataset"] = "synthetic"
    params["ingest"]["synthetic"].update(
        n_users=300, n_items=120, n_topics=5, events_per_user=15, pattern_prob=0.7
    )
    params["split"].update(min_user_events=1, min_item_events=1)
    params["model"].update(hidden=32, layers=2, heads=2, max_len=20, dropout=0.1)
    params["train"].update({"batch_size": 32, "threads": 1, **train})
    params["serve"].update(
        gateway_port=free_port(),
        mlflow_port=free_port(),
        prefect_port=free_port(),
        webhook_port=free_port(),
    )
    return params


def spawn_mlflow(root: Path, port: int, env: dict[str, str] | None = None):
    """A real `mlflow server` on 127.0.0.1:`port` over `root`'s SQLite file and artifact
    folder, logging to `root/logs` (started, not waited for)."""
    from services.launch import spawn

    cmd = [sys.executable, "-m", "mlflow", "server"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "mlartifacts")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return spawn("mlflow", cmd, port, env=env or {}, log_dir=root / "logs")
