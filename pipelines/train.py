"""Stage `train`: fit the attention-flow Transformer, resumably and reproducibly.

- Deterministic: every epoch draws its batch order, augmentations, negatives and
  dropout from seeds derived from (`train.seed`, epoch), so a run resumed from a
  checkpoint replays exactly what the uninterrupted run would have done.
- Checkpoints at every epoch end (and every `checkpoint_every_steps` steps) under
  `paths.checkpoints_dir/<fingerprint>/`, where the fingerprint hashes the data and the
  parameters: a restarted run with the same inputs resumes, a changed one starts over.
- Device: CUDA when present (bf16 autocast, optional torch.compile), CPU otherwise.
  Under `torchrun` each process trains on its shard of every epoch's batches with
  DistributedDataParallel (NCCL on GPUs, gloo on CPUs); rank 0 validates and saves.
- Robustness: sequence augmentation (crop, mask, reorder) and adversarial training
  (FGM on the item embeddings). Early stopping on validation NDCG@10.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import Config
from pipelines.evaluate import evaluate_scores, negatives_for
from pipelines.model import AttnFlowEncoder, ModelSpec, Recommender, contrastive_loss, softmax_loss
from pipelines.sequences import SplitData, data_sha256, length_bucketed_batches, train_batch

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    encoder: AttnFlowEncoder
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = float("-inf")
    epochs_run: int = 0
    train_seconds: float = 0.0
    # this process's CPU seconds (all its threads) over the same steps: against
    # `train_seconds`, it tells a slower CPU (more CPU per step) from waiting (less)
    train_cpu_seconds: float = 0.0
    sequences: int = 0
    resumed_from: dict[str, int] | None = None
    device: str = "cpu"
    world_size: int = 1
    refit_epochs: int = 0  # epochs of the refit on train + validation (0: none)

    @property
    def sequences_per_s(self) -> float:
        return self.sequences / self.train_seconds if self.train_seconds else 0.0


class StopTraining(Exception):
    """Raised by a hook to stop after a checkpoint (used to simulate a crash in tests)."""


# --- environment -----------------------------------------------------------------------------


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit
_TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Have glibc keep the memory training frees for the next step; True if it took.

    glibc returns large freed blocks to the kernel (mmap'd from 128 KB, a threshold
    that adapts to what was freed before, and the heap's top past a trim threshold).
    A training step frees its activations and gradients and allocates them again, so
    each step faulted fresh pages in. Fixed thresholds keep those blocks in the heap:
    on ml-latest-small, 20 epochs on 2 cores (`benchmarks/malloc_tuning.py`), 11x fewer
    page faults (0.17M against 1.9M), system time 0.7 s against 3.6 s, the SGD steps
    4.4 % faster. The process keeps its peak heap until it exits. A no-op (False)
    without glibc; `train.keep_freed_memory: false` leaves glibc's defaults.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter runs on
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS, Windows): nothing to tune
        return False
    # a C library that ignores mallopt answers 0: False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def select_device(preference: str) -> torch.device:
    """CUDA when asked for or available (`auto`), else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local}")
    return torch.device("cpu")


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def fingerprint(cfg: Config, data: SplitData) -> str:
    """Hash of what determines a run: model, train and evaluate params plus the data."""
    payload = {
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude={"checkpoint_every_steps", "threads"}),
        "data": data.meta,
        "n_train": len(data.train.items),
        "items_sum": int(data.train.items.sum()),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --- model construction ------------------------------------------------------------------------


def build_encoder(cfg: Config, data: SplitData, cache_dir: Path) -> AttnFlowEncoder:
    """A fresh encoder for this data (frozen text embeddings filled in when configured)."""
    spec = ModelSpec(
        model=cfg.model.model_dump(mode="json"),
        n_items=data.n_items,
        n_catalog=data.n_catalog,
        event_vocab=data.event_vocab,
        order_only=bool(data.meta.get("order_only")),
        has_text=cfg.model.text.mode != "none",
        n_users=data.train.n_users if cfg.model.user_embeddings else 0,
    )
    torch.manual_seed(cfg.train.seed)
    encoder = AttnFlowEncoder(spec)
    if spec.has_text:
        from pipelines.text import cached_text_embeddings

        texts = _catalog_texts(data)
        emb = cached_text_embeddings(
            texts, cache_dir, cfg.model.text.max_tokens, cfg.model.text.batch_size
        )
        with torch.no_grad():
            encoder.text_table[1 : data.n_catalog + 1] = emb
    return encoder


