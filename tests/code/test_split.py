"""Sequences and the leave-one-out split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.config import IngestConfig, SplitConfig, WeightsConfig
from pipelines.errors import DataError
from pipelines.events import coerce_events, coerce_items
from pipelines.readers import read_source
from pipelines.split import attention_weights, build_sequences, k_core, leave_one_out


def _events(rows: list[tuple]) -> pd.DataFrame:
    """rows of (user, item, ts seconds, event[, value[, dwell]])."""
    recs = []
    for r in rows:
        rec = {"user_id": r[0], "item_id": r[1], "ts": r[2], "event": r[3]}
        rec["value"] = r[4] if len(r) > 4 else None
        rec["dwell_s"] = r[5] if len(r) > 5 else None
        recs.append(rec)
    return coerce_events(pd.DataFrame(recs), ts_unit="s")


def _items(ids) -> pd.DataFrame:
    return coerce_items(pd.DataFrame({"item_id": list(ids), "title": list(ids)}))


LOOSE = SplitConfig(min_user_events=1, min_item_events=1, min_seq_len=3, repeat_policy="keep_all")


def test_leave_one_out_matches_sasrec_partition_on_games(mirror, monkeypatch):
    """Exactly SASRec's data_partition: train = seq[:-2], valid = seq[-2], test = seq[-1]."""
    monkeypatch.setenv("ATTNFLOW_DATA_MIRROR", str(mirror))
    events, items = read_source(IngestConfig(dataset="games")).to_canonical()
    seq, users, item_map = build_sequences(events, items, LOOSE)
    splits = leave_one_out(seq)
    # SASRec reads the file in order and appends per user.
    raw = pd.read_csv(mirror / "games/games.txt", sep=" ", header=None, names=["u", "i"])
    expected = raw.groupby("u")["i"].apply(list)
    # SASRec keeps users with fewer than 3 events in training only and never evaluates
    # them; the split drops them (112 of 31,013 users), so the evaluated users match.
    expected = expected[expected.map(len) >= 3]
    assert len(users) == len(expected) == 30_901
    uid = dict(zip(users["user_idx"], users["user_id"], strict=True))
    iid = dict(zip(item_map["item_idx"], item_map["item_id"], strict=True))
    for name, pick in (
        ("test", lambda s: [s[-1]]),
        ("valid", lambda s: [s[-2]]),
        ("train", lambda s: s[:-2]),
    ):
        got = splits[name].groupby("user_idx")["item_idx"].apply(list)
        for u in [0, 1, 17, 4242, len(users) - 1]:
            assert [int(iid[i]) for i in got[u]] == pick(expected[int(uid[u])]), (name, u)
    assert len(splits["train"]) == expected.map(len).sum() - 2 * len(expected)


def test_exact_duplicates_dropped_and_time_ordered_with_stable_ties():
    ev = _events(
        [
            ("a", "x", 3, "view"),
            ("a", "y", 1, "view"),
            ("a", "y", 1, "view"),
            ("a", "z", 3, "click"),
            ("a", "w", 5, "view"),
        ]
    )
    seq, _, items = build_sequences(ev, _items("wxyz"), LOOSE)
    names = dict(zip(items["item_idx"], items["item_id"], strict=True))
    assert [names[i] for i in seq["item_idx"]] == ["y", "x", "z", "w"]  # tie x,z: file order
    assert seq["pos"].tolist() == [0, 1, 2, 3]


def test_k_core_is_iterated_to_a_fixed_point():
    # u3 has 2 events and drops (min 2 users per item after it goes makes item q drop,
    # which makes u2 drop below min 2 events).
    ev = _events(
        [
            ("u1", "p", 1, "view"),
            ("u1", "r", 2, "view"),
            ("u2", "p", 1, "view"),
            ("u2", "q", 2, "view"),
            ("u3", "q", 1, "view"),
            ("u4", "p", 1, "view"),
            ("u4", "r", 2, "view"),
        ]
    )
    core = k_core(ev, min_user=2, min_item=2)
    assert set(core["user_id"]) == {"u1", "u4"}
    assert set(core["item_id"]) == {"p", "r"}


