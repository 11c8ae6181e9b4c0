"""Behaviour of the attention-flow Transformer: the properties a sequence model must have."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.baselines import MostPopular
from pipelines.config import EvaluateConfig
from pipelines.evaluate import EvalResult, evaluate_scores, negatives_for, segments
from pipelines.metrics import sampled_ranks, target_ranks
from pipelines.model import (
    AttnFlowEncoder,
    ModelSpec,
    Recommender,
    contrastive_loss,
    full_cross_entropy,
    smoothed_cross_entropy,
    softmax_loss,
)
from pipelines.sequences import Sequences, history_batch, load_split, train_batch
from pipelines.train import train_model, validate
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
    ("objective", "loss", "negatives_per"),
    [
        ("causal", "full", "batch"),
        ("causal", "sampled", "batch"),
        ("causal", "sampled", "target"),
        ("masked", "full", "batch"),
    ],
)
def test_loss_falls_in_a_short_run(synth_split, objective, loss, negatives_per):
    data = load_split(synth_split)
    cfg = small_config(
        **{
            "train.epochs": 4,
            "model.objective": objective,
            "train.loss": loss,
            "train.negatives": 64,
            "train.negatives_per": negatives_per,
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


def test_evaluation_ranks_are_each_users_own_whatever_the_batching(synth_split):
    """Evaluation batches users by history length and may score only the sampled
    candidates; every user's ranks must be those of scoring that user alone."""
    data = load_split(synth_split)
    rec = Recommender(train_model(small_config(**{"train.epochs": 2}), data).encoder)
    users = np.random.default_rng(3).permutation(data.history_valid.n_users)[:120]
    negatives = negatives_for(data, "valid", 30, seed=1)
    args = dict(data=data, which="valid", ks=[10], max_len=20, weight_buckets_n=8)
    both = evaluate_scores(rec.score, **args, negatives=negatives, users=users, batch_size=16)
    cands = evaluate_scores(
        rec.score,
        **args,
        negatives=negatives,
        users=users,
        full=False,
        candidate_fn=rec.score_items,
    )
    seqs, targets = data.history_valid, data.valid_items
    full, sampled = [], []
    for u in users:
        scores = rec.score(history_batch(seqs, np.array([u]), 20, 8))
        t = torch.tensor([targets[u]])
        seen = torch.from_numpy(seqs.items[seqs.user(int(u))]).unsqueeze(0)
        full.append(int(target_ranks(scores, t, seen)[0]))
        sampled.append(int(sampled_ranks(scores, t, torch.from_numpy(negatives[[u]]))[0]))
    np.testing.assert_array_equal(both.users, users)
    np.testing.assert_array_equal(both.ranks_full, full)
    np.testing.assert_array_equal(both.ranks_sampled, sampled)
    np.testing.assert_array_equal(cands.ranks_sampled, sampled)
    assert cands.ranks_full is None and len(set(full)) > 10  # real, varied ranks


def test_segments_split_out_unseen_targets_and_report_both_protocols():
    train = _seqs([[1, 2, 3], [2, 3, 4, 5], [1, 2]])  # item 1 twice, item 2 three times
    data = SimpleNamespace(
        history_test=train, test_items=np.array([9, 1, 2]), train=train, n_catalog=10
    )
    result = EvalResult(
        users=np.arange(3), ranks_full=np.array([50, 0, 3]), ranks_sampled=np.array([90, 0, 1])
    )
    cfg = EvaluateConfig(ks=[10], history_buckets=[2], cold_item_max_train=2)
    seg = segments(result, data, "test", cfg)
    zero = {"hr@10": 0.0, "ndcg@10": 0.0, "sampled_hr@10": 0.0, "sampled_ndcg@10": 0.0}
    assert seg["unseen target (0 in train)"] == {"users": 1, **zero}  # item 9
    cold = seg["cold target (<= 2 in train)"]  # items 9 and 1
    assert (cold["users"], cold["hr@10"], cold["sampled_hr@10"]) == (2, 0.5, 0.5)
    assert seg["warm target"] == {
        "users": 1,
        "hr@10": 1.0,
        "ndcg@10": round(1 / np.log2(5), 5),
        "sampled_hr@10": 1.0,
        "sampled_ndcg@10": round(1 / np.log2(3), 5),
    }
    assert (seg["history 1-2"]["users"], seg["history >2"]["users"]) == (1, 2)
    # after a refit the model also learned from the validation events: item 9 is not
    # unseen any more once it is among them, and item 1 (now 3 events) turns warm
    learned = _seqs([[1, 2, 3, 9], [2, 3, 4, 5, 1], [1, 2]])
    refit = segments(result, data, "test", cfg, learned=learned)
    assert "unseen target (0 in train)" not in refit
    assert refit["cold target (<= 2 in train)"]["users"] == 1  # item 9, once
    assert refit["warm target"]["users"] == 2


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


