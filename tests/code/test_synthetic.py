"""The synthetic generator: its latent truth shows up in the events."""

from __future__ import annotations

import numpy as np

from pipelines.config import SyntheticConfig
from pipelines.events import EVENT_COLUMNS
from pipelines.synthetic import generate, make_world


def _idx(series) -> np.ndarray:
    return series.str[1:].astype(int).to_numpy()


def test_same_seed_same_data_other_seed_other_data():
    cfg = SyntheticConfig(n_users=200, n_items=100, seed=3)
    a, _ = generate(cfg)
    b, _ = generate(cfg)
    c, _ = generate(cfg.model_copy(update={"seed": 4}))
    assert a.equals(b)
    assert not a["item_id"].equals(c["item_id"])


def test_planted_successors_are_followed_at_the_configured_rate():
    cfg = SyntheticConfig(n_users=800, n_items=300, pattern_prob=0.6, seed=1)
    events, _ = generate(cfg)
    assert list(events.columns) == EVENT_COLUMNS
    world = make_world(cfg)
    users, items = events["user_id"].to_numpy(), _idx(events["item_id"])
    same_user = users[1:] == users[:-1]
    follows = (world.successor[items[:-1]] == items[1:])[same_user].mean()
    assert 0.57 < follows < 0.66  # pattern_prob plus the chance of drawing it anyway


def test_popularity_is_power_law_like():
    cfg = SyntheticConfig(n_users=2000, n_items=500, pattern_prob=0.0, seed=2)
    events, _ = generate(cfg)
    counts = events["item_id"].value_counts().to_numpy()
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.3  # the top 10% of items hold far more than 10% of attention


def test_dwell_grows_with_interest():
    cfg = SyntheticConfig(n_users=1000, n_items=400, seed=5)
    events, _ = generate(cfg)
    world = make_world(cfg)
    u = events["user_id"].str[1:].astype(int).to_numpy()
    interest = world.user_interest[u, world.item_topic[_idx(events["item_id"])]]
    high = events["dwell_s"][interest > 0.5].median()
    low = events["dwell_s"][interest < 0.1].median()
    assert high > 2 * low
    assert events["dwell_s"].between(0, 1800).all()


def test_event_count_scales_with_config():
    events, items = generate(SyntheticConfig(n_users=100, n_items=50, events_per_user=20))
    assert 1500 < len(events) < 2500
    assert len(items) == 50 and items["text"].str.len().gt(0).all()
