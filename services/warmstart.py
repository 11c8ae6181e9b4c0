"""Warm starts for flow runs: the heavy libraries are imported once and each run is forked.

Prefect's process worker starts a new interpreter for every flow run. Before a retrain
can train, that interpreter has to import torch, transformers, MLflow, DVC and pandas:
about 7 s on this kind of machine, every run (and 3 s more for Great Expectations when
the data changed). `attnflow up` starts a *standby* from this module (`serve`): one
process that imports those libraries and then waits on a Unix socket. The retrain
and rollout deployments' command (prefect.yaml) is the *front*,
`python -m services.warmstart run prefect.engine`: it connects, hands over its
arguments, environment, working directory and standard streams, and the standby
forks a child that runs the module with everything already imported. The front relays
signals to the child and exits with the child's status, so the worker sees an ordinary
process: cancelling it reaches the run, and a front killed outright takes the child
with it (the standby kills a child whose front is gone).

Without a standby (the stack is down, the socket is missing, the standby died before
forking the run, not Linux, or `ATTNFLOW_WARMSTART=0`) the front `exec`s the module as
the worker would have. A run started while the standby is still importing waits for it.

Why forking is safe here: the standby imports no attnflow code (a run always sees the
code as it is now), starts no thread (one selector loop; it refuses to serve if an
import started one), and its environment is the worker's, so libraries that read the
environment at import see what a fresh interpreter would. Prefect is the exception
that reads it too early: its settings and logging configuration are made at import
from the environment, and a run brings its own (the flow run's id, the deployment's
variables), so a forked run rebuilds both from its environment before it starts. The
module a run executes (`prefect.engine`) is dropped from the inherited modules, so it
runs as `__main__` exactly once, as under `python -m`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

SOCKET_ENV = "ATTNFLOW_WARMSTART_SOCKET"
ENABLE_ENV = "ATTNFLOW_WARMSTART"
# What a retrain imports before it trains (the flow's own modules are not among them)
PRELOAD = (
    "torch",
    "torch._dynamo",  # imported by the first torch optimizer: 1-2 s on its own
    "transformers",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.bert.modeling_bert",  # the masked objective and MiniLM text
    "mlflow",
    "mlflow.pyfunc",
    "dvc.repo",
    "great_expectations",  # the validate stage, whenever the data changed
    "pandas",
    "pyarrow.parquet",
    "scipy.sparse",
    "matplotlib.pyplot",
    "prefect",  # 1-2 s; settings and logging are rebuilt in each run (see the module doc)
    "prefect.flow_engine",
    # `module:function`: called once here, so that its cache is inherited. MLflow maps
    # every installed module to its distribution (1.5 s, once per process) the first
    # time a model is logged, to warn about requirements the environment lacks.
    "mlflow.utils.requirements_utils:_init_modules_to_packages_map",
)
_HEADER = struct.Struct("!I")  # length of the JSON request that follows


def socket_path(run_dir: Path) -> Path:
    """The standby's socket for a stack's run folder (short enough for AF_UNIX)."""
    path = Path(run_dir).resolve() / "warmstart.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"attnflow-warmstart-{digest}.sock"


# --- the front ---------------------------------------------------------------------------------


def _exec(module: str, args: list[str]) -> None:
    """Become `python -m module args` (what the worker would have started); never returns.

    A run that starts cold in the worker's session would share that session's low CPU
    priority (`serve.control_plane_nice`): it leaves for a session of its own, which
    starts at an equal share. The worker signals the run by its pid, which stays. Not
    from a terminal's session (nice 0 there): Ctrl-C must still reach it.
    """
    from services.launch import session_nice  # here: the standby imports no attnflow code

    if (session_nice(os.getpid()) or 0) > 0:
        with contextlib.suppress(OSError):  # already a group leader: its own session
            os.setsid()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def run(module: str, args: list[str]) -> int:
    """Run `module` in a child of the standby (or exec it without one); its exit status."""
    path = os.environ.get(SOCKET_ENV)
    if os.environ.get(ENABLE_ENV, "1") == "0" or not path or sys.platform != "linux":
        _exec(module, args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # no standby listening: start cold
        sock.close()
        _exec(module, args)
    request = json.dumps(
        {"module": module, "args": args, "env": dict(os.environ), "cwd": os.getcwd()}
    ).encode()
    reader = sock.makefile("r")
    try:
        socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])
        sock.sendall(request)
        first = reader.readline()
    except OSError:  # reset: the standby died while this request waited in its backlog
        first = ""
    if not first:  # no child was forked for this run: start it cold
        sock.close()
        _exec(module, args)
    child = int(json.loads(first)["pid"])

    def relay(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, relay)
    line = reader.readline()
    if not line:
        print("warmstart: the standby went away before the run ended", file=sys.stderr)
        return 1
    return int(json.loads(line)["status"])


# --- the standby -------------------------------------------------------------------------------


class Standby:
    """Accepts fronts on a Unix socket and forks a child for each (single-threaded)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.pid = os.getpid()
        self.children: dict[int, socket.socket] = {}  # child pid -> its front's connection
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.listener.bind(str(self.path))
        self.listener.listen(16)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self._stopping = False

    def serve(self) -> None:
        """Serve until SIGTERM or SIGINT; then stop the children still running."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        try:
            while not self._stopping:
                for key, _ in self.selector.select(timeout=0.2):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._front_event(key.fileobj)
                self._reap()
        finally:
            if os.getpid() == self.pid:  # a child unwinding through here cleans nothing
                self._shutdown()

    def _stop(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)  # a front sends its whole request at once
        try:
            msg, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
            (size,) = _HEADER.unpack(msg)
            request = json.loads(_recv_exactly(conn, size))
        except (OSError, ValueError, struct.error) as exc:
            print(f"warmstart: bad request ({exc!r})", file=sys.stderr, flush=True)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the child: becomes the requested module, never returns here
            self._become(request, fds, conn)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):  # the child makes itself a group leader too
            os.setpgid(pid, pid)
        conn.settimeout(None)
        try:
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except OSError:  # the front is already gone
            _kill_group(pid, signal.SIGKILL)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        run = request.get("env", {}).get("PREFECT__FLOW_RUN_ID")
        print(
            f"warmstart: {request['module']} -> pid {pid}" + (f" (flow run {run})" if run else ""),
            flush=True,
        )

    def _become(self, request: dict, fds: list[int], conn: socket.socket) -> None:
        """In the child: take the front's streams, environment and folder, run the module."""
        import random
        import runpy

        os.setpgid(0, 0)  # its own group: signals and kills reach what it starts as well
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(
                signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler
            )
        self.selector.close()
        self.listener.close()
        conn.close()
        for other in self.children.values():
            other.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # as `python -m` would set them: the folder first, then PYTHONPATH
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [request["cwd"], *extra, *[p for p in sys.path[1:] if p not in extra]]
        sys.argv = [request["module"], *request["args"]]
        random.seed()  # not the standby's state, shared by every child
        _refresh_prefect()
        # as `python -m` runs it: once, as __main__ (a preloaded copy would be run twice,
        # and runpy warns about it)
        sys.modules.pop(request["module"], None)
        code: int | str | None = 0
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
        # The interpreter's own exit (atexit hooks, flushing, non-daemon threads), as a
        # fresh process would end; it unwinds through `serve`, which cleans nothing here.
        sys.exit(code)

    def _front_event(self, conn: socket.socket) -> None:
        """A front's connection became readable: it went away (or broke the protocol)."""
        pid = next((p for p, c in self.children.items() if c is conn), None)
        with contextlib.suppress(OSError):
            if conn.recv(1):
                return  # fronts send nothing after their request; ignore
        if pid is not None:  # the worker killed the front: the run must not outlive it
            print(f"warmstart: front of pid {pid} is gone; killing it", flush=True)
            _kill_group(pid, signal.SIGKILL)
        self.selector.unregister(conn)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"status": code}).encode() + b"\n")
            conn.close()

    def _shutdown(self) -> None:
        for pid in list(self.children):
            _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        for pid in list(self.children):
            _kill_group(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.path.unlink()


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 16))
        if not chunk:
            raise ValueError("request cut short")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _kill_group(pid: int, signum: int) -> None:
    for target in (lambda: os.killpg(pid, signum), lambda: os.kill(pid, signum)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            target()


def _refresh_prefect() -> None:
    """A preloaded Prefect's settings and logging, made again from this environment."""
    if "prefect" not in sys.modules:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()
    setup_logging(incremental=False)


def preload(modules: list[str]) -> list[str]:
    """Import `modules` (and call `module:function` entries); the ones that failed.

    A missing optional library, or a function a library no longer has, starts cold.
    """
    import importlib

    failed = []
    for entry in modules:
        name, _, function = entry.partition(":")
        try:
            module = importlib.import_module(name)
            if function:
                getattr(module, function)()
        except Exception as exc:  # a library that does not import stays cold
            failed.append(f"{entry} ({type(exc).__name__})")
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.warmstart", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="the standby: import, then fork a child per request")
    p_serve.add_argument("--socket", required=True, type=Path)
    p_serve.add_argument("--preload", default=",".join(PRELOAD), help="modules, comma-separated")
    p_run = sub.add_parser("run", help="the front: run a module in a child of the standby")
    p_run.add_argument("module")
    p_run.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "run":
        sys.exit(run(args.module, args.args))
    t0 = time.perf_counter()
    # Listening before the imports: a run started meanwhile (the first retrain right
    # after `attnflow up`) waits in the backlog for the imports it would otherwise
    # repeat cold, and is forked as soon as they are done.
    standby = Standby(args.socket)
    failed = preload([m for m in args.preload.split(",") if m])
    if threading.active_count() != 1:  # forking a process with threads is not safe
        sys.exit(f"warmstart: the imports started {threading.active_count() - 1} thread(s)")
    import gc

    gc.collect()
    gc.freeze()  # the children's collections leave the preloaded objects (and their pages) alone
    print(
        f"warmstart: ready on {args.socket} after {time.perf_counter() - t0:.1f}s of imports"
        + (f"; not preloaded: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    standby.serve()


if __name__ == "__main__":
    main()
