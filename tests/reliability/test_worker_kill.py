"""A Prefect worker killed mid-flow: the re-run completes from what was persisted.

The local stack (`LocalStack.up`: MLflow, Prefect server, deployments, a `cpu`
process worker, gateway) runs the `retrain` deployment. While the train stage is in
its epochs, the worker and every process under it (the flow run, `dvc repro`,
`attnflow train`) are SIGKILLed, as a crashed node would be. `up` then starts a new
worker and the deployment runs again: the data stages are not re-run (DVC recorded
them in dvc.lock), training resumes from its last checkpoint, and the run ends with a
registered, served champion. The concurrency slots the dead run held are freed by
`up` marking the dead run Crashed (its pid is gone), not by waiting for leases.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import QUICK_ROLLOUT, copy_repo, restored_environ, small_stack_params

# One sequence on one stack: the drift test builds on the champion and the data the
# worker-kill test leaves behind. About 5 minutes on 2 cores; `make test-slow` runs it.
pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]


@pytest.fixture(scope="module")
def platform(tmp_path_factory, mirror):
    from services.stack import LocalStack

    clone = copy_repo(tmp_path_factory.mktemp("worker-kill"))
    # long enough to be killed in the middle: many short epochs, each checkpointed
    params = small_stack_params(clone, epochs=120, lr=0.002, patience=1000)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNFLOW_STATE_DIR", str(clone / ".attnflow"))
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        mp.delenv(k, raising=False)
    stack = LocalStack(clone)
    with restored_environ():
        try:
            stack.up()
            yield {"clone": clone, "stack": stack}
        finally:
            stack.down()
            mp.undo()


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and everything under it at once; the pids killed."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def _checkpoint_epoch(clone: Path) -> int | None:
    """The epoch of the newest training checkpoint, if there is one yet."""
    import torch

    ckpts = sorted((clone / ".attnflow" / "checkpoints").glob("*/last.pt"))
    if not ckpts:
        return None
    try:
        return int(torch.load(ckpts[-1], map_location="cpu", weights_only=False)["epoch"])
    except Exception:  # being written right now: look again
        return None


def test_worker_killed_mid_train_then_rerun_completes_from_persisted_results(platform):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from pipelines.registry import CHAMPION, get_alias
    from services.stack import prefect_api

    clone, stack = platform["clone"], platform["stack"]
    with prefect_api():
        first = run_deployment("retrain/retrain", parameters={"root": str(clone)}, timeout=0)

    # wait until training is a few epochs in (a checkpoint exists), then crash the node
    deadline = time.monotonic() + 900
    epoch = None
    while time.monotonic() < deadline:
        epoch = _checkpoint_epoch(clone)
        if epoch is not None and epoch >= 2:
            break
        with prefect_api(), get_client(sync_client=True) as client:
            state = client.read_flow_run(first.id).state
        assert not state.is_final(), f"the first run ended early: {state.name}: {state.message}"
        time.sleep(0.5)
    assert epoch is not None and epoch >= 2, "training never reached epoch 2"
    ingested = (clone / "data/ingested/events.parquet").stat().st_mtime_ns
    split = (clone / "reports/split.json").read_text()
    worker = stack.component("worker-cpu")
    killed = _kill_tree(worker["pid"])
    assert len(killed) >= 2  # the worker and the flow run's front
    # the run itself was forked from the warm-start standby, and dies with its front
    standby_log = Path(stack.component("warmstart")["log"])
    deadline = time.monotonic() + 10
    while "is gone; killing it" not in standby_log.read_text():
        assert time.monotonic() < deadline, "the standby did not stop the orphaned run"
        time.sleep(0.2)
    assert not (clone / "reports/train.json").exists()  # training had not finished

    with prefect_api(), get_client(sync_client=True) as client:
        state = client.read_flow_run(first.id).state
    assert not state.is_completed()  # the killed run never finished

    stack.up()  # a new worker for the cpu pool; everything else is still up
    assert stack.component("worker-cpu")["pid"] != worker["pid"]
    # the dead run no longer holds the deployment's concurrency slot: it is Crashed
    with prefect_api(), get_client(sync_client=True) as client:
        assert client.read_flow_run(first.id).state.is_crashed()
    with prefect_api():
        second = run_deployment("retrain/retrain", parameters={"root": str(clone)}, timeout=1200)
    assert second.state.is_completed(), f"{second.state.name}: {second.state.message}"

    # ingest, validate and split were not redone: DVC had recorded them
    assert (clone / "data/ingested/events.parquet").stat().st_mtime_ns == ingested
    assert (clone / "reports/split.json").read_text() == split
    # training picked up at its last checkpoint rather than from epoch 0
    trained = json.loads((clone / "reports/train.json").read_text())
    assert trained["resumed_from"] is not None and trained["resumed_from"]["epoch"] >= 2, trained
    # and the run went all the way: registered, champion, served
    assert get_alias(CHAMPION, root=clone) == "1"
    assert stack.served()[CHAMPION]["version"] == "1"


def test_drift_check_starts_a_retrain_through_the_event_trigger(platform):
    """Data that moved away from the champion's: the drift-check deployment emits
    `attnflow.drift.detected`, and the `retrain` deployment's trigger (prefect.yaml)
    turns it into a retrain run whose reason names the drift."""
    import pandas as pd
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    from services.stack import prefect_api

    clone = platform["clone"]
    events_path = clone / "data/ingested/events.parquet"
    events = pd.read_parquet(events_path)
    # turn popularity upside down: the most attended items become the least attended
    ranked = events["item_id"].value_counts().index.tolist()
    flip = dict(zip(ranked, reversed(ranked), strict=True))
    events.assign(item_id=events["item_id"].map(flip)).to_parquet(events_path, index=False)

    with prefect_api(), get_client(sync_client=True) as client:
        retrain_runs = DeploymentFilter(name=DeploymentFilterName(any_=["retrain"]))
        before = {r.id for r in client.read_flow_runs(deployment_filter=retrain_runs)}
        check = run_deployment("drift-check/drift-check", parameters={"root": str(clone)})
        assert check.state.is_completed(), f"{check.state.name}: {check.state.message}"
        deadline, started = time.monotonic() + 120, []
        while time.monotonic() < deadline and not started:
            started = [
                r
                for r in client.read_flow_runs(deployment_filter=retrain_runs)
                if r.id not in before and "drift" in str(r.parameters.get("reason"))
            ]
            time.sleep(1)
        assert started, "no retrain run was started by the drift event"
        # the test is the trigger, not another training: stop the run it started
        from prefect.states import Cancelled

        client.set_flow_run_state(started[0].id, Cancelled(), force=True)


def test_reconcile_deployment_hands_a_lost_challenger_to_the_rollout_deployment(platform):
    """The webhook is lost (its receiver is down): the `reconcile` deployment, run at the
    lowest CPU priority, finds the unserved `challenger` and starts a run of the `rollout`
    deployment (normal priority, started by the worker), which promotes it."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    from pipelines import train
    from pipelines.config import load_config
    from pipelines.model import load_extra
    from pipelines.registry import CHALLENGER, CHAMPION, get_alias, lineage_tags, register
    from pipelines.tracking import client as mlflow_client
    from services.stack import prefect_api

    clone, stack = platform["clone"], platform["stack"]
    receiver = psutil.Process(stack.component("webhook")["pid"])
    receiver.terminate()
    receiver.wait(30)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["rollout"].update(**QUICK_ROLLOUT, min_agreement=0.0, p99_slack_ms=200)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    trained = train.run(
        load_config(clone / "params.yaml", ["train.epochs=3", "train.seed=5"]), clone
    )
    lineage = load_extra(clone / "models/attnflow", "lineage")
    version = register(
        trained["model_uri"], trained["mlflow_run_id"], lineage_tags(lineage, None), clone
    )
    mlflow_client(clone).set_registered_model_alias("attnflow", CHALLENGER, version)
    assert stack.served()[CHAMPION]["version"] != version  # nobody heard the move

    with prefect_api(), get_client(sync_client=True) as client:
        rollouts = DeploymentFilter(name=DeploymentFilterName(any_=["rollout"]))
        before = {r.id for r in client.read_flow_runs(deployment_filter=rollouts)}
        check = run_deployment("reconcile/reconcile", parameters={"root": str(clone)})
        # cancelled only when a scheduled check was running at that moment (prefect.yaml:
        # CANCEL_NEW), and then that one does the work
        busy = check.state.is_cancelled() and "concurrency" in (check.state.message or "")
        assert check.state.is_completed() or busy, f"{check.state.name}: {check.state.message}"
        # This run or a scheduled one (every minute) hands the rollout over; the other
        # finds it queued and defers. Flow runs print their log to the worker's log (the
        # tests keep them off the API).
        plan = f"rollout (challenger alias set on v{version}; CPU niceness 19)"
        handed = f"v{version}: rollout handed to flow run"
        text, deadline = "", time.monotonic() + 90
        while not (plan in text and handed in text) and time.monotonic() < deadline:
            time.sleep(1)
            text = "".join(p.read_text() for p in stack.run_dir.glob("worker-cpu*.log"))
        assert plan in text and handed in text, text[-3000:]
        deadline, started = time.monotonic() + 600, []
        while time.monotonic() < deadline:
            started = [
                r for r in client.read_flow_runs(deployment_filter=rollouts) if r.id not in before
            ]
            if started and started[0].state.is_final():
                break
            time.sleep(2)
    assert len(started) == 1, started
    run = started[0]
    assert run.parameters == {"version": version, "root": str(clone), "actor": "reconciler"}
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    assert get_alias(CHAMPION, root=clone) == version
    assert stack.served()[CHAMPION]["version"] == version
    assert os.nice(0) == 0  # the test process itself was never lowered
