"""Great Expectations gates: suites for raw input, canonical events and splits.

Suites are built in code from `params.yaml` (the `validate` section) and from the
profile of the last accepted data version, then written into the file data context
under ``gx/`` and run by one Checkpoint per table; Data Docs are rebuilt once per
validation, for every result it produced. GX reports `success=False` rather than
raising, so `raise_on_failure` turns a failed result into `ValidationFailed`, naming
each failed expectation with its observed value and the Data Docs path: nothing
downstream runs on rejected data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import ValidateConfig
from pipelines.errors import ValidationFailed
from pipelines.events import EVENT_COLUMNS, TS_DTYPE
from pipelines.readers import RawTable

log = logging.getLogger(__name__)

DATASOURCE = "attnflow"
DOCS_SITE = "local_site"
OTHER = "__other__"
EPS = 1e-6


@dataclass
class SuiteResult:
    """What one Checkpoint run found."""

    suite: str
    success: bool
    evaluated: int
    failures: list[str] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)
    result_ids: list[Any] = field(default_factory=list)  # GX validation result identifiers


def get_context(root: Path):
    """The file data context in `<root>/gx`, created on first use, quiet and offline."""
    return _context(Path(root).resolve())


@functools.cache
def _context(root: Path):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(root))
    bars = context.variables.progress_bars
    if isinstance(bars, dict):
        bars = ProgressBarsConfig(**bars)
    if bars is None or bars.globally or bars.metric_calculations:
        context.variables.progress_bars = ProgressBarsConfig(
            globally=False, metric_calculations=False
        )
        context.variables.save()
    return context


def data_docs_index(root: Path) -> Path:
    """Path of the Data Docs index page."""
    return Path(root) / "gx" / "uncommitted" / "data_docs" / DOCS_SITE / "index.html"


def _batch_definition(context, asset_name: str):
    try:
        source = context.data_sources.get(DATASOURCE)
    except (KeyError, ValueError):
        source = context.data_sources.add_pandas(DATASOURCE)
    try:
        asset = source.get_asset(asset_name)
    except (KeyError, LookupError, ValueError):
        asset = source.add_dataframe_asset(asset_name)
    try:
        return asset.get_batch_definition("whole")
    except (KeyError, LookupError, ValueError):
        return asset.add_batch_definition_whole_dataframe("whole")


def _describe(result) -> str:
    """One line per failed expectation: type, column, observed value or unexpected sample."""
    cfg = result.expectation_config
    kwargs = cfg.kwargs
    target = kwargs.get("column") or kwargs.get("column_list") or "table"
    res = result.result or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        msg = str(result.exception_info.get("exception_message", "")).splitlines()[0]
        return f"{cfg.type}({target}): raised {msg}"
    if "observed_value" in res:
        observed = res["observed_value"]
        if isinstance(observed, float | np.floating):
            observed = round(float(observed), 6)
        bounds = {
            k: kwargs[k] for k in ("min_value", "max_value", "threshold", "value") if k in kwargs
        }
        return (
            f"{cfg.type}({target}): observed {observed!r}, expected {bounds or kwargs.get('type_')}"
        )
    count = res.get("unexpected_count")
    pct = res.get("unexpected_percent")
    sample = list(res.get("partial_unexpected_list") or [])[:3]
    sample = [str(s) for s in sample]
    return f"{cfg.type}({target}): {count} unexpected ({(pct or 0):.3g}%), e.g. {sample}"


def run_checkpoint(root: Path, name: str, df: pd.DataFrame, expectations: list) -> SuiteResult:
    """Write suite `name` and run it on `df` through its Checkpoint."""
    import great_expectations as gx

    context = get_context(root)
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    suite = context.suites.add_or_update(suite)
    vd = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(data=_batch_definition(context, name), suite=suite, name=name)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=name,
            validation_definitions=[vd],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    failures: list[str] = []
    observed: dict[str, Any] = {}
    evaluated = 0
    for run in result.run_results.values():
        for r in run.results:
            evaluated += 1
            res = r.result or {}
            if "observed_value" in res and np.isscalar(res["observed_value"]):
                key = f"{r.expectation_config.type}:{r.expectation_config.kwargs.get('column', '')}"
                observed[key] = _jsonable(res["observed_value"])
            if not r.success:
                failures.append(_describe(r))
    log.info("suite %s: %d expectations, %d failed", name, evaluated, len(failures))
    return SuiteResult(
        name, bool(result.success), evaluated, failures, observed, list(result.run_results)
    )


def run_suites(root: Path, suites: list[tuple[str, pd.DataFrame, list]]) -> list[SuiteResult]:
    """Run every (name, frame, expectations) suite, then rebuild Data Docs once for them all.

    Old validation results beyond `KEEP_RESULTS` per suite are pruned first, so the
    Data Docs rebuild stays fast however many versions have been validated.
    """
    prune_results(root)
    results = [run_checkpoint(root, name, df, exps) for name, df, exps in suites]
    ids = [i for r in results for i in r.result_ids]
    get_context(root).build_data_docs(site_names=[DOCS_SITE], resource_identifiers=ids)
    return results


KEEP_RESULTS = 20


def prune_results(root: Path, keep: int = KEEP_RESULTS) -> None:
    """Keep the newest `keep` validation results (and their Data Docs pages) per suite."""
    import shutil

    uncommitted = Path(root) / "gx" / "uncommitted"
    for base in (
        uncommitted / "validations",
        uncommitted / "data_docs" / DOCS_SITE / "validations",
    ):
        if not base.is_dir():
            continue
        for run_dir in base.glob("*/*"):  # <suite>/<run name>/<run time>/...
            runs = sorted((p for p in run_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
            for old in runs[:-keep]:
                shutil.rmtree(old, ignore_errors=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def raise_on_failure(results: list[SuiteResult], root: Path) -> None:
    """Raise `ValidationFailed` naming every failed expectation and the Data Docs path."""
    failures = [f"[{r.suite}] {f}" for r in results for f in r.failures]
    if failures:
        docs = data_docs_index(root)
        raise ValidationFailed(
            f"validation failed: {'; '.join(failures)}; Data Docs: {docs}", failures, str(docs)
        )


# --- suites ------------------------------------------------------------------------------------


def raw_expectations(table: RawTable) -> list:
    """Raw input: the reader's columns, their types, non-null ids and value ranges."""
    import great_expectations as gx

    E = gx.expectations
    exp: list = [E.ExpectTableColumnsToMatchSet(column_set=list(table.types), exact_match=False)]
    exp.append(E.ExpectTableRowCountToBeBetween(min_value=1))
    for col, types in table.types.items():
        if types is not None:
            exp.append(E.ExpectColumnValuesToBeInTypeList(column=col, type_list=types))
    for col in table.not_null:
        exp.append(E.ExpectColumnValuesToNotBeNull(column=col))
    for col, (lo, hi) in table.ranges.items():
        exp.append(E.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi))
    return exp


