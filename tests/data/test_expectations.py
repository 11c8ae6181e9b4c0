"""Great Expectations suites: good data passes, each kind of bad data is named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from pipelines.config import SyntheticConfig, ValidateConfig
from pipelines.errors import ValidationFailed
from pipelines.expectations import (
    data_docs_index,
    profile_events,
    run_suites,
    splits_expectations,
    validate_events,
)
from pipelines.split import split_presence
from pipelines.synthetic import generate

CFG = ValidateConfig()


@pytest.fixture(scope="module")
def good() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate(SyntheticConfig(n_users=300, n_items=200, seed=7))


def _fails(tmp_path, events, match: str, reference=None, cfg=CFG):
    with pytest.raises(ValidationFailed, match=match) as err:
        validate_events(tmp_path, events, None, cfg, reference)
    assert "Data Docs:" in str(err.value)
    return err.value


def test_good_data_passes_and_builds_data_docs(tmp_path, good):
    events, items = good
    results = validate_events(tmp_path, events, items, CFG, None)
    assert all(r.success for r in results)
    assert sum(r.evaluated for r in results) >= 20
    index = data_docs_index(tmp_path)
    assert index.exists() and "events" in index.read_text()


def test_negative_dwell_is_named_with_its_value(tmp_path, good):
    events = good[0].copy()
    events.loc[3, "dwell_s"] = -5.0
    err = _fails(tmp_path, events, r"expect_column_values_to_be_between\(dwell_s\): 1 unexpected")
    assert "-5.0" in str(err)


def test_dwell_above_the_cap(tmp_path, good):
    events = good[0].copy()
    events.loc[0, "dwell_s"] = 10 * CFG.dwell_max_s
    _fails(tmp_path, events, r"\(dwell_s\): 1 unexpected")


def test_future_timestamps(tmp_path, good):
    events = good[0].copy()
    events.loc[5, "ts"] = pd.Timestamp(datetime.now(UTC) + timedelta(days=2))
    _fails(tmp_path, events, r"expect_column_values_to_be_between\(ts\): 1 unexpected")


def test_timestamps_before_the_range(tmp_path, good):
    events = good[0].copy()
    events.loc[5, "ts"] = pd.Timestamp("1970-01-02", tz="UTC")
    _fails(tmp_path, events, r"\(ts\): 1 unexpected")


def test_event_type_outside_the_allowed_set(tmp_path, good):
    events = good[0].copy()
    events.loc[1, "event"] = "teleport"
    _fails(tmp_path, events, r"expect_column_values_to_be_in_set\(event\).*teleport")


def test_rating_range_applies_to_rate_events(tmp_path, good):
    events = good[0].copy()
    events.loc[1, ["event", "value"]] = ["rate", 9.0]
    events.loc[2, ["event", "value"]] = ["click", 9.0]  # value of a non-rate event: not a rating
    _fails(tmp_path, events, r"\(value\): 1 unexpected")


def test_null_ids(tmp_path, good):
    events = good[0].copy()
    events.loc[1, "user_id"] = None
    _fails(tmp_path, events, r"expect_column_values_to_not_be_null\(user_id\)")


def test_wrong_types(tmp_path, good):
    events = good[0].copy()
    events["dwell_s"] = events["dwell_s"].astype("str")
    _fails(tmp_path, events, r"expect_column_type_to_be\(dwell_s\): observed 'str'")


def test_duplicate_rate_over_threshold(tmp_path, good):
    events = good[0]
    dup = pd.concat([events, events.head(len(events) // 20)], ignore_index=True)
    _fails(tmp_path, dup, r"expect_compound_columns_to_be_unique")


def test_row_count_against_last_accepted_version(tmp_path, good):
    events = good[0]
    reference = profile_events(events, CFG.drift.top_items)
    smaller = events.sample(frac=0.3, random_state=0)
    _fails(tmp_path, smaller, r"expect_table_row_count_to_be_between\(table\): observed",
           reference=reference)


def test_popularity_drift_is_caught_and_unchanged_data_is_not(tmp_path, good):
    events = good[0]
    reference = profile_events(events, CFG.drift.top_items)
    validate_events(tmp_path, events, None, CFG, reference)  # same data: no drift
    # Shift attention onto items that were rare.
    rare = events["item_id"].value_counts().index[-20:]
    rng = np.random.default_rng(0)
    shifted = events.copy()
    shifted["item_id"] = rng.choice(np.asarray(rare), len(shifted))
    _fails(tmp_path, shifted, r"drift_popularity.*kl_divergence.*item_bucket", reference=reference)


def test_events_per_user_drift(tmp_path, good):
    events = good[0]
    reference = profile_events(events, CFG.drift.top_items)
    # Same number of events, concentrated on a tenth of the users.
    users = events["user_id"].unique()[:30]
    heavy = events.assign(user_id=np.resize(users, len(events)))
    heavy["ts"] = heavy["ts"] + pd.to_timedelta(np.arange(len(heavy)), unit="us")
    _fails(tmp_path, heavy, r"drift_user_activity.*events_per_user", reference=reference)


def test_splits_suite_needs_every_user_in_all_three(tmp_path):
    ts = pd.Timestamp("2024-01-01", tz="UTC")
    row = {"ts": ts, "item_idx": 1}
    train = pd.DataFrame([{"user_idx": 0, **row}, {"user_idx": 1, **row}])
    valid = pd.DataFrame([{"user_idx": 0, **row}, {"user_idx": 1, **row}])
    test = pd.DataFrame([{"user_idx": 0, **row}])  # user 1 has no test event
    presence = split_presence({"train": train, "valid": valid, "test": test})
    (result,) = run_suites(tmp_path, [("splits", presence, splits_expectations())])
    assert not result.success
    assert any("n_test" in f for f in result.failures)
