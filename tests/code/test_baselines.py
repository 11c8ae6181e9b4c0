"""The baselines against plain dense reference implementations on a small log."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.baselines import ItemKNN
from pipelines.sequences import Batch, Sequences


def _sequences(per_user: list[list[int]]) -> Sequences:
    items = np.concatenate([np.asarray(u, dtype=np.int64) for u in per_user])
    n = len(items)
    offsets = np.concatenate([[0], np.cumsum([len(u) for u in per_user])]).astype(np.int64)
    zeros = np.zeros(n, dtype=np.int64)
    return Sequences(items, zeros, zeros, np.ones(n, dtype=np.float32), offsets)


def test_item_knn_is_cosine_of_user_co_occurrence_without_self_similarity():
    rng = np.random.default_rng(3)
    n_items = 12
    # repeats within a user count once (presence); item 12 occurs nowhere
    per_user = [list(rng.integers(1, n_items, size=rng.integers(2, 9))) for _ in range(9)]
    knn = ItemKNN(_sequences(per_user), n_items)

    x = np.zeros((len(per_user), n_items + 1))
    for u, items in enumerate(per_user):
        x[u, items] = 1.0
    co = x.T @ x
    norms = np.sqrt(np.diag(co))
    norms[norms == 0] = 1.0
    expected = co / np.outer(norms, norms)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(knn.sim.toarray(), expected, rtol=1e-6, atol=1e-7)
    assert (knn.sim.data != 0).all()  # zeros (the diagonal) are not stored

    # a history's scores: the sum of its items' similarity rows (plus a popularity tie-break)
    items = torch.tensor([[3, 5, 0, 0]])
    zeros = torch.zeros_like(items)
    batch = Batch(items, zeros, zeros, zeros, lengths=torch.tensor([2]))
    scores = knn.score(batch)[0].numpy()
    np.testing.assert_allclose(scores, expected[3] + expected[5], atol=1e-5)
