"""Canary rollout logic: the lock, the gateway's admin API, and the live checks.

The rollout flow (`flows/rollout.py`) moves the challenger's traffic weight through
`rollout.steps`; after each step's bake time it judges the challenger on what the
gateway measured in that step alone (stats are reset at each step):

- error rate of requests routed to the challenger;
- tail latency against the champion's (ratio plus an absolute slack): p99, or p90 or
  p50 when a step has too few requests for p99 to be more than its slowest one;
- output sanity and agreement with the champion on replayed requests (the same
  requests sent to both services directly: k distinct items with finite, ordered
  scores, and mean overlap@k with the champion's answer);
- click-through from feedback, once each variant has `rollout.min_feedback` impressions.

Any failed check stops the rollout: weight 0, aliases untouched, the reason tagged
on the version. Only one rollout runs at a time (an exclusive file lock).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipelines.config import RolloutConfig
from pipelines.errors import AttnflowError

ADMIN_TOKEN_ENV = "ATTNFLOW_ADMIN_TOKEN"


class RolloutBusy(AttnflowError):
    """Another rollout holds the lock; `version`: the one it rolls out (None: unknown)."""

    exit_code = 5

    def __init__(self, message: str, version: str | None = None):
        super().__init__(message)
        self.version = version


class RolloutFailed(AttnflowError):
    """A live check failed; the challenger was rolled back."""

    exit_code = 6

    def __init__(self, message: str, version: str | None = None, reason: str = ""):
        super().__init__(message)
        self.version = version
        self.reason = reason


@contextmanager
def rollout_lock(state: Path, version: str | None) -> Iterator[None]:
    """Hold the single rollout lock, or raise `RolloutBusy` naming the holder."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "rollout.lock"
    fh = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        held = re.search(r"\bversion (\S+),", holder)
        raise RolloutBusy(
            f"a rollout is already running ({holder}); try again when it ends",
            held.group(1) if held else None,
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, version {version}, since {time.strftime('%H:%M:%S')}")
        fh.flush()
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def rollout_holder(state: Path) -> str | None:
    """Who holds the rollout lock right now ("pid ..., version ..."), or None if free.

    A probe only: the answer may change at once, so `rollout_lock` stays the guard.
    """
    try:
        with rollout_lock(state, "probe"):
            return None
    except RolloutBusy as exc:
        return str(exc)


def wait_for_rollout(state: Path, version: str, poll_s: float = 0.5) -> dict[str, Any] | None:
    """Wait until the rollout running now ends; the report it wrote for `version`, if any.

    The lock is released when its holder ends, whichever way (the kernel drops a dead
    process's lock), so this wait ends too. None: no report for `version` was written
    during the wait (the holder died mid-way, or it was rolling out another version).
    """
    folder = state / "rollouts"
    before = set(folder.glob("*.json"))  # nothing when the folder is not there yet
    while rollout_holder(state) is not None:
        time.sleep(poll_s)
    for path in sorted(set(folder.glob("*.json")) - before, reverse=True):
        report = json.loads(path.read_text())
        if str(report.get("version")) == str(version):
            return report
    return None


class GatewayClient:
    """The canary gateway's admin API (bearer token from `ATTNFLOW_ADMIN_TOKEN`)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0):
        self.url = url.rstrip("/")
        token = token or os.environ.get(ADMIN_TOKEN_ENV, "")
        self.http = httpx.Client(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    def _call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        resp = self.http.request(method, path, json=body)
        if resp.status_code >= 400:
            raise AttnflowError(
                f"gateway {method} {path}: HTTP {resp.status_code} {resp.text[:200]}"
            )
        return resp.json() if resp.content else {}

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/admin/state")

    def set_backends(self, champion: str, challenger: str | None) -> dict[str, Any]:
        return self._call(
            "POST", "/admin/backends", {"champion": champion, "challenger": challenger}
        )

    def set_weight(self, weight: int) -> dict[str, Any]:
        return self._call("POST", "/admin/weight", {"weight": int(weight)})

    def abort(self) -> dict[str, Any]:
        return self._call("POST", "/admin/abort")

    def reset_stats(self) -> dict[str, Any]:
        return self._call("POST", "/admin/reset-stats")

    def wait_ready(self, variant: str, timeout: float = 60.0) -> bool:
        """Wait until the gateway's probes see `variant` ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            backend = (self.state().get("backends") or {}).get(variant) or {}
            if backend.get("ready"):
                return True
            time.sleep(0.25)
        return False


@dataclass
class Check:
    """One live check of one step."""

    name: str
    passed: bool
    detail: str


@dataclass
class StepReport:
    """What one canary step measured and decided."""

    weight: int
    checks: list[Check] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failure(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)


def check_traffic(stats: dict[str, Any], cfg: RolloutConfig) -> list[Check]:
    """Error rate and tail latency of the challenger against the champion, from gateway stats."""
    ch = stats.get("challenger") or {}
    cp = stats.get("champion") or {}
    n, errors = int(ch.get("requests", 0)), int(ch.get("errors", 0))
    checks = [
        Check(
            "traffic", n >= cfg.min_requests, f"{n} challenger requests (need {cfg.min_requests})"
        )
    ]
    rate = errors / n if n else 0.0
    checks.append(
        Check(
            "error_rate",
            rate <= cfg.max_error_rate,
            f"{errors}/{n} = {rate:.2%} (max {cfg.max_error_rate:.2%})",
        )
    )
    name = f"p{tail_percentile(min(n, int(cp.get('requests', n))), cfg.tail_requests)}"
    tail_ch, tail_cp = ch.get(f"{name}_ms"), cp.get(f"{name}_ms")
    if tail_ch is not None and tail_cp is not None and n:
        limit = tail_cp * cfg.max_p99_ratio + cfg.p99_slack_ms
        checks.append(
            Check(
                "tail_latency",
                tail_ch <= limit,
                f"{name}: challenger {tail_ch:.1f} ms vs limit {limit:.1f} ms "
                f"(champion {tail_cp:.1f} ms)",
            )
        )
    return checks


def tail_percentile(n: int, tail_requests: int) -> int:
    """The highest of p99, p90 and p50 with at least `tail_requests` of `n` above it.

    p99 of fewer than 100 requests is the slowest request: one garbage collection or
    scheduler hiccup on a shared machine would roll back a good model. A 50 % step of
    a 5 s bake at 20 requests/s judges p90; a step with 300 requests a side, p99.
    """
    for pct in (99, 90):
        if n * (100 - pct) >= tail_requests * 100:  # in integers: 300 * 0.01 < 3 in floats
            return pct
    return 50


def check_ctr(stats: dict[str, Any], cfg: RolloutConfig) -> Check | None:
    """Click-through of the challenger vs the champion, once both have enough impressions."""
    ch, cp = stats.get("challenger") or {}, stats.get("champion") or {}
    imp_ch, imp_cp = int(ch.get("impressions", 0)), int(cp.get("impressions", 0))
    if imp_ch < cfg.min_feedback or imp_cp < cfg.min_feedback or cfg.min_feedback == 0:
        return None
    ctr_ch = int(ch.get("clicks", 0)) / imp_ch
    ctr_cp = int(cp.get("clicks", 0)) / imp_cp
    ok = ctr_ch >= ctr_cp * cfg.min_ctr_ratio
    return Check(
        "ctr",
        ok,
        f"challenger {ctr_ch:.3f} vs champion {ctr_cp:.3f} (min ratio {cfg.min_ctr_ratio})",
    )


def answer_problems(answer: dict[str, Any], k: int) -> list[str]:
    """What is wrong with one /recommend answer (empty when it is sane)."""
    items, scores = answer.get("items"), answer.get("scores")
    if not isinstance(items, list) or not isinstance(scores, list):
        return ["no items/scores in the answer"]
    problems = []
    if len(items) != k or len(set(items)) != len(items):
        problems.append(f"{len(items)} items ({len(set(items))} distinct), expected {k}")
    if len(scores) != len(items):
        problems.append("scores and items differ in length")
    elif not all(isinstance(s, int | float) and math.isfinite(s) for s in scores):
        problems.append("non-finite scores")
    elif any(b > a + 1e-6 for a, b in itertools.pairwise(scores)):
        problems.append("scores not in descending order")
    return problems


def replay(
    champion_url: str, challenger_url: str, requests: list[dict[str, Any]], timeout: float = 5.0
) -> tuple[list[Check], dict[str, Any]]:
    """Send the same requests to both services; check the challenger's answers and agreement."""
    overlaps, problems, failures = [], [], 0
    with httpx.Client(timeout=timeout) as http:
        for body in requests:
            k = int(body.get("k", 10))
            try:
                a = http.post(f"{champion_url.rstrip('/')}/recommend", json=body)
                b = http.post(f"{challenger_url.rstrip('/')}/recommend", json=body)
            except httpx.HTTPError as exc:
                failures += 1
                problems.append(f"request failed: {type(exc).__name__}")
                continue
            if b.status_code != 200:
                failures += 1
                problems.append(f"challenger HTTP {b.status_code}")
                continue
            found = answer_problems(b.json(), k)
            problems.extend(found)
            if a.status_code == 200 and not found:
                overlaps.append(len(set(a.json()["items"]) & set(b.json()["items"])) / k)
    agreement = sum(overlaps) / len(overlaps) if overlaps else 0.0
    detail = {
        "replayed": len(requests),
        "failures": failures,
        "agreement": round(agreement, 4),
        "problems": problems[:5],
    }
    return [
        Check(
            "output_sanity",
            not problems,
            f"{len(problems)} problems in {len(requests)} answers"
            + (f", e.g. {problems[0]}" if problems else ""),
        ),
    ], detail


def check_agreement(agreement: float, cfg: RolloutConfig) -> Check:
    """Mean overlap@k with the champion on replayed requests."""
    return Check(
        "agreement",
        agreement >= cfg.min_agreement,
        f"mean overlap@k {agreement:.3f} (min {cfg.min_agreement})",
    )


def write_report(state: Path, report: dict[str, Any]) -> Path:
    """Save a rollout report as JSON under `<state>/rollouts/` (newest sorts last)."""
    folder = state / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-v{report.get('version')}.json"
    path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return path


def latest_report(state: Path) -> dict[str, Any] | None:
    """The newest rollout report, if any."""
    reports = sorted((state / "rollouts").glob("*.json")) if (state / "rollouts").exists() else []
    return json.loads(reports[-1].read_text()) if reports else None


def step_dict(step: StepReport) -> dict[str, Any]:
    """A step report as JSON-friendly data."""
    out = asdict(step)
    out["passed"] = step.passed
    return out
