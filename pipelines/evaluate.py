"""Evaluation: full-ranking and SASRec-sampled HR/NDCG/MRR@K, by segment, vs baselines.

Full ranking ranks each target against every known item the user has not already
attended to. The sampled protocol (SASRec, ICDM 2018) ranks it against 100 items
drawn uniformly from those the user never interacted with, with a fixed seed; it is
reported for comparison with papers and always beside the full-ranking numbers.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import Config, EvaluateConfig
from pipelines.metrics import metrics_from_ranks, sample_negatives, sampled_ranks, target_ranks
from pipelines.sequences import Batch, Sequences, SplitData, history_batch

log = logging.getLogger(__name__)

ScoreFn = Callable[[Batch], torch.Tensor]


@dataclass
class EvalResult:
    """Ranks and metrics of one scorer on one split."""

    users: np.ndarray
    ranks_full: np.ndarray | None = None
    ranks_sampled: np.ndarray | None = None
    full: dict[str, float] = field(default_factory=dict)
    sampled: dict[str, float] = field(default_factory=dict)


def _full_history(seqs: Sequences, users: np.ndarray) -> torch.Tensor:
    """(B, H) every item each user has attended to (for excluding seen items)."""
    rows = [seqs.items[seqs.user(int(u))] for u in users]
    width = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def split_targets(data: SplitData, which: str) -> tuple[Sequences, np.ndarray]:
    """(history, targets) of the validation or test split."""
    if which == "valid":
        return data.history_valid, data.valid_items
    return data.history_test, data.test_items


def negatives_for(data: SplitData, which: str, k: int, seed: int) -> np.ndarray:
    """The fixed sampled negatives of every user for `which` (valid or test)."""
    seqs, targets = split_targets(data, which)
    hist = [seqs.items[seqs.user(u)] for u in range(seqs.n_users)]
    return sample_negatives(hist, targets, data.n_items, k, seed)


def evaluate_scores(
    score_fn: ScoreFn,
    data: SplitData,
    which: str,
    ks: list[int],
    max_len: int,
    weight_buckets_n: int,
    mask_token: int | None = None,
    negatives: np.ndarray | None = None,
    users: np.ndarray | None = None,
    batch_size: int = 256,
    full: bool = True,
) -> EvalResult:
    """Rank each user's target with `score_fn` (full ranking and/or sampled negatives)."""
    seqs, targets = split_targets(data, which)
    users = np.arange(seqs.n_users) if users is None else np.asarray(users)
    r_full, r_sampled = [], []
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        batch = history_batch(seqs, chunk, max_len, weight_buckets_n, mask_token)
        scores = score_fn(batch)[:, : data.n_items + 1].cpu()
        t = torch.from_numpy(targets[chunk])
        if full:
            r_full.append(target_ranks(scores, t, _full_history(seqs, chunk)).numpy())
        if negatives is not None:
            r_sampled.append(sampled_ranks(scores, t, torch.from_numpy(negatives[chunk])).numpy())
    result = EvalResult(users=users)
    if full:
        result.ranks_full = np.concatenate(r_full)
        result.full = metrics_from_ranks(result.ranks_full, ks)
    if negatives is not None:
        result.ranks_sampled = np.concatenate(r_sampled)
        result.sampled = metrics_from_ranks(result.ranks_sampled, ks)
    return result


def segments(
    result: EvalResult, data: SplitData, which: str, cfg: EvaluateConfig, metric: str = "ndcg@10"
) -> dict[str, dict[str, float]]:
    """Full-ranking metrics by history length bucket and by how cold the target item is."""
    seqs, targets = split_targets(data, which)
    lengths = seqs.lengths()[result.users]
    train_counts = np.bincount(data.train.items, minlength=data.n_catalog + 2)
    cold = train_counts[targets[result.users]] <= cfg.cold_item_max_train
    edges = [0, *cfg.history_buckets, np.inf]
    out: dict[str, dict[str, float]] = {}
    ranks = result.ranks_full
    for lo, hi in itertools.pairwise(edges):
        sel = (lengths > lo) & (lengths <= hi)
        label = f"history {int(lo) + 1}-{int(hi)}" if np.isfinite(hi) else f"history >{int(lo)}"
        if sel.any():
            out[label] = {"users": int(sel.sum()), **_pick(metrics_from_ranks(ranks[sel], cfg.ks))}
    for label, sel in (
        (f"cold target (<= {cfg.cold_item_max_train} in train)", cold),
        ("warm target", ~cold),
    ):
        if sel.any():
            out[label] = {"users": int(sel.sum()), **_pick(metrics_from_ranks(ranks[sel], cfg.ks))}
    return out


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in metrics.items() if k.startswith(("hr@10", "ndcg@10"))}


def model_score_fn(recommender) -> ScoreFn:
    """A score function over known items from a `Recommender`."""
    return lambda batch: recommender.score(batch)


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    """The DVC stage: evaluate the trained model and the baselines on the test split."""
    from pipelines.baselines import fit_baseline
    from pipelines.errors import DataError
    from pipelines.events import write_json
    from pipelines.model import Recommender, load_model
    from pipelines.sequences import load_split
    from pipelines.tracking import log_evaluation

    model_dir = root / cfg.paths.model_dir
    if not (model_dir / "spec.json").exists():
        raise DataError(f"{model_dir} has no model: run `attnflow train` first")
    encoder = load_model(model_dir)
    spec = encoder.spec
    mcfg = spec.config
    data = load_split(root / cfg.paths.split_dir, mcfg.time_buckets)
    ecfg = cfg.evaluate
    negatives = negatives_for(data, "test", ecfg.sampled_negatives, ecfg.seed)
    mask = spec.mask_token if mcfg.objective == "masked" else None
    rec = Recommender(encoder)
    common = dict(
        data=data,
        which="test",
        ks=ecfg.ks,
        max_len=mcfg.max_len,
        weight_buckets_n=mcfg.weight_buckets,
        negatives=negatives,
    )
    model_result = evaluate_scores(model_score_fn(rec), mask_token=mask, **common)
    report: dict[str, Any] = {
        "model": {"full": model_result.full, "sampled": model_result.sampled},
        "segments": segments(model_result, data, "test", ecfg),
        "baselines": {},
        "protocol": {
            "split": "test (leave-one-out: each user's last event)",
            "users": len(model_result.users),
            "full": "target vs every known item the user has not attended to",
            "sampled": f"target vs {ecfg.sampled_negatives} uniform unseen items, seed {ecfg.seed}",
        },
    }
    for name in ecfg.baselines:
        base = fit_baseline(name, data.train, data.n_items)
        res = evaluate_scores(base.score, **{**common, "max_len": 10**6})
        report["baselines"][name] = {"full": res.full, "sampled": res.sampled}
    write_json(report, root / cfg.paths.reports_dir / "evaluate.json")
    log_evaluation(cfg, root, report, rec, data)
    return report
