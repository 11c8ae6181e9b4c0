"""Stage `split`: per-user attention sequences and the leave-one-out split.

Steps, in order: keep the configured event types; drop exact duplicates; order each
user's events by time (ties keep file order); compute each event's attention weight;
apply the repeat policy; k-core filter users and items; drop users too short for
leave-one-out; map ids to dense indices; split each sequence as SASRec does (last
event test, second last validation, the rest train). The splits suite runs before
anything is published, so a bad split never reaches training.

Outputs in ``data/split/``: ``train|valid|test.parquet`` (user_idx, item_idx, ts,
event, value, dwell_s, weight, pos), ``users.parquet`` (user_idx, user_id),
``items.parquet`` (item_idx, item_id, title, genres, text, n_events) and ``meta.json``.
Item index 0 is padding; known items are 1..n_items, catalog items never seen in the
events (cold start) follow them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Config, SplitConfig, WeightsConfig
from pipelines.errors import DataError
from pipelines.events import atomic_path, write_json

log = logging.getLogger(__name__)

SEQ_COLUMNS = ["user_idx", "item_idx", "ts", "event", "value", "dwell_s", "weight", "pos"]


def attention_weights(events: pd.DataFrame, cfg: WeightsConfig) -> pd.Series:
    """Per-event attention weight: event base weight x rating factor x dwell factor.

    The dwell factor is log1p(dwell) / log1p(dwell_ref), clipped to
    [dwell_min_factor, dwell_max_factor]; events without dwell get factor 1.
    """
    base = events["event"].map(cfg.event).astype("float64").fillna(cfg.default)
    rating = pd.Series(1.0, index=events.index)
    if cfg.rating_scale:
        is_rate = (events["event"] == "rate") & events["value"].notna()
        rating = rating.where(~is_rate, events["value"] / cfg.rating_max)
    dwell = np.log1p(events["dwell_s"].clip(lower=0)) / np.log1p(cfg.dwell_ref_s)
    dwell = dwell.clip(cfg.dwell_min_factor, cfg.dwell_max_factor).fillna(1.0)
    return (base * rating * dwell).astype("float64")


def k_core(events: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Repeatedly drop users and items with too few events until none is left to drop."""
    while True:
        user_n = events.groupby("user_id", sort=False)["item_id"].transform("size")
        item_n = events.groupby("item_id", sort=False)["user_id"].transform("size")
        keep = (user_n >= min_user) & (item_n >= min_item)
        if keep.all():
            return events
        events = events[keep]


def apply_repeat_policy(events: pd.DataFrame, policy: str) -> pd.DataFrame:
    """Handle a user attending to the same item again (events sorted by user, time).

    keep_first: one event per (user, item), at its first time, carrying the highest
    weight any of its events had; collapse_consecutive: drop immediate repeats;
    keep_all: leave repeats in.
    """
    if policy == "keep_all":
        return events
    if policy == "collapse_consecutive":
        same = (events["user_id"] == events["user_id"].shift()) & (
            events["item_id"] == events["item_id"].shift()
        )
        return events[~same]
    best = events.groupby(["user_id", "item_id"], sort=False)["weight"].transform("max")
    events = events.assign(weight=best)
    return events[~events.duplicated(["user_id", "item_id"], keep="first")]


def _first_seen_order(events: pd.DataFrame, col: str) -> pd.Index:
    """Ids ordered by their first event (then by id): a deterministic, stable index."""
    first = events.groupby(col, sort=False)["ts"].min().reset_index()
    return pd.Index(first.sort_values(["ts", col], kind="stable")[col])


