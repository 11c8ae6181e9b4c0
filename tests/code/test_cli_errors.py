"""Bad input through the real CLI: one line, non-zero exit, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_params

ATTNFLOW = str(Path(sys.executable).parent / "attnflow")


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ATTNFLOW, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str, code: int | None = None):
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert match in errors[0], errors[0]


def _leftovers(root: Path) -> list[Path]:
    """Temporary files or folders a failed stage might have left (atomic writes use .name.*)."""
    return [
        p
        for p in root.rglob(".*")
        if p.name.startswith((".events", ".ingested", ".split", ".validate", ".ingest"))
    ]


GOOD = "user_id,item_id,ts,event,dwell_s\na,x,2024-01-01T00:00:00Z,click,3.5\n"
FUTURE = (datetime.now(UTC) + timedelta(days=3)).isoformat()


@pytest.mark.parametrize(
    ("name", "content", "match", "code"),
    [
        (
            "missing_column.csv",
            b"user_id,item_id,event\na,x,click\n",
            "missing required column(s) ts",
            2,
        ),
        (
            "wrong_type.csv",
            b"user_id,item_id,ts,event\na,x,not-a-time,click\n",
            "cannot read 'not-a-time' as a timestamp",
            2,
        ),
        (
            "negative_dwell.csv",
            b"user_id,item_id,ts,event,dwell_s\na,x,2024-01-01T00:00:00Z,click,-4\n",
            "expect_column_values_to_be_between(dwell_s): 1 unexpected",
            3,
        ),
        (
            "future.csv",
            f"user_id,item_id,ts,event\na,x,{FUTURE},click\n".encode(),
            "expect_column_values_to_be_between(ts): 1 unexpected",
            3,
        ),
        ("empty.csv", b"", "the file is empty", 2),
        (
            "latin1.csv",
            "user_id,item_id,ts,event\nJosé,x,2024-01-01,click\n".encode("latin-1"),
            "not UTF-8",
            2,
        ),
    ],
)
def test_validate_events_rejects_bad_files(project, name, content, match, code):
    path = project / name
    path.write_bytes(content)
    proc = run_cli("validate", "--events", name, cwd=project)
    assert_one_line_error(proc, match, code)
    if code == 3:
        assert "Data Docs:" in proc.stderr


def test_validate_events_rejects_truncated_parquet(project):
    df = pd.DataFrame(
        {
            "user_id": ["a"] * 500,
            "item_id": ["b"] * 500,
            "ts": pd.Timestamp("2024-01-01", tz="UTC"),
            "event": ["view"] * 500,
        }
    )
    df.to_parquet(project / "e.parquet")
    data = (project / "e.parquet").read_bytes()
    (project / "e.parquet").write_bytes(data[: len(data) // 2])
    proc = run_cli("validate", "--events", "e.parquet", cwd=project)
    assert_one_line_error(proc, "not a readable parquet file", 2)


def test_validate_events_accepts_a_good_file(project):
    (project / "good.csv").write_text(GOOD)
    proc = run_cli("validate", "--events", "good.csv", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "valid: 1 events" in proc.stdout and "Data Docs:" in proc.stdout


def test_unknown_dataset_stops_ingest_and_writes_nothing(project):
    proc = run_cli("ingest", "--set", "ingest.dataset=movielens-huge", cwd=project)
    assert_one_line_error(proc, "unknown dataset 'movielens-huge'", 2)
    assert not (project / "data").exists() and not _leftovers(project)


def test_mirror_checksum_mismatch_stops_ingest(project, tmp_path):
    fake = tmp_path / "mirror"
    (fake / "games").mkdir(parents=True)
    (fake / "games" / "games.txt").write_text("1 1\n1 2\n1 3\n")
    (fake / "SHA256SUMS").write_text(f"{'0' * 64}  games/games.txt\n")
    proc = run_cli(
        "ingest",
        "--set",
        "ingest.dataset=games",
        cwd=project,
        env={"ATTNFLOW_DATA_MIRROR": str(fake)},
    )
    assert_one_line_error(proc, "does not match", 2)
    assert not (project / "data").exists() and not _leftovers(project)


def test_unknown_override_key_is_one_line(project):
    proc = run_cli("split", "--set", "split.min_seq_lenn=4", cwd=project)
    assert_one_line_error(proc, "unknown key 'split.min_seq_lenn'", 2)


def test_bad_event_log_stops_the_line_before_split(project):
    """A rejected data version: validate fails, split never runs, nothing is half-written."""
    (project / "log.csv").write_text(
        "user_id,item_id,ts,event,dwell_s\n"
        + "".join(
            f"u{u},i{i},2024-01-0{1 + i}T00:00:00Z,click,{-1 if (u, i) == (1, 1) else 5}\n"
            for u in range(5)
            for i in range(5)
        )
    )
    write_params(
        project,
        {
            "ingest": {
                "dataset": "eventlog",
                "eventlog": {
                    "path": "log.csv",
                    "ts_unit": "iso",
                    "columns": {
                        "user_id": "user_id",
                        "item_id": "item_id",
                        "ts": "ts",
                        "event": "event",
                        "dwell_s": "dwell_s",
                    },
                },
            },
            "split": {"min_user_events": 1, "min_item_events": 1},
        },
    )
    assert run_cli("ingest", cwd=project).returncode == 0
    proc = run_cli("validate", cwd=project)
    assert_one_line_error(proc, "(dwell_s): 1 unexpected", 3)
    assert not (project / "reports" / "validate.json").exists()
    assert not (project / "data" / "reference").exists()  # nothing accepted
    assert not (project / "data" / "split").exists()


def test_status_lists_each_component_and_exits_non_zero_when_one_is_down(project):
    """`attnflow status` reads the stack's record: processes without a port show no URL."""
    import json

    import psutil

    dead = max(psutil.pids()) + 100_000  # no process has this pid
    run_dir = project / ".attnflow" / "run"
    run_dir.mkdir(parents=True)
    components = {
        "mlflow": {"pid": os.getpid(), "url": "http://127.0.0.1:5000", "port": 5000},
        "worker-cpu": {"pid": os.getpid(), "url": "http://127.0.0.1:0", "port": 0},
    }
    (run_dir / "stack.json").write_text(json.dumps({"components": components, "models": {}}))
    proc = run_cli("status", cwd=project)
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if " pid " in ln}
    assert rows["mlflow"].split()[1] == "up" and rows["mlflow"].endswith("http://127.0.0.1:5000")
    assert rows["worker-cpu"].endswith("(no port)")

    components["gateway"] = {"pid": dead, "url": "http://127.0.0.1:8080", "port": 8080}
    (run_dir / "stack.json").write_text(json.dumps({"components": components, "models": {}}))
    proc = run_cli("status", cwd=project)
    assert proc.returncode == 1
    assert "gateway            DOWN" in proc.stdout
