"""The webhook receiver, configured for a Prefect API (as `attnflow up` starts it), turns
a signed alias delivery into a run of the `rollout` deployment on a real Prefect server."""

from __future__ import annotations

import sys
import time

import httpx

from services.launch import free_port, spawn, stop_all
from tests.reliability.test_bad_input import WEBHOOK_SECRET, _alias_delivery, _signed


def test_a_challenger_alias_delivery_creates_a_rollout_deployment_run(tmp_path, prefect_api_url):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(prefect_api_url) as client:
        flow_id = client.create_flow_from_name("rollout")
        client.create_deployment(
            flow_id=flow_id, name="rollout", parameters={"version": None, "root": "."}
        )
    port = free_port()
    receiver = spawn(
        "webhook",
        [sys.executable, "-m", "services.webhook", "--host", "127.0.0.1", "--port", str(port)],
        port,
        env={
            "ATTNFLOW_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "ATTNFLOW_ROOT": str(tmp_path),
            "ATTNFLOW_STATE_DIR": str(tmp_path / "state"),
            "PREFECT_API_URL": prefect_api_url,
        },
        log_dir=tmp_path / "logs",
    )
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=30, trust_env=False) as http:
            while True:
                try:
                    http.get(f"http://127.0.0.1:{port}/livez", timeout=1)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, receiver.log_tail()
                    time.sleep(0.2)
            body = _alias_delivery(version="7", alias="challenger")
            r = http.post(
                f"http://127.0.0.1:{port}/webhook",
                content=body,
                headers=_signed(body, "d-prefect", int(time.time())),
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
