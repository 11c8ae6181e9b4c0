"""Baselines every model must beat: most popular, item-kNN on co-occurrence, last-item Markov.

Each is fitted on the training sequences and scores a batch of histories like the
model does: `score(batch) -> (B, n_items + 1)`, column 0 unused.

The `baselines` stage scores them on the test split once per split and evaluation
protocol (`reports/baselines.json`); `evaluate` reads that report. A retrain that
changes only the model or its training skips the baselines (item-kNN's fit alone is
about 0.8 s on ml-latest-small).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pipelines.config import Config
from pipelines.sequences import Batch, Sequences, data_sha256


class MostPopular:
    """Score = how often the item occurs in training."""

    name = "most_popular"

    def __init__(self, train: Sequences, n_items: int):
        counts = np.bincount(train.items, minlength=n_items + 1)[: n_items + 1].astype(np.float32)
        self.counts = torch.from_numpy(counts)

    def score(self, batch: Batch) -> torch.Tensor:
        return self.counts.expand(batch.items.shape[0], -1).clone()


class ItemKNN:
    """Score = sum of cosine similarities (users' co-occurrence) to the history items."""

    name = "item_knn"

    def __init__(self, train: Sequences, n_items: int, history: int = 50):
        users = np.repeat(np.arange(train.n_users), train.lengths())
        x = sp.csr_matrix(
            (np.ones(len(train.items), dtype=np.float32), (users, train.items)),
            shape=(train.n_users, n_items + 1),
        )
        x.data[:] = 1.0  # presence, not counts
        sim = (x.T.tocsr() @ x).tocsr()  # (n_items + 1, n_items + 1) co-occurrence counts
        norms = np.sqrt(sim.diagonal()).astype(np.float32)
        norms[norms == 0] = 1.0
        inv = (1.0 / norms).astype(np.float32)
        # Cosine scaling and the zeroed diagonal on the stored entries in place: the same
        # numbers as `diag(inv) @ co @ diag(inv)` and `setdiag(0)`, without two more
        # products of a matrix with ~10M entries (ml-latest-small): half the fit time.
        rows = np.repeat(np.arange(sim.shape[0]), np.diff(sim.indptr))
        sim.data = sim.data.astype(np.float32) * inv[rows] * inv[sim.indices]
        sim.data[rows == sim.indices] = 0.0
        sim.eliminate_zeros()
        self.sim = sim
        self.history = history
        self.popularity = np.bincount(train.items, minlength=n_items + 1)[: n_items + 1]

    def score(self, batch: Batch) -> torch.Tensor:
        items = batch.items.numpy()
        lengths = batch.lengths.numpy()
        rows, cols = [], []
        for b in range(len(items)):
            hist = items[b, max(0, lengths[b] - self.history) : lengths[b]]
            rows.append(np.full(len(hist), b))
            cols.append(hist)
        r, c = np.concatenate(rows), np.concatenate(cols)
        q = sp.csr_matrix(
            (np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(items), self.sim.shape[0])
        )
        scores = (q @ self.sim).toarray()
        # popularity breaks ties among items no history item co-occurs with
        scores += 1e-6 * self.popularity / max(1, self.popularity.max())
        return torch.from_numpy(scores.astype(np.float32))


class Markov:
    """First-order Markov chain: score = transitions from the last item (popularity backoff)."""

    name = "markov"

    def __init__(self, train: Sequences, n_items: int):
        same_user = np.ones(len(train.items), dtype=bool)
        same_user[train.offsets[1:-1]] = False  # a transition never crosses users
        src, dst = train.items[:-1], train.items[1:]
        keep = same_user[1:]
        self.trans = sp.csr_matrix(
            (np.ones(int(keep.sum()), dtype=np.float32), (src[keep], dst[keep])),
            shape=(n_items + 1, n_items + 1),
        )
        pop = np.bincount(train.items, minlength=n_items + 1)[: n_items + 1]
        self.backoff = (1e-6 * pop / max(1, pop.max())).astype(np.float32)

    def score(self, batch: Batch) -> torch.Tensor:
        last = batch.items[torch.arange(len(batch.lengths)), batch.lengths - 1].numpy()
        scores = self.trans[last].toarray() + self.backoff
        return torch.from_numpy(scores.astype(np.float32))


BASELINES = {cls.name: cls for cls in (MostPopular, ItemKNN, Markov)}


def fit_baseline(name: str, train: Sequences, n_items: int):
    """A fitted baseline by name."""
    return BASELINES[name](train, n_items)


def protocol(cfg: Config) -> dict[str, Any]:
    """The settings baseline scores depend on besides the split (evaluate checks them)."""
    ecfg = cfg.evaluate
    return {
        "baselines": list(ecfg.baselines),
        "ks": list(ecfg.ks),
        "sampled_negatives": ecfg.sampled_negatives,
        "seed": ecfg.seed,
        # they learn from what the model learns from: with a refit, the validation events too
        "learned_from": "train+valid" if cfg.train.refit_with_valid else "train",
    }


def report_path(cfg: Config, root: Path) -> Path:
    """Where the `baselines` stage writes its report (a metrics file in dvc.yaml)."""
    return root / cfg.paths.reports_dir / "baselines.json"


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    """The DVC stage: fit each baseline and score it on the test split as `evaluate` scores
    the model (full ranking and sampled negatives); writes `reports/baselines.json`."""
    from pipelines.evaluate import evaluate_scores, negatives_for
    from pipelines.events import write_json
    from pipelines.sequences import load_split

    split_dir = root / cfg.paths.split_dir
    data = load_split(split_dir, cfg.model.time_buckets)
    ecfg = cfg.evaluate
    seen = data.learned(cfg.train.refit_with_valid)
    negatives = negatives_for(data, "test", ecfg.sampled_negatives, ecfg.seed)
    scores = {}
    for name in ecfg.baselines:
        base = fit_baseline(name, seen, data.n_items)
        # whole histories (no max_len cut): a baseline has no context limit
        res = evaluate_scores(
            base.score,
            data=data,
            which="test",
            ks=ecfg.ks,
            max_len=10**6,
            weight_buckets_n=cfg.model.weight_buckets,
            negatives=negatives,
        )
        scores[name] = {"full": res.full, "sampled": res.sampled}
    report = {"split": data_sha256(split_dir), "protocol": protocol(cfg), "baselines": scores}
    write_json(report, report_path(cfg, root))
    return report


def load_scores(cfg: Config, root: Path) -> dict[str, Any]:
    """The baselines' test scores from the `baselines` stage, for this split and protocol.

    Raises DataError when the report is missing or was made on another split or protocol
    (a stage run by hand out of order), rather than comparing against stale numbers.
    """
    from pipelines.errors import DataError

    path = report_path(cfg, root)
    if not path.exists():
        raise DataError(f"{path} is missing: run `attnflow baselines` first")
    report = json.loads(path.read_text(encoding="utf-8"))
    if report.get("split") != data_sha256(root / cfg.paths.split_dir):
        raise DataError(f"{path} was made on another split: run `attnflow baselines` again")
    if report.get("protocol") != protocol(cfg):
        raise DataError(
            f"{path} was made with other evaluate settings: run `attnflow baselines` again"
        )
    return report["baselines"]
