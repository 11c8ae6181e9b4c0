"""Control-plane servers started with `nice` yield the CPU, in their whole session."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.launch import free_port, live_descendants, spawn

# Like the MLflow server: its workers are forked after it has started.
FORKS_LATER = (
    "import subprocess, sys, time\n"
    "time.sleep(0.5)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "time.sleep(60)\n"
)


def _autogroup_nice(pid: int) -> int | None:
    """The nice of `pid`'s autogroup ('/autogroup-12 nice 10'), None without autogroup."""
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()
    except OSError:
        return None
    return int(text.split()[-1])


def test_a_niced_component_and_what_it_forks_later_run_at_that_priority(tmp_path):
    own_group_before = _autogroup_nice(os.getpid())
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
        assert _autogroup_nice(handle.pid) == 7
        assert _autogroup_nice(children[0]) == 7
        assert _autogroup_nice(os.getpid()) == own_group_before
    finally:
        for pid in [handle.pid, *live_descendants(handle.pid)]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        handle.proc.wait(timeout=10)
