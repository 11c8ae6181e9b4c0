"""Small synthetic splits with a planted sequential pattern, for model behaviour tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipelines.config import Config, SplitConfig, SyntheticConfig, load_config
from pipelines.split import build_sequences, leave_one_out, split_meta, write_split
from pipelines.synthetic import generate

REPO = Path(__file__).resolve().parents[2]


def make_split(out: Path, synthetic: SyntheticConfig, cold_items: int = 0) -> Path:
    """A split of synthetic data; `cold_items` catalog items that nobody attended to."""
    events, items = generate(synthetic)
    if cold_items:
        extra = pd.DataFrame(
            {
                "item_id": [f"cold{i}" for i in range(cold_items)],
                "title": [f"Cold {i}" for i in range(cold_items)],
                "genres": "chess",
                "text": "A piece about chess.",
            }
        )
        items = pd.concat([items, extra], ignore_index=True)
    cfg = SplitConfig(min_user_events=1, min_item_events=1, repeat_policy="keep_all")
    seq, users, item_map = build_sequences(events, items, cfg)
    splits = leave_one_out(seq)
    write_split(out, splits, users, item_map, split_meta("synthetic", seq, users, item_map, splits))
    return out


@pytest.fixture(scope="session")
def synth_split(tmp_path_factory) -> Path:
    """600 users, 150 items, strong planted successors."""
    return make_split(
        tmp_path_factory.mktemp("split") / "split",
        SyntheticConfig(
            n_users=600, n_items=150, n_topics=5, events_per_user=20, pattern_prob=0.7, seed=11
        ),
        cold_items=3,
    )


def small_config(**over) -> Config:
    """A tiny, fast model and training configuration (overrides as dotted keys)."""
    base = [
        "model.hidden=32",
        "model.layers=2",
        "model.heads=2",
        "model.max_len=20",
        "model.dropout=0.1",
        "train.epochs=3",
        "train.batch_size=32",
        "train.lr=0.005",
        "train.patience=10",
        "train.threads=1",
    ]
    return load_config(REPO / "params.yaml", base + [f"{k}={v}" for k, v in over.items()])
