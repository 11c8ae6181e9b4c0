"""Warm starts (services/warmstart.py): a real standby process forks each run; the front
hands over arguments, environment, folder and streams, relays signals and reports the
child's exit status; a front killed outright takes its run with it; without a standby
the front starts the module cold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.launch import REPO, session_nice
from services.warmstart import SOCKET_ENV, socket_path

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork and AF_UNIX: Linux only")
TARGET = "tests.integration._warm_target"


def _start_standby(
    sock: Path, preload: str, path: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python -m services.warmstart serve` preloading `preload`, with `path` on its path."""
    serve = ["serve", "--socket", str(sock), "--preload", preload]
    return subprocess.Popen(
        [sys.executable, "-m", "services.warmstart", *serve],
        cwd=REPO,
        env={
            **os.environ,
            **(env or {}),
            "PYTHONPATH": os.pathsep.join(str(p) for p in (REPO, path) if p),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def standby(tmp_path):
    """A standby that preloads one light module (the heavy default list is for the stack)."""
    sock = socket_path(tmp_path)
    proc = _start_standby(sock, "xml.dom.minidom")
    ready = proc.stdout.readline()
    assert "ready" in ready, ready
    yield proc, sock
    proc.terminate()
    proc.wait(10)
    assert not sock.exists()  # the standby removes its socket on the way out


def _front(
    sock: Path | None, cwd: Path, *args: str, env: dict[str, str] | None = None, **kw
) -> subprocess.Popen:
    env = {**os.environ, **(env or {}), "WARM_TEST_VALUE": "42", "PYTHONPATH": str(REPO)}
    env.pop(SOCKET_ENV, None)
    if sock is not None:
        env[SOCKET_ENV] = str(sock)
    return subprocess.Popen(
        [sys.executable, "-m", "services.warmstart", "run", TARGET, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_a_run_is_a_child_of_the_standby_with_the_fronts_world(standby, tmp_path):
    proc, sock = standby
    front = _front(sock, tmp_path, "a", "--b")
    out, err = front.communicate(timeout=30)
    assert front.returncode == 3, err  # the child's exit status
    seen = json.loads(out)
    assert seen["ppid"] == proc.pid  # forked by the standby, not started cold
    assert seen["preloaded"] is True  # with the standby's imports already done
    assert seen["cwd"] == str(tmp_path)
    assert seen["env"] == "42"
    assert seen["argv"] == ["a", "--b"]
    # the standby keeps serving: a second run works the same
    again = _front(sock, tmp_path)
    out, _ = again.communicate(timeout=30)
    assert again.returncode == 3 and json.loads(out)["ppid"] == proc.pid


def test_sigterm_to_the_front_reaches_the_run(standby, tmp_path):
    _, sock = standby
    marker = tmp_path / "got-signal"
    front = _front(sock, tmp_path, "sleep", str(marker))
    json.loads(front.stdout.readline())
    front.send_signal(signal.SIGTERM)
    front.wait(30)
    assert front.returncode == 143
    assert marker.read_text() == str(int(signal.SIGTERM))


def test_a_front_killed_outright_takes_its_run_with_it(standby, tmp_path):
    _, sock = standby
    front = _front(sock, tmp_path, "sleep", str(tmp_path / "unused"))
    child = json.loads(front.stdout.readline())["pid"]
    assert psutil.pid_exists(child)
    front.kill()
    front.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(child):
        time.sleep(0.1)
    assert not psutil.pid_exists(child)


def test_without_a_standby_the_front_starts_the_module_cold(tmp_path):
    for sock in (None, tmp_path / "nobody-listens.sock"):
        front = _front(sock, tmp_path, "x")
        out, err = front.communicate(timeout=60)
        assert front.returncode == 3, err
        seen = json.loads(out)
        assert seen["ppid"] == os.getpid()  # exec: the front itself became the run
        assert seen["preloaded"] is False and seen["argv"] == ["x"] and seen["env"] == "42"
        assert seen["session_leader"] is False  # from a session at nice 0: it stays there


def test_a_cold_run_leaves_a_low_priority_session_for_one_of_its_own(tmp_path):
    """The stack's worker runs in a session at the control plane's low priority
    (autogroup nice); a retrain that starts cold under it must not inherit that."""
    if session_nice(os.getpid()) is None:
        pytest.skip("this kernel has no autogroup scheduling")
    # a process in a session of its own lowers the session's priority, as `attnflow up`
    # does the worker's, and starts the front as the worker would: a member, not a leader
    worker = (
        "import pathlib, subprocess, sys\n"
        "pathlib.Path('/proc/self/autogroup').write_text('5')\n"
        "cmd = [sys.executable, '-m', 'services.warmstart', 'run', sys.argv[1], 'x']\n"
        "sys.exit(subprocess.run(cmd).returncode)\n"
    )
    env = {**os.environ, "WARM_TEST_VALUE": "42", "PYTHONPATH": str(REPO)}
    env.pop(SOCKET_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", worker, TARGET],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # our own session's priority stays as it is
    )
    assert proc.returncode == 3, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["session_leader"] is True and seen["session_nice"] == 0


def _slow_standby(tmp_path: Path, body: str) -> tuple[subprocess.Popen, Path]:
    """A standby whose imports take a while (a module on its path that runs `body`)."""
    (tmp_path / "slow_import.py").write_text(body)
    sock = socket_path(tmp_path)
    proc = _start_standby(sock, "slow_import,xml.dom.minidom", tmp_path)
    deadline = time.monotonic() + 30
    while not sock.exists():  # listening already, importing still
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc, sock


def test_a_run_started_while_the_standby_imports_waits_for_it(tmp_path):
    body = "import pathlib, time\ntime.sleep(3)\npathlib.Path(__file__).with_name('done').touch()\n"
    proc, sock = _slow_standby(tmp_path, body)
    try:
        assert not (tmp_path / "done").exists()  # the front starts while the standby imports
        front = _front(sock, tmp_path, "early")
        out, err = front.communicate(timeout=60)
        assert "ready" in proc.stdout.readline()  # the run was started before this
        assert front.returncode == 3, err
        seen = json.loads(out)
        assert seen["ppid"] == proc.pid and seen["preloaded"] is True  # forked, not cold
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_standby_that_dies_while_importing_leaves_its_waiting_runs_to_start_cold(tmp_path):
    proc, sock = _slow_standby(tmp_path, "import os, time\ntime.sleep(2)\nos._exit(1)\n")
    front = _front(sock, tmp_path, "orphan")
    out, err = front.communicate(timeout=60)
    assert proc.wait(10) == 1
    assert front.returncode == 3, err
    seen = json.loads(out)
    assert seen["ppid"] == os.getpid() and seen["preloaded"] is False  # exec'd by the front


def test_preload_calls_module_functions_and_reports_what_failed():
    """`module:function` entries warm a cache the runs inherit; a failure only starts cold."""
    from mlflow.utils import requirements_utils

    from services.warmstart import PRELOAD, preload

    calls = [e for e in PRELOAD if ":" in e]
    assert calls and preload(calls) == []  # the library still has what PRELOAD calls
    assert requirements_utils._MODULES_TO_PACKAGES  # MLflow's map, built once, here
    failed = preload(["json", "no_such_module_here", "json:no_such_function"])
    assert [f.split(" ")[0] for f in failed] == ["no_such_module_here", "json:no_such_function"]


def test_a_run_forked_with_prefect_preloaded_gets_its_own_settings_and_runs_once(tmp_path):
    """Prefect reads its settings and logging from the environment at import: a forked run
    rebuilds them from its own, and the module it runs executes once, as `python -m`."""
    sock = socket_path(tmp_path)
    proc = _start_standby(
        sock,
        f"prefect,prefect.flow_engine,{TARGET}",  # the target too: it must not run twice
        env={"PREFECT_API_URL": "http://standby.invalid/api", "PREFECT_LOGGING_LEVEL": "DEBUG"},
    )
    try:
        lines = iter(proc.stdout.readline, "")
        assert any("ready" in line for line in lines)  # after Prefect's DEBUG lines
        run_env = {"PREFECT_API_URL": "http://run.invalid/api", "PREFECT_LOGGING_LEVEL": "ERROR"}
        front = _front(sock, tmp_path, "prefect", env=run_env)
        out, err = front.communicate(timeout=60)
        assert front.returncode == 0, err
        seen = json.loads(out)
        assert seen["preloaded"] is True
        assert seen["api_url"] == "http://run.invalid/api"
        assert seen["level"] == "ERROR"
        assert "RuntimeWarning" not in err, err  # runpy's "found in sys.modules"
    finally:
        proc.terminate()
        proc.wait(10)