def _user_encoder(n_users: int = 3) -> AttnFlowEncoder:
    cfg = small_config(**{"model.user_embeddings": "true"})
    spec = ModelSpec(
        model=cfg.model.model_dump(mode="json"),
        n_items=50,
        n_catalog=60,
        event_vocab=["click", "view"],
        n_users=n_users,
    )
    torch.manual_seed(0)
    enc = AttnFlowEncoder(spec).eval()
    with torch.no_grad():  # trained-size user vectors, so that they visibly move the output
        enc.user_emb.weight[1:].normal_(std=1.0)
    return enc


def test_user_vectors_personalise_scores_and_unknown_users_get_none():
    enc = _user_encoder()
    rec = Recommender(enc)
    same = _seqs([[3, 7, 9, 12, 4], [3, 7, 9, 12, 4]])
    two_users = rec.score(history_batch(same, np.array([0, 1]), 20, 8))
    assert not torch.allclose(two_users[0], two_users[1])  # same history, different people
    # An explicit history (row 0) and a user the model never saw (row > n_users) both
    # score as the model without any user vector.
    anonymous = rec.score(history_batch(same, np.array([0]), 20, 8, user_rows=np.array([0])))
    unseen = rec.score(history_batch(same, np.array([0]), 20, 8, user_rows=np.array([99])))
    batch = history_batch(same, np.array([0]), 20, 8)
    batch.users = None
    no_vector = rec.score(batch)
    torch.testing.assert_close(anonymous, no_vector, rtol=0, atol=1e-6)
    torch.testing.assert_close(unseen, no_vector, rtol=0, atol=1e-6)


def test_user_vectors_keep_the_encoder_causal():
    enc = _user_encoder()
    short = history_batch(_seqs([[3, 7, 9, 12, 4]]), np.array([0]), 20, 8, user_rows=np.array([2]))
    longer = history_batch(
        _seqs([[3, 7, 9, 12, 4, 30, 31]]), np.array([0]), 20, 8, user_rows=np.array([2])
    )
    with torch.no_grad():
        a, _ = enc(short)
        b, _ = enc(longer)
    torch.testing.assert_close(a[0, :5], b[0, :5], rtol=0, atol=1e-6)


def test_item_and_user_substitution_replace_inputs_at_the_configured_rate():
    from pipelines.config import AugmentConfig
    from pipelines.sequences import train_batch

    rows = [list(range(1, 41))] * 200
    seqs = _seqs(rows)
    aug = AugmentConfig(substitute_prob=0.25, user_substitute_prob=0.5)
    rng = np.random.default_rng(0)
    users = np.arange(200)
    batch = train_batch(
        seqs,
        users,
        50,
        8,
        "causal",
        61,
        rng,
        aug,
        n_items=50,
        user_substitute_prob=aug.user_substitute_prob,
    )
    inputs = batch.items.numpy()  # (200, 39): inputs 1..39 predict targets 2..40
    changed = (inputs != np.arange(1, 40)).mean()
    assert 0.2 < changed < 0.3, changed
    assert np.all(batch.targets.numpy() == np.arange(2, 41))  # targets are never substituted
    assert np.all((batch.items.numpy() >= 1) & (batch.items.numpy() <= 50))
    swapped = (batch.users.numpy() != users + 1).mean()
    assert 0.4 < swapped < 0.6, swapped  # a swap may draw the same user: slightly under 0.5
    plain = train_batch(seqs, users, 50, 8, "causal", 61, np.random.default_rng(0))
    assert np.all(plain.users.numpy() == users + 1)


def test_personalised_model_trains_exports_and_serves(synth_split, tmp_path):
    from pipelines.inference import ServedModel
    from pipelines.train import export_model

    data = load_split(synth_split)
    cfg = small_config(
        **{
            "train.epochs": 3,
            "model.user_embeddings": "true",
            "train.augment.user_substitute_prob": 0.5,
            "train.augment.substitute_prob": 0.1,
        }
    )
    result = train_model(cfg, data)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.encoder.user_emb is not None
    assert result.encoder.user_emb.weight[1:].abs().sum() > 0
    folder = export_model(result.encoder, data, tmp_path / "model", {})
    served = ServedModel.load(folder)
    assert served.spec.n_users == data.train.n_users
    user = next(iter(served.user_index))
    known = served.recommend(user_id=user, k=5)
    anonymous = served.recommend(history=known.items[:2], k=5)
    assert len(known.items) == 5 and len(anonymous.items) == 5


