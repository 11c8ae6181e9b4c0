"""Readers: each source format to canonical events and items."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.config import EventLogConfig, IngestConfig
from pipelines.errors import DataError
from pipelines.events import EVENT_COLUMNS, TS_DTYPE, read_events
from pipelines.readers import (
    read_event_log,
    read_sasrec,
    read_session_clicks,
    read_source,
    session_dwell,
)


def _canonical(events: pd.DataFrame) -> None:
    assert list(events.columns) == EVENT_COLUMNS
    assert str(events["ts"].dtype) == TS_DTYPE
    assert events["user_id"].dtype == "str" and events["item_id"].dtype == "str"


def test_movielens_from_mirror(mirror, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_DATA_MIRROR", str(mirror))
    events, items = read_source(IngestConfig(dataset="ml-latest-small")).to_canonical()
    _canonical(events)
    counts = events["event"].value_counts()
    assert counts["rate"] == 100_836 and counts["comment"] == 3_683  # the README's counts
    assert events["user_id"].nunique() == 610
    assert len(items) == 9_742
    assert events.loc[events["event"] == "rate", "value"].between(0.5, 5.0).all()
    assert events.loc[events["event"] == "comment", "text"].notna().all()
    toy = items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)" and "Animation" in toy["text"]
    assert "Tags:" in toy["text"]  # tags reach the item text
    assert events["ts"].min() == pd.Timestamp("1996-03-29 18:36:55", tz="UTC")


def test_games_from_mirror_keeps_file_order(mirror, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_DATA_MIRROR", str(mirror))
    events, _ = read_source(IngestConfig(dataset="games")).to_canonical()
    assert len(events) == 287_107
    assert events["user_id"].nunique() == 31_013 and events["item_id"].nunique() == 23_715
    first = events[events["user_id"] == "1"]
    assert list(first["item_id"][:3]) == ["6393", "13504", "14087"]
    assert first["ts"].is_monotonic_increasing


def test_sasrec_reader_rejects_non_pairs(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("1 2\n1 2 3\n")
    with pytest.raises(DataError, match="not a `user item` file"):
        read_sasrec(p)


def test_session_dwell_is_gap_to_next_click_capped_last_null():
    session = pd.Series([1, 1, 1, 2, 2])
    ts = pd.Series([0.0, 10.0, 5000.0, 100.0, 130.0])
    dwell = session_dwell(session, ts, cap_s=1800)
    assert dwell.tolist()[:2] == [10.0, 1800.0]
    assert pd.isna(dwell[2]) and dwell[3] == 30.0 and pd.isna(dwell[4])


def test_yoochoose_from_mirror(mirror, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_DATA_MIRROR", str(mirror))
    events, _ = read_source(IngestConfig(dataset="yoochoose-100k")).to_canonical()
    _canonical(events)
    assert len(events) == 70_278 + 13_568
    assert events["user_id"].str.startswith("s").all()
    assert (events["event"] == "click").all()
    last = events.groupby("user_id").tail(1)["dwell_s"]
    assert last.isna().all()  # the last click of every session has no dwell
    assert events["dwell_s"].max() <= 1800
    assert 30 < events["dwell_s"].median() < 120  # the README: median gap ~56 s


def test_session_clicks_reader_orders_within_session(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("SessionId\tItemId\tTime\n7\t2\t20.0\n7\t1\t10.0\n")
    events, items = read_session_clicks([p], 1800).to_canonical()
    assert events["item_id"].tolist() == ["1", "2"] and events["dwell_s"].iloc[0] == 10.0
    assert set(items["item_id"]) == {"1", "2"}


def test_event_log_through_a_column_mapping(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text(
        "who,what,when,action,secs\n"
        "a,x,2024-01-01T00:00:00Z,click,12.5\n"
        "a,y,2024-01-01T00:01:00Z,view,\n"
    )
    cfg = EventLogConfig(
        path=p,
        columns={
            "user_id": "who",
            "item_id": "what",
            "ts": "when",
            "event": "action",
            "dwell_s": "secs",
        },
        ts_unit="iso",
    )
    events, items = read_event_log(cfg).to_canonical()
    _canonical(events)
    assert events["event"].tolist() == ["click", "view"]
    assert events["dwell_s"].iloc[0] == 12.5 and pd.isna(events["dwell_s"].iloc[1])
    assert set(items["item_id"]) == {"x", "y"}


def test_event_log_default_event_and_epoch_millis(tmp_path):
    p = tmp_path / "log.parquet"
    pd.DataFrame(
        {"u": [1, 2], "i": [3, 4], "t": [1_700_000_000_000, 1_700_000_001_000]}
    ).to_parquet(p)
    cfg = EventLogConfig(
        path=p,
        columns={"user_id": "u", "item_id": "i", "ts": "t", "event": None},
        ts_unit="ms",
        default_event="purchase",
    )
    events, _ = read_event_log(cfg).to_canonical()
    assert events["event"].tolist() == ["purchase", "purchase"]
    assert events["user_id"].tolist() == ["1", "2"]
    assert events["ts"].iloc[0] == pd.Timestamp("2023-11-14 22:13:20", tz="UTC")


def test_event_log_missing_mapped_column_is_named(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("who,what\na,x\n")
    cfg = EventLogConfig(path=p, columns={"user_id": "who", "item_id": "what", "ts": "when"})
    with pytest.raises(DataError, match=r"column\(s\) when.* missing"):
        read_event_log(cfg)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"user_id,item_id,ts,event\n", "no events"),
        (b"user_id,item_id,ts,event\n\xff\xfe,1,2,click\n", "not UTF-8"),
        (b"user_id,item_id,event\na,b,click\n", "missing required column"),
        (b"user_id,item_id,ts,event\na,b,yesterday,click\n", "cannot read 'yesterday'"),
        (b"user_id,item_id,ts,event,dwell_s\na,b,1,click,long\n", "'long' is not a number"),
    ],
)
def test_bad_event_files(tmp_path, content, message):
    p = tmp_path / "e.csv"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_events(p)


def test_truncated_parquet(tmp_path):
    p = tmp_path / "e.parquet"
    pd.DataFrame(
        {"user_id": ["a"] * 100, "item_id": ["b"] * 100, "ts": [1] * 100, "event": ["view"] * 100}
    ).to_parquet(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_events(p)


def test_csv_ids_and_text_are_kept_as_written(tmp_path):
    # pandas' inference would read "007" as 7, "INF" as infinity and "TRUE" as a boolean.
    p = tmp_path / "e.csv"
    p.write_text(
        "user_id,item_id,ts,event,value,text\n"
        "007,TRUE,2024-01-01T00:00:00Z,rate,4.5,INF\n"
        "NA,12,2024-01-02T00:00:00Z,rate,NA,nan\n"
    )
    events = read_events(p)
    assert events["user_id"].tolist() == ["007", "NA"]
    assert events["item_id"].tolist() == ["TRUE", "12"]
    assert events["text"].tolist() == ["INF", "nan"]
    assert events["value"].iloc[0] == 4.5 and pd.isna(events["value"].iloc[1])
