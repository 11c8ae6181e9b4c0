"""The retrain flow: the stages of `dvc.yaml` as Prefect tasks.

The DAG is written once, in `dvc.yaml`; this flow reads it and runs each stage with
`dvc repro --single-item`, so DVC decides what is up to date and Prefect adds
retries, logs and the UI. DVC holds a repository lock, so stages run one at a time
in topological order. Transient failures (a held DVC lock, a network blip) are
retried with backoff; rejected data (a failed validation) is not, and stops the flow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task
from prefect.runtime import task_run

from pipelines.errors import TransientError
from pipelines.versioning import load_dag, repro_stage


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only failures that are worth retrying."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


@task(
    name="dvc-stage",
    task_run_name="{name}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_on_transient,
    tags=["dvc"],
)
def dvc_stage(name: str, root: str) -> dict[str, Any]:
    """Reproduce one dvc.yaml stage (skipped by DVC when nothing it depends on changed)."""
    result = repro_stage(name, Path(root))
    result["attempts"] = task_run.run_count
    get_run_logger().info(
        "stage %s %s in %.1fs",
        name,
        "ran" if result["ran"] else "was up to date",
        result["seconds"],
    )
    return result


@flow(name="retrain")
def retrain(root: str = ".", stages: list[str] | None = None) -> dict[str, Any]:
    """Run the dvc.yaml stages in order (all, or only `stages`)."""
    dag = load_dag(Path(root) / "dvc.yaml")
    selected = [s for s in dag if stages is None or s.name in stages]
    results = [dvc_stage(s.name, root) for s in selected]
    return {"stages": results}
