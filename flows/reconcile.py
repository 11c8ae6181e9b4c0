"""The reconcile flow: catch what a lost MLflow webhook would have started.

Runs every minute as the `reconcile` deployment (and on demand with
`attnflow reconcile`): compares the registry's aliases with the versions the
gateway serves and starts the rollout flow when they disagree.

The deployment runs at the lowest CPU priority (`nice`, prefect.yaml): a check every
minute must not slow a training run that shares the machine. A rollout it finds
necessary must not inherit that priority (the challenger it starts is measured against
the champion), so a deployment run hands it to the `rollout` deployment, whose run the
worker starts at normal priority; `attnflow reconcile` rolls out in-process. The
deployment's runs start in `flows/precheck.py`, which takes the same decision without
Prefect's engine and starts this flow only when there is something to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger
from prefect.runtime import deployment

from flows.precheck import decide
from pipelines.rollout import RolloutBusy, rollout_holder

ROLLOUT_DEPLOYMENT = "rollout/rollout"


def _rollout_run_pending() -> str | None:
    """Why not to start a rollout run: one of the `rollout` deployment is queued or running.

    (One a previous reconcile handed over waits for the worker; a second would repeat
    the canary after it.) None without a Prefect server.
    """
    if not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(ROLLOUT_DEPLOYMENT)
        except Exception:  # not deployed (a bare Prefect server): nothing can be queued
            return None
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active))
            ),
        )
    if not runs:
        return None
    return f"rollout flow run {runs[0].name} is {runs[0].state_name.lower()}; it goes first"


@flow(name="reconcile")
def reconcile(root: str = ".") -> dict[str, Any]:
    """Start a rollout if the aliases ask for a version that is not being served."""
    from flows.rollout import rollout

    log = get_run_logger()
    root_path = Path(root).resolve()
    action, line = decide(root_path)
    log.info("%s", line)
    if action.kind != "rollout":
        return {"action": "none", "reason": action.reason}
    from pipelines.registry import state_dir

    busy = rollout_holder(state_dir(root_path)) or _rollout_run_pending()
    if busy:  # e.g. the retrain flow rolling out the challenger it just registered
        log.info("%s", busy)
        return {"action": "deferred", "reason": busy}
    if deployment.id:
        from prefect.deployments import run_deployment

        run = run_deployment(
            ROLLOUT_DEPLOYMENT,
            parameters={"version": action.version, "root": str(root_path), "actor": "reconciler"},
            timeout=0,  # started, not awaited: the worker runs it
            as_subflow=False,
        )
        log.info("v%s: rollout handed to flow run %s", action.version, run.name)
        return {"action": "rollout", "version": action.version, "status": "started"}
    try:
        report = rollout(version=action.version, root=str(root_path), actor="reconciler")
    except RolloutBusy as exc:
        log.info("%s", exc)
        return {"action": "deferred", "reason": str(exc)}
    return {"action": "rollout", "version": action.version, "status": report.get("status")}