def events_expectations(
    cfg: ValidateConfig, reference: dict[str, Any] | None, now: datetime | None = None
) -> list:
    """Canonical events: schema, ids, time range, event types, ratings, dwell, duplicates, size."""
    import great_expectations as gx

    E = gx.expectations
    now = now or datetime.now(UTC)
    latest = (now + timedelta(seconds=cfg.future_skew_s)).isoformat()
    exp: list = [
        E.ExpectTableColumnsToMatchSet(column_set=EVENT_COLUMNS, exact_match=False),
        E.ExpectColumnTypeToBe(column="user_id", type_="str"),
        E.ExpectColumnTypeToBe(column="item_id", type_="str"),
        E.ExpectColumnTypeToBe(column="ts", type_=TS_DTYPE),
        E.ExpectColumnTypeToBe(column="event", type_="str"),
        E.ExpectColumnTypeToBe(column="value", type_="float64"),
        E.ExpectColumnTypeToBe(column="dwell_s", type_="float64"),
        E.ExpectColumnValuesToNotBeNull(column="user_id"),
        E.ExpectColumnValuesToNotBeNull(column="item_id"),
        E.ExpectColumnValuesToNotBeNull(column="ts"),
        E.ExpectColumnValuesToNotBeNull(column="event"),
        E.ExpectColumnValuesToBeBetween(column="ts", min_value=cfg.ts_min, max_value=latest),
        E.ExpectColumnValuesToBeInSet(column="event", value_set=cfg.event_types),
        E.ExpectColumnValuesToBeBetween(
            column="value",
            min_value=cfg.rating_min,
            max_value=cfg.rating_max,
            row_condition='event=="rate"',
            condition_parser="pandas",
        ),
        E.ExpectColumnValuesToBeBetween(column="dwell_s", min_value=0, max_value=cfg.dwell_max_s),
        E.ExpectCompoundColumnsToBeUnique(
            column_list=["user_id", "item_id", "ts", "event"], mostly=1.0 - cfg.max_duplicate_rate
        ),
    ]
    lo, hi = cfg.min_rows, None
    if reference:
        ref_rows = reference["n_rows"]
        lo = max(lo, int(ref_rows * (1 - cfg.row_count_tolerance)))
        hi = int(np.ceil(ref_rows * (1 + cfg.row_count_tolerance)))
    exp.append(E.ExpectTableRowCountToBeBetween(min_value=lo, max_value=hi))
    return exp


def items_expectations() -> list:
    """Items: unique, non-null ids and a text column."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableColumnsToMatchSet(column_set=["item_id", "title", "genres", "text"]),
        E.ExpectColumnValuesToNotBeNull(column="item_id"),
        E.ExpectColumnValuesToBeUnique(column="item_id"),
        E.ExpectColumnValuesToBeOfType(column="text", type_="str"),
    ]


def splits_expectations() -> list:
    """Splits, on one row per user: exactly one valid and one test event, train non-empty."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToBeBetween(column="n_train", min_value=1),
        E.ExpectColumnValuesToBeBetween(column="n_valid", min_value=1, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="n_test", min_value=1, max_value=1),
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="test_ts", column_B="valid_ts", or_equal=True
        ),
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="valid_ts", column_B="last_train_ts", or_equal=True
        ),
    ]