def _catalog_texts(data: SplitData) -> list[str]:
    items = data.items.sort_values("item_idx")
    texts = items["text"].fillna("").astype(str)
    fallback = items["title"].fillna("").astype(str)
    return [t if t.strip() else f for t, f in zip(texts, fallback, strict=True)]


class LoraText:
    """MiniLM with LoRA adapters, fine-tuned through the items of each batch."""

    def __init__(self, cfg: Config, data: SplitData, encoder: AttnFlowEncoder, device):
        from pipelines.text import lora_encoder, tokenize

        tcfg = cfg.model.text
        self.cfg = tcfg
        self.model, tokenizer = lora_encoder(tcfg.lora_r, tcfg.lora_alpha, tcfg.lora_dropout)
        self.model.to(device)
        tok = tokenize(tokenizer, _catalog_texts(data), tcfg.max_tokens)
        pad = torch.zeros(1, tcfg.max_tokens, dtype=torch.long)
        # row i holds item i's tokens (row 0: padding)
        self.ids = torch.cat([pad, tok["input_ids"], pad]).to(device)
        self.mask = torch.cat([pad, tok["attention_mask"], pad]).to(device)
        self.encoder = encoder
        self.steps = 0

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def table_for(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The text table with the rows of `items` re-encoded with gradients."""
        from pipelines.text import encode

        if self.steps % self.cfg.lora_refresh_steps == 0:
            self.refresh()
        self.steps += 1
        uniq = torch.unique(items)
        uniq = uniq[(uniq > 0) & (uniq <= self.encoder.spec.n_catalog)]
        if len(uniq) > self.cfg.lora_items_per_step:
            pick = torch.randperm(len(uniq), generator=generator)[: self.cfg.lora_items_per_step]
            uniq = uniq[pick.to(uniq.device)]
        self.model.train()
        fresh = encode(self.model, self.ids[uniq], self.mask[uniq], self.cfg.batch_size)
        table = self.encoder.text_table.detach().clone()
        table[uniq] = fresh.to(table.dtype)
        return table

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-encode every item's text with the current adapters."""
        from pipelines.text import encode

        self.model.eval()
        n = self.encoder.spec.n_catalog
        emb = encode(self.model, self.ids[1 : n + 1], self.mask[1 : n + 1], self.cfg.batch_size)
        self.encoder.text_table[1 : n + 1] = emb.to(self.encoder.text_table.dtype)


# --- checkpoints -------------------------------------------------------------------------------


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous checkpoint intact


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the loop ----------------------------------------------------------------------------------


def validate(
    encoder: AttnFlowEncoder,
    data: SplitData,
    cfg: Config,
    negatives: np.ndarray | None,
    users: np.ndarray | None,
) -> dict[str, float]:
    """Validation metrics (full ranking, and sampled when negatives are given)."""
    spec = encoder.spec
    was_training = encoder.training
    rec = Recommender(encoder)
    result = evaluate_scores(
        rec.score,
        data,
        "valid",
        [10],
        spec.config.max_len,
        spec.config.weight_buckets,
        spec.mask_token if spec.config.objective == "masked" else None,
        negatives=negatives,
        users=users,
        full=cfg.train.early_stop_protocol == "full" or negatives is None,
        candidate_fn=rec.score_items,
    )
    encoder.train(was_training)
    out = {f"valid_{k}": v for k, v in result.full.items() if k.endswith("@10")}
    out.update({f"valid_sampled_{k}": v for k, v in result.sampled.items() if k.endswith("@10")})
    return out


def train_model(
    cfg: Config,
    data: SplitData,
    checkpoint_dir: Path | None = None,
    cache_dir: Path = Path(".attnflow/cache"),
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    progress: bool = False,
    schedule: list[float] | None = None,
) -> TrainResult:
    """Train on `data` with `cfg`; resumes from `checkpoint_dir` when it holds a checkpoint.

    With `schedule` (one learning-rate scale an epoch), train exactly that many epochs
    without validating and return the last weights (their moving average with EMA).
    """
    tcfg, mcfg = cfg.train, cfg.model
    if tcfg.keep_freed_memory:
        keep_freed_memory()
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    rank, world = distributed()
    device = select_device(tcfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.use_deterministic_algorithms(True, warn_only=True)

    encoder = build_encoder(cfg, data, cache_dir).to(device)
    lora = LoraText(cfg, data, encoder, device) if mcfg.text.mode == "lora" else None
    # The weights that are validated, kept as best and exported: the encoder's own, or an
    # exponential moving average of them (smoother than the last step's weights).
    ema = copy_encoder(encoder) if tcfg.ema_decay > 0 else None
    scored = ema if ema is not None else encoder
    groups = [{"params": list(encoder.parameters()), "lr": tcfg.lr}]
    if lora is not None:
        groups.append({"params": lora.parameters(), "lr": mcfg.text.lora_lr})
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.98), weight_decay=tcfg.weight_decay)
    warmup = tcfg.warmup_steps
    # lr_scale[0]: what plateau decay has made of the learning rate (checkpointed)
    lr_scale = [1.0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (min(1.0, (step + 1) / warmup) if warmup else 1.0) * lr_scale[0],
    )
    model: torch.nn.Module = encoder
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile and device.type == "cuda":
        encoder.backbone = torch.compile(encoder.backbone, dynamic=True)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and tcfg.bf16
        else nullcontext()
    )

    neg_probs = (
        negative_distribution(data, tcfg.popularity_alpha)
        if tcfg.loss == "sampled" and tcfg.negative_sampling == "popularity"
        else None
    )
    lengths = data.train.lengths()
    min_len = 2 if mcfg.objective == "causal" else 1
    train_users = np.flatnonzero(lengths >= min_len)
    mask_token = encoder.spec.mask_token
    aug = tcfg.augment
    use_aug = any(
        p > 0 for p in (aug.crop_prob, aug.mask_prob, aug.substitute_prob, aug.reorder_prob)
    )
    negatives = None
    if tcfg.early_stop_protocol == "sampled":
        negatives = negatives_for(data, "valid", cfg.evaluate.sampled_negatives, cfg.evaluate.seed)
    eval_users = None
    if tcfg.eval_users and tcfg.eval_users < data.train.n_users:
        eval_users = np.sort(
            np.random.default_rng(tcfg.seed).choice(
                data.train.n_users, tcfg.eval_users, replace=False
            )
        )
    metric_key = (
        f"valid_{'sampled_' if tcfg.early_stop_protocol == 'sampled' else ''}"
        f"{tcfg.early_stop_metric}"
    )

    result = TrainResult(encoder=encoder, device=str(device), world_size=world)
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    start_epoch, start_step = 0, 0
    ckpt_path = checkpoint_dir / "last.pt" if checkpoint_dir else None
    saved = _load_checkpoint(ckpt_path) if ckpt_path else None
    resume_rng: dict[str, Any] | None = None
    if saved is not None:
        encoder.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if lora is not None and "lora" in saved:
            lora.model.load_state_dict(saved["lora"], strict=False)
            lora.steps = saved["lora_steps"]
        start_epoch, start_step = saved["epoch"], saved["step"]
        result.epochs_run = start_epoch
        result.history = saved["history"]
        result.best_epoch, result.best_metric = saved["best_epoch"], saved["best_metric"]
        result.train_seconds, result.sequences = saved["train_seconds"], saved["sequences"]
        result.train_cpu_seconds = saved.get("train_cpu_seconds", 0.0)
        bad_epochs = saved["bad_epochs"]
        lr_scale[0] = saved.get("lr_scale", 1.0)
        best_state = saved.get("best_model")
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        resume_rng = saved.get("rng") if start_step else None
        result.resumed_from = {"epoch": start_epoch, "step": start_step}
        log.info("resuming from %s at epoch %d step %d", ckpt_path, start_epoch, start_step)

    def checkpoint(epoch: int, step: int, rng_state: dict[str, Any] | None) -> None:
        if rank != 0 or ckpt_path is None:
            return
        state = {
            "model": encoder.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_metric": result.best_metric,
            "bad_epochs": bad_epochs,
            "lr_scale": lr_scale[0],
            "train_seconds": result.train_seconds,
            "train_cpu_seconds": result.train_cpu_seconds,
            "sequences": result.sequences,
        }
        if best_state is not None:
            state["best_model"] = best_state
        if ema is not None:
            state["ema"] = ema.state_dict()
        if rng_state is not None:
            state["rng"] = rng_state
        if lora is not None:
            state["lora"] = {k: v for k, v in lora.model.state_dict().items() if "lora_" in k}
            state["lora_steps"] = lora.steps
        _save_checkpoint(ckpt_path, state)

    n_epochs = len(schedule) if schedule is not None else tcfg.epochs
    # a run resumed after its last epoch's checkpoint stops there, as it would have
    stop = schedule is None and bad_epochs >= tcfg.patience
    for epoch in range(start_epoch, n_epochs):
        if stop:
            break
        if schedule is not None:  # replay: the scale the measured run trained this epoch at
            lr_scale[0] = schedule[epoch]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        order_rng = np.random.default_rng([tcfg.seed, epoch])
        batches = length_bucketed_batches(lengths, tcfg.batch_size, order_rng, users=train_users)
        per_rank = len(batches) // world
        batches = batches[rank::world][:per_rank] if world > 1 else batches
        aug_rng = np.random.default_rng([tcfg.seed, epoch, 1])
        neg_gen = torch.Generator().manual_seed(tcfg.seed * 100_003 + epoch)
        torch.manual_seed(tcfg.seed * 7_919 + epoch + 1_000_003 * rank)
        first = 0
        if resume_rng is not None and epoch == start_epoch:
            aug_rng.bit_generator.state = resume_rng["aug"]
            neg_gen.set_state(resume_rng["neg"])
            torch.set_rng_state(resume_rng["torch"])
            first = start_step
        model.train()
        losses: list[float] = list(resume_rng["losses"]) if first else []
        t0, c0 = time.perf_counter(), time.process_time()
        steps = range(first, len(batches))
        if progress and rank == 0:
            from tqdm import tqdm

            steps = tqdm(
                steps,
                desc=f"epoch {epoch + 1}/{n_epochs}",
                leave=False,
                total=len(batches),
                initial=first,
            )
        for step in steps:
            users = batches[step]
            batch = train_batch(
                data.train,
                users,
                mcfg.max_len,
                mcfg.weight_buckets,
                mcfg.objective,
                mask_token,
                aug_rng,
                aug if use_aug else None,
                mcfg.mask_prob,
                tcfg.random_windows,
                data.n_items,
                aug.user_substitute_prob,
            ).to(device)
            text_table = (
                lora.table_for(torch.cat([batch.items.flatten(), batch.targets.flatten()]), neg_gen)
                if lora is not None
                else None
            )
            with autocast:
                loss = _loss(model, encoder, batch, tcfg, neg_gen, text_table, neg_probs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.adversarial_eps > 0:
                _fgm_step(model, encoder, batch, tcfg, neg_gen, text_table, autocast, neg_probs)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                _ema_update(ema, encoder, tcfg.ema_decay)
            losses.append(float(loss.detach()))
            result.sequences += len(users) * world
            done = step + 1
            if (
                tcfg.checkpoint_every_steps
                and done % tcfg.checkpoint_every_steps == 0
                and done < len(batches)
            ):
                result.train_seconds += time.perf_counter() - t0
                result.train_cpu_seconds += time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                checkpoint(
                    epoch,
                    done,
                    {
                        "aug": aug_rng.bit_generator.state,
                        "neg": neg_gen.get_state(),
                        "torch": torch.get_rng_state(),
                        "losses": losses,
                    },
                )
            if on_step is not None:
                on_step(epoch, done)
        result.train_seconds += time.perf_counter() - t0
        result.train_cpu_seconds += time.process_time() - c0
        if lora is not None:
            lora.refresh()
        row: dict[str, float] = {"epoch": epoch + 1, "loss": float(np.mean(losses or [0.0]))}
        if schedule is None and ((epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == n_epochs):
            decay = False
            if rank == 0:
                if ema is not None:
                    _follow_buffers(ema, encoder)
                row.update(validate(scored, data, cfg, negatives, eval_users))
                score = row[metric_key]
                if score > result.best_metric:
                    result.best_metric, result.best_epoch = score, epoch + 1
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in scored.state_dict().items()
                    }
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                    decay = tcfg.lr_decay_factor < 1 and bad_epochs % tcfg.lr_decay_patience == 0
                stop = bad_epochs >= tcfg.patience
            stop = _broadcast(stop, world)
            if _broadcast(decay, world):  # a plateau: continue with a smaller step
                lr_scale[0] *= tcfg.lr_decay_factor
                for group in optimizer.param_groups:
                    group["lr"] *= tcfg.lr_decay_factor
                log.info("validation plateau: learning rate x%.3g", lr_scale[0])
        row["lr_scale"] = lr_scale[0]
        row["seconds"] = round(result.train_seconds, 3)
        result.history.append(row)
        result.epochs_run = epoch + 1
        checkpoint(epoch + 1, 0, None)
        if on_epoch is not None and rank == 0:
            on_epoch(epoch + 1, row)
        log.info(
            "epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items() if k != "epoch"}
        )
    if schedule is not None and ema is not None:
        _follow_buffers(ema, encoder)
        encoder.load_state_dict(ema.state_dict())
    elif best_state is not None:
        encoder.load_state_dict(best_state)
    result.encoder = encoder
    return result


def refit_data(data: SplitData) -> SplitData:
    """`data` with each user's validation event moved into training (the test stays out)."""
    return replace(data, train=data.history_test, history_valid=data.history_test)


def refit_schedule(result: TrainResult) -> list[float]:
    """The learning-rate scale each epoch up to the best one trained at in `result`."""
    # a history row's lr_scale is set after that epoch's validation: it is the next
    # epoch's scale
    scales = [1.0] + [row.get("lr_scale", 1.0) for row in result.history]
    return scales[: max(result.best_epoch, 1)]


def fit(
    cfg: Config,
    data: SplitData,
    checkpoint_dir: Path | None = None,
    cache_dir: Path = Path(".attnflow/cache"),
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """`train_model`, then with `train.refit_with_valid` the refit on train + validation.

    The result keeps the measured run's history, best epoch and validation score (the
    refit cannot be validated: its training holds the validation events) with the
    refit's weights; seconds and sequences count both trainings.
    """
    result = train_model(cfg, data, checkpoint_dir, cache_dir, on_epoch, progress=progress)
    if not cfg.train.refit_with_valid:
        return result
    schedule = refit_schedule(result)
    log.info("refit on train + validation events: %d epochs", len(schedule))
    refit = train_model(
        cfg,
        refit_data(data),
        checkpoint_dir / "refit" if checkpoint_dir else None,
        cache_dir,
        progress=progress,
        schedule=schedule,
    )
    result.encoder = refit.encoder
    result.train_seconds += refit.train_seconds
    result.train_cpu_seconds += refit.train_cpu_seconds
    result.sequences += refit.sequences
    result.refit_epochs = refit.epochs_run
    return result


@torch.no_grad()
def _ema_update(ema: AttnFlowEncoder, encoder: AttnFlowEncoder, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * encoder, parameter by parameter."""
    for avg, param in zip(ema.parameters(), encoder.parameters(), strict=True):
        avg.lerp_(param, 1.0 - decay)


@torch.no_grad()
def _follow_buffers(ema: AttnFlowEncoder, encoder: AttnFlowEncoder) -> None:
    """Buffers are not averaged: the average takes the live ones (LoRA's refreshed text table)."""
    for avg, live in zip(ema.buffers(), encoder.buffers(), strict=True):
        avg.copy_(live)


def _loss(model, encoder, batch, tcfg, gen, text_table, neg_probs=None) -> torch.Tensor:
    # Through the DDP wrapper when there is one, so that gradients are all-reduced.
    runner = encoder if model is encoder else _DDPEncoderView(model, encoder)
    hidden, cl = None, 0.0
    if tcfg.contrastive_weight > 0:
        # one forward over both views (DDP syncs one forward per backward)
        both, _ = runner(batch.twice(), text_table)  # (2B, L, d)
        n = batch.items.shape[0]
        hidden = both[:n]
        rows = torch.arange(n, device=both.device)
        last = batch.lengths - 1  # (B,) each sequence's prediction point
        cl = tcfg.contrastive_weight * contrastive_loss(
            hidden[rows, last], both[n:][rows, last], tcfg.contrastive_temperature
        )
    rec = softmax_loss(
        runner,
        batch,
        tcfg.loss,
        tcfg.negatives,
        tcfg.weight_loss,
        gen,
        text_table,
        neg_probs,
        tcfg.logq_correction,
        hidden=hidden,
        label_smoothing=tcfg.label_smoothing,
        per_target=tcfg.negatives_per == "target",
        chunk_mb=tcfg.loss_chunk_mb,
    )
    return rec + cl


def negative_distribution(data: SplitData, alpha: float) -> torch.Tensor:
    """(n_items + 1,) sampling probabilities: training frequency ** alpha (index 0 never)."""
    counts = np.bincount(data.train.items, minlength=data.n_items + 1)[: data.n_items + 1]
    probs = (counts.astype(np.float64) + 1.0) ** alpha
    probs[0] = 0.0
    return torch.from_numpy(probs / probs.sum()).float()


class _DDPEncoderView:
    """Calls the encoder through DDP's forward (for gradient sync), exposes its other parts."""

    def __init__(self, ddp, encoder: AttnFlowEncoder):
        self._ddp = ddp
        self._encoder = encoder
        self.spec = encoder.spec

    def __call__(self, batch, text_table=None, output_attentions=False):
        return self._ddp(batch, text_table, output_attentions)

    def item_vectors(self, idx=None, text_table=None):
        return self._encoder.item_vectors(idx, text_table)

    def bias(self, idx=None):
        return self._encoder.bias(idx)


def _fgm_step(model, encoder, batch, tcfg, gen, text_table, autocast, neg_probs=None) -> None:
    """FGM: perturb the item embeddings along their gradient, add the adversarial loss."""
    emb = encoder.item_emb.weight
    if emb.grad is None:
        return
    norm = emb.grad.norm()
    if not torch.isfinite(norm) or norm == 0:
        return
    r = tcfg.adversarial_eps * emb.grad / norm
    with torch.no_grad():
        emb.add_(r)
    with autocast:
        adv = _loss(model, encoder, batch, tcfg, gen, text_table, neg_probs)
    adv.backward()
    with torch.no_grad():
        emb.sub_(r)


def _broadcast(flag: bool, world: int) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    obj = [flag]
    dist.broadcast_object_list(obj, src=0)
    return bool(obj[0])


def copy_encoder(encoder: AttnFlowEncoder) -> AttnFlowEncoder:
    """A detached copy (for exporting while training continues)."""
    return copy.deepcopy(encoder)


# --- the stage -----------------------------------------------------------------------------------


def lineage_for(cfg: Config, root: Path, data: SplitData) -> dict[str, Any]:
    """Where a model comes from: code, data version, parameters."""
    from pipelines.tracking import git_commit
    from pipelines.versioning import data_hash

    commit, dirty = git_commit(root)
    counts = np.bincount(data.train.items, minlength=data.n_items + 1)[1 : data.n_items + 1]
    ids = data.items.sort_values("item_idx")["item_id"].tolist()
    popular = [ids[i] for i in np.argsort(-counts, kind="stable")[:100]]
    profile = None
    ingested = root / cfg.paths.ingested_dir / "events.parquet"
    if ingested.exists():  # what the drift check compares newer data versions against
        import pandas as pd

        from pipelines.expectations import profile_events

        profile = profile_events(pd.read_parquet(ingested), cfg.validate_.drift.top_items)
    return {
        "data_profile": profile,
        "git_commit": commit,
        "git_dirty": dirty,
        "dvc_data_hash": data_hash(root, str(cfg.paths.split_dir)),
        "data_sha256": data_sha256(root / cfg.paths.split_dir),
        "dataset": cfg.ingest.dataset,
        "params": cfg.model_dump(mode="json", by_alias=True),
        "popular_items": popular,
    }


def export_model(
    encoder: AttnFlowEncoder, data: SplitData, folder: Path, lineage: dict[str, Any]
) -> Path:
    """Save the model with what serving needs: item ids, user ids, each user's history."""
    from pipelines.model import save_model

    items = data.items.sort_values("item_idx")
    ids = ["", *items["item_id"].astype(str).tolist()]
    titles = ["", *items["title"].fillna("").astype(str).tolist()]
    full = data.full
    arrays = {
        "hist_items": full.items.astype(np.int32),
        "hist_gaps": full.gaps.astype(np.int16),
        "hist_events": full.events.astype(np.int16),
        "hist_weights": full.weights,
        "hist_offsets": full.offsets.astype(np.int64),
    }
    extra = {
        "items": {"ids": ids, "titles": titles},
        "users": data.users.sort_values("user_idx")["user_id"].astype(str).tolist(),
        "lineage": lineage,
    }
    return save_model(encoder, folder, extra=extra, arrays=arrays)


def run(
    cfg: Config, root: Path = Path("."), progress: bool = False, defer_artifacts: bool = False
) -> dict[str, Any]:
    """The DVC stage: train, export `models/attnflow`, track the run in MLflow.

    `defer_artifacts`: leave the curves plot to `tracking.log_deferred_artifacts`.
    """
    import sys

    from pipelines.errors import DataError
    from pipelines.events import write_json
    from pipelines.sequences import load_split
    from pipelines.tracking import EpochLog, log_trained_model, start_training_run

    split_dir = root / cfg.paths.split_dir
    if not (split_dir / "meta.json").exists():
        raise DataError(f"{split_dir} has no split: run `attnflow split` first")
    data = load_split(split_dir, cfg.model.time_buckets)
    rank = int(os.environ.get("RANK", "0"))
    ckpt_dir = root / cfg.paths.checkpoints_dir / fingerprint(cfg, data)
    lineage = lineage_for(cfg, root, data)
    run_id = None
    if rank == 0:
        run_file = ckpt_dir / "mlflow_run.json"
        if run_file.exists():  # a resumed training continues its MLflow run
            run_id = json.loads(run_file.read_text())["run_id"]
        else:
            run_id = start_training_run(cfg, root, lineage)
            run_file.parent.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps({"run_id": run_id}))
    epochs = EpochLog(root, run_id) if run_id else None
    result = fit(
        cfg,
        data,
        ckpt_dir,
        cache_dir=root / ".attnflow" / "cache",
        on_epoch=epochs,
        progress=progress and sys.stderr.isatty(),
    )
    if epochs is not None:
        epochs.wait()
    summary = {
        "dataset": cfg.ingest.dataset,
        "mlflow_run_id": run_id,
        "best_epoch": result.best_epoch,
        "best_metric": round(result.best_metric, 6),
        "early_stop_metric": cfg.train.early_stop_metric,
        "epochs_run": result.epochs_run,
        "refit_epochs": result.refit_epochs,
        "train_seconds": round(result.train_seconds, 2),
        "train_cpu_seconds": round(result.train_cpu_seconds, 2),
        "sequences_per_s": round(result.sequences_per_s, 1),
        "device": result.device,
        "world_size": result.world_size,
        "resumed_from": result.resumed_from,
    }
    if rank != 0:
        return summary
    lineage["mlflow_run_id"] = run_id
    lineage["train"] = summary
    model_dir = root / cfg.paths.model_dir
    export_model(result.encoder, data, model_dir, lineage)
    summary["model_uri"] = log_trained_model(
        root, run_id, model_dir, result.history, summary, curves=not defer_artifacts
    )
    reports = root / cfg.paths.reports_dir
    write_json(summary, reports / "train.json")
    _write_curve(result.history, reports / "train_curve.csv")
    import shutil

    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: nothing left to resume
    return summary


def _write_curve(history: list[dict[str, float]], path: Path) -> None:
    import pandas as pd

    from pipelines.events import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
