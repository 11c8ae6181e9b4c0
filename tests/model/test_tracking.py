"""The train and evaluate stages: MLflow run, lineage, artifacts, and a pickle-free model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipelines import baselines, evaluate, train
from pipelines.inference import ServedModel
from pipelines.model import ModelCorrupted, load_model
from tests.model.conftest import small_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_split):
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(synth_split, root / "data" / "split")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("ATTNFLOW_MLFLOW_ARTIFACTS", (root / "artifacts").as_uri())
    cfg = small_config(**{"train.epochs": 3, "ingest.dataset": "synthetic"})
    summary = train.run(cfg, root)
    baselines.run(cfg, root)
    report = evaluate.run(cfg, root)
    yield root, cfg, summary, report
    mp.undo()


def test_train_stage_writes_model_reports_and_one_mlflow_run(trained):
    from mlflow import MlflowClient

    root, _cfg, summary, _ = trained
    assert (root / "models/attnflow/weights.safetensors").exists()
    assert json.loads((root / "reports/train.json").read_text())["epochs_run"] == 3
    assert len(pd.read_csv(root / "reports/train_curve.csv")) == 3
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["model.hidden"] == "32"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["ingest.dataset"] == "synthetic"
    for tag in ("git_commit", "dvc_data_hash", "data_sha256"):
        assert tag in run.data.tags
    assert len(run.data.tags["data_sha256"]) == 64
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert len(client.get_metric_history(run.info.run_id, "valid_ndcg_at_10")) == 3
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "train.json", "evaluation.json"} <= arts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/training_curves.png", "plots/segments.png", "plots/attention.png"} <= plots
    assert run.data.metrics["test_ndcg_at_10"] > 0
    assert "baseline_most_popular_ndcg_at_10" in run.data.metrics


def test_mlflow_model_is_code_plus_safetensors_and_loads_without_pickle(trained):
    import mlflow

    _, _, summary, _ = trained
    local = Path(mlflow.artifacts.download_artifacts(summary["model_uri"]))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert "mlflow_model.py" in files and "weights.safetensors" in files and "spec.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    model = mlflow.pyfunc.load_model(summary["model_uri"])
    sig = model.metadata.get_input_schema().input_names()
    assert set(sig) == {"history", "user_id", "k"}
    out = model.predict(pd.DataFrame({"history": ["i1 i2 i3"], "k": [5]}))
    assert len(out["items"][0].split()) == 5


def test_evaluation_report_has_both_protocols_segments_and_baselines(trained):
    root, _, _, report = trained
    on_disk = json.loads((root / "reports/evaluate.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for proto in ("full", "sampled"):
        assert 0 < report["model"][proto]["ndcg@10"] <= 1
    assert report["model"]["sampled"]["ndcg@10"] >= report["model"]["full"]["ndcg@10"]
    assert set(report["baselines"]) == {"most_popular", "item_knn", "markov"}
    assert any(k.startswith("history") for k in report["segments"])
    assert (
        report["model"]["full"]["ndcg@10"] > report["baselines"]["most_popular"]["full"]["ndcg@10"]
    )


def test_model_is_rebuilt_from_its_own_spec(trained, monkeypatch):
    root, _, _, _ = trained
    folder = root / "models/attnflow"
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["model"]["hidden"] == 32  # not the code default (64)
    enc = load_model(folder)
    assert enc.item_emb.weight.shape[1] == 32
    served = ServedModel.load(folder)
    user = next(iter(served.user_index))
    rec = served.recommend(user_id=user, k=5, explain=True)
    assert len(rec.items) == 5 and rec.explanation


def test_flipped_bytes_in_the_weights_are_refused(trained, tmp_path):
    root, _, _, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(root / "models/attnflow", copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelCorrupted, match=r"weights\.safetensors does not match"):
        load_model(copy)


def test_epoch_metrics_that_failed_to_log_fail_the_training_at_its_end(tmp_path, monkeypatch):
    """Per-epoch metrics go out asynchronously; a failure surfaces at `wait()`, before the
    model is logged, instead of vanishing."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import EpochLog

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    epochs = EpochLog(tmp_path, "no-such-run")
    epochs(1, {"epoch": 1, "loss": 0.5})  # returns at once
    with pytest.raises(MlflowException):
        epochs.wait()


def test_epoch_metrics_go_out_together_at_most_every_flush_interval(tmp_path, monkeypatch):
    """The first epoch is sent at once, later ones together once `flush_s` has passed,
    the rest at `wait()`; MLflow ends up with every epoch's metrics."""
    from pipelines.tracking import EpochLog, client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlc = client(tmp_path)
    run_id = mlc.create_run(mlc.create_experiment("epochs")).info.run_id
    now = [0.0]
    epochs = EpochLog(tmp_path, run_id, flush_s=10.0, clock=lambda: now[0])
    sends = []
    log_batch = epochs._client.log_batch
    monkeypatch.setattr(
        epochs._client,
        "log_batch",
        lambda *a, **kw: sends.append(len(kw["metrics"])) or log_batch(*a, **kw),
    )
    for epoch in range(1, 7):  # one epoch every 4 s
        epochs(epoch, {"epoch": epoch, "loss": 1.0 / epoch, "valid_ndcg@10": 0.01 * epoch})
        now[0] += 4.0
    assert sends == [2, 6]  # epoch 1 at t=0; epochs 2-4 at t=12
    epochs.wait()
    assert sends == [2, 6, 4]  # epochs 5-6, buffered at t=16 and t=20
    history = mlc.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
    assert "valid_ndcg_at_10" in mlc.get_run(run_id).data.metrics


def test_deferred_artifacts_are_drawn_later_once(tmp_path, synth_split, monkeypatch, request):
    """What a warm retrain does: stages log the model and metrics, the plots come later."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking import log_deferred_artifacts

    # logging the model sets MLflow's process-wide URI: the other tests' store comes back
    request.addfinalizer(lambda uri=mlflow.get_tracking_uri(): mlflow.set_tracking_uri(uri))

    shutil.copytree(synth_split, tmp_path / "data" / "split")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ATTNFLOW_MLFLOW_ARTIFACTS", (tmp_path / "artifacts").as_uri())
    cfg = small_config(**{"train.epochs": 2, "ingest.dataset": "synthetic"})
    summary = train.run(cfg, tmp_path, defer_artifacts=True)
    baselines.run(cfg, tmp_path)
    evaluate.run(cfg, tmp_path, defer_artifacts=True)
    client = MlflowClient()
    run_id = summary["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["test_ndcg_at_10"] > 0  # metrics are not deferred
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert "train.json" in arts
    assert "plots" not in arts and "evaluation.json" not in arts

    logged = log_deferred_artifacts(cfg, tmp_path)
    assert set(logged) == {
        "plots/training_curves.png",
        "plots/segments.png",
        "plots/attention.png",
        "evaluation.json",
    }
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert set(logged) - {"evaluation.json"} == plots
    assert "evaluation.json" in {a.path for a in client.list_artifacts(run_id)}
    assert log_deferred_artifacts(cfg, tmp_path) == []  # nothing twice
