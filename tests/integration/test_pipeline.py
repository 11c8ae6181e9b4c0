"""The data pipeline end to end: `dvc repro` from a fresh clone, and the retrain flow."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, venv_env


@pytest.fixture(scope="module")
def clone(tmp_path_factory, mirror) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("clone"))
    # The full DAG runs here; a short training keeps the test fast.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=2, patience=2)
    params["model"].update(max_len=50)
    # two epochs need not beat the most-popular baseline: no baseline gate here, the
    # gate-failure test sets its own
    params["gates"].update(baselines=[])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


STAGES = ["ingest", "validate", "split", "baselines", "train", "evaluate"]


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_dvc_repro_from_a_fresh_clone_then_nothing_changes(clone):
    first = dvc("repro", cwd=clone)
    assert first.returncode == 0, first.stderr + first.stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    split = json.loads((clone / "reports/split.json").read_text())
    assert split["dataset"] == "ml-latest-small" and split["n_users"] == 610
    assert (clone / "gx/uncommitted/data_docs/local_site/index.html").exists()
    evaluation = json.loads((clone / "reports/evaluate.json").read_text())
    assert evaluation["model"]["full"]["ndcg@10"] > 0
    assert (clone / "models/attnflow/weights.safetensors").exists()
    second = dvc("repro", cwd=clone)
    assert second.returncode == 0
    assert "Data and pipelines are up to date." in second.stdout
    assert "Running stage" not in second.stdout
    assert "up to date" in dvc("status", cwd=clone).stdout


def test_retrain_flow_runs_the_dvc_dag_and_retries_a_held_lock(clone):
    """The flow runs only what changed, and survives another process holding the DVC lock."""
    from dvc.lock import Lock

    from flows.retrain import retrain

    assert dvc("repro", cwd=clone).returncode == 0
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["split"]["min_item_events"] = 8  # a different split: every later stage reruns
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    retrain(root=str(clone), stages=[])  # start Prefect's temporary API before taking the lock
    lock = Lock(str(clone / ".dvc" / "tmp" / "lock"))
    lock.lock()
    threading.Timer(8.0, lock.unlock).start()  # DVC gives up after 3 s: the first try fails
    started = time.monotonic()
    result = retrain(root=str(clone))
    by_stage = {s["stage"]: s for s in result["stages"]}
    assert [s["stage"] for s in result["stages"]] == STAGES
    assert all(s["in_process"] for s in result["stages"])  # warm: no process per stage
    assert result["data"]["pushed"]  # through DVC's API, to the default remote
    # the new model's plots and report, drawn beside registration
    assert set(result["artifacts"]) == {
        "plots/training_curves.png",
        "plots/segments.png",
        "plots/attention.png",
        "evaluation.json",
    }
    assert by_stage["ingest"]["attempts"] >= 2  # failed on the lock, retried
    assert not by_stage["ingest"]["ran"] and not by_stage["validate"]["ran"]
    assert by_stage["split"]["ran"] and by_stage["split"]["attempts"] == 1
    assert all(by_stage[s]["ran"] for s in ("baselines", "train", "evaluate"))
    assert time.monotonic() - started > 5
    assert json.loads((clone / "reports/split.json").read_text())["n_items"] < 3657
    # DVC's own view agrees with what the flow recorded in-process
    assert "up to date" in dvc("status", cwd=clone).stdout
    warm_lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]

    # the same stages through `dvc repro` processes write the same dvc.lock
    forced = dvc("repro", "--force", "--single-item", "split", cwd=clone)
    assert forced.returncode == 0, forced.stderr
    assert yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["split"] == warm_lock["split"]

    # back to the earlier split: DVC restores the later stages from its run cache
    params["split"]["min_item_events"] = yaml.safe_load(
        (Path(__file__).parents[2] / "params.yaml").read_text()
    )["split"]["min_item_events"]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again_result = retrain(root=str(clone), deploy=False)
    again = {s["stage"]: s for s in again_result["stages"]}
    assert again_result["artifacts"] == []  # the restored model's run has them
    assert all(again[s]["restored"] for s in ("split", "baselines", "train", "evaluate"))
    assert not any(again[s]["ran"] for s in STAGES)
    assert json.loads((clone / "reports/split.json").read_text())["n_items"] == 3657
    assert "up to date" in dvc("status", cwd=clone).stdout


def test_retrain_flow_can_run_each_stage_in_a_dvc_repro_process(clone):
    """`warm=False`: the command-line path, one `dvc repro` process per stage."""
    from flows.retrain import retrain

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["evaluate"]["seed"] = 7  # other sampled negatives: the baselines and evaluate rerun
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = retrain(root=str(clone), warm=False, deploy=False)
    by_stage = {s["stage"]: s for s in result["stages"]}
    assert not any("in_process" in s for s in result["stages"])
    assert by_stage["baselines"]["ran"] and by_stage["evaluate"]["ran"]
    assert not by_stage["train"]["ran"]
    assert "up to date" in dvc("status", cwd=clone).stdout

    params["train"]["seed"] = 5  # another model on the same split: the baselines stay
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = retrain(root=str(clone), warm=False, deploy=False)
    by_stage = {s["stage"]: s for s in result["stages"]}
    assert by_stage["train"]["ran"] and by_stage["evaluate"]["ran"]
    assert not by_stage["baselines"]["ran"]
    assert "up to date" in dvc("status", cwd=clone).stdout


def test_retrain_flow_stops_on_rejected_data(clone):
    """Validation failure is not retried, and split does not run on rejected data."""
    from flows.retrain import retrain
    from pipelines.errors import ValidationFailed

    assert dvc("repro", cwd=clone).returncode == 0
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["validate"]["rating_max"] = 4.0  # every 4.5 and 5.0 rating is now out of range
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = {f: (clone / "reports" / f).read_text() for f in ("split.json", "train.json")}
    with pytest.raises(ValidationFailed, match=r"expect_column_values_to_be_between\(value\)"):
        retrain(root=str(clone))
    for f, text in before.items():  # neither split nor train ran on the rejected data
        assert (clone / "reports" / f).read_text() == text
    assert "validate" in dvc("status", cwd=clone).stdout  # still out of date: not accepted


def test_train_stage_under_torchrun_ddp_then_recorded_by_dvc(clone):
    """What a multi-GPU worker does (2 CPU processes on gloo here): torchrun, then dvc commit."""
    from pipelines.versioning import repro_distributed

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["validate"]["rating_max"] = 5.0  # undo the rejected-data test's change
    params["train"]["seed"] = 11  # the train stage is out of date now
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert dvc("repro", "split", cwd=clone).returncode == 0
    out = repro_distributed("train", clone, 2)
    assert out["ran"] and out["processes"] == 2
    summary = json.loads((clone / "reports/train.json").read_text())
    assert summary["world_size"] == 2
    assert "up to date" in dvc("status", "train", cwd=clone).stdout
    again = repro_distributed("train", clone, 2)
    assert not again["ran"]


def test_a_model_that_fails_its_gates_fails_the_retrain_without_a_retry(clone):
    """A gate failure is final: not retried (it would fail the same way), and a re-run
    with nothing changed fails the same way without training again."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.retrain import retrain
    from pipelines.gates import GateFailed

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["validate"]["rating_max"] = 5.0  # undo the rejected-data test's change
    params["train"]["seed"] = 12  # a new model
    params["gates"].update(baselines=["most_popular"], min_lift_vs_baseline=100.0)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = retrain(root=str(clone), return_state=True)
    assert state.is_failed()
    with pytest.raises(GateFailed, match="does not beat most_popular"):
        state.result()
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    register = [t for t in tasks if t.name.startswith("register")]
    assert [t.run_count for t in register] == [1]
    # the rejected model's run still gets its plots and report, for whoever looks at why
    from pipelines.tracking import client

    run_id = json.loads((clone / "reports/train.json").read_text())["mlflow_run_id"]
    assert "evaluation.json" in {a.path for a in client(clone).list_artifacts(run_id)}

    with pytest.raises(GateFailed, match="failed its gates when it was registered"):
        retrain(root=str(clone))
    assert "up to date" in dvc("status", cwd=clone).stdout  # nothing was trained again