def test_plateau_decay_lowers_the_learning_rate_and_survives_resume(synth_split, tmp_path):
    """With a learning rate too small to move a float32 weight, every epoch after the
    first is a plateau: the scale halves each epoch, and a resumed run continues it."""
    data = load_split(synth_split)
    over = {"train.lr": 1e-12, "train.lr_decay_factor": 0.5, "train.lr_decay_patience": 1}
    first = train_model(small_config(**over, **{"train.epochs": 3}), data, tmp_path)
    assert [h["lr_scale"] for h in first.history] == [1.0, 0.5, 0.25]
    resumed = train_model(small_config(**over, **{"train.epochs": 5}), data, tmp_path)
    assert resumed.resumed_from == {"epoch": 3, "step": 0}
    assert [h["lr_scale"] for h in resumed.history] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    # the steps' CPU time is measured like their wall time and carried over a resume
    assert 0 < first.train_cpu_seconds < resumed.train_cpu_seconds
    constant = train_model(small_config(**{"train.epochs": 2}), data)
    assert [h["lr_scale"] for h in constant.history] == [1.0, 1.0]


def test_ema_weights_are_the_validated_exported_and_resumed_ones(synth_split, tmp_path):
    """With `train.ema_decay` the moving average is what validation scores, what the run
    returns, and what a checkpoint carries; the raw training trajectory is unchanged."""
    from tests.model._train_job import weights_digest

    data = load_split(synth_split)
    over = {"train.ema_decay": 0.9, "train.epochs": 3}
    whole = train_model(small_config(**over), data)
    cfg = small_config(**over)
    again = validate(whole.encoder, data, cfg, None, None)
    assert again[f"valid_{cfg.train.early_stop_metric}"] == pytest.approx(whole.best_metric)
    plain = train_model(small_config(**{"train.epochs": 3}), data)
    assert weights_digest(plain.encoder) != weights_digest(whole.encoder)
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in whole.history]
    train_model(small_config(**{**over, "train.epochs": 2}), data, tmp_path)
    resumed = train_model(small_config(**over), data, tmp_path)
    assert resumed.resumed_from == {"epoch": 2, "step": 0}
    assert weights_digest(resumed.encoder) == weights_digest(whole.encoder)


def test_contrastive_loss_matches_a_hand_computed_value():
    """Two orthogonal sequences seen twice: each view's logits are 1/t for its partner and
    0 for the other two, so the loss is log(2 + e^(1/t)) - 1/t."""
    views = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for t in (1.0, 0.5):
        expected = np.log(2 + np.exp(1 / t)) - 1 / t
        assert float(contrastive_loss(views, views.clone(), t)) == pytest.approx(expected)
    swapped = contrastive_loss(views, views.flip(0), 1.0)  # partners point the wrong way
    assert float(swapped) > float(contrastive_loss(views, views.clone(), 1.0))


def test_contrastive_training_pulls_two_dropout_views_together(synth_split):
    """With the DuoRec term, the two dropout views of a sequence agree more than without."""
    data = load_split(synth_split)

    def view_loss(result) -> float:
        enc = result.encoder.train()  # dropout on: two passes are two views
        batch = history_batch(data.train, np.arange(64), 20, 8)
        torch.manual_seed(0)
        with torch.no_grad():
            a, b = enc.last_hidden(batch), enc.last_hidden(batch)
        return float(contrastive_loss(a, b, 1.0))

    over = {"train.epochs": 3, "model.dropout": 0.3}
    plain = train_model(small_config(**over), data)
    pulled = train_model(small_config(**over, **{"train.contrastive_weight": 0.5}), data)
    assert pulled.history[-1]["loss"] < pulled.history[0]["loss"]
    assert view_loss(pulled) < 0.6 * view_loss(plain)


