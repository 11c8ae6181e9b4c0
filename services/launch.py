"""Start and stop model services and the canary gateway as local processes.

Each process runs in its own process group (so stopping it stops BentoML's workers
too), logs to a file, and is returned as a `Handle` with its pid, url and log path.
Used by the rollout flow, by `attnflow up`, by the serving tests and the benchmark.

    with start_model_service("models:/attnflow@champion", port=3000) as champion:
        with start_gateway(champion.url, port=8080) as gateway:
            ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pipelines.errors import AttnflowError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MODEL_SERVICE = "services.model_service:ModelService"


PORT_TAKEN = "Address already in use"  # in a service's log when its port was not free


class LaunchError(AttnflowError):
    """A service process did not come up (exited, not ready in time, model not loadable)."""


SERVICE_ID_ENV = "ATTNFLOW_SERVICE_ID"  # marks every process of one spawned service


def _owned_elsewhere(proc: psutil.Process, service_id: str) -> bool:
    try:
        owner = proc.environ().get(SERVICE_ID_ENV)
    except psutil.Error:
        return False
    return bool(owner and service_id and owner != service_id)


def live_descendants(pid: int, service_id: str | None = None) -> list[int]:
    """Pids under `pid` now, in any session, except trees of other spawned services.

    `service_id` defaults to the one `pid` itself runs with; a `pid` without one is not
    a service `spawn` started (a recorded pid since reused, say) and yields nothing.
    Processes a service starts later (the flow runs a Prefect worker launches, each in a
    session of its own) are only found this way: pids recorded at start-up miss them.
    """
    try:
        leader = psutil.Process(pid)
        if service_id is None:
            service_id = leader.environ().get(SERVICE_ID_ENV, "")
            if not service_id:
                return []
        todo = leader.children()
    except psutil.Error:
        return []
    found: list[int] = []
    while todo:
        proc = todo.pop()
        if _owned_elsewhere(proc, service_id):
            continue  # another service's tree: not ours to stop
        found.append(proc.pid)
        with contextlib.suppress(psutil.Error):
            todo.extend(proc.children())
    return sorted(found)


@dataclass
class Handle:
    """A started service process: stop it with `stop()` or use it as a context manager.

    BentoML's arbiter starts its workers in sessions of their own, so a process-group
    signal does not reach them: the handle also tracks the leader's descendants. A
    descendant that is itself a service started by `spawn` (a model service that a
    rollout process started, say) belongs to its own handle and is left alone.
    """

    name: str
    pid: int
    url: str
    port: int
    log_path: Path
    proc: subprocess.Popen = field(repr=False)
    known: set[int] = field(default_factory=set, repr=False)  # descendants seen so far
    service_id: str = ""  # the SERVICE_ID_ENV value its processes inherit

    def alive(self) -> bool:
        """Whether the process (the leader) is still running."""
        return self.proc.poll() is None

    def descendants(self) -> list[int]:
        """Pids of the leader's processes now, plus every descendant seen before."""
        self.known |= set(live_descendants(self.pid, self.service_id))
        return sorted(self.known)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `timeout` seconds."""
        _stop([self], timeout)

    def kill(self) -> None:
        """SIGKILL the leader and every descendant at once (a crash, for drills and tests)."""
        pids = self.descendants()
        _signal_group(self.proc, signal.SIGKILL)
        for pid in pids:
            _kill_pid(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        _reap(pids, 5.0)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the process log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the group id is the pid: started with start_new_session


def _kill_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _reap(pids: list[int], timeout: float) -> list[int]:
    """Wait for `pids` to exit; returns those still running.

    A zombie counts as gone: a worker whose arbiter died is reparented to init, which
    may take its time to reap it, but it serves nothing any more.
    """
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() > deadline:
            return [p.pid for p in alive]
        time.sleep(0.02)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        return _running(psutil.Process(pid))
    except psutil.Error:
        return False


def _stop(handles: list[Handle], timeout: float) -> None:
    """SIGTERM every leader (BentoML's arbiter stops its workers), then SIGKILL leftovers."""
    pids = {id(h): h.descendants() for h in handles}
    for h in handles:
        _signal_group(h.proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for h in handles:
        try:
            h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %.0f s; killing it", h.name, h.pid, timeout)
        _signal_group(h.proc, signal.SIGKILL)
        left = _reap(pids[id(h)], max(0.1, deadline - time.monotonic()))
        for pid in left:
            _kill_pid(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.proc.wait(timeout=5)
        if _reap(left, 5.0):
            log.error("%s: processes %s survived SIGKILL", h.name, left)


def stop_all(handles: list[Handle], timeout: float = 15.0) -> None:
    """Stop several processes at once: SIGTERM to every one first, then wait for each."""
    _stop(handles, timeout)


_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 12_000  # ports are picked from [ephemeral low - _SPAN, ephemeral low)
_PICKS = random.SystemRandom()  # not the global `random`: a seeded test would repeat picks


def free_port(host: str = "127.0.0.1", tries: int = 50) -> int:
    """A port nothing listens on now, below the kernel's ephemeral range.

    The port is released before the service binds it. A port from the ephemeral range
    (what binding port 0 gives) could meanwhile be handed to anyone binding port 0,
    and BentoML's process manager binds its control sockets that way at startup: a
    spare model service once died on its own control socket taking its HTTP port.
    Below that range the kernel never hands a port out by itself.
    """
    try:
        low = int(_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: any free port
        low = 0
    for _ in range(tries if low > _SPAN else 0):
        port = _PICKS.randrange(low - _SPAN, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:  # in use: another pick
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 1.0, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def spawn(
    name: str,
    cmd: list[str],
    port: int,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    nice: int = 0,
) -> Handle:
    """Run `cmd` from the repository root in its own process group, logging to a file.

    `env` adds to this process's environment (the repository is put on PYTHONPATH).
    `nice` > 0 lowers the process's CPU priority, for good (see `set_session_nice`).
    """
    env = _child_env(env)
    if nice > 0 and shutil.which("nice"):
        cmd = ["nice", "-n", str(nice), *cmd]
    service_id = f"{name}:{port}:{os.urandom(4).hex()}"
    env[SERVICE_ID_ENV] = service_id
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="attnflow-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() takes the workers too
        )
    if nice > 0:
        set_session_nice(proc.pid, nice)
    log.info("started %s (pid %d) on %s:%d, log %s", name, proc.pid, host, port, log_path)
    return Handle(
        name, proc.pid, f"http://{host}:{port}", port, log_path, proc, service_id=service_id
    )


def set_session_nice(pid: int, nice: int) -> bool:
    """Set the CPU share of `pid`'s whole session, not only of its own process.

    With Linux's autogroup scheduling (on by default on desktop and many server
    kernels) each session is one scheduling group and groups share the CPU evenly, so
    a plain `nice` only ranks processes inside their own session: a service started
    in its own session would still take as much CPU as the training run in another.
    The group's nice (`/proc/<pid>/autogroup`) ranks the whole session; setting it to
    0 or above needs no privilege, so it can also be taken back to 0. Returns whether
    it was set (False: no autogroup here, where a plain `nice` does the job).
    """
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        return False
    # Some sandboxes (gVisor-like /proc) accept the write and ignore it: read it back.
    return session_nice(pid) == nice


def session_nice(pid: int) -> int | None:
    """The nice of `pid`'s autogroup ('/autogroup-12 nice 10'); None where there is none.

    None also where the file exists but says nothing parseable, as in sandboxes whose
    /proc emulates the file without autogroup scheduling behind it.
    """
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()
    except OSError:
        return None
    match = re.search(r"\bnice\s+(-?\d+)", text)
    return int(match.group(1)) if match else None


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    env.update(extra or {})
    return env


def start_model_service(
    source: str | Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    variant: str = "champion",
    feedback_log: Path | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    wait: bool = True,
    timeout: float = 120.0,
) -> Handle:
    """`bentoml serve` the model service for `source` (model folder or models:/ URI).

    With `wait`, returns once /readyz answers 200; raises `LaunchError` (and stops the
    process) if it exits, reports that its model cannot be served, or is not ready
    within `timeout` seconds.
    """
    extra = {"ATTNFLOW_MODEL_SOURCE": str(source), "ATTNFLOW_VARIANT": variant}
    if feedback_log is not None:
        extra["ATTNFLOW_FEEDBACK_LOG"] = str(feedback_log)
    if overrides:
        extra["ATTNFLOW_SET"] = ";".join(overrides)
    extra.update(env or {})

    def launch(port: int) -> Handle:
        cmd = [sys.executable, "-m", "bentoml", "serve", MODEL_SERVICE, "--host", host]
        cmd += ["--port", str(port)]
        return spawn(f"model-{variant}", cmd, port, host, extra, log_dir)

    handle = launch(port or free_port(host))
    if not wait:
        return handle
    if port is None:  # a port we picked may be taken by a neighbour: relaunch on another
        return wait_ready_or_relaunch(handle, lambda: launch(free_port(host)), timeout)
    try:
        wait_ready(handle, timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


def start_spare_service(
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    feedback_log: Path | None = None,
) -> Handle:
    """A warm spare model service on a free port: imports done, no model until `adopt`.

    Returns at once; the spare is warming up in the background. `env` should carry
    `ATTNFLOW_ADMIN_TOKEN`, which `adopt` must present.
    """
    return start_model_service(
        "",
        port=free_port(host),
        host=host,
        variant="spare",
        feedback_log=feedback_log,
        env={**(env or {}), "ATTNFLOW_SPARE": "1"},
        log_dir=log_dir,
        wait=False,
    )


def adopt(
    url: str,
    source: str,
    variant: str,
    token: str,
    timeout: float = 120.0,
    pid: int | None = None,
) -> dict:
    """Have the spare at `url` take on `source` (model folder or models:/ URI) as `variant`.

    Waits for a spare that is still warming up. Returns its /info once it is ready;
    raises `LaunchError` when it refuses (not a waiting spare, wrong token) or cannot
    load the model, or is not up within `timeout` seconds. `pid`: the spare's process;
    once it is gone (stopped by `attnflow down`, say), there is nothing to wait for.
    """
    body = json.dumps({"source": source, "variant": variant}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"{url}/adopt", data=body, headers=headers, method="POST")
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=max(1.0, left)) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise LaunchError(
                f"the spare at {url} did not adopt {source}: {exc.code} {detail}"
            ) from None
        except OSError as exc:  # not listening yet: still warming up
            if pid is not None and not pid_running(pid):
                raise LaunchError(f"the spare at {url} (pid {pid}) exited") from None
            if left <= 0:
                raise LaunchError(
                    f"the spare at {url} was not up in {timeout:.0f}s: {exc}"
                ) from None
            time.sleep(0.2)


def wait_ready_or_relaunch(
    handle: Handle, relaunch: Callable[[], Handle], timeout: float = 120.0, tries: int = 3
) -> Handle:
    """`wait_ready`; when the service's port was taken before it bound, `relaunch()`.

    `free_port` releases the port it found, so a process starting at the same moment
    (another model service, or the sockets BentoML's process manager binds) can take it
    first. Only a port picked that way should be given up, so callers that were handed
    a port use `wait_ready`. Returns the handle that became ready; on failure, the last
    one launched is stopped.
    """
    try:
        for _ in range(tries - 1):
            try:
                wait_ready(handle, timeout)
                return handle
            except LaunchError as exc:
                if PORT_TAKEN not in str(exc):
                    raise
            log.warning(
                "%s: port %d was taken before it bound; relaunching", handle.name, handle.port
            )
            handle.stop()
            handle = relaunch()
        wait_ready(handle, timeout)
        return handle
    except BaseException:
        handle.stop()
        raise


def wait_ready(handle: Handle, timeout: float = 120.0, model_service: bool = True) -> None:
    """Block until `handle` answers /readyz 200; fail fast when it cannot become ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise LaunchError(
                f"{handle.name} exited early; log {handle.log_path}:\n{handle.log_tail()}"
            )
        try:
            status, _ = _get(f"{handle.url}/readyz", timeout=1.0)
            if status == 200:
                handle.descendants()  # remember the workers while the arbiter is alive
                return
            if model_service:
                status, body = _get(f"{handle.url}/info", timeout=2.0, data=b"{}")
                reason = json.loads(body).get("not_ready_reason") if status == 200 else None
                if reason and reason != "starting":
                    raise LaunchError(f"{handle.name} cannot serve: {reason}")
        except (OSError, ValueError):
            pass  # not listening yet
        time.sleep(0.1)
    raise LaunchError(
        f"{handle.name} not ready after {timeout:.0f} s; log {handle.log_path}:\n"
        f"{handle.log_tail()}"
    )


def start_gateway(
    champion: str,
    challenger: str | None = None,
    weight: int = 0,
    port: int | None = None,
    host: str = "127.0.0.1",
    admin_token: str | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    wait: bool = True,
    timeout: float = 30.0,
) -> Handle:
    """Start the canary gateway (uvicorn) in front of the champion (and challenger) URLs.

    With `wait`, returns once the gateway answers /livez (its /readyz follows the
    champion's readiness, which may come later).
    """
    port = port or free_port(host)
    extra: dict[str, str] = {}
    if admin_token is not None:
        extra["ATTNFLOW_ADMIN_TOKEN"] = admin_token
    if overrides:
        extra["ATTNFLOW_SET"] = ";".join(overrides)
    extra.update(env or {})
    cmd = [sys.executable, "-m", "services.gateway", "--host", host, "--port", str(port)]
    cmd += ["--champion", champion, "--weight", str(weight)]
    if challenger:
        cmd += ["--challenger", challenger]
    handle = spawn("gateway", cmd, port, host, extra, log_dir)
    if wait:
        deadline = time.monotonic() + timeout
        while True:
            if not handle.alive():
                handle.stop()
                raise LaunchError(
                    f"gateway exited early; log {handle.log_path}:\n{handle.log_tail()}"
                )
            try:
                if _get(f"{handle.url}/livez", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                handle.stop()
                raise LaunchError(f"gateway not up after {timeout:.0f} s; log {handle.log_path}")
            time.sleep(0.05)
    return handle
