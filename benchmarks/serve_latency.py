"""Benchmark: /recommend latency through the canary gateway, against two references.

An open-loop load generator (sends are scheduled on a timer at a fixed rate, so a
slow server builds a queue and its latency shows it; latency is measured from each
request's scheduled send time) drives, one after another:

    gateway-champion   gateway -> model service (weight 0: champion only)
    gateway-split      gateway -> champion + challenger model services, weight 50
    model-direct       the BentoML model service without the gateway
    bentoml-noop       a BentoML service with a trivial API (the stack's own floor)
    naive-fastapi      plain FastAPI/uvicorn, the same model once per request, no batching

Each runs at fixed rates (default 50, 100, 200 requests/s, `--seconds` each), then a
search for the maximum sustained rate: the rate goes up until a step has an error,
p99 over 100 ms, or an achieved rate under 95% of the target (a failed step is run
once more before it counts: the machine is shared); the last rate that passed is the
maximum. CPU-seconds per 1,000 requests are measured for every server
process tree (psutil), and p50/p95/p99, errors and the achieved rate for every step.
The load generator shares the machine with the servers; the numbers say what this
machine does with everything on it.

Requests: 80% by known user id, 20% by an explicit history of 20 items, k=10. The
model: `--model` (a model folder or a models:/ URI), or by default an untrained model
of the default architecture (params.yaml `model`) on synthetic data with a
10,000-item catalog, built once in benchmarks/.work (latency does not depend on the
weights' values).

    python benchmarks/serve_latency.py [--seconds 10] [--rates 50 100 200] [--model PATH]

Writes benchmarks/results/serve_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.launch import (  # noqa: E402
    Handle,
    LaunchError,
    free_port,
    spawn,
    start_gateway,
    start_model_service,
    stop_all,
    wait_ready,
)

log = logging.getLogger("serve_latency")
WORK = ROOT / "benchmarks" / ".work" / "serve_latency"
RESULTS = ROOT / "benchmarks" / "results" / "serve_latency.json"
P99_LIMIT_MS = 100.0
SEARCH_RATES = [50, 100, 150, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000, 2500]


# --- the model ---------------------------------------------------------------------------------


def build_model(folder: Path) -> Path:
    """An untrained model of the default architecture on synthetic data (built once)."""
    if (folder / "model" / "manifest.json").exists():
        return folder / "model"
    import numpy as np

    from pipelines.config import SplitConfig, SyntheticConfig, load_config
    from pipelines.sequences import load_split
    from pipelines.split import build_sequences, leave_one_out, split_meta, write_split
    from pipelines.synthetic import generate
    from pipelines.train import build_encoder, export_model

    events, items = generate(
        SyntheticConfig(n_users=3000, n_items=10000, n_topics=16, events_per_user=30, seed=5)
    )
    seq, users, item_map = build_sequences(
        events, items, SplitConfig(min_user_events=1, min_item_events=1)
    )
    splits = leave_one_out(seq)
    split_dir = folder / "split"
    write_split(
        split_dir, splits, users, item_map, split_meta("synthetic", seq, users, item_map, splits)
    )
    data = load_split(split_dir)
    cfg = load_config(ROOT / "params.yaml")
    encoder = build_encoder(cfg, data, folder / "cache")
    counts = np.bincount(data.train.items, minlength=data.n_items + 1)[1:]
    ids = data.items.sort_values("item_idx")["item_id"].tolist()
    popular = [ids[i] for i in np.argsort(-counts, kind="stable")[:100]]
    return export_model(encoder, data, folder / "model", {"popular_items": popular})


def request_bodies(model_source: str, n: int = 2000, seed: int = 0) -> list[bytes]:
    """The request mix, pre-serialised: 80% known users, 20% 20-item histories."""
    from pipelines.model import load_extra
    from pipelines.registry import fetch_model

    folder = fetch_model(model_source, ROOT).folder
    users = load_extra(folder, "users")
    items = load_extra(folder, "items")["ids"][1:]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.8:
            body = {"user_id": rng.choice(users), "k": 10}
        else:
            body = {"history": rng.sample(items, 20), "k": 10}
        out.append(json.dumps(body).encode())
    return out


# --- servers -----------------------------------------------------------------------------------


def start_servers(model: str, env: dict[str, str], log_dir: Path, token: str) -> dict[str, Handle]:
    """Every server of the benchmark, started in parallel; stopped by the caller."""
    handles: dict[str, Handle] = {}
    common = {"feedback_log": WORK / "feedback.jsonl", "env": env, "log_dir": log_dir}
    try:
        handles["champion"] = start_model_service(model, wait=False, **common)
        handles["challenger"] = start_model_service(
            model, variant="challenger", wait=False, **common
        )
        port = free_port()
        handles["noop"] = spawn(
            "bentoml-noop",
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                "benchmarks.noop_service:Noop",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            port,
            env=env,
            log_dir=log_dir,
        )
        port = free_port()
        folder = str(_local_folder(model))
        handles["naive"] = spawn(
            "naive-fastapi",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.naive_server:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            port,
            env={**env, "ATTNFLOW_MODEL_SOURCE": folder},
            log_dir=log_dir,
        )
        wait_ready(handles["champion"], 300)
        wait_ready(handles["challenger"], 300)
        wait_ready(handles["noop"], 300, model_service=False)
        wait_ready(handles["naive"], 300, model_service=False)
        handles["gateway"] = start_gateway(
            handles["champion"].url,
            handles["challenger"].url,
            weight=0,
            admin_token=token,
            log_dir=log_dir,
            env=env,
        )
        _until(lambda: _ready(handles["gateway"].url), 30)
    except BaseException:
        stop_all(list(handles.values()))
        raise
    return handles


def _local_folder(model: str) -> Path:
    from pipelines.registry import fetch_model

    return fetch_model(model, ROOT).folder


def _ready(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise LaunchError("not ready in time")
        time.sleep(0.1)


def set_weight(gateway: Handle, token: str, weight: int) -> None:
    """Set the gateway's challenger weight through its admin API."""
    import urllib.request

    req = urllib.request.Request(
        gateway.url + "/admin/weight",
        data=json.dumps({"weight": weight}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read())["weight"] == weight


def cpu_seconds(handles: list[Handle]) -> float:
    """User + system CPU of the processes and all their descendants, so far."""
    total = 0.0
    for h in handles:
        try:
            root = psutil.Process(h.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


# --- the load generator ------------------------------------------------------------------------


async def open_loop(url: str, rate: float, seconds: float, bodies: list[bytes]) -> dict[str, Any]:
    """Send `rate` requests/s for `seconds` on a fixed schedule; latency from scheduled time."""
    loop = asyncio.get_running_loop()
    n = max(1, int(rate * seconds))
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=1024)
    timeout = aiohttp.ClientTimeout(total=5)
    headers = {"Content-Type": "application/json"}
    offset = random.randrange(len(bodies))
    last_done = 0.0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, when: float) -> None:
            nonlocal last_done
            try:
                body = bodies[(offset + i) % len(bodies)]
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
            done = loop.time()
            last_done = max(last_done, done)
            if status == 200:
                latencies.append(1000 * (done - when))
            else:
                errors[f"http_{status}"] += 1

        t0 = loop.time() + 0.05
        tasks = []
        for i in range(n):
            when = t0 + i / rate
            delay = when - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, when)))
        await asyncio.gather(*tasks)
    span = max(last_done - t0, n / rate)
    latencies.sort()
    ok = len(latencies)
    return {
        "target_rps": rate,
        "seconds": seconds,
        "sent": n,
        "ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "achieved_rps": round(ok / span, 1),
        "p50_ms": _pct(latencies, 0.50),
        "p95_ms": _pct(latencies, 0.95),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": round(latencies[-1], 2) if latencies else None,
    }


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def passes(step: dict[str, Any]) -> bool:
    """The sustained-rate rule: no error, p99 <= 100 ms, achieved >= 95% of the target."""
    return (
        step["errors"] == 0
        and step["p99_ms"] is not None
        and step["p99_ms"] <= P99_LIMIT_MS
        and step["achieved_rps"] >= 0.95 * step["target_rps"]
    )