def test_smoothed_cross_entropy_matches_hand_computed_values():
    """Label smoothing spreads its share over a row's candidates, never over -inf columns."""
    logits = torch.tensor([[2.0, 0.0, float("-inf")], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    z0 = np.log(np.exp(2.0) + 1.0)  # row 0 has two candidates: 2 and 0
    nll0, mean0 = z0 - 2.0, ((z0 - 2.0) + z0) / 2
    z1 = np.log(1.0 + np.exp(1.0) + np.exp(3.0))
    nll1, mean1 = z1 - 1.0, (z1 + (z1 - 1.0) + (z1 - 3.0)) / 3
    got = smoothed_cross_entropy(logits, labels, 0.2)
    assert got.tolist() == pytest.approx([0.8 * nll0 + 0.2 * mean0, 0.8 * nll1 + 0.2 * mean1])
    assert smoothed_cross_entropy(logits, labels).tolist() == pytest.approx([nll0, nll1])
    finite = logits[1:]  # with every column a candidate it is torch's own label smoothing
    ref = torch.nn.functional.cross_entropy(finite, labels[1:], label_smoothing=0.2)
    assert float(smoothed_cross_entropy(finite, labels[1:], 0.2)) == pytest.approx(float(ref))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_label_smoothing_makes_training_less_confident(synth_split, loss):
    """Trained with smoothing, the model's next-item distribution has higher entropy."""
    data = load_split(synth_split)
    batch = history_batch(data.train, np.arange(128), 20, 8)

    def entropy(result) -> float:
        p = torch.softmax(Recommender(result.encoder).score(batch), dim=-1)  # (B, n + 1)
        return float(-(p * torch.log(p.clamp(min=1e-12))).sum(-1).mean())

    over = {"train.epochs": 4, "train.loss": loss, "train.negatives": 64}
    plain = train_model(small_config(**over), data)
    smooth = train_model(small_config(**over, **{"train.label_smoothing": 0.5}), data)
    assert entropy(smooth) > entropy(plain) + 0.3


def test_per_target_negatives_are_each_targets_own_and_skip_accidental_hits():
    """negatives_per=target: a (targets, K) draw, each row scored against its own items."""
    enc = _encoder()  # eval mode: no dropout, so the hand computation sees the same states
    seqs = _seqs([[3, 7, 9, 12, 4], [5, 6, 7, 8]])
    rng = np.random.default_rng(0)
    batch = train_batch(seqs, np.array([0, 1]), 20, 8, "causal", enc.spec.mask_token, rng)
    k = 40
    got = softmax_loss(
        enc, batch, "sampled", k, generator=torch.Generator().manual_seed(3), per_target=True
    )
    with torch.no_grad():
        hidden, _ = enc(batch)
        sel = batch.targets > 0
        h, t = hidden[sel], batch.targets[sel]  # (N, d), (N,)
        neg = torch.randint(1, 51, (len(t), k), generator=torch.Generator().manual_seed(3))
        hits = neg == t.unsqueeze(1)
        assert hits.any()  # 50 items, 40 draws a row: the masking is exercised
        table = enc.item_emb.weight
        neg_logits = torch.einsum("nd,nkd->nk", h, table[neg]).masked_fill(hits, float("-inf"))
        logits = torch.cat([(h * table[t]).sum(-1, keepdim=True), neg_logits], dim=1)
        expected = torch.nn.functional.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long))
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-5)
    shared = softmax_loss(enc, batch, "sampled", k, generator=torch.Generator().manual_seed(3))
    assert float(shared.detach()) != pytest.approx(float(got.detach()), rel=1e-3)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_chunked_full_loss_has_the_whole_logits_value_and_gradients(
    smoothing, weighted, with_bias
):
    """Chunk by chunk (6 chunks here), the full loss and its gradients for states, item
    table and bias are those of cross-entropy over the whole (N, C) logits."""
    gen = torch.Generator().manual_seed(0)
    n, c, d = 300, 997, 16
    h = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(c, d, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, c, (n,), generator=gen)
    w = torch.rand(n, generator=gen) if weighted else None
    params = [h, table, *([bias] if with_bias else [])]
    b = bias if with_bias else None
    rows = smoothed_cross_entropy(h @ table.T + (bias if with_bias else 0.0), labels, smoothing)
    expected = (rows * w).sum() / w.sum() if weighted else rows.mean()
    got = full_cross_entropy(h, table, b, labels, w, smoothing, chunk_mb=0.2)  # 52 rows a chunk
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for want, have in zip(
        torch.autograd.grad(3 * expected, params), torch.autograd.grad(3 * got, params), strict=True
    ):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # validation: the value alone, no gradients computed
        assert float(full_cross_entropy(h, table, b, labels, w, smoothing, 0.2)) == pytest.approx(
            float(expected.detach()), rel=1e-6
        )
