"""The `baselines` stage: its report is what `evaluate` compares with, never a stale one."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from pipelines import baselines
from pipelines.errors import DataError
from tests.model.conftest import small_config


@pytest.fixture
def project(tmp_path, synth_split):
    shutil.copytree(synth_split, tmp_path / "data" / "split")
    return tmp_path


def test_report_holds_each_baselines_test_scores_for_this_split_and_protocol(project):
    cfg = small_config(**{"ingest.dataset": "synthetic"})
    report = baselines.run(cfg, project)
    assert set(report["baselines"]) == {"most_popular", "item_knn", "markov"}
    on_disk = json.loads((project / "reports/baselines.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    # the planted successors make the last-item Markov chain beat popularity
    markov, popular = (
        report["baselines"][n]["full"]["ndcg@10"] for n in ("markov", "most_popular")
    )
    assert markov > popular > 0
    assert baselines.load_scores(cfg, project) == on_disk["baselines"]


def test_evaluate_refuses_a_missing_or_stale_baselines_report(project):
    cfg = small_config(**{"ingest.dataset": "synthetic"})
    with pytest.raises(DataError, match="missing: run `attnflow baselines` first"):
        baselines.load_scores(cfg, project)
    baselines.run(cfg, project)

    # other evaluation settings than the report's: another seed of the sampled negatives
    other = small_config(**{"ingest.dataset": "synthetic", "evaluate.seed": "7"})
    with pytest.raises(DataError, match="other evaluate settings"):
        baselines.load_scores(other, project)
    # the model learns from the validation events too: so must the baselines
    refit = small_config(**{"ingest.dataset": "synthetic", "train.refit_with_valid": "true"})
    with pytest.raises(DataError, match="other evaluate settings"):
        baselines.load_scores(refit, project)

    # another split under the same path: one user's test target changed
    test_path = project / "data/split/test.parquet"
    test = pd.read_parquet(test_path)
    first = test.loc[0, "item_idx"]
    test.loc[0, "item_idx"] = test.loc[test["item_idx"] != first, "item_idx"].iloc[0]
    test.to_parquet(test_path)
    with pytest.raises(DataError, match="another split"):
        baselines.load_scores(cfg, project)