def measure(
    url: str, rate: float, seconds: float, bodies: list[bytes], servers: dict[str, list[Handle]]
) -> dict[str, Any]:
    """One open-loop step, with the CPU each server spent on it."""
    before = {name: cpu_seconds(hs) for name, hs in servers.items()}
    step = asyncio.run(open_loop(url, rate, seconds, bodies))
    done = max(1, step["ok"] + step["errors"])
    step["cpu_s_per_1k"] = {
        name: round(1000 * (cpu_seconds(hs) - before[name]) / done, 3)
        for name, hs in servers.items()
    }
    step["cpu_s_per_1k"]["total"] = round(sum(step["cpu_s_per_1k"].values()), 3)
    return step


def scenario(
    name: str,
    url: str,
    servers: dict[str, list[Handle]],
    bodies: list[bytes],
    rates: list[float],
    seconds: float,
    search_seconds: float,
) -> dict[str, Any]:
    """Fixed-rate steps, then the maximum sustained rate search."""
    log.info("%s: warm-up", name)
    asyncio.run(open_loop(url, 50, 1.0, bodies))
    fixed = []
    for rate in rates:
        step = measure(url, rate, seconds, bodies, servers)
        log.info("%s @ %s rps: %s", name, rate, _brief(step))
        fixed.append(step)
    search, best = [], None
    for rate in SEARCH_RATES:
        step = measure(url, rate, search_seconds, bodies, servers)
        search.append(step)
        log.info("%s search @ %s rps: %s", name, rate, _brief(step))
        if not passes(step):
            # The machine is shared: a failed step is run once more before it counts,
            # for every server alike, so one stray CPU burst does not end the search.
            time.sleep(1.0)
            step = measure(url, rate, search_seconds, bodies, servers)
            step["retry"] = True
            search.append(step)
            log.info("%s search @ %s rps (again): %s", name, rate, _brief(step))
            if not passes(step):
                break
        best = rate
        time.sleep(0.5)  # let a backlog drain before the next step
    return {"url": url, "fixed": fixed, "search": search, "max_sustained_rps": best}


