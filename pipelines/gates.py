"""Offline gates: may a candidate version become `challenger`?

The candidate and the current champion are re-evaluated on the same frozen test
split (the candidate's data version), in raw item ids, so a champion trained on an
older version of the data is compared fairly: items it does not know score lowest.
A candidate passes when it

- answers a smoke check (k distinct, known items with finite, ordered scores, for
  known users and for explicit histories), and
- beats the best configured baseline by `gates.min_lift_vs_baseline` (relative), and
- is at most `gates.max_drop_vs_champion` (relative) below the champion.

The outcome, with every number it was decided on, is written as tags on the version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import Config
from pipelines.errors import AttnflowError
from pipelines.evaluate import evaluate_scores
from pipelines.inference import ServedModel
from pipelines.sequences import Batch, SplitData, history_batch

log = logging.getLogger(__name__)


class GateFailed(AttnflowError):
    """A candidate did not pass its gates; no alias was changed."""

    exit_code = 4


@dataclass
class GateResult:
    """The decision and the numbers behind it."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        out = {
            "gate.passed": str(self.passed).lower(),
            "gate.reason": "; ".join(self.reasons) or "all gates passed",
        }
        # MLflow tag names may not hold "@"
        out.update({f"gate.{k.replace('@', '_at_')}": f"{v:.6f}" for k, v in self.metrics.items()})
        return out


def split_score_fn(model: ServedModel, data: SplitData):
    """Score split batches with `model` in the split's item space (raw ids bridge the two).

    Items of the split the model does not know score -inf; history items the model
    does not know are dropped from its input.
    """
    split_ids = data.items.sort_values("item_idx")["item_id"].astype(str).tolist()
    to_model = np.zeros(data.n_catalog + 2, dtype=np.int64)  # split idx -> model idx (0: unknown)
    for idx, iid in enumerate(split_ids, start=1):
        to_model[idx] = model.item_index.get(iid, 0)
    known_cols = to_model[: data.n_items + 1]
    # split user rows (index + 1) -> the model's user rows; users it never saw get row 0
    split_users = data.users.sort_values("user_idx")["user_id"].astype(str).tolist()
    to_model_user = np.zeros(len(split_users) + 1, dtype=np.int64)
    for row, uid in enumerate(split_users, start=1):
        to_model_user[row] = model.user_index.get(uid, -1) + 1
    cfg = model.cfg
    mask = model.mask_token
    # event ids by name (vocabularies of different data versions may differ)
    model_events = {e: i + 1 for i, e in enumerate(model.spec.event_vocab)}
    to_model_event = np.array([0] + [model_events.get(e, 0) for e in data.event_vocab])

    def score(batch: Batch) -> torch.Tensor:
        rows_items, rows_gaps, rows_events, rows_w = [], [], [], []
        for b in range(len(batch.lengths)):
            n = int(batch.lengths[b])
            items = to_model[batch.items[b, :n].numpy()]
            keep = items > 0
            rows_items.append(items[keep])
            rows_gaps.append(np.clip(batch.gaps[b, :n].numpy()[keep], 0, cfg.time_buckets))
            rows_events.append(to_model_event[batch.events[b, :n].numpy()[keep]])
            rows_w.append(batch.weights[b, :n].numpy()[keep])
        from pipelines.sequences import Sequences

        lengths = [len(r) for r in rows_items]
        seqs = Sequences(
            items=np.concatenate(rows_items) if rows_items else np.zeros(0, np.int64),
            gaps=np.concatenate(rows_gaps) if rows_gaps else np.zeros(0, np.int64),
            events=np.concatenate(rows_events) if rows_events else np.zeros(0, np.int64),
            weights=np.concatenate(rows_w) if rows_w else np.zeros(0, np.int64),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )
        mb = history_batch(
            seqs,
            np.arange(len(lengths)),
            cfg.max_len,
            cfg.weight_buckets,
            mask,
            weights_bucketed=True,
            user_rows=None if batch.users is None else to_model_user[batch.users.numpy()],
        )
        model_scores = model.recommender.score(mb, catalog=True)  # (B, model n_catalog + 1)
        out = torch.full((len(lengths), data.n_items + 1), float("-inf"))
        known = torch.from_numpy(known_cols > 0)
        out[:, known] = model_scores[:, torch.from_numpy(known_cols[known_cols > 0])]
        empty = torch.tensor([n == 0 for n in lengths])
        out[empty] = float("-inf")
        return out

    return score


