"""The light front of the every-minute `reconcile` deployment.

Prefect's process worker starts a new interpreter for every run, and Prefect's engine
costs about 4 CPU-seconds per run on this kind of machine (importing Prefect, 3 s, and
the run's API traffic): every minute, on the cores a training run uses. Nearly every
check finds nothing to do. So the deployment's command (prefect.yaml) starts this
module instead of the engine. It takes the reconciler's decision (`decide`: the
registry's aliases over MLflow's REST API, the stack's state file) without importing
Prefect or MLflow's client, and then

- nothing to do: records the flow run as completed, with the decision as its message
  and log line, through Prefect's REST API, and exits;
- anything else (a rollout to start, or facts it could not read): hands this process
  to Prefect's engine (`exec`), which runs the `reconcile` flow as usual; the flow
  takes the decision again on fresh facts and acts on it.

Nothing here changes what the reconciler decides; it only skips the engine when the
answer is "nothing".
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pipelines.reconcile import Action, plan
from pipelines.registry import aliases, version_tags

log = logging.getLogger(__name__)


def _statuses(root: Path, versions: set[str]) -> dict[str, str]:
    out = {}
    for v in versions:
        tags = version_tags(v, root=root)
        if "rollout.status" in tags:
            out[v] = tags["rollout.status"]
    return out


def decide(root: Path) -> tuple[Action, str]:
    """The reconciler's decision for the project at `root`, and the line that explains it."""
    from services.stack import Stack

    stack = Stack(root)
    if not stack.is_up():
        return Action("none", reason="stack not up"), (
            "the serving stack is not up; nothing to reconcile"
        )
    # a rollout that died while its challenger came up left that service running
    reaped = stack.reap_abandoned()
    now = aliases(root=root)
    served = (stack.served().get("champion") or {}).get("version")
    action = plan(now, served, _statuses(root, set(now.values())))
    line = (
        f"aliases {now}, serving v{served}: {action.kind} "
        f"({action.reason}; CPU niceness {os.nice(0)})"
    )
    if reaped:
        line += f"; stopped {', '.join(reaped)}: the rollout bringing it up is gone"
    return action, line


def _run_root(parameters: dict) -> Path:
    """The flow's `root` as the engine would resolve it: relative to the folder the
    deployment's pull step moves to ($ATTNFLOW_ROOT)."""
    return (Path(os.environ.get("ATTNFLOW_ROOT", ".")) / parameters.get("root", ".")).resolve()


def _engine() -> None:
    """Become Prefect's engine (the worker's default command); never returns."""
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine"])


def main() -> None:
    """Entry point of the deployment's command: finish a no-op run here, else exec the engine."""
    import httpx

    from services.prefect_rest import post_log, propose_state, read_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_id, api = os.environ.get("PREFECT__FLOW_RUN_ID"), os.environ.get("PREFECT_API_URL")
    if not run_id or not api:
        return _engine()
    with httpx.Client(base_url=api.rstrip("/"), timeout=30) as client:
        try:
            run = read_run(client, run_id)
            action, line = decide(_run_root(run.get("parameters") or {}))
            started = action.kind == "none" and propose_state(client, run_id, "RUNNING")
        except Exception as exc:  # facts unreadable here: the engine's run decides and reports
            log.info("reconcile: quick check failed (%r); starting the flow", exc)
            return _engine()
        if not started:  # something to do, or the server did not let the run start here
            log.info("reconcile: %s; starting the flow", line)
            return _engine()
        # Running from here on: a failure below exits non-zero, and the worker marks the
        # run crashed (which also frees the deployment's slot).
        message = f"{line} (quick check; Prefect's engine not started)"
        log.info("reconcile: %s", message)
        if os.environ.get("PREFECT_LOGGING_TO_API_ENABLED", "true").lower() != "false":
            post_log(client, run_id, message)
        if not propose_state(client, run_id, "COMPLETED", action.reason):
            raise SystemExit(f"flow run {run_id}: the server refused Completed")


if __name__ == "__main__":
    main()
