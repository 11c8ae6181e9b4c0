"""Shared set-up for benchmarks: scratch projects and the datasets' configurations."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"  # scratch projects (git-ignored)

# The SASRec protocol on games: no filtering beyond the data's own, repeats kept.
GAMES_SPLIT = [
    "ingest.dataset=games",
    "split.min_user_events=1",
    "split.min_item_events=1",
    "split.repeat_policy=keep_all",
]


def games_overrides() -> list[str]:
    """attnflow's configuration for games (sparse, order-only, 23.7k items)."""
    return [
        *GAMES_SPLIT,
        "model.hidden=64",
        "model.layers=2",
        "model.heads=1",
        "model.ffn_mult=1",
        "model.activation=relu",
        "model.dropout=0.3",
        "model.max_len=50",
        "train.loss=sampled",
        "train.negatives=2048",
        "train.batch_size=128",
        "train.epochs=200",
        "train.early_stop_protocol=sampled",
        "train.patience=5",
    ]


def scratch_project(name: str, overrides: list[str], fresh: bool = False) -> Path:
    """A scratch project with the data stages run for `overrides` (cached between runs)."""
    from pipelines import ingest, split, validate
    from pipelines.config import load_config

    os.environ.setdefault("ATTNFLOW_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    root = WORK / name
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    cfg = load_config(root / "params.yaml", overrides)
    if not (root / cfg.paths.split_dir / "meta.json").exists():
        ingest.run(cfg, root)
        validate.run(cfg, root)
        split.run(cfg, root)
    return root


def games_split() -> Path:
    """The games split (SASRec protocol), built once."""
    root = scratch_project("games", GAMES_SPLIT)
    return root / "data" / "split"
