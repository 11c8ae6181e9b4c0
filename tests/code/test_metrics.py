"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.metrics import metrics_from_ranks, sample_negatives, sampled_ranks, target_ranks


def test_metrics_from_ranks_by_hand():
    # ranks 0, 1, 4 and 12: hits at 10 for the first three
    m = metrics_from_ranks(np.array([0, 1, 4, 12]), [1, 5, 10])
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["hr@5"] == pytest.approx(0.75)
    assert m["hr@10"] == pytest.approx(0.75)
    ndcg10 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(6)) / 4
    assert m["ndcg@10"] == pytest.approx(ndcg10)
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)


def test_full_ranking_excludes_seen_items_but_not_the_target():
    #            pad   1    2    3    4    5
    scores = torch.tensor([[9.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    # target 4; seen 1 and 4 (a repeat). Item 1 is dropped, the target stays.
    ranks = target_ranks(scores, torch.tensor([4]), torch.tensor([[1, 4]]))
    assert ranks.tolist() == [2]  # beaten by 2 and 3; column 0 (padding) never counts


def test_ties_count_against_the_target():
    scores = torch.zeros(1, 6)
    assert target_ranks(scores, torch.tensor([3])).tolist() == [4]  # last among 5 items
    neg = torch.tensor([[1, 2, 4]])
    assert sampled_ranks(scores, torch.tensor([3]), neg).tolist() == [3]


def test_sampled_rank_by_hand():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.3]])
    assert sampled_ranks(scores, torch.tensor([3]), torch.tensor([[1, 2, 4]])).tolist() == [1]


def test_sampled_negatives_avoid_history_and_target_and_are_seeded():
    hist = [np.array([1, 2, 3]), np.array([5])]
    targets = np.array([4, 6])
    a = sample_negatives(hist, targets, n_items=200, k=100, seed=7)
    b = sample_negatives(hist, targets, n_items=200, k=100, seed=7)
    assert a.shape == (2, 100) and np.array_equal(a, b)
    assert not np.isin(a[0], [1, 2, 3, 4]).any() and not np.isin(a[1], [5, 6]).any()
    assert a.min() >= 1 and a.max() <= 200
