"""Kill-and-resume equals an uninterrupted run; DDP under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, venv_env


def _job(split: Path, ckpt: Path, out: Path, *extra: str, launcher: list[str] | None = None):
    cmd = [
        *(launcher or [sys.executable]),
        "-m",
        "tests.model._train_job",
        str(split),
        str(ckpt),
        str(out),
        *extra,
    ]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=venv_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_training_killed_mid_epoch_resumes_to_the_same_result(synth_split, tmp_path):
    uninterrupted = _job(synth_split, tmp_path / "a", tmp_path / "a.json")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    # Epoch index 1 (the second), after 5 of its steps: a checkpoint was taken at step 4.
    killed = _job(synth_split, tmp_path / "b", tmp_path / "b.json", "--kill-at", "1", "5")
    assert killed.returncode == -9  # SIGKILL: no cleanup, no final save
    assert not (tmp_path / "b.json").exists()
    assert (tmp_path / "b" / "last.pt").exists()
    resumed = _job(synth_split, tmp_path / "b", tmp_path / "b.json")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["resumed_from"] == {"epoch": 1, "step": 4}
    assert b["digest"] == a["digest"]  # bit-identical weights
    assert b["losses"] == a["losses"]


def test_ddp_under_torchrun_two_cpu_processes(synth_split, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = _job(
        synth_split,
        tmp_path / "ddp",
        tmp_path / "ddp.json",
        "--set",
        "train.epochs=3",
        launcher=torchrun,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "ddp.json").read_text())
    rank1 = json.loads((tmp_path / "ddp.json.rank1").read_text())
    assert rank0["world_size"] == 2 and rank1["world_size"] == 2
    assert rank0["digest"] == rank1["digest"]  # gradients all-reduced: replicas stay identical
    assert rank0["losses"][-1] < rank0["losses"][0]
