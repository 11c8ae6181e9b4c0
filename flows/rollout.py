"""The rollout flow: canary a challenger through the gateway, then promote or roll back.

Steps (params.yaml `rollout`): start a model service for the challenger version,
point the gateway at it, and move its traffic weight through `rollout.steps`; after
each step's bake time the step is judged on that step's own measurements: the
gateway's counts of live traffic and a side-by-side replay sent to both services
during the bake (see `pipelines.rollout`). A failed check sets the weight to 0, stops
the challenger, leaves the aliases as they were and tags the version with the reason.
Success moves `champion` to the challenger, removes `challenger`, and keeps the old
champion's service running as a standby for `attnflow rollback`. One rollout at a
time: a run for the version another run is rolling out already ends at once
("started elsewhere"), or with `follow` (the retrain flow's) waits for that rollout
and ends as it did; one for another version fails as busy, and the reconciler
starts it later. A version whose files differ from its manifest's SHA-256s (or that
cannot be started at all) is refused before the gateway sees it, tagged
`rollout.status=refused`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task

from pipelines.config import load_config
from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    fetch_model,
    get_alias,
    model_name,
    set_alias,
    state_dir,
    tag_version,
)
from pipelines.rollout import (
    GatewayClient,
    RolloutBusy,
    RolloutFailed,
    StepReport,
    check_agreement,
    check_ctr,
    check_traffic,
    replay,
    rollout_lock,
    step_dict,
    wait_for_rollout,
    write_report,
)
from services.stack import Stack


def _replay_requests(folder: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Requests for users the challenger knows (the agreement and sanity sample)."""
    import json

    import numpy as np

    users = json.loads((folder / "users.json").read_text())
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(users), size=min(n, len(users)), replace=False)
    return [{"user_id": users[int(i)], "k": 10} for i in picks]


class _Traffic:
    """Optional replayed traffic through the gateway while a step bakes (dev and demo)."""

    def __init__(self, gateway_url: str, requests: list[dict[str, Any]], rps: float):
        self.url, self.requests, self.rps = gateway_url.rstrip("/"), requests, rps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Traffic:
        if self.rps > 0 and self.requests:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        import httpx

        i = 0
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                body = self.requests[i % len(self.requests)]
                # the gateway counts what failed; this traffic is only a load source
                with contextlib.suppress(httpx.HTTPError):
                    http.post(f"{self.url}/recommend", json=body)
                i += 1
                self._stop.wait(1.0 / self.rps)


@task(name="start-challenger")
def start_challenger(stack_root: str, version: str) -> dict[str, Any]:
    """Fetch the version and start its model service (returns its URL and pid)."""
    stack = Stack(Path(stack_root))
    fetched = fetch_model(f"models:/{model_name()}/{version}", Path(stack_root))
    return stack.start_model(version, str(fetched.folder), role=CHALLENGER)


