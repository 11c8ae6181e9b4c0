"""`attnflow down` stops what a component started after it came up (a worker's flow runs),
and the model service a rollout in flight was bringing up; the reconciler stops the one a
rollout that died left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil

from services.launch import free_port, live_descendants, spawn
from services.stack import Stack, StackError
from tests.conftest import REPO

# Like a Prefect worker: after it is up (and recorded), it starts a flow run in a
# session of its own, out of reach of a signal to the worker's process group.
LATE_CHILD = (
    "import subprocess, sys, time\n"
    "time.sleep(0.5)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
    " start_new_session=True)\n"
    "time.sleep(120)\n"
)


def test_down_stops_a_process_the_component_started_after_up(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    stack = Stack(tmp_path)
    handle = spawn("late-child", [sys.executable, "-c", LATE_CHILD], free_port(), log_dir=tmp_path)
    late: list[int] = []
    try:
        with stack._locked() as state:  # what `attnflow up` records: nothing under it yet
            state["components"]["worker-cpu"] = {"pid": handle.pid, "pids": []}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not live_descendants(handle.pid):
            time.sleep(0.1)
        late = live_descendants(handle.pid)
        assert len(late) == 1, late
        child = psutil.Process(late[0])
        assert os.getsid(child.pid) != os.getsid(handle.pid)  # a group signal misses it

        assert stack.down() == ["worker-cpu"]
        handle.proc.wait(timeout=10)
        _, alive = psutil.wait_procs([child], timeout=10)
        assert not alive, f"pid {child.pid} outlived `down`"
    finally:  # whatever the outcome, leave no process behind
        for pid in [handle.pid, *late]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        handle.proc.wait(timeout=10)


# Like a warm spare that takes its time to adopt a version: it answers no POST /adopt.
SLOW_SPARE = (
    "import http.server, pathlib, sys, time\n"
    "class Adopt(http.server.BaseHTTPRequestHandler):\n"
    "    def do_POST(self):\n"
    "        pathlib.Path(sys.argv[2]).touch()\n"
    "        time.sleep(120)\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), Adopt).serve_forever()\n"
)


def _running_children() -> set[int]:
    procs = psutil.Process().children(recursive=True)
    return {p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def _stack_with_slow_spare(tmp_path):
    """A stack folder whose recorded spare is a SLOW_SPARE; (stack, its handle, the file
    it touches when asked to adopt)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    stack = Stack(tmp_path)
    port, asked = free_port(), tmp_path / "adopt-asked"
    spare = spawn("model-spare", [sys.executable, "-c", SLOW_SPARE, str(port), str(asked)], port)
    with stack._locked() as state:  # what `ensure_spare` records
        state["models"]["spare"] = {"pid": spare.pid, "pids": [], "url": spare.url, "role": "spare"}
    return stack, spare, asked


def _wait_for(path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.05)
    assert path.exists(), "the rollout never asked the spare to adopt"


def test_down_stops_the_spare_a_rollout_is_adopting_and_nothing_starts_after(tmp_path):
    # Before, the rollout took the spare off the state while it adopted the version:
    # `down` in that second left the spare running, and the rollout then started a
    # model service cold into a stack that was down.
    before = _running_children()
    stack, spare, asked = _stack_with_slow_spare(tmp_path)
    errors: list[BaseException] = []

    def rollout() -> None:  # the rollout flow's start-challenger task
        try:
            stack.start_model("7", str(tmp_path), "challenger")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=rollout)
    try:
        thread.start()
        _wait_for(asked)
        assert [row["name"] for row in stack.status()] == ["model:challenger (starting)"]

        assert stack.down() == ["model:challenger (starting)"]
        spare.proc.wait(timeout=10)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the rollout kept waiting for a spare that is gone"
        assert len(errors) == 1 and isinstance(errors[0], StackError), errors
        assert "the stack is down" in str(errors[0])
        assert stack.ensure_spare() is None  # no new spare either, until `attnflow up`
        assert _running_children() == before  # the cold start it tried was stopped
        state = stack.read()
        assert state["models"] == {} and state["starting"] == {} and state["down"]
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(spare.pid).kill()
        spare.proc.wait(timeout=10)
        thread.join(timeout=60)


# The rollout flow's start-challenger step, in a process of its own (a flow run).
ROLLOUT = (
    "import sys\n"
    "from services.stack import Stack\n"
    "Stack(sys.argv[1]).start_model('7', sys.argv[1], 'challenger')\n"
)


def test_the_service_a_rollout_that_died_left_starting_is_stopped_and_forgotten(tmp_path):
    # A flow run killed while the spare adopted its version left the spare serving
    # nobody, recorded as starting, until the next `attnflow down`.
    stack, spare, asked = _stack_with_slow_spare(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.Popen([sys.executable, "-c", ROLLOUT, str(tmp_path)], cwd=REPO, env=env)
    try:
        _wait_for(asked)
        assert stack.reap_abandoned() == []  # its rollout is still at it: left alone
        assert [row["name"] for row in stack.status()] == ["model:challenger (starting)"]
        assert spare.proc.poll() is None

        run.kill()
        run.wait(timeout=10)
        assert stack.reap_abandoned() == ["model:challenger (starting)"]
        spare.proc.wait(timeout=10)
        assert stack.status() == []
        assert stack.read()["starting"] == {}
        assert stack.reap_abandoned() == []
    finally:
        for proc in (run, spare.proc):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)


def test_a_pid_that_is_not_a_spawned_service_yields_no_descendants():
    # this test process runs no service id: a recorded pid reused by it is left alone
    assert live_descendants(os.getpid()) == []
