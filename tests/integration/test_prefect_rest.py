"""The CLI's REST path to a deployment run, against a real (temporary) Prefect server."""

from __future__ import annotations

import threading

import httpx
import pytest

from pipelines.errors import AttnflowError
from services.prefect_rest import create_run, run_deployment, wait_for_run


@pytest.fixture(scope="module")
def api() -> str:
    """Prefect's temporary server (the one its Python client starts in tests)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def _deployment(api: str, name: str, parameters: dict) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api) as client:
        flow_id = client.create_flow_from_name(name)
        client.create_deployment(flow_id=flow_id, name=name, parameters=parameters)


def test_a_run_is_created_with_the_deployments_defaults_and_the_given_parameters(api):
    _deployment(api, "rest-create", {"dataset": None, "root": "/default"})
    with httpx.Client(base_url=api) as client:
        run = create_run(client, "rest-create/rest-create", {"root": "/given"})
    assert run["state"]["type"] == "SCHEDULED"
    assert run["parameters"] == {"dataset": None, "root": "/given"}


def test_waiting_ends_with_the_final_state_the_worker_reports(api):
    """A 'worker' (here: the Prefect client moving the run's states) ends the run; the
    REST path returns only then, with the run's final state."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Failed, Pending, Running

    _deployment(api, "rest-wait", {})
    with httpx.Client(base_url=api) as client:
        run = create_run(client, "rest-wait/rest-wait", {})
    polls: list[str] = []

    def worker() -> None:
        with SyncPrefectClient(api) as pc:
            pc.set_flow_run_state(run["id"], Pending())
            pc.set_flow_run_state(run["id"], Running())
            while len(polls) < 2:  # the waiter has seen the run running
                threading.Event().wait(0.05)
            pc.set_flow_run_state(run["id"], Failed(message="stage train failed"))

    t = threading.Thread(target=worker)
    t.start()
    with httpx.Client(base_url=api) as client:
        final = wait_for_run(
            client,
            run["id"],
            poll_s=0.05,
            sleep=lambda s: (polls.append("x"), threading.Event().wait(s)),
        )
    t.join()
    assert final["state"]["type"] == "FAILED"
    assert final["state"]["message"] == "stage train failed"
    assert len(polls) >= 2


def test_an_unknown_deployment_is_a_one_line_error(api):
    with pytest.raises(AttnflowError, match="deployment nope/nope: Prefect answered 404"):
        run_deployment(api, "nope/nope", {})
