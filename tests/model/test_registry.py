"""Registry and offline gates: lineage tags, first champion, challenger, failures on record."""

from __future__ import annotations

import shutil

import pytest

from pipelines import baselines, evaluate, train
from pipelines.gates import GateFailed
from pipelines.model import load_extra
from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    aliases,
    fetch_model,
    read_history,
    register_candidate,
)
from pipelines.sequences import load_split
from tests.model.conftest import small_config


@pytest.fixture(scope="module")
def project(tmp_path_factory, synth_split):
    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(synth_split, root / "data" / "split")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("ATTNFLOW_MLFLOW_ARTIFACTS", (root / "artifacts").as_uri())
    mp.setenv("ATTNFLOW_STATE_DIR", str(root / "state"))
    mp.setenv("ATTNFLOW_MODEL_NAME", "attnflow-test")
    yield root
    mp.undo()


def _train(root, **over):
    cfg = small_config(**{"train.epochs": 3, "ingest.dataset": "synthetic", **over})
    train.run(cfg, root)
    baselines.run(cfg, root)
    evaluate.run(cfg, root)
    return cfg


def test_first_model_becomes_champion_with_lineage_tags(project):
    from mlflow import MlflowClient

    cfg = _train(project)
    out = register_candidate(cfg, project)
    assert out["alias"] == CHAMPION and out["champion"] is None
    assert aliases(root=project) == {CHAMPION: out["version"]}
    mv = MlflowClient().get_model_version("attnflow-test", out["version"])
    for tag in (
        "git_commit",
        "dvc_data_hash",
        "data_sha256",
        "params_sha256",
        "metric.test_full_ndcg_at_10",
        "gate.passed",
        "gate.candidate_ndcg_at_10",
        "gate.baseline_most_popular_ndcg_at_10",
    ):
        assert tag in mv.tags, tag
    assert mv.tags["gate.passed"] == "true"
    moves = read_history(project)
    assert [(m.alias, m.version, m.previous) for m in moves] == [(CHAMPION, out["version"], None)]
    fetched = fetch_model(f"models:/attnflow-test@{CHAMPION}", project)
    assert fetched.version == out["version"] and (fetched.folder / "spec.json").exists()


def test_an_equally_good_retrain_becomes_challenger(project):
    cfg = _train(project, **{"train.seed": 5})
    out = register_candidate(cfg, project)
    assert out["alias"] == CHALLENGER, out
    assert "champion_ndcg@10" in out["gates"]["metrics"]
    now = aliases(root=project)
    assert now[CHALLENGER] == out["version"] and now[CHAMPION] != out["version"]


def test_random_weights_fail_the_baseline_gate_and_change_no_alias(project):
    from mlflow import MlflowClient

    from pipelines.train import build_encoder, export_model

    cfg = _train(project, **{"train.seed": 9})
    before = aliases(root=project)
    model_dir = project / cfg.paths.model_dir
    lineage = load_extra(model_dir, "lineage")
    data = load_split(project / cfg.paths.split_dir)
    export_model(build_encoder(cfg, data, project / "cache"), data, model_dir, lineage)
    with pytest.raises(GateFailed, match="does not beat most_popular") as err:
        register_candidate(cfg, project)
    assert aliases(root=project) == before
    version = str(err.value).split()[1]
    mv = MlflowClient().get_model_version("attnflow-test", version)
    assert mv.tags["gate.passed"] == "false" and "most_popular" in mv.tags["gate.reason"]
