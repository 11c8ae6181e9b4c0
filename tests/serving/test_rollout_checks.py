"""The live checks of a canary step, on gateway statistics written by hand."""

from __future__ import annotations

import math

import pytest

from pipelines.config import RolloutConfig
from pipelines.rollout import (
    answer_problems,
    check_agreement,
    check_ctr,
    check_traffic,
    tail_percentile,
)

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


def _side(requests, errors=0, **ms):
    return {"requests": requests, "errors": errors, **{f"{k}_ms": v for k, v in ms.items()}}


def test_traffic_checks_error_rate_tail_latency_and_enough_requests():
    ok = {"challenger": _side(300, 3, p99=39.0), "champion": _side(300, p99=20)}
    assert _by_name(check_traffic(ok, CFG)) == {
        "traffic": True,
        "error_rate": True,  # 1.00 % is the limit, not over it
        "tail_latency": True,  # 20 * 1.5 + 10 = 40 ms
    }
    bad = {"challenger": _side(10, 1, p50=41.0), "champion": _side(300, p50=20)}
    assert _by_name(check_traffic(bad, CFG)) == {
        "traffic": False,
        "error_rate": False,
        "tail_latency": False,
    }


def test_tail_latency_is_judged_at_the_quantile_the_requests_support():
    # The benchmark's rolled-back canary: 44 and 33 requests, p99 is the one slowest
    # request (51 ms) while p90 and the median match the champion's.
    step = {
        "challenger": _side(44, p50=9.8, p90=14.0, p99=50.9),
        "champion": _side(33, p50=8.6, p90=13.0, p99=24.9),
    }
    (check,) = [c for c in check_traffic(step, CFG) if c.name == "tail_latency"]
    assert check.passed and check.detail.startswith("p90:")
    step["challenger"]["p90_ms"] = 30.0  # most of the tail slower: over 13 * 1.5 + 10
    (check,) = [c for c in check_traffic(step, CFG) if c.name == "tail_latency"]
    assert not check.passed
    # enough requests a side: p99 is judged, and one slow request in a hundred fails it
    many = {"challenger": _side(400, p90=14.0, p99=50.9), "champion": _side(300, p99=24.9)}
    (check,) = [c for c in check_traffic(many, CFG) if c.name == "tail_latency"]
    assert not check.passed and check.detail.startswith("p99:")


@pytest.mark.parametrize(
    ("n", "tail", "expected"),
    [(300, 3, 99), (299, 3, 90), (30, 3, 90), (29, 3, 50), (0, 3, 50), (100, 1, 99)],
)
def test_tail_percentile(n, tail, expected):
    assert tail_percentile(n, tail) == expected


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
