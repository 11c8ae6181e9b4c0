"""Waiting for the rollout another run holds the lock for (`pipelines.rollout.wait_for_rollout`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pipelines.rollout import rollout_holder, rollout_lock, wait_for_rollout, write_report


def hold_rollout_lock(
    state: Path, version: str, seconds: float, report: dict | None
) -> threading.Thread:
    """Another 'run': holds the lock for `version`, then writes `report` (if any) and ends."""
    held = threading.Event()

    def run() -> None:
        with rollout_lock(state, version):
            held.set()
            time.sleep(seconds)
            if report is not None:
                write_report(state, report)

    thread = threading.Thread(target=run)
    thread.start()
    held.wait(5)
    return thread


def test_the_wait_ends_with_the_report_the_holder_wrote(tmp_path: Path) -> None:
    thread = hold_rollout_lock(tmp_path, "7", 0.6, {"version": "7", "status": "promoted"})
    assert rollout_holder(tmp_path) is not None
    t0 = time.perf_counter()
    report = wait_for_rollout(tmp_path, "7", poll_s=0.05)
    assert time.perf_counter() - t0 >= 0.4  # it waited for the holder to end
    assert report == {"version": "7", "status": "promoted"}
    thread.join()


def test_a_holder_that_ends_without_a_report_gives_none(tmp_path: Path) -> None:
    # a report of the same version from before the wait is an earlier rollout, not this one
    write_report(tmp_path, {"version": "7", "status": "rolled back", "reason": "old"})
    thread = hold_rollout_lock(tmp_path, "7", 0.3, None)
    assert wait_for_rollout(tmp_path, "7", poll_s=0.05) is None
    thread.join()
    # a report written during the wait, but for another version, is not this one's either
    thread = hold_rollout_lock(tmp_path, "8", 0.3, {"version": "8", "status": "promoted"})
    assert wait_for_rollout(tmp_path, "7", poll_s=0.05) is None
    thread.join()


def test_no_rollout_running_means_no_wait(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    assert wait_for_rollout(tmp_path, "7", poll_s=5) is None
    assert time.perf_counter() - t0 < 1
