"""Benchmark: which training levers move quality on games (SASRec protocol), one at a time.

    python benchmarks/games_ablation.py VARIANT [VARIANT ...] [--threads 1]
    python benchmarks/games_ablation.py --list

Each variant trains the games model (benchmarks.common.games_overrides plus the
variant's overrides) with `train_model`, in-process and without MLflow, then ranks
every user's test target against the fixed 100 sampled negatives (seed 2018) and
against every unseen item. One JSON line per variant is appended to
benchmarks/results/games_ablation.jsonl. The full report of a chosen configuration
(baselines, segments, MLflow run) comes from benchmarks/quality.py with the same
overrides passed as --set.

Two variants at --threads 1 side by side use this machine's two cores; that is how the
recorded lines were measured, so their seconds are not single-run timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import GAMES_SPLIT, games_overrides, scratch_project  # noqa: E402

SSE = ["train.augment.mask_prob=0.2", "train.augment.substitute_prob=0.1"]
DECAY = ["train.lr_decay_factor=0.3", "train.lr_decay_patience=2", "train.patience=6"]
BEST = [*SSE, "train.negatives=256", *DECAY]  # the best of the levers measured one at a time
BEST_EMA = [*BEST, "train.ema_decay=0.999"]  # BEST with the moving average that helped
FGM_EPS = ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0")
BEST_FGM = [*BEST_EMA, "train.adversarial_eps=8.0"]  # the best FGM step; later rounds build on it
BEST_FGM_R = [*BEST_FGM, "train.augment.reorder_prob=0.2"]  # the best without a refit
# The settings benchmarks/quality.py uses: BEST_FGM_R, then retrained on train + validation.
BEST_GAMES = [*BEST_FGM_R, "train.refit_with_valid=true"]

VARIANTS: dict[str, list[str]] = {
    "base": [],
    "mask": ["train.augment.mask_prob=0.2"],
    "dropout0.5_from_end": ["model.dropout=0.5", "model.positions=from_end"],
    "mask_sub0.1": SSE,
    "mask_sub0.3": ["train.augment.mask_prob=0.2", "train.augment.substitute_prob=0.3"],
    "mask_users_swap0.9": [
        "train.augment.mask_prob=0.2",
        "model.user_embeddings=true",
        "train.augment.user_substitute_prob=0.9",
    ],
    "mask_users_swap0.1": [
        "train.augment.mask_prob=0.2",
        "model.user_embeddings=true",
        "train.augment.user_substitute_prob=0.1",
    ],
    "mask_sub0.1_hidden128": [*SSE, "model.hidden=128"],
    "mask_sub0.1_decay": [*SSE, *DECAY],
    "mask_sub0.1_neg256": [*SSE, "train.negatives=256"],
    "mask_sub0.1_neg256_decay": [*SSE, "train.negatives=256", *DECAY],
    "mask_sub0.1_neg64_decay": [*SSE, "train.negatives=64", *DECAY],
    "mask_sub0.1_neg256_decay_ema0.999": [*BEST, "train.ema_decay=0.999"],
    "mask_sub0.1_neg256_decay_ema0.99": [*BEST, "train.ema_decay=0.99"],
    "mask_sub0.1_neg256_decay_from_end": [*BEST, "model.positions=from_end"],
    "mask_sub0.1_neg256_decay_item_bias": [*BEST, "model.item_bias=true"],
    "mask_sub0.1_bce8_decay": [*SSE, "train.loss=bce", "train.negatives=8", *DECAY],
    "mask_sub0.1_neg256_decay_cl0.1": [*BEST, "train.contrastive_weight=0.1"],
    "mask_sub0.1_neg256_decay_ema0.9995": [*BEST, "train.ema_decay=0.9995"],
    "mask_sub0.1_neg256_decay_ema0.999_patience10": [
        *BEST,
        "train.ema_decay=0.999",
        "train.patience=10",
    ],
    "best_ema_layers3": [*BEST_EMA, "model.layers=3"],
    "best_ema_neg128": [*SSE, "train.negatives=128", *DECAY, "train.ema_decay=0.999"],
    "best_ema_ls0.1": [*BEST_EMA, "train.label_smoothing=0.1"],
    "best_ema_ls0.3": [*BEST_EMA, "train.label_smoothing=0.3"],
    "best_ema_per_target100": [
        *SSE,
        *DECAY,
        "train.ema_decay=0.999",
        "train.negatives=100",
        "train.negatives_per=target",
    ],
    "best_ema_per_target256": [*BEST_EMA, "train.negatives_per=target"],
    "best_ema_seed7": [*BEST_EMA, "train.seed=7"],
    # FGM step sizes (the L2 norm of the step on the item-embedding table)
    **{f"best_ema_adv{eps}": [*BEST_EMA, f"train.adversarial_eps={eps}"] for eps in FGM_EPS},
    "best_ema_adv4.0_seed7": [*BEST_EMA, "train.adversarial_eps=4.0", "train.seed=7"],
    "best_ema_adv8.0_seed7": [*BEST_FGM, "train.seed=7"],
    "best_ema_adv8.0_dropout0.5": [*BEST_FGM, "model.dropout=0.5"],
    "best_ema_adv8.0_crop0.3": [*BEST_FGM, "train.augment.crop_prob=0.3"],
    "best_ema_adv8.0_reorder0.2": [*BEST_FGM, "train.augment.reorder_prob=0.2"],
    "best_ema_adv8.0_lr0.002": [*BEST_FGM, "train.lr=0.002"],
    "best_ema_adv1.0_hidden128_dropout0.5": [
        *BEST_EMA,
        "train.adversarial_eps=1.0",
        "model.hidden=128",
        "model.dropout=0.5",
    ],
    "best_fgm_reorder_hidden128": [*BEST_FGM_R, "model.hidden=128"],
    "best_fgm_reorder_stop_hr": [*BEST_FGM_R, "train.early_stop_metric=hr@10"],
    "best_fgm_reorder_dropout0.2": [*BEST_FGM_R, "model.dropout=0.2"],
    "best_fgm_reorder_dropout0.4": [*BEST_FGM_R, "model.dropout=0.4"],
    "best_fgm_reorder_eps16": [*BEST_FGM_R, "train.adversarial_eps=16.0"],
    "best_fgm_reorder_refit": BEST_GAMES,
    "best_ema_crop0.3": [*BEST_EMA, "train.augment.crop_prob=0.3"],
    "best_ema_reorder0.2": [*BEST_EMA, "train.augment.reorder_prob=0.2"],
    "best_ema_hidden128_dropout0.5": [
        *BEST_EMA,
        "model.hidden=128",
        "model.dropout=0.5",
    ],
    "best_ema_users_swap0.92": [
        *BEST_EMA,
        "model.user_embeddings=true",
        "train.augment.user_substitute_prob=0.92",
    ],
}


def run_variant(name: str, threads: int) -> dict:
    """Train one variant and rank the test targets (sampled and full)."""
    from pipelines.config import load_config
    from pipelines.evaluate import evaluate_scores, negatives_for
    from pipelines.model import Recommender
    from pipelines.sequences import load_split
    from pipelines.train import fit

    root = scratch_project("games", GAMES_SPLIT)
    overrides = [*games_overrides(), f"train.threads={threads}", *VARIANTS[name]]
    cfg = load_config(root / "params.yaml", overrides)
    data = load_split(root / cfg.paths.split_dir, cfg.model.time_buckets)
    t0 = time.perf_counter()
    result = fit(cfg, data, None, cache_dir=root / ".attnflow" / "cache")
    spec = result.encoder.spec
    report = evaluate_scores(
        Recommender(result.encoder).score,
        data,
        "test",
        [10],
        spec.config.max_len,
        spec.config.weight_buckets,
        spec.mask_token if spec.config.objective == "masked" else None,
        negatives=negatives_for(data, "test", cfg.evaluate.sampled_negatives, cfg.evaluate.seed),
    )
    return {
        "variant": name,
        "overrides": VARIANTS[name],
        "threads": threads,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        **({"refit_epochs": result.refit_epochs} if result.refit_epochs else {}),
        f"valid_sampled_{cfg.train.early_stop_metric}": round(result.best_metric, 4),
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "test_sampled": {k: round(v, 4) for k, v in report.sampled.items() if k.endswith("@10")},
        "test_full": {k: round(v, 4) for k, v in report.full.items() if k.endswith("@10")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="names from --list")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args()
    if args.list or not args.variants:
        for name, over in VARIANTS.items():
            print(f"{name}: {' '.join(over) or '(games_overrides only)'}")
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)} (see --list)")
    # train_model logs one line per epoch; a variant takes 15 to 45 minutes here
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = ROOT / "benchmarks" / "results" / "games_ablation.jsonl"
    for name in args.variants:
        line = run_variant(name, args.threads)
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line))


if __name__ == "__main__":
    main()
