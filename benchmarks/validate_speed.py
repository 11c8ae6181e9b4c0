"""Benchmark: ingest plus validation of 1,000,000 synthetic attention events.

Writes a synthetic event log (Parquet) into a scratch project, then times the
`ingest` stage (read, raw suite, canonical tables) and the `validate` stage
(canonical events and items suites) in-process, best of `--repeats`. Also times
the same two stages through the CLI (`attnflow ingest && attnflow validate`),
which adds interpreter and library start-up. Target: under 15 s on 2 cores.

    python benchmarks/validate_speed.py [--events 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import ingest, validate  # noqa: E402
from pipelines.config import SyntheticConfig, load_config  # noqa: E402
from pipelines.synthetic import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/validate_speed.json")
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

    n_users = max(1, args.events // 30)
    events, items = generate(SyntheticConfig(n_users=n_users, n_items=20_000, events_per_user=30))
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        events.to_parquet(tmp / "log.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
        params = {
            "ingest": {
                "dataset": "eventlog",
                "eventlog": {
                    "path": "log.parquet",
                    "items_path": "items.parquet",
                    "columns": {"value": "value", "dwell_s": "dwell_s", "text": "text"},
                    "ts_unit": "iso",
                },
            }
        }
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        cfg = load_config(tmp / "params.yaml")
        ingest_s, validate_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ingest.run(cfg, tmp)
            t1 = time.perf_counter()
            validate.run(cfg, tmp)
            t2 = time.perf_counter()
            ingest_s.append(t1 - t0)
            validate_s.append(t2 - t1)
        attnflow = Path(sys.executable).parent / "attnflow"
        t0 = time.perf_counter()
        for stage in ("ingest", "validate"):
            subprocess.run([str(attnflow), stage], cwd=tmp, check=True, capture_output=True)
        cli_s = time.perf_counter() - t0

    best = min(i + v for i, v in zip(ingest_s, validate_s, strict=True))
    result = {
        "events": len(events),
        "ingest_s": [round(x, 2) for x in ingest_s],
        "validate_s": [round(x, 2) for x in validate_s],
        "best_ingest_plus_validate_s": round(best, 2),
        "cli_ingest_plus_validate_s": round(cli_s, 2),
        "target_s": 15.0,
        "met": best < 15.0 and cli_s < 15.0,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "note": "the validate run after the first compares against the accepted profile (drift)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
