"""DVC: the stage DAG of `dvc.yaml`, running one stage, and the data remote.

The DAG is written once, in `dvc.yaml`; `load_dag` reads it so that the Prefect
flows run the same stages in the same order. DVC holds a repository lock, so
every DVC command here runs under a process-wide lock and a held repository lock
becomes a `TransientError` that the orchestrator retries.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import AttnflowError, DataError, TransientError, ValidationFailed

log = logging.getLogger(__name__)

REMOTE_ENV = "ATTNFLOW_DVC_REMOTE"  # e.g. s3://bucket/attnflow; default: the local remote
S3_ENDPOINT_ENV = "ATTNFLOW_S3_ENDPOINT_URL"
ENV_REMOTE_NAME = "env"
_DVC_LOCK = threading.Lock()


@dataclass
class Stage:
    """One stage of dvc.yaml and the stages it depends on."""

    name: str
    cmd: str
    deps: list[str]
    outs: list[str]
    upstream: list[str] = field(default_factory=list)


def _paths(entries: list[Any] | None) -> list[str]:
    out = []
    for entry in entries or []:
        out.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return out


def _covers(out: str, dep: str) -> bool:
    out, dep = out.rstrip("/"), dep.rstrip("/")
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def load_dag(dvc_yaml: Path) -> list[Stage]:
    """The stages of `dvc_yaml` in a topological order (each after its upstream stages)."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}
    stages: dict[str, Stage] = {}
    for name, body in (spec.get("stages") or {}).items():
        outs = _paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(body.get("plots"))
        stages[name] = Stage(name, str(body["cmd"]), _paths(body.get("deps")), outs)
    for stage in stages.values():
        stage.upstream = sorted(
            {
                other.name
                for other in stages.values()
                if other is not stage and any(_covers(o, d) for o in other.outs for d in stage.deps)
            }
        )
    ordered: list[Stage] = []
    done: set[str] = set()
    pending = list(stages.values())
    while pending:
        ready = [s for s in pending if set(s.upstream) <= done]
        if not ready:
            raise DataError(f"{dvc_yaml}: the stages form a cycle: {[s.name for s in pending]}")
        for s in ready:
            ordered.append(s)
            done.add(s.name)
            pending.remove(s)
    return ordered


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # `attnflow <stage>` in dvc.yaml must resolve to this installation's console script.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(args: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `dvc <args>` in `root` under the process-wide DVC lock."""
    cmd = [sys.executable, "-m", "dvc", *args]
    with _DVC_LOCK:
        proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise _dvc_error(args, proc)
    return proc


def _dvc_error(args: list[str], proc: subprocess.CompletedProcess[str]) -> AttnflowError:
    text = (proc.stderr or "") + (proc.stdout or "")
    ours = [ln.removeprefix("error: ") for ln in text.splitlines() if ln.startswith("error: ")]
    detail = ours[-1] if ours else _last_error_line(text)
    if "Unable to acquire lock" in text or "is busy" in text:
        return TransientError(f"dvc {' '.join(args)}: the DVC repository is locked; {detail}")
    code = re.search(r"exited with (\d+)", text)
    exit_code = int(code.group(1)) if code else proc.returncode
    if exit_code == ValidationFailed.exit_code:
        return ValidationFailed(detail)
    if exit_code == TransientError.exit_code:
        return TransientError(detail)
    return AttnflowError(f"dvc {' '.join(args)} failed: {detail}")


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def repro_stage(name: str, root: Path) -> dict[str, Any]:
    """`dvc repro --single-item <name>`: run the stage if its deps or params changed."""
    started = time.perf_counter()
    proc = dvc(["repro", "--single-item", name], root)
    skipped = "didn't change, skipping" in proc.stdout or "is cached" in proc.stdout
    return {"stage": name, "ran": not skipped, "seconds": round(time.perf_counter() - started, 3)}


def configure_remote(root: Path) -> str:
    """The remote to use: `ATTNFLOW_DVC_REMOTE` (written to .dvc/config.local) or the default."""
    url = os.environ.get(REMOTE_ENV)
    if not url:
        return ""
    dvc(["remote", "add", "--local", "--force", ENV_REMOTE_NAME, url], root)
    endpoint = os.environ.get(S3_ENDPOINT_ENV)
    if endpoint:
        dvc(["remote", "modify", "--local", ENV_REMOTE_NAME, "endpointurl", endpoint], root)
    return ENV_REMOTE_NAME


def data_command(action: str, root: Path) -> str:
    """`attnflow data push|pull|status`: DVC against the configured remote."""
    remote = configure_remote(root)
    remote_args = ["-r", remote] if remote else []
    if action == "push":
        return dvc(["push", *remote_args], root).stdout.strip() or "nothing to push"
    if action == "pull":
        return dvc(["pull", *remote_args], root).stdout.strip() or "nothing to pull"
    if action == "status":
        local = dvc(["status"], root).stdout.strip()
        cloud = dvc(["status", "--cloud", *remote_args], root, check=False)
        remote_text = (cloud.stdout or cloud.stderr).strip()
        return f"workspace: {local}\nremote: {remote_text}"
    raise DataError(f"unknown data action {action!r}: use push, pull or status")


def data_hash(root: Path, out: str = "data/split") -> str | None:
    """The DVC content hash of an output in dvc.lock (the data version a model saw)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    spec = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    for stage in (spec.get("stages") or {}).values():
        for entry in stage.get("outs", []):
            if entry.get("path") == out:
                return entry.get("md5")
    return None
