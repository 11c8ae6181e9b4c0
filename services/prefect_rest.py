"""Prefect's REST API for the light processes: start and follow a deployment's run,
and record a flow run's end without Prefect's engine.

The CLI's `attnflow retrain` (with the stack up) only creates a flow run and waits for
its final state; Prefect's Python client would import all of Prefect first, about 3
CPU-seconds here, on the path between the command and the worker picking the run up.
These are the same three calls `prefect.deployments.run_deployment` makes (read the
deployment by name, create a run from it, read the run until its state is final),
over httpx; the wait reads the run when the server's event stream says it changed
(`RunEvents`) rather than every second. The server fills in the deployment's default
parameters and checks the given ones against its schema, as it does for the Python
client.

`propose_state` and `post_log` are for the every-minute check's light front
(`flows/precheck.py`): a run with nothing to do goes Running, then Completed, through
the same orchestration rules as the engine's own state changes (so the deployment's
concurrency slot is released), with one log line beside it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from pipelines.errors import AttnflowError

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


# What Prefect's own client retries: the server is starting, busy or briefly overloaded
# (a just-started server answered 503 to the demo's first run).
RETRY_STATUS = frozenset({429, 502, 503, 504})
RETRIES = 5


def _retry_after(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds (None when absent or given as a date)."""
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def call(
    client: httpx.Client,
    method: str,
    url: str,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> Any:
    """One API call, retried with backoff on a busy server or a dropped connection;
    the JSON answer, or a one-line AttnflowError."""
    delay = 1.0
    for attempt in range(RETRIES + 1):
        last = attempt == RETRIES
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            if last:
                raise AttnflowError(f"{what}: Prefect unreachable: {exc}") from exc
        else:
            if response.status_code not in RETRY_STATUS or last:
                if response.status_code >= 400:
                    raise AttnflowError(
                        f"{what}: Prefect answered {response.status_code}: {response.text[:300]}"
                    )
                return response.json()
            delay = _retry_after(response) or delay
        sleep(min(delay, 10.0))
        delay *= 2
    raise AssertionError("unreachable")


def create_run(client: httpx.Client, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Create a scheduled flow run of the deployment `flow/deployment`; returns the run."""
    flow, _, deployment = name.partition("/")
    dep = call(client, "GET", f"/deployments/name/{flow}/{deployment}", f"deployment {name}")
    # the key makes a retried create return the run the first attempt may have made
    body = {
        "parameters": parameters,
        "state": {"type": "SCHEDULED"},
        "idempotency_key": str(uuid.uuid4()),
    }
    return call(
        client, "POST", f"/deployments/{dep['id']}/create_flow_run", f"a run of {name}", json=body
    )


def read_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    """The flow run as the API gives it."""
    return call(client, "GET", f"/flow_runs/{run_id}", f"flow run {run_id}")


def wait_for_run(
    client: httpx.Client,
    run_id: str,
    poll_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Read the flow run until its state is final; returns it.

    `sleep(poll_s)` waits between reads; `RunEvents.wait` ends that wait early when
    the run changes state.
    """
    while True:
        run = read_run(client, run_id)
        if (run.get("state") or {}).get("type") in FINAL_STATES:
            return run
        sleep(poll_s)


class RunEvents:
    """One flow run's state changes, from the Prefect server's event stream (`/events/out`).

    A waiter that polls every second learns of a run's end half a second late on
    average and sends the server a request a second the whole time; on this stream the
    server tells it at once (`prefect.flow-run.<state>`). It is the protocol of Prefect's
    own `PrefectEventSubscriber`, over the `websockets` that Prefect itself uses: auth
    (no token on the local server), then a filter. Best-effort: `connected` is False when
    the stream cannot be opened, and the caller polls as before.
    """

    def __init__(self, api_url: str, run_id: str, poll_s: float = 1.0, timeout: float = 5.0):
        self.url = api_url.rstrip("/").replace("http", "ws", 1) + "/events/out"
        self.run_id, self.poll_s, self.timeout = run_id, poll_s, timeout
        self.connected = False
        self._ws: Any = None

    def __enter__(self) -> RunEvents:
        import json
        from datetime import UTC, datetime, timedelta

        from websockets.sync.client import connect

        now = datetime.now(UTC)
        event_filter = {
            # without `until`, the server takes "now" and lets no later event through
            "occurred": {
                "since": (now - timedelta(minutes=1)).isoformat(),
                "until": (now + timedelta(days=7)).isoformat(),
            },
            "event": {"prefix": ["prefect.flow-run."]},
            "resource": {"id": [f"prefect.flow-run.{self.run_id}"]},
        }
        try:
            self._ws = connect(self.url, subprotocols=["prefect"], open_timeout=self.timeout)
            self._ws.send(json.dumps({"type": "auth", "token": None}))
            answer = json.loads(self._ws.recv(timeout=self.timeout))
            if answer.get("type") != "auth_success":
                raise ConnectionError(f"event stream refused: {answer}")
            # the waiter reads the run once after this: no need for past events
            self._ws.send(json.dumps({"type": "filter", "filter": event_filter, "backfill": False}))
            self.connected = True
        except Exception:  # no stream (an older or proxied server): the caller polls
            self.__exit__()
        return self

    def wait(self, seconds: float) -> None:
        """Return when the run has a new state or after `seconds`, whichever is first
        (without a stream: after `poll_s` at most, as a plain poll would)."""
        if not self.connected:
            time.sleep(min(seconds, self.poll_s))
            return
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.recv(timeout=seconds)
        except TimeoutError:
            pass
        except ConnectionClosed:  # the server went away: plain waits from now on
            self.__exit__()

    def __exit__(self, *exc: object) -> None:
        self.connected = False
        if self._ws is not None:
            self._ws.close()
            self._ws = None


def run_deployment(
    api_url: str, name: str, parameters: dict[str, Any], poll_s: float = 1.0
) -> dict[str, Any]:
    """Run deployment `name` (`flow/deployment`) with `parameters`; wait for its end.

    The wait follows the run's events and reads it when one comes; without the event
    stream, every `poll_s`. Returns the final flow run as the API gives it (`name`,
    `state.type`, ...).
    """
    with httpx.Client(base_url=api_url.rstrip("/"), timeout=30) as client:
        run = create_run(client, name, parameters)
        with RunEvents(api_url, run["id"], poll_s) as events:
            # on the stream, a lost event costs at most 10 s: the run is read again
            # regardless; without one, `events.wait` sleeps `poll_s`, a plain poll
            return wait_for_run(client, run["id"], max(poll_s, 10.0), sleep=events.wait)


def propose_state(
    client: httpx.Client,
    run_id: str,
    state_type: str,
    message: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Propose a state for a flow run (as the engine does, not forced); True if accepted.

    A WAIT is honoured as the engine honours it: a worker starts runs up to 10 s before
    their scheduled time, and the server holds a run's start until then.
    """
    state = {"type": state_type, "name": state_type.capitalize(), "message": message}
    for _ in range(10):
        body = call(
            client,
            "POST",
            f"/flow_runs/{run_id}/set_state",
            f"flow run {run_id} -> {state_type}",
            json={"state": state, "force": False},
        )
        if body.get("status") != "WAIT":
            return body.get("status") == "ACCEPT"
        sleep(min(float((body.get("details") or {}).get("delay_seconds") or 1.0), 30.0))
    return False


def post_log(client: httpx.Client, run_id: str, message: str, level: int = 20) -> None:
    """One line in the flow run's log (what the engine's run logger would send)."""
    from datetime import UTC, datetime

    line = {
        "name": "prefect.flow_runs",
        "level": level,
        "message": message,
        "timestamp": datetime.now(UTC).isoformat(),
        "flow_run_id": run_id,
    }
    call(client, "POST", "/logs/", f"log of flow run {run_id}", json=[line])
