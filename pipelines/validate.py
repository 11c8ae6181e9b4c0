"""Stage `validate`: the canonical events suite and drift checks, fail closed.

On success the profile of this data version becomes the reference ("last accepted
version") that the next version's row count and drift are checked against. On
failure nothing is written but Data Docs, and `ValidationFailed` names each failed
expectation, so `dvc repro` and the retrain flow stop here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import Config
from pipelines.errors import DataError
from pipelines.events import read_events, write_json
from pipelines.expectations import (
    data_docs_index,
    load_reference,
    profile_events,
    save_reference,
    validate_events,
)

log = logging.getLogger(__name__)

REFERENCE_FILE = "accepted_profile.json"


def _read_ingested(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path} does not exist: run `attnflow ingest` first")
    return pd.read_parquet(path)


def check_file(cfg: Config, root: Path, events_path: Path) -> dict[str, Any]:
    """Validate any canonical event file (CSV or Parquet) against the canonical suite.

    Ad hoc: it neither reads nor updates the accepted reference, and writes no report.
    """
    events = read_events(events_path)
    gx_root = root / cfg.paths.gx_root
    results = validate_events(gx_root, events, None, cfg.validate_, None)
    return {
        "success": True,
        "rows": len(events),
        "expectations": sum(r.evaluated for r in results),
        "data_docs": str(data_docs_index(gx_root)),
    }


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    """The DVC stage: validate the ingested tables, then accept them as the new reference."""
    events = _read_ingested(root / cfg.paths.ingested_dir / "events.parquet")
    items = _read_ingested(root / cfg.paths.ingested_dir / "items.parquet")
    gx_root = root / cfg.paths.gx_root
    ref_path = root / cfg.paths.reference_dir / REFERENCE_FILE
    dataset = cfg.ingest.dataset
    reference = load_reference(ref_path, dataset)
    results = validate_events(gx_root, events, items, cfg.validate_, reference)
    profile = profile_events(events, cfg.validate_.drift.top_items)
    save_reference(ref_path, dataset, profile)
    observed = {k: v for r in results for k, v in r.observed.items() if "kl_divergence" in k}
    report = {
        "success": True,
        "dataset": dataset,
        "rows": len(events),
        "expectations": sum(r.evaluated for r in results),
        "suites": {
            r.suite: {"expectations": r.evaluated, "failed": len(r.failures)} for r in results
        },
        "compared_to_previous_version": reference is not None,
        "drift": {k.split(":")[-1]: round(float(v), 6) for k, v in observed.items()},
        "data_docs": str(data_docs_index(gx_root)),
    }
    write_json(report, root / cfg.paths.reports_dir / "validate.json")
    return report
