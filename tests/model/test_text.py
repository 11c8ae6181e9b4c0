"""Item text: MiniLM from the installed package, frozen or LoRA-tuned, and cold start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.model import Recommender
from pipelines.sequences import history_batch, load_split
from pipelines.text import cached_text_embeddings, minilm_path
from pipelines.train import train_model
from tests.model.conftest import small_config


def test_minilm_comes_from_the_installed_package_and_encodes_meaning(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (minilm_path() / "model.safetensors").exists()
    emb = cached_text_embeddings(
        ["a football match", "a soccer game", "an oil painting of flowers"], tmp_path
    )
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), rtol=1e-4, atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    # cached: the second call reads the file instead of running the encoder
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 1
    torch.testing.assert_close(
        cached_text_embeddings(
            ["a football match", "a soccer game", "an oil painting of flowers"], tmp_path
        ),
        emb,
    )


def test_frozen_text_fusion_gives_cold_items_vectors(synth_split, tmp_path):
    data = load_split(synth_split)
    cfg = small_config(**{"train.epochs": 2, "model.text.mode": "frozen"})
    result = train_model(cfg, data, cache_dir=tmp_path)
    enc = result.encoder
    assert enc.spec.has_text
    assert enc.text_table[1 : data.n_catalog + 1].norm(dim=1).min() > 0.99
    with torch.no_grad():
        vecs = enc.item_vectors()
    assert torch.isfinite(vecs).all()
    # items that share a topic (and so the same text) end up closer than other items
    topics = data.items.sort_values("item_idx")["genres"].to_numpy()
    v = torch.nn.functional.normalize(vecs[1 : data.n_items + 1], dim=1)
    sims = (v @ v.T).numpy()
    same = topics[: data.n_items, None] == topics[None, : data.n_items]
    off_diag = ~np.eye(data.n_items, dtype=bool)
    assert sims[same & off_diag].mean() > sims[~same].mean()


def test_cold_item_gets_a_text_vector_and_can_be_recommended(synth_split, tmp_path):
    data = load_split(synth_split)
    cfg = small_config(**{"train.epochs": 1, "model.text.mode": "frozen"})
    enc = train_model(cfg, data, cache_dir=tmp_path).encoder
    assert data.n_catalog == data.n_items + 3  # the fixture's three cold items
    cold = data.n_items + 1
    with torch.no_grad():
        vec = enc.item_vectors(torch.tensor([cold]))
    assert vec.abs().sum() > 0
    rec = Recommender(enc)
    scores = rec.score(history_batch(data.history_test, np.array([0]), 20, 8), catalog=True)
    assert scores.shape[1] == data.n_catalog + 1 and torch.isfinite(scores[0, cold])


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_lora_fine_tuning_changes_the_adapters_and_the_text_table(synth_split, tmp_path, ema_decay):
    """With a moving average of the weights too, the model keeps the refreshed text table."""
    data = load_split(synth_split)
    frozen = cached_text_embeddings(
        [t or "" for t in data.items.sort_values("item_idx")["text"]], tmp_path
    )
    cfg = small_config(
        **{
            "train.epochs": 1,
            "model.text.mode": "lora",
            "model.text.lora_items_per_step": 16,
            "model.text.lora_refresh_steps": 1000,
            "model.text.max_tokens": 16,
            "model.text.lora_lr": 0.01,
            "train.ema_decay": ema_decay,
        }
    )
    result = train_model(cfg, data, cache_dir=tmp_path)
    table = result.encoder.text_table[1 : data.n_catalog + 1]
    assert not torch.allclose(table, frozen, atol=1e-4)  # the adapters moved the text vectors
    assert result.history[0]["loss"] > 0
