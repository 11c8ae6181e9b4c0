"""The live checks of a canary step, on gateway statistics written by hand."""

from __future__ import annotations

import math

import pytest

from pipelines.config import RolloutConfig
from pipelines.rollout import answer_problems, check_agreement, check_ctr, check_traffic

CFG = RolloutConfig(
    min_requests=20,
    max_error_rate=0.01,
    max_p99_ratio=1.5,
    p99_slack_ms=10,
    min_feedback=100,
    min_ctr_ratio=0.8,
    min_agreement=0.2,
)


def _by_name(checks):
    return {c.name: c.passed for c in checks}


def test_traffic_checks_error_rate_p99_and_enough_requests():
    ok = {"challenger": {"requests": 200, "errors": 2, "p99_ms": 39.0}, "champion": {"p99_ms": 20}}
    assert _by_name(check_traffic(ok, CFG)) == {
        "traffic": True,
        "error_rate": True,  # 1.00 % is the limit, not over it
        "p99_latency": True,  # 20 * 1.5 + 10 = 40 ms
    }
    bad = {"challenger": {"requests": 10, "errors": 1, "p99_ms": 41.0}, "champion": {"p99_ms": 20}}
    assert _by_name(check_traffic(bad, CFG)) == {
        "traffic": False,
        "error_rate": False,
        "p99_latency": False,
    }


def test_click_through_is_judged_only_with_enough_feedback():
    few = {"challenger": {"impressions": 99, "clicks": 0}, "champion": {"impressions": 500}}
    assert check_ctr(few, CFG) is None
    worse = {
        "challenger": {"impressions": 100, "clicks": 7},
        "champion": {"impressions": 1000, "clicks": 100},
    }
    check = check_ctr(worse, CFG)
    assert check is not None and not check.passed  # 0.07 < 0.8 * 0.10
    close = {
        "challenger": {"impressions": 100, "clicks": 9},
        "champion": {"impressions": 1000, "clicks": 100},
    }
    assert check_ctr(close, CFG).passed  # 0.09 >= 0.8 * 0.10
    off = CFG.model_copy(update={"min_feedback": 0})
    assert check_ctr(worse, off) is None  # 0 switches the check off


@pytest.mark.parametrize(
    "answer, problem",
    [
        ({"items": ["a", "b", "c"], "scores": [3.0, 2.0, 1.0]}, None),
        ({"items": ["a", "b"], "scores": [2.0, 1.0]}, "expected 3"),
        ({"items": ["a", "a", "c"], "scores": [3.0, 2.0, 1.0]}, "distinct"),
        ({"items": ["a", "b", "c"], "scores": [3.0, math.nan, 1.0]}, "non-finite"),
        ({"items": ["a", "b", "c"], "scores": [1.0, 2.0, 3.0]}, "descending"),
        ({"items": ["a", "b", "c"], "scores": [3.0]}, "differ in length"),
        ({"error": "boom"}, "no items"),
    ],
)
def test_output_sanity(answer, problem):
    found = answer_problems(answer, 3)
    if problem is None:
        assert found == []
    else:
        assert found and problem in " ".join(found)


def test_agreement_threshold():
    assert check_agreement(0.2, CFG).passed and not check_agreement(0.19, CFG).passed
