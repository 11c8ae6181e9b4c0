"""Benchmark: training with glibc keeping freed memory (`train.keep_freed_memory`) or not.

On ml-latest-small's split (made once in a fresh copy, benchmarks/.work/malloc), bare
training (`train_model`, as the train stage runs it, in a fresh interpreter each time)
alternates between the two settings in ABBA blocks, so that this machine's drift
falls on both alike. Each run records the wall and CPU seconds of its SGD steps and,
for the whole `train_model` call, the page faults and the kernel (system) CPU time.

    python benchmarks/malloc_tuning.py [--pairs 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "benchmarks" / ".work" / "malloc"

_CHILD = """
import json, resource, sys
from pathlib import Path
from pipelines.config import load_config
from pipelines.sequences import load_split
from pipelines.train import train_model

root = Path.cwd()
cfg = load_config(root / "params.yaml", sys.argv[1:])
data = load_split(root / cfg.paths.split_dir, cfg.model.time_buckets)
r0 = resource.getrusage(resource.RUSAGE_SELF)
r = train_model(cfg, data, cache_dir=root / ".attnflow" / "cache")
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "sgd_s": r.train_seconds,
    "sgd_cpu_s": r.train_cpu_seconds,
    "page_faults": r1.ru_minflt - r0.ru_minflt,
    "system_s": r1.ru_stime - r0.ru_stime,
    "epochs": r.epochs_run,
}))
"""


def train(root: Path, keep: bool, epochs: int) -> dict[str, float]:
    """One bare training in a fresh interpreter with `train.keep_freed_memory=keep`."""
    overrides = [f"train.keep_freed_memory={str(keep).lower()}", f"train.epochs={epochs}"]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *overrides],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmarks.pipeline_overhead import fresh_copy
    from pipelines import ingest, split, validate
    from pipelines.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="ABBA blocks (4 runs each)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/malloc_tuning.json")
    args = parser.parse_args()
    os.environ.setdefault("ATTNFLOW_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    root = fresh_copy(WORK)
    cfg = load_config(root / "params.yaml")
    for stage in (ingest, validate, split):
        stage.run(cfg, root)
    train(root, True, 1)  # the item-text cache, so that no measured run builds it
    runs: dict[str, list[dict[str, float]]] = {"kept": [], "glibc_defaults": []}
    for _ in range(args.pairs):
        for keep in (True, False, False, True):
            run = train(root, keep, args.epochs)
            runs["kept" if keep else "glibc_defaults"].append(run)
            print(("kept     " if keep else "defaults ") + json.dumps(run), flush=True)
    median = {
        arm: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0] if k != "epochs"}
        for arm, rs in runs.items()
    }
    kept, plain = median["kept"], median["glibc_defaults"]
    result = {
        "dataset": "ml-latest-small",
        "epochs": args.epochs,
        "runs_per_setting": 2 * args.pairs,
        "median": median,
        "sgd_speedup": round(plain["sgd_s"] / kept["sgd_s"], 3),
        "page_fault_ratio": round(plain["page_faults"] / kept["page_faults"], 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
