"""The webhook receiver, configured for a Prefect API (as `attnflow up` starts it), turns
a signed alias delivery into a run of the `rollout` deployment on a real Prefect server."""

from __future__ import annotations

import time

import httpx

from services.launch import stop_all
from tests.reliability.test_bad_input import _alias_delivery, _signed, start_receiver


def test_a_challenger_alias_delivery_creates_a_rollout_deployment_run(tmp_path, prefect_api_url):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(prefect_api_url) as client:
        flow_id = client.create_flow_from_name("rollout")
        client.create_deployment(
            flow_id=flow_id, name="rollout", parameters={"version": None, "root": "."}
        )
    # no run folder yet (a receiver started before the stack): it makes its own
    receiver, base = start_receiver(tmp_path, tmp_path / "state", prefect_api=prefect_api_url)
    try:
        body = _alias_delivery(version="7", alias="challenger")
        r = httpx.post(
            f"{base}/webhook",
            content=body,
            headers=_signed(body, "d-prefect", int(time.time())),
            timeout=30,
            trust_env=False,
        )
        assert r.status_code == 202, (r.text, receiver.log_tail())
        answer = r.json()
        assert answer["status"] == "rollout started", answer
        run_id = answer["run"].removeprefix("prefect flow run ")
        run = httpx.get(f"{prefect_api_url}/flow_runs/{run_id}", trust_env=False).json()
        assert run["state"]["type"] == "SCHEDULED"
        assert run["parameters"]["version"] == "7"
        assert run["parameters"]["root"] == str(tmp_path)
        assert "webhook (challenger set in MLflow)" in run["parameters"]["actor"]
        assert "Traceback" not in receiver.log_path.read_text()
    finally:
        stop_all([receiver])
