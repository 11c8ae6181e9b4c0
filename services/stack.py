"""The local stack: every process `attnflow up` starts, and who serves which model version.

State lives in `<state>/run/stack.json` (pids, ports, URLs, logs) so that separate
commands (`attnflow up`, `status`, `down`, `rollback`, the rollout flow) act on the
same processes. Every process runs in its own process group and is stopped with its
descendants, so `attnflow down` leaves nothing behind.

Roles of model services: `champion` (serving), `challenger` (in a canary) and
`standby` (the previous champion, kept warm for `attnflow rollback`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.config import load_config
from pipelines.errors import AttnflowError
from pipelines.registry import CHALLENGER, CHAMPION, state_dir
from services.launch import (
    Handle,
    LaunchError,
    adopt,
    free_port,
    live_descendants,
    pid_running,
    set_session_nice,
    spawn,
    start_gateway,
    start_model_service,
    start_spare_service,
    wait_ready_or_relaunch,
)
from services.warmstart import SOCKET_ENV, socket_path

log = logging.getLogger(__name__)

STANDBY = "standby"
SPARE = "spare"  # a warm model service with no model yet: the next challenger or champion
# State keys besides components and models. STARTING: model services on their way into a
# role (a cold start, a spare adopting a version), by pid, so that `down` finds them; each
# names its `owner`, the process bringing it up (a rollout's flow run, `attnflow up`).
# DOWN: set by `attnflow down` and cleared by `attnflow up`; no model service starts
# in between (a rollout that was in flight when the stack went down, say).
STARTING = "starting"
DOWN = "down"
# Scaled-out back ends for `attnflow up` (defaults: SQLite and a local folder). Prefect's
# server reads PREFECT_API_DATABASE_CONNECTION_URL itself.
MLFLOW_BACKEND_ENV = "ATTNFLOW_MLFLOW_BACKEND_URI"  # e.g. postgresql+psycopg2://...
MLFLOW_ARTIFACTS_ENV = "ATTNFLOW_MLFLOW_ARTIFACTS_DESTINATION"  # e.g. s3://mlflow-artifacts
SECRET_ENVS = (
    "ATTNFLOW_ADMIN_TOKEN",
    "ATTNFLOW_WEBHOOK_SECRET",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
    "ATTNFLOW_USER_SALT",  # one salt for every process: pseudonyms match across them
)


class StackError(AttnflowError):
    """The stack is not in the state a command needs (not up, no champion, ...)."""


def _alive(pid: int | None) -> bool:
    return bool(pid) and pid_running(pid)


def stop_pids(pids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM each pid's process group and the pids themselves; SIGKILL what outlives it."""
    pids = [p for p in pids if p]
    for pid in pids:
        for target in (
            lambda p: os.killpg(p, signal.SIGTERM),
            lambda p: os.kill(p, signal.SIGTERM),
        ):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                target(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            for target in (
                lambda p: os.killpg(p, signal.SIGKILL),
                lambda p: os.kill(p, signal.SIGKILL),
            ):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    target(pid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)


def _down_error(what: str) -> StackError:
    return StackError(f"the stack is down: {what}; start it with `attnflow up`")


def _tree(rec: dict[str, Any]) -> list[int]:
    """A recorded component's pids: those seen at start-up and those under it now."""
    return sorted({rec["pid"], *rec.get("pids", []), *live_descendants(rec["pid"])})


def _record(handle: Handle, **extra: Any) -> dict[str, Any]:
    return {
        "pid": handle.pid,
        "pids": handle.descendants(),
        "url": handle.url,
        "port": handle.port,
        "log": str(handle.log_path),
        **extra,
    }


class Stack:
    """Reads and changes the local stack of one project folder."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.run_dir = state_dir(self.root) / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = self.run_dir / "stack.json"
        self.cfg = load_config(self.root / "params.yaml")

    # --- state -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The state, read and written back under an exclusive lock."""
        with open(self.run_dir / "stack.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(self.file)

    def read(self) -> dict[str, Any]:
        """The recorded state: {"components": {...}, "models": {role: {...}}}."""
        if not self.file.exists():
            return {"components": {}, "models": {}}
        return json.loads(self.file.read_text())

    def is_up(self) -> bool:
        """Whether the gateway of this stack is running."""
        gw = self.read()["components"].get("gateway")
        return bool(gw and _alive(gw["pid"]))

    def gateway_url(self) -> str:
        gw = self.read()["components"].get("gateway")
        if not gw or not _alive(gw["pid"]):
            raise StackError("the gateway is not running: start the stack with `attnflow up`")
        return gw["url"]

    def served(self) -> dict[str, dict[str, Any]]:
        """Model services that are running, by role."""
        return {role: m for role, m in self.read()["models"].items() if _alive(m["pid"])}

    def component(self, name: str) -> dict[str, Any] | None:
        return self.read()["components"].get(name)

    # --- secrets for the local stack ---------------------------------------------------------

    def secrets(self) -> dict[str, str]:
        """Admin token and webhook secret: from the environment, else generated once.

        Generated values are kept in `<state>/run/secrets.json` (mode 0600) so that the
        local stack's processes and CLI agree; deployments set them in the environment.
        Values that come from the environment are never written to disk.
        """
        path = self.run_dir / "secrets.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        out, generated = {}, {}
        for name in SECRET_ENVS:
            if os.environ.get(name):  # set by the operator: used, never written down
                out[name] = os.environ[name]
                continue
            if name not in stored:
                # MLflow encrypts stored webhook secrets with a Fernet key (32 url-safe bytes)
                stored[name] = (
                    base64.urlsafe_b64encode(os.urandom(32)).decode()
                    if name.startswith("MLFLOW_")
                    else secrets.token_urlsafe(32)
                )
                generated[name] = stored[name]
            out[name] = stored[name]
        if generated:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(stored, fh)
        return out

    # --- processes ---------------------------------------------------------------------------

    def add_component(self, name: str, handle: Handle, **extra: Any) -> dict[str, Any]:
        rec = _record(handle, **extra)
        with self._locked() as state:
            state["components"][name] = rec
        return rec

    def spawn_component(
        self,
        name: str,
        cmd: list[str],
        port: int,
        env: dict[str, str] | None = None,
        background: bool = False,
    ) -> Handle:
        """Start a long-running process of the stack (logs and pid in the run folder).

        `background`: a control-plane server (MLflow, Prefect, the webhook receiver),
        started at `serve.control_plane_nice` so that it yields the CPU to training
        and serving on a shared machine.
        """
        nice = self.cfg.serve.control_plane_nice if background else 0
        handle = spawn(name, cmd, port, self.cfg.serve.host, env, self.run_dir, nice=nice)
        self.add_component(name, handle)
        return handle

    def start_gateway(self, champion_url: str) -> dict[str, Any]:
        """The canary gateway on `serve.gateway_port`, in front of `champion_url`."""
        handle = start_gateway(
            champion_url,
            port=self.cfg.serve.gateway_port,
            host=self.cfg.serve.host,
            admin_token=self.secrets()["ATTNFLOW_ADMIN_TOKEN"],
            log_dir=self.run_dir,
        )
        return self.add_component("gateway", handle)

    def start_model(self, version: str, folder: str, role: str) -> dict[str, Any]:
        """A model service for registry `version` in `role`; replaces that role's.

        The warm spare takes the version on when there is one (about a second);
        otherwise a service starts cold, given the pinned URI (`models:/<name>/<version>`)
        so that it reports its version. `folder` is where that version was fetched to.
        The service is in the state from its first second (`STARTING`), so that
        `attnflow down` stops it; raises `StackError` when the stack went down meanwhile.
        """
        from pipelines.registry import model_name

        old = self.read()["models"].get(role)
        uri = f"models:/{model_name()}/{version}"
        rec = self._adopt_spare(uri, version, folder, role) or self._start_cold(
            uri, version, folder, role
        )
        if not self._put(rec, role):
            raise _down_error(f"v{version} was not started as {role}")
        if old and old["pid"] != rec["pid"]:
            stop_pids(_tree(old))
        return rec

    def _start_cold(self, uri: str, version: str, folder: str, role: str) -> dict[str, Any]:
        """A new model service for `uri`, recorded as starting until it is ready."""
        host = self.cfg.serve.host
        extra = {"version": str(version), "folder": str(folder), "role": role}
        launched: list[Handle] = []

        def launch() -> Handle:
            handle = start_model_service(
                uri,
                port=free_port(host),
                host=host,
                variant=role,
                feedback_log=self.root / self.cfg.serve.feedback_log,
                env=self._model_env(),
                log_dir=self.run_dir,
                wait=False,
            )
            self._claim(_record(handle, **extra, owner=os.getpid()))
            launched.append(handle)
            return handle

        handle = None
        try:
            handle = wait_ready_or_relaunch(launch(), launch)
        except LaunchError:
            if self.read().get(DOWN):  # `down` stopped it while it was starting
                raise _down_error(f"v{version} was not started as {role}") from None
            raise
        finally:  # those given up on (a taken port, a failure) are stopped already
            for gone in launched:
                if gone is not handle:
                    self._forget(gone.pid)
        return _record(handle, **extra)

    def _claim(self, rec: dict[str, Any]) -> None:
        """Record a model service that is starting; stop it when the stack is down."""
        if not self._put(rec, None):
            raise _down_error("no model service is started")

    def _put(self, rec: dict[str, Any], role: str | None) -> bool:
        """Record a model service in `role` (None: as starting), off the starting list
        otherwise; when the stack is down, stop it instead and return False."""
        with self._locked() as state:
            down = bool(state.get(DOWN))
            if not down:
                starting = state.setdefault(STARTING, {})
                if role is None:
                    starting[str(rec["pid"])] = rec
                else:
                    starting.pop(str(rec["pid"]), None)
                    state["models"][role] = rec
        if down:
            stop_pids(_tree(rec))
        return not down

    def _model_env(self) -> dict[str, str]:
        return {"ATTNFLOW_ROOT": str(self.root), "ATTNFLOW_PARAMS": str(self.root / "params.yaml")}

    def ensure_spare(self) -> dict[str, Any] | None:
        """Start a warm spare model service unless one runs (`serve.warm_spare`); no wait.

        A cold model service spends ten seconds and more importing torch, transformers,
        MLflow and BentoML before it loads its model; a rollout waits for that. The
        spare does it ahead of time, at `serve.control_plane_nice` so that it yields
        to training, and `start_model` hands it the next version. It costs one idle
        process (about 620 MB resident on this project's models).
        """
        if not self.cfg.serve.warm_spare:
            return None
        state = self.read()
        if state.get(DOWN):
            return None
        spare = state["models"].get(SPARE)
        if spare and _alive(spare["pid"]):
            return spare
        handle = start_spare_service(
            host=self.cfg.serve.host,
            env={
                **self._model_env(),
                "ATTNFLOW_ADMIN_TOKEN": self.secrets()["ATTNFLOW_ADMIN_TOKEN"],
            },
            log_dir=self.run_dir,
            feedback_log=self.root / self.cfg.serve.feedback_log,
        )
        set_session_nice(handle.pid, self.cfg.serve.control_plane_nice)
        rec = _record(handle, version=None, folder=None, role=SPARE)
        return rec if self._put(rec, SPARE) else None  # None: the stack went down meanwhile

    def _adopt_spare(self, uri: str, version: str, folder: str, role: str) -> dict[str, Any] | None:
        """The spare, now serving `uri` in `role`; None when there is no spare or it failed.

        While it adopts, the spare is recorded as starting (not as the spare, which the
        next rollout would take too).
        """
        with self._locked() as state:
            spare = None if state.get(DOWN) else state["models"].pop(SPARE, None)
            if spare:
                starting = {**spare, "version": str(version), "role": role, "owner": os.getpid()}
                state.setdefault(STARTING, {})[str(spare["pid"])] = starting
        if not spare:
            return None
        if not _alive(spare["pid"]):
            self._drop(spare)  # whatever of it is left
            return None
        set_session_nice(spare["pid"], 0)  # it serves now: back to an equal share
        token = self.secrets()["ATTNFLOW_ADMIN_TOKEN"]
        try:
            adopt(spare["url"], uri, role, token, timeout=120, pid=spare["pid"])
        except LaunchError as exc:
            log.warning("%s; starting a model service for v%s instead", exc, version)
            self._drop(spare)
            return None
        pids = sorted({*spare.get("pids", []), *live_descendants(spare["pid"])})
        return {**spare, "pids": pids, "version": str(version), "folder": str(folder), "role": role}

    def _drop(self, rec: dict[str, Any]) -> None:
        """Stop a model service that is starting and forget it."""
        stop_pids(_tree(rec))
        self._forget(rec["pid"])

    def _forget(self, pid: int) -> None:
        """Take a model service off the starting list (it is serving, or stopped)."""
        with self._locked() as state:
            state.get(STARTING, {}).pop(str(pid), None)

    def reap_abandoned(self) -> list[str]:
        """Stop the model services whose start was abandoned: those recorded as starting
        whose owner process is gone (a rollout's flow run that crashed or was killed
        while its challenger came up). Returns what was stopped, as `status` names it.

        Nothing else would: `down` stops them, but the stack may stay up for weeks.
        """

        def abandoned(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
            starting = state.get(STARTING, {}).items()
            return {pid: r for pid, r in starting if r.get("owner") and not _alive(r["owner"])}

        if not abandoned(self.read()):  # the usual case: no lock taken, nothing written
            return []
        with self._locked() as state:
            gone = abandoned(state)
            for pid in gone:
                del state[STARTING][pid]
        for rec in gone.values():
            log.warning(
                "model service pid %s for v%s was left starting by pid %s, which is gone; "
                "stopping it",
                rec["pid"],
                rec.get("version"),
                rec["owner"],
            )
            stop_pids(_tree(rec))
        return [f"model:{rec['role']} (starting)" for rec in gone.values()]

    def stop_role(self, role: str) -> None:
        """Stop the model service in `role`, if any."""
        with self._locked() as state:
            rec = state["models"].pop(role, None)
        if rec:
            stop_pids(_tree(rec))

    def promote(self, version: str) -> None:
        """challenger -> champion, old champion -> standby (the older standby stops)."""
        with self._locked() as state:
            models = state["models"]
            if models.get(CHALLENGER, {}).get("version") != str(version):
                raise StackError(f"v{version} is not the running challenger")
            old_standby = models.pop(STANDBY, None)
            if CHAMPION in models:
                models[STANDBY] = {**models[CHAMPION], "role": STANDBY}
            models[CHAMPION] = {**models.pop(CHALLENGER), "role": CHAMPION}
        if old_standby:
            stop_pids(_tree(old_standby))

    def swap_standby(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """standby <-> champion (for rollback); returns (new champion, new standby)."""
        with self._locked() as state:
            models = state["models"]
            standby = models.get(STANDBY)
            if not standby or not _alive(standby["pid"]):
                raise StackError("no previous champion is on standby to roll back to")
            champion = models[CHAMPION]
            models[CHAMPION] = {**standby, "role": CHAMPION}
            models[STANDBY] = {**champion, "role": STANDBY}
            return models[CHAMPION], models[STANDBY]

    def status(self) -> list[dict[str, Any]]:
        """Every recorded process with whether it is alive."""
        state = self.read()
        rows = [{"name": n, **c, "alive": _alive(c["pid"])} for n, c in state["components"].items()]
        rows += [
            {"name": f"model:{r}", **m, "alive": _alive(m["pid"])}
            for r, m in state["models"].items()
        ]
        rows += [
            {"name": f"model:{m['role']} (starting)", **m, "alive": _alive(m["pid"])}
            for m in state.get(STARTING, {}).values()
        ]
        return rows

    def down(self) -> list[str]:
        """Stop every process of the stack (models first, then the rest, newest first).

        Marks the stack down first, so that a rollout in flight starts no model service
        after this looked; what it recorded meanwhile is stopped in a further pass.
        """
        with self._locked() as state:
            state[DOWN] = True
        stopped: list[str] = []
        done: set[int] = set()
        while True:
            with self._locked() as state:
                todo = [
                    *((f"model:{role}", rec) for role, rec in state["models"].items()),
                    *(
                        (f"model:{rec['role']} (starting)", rec)
                        for rec in state.get(STARTING, {}).values()
                    ),
                    *reversed(list(state["components"].items())),
                ]
                todo = [(name, rec) for name, rec in todo if rec["pid"] not in done]
                if not todo:  # nothing recorded since the last pass: forget it all
                    state["components"], state["models"], state[STARTING] = {}, {}, {}
                    break
            for name, rec in todo:
                stop_pids(_tree(rec))  # a worker's flow runs in flight included
                done.add(rec["pid"])
                stopped.append(name)
        return stopped


@contextlib.contextmanager
def prefect_api(url: str | None = None) -> Iterator[None]:
    """Point this process's Prefect client at `url` (default: `$PREFECT_API_URL` now).

    Prefect freezes its settings when it is first imported; a process that imported it
    before `up` exported the server's URL would otherwise talk to an ephemeral server.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = url or os.environ.get("PREFECT_API_URL")
    if not url:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def python() -> str:
    """The interpreter the stack's Python processes run with."""
    return sys.executable


# --- attnflow up ---------------------------------------------------------------------------


def _wait_http(url: str, timeout: float, what: str, handle: Handle | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle is not None and not handle.alive():
            raise StackError(f"{what} exited; log {handle.log_path}:\n{handle.log_tail(15)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise StackError(f"{what} did not answer {url} within {timeout:.0f} s")


# The webhook receiver listens on loopback over plain HTTP; MLflow allows neither by default.
# MLflow also caches the webhook list per event for a minute; a short cache means the
# receiver hears alias moves right after `attnflow up` registers it.
MLFLOW_WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_CACHE_TTL": "5",
}
# MLflow 3's server starts a job runner (seven huey consumer processes, about 240 MB
# and a steady trickle of CPU each) for GenAI evaluation jobs and trace rollups, which
# attnflow never submits; webhooks are delivered from the server's own threads.
MLFLOW_SERVER_ENV = {**MLFLOW_WEBHOOK_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


# Deployments whose runs only look at the state now (prefect.yaml): a missed run is
# not worth catching up on.
PERIODIC_CHECKS = ("reconcile", "drift-check")


def drop_missed_runs(client, deployments: Iterable[str], before: datetime) -> int:
    """Delete the scheduled runs of `deployments` that were due before `before`; a count.

    Prefect creates scheduled runs ahead of time and a worker starts every run that is
    due, however late: after an hour down, `attnflow up` would start sixty `reconcile`
    runs back to back, a Python process of several CPU seconds each. A check looks at
    the state as it is now, so the next run due does the work of all the missed ones.
    """
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    due = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=before),
    )
    named = DeploymentFilter(name=DeploymentFilterName(any_=list(deployments)))
    dropped = 0
    while runs := client.read_flow_runs(flow_run_filter=due, deployment_filter=named, limit=200):
        for run in runs:  # a page at a time: days down leave hundreds
            client.delete_flow_run(run.id)
        dropped += len(runs)
    return dropped


class LocalStack(Stack):
    """`attnflow up`: MLflow, Prefect (server, pools, deployments, a cpu worker), the
    webhook receiver, the canary gateway and the champion's model service."""

    def urls(self) -> dict[str, str]:
        h, s = self.cfg.serve.host, self.cfg.serve
        return {
            "mlflow": f"http://{h}:{s.mlflow_port}",
            "prefect": f"http://{h}:{s.prefect_port}",
            "prefect_api": f"http://{h}:{s.prefect_port}/api",
            "gateway": f"http://{h}:{s.gateway_port}",
            "webhook": f"http://{h}:{s.webhook_port}/webhook",
        }

    def env(self) -> dict[str, str]:
        """What every process of the stack (and the CLI talking to it) needs."""
        urls = self.urls()
        return {
            "MLFLOW_TRACKING_URI": urls["mlflow"],
            "PREFECT_API_URL": urls["prefect_api"],
            "PREFECT_HOME": str(state_dir(self.root) / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "ATTNFLOW_ROOT": str(self.root),
            "ATTNFLOW_STATE_DIR": str(state_dir(self.root)),
            **self.secrets(),
        }

    def _running(self, name: str) -> bool:
        rec = self.component(name)
        return bool(rec and _alive(rec["pid"]))

    def _cli(self, *args: str, check: bool = True) -> None:
        import subprocess

        env = {**os.environ, **self.env()}
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            raise StackError(
                f"prefect {' '.join(args)} failed: "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
            )

    def up(self, progress=lambda msg: None) -> dict[str, str]:
        """Start whatever part of the stack is not running; returns the URLs."""
        urls, env, state = self.urls(), self.env(), state_dir(self.root)
        s = self.cfg.serve
        with self._locked() as st:
            st.pop(DOWN, None)  # model services may start again
        os.environ.update(env)  # this process talks to the servers it starts
        if not self._running("mlflow"):
            progress("starting the MLflow server")
            h = self.spawn_component(
                "mlflow",
                [
                    python(),
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    os.environ.get(MLFLOW_BACKEND_ENV) or f"sqlite:///{state / 'mlflow.db'}",
                    "--artifacts-destination",
                    os.environ.get(MLFLOW_ARTIFACTS_ENV) or str(state / "mlartifacts"),
                    "--host",
                    s.host,
                    "--port",
                    str(s.mlflow_port),
                    "--workers",
                    "1",
                ],
                s.mlflow_port,
                env={**env, **MLFLOW_SERVER_ENV},
                background=True,
            )
            _wait_http(f"{urls['mlflow']}/health", 120, "the MLflow server", h)
        if not self._running("prefect"):
            progress("starting the Prefect server")
            h = self.spawn_component(
                "prefect",
                [
                    str(Path(sys.executable).parent / "prefect"),
                    "server",
                    "start",
                    "--host",
                    s.host,
                    "--port",
                    str(s.prefect_port),
                ],
                s.prefect_port,
                env={**env, "PREFECT_API_URL": ""},
                background=True,
            )
            _wait_http(f"{urls['prefect_api']}/health", 180, "the Prefect server", h)
            progress("creating work pools and deployments")
            for pool in ("cpu", "gpu"):
                self._cli("work-pool", "create", pool, "--type", "process", "--overwrite")
            self._cli("gcl", "create", "dvc-repo", "--limit", "1", check=False)
            self._cli(
                "--no-prompt", "deploy", "--all", "--prefect-file", str(self.root / "prefect.yaml")
            )
        # retrain and rollout runs are forked from the standby if there is one (prefect.yaml)
        warm = {SOCKET_ENV: str(self.ensure_warm_start(env, progress))} if s.warm_start else {}
        if not self._running("worker-cpu"):
            for run in self.crash_orphaned_runs():
                progress(f"marked flow run {run} crashed: the worker that ran it is gone")
            missed = self.drop_missed_checks()
            if missed:
                progress(f"dropped {missed} reconcile/drift-check run(s) missed while down")
            progress("starting a process worker for the cpu pool")
            worker = self.spawn_component(
                "worker-cpu",
                [
                    str(Path(sys.executable).parent / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    "cpu",
                    "--type",
                    "process",
                ],
                0,
                # Prefect polls every 10 s by default: up to 10 s of idle wait before a
                # triggered retrain or rollout starts. A poll costs the (niced) server
                # about 24 ms of CPU; one a second is 0.7 CPU-s a minute more than every
                # 2 s, and training beside a server polled 1 or 2 times a second more
                # ran as fast as without (12 epochs: 21.5 and 21.2 s against 21.9 and
                # 21.0 s; 4 a second more: 22.3 s); a triggered run starts 0.5 s sooner.
                # Deployments that set their own command (prefect.yaml: `nice ... python -m
                # prefect.engine`) find this environment's interpreter first. The stages'
                # own log lines (data checks, epochs, gates) go to the flow run's log too.
                env={
                    "PREFECT_WORKER_QUERY_SECONDS": "1",
                    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipelines,services",
                    **env,
                    **warm,
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
                },
            )
            # The worker's session yields too: its polls and the checks it starts itself
            # (reconcile, drift-check) took a full share beside training, whatever their
            # own `nice`. Only the session's group: a process nice would be inherited by
            # a cold retrain, which could not lower it again; a retrain or rollout run
            # runs in the standby's session, or in a session of its own when it starts
            # cold (services.warmstart).
            set_session_nice(worker.pid, s.control_plane_nice)
        if not self._running("webhook"):
            progress("starting the MLflow webhook receiver")
            h = self.spawn_component(
                "webhook",
                [
                    python(),
                    "-m",
                    "services.webhook",
                    "--host",
                    s.host,
                    "--port",
                    str(s.webhook_port),
                ],
                s.webhook_port,
                env=env,
                background=True,
            )
            _wait_http(f"http://{s.host}:{s.webhook_port}/livez", 60, "the webhook receiver", h)
            register_webhook(self.root, urls["webhook"], env["ATTNFLOW_WEBHOOK_SECRET"])
        self.ensure_serving(progress)
        return urls

    def ensure_warm_start(self, env: dict[str, str], progress=lambda msg: None) -> Path:
        """The warm-start standby (services/warmstart.py), started if it is not running;
        its socket. It has the worker's environment, so what it imports sees the same."""
        sock = socket_path(self.run_dir)
        if not self._running("warmstart"):
            progress("starting the warm-start standby for retrain and rollout runs")
            self.spawn_component(
                "warmstart",
                [python(), "-m", "services.warmstart", "serve", "--socket", str(sock)],
                0,
                env={
                    **env,
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
                },
            )
        return sock

    def crash_orphaned_runs(self, pool: str = "cpu") -> list[str]:
        """Mark `pool`'s flow runs Crashed whose process died with its worker; their names.

        A worker killed with its flow runs leaves them RUNNING on the server, and a
        RUNNING run holds its deployment's concurrency slot (`retrain` has one) until
        the slot's lease runs out, five minutes later. The process worker records each
        run's pid on this machine, so a run whose pid is gone cannot be running.
        """
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterName,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        crashed = []
        states = FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
        with prefect_api(self.urls()["prefect_api"]), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=states)),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            )
            for run in runs:
                pid = str(run.infrastructure_pid or "").rpartition(":")[2]
                if not pid.isdigit() or _alive(int(pid)):
                    continue
                message = f"its process ({pid}) is gone: the worker running it died"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                log.warning("flow run %s marked crashed: %s", run.name, message)
                crashed.append(run.name)
        return crashed

    def drop_missed_checks(self, grace_s: float = 30.0) -> int:
        """Delete the periodic checks' runs that fell due while no worker ran (see
        `drop_missed_runs`); how many were dropped."""
        from prefect.client.orchestration import get_client

        before = datetime.now(UTC) - timedelta(seconds=grace_s)
        with prefect_api(self.urls()["prefect_api"]), get_client(sync_client=True) as client:
            return drop_missed_runs(client, PERIODIC_CHECKS, before)

    def ensure_serving(self, progress=lambda msg: None) -> dict[str, Any] | None:
        """The gateway up, the `champion` alias's version served behind it, a spare warming."""
        from pipelines.registry import fetch_model, get_alias, model_name
        from pipelines.rollout import GatewayClient

        for name in self.reap_abandoned():
            progress(f"stopped {name}: the process bringing it up is gone")
        champion = get_alias(CHAMPION, root=self.root)
        served = self.served().get(CHAMPION)
        if champion is not None and (served is None or served["version"] != champion):
            progress(f"starting the model service for champion v{champion}")
            fetched = fetch_model(f"models:/{model_name()}/{champion}", self.root)
            served = self.start_model(champion, str(fetched.folder), CHAMPION)
        placeholder = f"http://{self.cfg.serve.host}:{self.cfg.serve.champion_port}"
        if not self._running("gateway"):
            progress("starting the canary gateway")
            self.start_gateway(served["url"] if served else placeholder)
        elif served is not None:
            gw = GatewayClient(self.gateway_url(), self.secrets()["ATTNFLOW_ADMIN_TOKEN"])
            if (gw.state().get("backends") or {}).get(CHAMPION, {}).get("url") != served["url"]:
                gw.set_backends(served["url"], None)
        self.ensure_spare()
        return served


def register_webhook(root: Path, url: str, secret: str) -> None:
    """(Re)create the MLflow registry webhook that posts alias changes to the receiver."""
    from pipelines.tracking import client

    mlc = client(root)
    for hook in mlc.list_webhooks():
        if hook.name == "attnflow-rollout":
            mlc.delete_webhook(hook.webhook_id)
    mlc.create_webhook(
        name="attnflow-rollout",
        url=url,
        secret=secret,
        events=["model_version_alias.created"],
        description="alias moves start a canary rollout (attnflow)",
    )
