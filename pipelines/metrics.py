"""Ranking metrics: HR@K, NDCG@K and MRR@K from the rank of each target.

A rank is 0-based: the number of candidates scored at least as high as the target,
other than the target itself. Ties count against the target, so a model that scores
everything alike ranks every target last rather than first.
"""

from __future__ import annotations

import numpy as np
import torch


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of each target among all columns of `scores` (B, N).

    `exclude` (B, H) lists item columns to drop (already seen; 0 is padding and is
    always dropped); the target itself is never dropped.
    """
    scores = scores.clone().float()
    rows = torch.arange(len(targets), device=scores.device)
    target_scores = scores[rows, targets]
    if exclude is not None:
        scores.scatter_(1, exclude.clamp(max=scores.shape[1] - 1), float("-inf"))
    scores[:, 0] = float("-inf")
    scores[rows, targets] = target_scores
    return (scores >= target_scores.unsqueeze(1)).sum(1) - 1


def sampled_ranks(
    scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """0-based rank of each target among itself and its sampled negatives (B, K)."""
    rows = torch.arange(len(targets), device=scores.device)
    t = scores[rows, targets].float()
    neg = scores.gather(1, negatives).float()
    return (neg >= t.unsqueeze(1)).sum(1)


def sample_negatives(
    histories: list[np.ndarray], targets: np.ndarray, n_items: int, k: int, seed: int
) -> np.ndarray:
    """SASRec's protocol: per user, `k` items drawn uniformly from 1..n_items that the
    user never interacted with (history or target), with a fixed seed. (A catalogue
    with fewer than `k` unseen items gives repeats; only toy data is that small.)"""
    rng = np.random.default_rng(seed)
    out = np.empty((len(targets), k), dtype=np.int64)
    for u, (hist, t) in enumerate(zip(histories, targets, strict=True)):
        seen = np.union1d(hist, [t])
        if n_items - len(seen) < k:
            # a catalogue too small for k distinct unseen items (toy data): draw the
            # unseen ones with replacement rather than fail
            unseen = np.setdiff1d(np.arange(1, n_items + 1), seen)
            out[u] = rng.choice(unseen, size=k, replace=True) if len(unseen) else t
            continue
        draws = rng.integers(1, n_items + 1, size=2 * k + 8)
        draws = draws[~np.isin(draws, seen)]
        while len(draws) < k:
            more = rng.integers(1, n_items + 1, size=2 * k)
            draws = np.concatenate([draws, more[~np.isin(more, seen)]])
        out[u] = draws[:k]
    return out


def metrics_from_ranks(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    """HR@K, NDCG@K and MRR@K averaged over targets, plus the mean reciprocal rank."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = (
            float(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0).mean()) if len(ranks) else 0.0
        )
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1), 0.0).mean()) if len(ranks) else 0.0
    out["mrr"] = float((1.0 / (ranks + 1)).mean()) if len(ranks) else 0.0
    return out
