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

ScoreFn = Callable[[Batch], torch.Tensor]  # (B, n_items + 1) scores of every known item
CandidateFn = Callable[[Batch, torch.Tensor], torch.Tensor]  # items (B, C) -> scores (B, C)


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
    candidate_fn: CandidateFn | None = None,
) -> EvalResult:
    """Rank each user's target with `score_fn` (full ranking and/or sampled negatives).

    `candidate_fn`, when given, scores only the target and its sampled negatives; it is
    used when there is no full ranking to compute (the sampled-only validation).
    """
    seqs, targets = split_targets(data, which)
    users = np.arange(seqs.n_users) if users is None else np.asarray(users)
    n = len(users)
    ranks_full = np.zeros(n, dtype=np.int64)
    ranks_sampled = np.zeros(n, dtype=np.int64)
    only_candidates = not full and negatives is not None and candidate_fn is not None
    # Users in order of history length: a batch is padded to its own longest history, so
    # on sparse data (most histories a few events long) few positions are padding.
    # Ranks go back to `users`' order.
    order = np.argsort(seqs.lengths()[users], kind="stable")
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        chunk = users[rows]
        batch = history_batch(seqs, chunk, max_len, weight_buckets_n, mask_token)
        t = torch.from_numpy(targets[chunk])
        if only_candidates:
            cand = torch.cat([t.unsqueeze(1), torch.from_numpy(negatives[chunk])], dim=1)
            s = candidate_fn(batch, cand).cpu()  # (B, 1 + K): the target first
            ranks_sampled[rows] = (s[:, 1:] >= s[:, :1]).sum(1).numpy()
            continue
        scores = score_fn(batch)[:, : data.n_items + 1].cpu()
        if full:
            ranks_full[rows] = target_ranks(scores, t, _full_history(seqs, chunk)).numpy()
        if negatives is not None:
            neg = torch.from_numpy(negatives[chunk])
            ranks_sampled[rows] = sampled_ranks(scores, t, neg).numpy()
    result = EvalResult(users=users)
    if full:
        result.ranks_full = ranks_full
        result.full = metrics_from_ranks(ranks_full, ks)
    if negatives is not None:
        result.ranks_sampled = ranks_sampled
        result.sampled = metrics_from_ranks(ranks_sampled, ks)
    return result


def segments(
    result: EvalResult,
    data: SplitData,
    which: str,
    cfg: EvaluateConfig,
    learned: Sequences | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics by history length bucket and by how cold the target item is.

    Full-ranking HR@10 / NDCG@10 per segment, and the sampled protocol's beside them
    (`sampled_hr@10`, ...) when `result` has sampled ranks. How cold a target is counts
    its events in `learned`, the events the model learned from (default: `data.train`;
    after a refit, `data.history_test`). "unseen target" is the part of the cold segment
    that training never saw: an id-only model cannot rank those.
    """
    seqs, targets = split_targets(data, which)
    lengths = seqs.lengths()[result.users]
    learned = data.train if learned is None else learned
    train_counts = np.bincount(learned.items, minlength=data.n_catalog + 2)
    seen = train_counts[targets[result.users]]
    edges = [0, *cfg.history_buckets, np.inf]
    groups: list[tuple[str, np.ndarray]] = []
    for lo, hi in itertools.pairwise(edges):
        label = f"history {int(lo) + 1}-{int(hi)}" if np.isfinite(hi) else f"history >{int(lo)}"
        groups.append((label, (lengths > lo) & (lengths <= hi)))
    groups += [
        (f"cold target (<= {cfg.cold_item_max_train} in train)", seen <= cfg.cold_item_max_train),
        ("unseen target (0 in train)", seen == 0),
        ("warm target", seen > cfg.cold_item_max_train),
    ]
    out: dict[str, dict[str, float]] = {}
    for label, sel in groups:
        if not sel.any():
            continue
        row = {"users": int(sel.sum()), **_pick(metrics_from_ranks(result.ranks_full[sel], cfg.ks))}
        if result.ranks_sampled is not None:
            sampled = _pick(metrics_from_ranks(result.ranks_sampled[sel], cfg.ks))
            row.update({f"sampled_{k}": v for k, v in sampled.items()})
        out[label] = row
    return out


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in metrics.items() if k.startswith(("hr@10", "ndcg@10"))}


def model_score_fn(recommender) -> ScoreFn:
    """A score function over known items from a `Recommender`."""
    return lambda batch: recommender.score(batch)


def run(cfg: Config, root: Path = Path("."), defer_artifacts: bool = False) -> dict[str, Any]:
    """The DVC stage: evaluate the trained model on the test split, beside the baselines'
    scores from the `baselines` stage.

    `defer_artifacts`: log the metrics, and leave the report and the plots to
    `tracking.log_deferred_artifacts`.
    """
    from pipelines.baselines import load_scores
    from pipelines.errors import DataError
    from pipelines.events import write_json
    from pipelines.model import Recommender, load_model
    from pipelines.sequences import load_split
    from pipelines.tracking import log_evaluation

    model_dir = root / cfg.paths.model_dir
    if not (model_dir / "spec.json").exists():
        raise DataError(f"{model_dir} has no model: run `attnflow train` first")
    baselines = load_scores(cfg, root)  # before the model's scoring: a stale report fails fast
    encoder = load_model(model_dir)
    spec = encoder.spec
    mcfg = spec.config
    data = load_split(root / cfg.paths.split_dir, mcfg.time_buckets)
    ecfg = cfg.evaluate
    negatives = negatives_for(data, "test", ecfg.sampled_negatives, ecfg.seed)
    mask = spec.mask_token if mcfg.objective == "masked" else None
    rec = Recommender(encoder)
    model_result = evaluate_scores(
        model_score_fn(rec),
        data=data,
        which="test",
        ks=ecfg.ks,
        max_len=mcfg.max_len,
        weight_buckets_n=mcfg.weight_buckets,
        mask_token=mask,
        negatives=negatives,
    )
    seen = data.learned(cfg.train.refit_with_valid)
    report: dict[str, Any] = {
        "model": {"full": model_result.full, "sampled": model_result.sampled},
        "segments": segments(model_result, data, "test", ecfg, learned=seen),
        "baselines": baselines,
        "protocol": {
            "split": "test (leave-one-out: each user's last event)",
            "users": len(model_result.users),
            "full": "target vs every known item the user has not attended to",
            "sampled": f"target vs {ecfg.sampled_negatives} uniform unseen items, seed {ecfg.seed}",
        },
    }
    write_json(report, root / cfg.paths.reports_dir / "evaluate.json")
    log_evaluation(cfg, root, report, rec, data, artifacts=not defer_artifacts)
    return report
