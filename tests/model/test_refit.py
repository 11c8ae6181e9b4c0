"""The refit on train + validation events (`train.refit_with_valid`) and stopping on resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipelines import baselines, evaluate, train
from pipelines.baselines import MostPopular
from pipelines.evaluate import evaluate_scores, negatives_for
from pipelines.sequences import load_split
from pipelines.train import fit, refit_data, refit_schedule, train_model
from tests.model.conftest import small_config

# a high learning rate with quick plateau decay: this run decays before its best epoch
DECAYING = {
    "train.epochs": 8,
    "train.lr": 0.02,
    "train.lr_decay_factor": 0.5,
    "train.lr_decay_patience": 1,
    "train.patience": 3,
}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_a_replayed_schedule_reproduces_the_best_epochs_weights_exactly(synth_split):
    data = load_split(synth_split)
    cfg = small_config(**DECAYING)
    measured = train_model(cfg, data)
    schedule = refit_schedule(measured)
    assert len(schedule) == measured.best_epoch
    assert schedule[0] == 1.0 and min(schedule) < 1.0, schedule  # the replay includes a decay
    # the scale an epoch trained at is the one the previous epoch's validation left
    assert schedule[1:] == [row["lr_scale"] for row in measured.history[: len(schedule) - 1]]
    replayed = train_model(cfg, data, schedule=schedule)
    assert replayed.epochs_run == measured.best_epoch
    assert replayed.history and all("valid_ndcg@10" not in row for row in replayed.history)
    assert _same_weights(replayed.encoder, measured.encoder)


def test_refit_data_moves_each_validation_event_into_training(synth_split):
    data = load_split(synth_split)
    refit = refit_data(data)
    before, after = data.train.lengths(), refit.train.lengths()
    has_valid = data.valid_items > 0
    assert has_valid.any()
    np.testing.assert_array_equal(after, before + has_valid)
    last = refit.train.items[refit.train.offsets[1:][has_valid] - 1]
    np.testing.assert_array_equal(last, data.valid_items[has_valid])
    # the test events stay out of training
    assert refit.test_items is data.test_items and refit.history_test is data.history_test


def test_fit_with_refit_exports_weights_trained_on_the_validation_events(synth_split):
    data = load_split(synth_split)
    over = {**DECAYING, "train.ema_decay": 0.9}
    measured = fit(small_config(**over), data)
    refit = fit(small_config(**over, **{"train.refit_with_valid": "true"}), data)
    assert measured.refit_epochs == 0
    assert refit.refit_epochs == refit.best_epoch == measured.best_epoch
    # the measured run's validation record is kept; the weights are the refit's
    assert refit.history == [
        {**h, "seconds": refit.history[i]["seconds"]} for i, h in enumerate(measured.history)
    ]
    assert not _same_weights(refit.encoder, measured.encoder)
    assert refit.sequences > measured.sequences
    # with EMA the refit exports the moving average, as the measured run does
    replay = train_model(small_config(**over), refit_data(data), schedule=refit_schedule(measured))
    assert _same_weights(refit.encoder, replay.encoder)


def test_resuming_an_early_stopped_run_trains_no_further(synth_split, tmp_path):
    data = load_split(synth_split)
    cfg = small_config(**{**DECAYING, "train.patience": 1})
    first = train_model(cfg, data, tmp_path)
    assert first.epochs_run < cfg.train.epochs  # it stopped early
    again = train_model(cfg, data, tmp_path)
    assert again.epochs_run == first.epochs_run
    assert _same_weights(again.encoder, first.encoder)


def test_refit_stages_record_it_and_fit_baselines_on_the_same_events(
    synth_split, tmp_path, monkeypatch
):
    shutil.copytree(synth_split, tmp_path / "data" / "split")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ATTNFLOW_MLFLOW_ARTIFACTS", (tmp_path / "artifacts").as_uri())
    cfg = small_config(
        **{"train.epochs": 2, "ingest.dataset": "synthetic", "train.refit_with_valid": "true"}
    )
    summary = train.run(cfg, tmp_path)
    assert summary["refit_epochs"] == summary["best_epoch"] >= 1
    baselines.run(cfg, tmp_path)
    report = evaluate.run(cfg, tmp_path)
    data = load_split(tmp_path / "data" / "split")
    args = dict(
        data=data,
        which="test",
        ks=cfg.evaluate.ks,
        max_len=10**6,
        weight_buckets_n=cfg.model.weight_buckets,
        negatives=negatives_for(data, "test", cfg.evaluate.sampled_negatives, cfg.evaluate.seed),
    )
    with_valid = evaluate_scores(MostPopular(data.history_test, data.n_items).score, **args).full
    train_only = evaluate_scores(MostPopular(data.train, data.n_items).score, **args).full
    # the comparisons below can tell the two apart
    assert with_valid["ndcg@10"] != pytest.approx(train_only["ndcg@10"])
    assert report["baselines"]["most_popular"]["full"] == pytest.approx(with_valid)
    # the registration gate compares the candidate with the same baselines
    from pipelines.gates import run_gates
    from pipelines.inference import ServedModel

    gates = run_gates(cfg, ServedModel.load(tmp_path / cfg.paths.model_dir), data, None)
    metric = cfg.gates.metric
    assert gates.metrics[f"baseline_most_popular_{metric}"] == pytest.approx(with_valid[metric])
