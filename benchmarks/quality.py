"""Benchmark: recommendation quality on the SASRec protocol, and on MovieLens with text.

    python benchmarks/quality.py --dataset games
        SASRec protocol on games: test NDCG@10 / HR@10 against 100 sampled negatives
        (targets: >= 0.55 / >= 0.76; the SASRec paper: 0.5360 / 0.7410), the
        full-ranking numbers beside them, and the training time on this machine. It
        trains with the best settings the ablation found (games_ablation.BEST_GAMES:
        masking and substitution, 256 negatives, plateau decay, weight averaging, FGM
        at 8, reordering, and a refit on train + validation to the best epoch);
        `--set` adds or overrides settings after them.

    python benchmarks/quality.py --dataset ml-latest-small
        Full-ranking NDCG@10 / HR@10 of the model without and with MiniLM text fusion,
        against the most-popular, item-kNN and Markov baselines.

Each run trains through the real `train` and `evaluate` stages in a scratch project
under benchmarks/.work/ (MLflow tracking included) and writes
benchmarks/results/quality_<dataset>.json.

    python benchmarks/quality.py --dataset games --evaluate-only [--set ...]
        Re-run only the `evaluate` stage on the model the last games run left in its
        scratch project (after a change to evaluation); the training facts come from
        that model's lineage. The settings must be the ones it was trained with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import GAMES_SPLIT, games_overrides, scratch_project  # noqa: E402
from benchmarks.games_ablation import BEST_GAMES  # noqa: E402
from pipelines import baselines, evaluate, train  # noqa: E402
from pipelines.config import Config, load_config  # noqa: E402

PAPER = {
    "sasrec_paper": {"ndcg@10": 0.5360, "hr@10": 0.7410},
    "sasrec_public_pytorch": {"ndcg@10": 0.5308, "hr@10": 0.7318},
}


def _stored_training(cfg: Config, root: Path) -> dict:
    """The training summary of the model in `root`, which must match `cfg`'s settings."""
    lineage = json.loads((root / cfg.paths.model_dir / "lineage.json").read_text())
    for section in ("model", "train"):
        stored, asked = lineage["params"][section], cfg.model_dump(mode="json")[section]
        differ = sorted(k for k in asked if stored.get(k) != asked[k])
        if differ:
            raise SystemExit(f"the stored model had other {section} settings: {differ}")
    return lineage["train"]


def _run(root: Path, overrides: list[str], evaluate_only: bool = False) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / '.attnflow' / 'mlflow.db'}"
    cfg = load_config(root / "params.yaml", overrides)
    t0 = time.perf_counter()
    trained = _stored_training(cfg, root) if evaluate_only else train.run(cfg, root)
    wall = None if evaluate_only else time.perf_counter() - t0
    baselines.run(cfg, root)
    report = evaluate.run(cfg, root)
    return {
        "overrides": overrides,
        "train_seconds": trained["train_seconds"],
        "train_wall_seconds": round(wall, 1) if wall is not None else None,
        "epochs_run": trained["epochs_run"],
        "best_epoch": trained["best_epoch"],
        "test_sampled": {k: round(v, 4) for k, v in report["model"]["sampled"].items()},
        "test_full": {k: round(v, 4) for k, v in report["model"]["full"].items()},
        "baselines": {
            n: {
                "full": {k: round(v, 4) for k, v in r["full"].items()},
                "sampled": {k: round(v, 4) for k, v in r["sampled"].items()},
            }
            for n, r in report["baselines"].items()
        },
        "segments": report["segments"],
    }


def games(extra: list[str], evaluate_only: bool = False) -> dict:
    root = scratch_project("games", GAMES_SPLIT)
    run = _run(root, games_overrides() + BEST_GAMES + extra, evaluate_only)
    if evaluate_only:
        run["evaluated_again"] = True
        previous = _previous("games")
        if previous.get("train_seconds") == run["train_seconds"]:  # the same training run
            run["train_wall_seconds"] = previous.get("train_wall_seconds")
    s = run["test_sampled"]
    return {
        "dataset": "games",
        "protocol": "SASRec: leave-one-out, test target vs 100 uniform unseen items (seed 2018), "
        "all 30,901 users with >= 3 events; full ranking beside it",
        **run,
        "published": PAPER,
        "targets": {"ndcg@10": 0.55, "hr@10": 0.76},
        "met": s["ndcg@10"] >= 0.55 and s["hr@10"] >= 0.76,
    }


def movielens(extra: list[str]) -> dict:
    root = scratch_project("ml-latest-small", [])
    out = {
        "dataset": "ml-latest-small",
        "protocol": "leave-one-out, full ranking over every known item the user has not rated",
        "runs": {},
    }
    for name, over in (
        ("no_text", ["model.text.mode=none"]),
        ("text_frozen_minilm", ["model.text.mode=frozen"]),
    ):
        out["runs"][name] = _run(root, over + extra)
    return out


def _previous(dataset: str) -> dict:
    path = ROOT / "benchmarks" / "results" / f"quality_{dataset}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["games", "ml-latest-small"], required=True)
    parser.add_argument("--set", action="append", default=[], help="extra overrides")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="games: evaluate the model the last run trained again, without training",
    )
    args = parser.parse_args()
    if args.evaluate_only and args.dataset != "games":
        parser.error("--evaluate-only is for --dataset games")
    result = games(args.set, args.evaluate_only) if args.dataset == "games" else movielens(args.set)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, CPU only"
    out = ROOT / "benchmarks" / "results" / f"quality_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
