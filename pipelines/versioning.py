"""DVC: the stage DAG of `dvc.yaml`, running one stage, and the data remote.

The DAG is written once, in `dvc.yaml`; `load_dag` reads it so that the Prefect
flows run the same stages in the same order. DVC holds a repository lock, so
every DVC command here runs under a process-wide lock and a held repository lock
becomes a `TransientError` that the orchestrator retries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import AttnflowError, DataError, TransientError, ValidationFailed

log = logging.getLogger(__name__)

REMOTE_ENV = "ATTNFLOW_DVC_REMOTE"  # e.g. s3://bucket/attnflow; default: the local remote
S3_ENDPOINT_ENV = "ATTNFLOW_S3_ENDPOINT_URL"
ENV_REMOTE_NAME = "env"
_DVC_LOCK = threading.RLock()  # re-entrant: a warm stage may call DVC itself
# How DVC's remotes (S3, HTTP, SSH) word a network failure.
_UNREACHABLE = (
    "Could not connect to the endpoint URL",
    "Connection refused",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Connect timeout",
    "timed out",
)


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
    talks_to_remote = args[:1] in (["push"], ["pull"], ["fetch"]) or "--cloud" in args
    if talks_to_remote and any(sign in text for sign in _UNREACHABLE):
        # a remote that cannot be reached now may be reachable on the next try
        return TransientError(f"dvc {' '.join(args)}: the DVC remote is unreachable; {detail}")
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


# The dvc.yaml commands the flows may run in their own process instead of a new one.
IN_PROCESS_COMMANDS = {
    f"attnflow {name}": name
    for name in ("ingest", "validate", "split", "baselines", "train", "evaluate")
}


def in_process_runner(cmd: str, root: Path, **options: Any) -> Callable[[], Any] | None:
    """What `cmd` runs, as a call in this process (None: `cmd` is not one of ours).

    `attnflow <stage>` is `pipelines.<stage>.run` on params.yaml, so running that
    function here gives the stage's outputs without a new interpreter that imports
    torch, transformers and MLflow again. `options`: keyword arguments for that `run`
    (what the command line cannot ask for, such as `defer_artifacts`).
    """
    name = IN_PROCESS_COMMANDS.get(" ".join(cmd.split()))
    if name is None:
        return None

    def run() -> Any:
        import importlib

        from pipelines.config import load_config

        module = importlib.import_module(f"pipelines.{name}")
        return module.run(load_config(root / "params.yaml"), root, **options)

    return run


@contextlib.contextmanager
def _repo_here(root: Path) -> Iterator[Any]:
    """DVC's `Repo` for `root`, under the process-wide DVC lock, with `root` as cwd.

    DVC resolves a stage's paths against the working directory, as its command line
    does, and a stage's command runs in the repository root: both need the chdir.
    """
    from dvc.repo import Repo

    with _DVC_LOCK, contextlib.chdir(root), Repo(".") as repo:
        yield repo


def repro_in_process(name: str, root: Path, **options: Any) -> dict[str, Any] | None:
    """`repro_stage`, with the stage's command run in this process (warm imports).

    DVC decides as `dvc repro --single-item` does: an unchanged stage is skipped, a
    run with the same deps and params is restored from DVC's run cache, and otherwise
    the outputs are removed, the command runs (here, as a function call) and the
    outputs are saved, cached and written to dvc.lock. The DVC repository lock is
    released while the command runs, as DVC does for a command's process. Returns
    None when the stage's command cannot run in-process (the caller runs `dvc repro`).
    `options`: keyword arguments for the stage's `run` (see `in_process_runner`).
    """
    from dvc.lock import LockError
    from dvc.stage.cache import RunCacheNotFoundError

    root = Path(root).resolve()
    started = time.perf_counter()
    ran = restored = False
    try:
        with _repo_here(root) as repo:
            with repo.lock:
                stage = next(iter(repo.stage.collect(name)))
                runner = in_process_runner(stage.cmd or "", root, **options)
                if runner is None or stage.frozen:
                    return None
                changed = stage.changed()
                if changed:
                    stage.remove_outs(ignore_remove=False, force=False)
                    try:
                        repo.stage_cache.restore(stage)
                        restored = True
                    except RunCacheNotFoundError:
                        stage.save_deps()
            if changed and not restored:
                runner()
                ran = True
            if ran or restored:
                # as `dvc repro`: no run-cache entry for a stage with an uncached output
                uncached = any(
                    not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot)
                )
                with repo.lock:
                    stage.save(run_cache=not uncached)
                    stage.commit()
                    stage.dump(update_pipeline=False)
    except LockError as exc:
        raise TransientError(f"dvc repro {name}: the DVC repository is locked; {exc}") from exc
    return {
        "stage": name,
        "ran": ran,
        "restored": restored,
        "seconds": round(time.perf_counter() - started, 3),
        "in_process": True,
    }


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


def push_in_process(root: Path) -> str:
    """`dvc push` to the configured remote through DVC's API (no new interpreter)."""
    from dvc.lock import LockError

    remote = configure_remote(root)
    try:
        with _repo_here(Path(root).resolve()) as repo:
            pushed = repo.push(remote=remote or None)
    except LockError as exc:
        raise TransientError(f"dvc push: the DVC repository is locked; {exc}") from exc
    except Exception as exc:  # DVC's errors, and its remote client's (botocore, aiohttp)
        text = f"{exc} {exc.__cause__ or ''}"
        if any(sign in text for sign in _UNREACHABLE):
            raise TransientError(f"dvc push: the DVC remote is unreachable; {exc}") from exc
        raise AttnflowError(f"dvc push failed: {exc}") from exc
    return f"{pushed} files pushed" if pushed else "nothing to push"


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