def smoke_check(model: ServedModel, n: int, k: int = 10, seed: int = 0) -> list[str]:
    """Problems found answering `n` requests (empty when the model behaves)."""
    rng = np.random.default_rng(seed)
    problems: list[str] = []
    users = list(model.user_index)
    known_items = model.item_ids[1 : model.spec.n_items + 1]
    for i in range(n):
        try:
            if i % 2 == 0 and users:
                rec = model.recommend(user_id=users[int(rng.integers(len(users)))], k=k)
            else:
                hist = list(rng.choice(known_items, size=min(5, len(known_items)), replace=False))
                rec = model.recommend(history=hist, k=k)
        except Exception as exc:  # any failure is a finding, not a crash of the gate
            problems.append(f"request {i} raised {type(exc).__name__}: {exc}")
            continue
        scores = np.asarray(rec.scores, dtype=np.float64)
        if len(rec.items) != min(k, len(known_items)) or len(set(rec.items)) != len(rec.items):
            problems.append(f"request {i}: {len(rec.items)} items, expected {k} distinct")
        elif not np.isfinite(scores).all():
            problems.append(f"request {i}: non-finite scores")
        elif np.any(np.diff(scores) > 1e-6):
            problems.append(f"request {i}: scores not in descending order")
        elif any(item not in model.item_index for item in rec.items):
            problems.append(f"request {i}: unknown item recommended")
    return problems


def run_gates(
    cfg: Config, candidate: ServedModel, data: SplitData, champion: ServedModel | None
) -> GateResult:
    """Smoke check, baseline gate and champion gate for `candidate` on `data`'s test split."""
    from pipelines.baselines import fit_baseline

    g = cfg.gates
    metric = g.metric
    result = GateResult(passed=True)
    problems = smoke_check(candidate, g.smoke_requests)
    if problems:
        result.passed = False
        result.reasons.append(f"smoke check failed: {problems[0]} ({len(problems)} problems)")
        return result
    common = dict(
        data=data,
        which="test",
        ks=[int(metric.split("@")[1])],
        max_len=10**6,
        weight_buckets_n=candidate.cfg.weight_buckets,
    )
    cand = evaluate_scores(split_score_fn(candidate, data), **common).full[metric]
    result.metrics[f"candidate_{metric}"] = cand
    best_base, best_name = 0.0, None
    # as in the evaluate stage: baselines learn from the events the candidate learned from
    seen = data.learned(cfg.train.refit_with_valid)
    for name in g.baselines:
        value = evaluate_scores(fit_baseline(name, seen, data.n_items).score, **common).full[metric]
        result.metrics[f"baseline_{name}_{metric}"] = value
        if value >= best_base:
            best_base, best_name = value, name
    if best_name is not None and cand <= best_base * (1 + g.min_lift_vs_baseline):
        result.passed = False
        result.reasons.append(
            f"{metric} {cand:.4f} does not beat {best_name} {best_base:.4f} "
            f"by {g.min_lift_vs_baseline:.0%}"
        )
    if champion is not None:
        champ = evaluate_scores(split_score_fn(champion, data), **common).full[metric]
        result.metrics[f"champion_{metric}"] = champ
        if cand < champ * (1 - g.max_drop_vs_champion):
            result.passed = False
            result.reasons.append(
                f"{metric} {cand:.4f} is more than {g.max_drop_vs_champion:.0%} below the "
                f"champion's {champ:.4f}"
            )
    return result


def gate_candidate(
    cfg: Config, root: Path, candidate_dir: Path, champion_source: str | None
) -> GateResult:
    """Load candidate (and champion, if any) and run the gates on the current split."""
    from pipelines.registry import fetch_model
    from pipelines.sequences import load_split

    candidate = ServedModel.load(candidate_dir)
    data = load_split(root / cfg.paths.split_dir, candidate.cfg.time_buckets)
    champion = None
    if champion_source is not None:
        champion = ServedModel.load(fetch_model(champion_source, root).folder)
    return run_gates(cfg, candidate, data, champion)


def summary(result: GateResult) -> dict[str, Any]:
    """JSON-friendly view of a gate result."""
    return {
        "passed": result.passed,
        "reasons": result.reasons,
        "metrics": {k: round(v, 6) for k, v in result.metrics.items()},
    }
