"""The feedback log: canonical, durable, idempotent, all-or-nothing, readable by ingest."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.feedback import FeedbackLog, FeedbackLogUnavailable, iter_log, read_log
from pipelines.ingest import read_feedback

REPO = Path(__file__).resolve().parents[2]


def _ev(i: int, **over) -> dict:
    return {"user_id": f"u{i}", "item_id": f"i{i}", "event": "click", **over}


def test_append_writes_canonical_records_that_ingest_reads(tmp_path):
    path = tmp_path / "fb" / "events.jsonl"  # the folder is created on first write
    log = FeedbackLog(path)
    res = log.append(
        [
            _ev(1, dwell_s=4.5, variant="challenger", event_id="e1"),
            _ev(2, event="impression", ts="2024-05-01T12:00:00+02:00"),
            _ev(3, event="rate", value=4.0, ts="2024-05-01T12:00:00"),  # naive: UTC
        ]
    )
    assert (res.written, res.duplicates) == (3, 0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["user_id"] for r in lines] == ["u1", "u2", "u3"]
    assert lines[0]["variant"] == "challenger" and lines[0]["event_id"] == "e1"
    assert lines[1]["event_id"] and lines[1]["event_id"] != lines[2]["event_id"]
    assert lines[1]["ts"] == "2024-05-01T10:00:00.000000+00:00"
    assert lines[2]["ts"] == "2024-05-01T12:00:00.000000+00:00"

    events = read_feedback(path.parent)  # the ingest stage's reader: every log in the folder
    assert list(events["user_id"]) == ["u1", "u2", "u3"]
    assert list(events["event"]) == ["click", "impression", "rate"]
    assert events.loc[0, "dwell_s"] == 4.5 and events.loc[2, "value"] == 4.0
    assert events.loc[1, "ts"] == pd.Timestamp("2024-05-01T10:00:00Z")
    frame = read_log(path)
    assert list(frame["variant"].fillna("-")) == ["challenger", "-", "-"]


def test_retried_event_ids_are_written_once(tmp_path):
    path = tmp_path / "events.jsonl"
    log = FeedbackLog(path, recent_ids=2)
    assert log.append([_ev(1, event_id="a"), _ev(1, event_id="a")]).written == 1
    res = log.append([_ev(1, event_id="a"), _ev(2, event_id="b")])
    assert (res.written, res.duplicates) == (1, 1)
    log.append([_ev(3, event_id="c")])  # bounded memory: "a" is forgotten now
    assert log.append([_ev(1, event_id="a")]).written == 1
    assert [r["event_id"] for r in iter_log(path)] == ["a", "b", "c", "a"]


def test_an_event_another_process_wrote_is_a_duplicate_here(tmp_path):
    """Champion and challenger append to one file: a failover retry must not double it."""
    path = tmp_path / "events.jsonl"
    challenger, champion = FeedbackLog(path), FeedbackLog(path)
    assert challenger.append([_ev(1, event_id="x")]).written == 1
    res = champion.append([_ev(1, event_id="x"), _ev(2, event_id="y")])
    assert (res.written, res.duplicates) == (1, 1)
    assert challenger.append([_ev(2, event_id="y")]).duplicates == 1
    assert [r["event_id"] for r in iter_log(path)] == ["x", "y"]


@pytest.mark.parametrize(
    "bad",
    [
        {"user_id": "u", "item_id": "i", "event": "stare"},
        {"user_id": "u", "item_id": "i", "event": "view", "dwell_s": -1},
        {"user_id": "", "item_id": "i", "event": "view"},
        {"user_id": "u", "item_id": "i", "event": "view", "colour": "red"},
        {"user_id": "u", "item_id": "i", "event": "view", "ts": "yesterday"},
    ],
)
def test_invalid_events_are_refused_and_nothing_is_written(tmp_path, bad):
    path = tmp_path / "events.jsonl"
    with pytest.raises(ValidationError):
        FeedbackLog(path).append([_ev(1), bad])
    assert not path.exists()


def test_a_full_disk_is_a_clear_error(tmp_path):
    with pytest.raises(FeedbackLogUnavailable, match="disk is full"):
        FeedbackLog("/dev/full").append([_ev(1)])


def test_an_unwritable_path_is_a_clear_error():
    with pytest.raises(FeedbackLogUnavailable, match="cannot be written"):
        FeedbackLog("/proc/attnflow/feedback/events.jsonl").append([_ev(1)])


def test_a_write_cut_short_leaves_no_torn_line_and_earlier_events_intact(tmp_path):
    """Under a file-size limit, batches stop fitting mid-write: each failed batch is rolled back."""
    path = tmp_path / "events.jsonl"
    code = textwrap.dedent(
        f"""
        import json, resource
        from pipelines.feedback import FeedbackLog, FeedbackLogUnavailable
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
        log, acked, failures = FeedbackLog({str(path)!r}), [], 0
        for b in range(40):
            batch = [dict(user_id=f"u{{b}}", item_id=f"i{{j}}", event="view",
                          event_id=f"{{b}}-{{j}}") for j in range(3)]
            try:
                log.append(batch)
                acked += [e["event_id"] for e in batch]
            except FeedbackLogUnavailable as exc:
                failures += 1
                err = str(exc)
        print(json.dumps(dict(acked=acked, failures=failures, err=err)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["failures"] > 0 and result["acked"], result
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and len(raw) <= 3000
    written = [json.loads(line)["event_id"] for line in raw.decode().splitlines()]
    assert written == result["acked"]  # every acknowledged event, and nothing else
