"""The reconcile flow: catch what a lost MLflow webhook would have started.

Runs every minute as the `reconcile` deployment (and on demand with
`attnflow reconcile`): compares the registry's aliases with the versions the
gateway serves and starts the rollout flow when they disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger

from pipelines.reconcile import plan
from pipelines.registry import aliases, model_name
from pipelines.rollout import RolloutBusy, rollout_holder


def _statuses(root: Path, versions: set[str]) -> dict[str, str]:
    from pipelines.tracking import client

    mlc = client(root)
    out = {}
    for v in versions:
        tags = mlc.get_model_version(model_name(), v).tags
        if "rollout.status" in tags:
            out[v] = tags["rollout.status"]
    return out


@flow(name="reconcile")
def reconcile(root: str = ".") -> dict[str, Any]:
    """Start a rollout if the aliases ask for a version that is not being served."""
    from flows.rollout import rollout
    from services.stack import Stack

    log = get_run_logger()
    root_path = Path(root).resolve()
    stack = Stack(root_path)
    if not stack.is_up():
        log.info("the serving stack is not up; nothing to reconcile")
        return {"action": "none", "reason": "stack not up"}
    now = aliases(root=root_path)
    served = (stack.served().get("champion") or {}).get("version")
    action = plan(now, served, _statuses(root_path, set(now.values())))
    log.info("aliases %s, serving v%s: %s (%s)", now, served, action.kind, action.reason)
    if action.kind != "rollout":
        return {"action": "none", "reason": action.reason}
    from pipelines.registry import state_dir

    busy = rollout_holder(state_dir(root_path))
    if busy:  # e.g. the retrain flow rolling out the challenger it just registered
        log.info("%s", busy)
        return {"action": "deferred", "reason": busy}
    try:
        report = rollout(version=action.version, root=str(root_path), actor="reconciler")
    except RolloutBusy as exc:
        log.info("%s", exc)
        return {"action": "deferred", "reason": str(exc)}
    return {"action": "rollout", "version": action.version, "status": report.get("status")}
