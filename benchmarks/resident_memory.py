"""Benchmark: does memory that another process holds, idle, slow training on this machine?

The overhead benchmark found bare training 15-40 % slower while the local stack was up
than after `attnflow down`, even with every process of the stack frozen (SIGSTOP, no CPU
at all). What the stack still has then is its resident memory (3-4.5 GB). Two holders:

- `numpy`: any idle resident memory, nothing of attnflow in it: a sleeping process that
  allocated and touched `--hold-gb` of memory;
- `stack`: the local stack itself (`attnflow up`, serving a champion, its spare warm),
  frozen during the training as in the overhead benchmark, and `attnflow down` between.

Bare training (as in the overhead benchmark: `train_model` in a fresh interpreter, on
ml-latest-small's split) alternates without and with the holder in ABBA order, so that
a drift of this machine's speed during the series falls on both sides equally.

    python benchmarks/resident_memory.py [--holder numpy|stack] [--hold-gb 4] [--pairs 2]

Results: `benchmarks/results/resident_memory_<holder>.json`. The `_whole_logits` ones were
measured at 9df2c8f, before the full loss was computed a chunk at a time: then the frozen
stack slowed training by 31 % and the numpy holder did not (+1 %); the slowdown was the
kernel's, on the page faults of each step's whole logits (see `full_cross_entropy`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pipeline_overhead import (  # noqa: E402
    BARE_SPLIT,
    attnflow,
    bare_data,
    fresh_copy,
    set_params,
    stack_frozen,
    stack_pids,
    train_once,
    wait_for_spare,
)

WORK = ROOT / "benchmarks" / ".work" / "memory"
HOLDER = (
    "import sys, time\n"
    "import numpy as np\n"
    "held = np.ones(int(float(sys.argv[1]) * 2**30) // 8)  # float64, every page touched\n"
    "print('ready', flush=True)\n"
    "time.sleep(10**6)\n"
)


@contextlib.contextmanager
def numpy_holder(gigabytes: float) -> Iterator[list[int]]:
    """A process that touches `gigabytes` of memory, then sleeps holding it; yields its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(gigabytes)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield [proc.pid]
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def stack_holder(root: Path) -> Iterator[list[int]]:
    """The copy's stack up (its champion served, the spare warm), then down; yields its pids."""
    attnflow(root, "up")
    try:
        wait_for_spare(root)
        yield stack_pids(root)
    finally:
        attnflow(root, "down")


def rss_gb(pids: list[int]) -> float:
    """Resident memory of `pids`, summed (shared pages count in each: an upper bound)."""
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**30


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def first_champion(root: Path) -> None:
    """One retrain through the stack, so that every later `up` serves a champion."""
    attnflow(root, "up")
    try:
        attnflow(root, "retrain")
    finally:
        attnflow(root, "down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holder", choices=("numpy", "stack"), default="numpy")
    parser.add_argument("--hold-gb", type=float, default=4.0, help="numpy holder's size")
    parser.add_argument("--pairs", type=int, default=2, help="ABBA blocks (4 runs each)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/resident_memory_<holder>.json"
    )
    args = parser.parse_args()
    out = args.out or ROOT / f"benchmarks/results/resident_memory_{args.holder}.json"
    os.environ.setdefault("ATTNFLOW_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    root = fresh_copy(WORK)
    # a short rollout: the first retrain only serves; nothing here is timed but training
    set_params(root, rollout={"steps": [100], "bake_s": 1.0, "replay_rps": 20, "min_requests": 5})
    bare_data(root)
    if args.holder == "stack":
        first_champion(root)
    runs: list[dict] = []

    def train(held: list[int] | None) -> None:
        r = {"held": held is not None, "available_gb": round(available_gb(), 2)}
        if held is not None:
            r["held_rss_gb"] = round(rss_gb(held), 2)
        r.update(train_once(root, seed=7, epochs=args.epochs, split_dir=BARE_SPLIT))
        runs.append(r)
        print(json.dumps(r), flush=True)

    def holding():
        return stack_holder(root) if args.holder == "stack" else numpy_holder(args.hold_gb)

    for _ in range(args.pairs):
        train(None)
        with holding() as pids:
            for _ in range(2):
                # the stack frozen as in the overhead benchmark's reference runs; a no-op
                # for the sleeping numpy holder
                with stack_frozen(root) if args.holder == "stack" else contextlib.nullcontext():
                    train(pids)
        train(None)
    median = {
        held: {
            k: round(statistics.median(r[k] for r in runs if r["held"] == held), 1)
            for k in ("wall_s", "sgd_s", "cpu_s")
        }
        for held in (False, True)
    }
    result = {
        "dataset": "ml-latest-small",
        "holder": args.holder,
        "epochs": args.epochs,
        **({"hold_gb": args.hold_gb} if args.holder == "numpy" else {}),
        "median_without_holder": median[False],
        "median_with_holder": median[True],
        "slowdown_of_median_wall_s": round(median[True]["wall_s"] / median[False]["wall_s"] - 1, 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
