"""A synthetic attention-flow generator with known answers.

The world: items belong to topics and have power-law (Zipf) popularity; each user has
a sparse mixture of latent interests over topics. A user's next item is, with
probability `pattern_prob`, the planted successor of the previous item (a sequential
pattern a sequence model should learn and a popularity model cannot); otherwise an
item drawn from the user's interests by popularity. Dwell time grows with the user's
interest in the item's topic, and so do clicks and purchases.

Everything is vectorised over users, so a million events take about a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.config import SyntheticConfig
from pipelines.events import coerce_events, coerce_items

TOPIC_WORDS = [
    "football",
    "jazz",
    "cooking",
    "astronomy",
    "travel",
    "painting",
    "chess",
    "gardening",
    "robotics",
    "poetry",
    "cycling",
    "photography",
    "history",
    "fashion",
    "finance",
    "birds",
]
START = pd.Timestamp("2024-01-01", tz="UTC")


@dataclass(frozen=True)
class World:
    """The latent truth behind a synthetic dataset."""

    item_topic: np.ndarray  # (n_items,) topic of each item
    popularity: np.ndarray  # (n_items,) sampling weight, Zipf over a random rank
    successor: np.ndarray  # (n_items,) the planted next item of each item
    user_interest: np.ndarray  # (n_users, n_topics) rows sum to 1


def make_world(cfg: SyntheticConfig) -> World:
    """Draw the latent world from `cfg.seed` (same seed, same world)."""
    rng = np.random.default_rng(cfg.seed)
    item_topic = rng.integers(0, cfg.n_topics, cfg.n_items)
    rank = rng.permutation(cfg.n_items) + 1
    popularity = 1.0 / rank.astype("float64") ** cfg.zipf_a
    # Successors stay inside the topic, so the pattern is learnable but not trivial.
    successor = np.empty(cfg.n_items, dtype=np.int64)
    for k in range(cfg.n_topics):
        members = np.flatnonzero(item_topic == k)
        if len(members) == 0:
            continue
        shuffled = rng.permutation(members)
        successor[shuffled] = np.roll(shuffled, -1) if len(members) > 1 else shuffled
    user_interest = rng.dirichlet(np.full(cfg.n_topics, 0.3), size=cfg.n_users)
    return World(item_topic, popularity, successor, user_interest)


def _sample_items(
    rng: np.random.Generator,
    world: World,
    topics: np.ndarray,
    cdfs: list[np.ndarray],
    members: list[np.ndarray],
) -> np.ndarray:
    """One popularity-weighted item per row, from the topic given for that row."""
    out = np.empty(len(topics), dtype=np.int64)
    for k, (cdf, mem) in enumerate(zip(cdfs, members, strict=True)):
        rows = np.flatnonzero(topics == k)
        if len(rows) == 0:
            continue
        if len(mem) == 0:  # an empty topic: fall back to any item
            out[rows] = rng.integers(0, len(world.item_topic), len(rows))
            continue
        out[rows] = mem[
            np.searchsorted(cdf, rng.random(len(rows)), side="right").clip(max=len(mem) - 1)
        ]
    return out


def generate(cfg: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Canonical (events, items) for the configured synthetic world."""
    world = make_world(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    n_topics = cfg.n_topics
    members = [np.flatnonzero(world.item_topic == k) for k in range(n_topics)]
    cdfs = []
    for mem in members:
        w = world.popularity[mem]
        cdfs.append(np.cumsum(w) / w.sum() if len(w) else np.array([]))
    interest_cdf = np.cumsum(world.user_interest, axis=1)

    lengths = np.maximum(3, rng.poisson(cfg.events_per_user - 1, cfg.n_users) + 1)
    max_len = int(lengths.max())
    items = np.full((cfg.n_users, max_len), -1, dtype=np.int64)
    prev = None
    for t in range(max_len):
        active = np.flatnonzero(lengths > t)
        u = rng.random(len(active))
        topic = (interest_cdf[active] < u[:, None]).sum(axis=1).clip(max=n_topics - 1)
        fresh = _sample_items(rng, world, topic, cdfs, members)
        if prev is not None:
            follow = rng.random(len(active)) < cfg.pattern_prob
            fresh = np.where(follow, world.successor[prev[active]], fresh)
        items[active, t] = fresh
        if prev is None:
            prev = np.zeros(cfg.n_users, dtype=np.int64)
        prev[active] = fresh

    user_idx, pos = np.nonzero(items >= 0)  # row-major: each user's events in order
    item_idx = items[user_idx, pos]
    interest = world.user_interest[user_idx, world.item_topic[item_idx]]  # in [0, 1]
    # Attention grows with interest: dwell ~ LogNormal(log 15s + 2.5 * interest, 0.6).
    dwell = np.exp(np.log(15.0) + 2.5 * interest + rng.normal(0, 0.6, len(item_idx)))
    dwell = np.minimum(dwell, 1200.0)  # attention spans are finite; validation caps dwell
    r = rng.random(len(item_idx))
    event = np.where(r < 0.05 + 0.25 * interest, "purchase", np.where(r < 0.6, "click", "view"))
    gaps = dwell + rng.exponential(300.0, len(item_idx))
    starts = rng.uniform(0, 300 * 86400, cfg.n_users)
    offsets = np.cumsum(gaps) - gaps  # global running sum; made per user below
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    offsets -= np.repeat(offsets[first], lengths)
    ts = START + pd.to_timedelta(np.repeat(starts, lengths) + offsets, unit="s")

    events = coerce_events(
        pd.DataFrame(
            {
                "user_id": np.char.add("u", user_idx.astype("str")),
                "item_id": np.char.add("i", item_idx.astype("str")),
                "ts": ts,
                "event": event,
                "dwell_s": np.round(dwell, 3),
            }
        )
    )
    ids = np.arange(cfg.n_items)
    words = np.array(TOPIC_WORDS * (n_topics // len(TOPIC_WORDS) + 1))[world.item_topic]
    items_df = coerce_items(
        pd.DataFrame(
            {
                "item_id": np.char.add("i", ids.astype("str")),
                "title": np.char.add("Item ", ids.astype("str")),
                "genres": words,
                "text": np.char.add(np.char.add("A piece about ", words), "."),
            }
        )
    )
    return events, items_df