# --- profiles and drift ----------------------------------------------------------------------


def profile_events(events: pd.DataFrame, top_items: int) -> dict[str, Any]:
    """Summary of a data version that later versions are compared against."""
    pop = events["item_id"].value_counts()
    per_user = events.groupby("user_id", sort=False).size()
    top = pop.head(top_items)
    shares = (top / len(events)).round(8)
    # Bins of events-per-user from this version's quantiles (log-spaced data, so quantiles).
    edges = np.unique(np.quantile(per_user.to_numpy(), np.linspace(0, 1, 11)))
    if len(edges) < 2:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    edges[-1] += 1e-9
    hist, _ = np.histogram(per_user.to_numpy(), bins=edges)
    return {
        "n_rows": len(events),
        "n_users": int(per_user.size),
        "n_items": int(pop.size),
        "top_items": {str(k): float(v) for k, v in shares.items()},
        "other_share": float(max(0.0, 1.0 - shares.sum())),
        "events_per_user_bins": [float(e) for e in edges],
        "events_per_user_weights": [float(w) for w in hist / hist.sum()],
    }


def _smooth(weights: list[float]) -> list[float]:
    w = np.asarray(weights, dtype="float64") + EPS
    return list(w / w.sum())


def drift_frames(events: pd.DataFrame, reference: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Derived tables that the drift suites run on: popularity buckets and events per user."""
    top = reference["top_items"]
    bucket = events["item_id"].where(events["item_id"].isin(list(top)), OTHER)
    per_user = events.groupby("user_id", sort=False).size().astype("float64")
    return {
        "popularity": pd.DataFrame({"item_bucket": bucket.astype("str")}),
        "user_activity": pd.DataFrame({"events_per_user": per_user.to_numpy()}),
    }


def drift_expectations(cfg: ValidateConfig, reference: dict[str, Any]) -> dict[str, list]:
    """KL divergence of item popularity and events per user from the last accepted version."""
    import great_expectations as gx

    E = gx.expectations
    values = [*reference["top_items"], OTHER]
    weights = _smooth([*reference["top_items"].values(), reference["other_share"]])
    bins = reference["events_per_user_bins"]
    tail = 0.01  # mass for counts outside the reference range, so they cost KL, not infinity
    ew = np.asarray(_smooth(reference["events_per_user_weights"])) * (1 - tail)
    return {
        "popularity": [
            E.ExpectColumnKLDivergenceToBeLessThan(
                column="item_bucket",
                partition_object={"values": values, "weights": weights},
                threshold=cfg.drift.popularity_kl_max,
            )
        ],
        "user_activity": [
            E.ExpectColumnKLDivergenceToBeLessThan(
                column="events_per_user",
                partition_object={
                    "bins": bins,
                    "weights": list(ew),
                    "tail_weights": [tail / 2, tail / 2],
                },
                threshold=cfg.drift.events_per_user_kl_max,
            )
        ],
    }


# --- references (last accepted version) ------------------------------------------------------


def load_reference(path: Path, dataset: str) -> dict[str, Any] | None:
    """The profile of the last accepted version of `dataset`, if any."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(dataset)
    except (json.JSONDecodeError, AttributeError):
        log.warning("%s is not valid JSON; treating this as the first version", path)
        return None


def save_reference(path: Path, dataset: str, profile: dict[str, Any]) -> None:
    """Record `profile` as the last accepted version of `dataset`."""
    from pipelines.events import atomic_path

    existing: dict[str, Any] = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            existing = {}
    existing[dataset] = profile
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def validate_raw(
    root: Path, source_name: str, frames: dict[str, pd.DataFrame], schema: dict[str, RawTable]
) -> list[SuiteResult]:
    """Run the raw input suite of each table a reader produced; raise on failure."""
    results = run_suites(
        root,
        [
            (f"raw_{source_name}_{t}", frames[t], raw_expectations(spec))
            for t, spec in schema.items()
        ],
    )
    raise_on_failure(results, root)
    return results


def validate_events(
    root: Path,
    events: pd.DataFrame,
    items: pd.DataFrame | None,
    cfg: ValidateConfig,
    reference: dict[str, Any] | None,
) -> list[SuiteResult]:
    """Canonical events (and items), plus drift against `reference` when there is one."""
    suites = [("events", events, events_expectations(cfg, reference))]
    if items is not None:
        suites.append(("items", items, items_expectations()))
    if reference and cfg.drift.enabled:
        frames = drift_frames(events, reference)
        for name, exps in drift_expectations(cfg, reference).items():
            suites.append((f"drift_{name}", frames[name], exps))
    results = run_suites(root, suites)
    raise_on_failure(results, root)
    return results
