"""The every-minute reconcile's light front, against a real (temporary) Prefect server:
a check with nothing to do is recorded without Prefect's engine and frees the
deployment's slot; anything else goes to the engine untouched."""

from __future__ import annotations

import shutil

import pytest

from flows import precheck
from pipelines.reconcile import Action
from services.launch import REPO


class EngineStarted(Exception):
    """Stands in for `exec prefect.engine` (which would replace the test process)."""


@pytest.fixture
def api(prefect_api_url: str) -> str:
    return prefect_api_url


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _pending_run(api: str, name: str, root: str, due_in_s: float = 0.0):
    """A run of a deployment limited like prefect.yaml's reconcile, as the worker leaves
    it before starting the command: Pending, holding the deployment's one slot (a worker
    starts runs due within the next 10 s: `due_in_s`)."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import ConcurrencyOptions
    from prefect.states import Pending, Scheduled

    client = SyncPrefectClient(api)
    with client:
        deployment = client.create_deployment(
            flow_id=client.create_flow_from_name(name),
            name=name,
            concurrency_limit=1,
            concurrency_options=ConcurrencyOptions(collision_strategy="CANCEL_NEW"),
        )
        due = datetime.now(UTC) + timedelta(seconds=due_in_s)
        run = client.create_flow_run_from_deployment(
            deployment, parameters={"root": root}, state=Scheduled(scheduled_time=due)
        )
        assert client.set_flow_run_state(run.id, Pending()).state.is_pending()
    return deployment, run


@pytest.fixture
def no_engine(monkeypatch):
    def engine():
        raise EngineStarted

    monkeypatch.setattr(precheck, "_engine", engine)


def test_nothing_to_do_is_recorded_without_the_engine_and_frees_the_slot(
    api, project, monkeypatch, no_engine, caplog
):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Pending

    deployment, run = _pending_run(api, "precheck-noop", str(project))
    with SyncPrefectClient(api) as client:  # the slot is held: a second check is cancelled
        early = client.create_flow_run_from_deployment(deployment)
        assert client.set_flow_run_state(early.id, Pending()).state.is_cancelled()
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run.id))
    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "true")  # the tests' default is off
    caplog.set_level("INFO", logger="flows.precheck")
    precheck.main()  # the stack of `project` is not up: nothing to reconcile

    with SyncPrefectClient(api) as client:
        done = client.read_flow_run(run.id)
        assert done.state.is_completed(), done.state
        assert done.state.message == "stack not up"
        assert done.start_time is not None  # it went through Running, as the engine's runs do
        # the deployment's slot was released: the next check starts instead of being cancelled
        following = client.create_flow_run_from_deployment(deployment)
        assert client.set_flow_run_state(following.id, Pending()).state.is_pending()
        logs = client.read_logs()
    assert any(log.flow_run_id == run.id and "nothing to reconcile" in log.message for log in logs)
    assert "quick check; Prefect's engine not started" in caplog.text  # the worker's log


def test_a_run_started_before_its_time_waits_for_it_as_the_engine_does(
    api, project, monkeypatch, no_engine
):
    import time
    from datetime import UTC, datetime

    from prefect.client.orchestration import SyncPrefectClient

    _, run = _pending_run(api, "precheck-early", str(project), due_in_s=5.0)
    due = run.expected_start_time
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run.id))
    monkeypatch.setenv("PREFECT_API_URL", api)
    # measured from the scheduled time, not from the setup: on a loaded machine the
    # setup's API calls can eat most of the 5 s
    left = (due - datetime.now(UTC)).total_seconds()
    t0 = time.monotonic()
    precheck.main()
    waited = time.monotonic() - t0
    with SyncPrefectClient(api) as client:
        done = client.read_flow_run(run.id)
    assert done.state.is_completed(), done.state
    assert done.start_time >= due  # the server answered WAIT until the scheduled time
    assert waited >= left - 0.5, (waited, left)


def test_a_rollout_to_start_goes_to_the_engine_with_the_run_untouched(
    api, project, monkeypatch, no_engine
):
    from prefect.client.orchestration import SyncPrefectClient

    _, run = _pending_run(api, "precheck-act", str(project))
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run.id))
    monkeypatch.setenv("PREFECT_API_URL", api)
    seen = []

    def decide(root):
        seen.append(root)
        return Action("rollout", "7", "challenger alias set on v7"), "aliases ..."

    monkeypatch.setattr(precheck, "decide", decide)
    with pytest.raises(EngineStarted):
        precheck.main()
    assert seen == [project.resolve()]  # the run's own `root` parameter
    with SyncPrefectClient(api) as client:
        assert client.read_flow_run(run.id).state.is_pending()  # left for the engine


def test_facts_it_cannot_read_go_to_the_engine(api, project, monkeypatch, no_engine):
    from prefect.client.orchestration import SyncPrefectClient

    _, run = _pending_run(api, "precheck-broken", str(project))
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run.id))
    monkeypatch.setenv("PREFECT_API_URL", api)

    def decide(root):
        raise ConnectionError("MLflow is down")

    monkeypatch.setattr(precheck, "decide", decide)
    with pytest.raises(EngineStarted):
        precheck.main()
    with SyncPrefectClient(api) as client:
        assert client.read_flow_run(run.id).state.is_pending()


def test_without_a_flow_run_it_is_just_the_engine(monkeypatch, no_engine):
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    with pytest.raises(EngineStarted):
        precheck.main()


def test_root_resolves_like_the_deployments_pull_step(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNFLOW_ROOT", str(tmp_path))
    assert precheck._run_root({}) == tmp_path.resolve()
    assert precheck._run_root({"root": "."}) == tmp_path.resolve()
    assert precheck._run_root({"root": "/elsewhere"}) == __import__("pathlib").Path("/elsewhere")
