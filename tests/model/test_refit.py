"""The refit on train + validation events (`train.refit_with_valid`) and stopping on resume."""

from __future__ import annotations

import numpy as np
import torch

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
