"""Benchmark: how much does the idle local stack slow training down on this machine?

The pipeline benchmark compares a retrain inside the stack with bare training while the
stack is down; on a 2-core machine training keeps both cores busy, so whatever the
stack does meanwhile (the Prefect server answering the worker's polls, the gateway's
readiness probes, the every-minute reconcile check) can cost training time. This
measures that cost on its own, in a scratch copy (benchmarks/.work/interference):

1. `attnflow up`, a short first retrain (quality gates off: the model only has to be
   served) so that a champion and the warm spare run, as beside a real retrain;
2. pairs of the same short bare training (`train_model` in a fresh process, the same
   seed within a pair): once with every stack process frozen (SIGSTOP: no CPU, nothing
   else changes) and once with the stack running idle. The order alternates from
   pair to pair (frozen first, then idle first) so that a steady drift of this
   machine's speed cancels out;
3. `attnflow down`.

Reported: each run's SGD seconds and CPU seconds, the stack's CPU seconds during the
idle-stack runs, and the idle/frozen ratio of each pair with their median and mean.

    python benchmarks/stack_interference.py [--pairs 4] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pipeline_overhead import (  # noqa: E402
    attnflow,
    cpu_seconds,
    fresh_copy,
    set_params,
    signal_all,
    stack_pids,
    train_once,
    wait_for_spare,
)

WORK = ROOT / "benchmarks" / ".work" / "interference"


def prepare(root: Path) -> None:
    """Bring the copy's stack up with a champion served and the warm spare waiting."""
    # the served model's quality does not matter here: a short training, no baseline gate
    set_params(root, train={"epochs": 3}, gates={"baselines": []})
    attnflow(root, "up")
    attnflow(root, "retrain")
    wait_for_spare(root)


def measure(root: Path, pairs: int, epochs: int) -> list[dict]:
    runs = []
    for pair in range(pairs):
        order = ("frozen", "idle") if pair % 2 == 0 else ("idle", "frozen")
        for stack in order:
            pids = stack_pids(root)
            if stack == "frozen":
                signal_all(pids, signal.SIGSTOP)
            time.sleep(2)  # let what the stack was doing settle
            before = cpu_seconds(pids)
            try:
                run = train_once(root, seed=1000 + pair, epochs=epochs)
            finally:
                if stack == "frozen":
                    signal_all(pids, signal.SIGCONT)
            run.update(pair=pair, stack=stack, stack_cpu_s=round(cpu_seconds(pids) - before, 2))
            runs.append(run)
            print(json.dumps(run), flush=True)
    return runs


def summarize(runs: list[dict]) -> dict:
    """Per pair: idle-stack SGD seconds over frozen-stack SGD seconds (same seed)."""
    ratios = []
    for pair in sorted({r["pair"] for r in runs}):
        by = {r["stack"]: r for r in runs if r["pair"] == pair}
        ratios.append(by["idle"]["sgd_s"] / by["frozen"]["sgd_s"])
    mean = statistics.mean(ratios)
    stderr = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None
    return {
        "idle_over_frozen_sgd_ratio_by_pair": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "mean_ratio": round(mean, 3),
        "mean_ratio_stderr": round(stderr, 3) if stderr is not None else None,
        "stack_cpu_s_per_idle_run": [r["stack_cpu_s"] for r in runs if r["stack"] == "idle"],
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores, CPU only",
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/stack_interference.json"
    )
    args = parser.parse_args()
    os.environ.setdefault("ATTNFLOW_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    root = fresh_copy(WORK)
    try:
        prepare(root)
        runs = measure(root, args.pairs, args.epochs)
    finally:
        attnflow(root, "down")
    result = summarize(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
