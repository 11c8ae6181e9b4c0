"""Soak: a steady 100 requests/s through the gateway while a rollout runs and its challenger dies.

The platform is the rollout tests' (a real MLflow server, the champion's BentoML
service, the canary gateway; two trained versions). An open-loop load generator
sends 100 requests/s for `ATTNFLOW_SOAK_S` seconds (default 150; `make soak` runs
600): nine in ten are `/recommend` for one of 200 users, one in ten a `/feedback`
event with its own id. Twenty seconds in, a rollout of the second version starts
(steps 10, 25, 50, 100 %, 15 s each); once the challenger has 25 % of the traffic
its model service is SIGKILLed.

Held: every 10 s carries 100 requests/s (within 5 %); no request fails (the gateway
fails over to the champion, so champion users see nothing); the rollout is rolled
back and the aliases stay; every process that serves (gateway, champion service and
its workers, MLflow) grows its resident memory by less than 10 % from the first
minute to the last; every feedback event sent is in the log exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from pipelines.registry import CHALLENGER, CHAMPION, aliases
from pipelines.rollout import GatewayClient, RolloutFailed
from tests.integration.test_rollout import TOKEN, platform  # noqa: F401  (the fixture)
from tests.reliability.loadgen import per_window

pytestmark = pytest.mark.timeout(1800)

RATE = 100  # requests per second, open loop
SOAK_S = float(os.environ.get("ATTNFLOW_SOAK_S", "150"))
REPO = Path(__file__).resolve().parents[2]
WARMUP_S = 10  # not judged for memory: first requests fill caches and pools


class RssSampler(threading.Thread):
    """Every second, the resident memory of each watched process (pid -> [(t, bytes)])."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            t = time.monotonic() - self.t0
            for name, proc in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.samples[name].append((t, proc.memory_info().rss))

    def growth(self, first: tuple[float, float], last: tuple[float, float]) -> dict[str, float]:
        """Relative growth of the median RSS in window `last` over window `first`."""
        out = {}
        for name, s in self.samples.items():
            a = [v for t, v in s if first[0] <= t < first[1]]
            b = [v for t, v in s if last[0] <= t < last[1]]
            if a and b:
                out[name] = statistics.median(b) / statistics.median(a) - 1.0
        return out


def _serving_pids(stack, mlflow_url: str) -> dict[str, int]:
    """The gateway, the champion's service and every worker under it, the MLflow server."""
    pids = {"gateway": stack.component("gateway")["pid"]}
    champ = stack.served()[CHAMPION]
    root = psutil.Process(champ["pid"])
    pids["champion"] = root.pid
    for i, child in enumerate(root.children(recursive=True)):
        pids[f"champion-child{i}"] = child.pid
    port = int(mlflow_url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            pids["mlflow"] = conn.pid
    return pids


# 150 s of load plus a platform start: about 3.5 minutes; `make test-slow` runs it.
@pytest.mark.slow
def test_soak_at_100_rps_through_a_rollout_whose_challenger_is_killed(platform, request):  # noqa: F811
    from flows.rollout import rollout

    root, stack = platform["root"], platform["stack"]
    version = platform["versions"]["v_good_2"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["rollout"].update(steps=[10, 25, 50, 100], bake_s=15, min_agreement=0.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = aliases(root=root)
    users = json.loads((root / "models/attnflow/users.json").read_text())[:200]
    feedback_log = root / stack.cfg.serve.feedback_log
    already = feedback_log.read_text().count("\n") if feedback_log.exists() else 0

    sampler = RssSampler(_serving_pids(stack, platform["mlflow"]))
    users_file, report_file = root / "soak-users.json", root / "soak-report.json"
    users_file.write_text(json.dumps(users))
    sampler.start()
    # the generator runs in its own process: see tests/reliability/loadgen.py for why
    loader = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.reliability.loadgen",
            stack.gateway_url(),
            str(users_file),
            str(SOAK_S),
            str(RATE),
            str(report_file),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    request.addfinalizer(lambda: loader.poll() is None and loader.kill())
    first = loader.stdout.readline().split()
    assert first[:1] == ["started"], f"the load generator did not start: {first}"
    load_started = float(first[1])

    outcome: dict[str, object] = {}

    def run_rollout() -> None:
        try:
            outcome["result"] = rollout(version=version, root=str(root), actor="soak test")
        except RolloutFailed as exc:
            outcome["failed"] = exc

    time.sleep(20)
    roller = threading.Thread(target=run_rollout, daemon=True)
    roller.start()
    gw = GatewayClient(stack.gateway_url(), TOKEN)
    killed_at = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and roller.is_alive():
        if gw.state().get("weight", 0) >= 25:
            challenger = stack.served()[CHALLENGER]
            proc = psutil.Process(challenger["pid"])
            for p in [proc, *proc.children(recursive=True)]:
                p.send_signal(signal.SIGKILL)
            killed_at = time.time() - load_started
            break
        time.sleep(0.2)
    roller.join(timeout=300)
    try:
        loader.wait(timeout=SOAK_S + 120)
    except subprocess.TimeoutExpired:
        pytest.fail("the load generator did not finish")  # the finalizer kills it
    finally:
        sampler.stop.set()
    assert loader.returncode == 0, f"the load generator exited with {loader.returncode}"
    load = json.loads(report_file.read_text())

    # the challenger died halfway: rolled back, aliases as they were
    assert killed_at is not None, "the rollout never reached 25 %"
    assert "failed" in outcome, outcome
    assert aliases(root=root).get(CHAMPION) == before.get(CHAMPION)
    assert stack.served()[CHAMPION]["version"] == before[CHAMPION]

    # no request failed: not one error for anyone, champion users included
    statuses = Counter((kind, status) for _, kind, _, status in load["outcomes"])
    sent = int(SOAK_S * RATE)
    assert len(load["outcomes"]) == sent
    failed = [o for o in load["outcomes"] if o[3] != 200]
    assert not failed, (statuses, failed[:10])
    # steady: every 10 s window carried 100 requests/s, within 5 %
    windows = per_window(load["sent_at"], SOAK_S, 10.0)
    assert all(abs(c - 10 * RATE) <= 0.05 * 10 * RATE for c in windows), windows

    # memory: first minute (after warm-up) against the last minute
    growth = sampler.growth((WARMUP_S, WARMUP_S + 60), (SOAK_S - 60, SOAK_S))
    assert growth and "gateway" in growth and "champion" in growth
    assert all(g < 0.10 for g in growth.values()), growth

    # feedback: every event sent is in the log, none twice
    ids = [
        json.loads(line)["event_id"]
        for line in feedback_log.read_text().splitlines()[already:]
        if line.strip()
    ]
    counts = Counter(ids)
    assert set(load["feedback_ids"]) <= set(counts), set(load["feedback_ids"]) - set(counts)
    assert all(counts[i] == 1 for i in load["feedback_ids"]), [i for i in counts if counts[i] > 1]
    print(
        f"soak: {sent} requests in {SOAK_S:.0f} s, 0 failed; challenger killed at "
        f"{killed_at:.0f} s; RSS growth { ({k: round(v, 3) for k, v in growth.items()}) }"
    )
