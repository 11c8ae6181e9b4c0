"""Stage `ingest`: a source dataset to the canonical events and items tables.

Reads the source named by `ingest.dataset`, validates the raw tables with the raw
input suite, converts them to canonical events and items, appends served feedback
if configured, and writes ``data/ingested/{events,items}.parquet`` atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import Config
from pipelines.events import atomic_path, coerce_events, write_json

log = logging.getLogger(__name__)


def read_feedback(folder: Path) -> pd.DataFrame | None:
    """Served feedback: every `*.jsonl` log in `folder`, in canonical columns (None if none)."""
    from pipelines.feedback import read_log

    frames = [
        df for path in sorted(Path(folder).glob("*.jsonl")) if (df := read_log(path)) is not None
    ]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    if "event_id" in df:  # a retried batch written twice counts once
        df = df.drop_duplicates("event_id")
    return coerce_events(df, ts_unit="iso")


def summarize(events: pd.DataFrame, items: pd.DataFrame) -> dict[str, Any]:
    """Counts that `ingest` reports as DVC metrics."""
    return {
        "n_events": len(events),
        "n_users": int(events["user_id"].nunique()),
        "n_items": int(events["item_id"].nunique()),
        "n_catalog_items": len(items),
        "events_by_type": {str(k): int(v) for k, v in events["event"].value_counts().items()},
        "ts_min": str(events["ts"].min()) if len(events) else None,
        "ts_max": str(events["ts"].max()) if len(events) else None,
    }


def ingest(cfg: Config, root: Path = Path(".")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read, raw-validate and convert the configured source; returns (events, items)."""
    from pipelines.expectations import validate_raw
    from pipelines.readers import read_source

    source = read_source(cfg.ingest, base=root)
    log.info("read %s: %s", cfg.ingest.dataset, {k: len(v) for k, v in source.frames.items()})
    validate_raw(root / cfg.paths.gx_root, source.name, source.frames, source.schema)
    events, items = source.to_canonical()
    if cfg.ingest.since:
        since = pd.Timestamp(cfg.ingest.since)
        since = since.tz_localize("UTC") if since.tzinfo is None else since.tz_convert("UTC")
        events = events[events["ts"] >= since].reset_index(drop=True)
        log.info("kept %d events since %s", len(events), since)
    if cfg.ingest.feedback_dir is not None:
        feedback = read_feedback(root / cfg.ingest.feedback_dir)
        if feedback is not None:
            log.info("appending %d served feedback events", len(feedback))
            events = pd.concat([events, feedback], ignore_index=True)
    return events, items


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    """The DVC stage: write the canonical tables and `reports/ingest.json`."""
    events, items = ingest(cfg, root)
    out_dir = root / cfg.paths.ingested_dir
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        events.to_parquet(tmp / "events.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
    metrics = {"dataset": cfg.ingest.dataset, **summarize(events, items)}
    write_json(metrics, root / cfg.paths.reports_dir / "ingest.json")
    log.info(
        "ingested %d events, %d users, %d items",
        metrics["n_events"],
        metrics["n_users"],
        metrics["n_items"],
    )
    return metrics