def build_sequences(
    events: pd.DataFrame, items: pd.DataFrame, cfg: SplitConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(sequences, users map, items map) from canonical events and items."""
    if cfg.event_types is not None:
        events = events[events["event"].isin(cfg.event_types)]
    if cfg.exclude_events:
        events = events[~events["event"].isin(cfg.exclude_events)]
    events = events.drop_duplicates()
    events = events.assign(_order=np.arange(len(events)))
    events = events.sort_values(["user_id", "ts", "_order"], kind="stable")
    events = events.assign(weight=attention_weights(events, cfg.weights))
    events = apply_repeat_policy(events, cfg.repeat_policy)
    events = k_core(events, cfg.min_user_events, cfg.min_item_events)
    seq_len = events.groupby("user_id", sort=False)["item_id"].transform("size")
    events = events[seq_len >= cfg.min_seq_len]
    if events.empty:
        raise DataError(
            "no user is left after filtering (split.min_user_events="
            f"{cfg.min_user_events}, split.min_item_events={cfg.min_item_events}, "
            f"split.min_seq_len={cfg.min_seq_len}); lower them or ingest more data"
        )
    user_order = _first_seen_order(events, "user_id")
    item_order = _first_seen_order(events, "item_id")
    users = pd.DataFrame({"user_idx": np.arange(len(user_order)), "user_id": user_order})
    known = pd.DataFrame({"item_id": item_order, "item_idx": np.arange(1, len(item_order) + 1)})
    known["n_events"] = known["item_id"].map(events["item_id"].value_counts()).astype("int64")
    cold = items.loc[~items["item_id"].isin(item_order), ["item_id"]].sort_values("item_id")
    cold = cold.assign(item_idx=np.arange(len(known) + 1, len(known) + 1 + len(cold)), n_events=0)
    item_map = pd.concat([known, cold], ignore_index=True).merge(items, on="item_id", how="left")
    for col in ("title", "genres", "text"):
        item_map[col] = item_map[col].fillna("").astype("str")
    item_map = item_map[["item_idx", "item_id", "title", "genres", "text", "n_events"]]

    seq = events.assign(
        user_idx=events["user_id"].map(pd.Series(users["user_idx"].values, index=user_order)),
        item_idx=events["item_id"].map(pd.Series(known["item_idx"].values, index=item_order)),
    )
    seq = seq.sort_values(["user_idx", "ts", "_order"], kind="stable")
    seq["pos"] = seq.groupby("user_idx", sort=False).cumcount()
    return seq[SEQ_COLUMNS].reset_index(drop=True), users, item_map


def leave_one_out(seq: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """SASRec's split: last event test, second last validation, the rest train."""
    n = seq.groupby("user_idx", sort=False)["pos"].transform("size")
    from_end = n - 1 - seq["pos"]
    return {
        "train": seq[from_end >= 2].reset_index(drop=True),
        "valid": seq[from_end == 1].reset_index(drop=True),
        "test": seq[from_end == 0].reset_index(drop=True),
    }


def split_presence(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per user: events in each split and the boundary timestamps (for the suite)."""
    users = pd.Index(
        np.union1d(
            np.union1d(splits["train"]["user_idx"], splits["valid"]["user_idx"]),
            splits["test"]["user_idx"],
        )
    )
    out = pd.DataFrame(index=users)
    for name, df in splits.items():
        out[f"n_{name}"] = df.groupby("user_idx").size().reindex(users, fill_value=0)
    out["last_train_ts"] = splits["train"].groupby("user_idx")["ts"].max().reindex(users)
    out["valid_ts"] = splits["valid"].groupby("user_idx")["ts"].max().reindex(users)
    out["test_ts"] = splits["test"].groupby("user_idx")["ts"].max().reindex(users)
    return out.reset_index(names="user_idx")


def _order_only(dataset: str) -> bool:
    from pipelines.datasets import REGISTRY

    spec = REGISTRY.get(dataset)
    return bool(spec and spec.order_only)


def split_meta(
    dataset: str,
    seq: pd.DataFrame,
    users: pd.DataFrame,
    item_map: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
) -> dict[str, Any]:
    """The split's summary: sizes, and whether timestamps carry only order."""
    return {
        "dataset": dataset,
        "order_only": _order_only(dataset),
        "n_users": len(users),
        "n_items": int((item_map["n_events"] > 0).sum()),
        "n_catalog_items": len(item_map),
        "n_events": len(seq),
        "n_train_events": len(splits["train"]),
        "avg_seq_len": round(len(seq) / len(users), 3),
        "max_seq_len": int(seq.groupby("user_idx").size().max()),
    }


def write_split(
    out_dir: Path,
    splits: dict[str, pd.DataFrame],
    users: pd.DataFrame,
    item_map: pd.DataFrame,
    meta: dict[str, Any],
) -> None:
    """Publish a split folder atomically."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for name, df in splits.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        users.to_parquet(tmp / "users.parquet", index=False)
        item_map.to_parquet(tmp / "items.parquet", index=False)
        write_json(meta, tmp / "meta.json")


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    """The DVC stage: build, validate and publish the split, and `reports/split.json`."""
    from pipelines.expectations import raise_on_failure, run_suites, splits_expectations

    src = root / cfg.paths.ingested_dir
    if not (src / "events.parquet").exists():
        raise DataError(f"{src / 'events.parquet'} does not exist: run `attnflow ingest` first")
    events = pd.read_parquet(src / "events.parquet")
    items = pd.read_parquet(src / "items.parquet")
    seq, users, item_map = build_sequences(events, items, cfg.split)
    splits = leave_one_out(seq)
    gx_root = root / cfg.paths.gx_root
    results = run_suites(gx_root, [("splits", split_presence(splits), splits_expectations())])
    raise_on_failure(results, gx_root)
    meta = split_meta(cfg.ingest.dataset, seq, users, item_map, splits)
    write_split(root / cfg.paths.split_dir, splits, users, item_map, meta)
    write_json(meta, root / cfg.paths.reports_dir / "split.json")
    log.info(
        "split: %d users, %d items, %d events", meta["n_users"], meta["n_items"], meta["n_events"]
    )
    return meta