def repro_distributed(name: str, root: Path, nproc: int) -> dict[str, Any]:
    """Run the `name` stage under torchrun on `nproc` processes (one per GPU), if it changed.

    DVC cannot launch torchrun itself, so the stage's `attnflow <stage>` command runs
    under `torchrun --standalone` and `dvc commit` then records its outputs in dvc.lock,
    exactly as `dvc repro` would have.
    """
    started = time.perf_counter()
    status = dvc(["status", name], root).stdout
    if "up to date" in status or not status.strip():
        return {"stage": name, "ran": False, "seconds": round(time.perf_counter() - started, 3)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "attnflow.cli",
        name,
    ]
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise _dvc_error(["repro", name], proc)
    dvc(["commit", "--force", name], root)
    return {
        "stage": name,
        "ran": True,
        "seconds": round(time.perf_counter() - started, 3),
        "processes": nproc,
    }


# --- cache integrity -------------------------------------------------------------------------


@dataclass
class CacheProblem:
    """One DVC cache object whose content no longer hashes to the md5 that names it."""

    workspace: str  # the output path (for a file inside a directory output: its own path)
    cache: Path
    expected: str
    actual: str

    def line(self) -> str:
        """One line for an operator: what is corrupt, where, and how to repair it."""
        return (
            f"corrupt cache object for {self.workspace}: {self.cache} has md5 {self.actual}, "
            f"dvc.lock expects {self.expected} (delete the object and `dvc pull` or rerun "
            "the stage that produced it)"
        )


def _md5(path: Path) -> str:
    """The md5 of a file's bytes, as DVC 3 computes it for `hash: md5` outputs."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def cache_dir(root: Path) -> Path:
    """The repository's DVC cache folder (`cache.dir` if configured, else `.dvc/cache`)."""
    proc = dvc(["cache", "dir"], root, check=False)
    text = proc.stdout.strip()
    if proc.returncode == 0 and text:
        return Path(text.splitlines()[-1])
    return Path(root) / ".dvc" / "cache"


def _cache_object(cache: Path, md5: str) -> Path:
    # DVC 3 (`hash: md5` in dvc.lock) keeps objects under files/md5/<2>/<rest>.
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _lock_outs(root: Path) -> list[dict[str, Any]]:
    """Every cached output entry of dvc.lock (stage outs, metrics and plots alike)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        raise DataError(f"{lock} does not exist: run the data stages (`dvc repro`) first")
    spec = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    return [
        entry
        for stage in (spec.get("stages") or {}).values()
        for entry in stage.get("outs", [])
        if entry.get("md5")
    ]


def verify_cache(root: Path) -> tuple[list[CacheProblem], dict[str, int]]:
    """Re-hash every DVC cache object that dvc.lock references; the corrupt ones, and counts.

    DVC trusts its cache: a flipped bit in an object is checked out, pushed and trained
    on without a word. Files inside directory outputs are checked through their `.dir`
    manifest. Objects absent from the cache (outputs with `cache: false`, or never
    pulled) are counted as missing, not as corrupt: `dvc pull` or `dvc status` reports them.
    """
    root = Path(root)
    cache = cache_dir(root)
    problems: list[CacheProblem] = []
    counts = {"checked": 0, "missing": 0, "legacy": 0}

    def check(workspace: str, md5: str) -> Path | None:
        obj = _cache_object(cache, md5)
        if not obj.is_file():
            counts["missing"] += 1
            return None
        counts["checked"] += 1
        actual = _md5(obj)
        if actual != md5.removesuffix(".dir"):
            problems.append(CacheProblem(workspace, obj, md5, actual))
            return None
        return obj

    for entry in _lock_outs(root):
        path, md5 = str(entry["path"]), str(entry["md5"])
        if entry.get("hash") != "md5":
            # DVC 2 objects hash text after CRLF normalisation; re-hashing the raw bytes
            # would call healthy files corrupt, so they are only counted.
            counts["legacy"] += 1
            continue
        manifest = check(path, md5)
        if manifest is None or not md5.endswith(".dir"):
            continue
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(CacheProblem(path, manifest, md5, "unreadable .dir manifest"))
            continue
        for item in files:
            check(f"{path.rstrip('/')}/{item['relpath']}", str(item["md5"]))
    for problem in problems:
        log.error("%s", problem.line())
    return problems, counts
