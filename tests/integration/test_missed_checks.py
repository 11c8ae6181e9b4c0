"""Periodic checks missed while the stack was down are dropped, not run back to back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import yaml

from services.launch import REPO
from services.stack import PERIODIC_CHECKS, drop_missed_runs


def test_up_drops_the_checks_that_fell_due_while_down_and_keeps_the_rest():
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:  # Prefect's temporary test server
        runs = {}
        for name in ("reconcile", "drift-check", "retrain"):
            flow_id = client.create_flow_from_name(name)
            deployment = client.create_deployment(flow_id=flow_id, name=name)
            for when in ("past", "future"):
                at = now + timedelta(minutes=-45 if when == "past" else 10)
                run = client.create_flow_run_from_deployment(
                    deployment, state=Scheduled(scheduled_time=at)
                )
                runs[name, when] = run.id
        dropped = drop_missed_runs(client, PERIODIC_CHECKS, now - timedelta(seconds=30))
        left = {r.id for r in client.read_flow_runs()}
    assert dropped == 2
    assert runs["reconcile", "past"] not in left
    assert runs["drift-check", "past"] not in left
    # the next checks due stay, and nothing of another deployment is touched
    assert {runs["reconcile", "future"], runs["drift-check", "future"]} <= left
    assert {runs["retrain", "past"], runs["retrain", "future"]} <= left


def test_a_check_due_while_one_still_runs_is_cancelled_not_queued():
    """prefect.yaml's limit on the checks, applied by a Prefect server: a run that falls
    due while the previous one still runs (a busy machine) is cancelled, so no backlog
    of checks builds up behind a slow one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyOptions
    from prefect.states import Pending, Running

    declared = {
        d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    }
    with get_client(sync_client=True) as client:
        for name in PERIODIC_CHECKS:
            limit = declared[name]["concurrency_limit"]
            deployment = client.create_deployment(
                flow_id=client.create_flow_from_name(f"{name}-limited"),
                name=name,
                concurrency_limit=limit["limit"],
                concurrency_options=ConcurrencyOptions(
                    collision_strategy=limit["collision_strategy"]
                ),
            )
            first, second = (client.create_flow_run_from_deployment(deployment) for _ in "ab")
            assert client.set_flow_run_state(first.id, Pending()).state.is_pending()
            assert client.set_flow_run_state(first.id, Running()).state.is_running()
            client.set_flow_run_state(second.id, Pending())
            assert client.read_flow_run(second.id).state.is_cancelled(), name
