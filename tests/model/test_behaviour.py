"""Behaviour of the attention-flow Transformer: the properties a sequence model must have."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipelines.baselines import MostPopular
from pipelines.evaluate import evaluate_scores
from pipelines.model import AttnFlowEncoder, ModelSpec, Recommender
from pipelines.sequences import Sequences, history_batch, load_split
from pipelines.train import train_model
from tests.model.conftest import small_config


def _encoder(objective: str = "causal", **over) -> AttnFlowEncoder:
    cfg = small_config(**{"model.objective": objective, **over})
    spec = ModelSpec(
        model=cfg.model.model_dump(mode="json"),
        n_items=50,
        n_catalog=60,
        event_vocab=["click", "view"],
    )
    torch.manual_seed(0)
    return AttnFlowEncoder(spec).eval()


def _seqs(rows: list[list[int]]) -> Sequences:
    items = np.concatenate([np.array(r, dtype=np.int64) for r in rows])
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    n = len(items)
    return Sequences(
        items=items,
        gaps=(np.arange(n) % 5) + 1,
        events=(np.arange(n) % 2) + 1,
        weights=np.full(n, 1.0, np.float32),
        offsets=offsets,
    )


def test_causal_encoder_appending_items_leaves_earlier_positions_unchanged():
    enc = _encoder()
    short = history_batch(_seqs([[3, 7, 9, 12, 4]]), np.array([0]), 20, 8)
    longer = history_batch(_seqs([[3, 7, 9, 12, 4, 30, 31, 2]]), np.array([0]), 20, 8)
    with torch.no_grad():
        a, _ = enc(short)
        b, _ = enc(longer)
    torch.testing.assert_close(a[0, :5], b[0, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, 4], b[0, 7])


def test_changing_a_later_item_does_not_leak_backwards():
    enc = _encoder()
    x = history_batch(_seqs([[3, 7, 9, 12, 4]]), np.array([0]), 20, 8)
    y = history_batch(_seqs([[3, 7, 9, 12, 44]]), np.array([0]), 20, 8)
    with torch.no_grad():
        a, _ = enc(x)
        b, _ = enc(y)
    torch.testing.assert_close(a[0, :4], b[0, :4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_padding_invariance(objective):
    """A history scores the same alone and right-padded in a batch with longer ones."""
    enc = _encoder(objective)
    mask = enc.spec.mask_token if objective == "masked" else None
    seqs = _seqs([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    rec = Recommender(enc)
    alone = rec.score(history_batch(seqs, np.array([0]), 20, 8, mask))
    together = rec.score(history_batch(seqs, np.array([0, 1]), 20, 8, mask))
    torch.testing.assert_close(alone[0], together[0], rtol=1e-5, atol=1e-5)


def test_training_is_deterministic_for_a_seed_and_changes_with_it(synth_split):
    data = load_split(synth_split)
    cfg = small_config(**{"train.epochs": 2})
    a = train_model(cfg, data)
    b = train_model(cfg, data)
    c = train_model(small_config(**{"train.epochs": 2, "train.seed": 7}), data)
    for k, v in a.encoder.state_dict().items():
        assert torch.equal(v, b.encoder.state_dict()[k]), k
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    assert not torch.equal(a.encoder.item_emb.weight, c.encoder.item_emb.weight)


@pytest.mark.parametrize(
    ("objective", "loss"), [("causal", "full"), ("causal", "sampled"), ("masked", "full")]
)
def test_loss_falls_in_a_short_run(synth_split, objective, loss):
    data = load_split(synth_split)
    cfg = small_config(
        **{
            "train.epochs": 4,
            "model.objective": objective,
            "train.loss": loss,
            "train.negatives": 64,
        }
    )
    result = train_model(cfg, data)
    losses = [h["loss"] for h in result.history]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.25, losses


def test_beats_most_popular_on_a_planted_sequential_pattern(synth_split):
    data = load_split(synth_split)
    cfg = small_config(**{"train.epochs": 8})
    result = train_model(cfg, data)
    rec = Recommender(result.encoder)
    args = dict(data=data, which="test", ks=[10], max_len=20, weight_buckets_n=8)
    model = evaluate_scores(rec.score, **args)
    popular = evaluate_scores(MostPopular(data.train, data.n_items).score, **args)
    assert model.full["ndcg@10"] > 2 * popular.full["ndcg@10"], (model.full, popular.full)
    assert model.full["hr@10"] > 0.5


def test_augmentation_and_adversarial_training_run_and_learn(synth_split):
    data = load_split(synth_split)
    cfg = small_config(
        **{
            "train.epochs": 3,
            "train.adversarial_eps": 0.5,
            "train.augment.crop_prob": 0.5,
            "train.augment.mask_prob": 0.2,
            "train.augment.reorder_prob": 0.3,
        }
    )
    result = train_model(cfg, data)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best_metric > 0.1


def test_explanations_are_attention_over_the_history():
    enc = _encoder()
    batch = history_batch(_seqs([[3, 7, 9, 12, 4], [1, 2]]), np.array([0, 1]), 20, 8)
    attn = Recommender(enc).explain(batch)
    assert attn.shape == (2, 5)
    torch.testing.assert_close(attn.sum(1), torch.ones(2), rtol=1e-4, atol=1e-4)
    assert torch.all(attn[1, 2:] == 0)  # padding gets no attention
