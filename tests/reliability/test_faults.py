"""Fault injection with real components: each fault is caused for real, never mocked.

- the MLflow tracking server dies while a model is registered (a real `mlflow server`);
- the DVC remote is unreachable for `attnflow data push` (real DVC, an S3 endpoint on a
  closed port);
- the feedback log's disk fills up under a real model service (a real tmpfs);
- a model's weights are corrupted on disk and in the registry's artifact store;
- a DVC cache object is corrupted (`attnflow data verify` names it).

Each test states what must hold after the fault: a clear one-line error, nothing lost,
nothing half done, and recovery once the fault is gone.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, venv_env

ATTNFLOW = str(Path(sys.executable).parent / "attnflow")


def _cli(
    args: list[str], cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`attnflow <args>` in `cwd`, as an operator would run it."""
    return subprocess.run(
        [ATTNFLOW, *args],
        cwd=cwd,
        env=venv_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt one byte of `path` in place (the middle one by default)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _tree_digest(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under `folders`, by path: what must survive a fault unchanged."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# --- DVC: an unreachable remote, a corrupted cache object ----------------------------------------


@pytest.fixture(scope="module")
def data_clone(tmp_path_factory) -> Path:
    """A copy of the repository whose data stages (ingest, validate, split) ran on small data."""
    root = copy_repo(tmp_path_factory.mktemp("faults-clone"))
    (root / "dvc.lock").unlink(missing_ok=True)  # this clone's own data versions only
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["dataset"] = "synthetic"
    params["ingest"]["synthetic"].update(n_users=200, n_items=80, events_per_user=12)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "split"],
        cwd=root,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return root


def test_push_to_an_unreachable_remote_fails_clearly_and_loses_nothing(data_clone):
    """`attnflow data push` to an S3 endpoint nobody listens on: one line, non-zero, data intact."""
    from services.launch import free_port

    root = data_clone
    watched = (root / "data", root / ".dvc" / "cache")
    before = _tree_digest(*watched)
    assert any("/data/split/" in p for p in before) and any("/cache/" in p for p in before)
    proc = _cli(
        ["data", "push"],
        root,
        timeout=240,
        ATTNFLOW_DVC_REMOTE="s3://attnflow-faults/data",
        ATTNFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",  # closed: nothing listens
        AWS_ACCESS_KEY_ID="faults",
        AWS_SECRET_ACCESS_KEY="faults-secret",
        AWS_MAX_ATTEMPTS="2",
    )
    assert proc.returncode == 75, proc.stderr  # transient: an orchestrator retries it
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert "remote is unreachable" in errors[0] and "127.0.0.1" in errors[0], errors[0]
    assert _tree_digest(*watched) == before  # nothing in the workspace or the cache changed
    assert (
        "Data and pipelines are up to date"
        in subprocess.run(
            [sys.executable, "-m", "dvc", "status", "ingest", "validate", "split"],
            cwd=root,
            env=venv_env(),
            capture_output=True,
            text=True,
        ).stdout
    )


def test_data_verify_names_a_corrupted_cache_object(data_clone):
    """A healthy cache passes; one flipped byte in a file inside `data/split` is named, exit 3."""
    root = data_clone
    ok = _cli(["data", "verify"], root)
    assert ok.returncode == 0, ok.stderr
    assert "cache ok" in ok.stdout

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    split = next(o for o in lock["stages"]["split"]["outs"] if o["path"] == "data/split")
    cache = root / ".dvc" / "cache" / "files" / "md5"
    manifest = json.loads((cache / split["md5"][:2] / split["md5"][2:]).read_text())
    victim = max(manifest, key=lambda e: e["relpath"])  # any file of the directory output
    obj = cache / victim["md5"][:2] / victim["md5"][2:]
    # DVC may hardlink or protect cache objects: write a new file in its place.
    data = bytearray(obj.read_bytes())
    obj.chmod(0o644)
    obj.unlink()
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))

    bad = _cli(["data", "verify"], root)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, bad.stderr
    assert f"data/split/{victim['relpath']}" in lines[0] and str(obj) in lines[0]
    assert victim["md5"] in lines[0]
