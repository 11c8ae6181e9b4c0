"""`attnflow down` stops what a component started after it came up (a worker's flow runs)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

import psutil

from services.launch import free_port, live_descendants, spawn
from services.stack import Stack
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


def test_a_pid_that_is_not_a_spawned_service_yields_no_descendants():
    # this test process runs no service id: a recorded pid reused by it is left alone
    assert live_descendants(os.getpid()) == []