def test_short_users_are_dropped_and_empty_result_is_a_clear_error():
    ev = _events([("a", "x", 1, "view"), ("a", "y", 2, "view")])
    with pytest.raises(DataError, match="no user is left"):
        build_sequences(ev, _items("xy"), LOOSE)


def test_id_maps_are_stable_under_row_order():
    rng = np.random.default_rng(0)
    rows = [
        (f"u{u}", f"i{rng.integers(0, 20)}", int(rng.integers(0, 10**6)), "view")
        for u in range(30)
        for _ in range(6)
    ]
    ev = _events(rows)
    a = build_sequences(ev, _items([f"i{k}" for k in range(25)]), LOOSE)
    b = build_sequences(
        ev.sample(frac=1, random_state=1), _items([f"i{k}" for k in range(25)]), LOOSE
    )
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x.reset_index(drop=True), y.reset_index(drop=True))
    items = a[2]
    assert items["item_idx"].min() == 1  # 0 is padding
    cold = items[items["n_events"] == 0]
    assert set(cold["item_id"]) == {f"i{k}" for k in range(20, 25)}
    assert cold["item_idx"].min() > items.loc[items["n_events"] > 0, "item_idx"].max()


def test_repeat_policies():
    ev = _events(
        [
            ("a", "x", 1, "view"),
            ("a", "x", 2, "purchase"),
            ("a", "y", 3, "view"),
            ("a", "x", 4, "view"),
            ("a", "z", 5, "view"),
        ]
    )
    items = _items("xyz")
    keep_all, _, _ = build_sequences(ev, items, LOOSE)
    assert len(keep_all) == 5
    collapsed, _, _ = build_sequences(
        ev, items, LOOSE.model_copy(update={"repeat_policy": "collapse_consecutive"})
    )
    assert len(collapsed) == 4
    first, _, imap = build_sequences(
        ev, items, LOOSE.model_copy(update={"repeat_policy": "keep_first"})
    )
    assert len(first) == 3
    x = imap.loc[imap["item_id"] == "x", "item_idx"].item()
    # x keeps its first position and the strongest weight among its events (the purchase)
    assert first["item_idx"].iloc[0] == x and first["weight"].iloc[0] == pytest.approx(2.0)


def test_attention_weights_by_event_rating_and_dwell():
    cfg = WeightsConfig(
        event={"view": 0.5, "rate": 1.0},
        default=0.7,
        rating_max=5.0,
        dwell_ref_s=60,
        dwell_min_factor=0.5,
        dwell_max_factor=2.0,
    )
    ev = _events(
        [
            ("a", "x", 1, "view"),
            ("a", "x", 2, "rate", 4.0),
            ("a", "x", 3, "share"),
            ("a", "x", 4, "view", None, 60.0),
            ("a", "x", 5, "view", None, 1.0),
            ("a", "x", 6, "view", None, 10**6),
        ]
    )
    w = attention_weights(ev, cfg).tolist()
    assert w[0] == pytest.approx(0.5)  # no dwell: factor 1
    assert w[1] == pytest.approx(0.8)  # 1.0 x 4/5
    assert w[2] == pytest.approx(0.7)  # unknown type: default
    assert w[3] == pytest.approx(0.5)  # dwell = reference
    assert w[4] == pytest.approx(0.25)  # short dwell clipped at min factor 0.5
    assert w[5] == pytest.approx(1.0)  # long dwell clipped at max factor 2.0


def test_event_type_filter():
    ev = _events(
        [
            ("a", "x", 1, "rate", 4.0),
            ("a", "y", 2, "comment"),
            ("a", "z", 3, "rate", 3.0),
            ("a", "w", 4, "rate", 5.0),
        ]
    )
    seq, _, _ = build_sequences(
        ev, _items("wxyz"), LOOSE.model_copy(update={"event_types": ["rate"]})
    )
    assert seq["event"].eq("rate").all() and len(seq) == 3
