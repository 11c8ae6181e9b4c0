"""Control-plane servers started with `nice` yield the CPU, in their whole session."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import psutil
import pytest

from services.launch import free_port, live_descendants, session_nice, spawn

# Like the MLflow server: its workers are forked after it has started.
FORKS_LATER = (
    "import subprocess, sys, time\n"
    "time.sleep(0.5)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "time.sleep(60)\n"
)


def test_a_niced_component_and_what_it_forks_later_run_at_that_priority(tmp_path):
    own_group_before = session_nice(os.getpid())
    handle = spawn(
        "forks-later", [sys.executable, "-c", FORKS_LATER], free_port(), log_dir=tmp_path, nice=7
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not live_descendants(handle.pid):
            time.sleep(0.1)
        children = live_descendants(handle.pid)
        assert len(children) == 1, children
        for pid in (handle.pid, children[0]):
            assert os.getpriority(os.PRIO_PROCESS, pid) == 7
        if own_group_before is None:
            pytest.skip("this kernel has no autogroup scheduling: the plain nice is the priority")
        # one scheduling group for the session, the child included; ours is untouched
        assert session_nice(handle.pid) == 7
        assert session_nice(children[0]) == 7
        assert session_nice(os.getpid()) == own_group_before
    finally:
        for pid in [handle.pid, *live_descendants(handle.pid)]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        handle.proc.wait(timeout=10)
