"""The drift-check flow: has the data moved away from what the champion learned?

Profiles the newest ingested data version and compares it with the profile the
champion was trained on (saved in its lineage). Past `drift.threshold` it emits the
Prefect event `attnflow.drift.detected`; the `retrain` deployment's trigger (see
prefect.yaml) turns that event into a retrain run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger
from prefect.events import emit_event

DRIFT_EVENT = "attnflow.drift.detected"


@flow(name="drift-check")
def drift_check(root: str = ".", threshold: float = 0.1) -> dict[str, Any]:
    """Compare the newest data with the champion's training data; emit an event on drift."""
    import pandas as pd

    from pipelines.config import load_config
    from pipelines.drift import measure
    from pipelines.model import load_extra
    from pipelines.registry import CHAMPION, fetch_model, get_alias, model_name

    log = get_run_logger()
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    events_path = root_path / cfg.paths.ingested_dir / "events.parquet"
    version = get_alias(CHAMPION, root=root_path)
    if version is None or not events_path.exists():
        log.info("no champion or no ingested data yet; nothing to compare")
        return {"drift": None}
    folder = fetch_model(f"models:/{model_name()}/{version}", root_path).folder
    profile = load_extra(folder, "lineage").get("data_profile")
    if not profile:
        log.info("champion v%s has no data profile in its lineage", version)
        return {"drift": None}
    report = measure(pd.read_parquet(events_path), profile)
    drifted = report.exceeds(threshold)
    log.info("drift vs champion v%s: %s (threshold %.3f)", version, report.as_dict(), threshold)
    if drifted:
        emit_event(
            event=DRIFT_EVENT,
            resource={
                "prefect.resource.id": f"attnflow.data.{cfg.ingest.dataset}",
                "attnflow.champion": str(version),
            },
            payload=report.as_dict(),
        )
    return {"drift": report.as_dict(), "drifted": drifted, "champion": version}
