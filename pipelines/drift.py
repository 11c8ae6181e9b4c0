"""Drift between the newest data version and the one the champion was trained on.

The champion's lineage carries the profile of its training events (item popularity
over its top items, events-per-user histogram; see
`pipelines.expectations.profile_events`). The drift check profiles the newest
ingested events the same way and measures the KL divergence of both distributions,
the same statistics the validation suite's drift checks use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

EPS = 1e-6


@dataclass
class DriftReport:
    """How far the newest data moved from the champion's training data."""

    popularity_kl: float
    events_per_user_kl: float
    rows_now: int
    rows_then: int

    def exceeds(self, threshold: float) -> bool:
        return max(self.popularity_kl, self.events_per_user_kl) > threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "popularity_kl": round(self.popularity_kl, 6),
            "events_per_user_kl": round(self.events_per_user_kl, 6),
            "rows_now": self.rows_now,
            "rows_then": self.rows_then,
        }


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two discrete distributions, smoothed so that empty bins stay finite."""
    p = np.asarray(p, dtype=np.float64) + EPS
    q = np.asarray(q, dtype=np.float64) + EPS
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def measure(events: pd.DataFrame, reference: dict[str, Any]) -> DriftReport:
    """Drift of `events` from a reference profile."""
    top = list(reference["top_items"])
    counts = events["item_id"].value_counts()
    observed = np.array([counts.get(i, 0) for i in top] + [0.0], dtype=np.float64)
    observed[-1] = len(events) - observed[:-1].sum()
    expected = np.array([*reference["top_items"].values(), reference["other_share"]])
    per_user = events.groupby("user_id", sort=False).size().to_numpy()
    bins = np.asarray(reference["events_per_user_bins"])
    hist = np.histogram(np.clip(per_user, bins[0], bins[-1] - 1e-9), bins=bins)[0]
    return DriftReport(
        popularity_kl=kl(observed / max(1, len(events)), expected),
        events_per_user_kl=kl(hist, np.asarray(reference["events_per_user_weights"])),
        rows_now=len(events),
        rows_then=int(reference["n_rows"]),
    )