@task(name="canary-step", task_run_name="weight-{weight}")
def canary_step(
    gateway_url: str,
    champion_url: str,
    challenger_url: str,
    weight: int,
    requests: list[dict[str, Any]],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Set the weight, bake, and judge the challenger on this step's measurements."""
    from pipelines.config import RolloutConfig

    cfg = RolloutConfig.model_validate(params)
    gw = GatewayClient(gateway_url)
    step = StepReport(weight=weight, started=time.time())
    gw.reset_stats()
    gw.set_weight(weight)
    # The side-by-side replay (straight to both services, so the gateway's counts are
    # live traffic only) runs while the step bakes: the step lasts its bake time, not
    # the bake plus 2 x `replay_requests` sequential requests after it.
    with _Traffic(gateway_url, requests, cfg.replay_rps), ThreadPoolExecutor(1) as pool:
        sample = requests[: cfg.replay_requests]
        replayed = pool.submit(replay, champion_url, challenger_url, sample)
        deadline = time.monotonic() + cfg.bake_s
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        sanity, detail = replayed.result()
    state = gw.state()
    stats = state.get("stats", {})
    step.stats = stats
    step.checks.extend(check_traffic(stats, cfg))
    step.checks.extend(sanity)
    step.checks.append(check_agreement(detail["agreement"], cfg))
    ctr = check_ctr(stats, cfg)
    if ctr is not None:
        step.checks.append(ctr)
    step.stats["replay"] = detail
    step.seconds = round(time.time() - step.started, 2)
    get_run_logger().info(
        "weight %d%%: %s", weight, "passed" if step.passed else f"FAILED ({step.failure()})"
    )
    return step_dict(step)


@flow(name="rollout")
def rollout(
    version: str | None = None, root: str = ".", actor: str = "rollout flow", follow: bool = False
) -> dict:
    """Canary `version` (default: the `challenger` alias) and promote or roll it back.

    `follow`: if another run is rolling out this same version, wait for it and end as it
    did (its report, or its failure) instead of at once; if it ended without a report
    (it died), roll the version out here.
    """
    log = get_run_logger()
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    version = version or get_alias(CHALLENGER, root=root_path)
    if version is None:
        log.info("no challenger to roll out")
        return {"status": "nothing to do"}
    state = state_dir(root_path)
    stack = Stack(root_path)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(rollout_lock(state, version))
        except RolloutBusy as exc:
            if exc.version != str(version):
                raise  # another version's rollout: this one waits for the reconciler
            # The same version, already under way: the challenger alias that a retrain
            # set starts a run through its webhook, and whichever run takes the lock
            # first rolls the version out.
            log.info("v%s: %s", version, exc)
            if not follow:
                return {"status": "started elsewhere", "version": version, "detail": str(exc)}
            return _followed(state, version, root, actor)
        for name in stack.reap_abandoned():  # an earlier rollout's, which died meanwhile
            log.warning("stopped %s: the rollout bringing it up is gone", name)
        try:
            return _canary(stack, version, root_path, cfg, actor)
        finally:
            # the challenger took the warm spare (when there was one): the next one warms
            # now, after the canary, so that it never competes with the steps measured
            try:
                stack.ensure_spare()
            except Exception as exc:  # no spare: the next rollout starts its challenger cold
                log.warning("no warm spare started: %s", exc)


def _followed(state: Path, version: str, root: str, actor: str) -> dict:
    """The outcome of the other run's rollout of `version`, once it has ended."""
    report = wait_for_rollout(state, version)
    if report is None:
        get_run_logger().info("v%s: the other rollout ended without a report; rolling out", version)
        return rollout.fn(version=version, root=root, actor=actor, follow=True)
    get_run_logger().info("v%s: the other rollout ended: %s", version, report.get("status"))
    if report.get("status") != "promoted":
        status = report.get("status")
        reason = str(report.get("reason", status))
        raise RolloutFailed(f"rollout of v{version} {status}: {reason}", version, reason)
    return {**report, "ran_in": "another flow run"}


def _canary(stack: Stack, version: str, root_path: Path, cfg: Any, actor: str) -> dict:
    """The rollout proper, under the rollout lock."""
    log = get_run_logger()
    state = state_dir(root_path)
    gateway_url = stack.gateway_url()
    served = stack.served()
    champion = served.get(CHAMPION)
    if champion is None:
        raise RolloutFailed("no champion is being served; run `attnflow up` first", version)
    if champion["version"] == version:
        log.info("version %s is already the served champion", version)
        return {"status": "already champion", "version": version}
    report: dict[str, Any] = {
        "version": version,
        "champion": champion["version"],
        "started": time.time(),
        "steps": [],
        "actor": actor,
    }
    gw = GatewayClient(gateway_url)
    try:
        challenger = start_challenger(str(root_path), version)
    except Exception as exc:
        # corrupt or unloadable: refused before the gateway ever saw it
        reason = f"refused before any traffic: {exc}"
        _roll_back(gw, stack, champion, version, reason, root_path, status="refused")
        report.update(status="refused", reason=reason)
        report["report"] = str(write_report(state, report))
        raise RolloutFailed(f"rollout of v{version} {reason}", version, reason) from None
    try:
        gw.set_backends(champion["url"], challenger["url"])
        if not gw.wait_ready(CHALLENGER, timeout=120):
            raise RolloutFailed(f"challenger v{version} never became ready", version, "not ready")
        requests = _replay_requests(Path(challenger["folder"]), cfg.rollout.replay_requests)
        for weight in cfg.rollout.steps:
            step = canary_step(
                gateway_url,
                champion["url"],
                challenger["url"],
                weight,
                requests,
                cfg.rollout.model_dump(),
            )
            report["steps"].append(step)
            if not step["passed"]:
                failed = [c for c in step["checks"] if not c["passed"]]
                reason = f"weight {weight}%: " + "; ".join(
                    f"{c['name']}: {c['detail']}" for c in failed
                )
                raise RolloutFailed(f"rollout of v{version} rolled back: {reason}", version, reason)
    except RolloutFailed as exc:
        _roll_back(gw, stack, champion, version, exc.reason or str(exc), root_path)
        report.update(status="rolled back", reason=exc.reason or str(exc))
        report["report"] = str(write_report(state, report))
        raise
    except Exception as exc:
        _roll_back(gw, stack, champion, version, f"rollout error: {exc}", root_path)
        report.update(status="rolled back", reason=f"rollout error: {exc}")
        report["report"] = str(write_report(state, report))
        raise
    _promote(gw, stack, champion, challenger, version, actor, root_path)
    report.update(status="promoted", finished=time.time())
    path = write_report(state, report)
    log.info("v%s promoted to champion; report %s", version, path)
    report["report"] = str(path)
    return report


def _roll_back(
    gw: GatewayClient,
    stack: Stack,
    champion: dict,
    version: str,
    reason: str,
    root: Path,
    status: str = "rolled_back",
) -> None:
    """Weight 0, challenger stopped, aliases untouched, the reason (and `status`) on the version."""
    try:
        gw.abort()
        gw.set_backends(champion["url"], None)
    finally:
        stack.stop_role(CHALLENGER)
        if get_alias(CHAMPION, root=root) == version:
            # ops moved `champion` to this version (in the MLflow UI); it failed its
            # canary, so the alias goes back to what is actually served
            set_alias(
                CHAMPION,
                champion["version"],
                "rollout flow",
                f"canary of v{version} failed: {reason}"[:500],
                root=root,
            )
        tag_version(
            version,
            {
                "rollout.status": status,
                "rollout.reason": reason[:4000],
                "rollout.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            root=root,
        )


def _promote(
    gw: GatewayClient,
    stack: Stack,
    champion: dict,
    challenger: dict,
    version: str,
    actor: str,
    root: Path,
) -> None:
    """Move `champion` to the challenger; keep the old champion running as standby."""
    gw.set_backends(challenger["url"], None)
    gw.set_weight(0)
    stack.promote(version)
    if get_alias(CHAMPION, root=root) != version:
        set_alias(
            CHAMPION, version, actor, f"canary passed; v{champion['version']} on standby", root=root
        )
    if get_alias(CHALLENGER, root=root) == version:
        set_alias(CHALLENGER, None, actor, f"v{version} promoted", root=root)
    tag_version(
        version,
        {
            "rollout.status": "promoted",
            "rollout.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rollout.previous_champion": champion["version"],
        },
        root=root,
    )
