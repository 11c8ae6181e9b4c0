"""The CLI's REST path to a deployment run, against a real (temporary) Prefect server."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from pipelines.errors import AttnflowError
from services.prefect_rest import RunEvents, create_run, run_deployment, wait_for_run


@pytest.fixture
def api(prefect_api_url: str) -> str:
    return prefect_api_url


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


def test_the_wait_follows_the_runs_events_instead_of_polling(api):
    """With the server's event stream, a wait ends when the run changes state (here,
    well before its 60 s poll), and the run is read only then."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Completed, Pending, Running

    _deployment(api, "rest-events", {})
    with httpx.Client(base_url=api) as client:
        run = create_run(client, "rest-events/rest-events", {})
    with RunEvents(api, run["id"]) as events:
        assert events.connected

        def worker() -> None:
            time.sleep(0.5)
            with SyncPrefectClient(api) as pc:
                for state in (Pending(), Running(), Completed()):
                    pc.set_flow_run_state(run["id"], state)

        t = threading.Thread(target=worker)
        t.start()
        waits: list[float] = []

        def wait(seconds: float) -> None:
            t0 = time.monotonic()
            events.wait(seconds)
            waits.append(time.monotonic() - t0)

        with httpx.Client(base_url=api) as client:
            t0 = time.monotonic()
            final = wait_for_run(client, run["id"], poll_s=60.0, sleep=wait)
            took = time.monotonic() - t0
        t.join()
    assert final["state"]["type"] == "COMPLETED"
    assert 1 <= len(waits) <= 3, waits  # woken by Pending, Running, Completed at most
    assert took < 30, took


def test_without_an_event_stream_the_wait_polls():
    events = RunEvents("http://127.0.0.1:9/api", "no-such-run", poll_s=0.2, timeout=1)
    with events:  # nothing listens there
        assert not events.connected
        t0 = time.monotonic()
        events.wait(30)  # a plain poll's sleep: poll_s, not the 30 s meant for the stream
        assert 0.2 <= time.monotonic() - t0 < 5


def test_an_unknown_deployment_is_a_one_line_error(api):
    with pytest.raises(AttnflowError, match="deployment nope/nope: Prefect answered 404"):
        run_deployment(api, "nope/nope", {})


def test_a_busy_server_is_retried_and_a_retried_create_reuses_its_key(monkeypatch):
    """A just-started Prefect answered 503 to the demo's first run: such answers are
    retried (as Prefect's own client does), and every attempt to create the run carries
    the same idempotency key, so a create the server did process is not made twice.
    (A transport plays the busy server: a real one cannot be made to answer 503.)"""
    answers = iter([503, 503, 200])
    keys = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/deployments/name/retrain/retrain"):
            return httpx.Response(200, json={"id": "d1"})
        keys.append(json.loads(request.content)["idempotency_key"])
        status = next(answers)
        return httpx.Response(status, json={"id": "r1"} if status == 200 else {})

    waits = []
    client = httpx.Client(base_url="http://prefect/api", transport=httpx.MockTransport(handler))
    import services.prefect_rest as rest

    original = rest.call
    monkeypatch.setattr(rest, "call", lambda *a, **k: original(*a, sleep=waits.append, **k))
    assert create_run(client, "retrain/retrain", {})["id"] == "r1"
    assert len(keys) == 3 and len(set(keys)) == 1
    assert waits == [1.0, 2.0]


def test_a_server_that_stays_busy_is_a_one_line_error():
    client = httpx.Client(
        base_url="http://prefect/api",
        transport=httpx.MockTransport(lambda request: httpx.Response(503, text="busy")),
    )
    from services.prefect_rest import call

    with pytest.raises(AttnflowError, match="Prefect answered 503: busy"):
        call(client, "GET", "/flow_runs/x", "flow run x", sleep=lambda s: None)