def _brief(step: dict[str, Any]) -> str:
    return (
        f"p50 {step['p50_ms']} p95 {step['p95_ms']} p99 {step['p99_ms']} ms, "
        f"{step['errors']} errors, {step['achieved_rps']} rps, cpu/1k {step['cpu_s_per_1k']}"
    )


def table(results: dict[str, Any]) -> str:
    """The results as a text table."""
    rows = [
        f"{'scenario':<18} {'rps':>5} {'achieved':>8} {'p50':>7} {'p95':>7} {'p99':>7} "
        f"{'errors':>6} {'cpu-s/1k':>9}  max sustained"
    ]
    for name, sc in results["scenarios"].items():
        for i, s in enumerate(sc["fixed"]):
            rows.append(
                f"{name:<18} {s['target_rps']:>5} {s['achieved_rps']:>8} {_f(s['p50_ms'])} "
                f"{_f(s['p95_ms'])} {_f(s['p99_ms'])} {s['errors']:>6} "
                f"{s['cpu_s_per_1k']['total']:>9}  {sc['max_sustained_rps'] if i == 0 else ''}"
            )
    return "\n".join(rows)


def _f(x: float | None) -> str:
    return f"{x:>7.1f}" if x is not None else f"{'-':>7}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the JSON results and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each fixed-rate step")
    p.add_argument(
        "--search-seconds",
        type=float,
        default=None,
        help="length of each max-rate search step (default: --seconds)",
    )
    p.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200])
    p.add_argument("--model", default=None, help="model folder or models:/ URI")
    p.add_argument("--only", nargs="+", default=None, help="scenarios to run (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    WORK.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_model(WORK))
    bodies = request_bodies(model)
    token = secrets.token_hex(16)
    env = {"BENTOML_HOME": str(WORK / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    log_dir = WORK / "logs"
    search_seconds = args.search_seconds or args.seconds
    started = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    handles = start_servers(model, env, log_dir, token)
    try:
        h = handles
        plan = {
            "gateway-champion": (
                h["gateway"],
                0,
                {"gateway": [h["gateway"]], "champion": [h["champion"]]},
            ),
            "gateway-split": (
                h["gateway"],
                50,
                {
                    "gateway": [h["gateway"]],
                    "champion": [h["champion"]],
                    "challenger": [h["challenger"]],
                },
            ),
            "model-direct": (h["champion"], None, {"champion": [h["champion"]]}),
            "bentoml-noop": (h["noop"], None, {"noop": [h["noop"]]}),
            "naive-fastapi": (h["naive"], None, {"naive": [h["naive"]]}),
        }
        scenarios = {}
        for name, (target, weight, servers) in plan.items():
            if args.only and name not in args.only:
                continue
            if weight is not None:
                set_weight(h["gateway"], token, weight)
            scenarios[name] = scenario(
                name,
                target.url + "/recommend",
                servers,
                bodies,
                args.rates,
                args.seconds,
                search_seconds,
            )
    finally:
        stop_all(list(handles.values()))
    results = {
        "benchmark": "serve_latency",
        "command": "python benchmarks/serve_latency.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "load generator and every server share this machine",
            "load_average_before": load_before,
        },
        "model": model if args.model else "untrained default architecture, 10k-item catalog",
        "request_mix": "80% user_id, 20% 20-item history; k=10",
        "rule": f"sustained: 0 errors, p99 <= {P99_LIMIT_MS} ms, achieved >= 95% of target "
        "(a failed search step is repeated once before it counts)",
        "wall_s": round(time.time() - started, 1),
        "scenarios": scenarios,
    }
    results["targets"] = _targets(scenarios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(json.dumps(results["targets"], indent=1))
    return results


def _targets(scenarios: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, where this run measured what they need."""
    out: dict[str, Any] = {}
    gw = scenarios.get("gateway-champion")
    at100 = next((s for s in gw["fixed"] if s["target_rps"] == 100), None) if gw else None
    if at100:
        out["gateway_p99_at_100rps_ms"] = at100["p99_ms"]
        out["gateway_errors_at_100rps"] = at100["errors"]
        out["p99_le_25ms_and_0_errors_at_100rps"] = bool(
            at100["errors"] == 0 and at100["p99_ms"] is not None and at100["p99_ms"] <= 25
        )
    naive = scenarios.get("naive-fastapi")
    if gw and naive:
        out["gateway_max_rps"] = gw["max_sustained_rps"]
        out["naive_max_rps"] = naive["max_sustained_rps"]
        out["gateway_max_ge_naive"] = (gw["max_sustained_rps"] or 0) >= (
            naive["max_sustained_rps"] or 0
        )
    return out


if __name__ == "__main__":
    main()
