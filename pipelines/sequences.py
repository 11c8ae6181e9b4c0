"""Model inputs: per-user sequences from the split, batching and augmentation.

Sequences are kept flat (CSR: one array per feature plus user offsets), so a
million events cost a few arrays, not a million Python lists. A batch is right
padded to its longest sequence (not to `max_len`): with length-bucketed batches
that skips most of the padding a fixed-length batch would compute.

Features per event (index 0 is always padding):
    item      item index (1..n_catalog; n_catalog + 1 is the mask token)
    gap       bucket of log2(1 + seconds since the previous event), 1..time_buckets
    event     event-type id, 1..len(event_vocab)
    weight    bucket of the attention weight, 1..weight_buckets
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipelines.config import AugmentConfig

# Attention weights are bucketed on these upper edges (bucket i+1 holds w <= edge i).
WEIGHT_EDGES = np.array([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0])


@dataclass
class Sequences:
    """Flat per-user sequences: features concatenated, user u at offsets[u]:offsets[u+1]."""

    items: np.ndarray  # (N,) int64
    gaps: np.ndarray  # (N,) int64
    events: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) float32, raw attention weights (for loss weighting)
    offsets: np.ndarray  # (n_users + 1,) int64

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))


@dataclass
class SplitData:
    """What training and evaluation need from `data/split`."""

    train: Sequences  # train events per user
    valid_items: np.ndarray  # (n_users,) validation target per user
    test_items: np.ndarray  # (n_users,) test target per user
    history_valid: Sequences  # the history a validation prediction sees (= train)
    history_test: Sequences  # the history a test prediction sees (train + valid)
    full: Sequences  # every event (train + valid + test): what serving starts from
    n_items: int  # known items: 1..n_items
    n_catalog: int  # all items with text: 1..n_catalog (cold items after the known)
    event_vocab: list[str]
    items: pd.DataFrame  # item_idx, item_id, title, genres, text, n_events
    users: pd.DataFrame  # user_idx, user_id
    meta: dict

    def learned(self, refit_with_valid: bool) -> Sequences:
        """The events a model learns from: train, plus each user's validation event after
        a refit (`train.refit_with_valid`); baselines and cold segments count the same."""
        return self.history_test if refit_with_valid else self.train


def gap_buckets(ts_seconds: np.ndarray, starts: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of the time since the previous event of the same user (first event: 1)."""
    gaps = np.diff(ts_seconds, prepend=ts_seconds[:1])
    gaps[starts] = 0
    b = np.floor(np.log2(1.0 + np.clip(gaps, 0, None))).astype(np.int64) + 1
    return np.clip(b, 1, n_buckets)


def weight_buckets(weights: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of each attention weight, 1..n_buckets."""
    return np.clip(np.searchsorted(WEIGHT_EDGES, weights) + 1, 1, n_buckets)


def _to_sequences(
    df: pd.DataFrame, n_users: int, event_ids: dict[str, int], time_buckets: int
) -> Sequences:
    df = df.sort_values(["user_idx", "pos"], kind="stable")
    counts = np.bincount(df["user_idx"].to_numpy(), minlength=n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ts = df["ts"].astype("int64").to_numpy() / 1e6  # microseconds -> seconds
    starts = offsets[:-1][counts > 0]
    return Sequences(
        items=df["item_idx"].to_numpy(np.int64),
        gaps=gap_buckets(ts, starts, time_buckets),
        events=df["event"].map(event_ids).fillna(0).to_numpy(np.int64),
        weights=df["weight"].to_numpy(np.float32),
        offsets=offsets,
    )


def data_sha256(split_dir: Path) -> str:
    """Content hash of the split files (the data version, independent of DVC)."""
    h = hashlib.sha256()
    for path in sorted(Path(split_dir).iterdir()):
        if path.is_file():
            h.update(path.name.encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def load_split(split_dir: Path, time_buckets: int = 24) -> SplitData:
    """Read `data/split` into flat sequences for training and evaluation."""
    split_dir = Path(split_dir)
    train = pd.read_parquet(split_dir / "train.parquet")
    valid = pd.read_parquet(split_dir / "valid.parquet")
    test = pd.read_parquet(split_dir / "test.parquet")
    users = pd.read_parquet(split_dir / "users.parquet")
    items = pd.read_parquet(split_dir / "items.parquet")
    meta = json.loads((split_dir / "meta.json").read_text(encoding="utf-8"))
    n_users = len(users)
    event_vocab = sorted(set(train["event"]) | set(valid["event"]) | set(test["event"]))
    event_ids = {e: i + 1 for i, e in enumerate(event_vocab)}
    train_seq = _to_sequences(train, n_users, event_ids, time_buckets)
    hist_test = _to_sequences(pd.concat([train, valid]), n_users, event_ids, time_buckets)
    full = _to_sequences(pd.concat([train, valid, test]), n_users, event_ids, time_buckets)
    return SplitData(
        train=train_seq,
        valid_items=valid.sort_values("user_idx")["item_idx"].to_numpy(np.int64),
        test_items=test.sort_values("user_idx")["item_idx"].to_numpy(np.int64),
        history_valid=train_seq,
        history_test=hist_test,
        full=full,
        n_items=int(meta["n_items"]),
        n_catalog=int(meta["n_catalog_items"]),
        event_vocab=event_vocab,
        items=items,
        users=users,
        meta=meta,
    )


def length_bucketed_batches(
    lengths: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    users: np.ndarray | None = None,
    pool: int = 50,
) -> list[np.ndarray]:
    """Shuffled batches of users with similar lengths (less padding, still random).

    Users are shuffled, cut into pools of `pool` batches, sorted by length within a
    pool, cut into batches, and the batches shuffled.
    """
    users = np.arange(len(lengths)) if users is None else users
    order = rng.permutation(users)
    batches: list[np.ndarray] = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    """Right-padded model inputs, all (B, L) int64 except `target_weights` (float32)."""

    items: torch.Tensor
    gaps: torch.Tensor
    events: torch.Tensor
    weights: torch.Tensor  # bucketed attention weight
    lengths: torch.Tensor  # (B,)
    targets: torch.Tensor | None = None  # next (causal) or masked-out (masked) item; 0: none
    target_weights: torch.Tensor | None = None
    users: torch.Tensor | None = None  # (B,) user index + 1 for user embeddings; 0: unknown

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return Batch(**moved)

    def twice(self) -> Batch:
        """The batch stacked on itself: (2B, L), rows B.. repeat rows ..B (two views)."""
        doubled = {
            k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return Batch(**doubled)


def _pad(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=rows[0].dtype if rows else np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def history_batch(
    seqs: Sequences,
    users: np.ndarray,
    max_len: int,
    weight_buckets_n: int,
    append_mask: int | None = None,
    weights_bucketed: bool = False,
    user_rows: np.ndarray | None = None,
) -> Batch:
    """The last `max_len` events of each user's history (for scoring the next item).

    With `append_mask` (the mask token), a masked slot is appended after the history:
    the masked objective predicts the item at that slot. `weights_bucketed` says the
    sequences already hold weight buckets rather than raw attention weights.
    `user_rows` (B,) are the rows of the model's user table (index + 1, 0: unknown);
    by default `seqs` is indexed like the model's users, so row = user + 1.
    """
    keep = max_len - 1 if append_mask is not None else max_len
    cols: dict[str, list[np.ndarray]] = {"items": [], "gaps": [], "events": [], "weights": []}
    for u in users:
        sl = seqs.user(int(u))
        start = max(sl.start, sl.stop - keep)
        part = slice(start, sl.stop)
        items = seqs.items[part]
        gaps, events = seqs.gaps[part], seqs.events[part]
        wts = (
            np.clip(seqs.weights[part], 0, weight_buckets_n).astype(np.int64)
            if weights_bucketed
            else weight_buckets(seqs.weights[part], weight_buckets_n)
        )
        if append_mask is not None:
            items = np.append(items, append_mask)
            gaps, events, wts = np.append(gaps, 0), np.append(events, 0), np.append(wts, 0)
        cols["items"].append(items)
        cols["gaps"].append(gaps)
        cols["events"].append(events)
        cols["weights"].append(wts)
    lengths = np.array([len(x) for x in cols["items"]], dtype=np.int64)
    width = max(1, int(lengths.max(initial=1)))
    return Batch(
        items=torch.from_numpy(_pad(cols["items"], width)),
        gaps=torch.from_numpy(_pad(cols["gaps"], width)),
        events=torch.from_numpy(_pad(cols["events"], width)),
        weights=torch.from_numpy(_pad(cols["weights"], width)),
        lengths=torch.from_numpy(lengths),
        users=torch.from_numpy(
            np.asarray(users, dtype=np.int64) + 1
            if user_rows is None
            else np.asarray(user_rows, dtype=np.int64)
        ),
    )


def _augment(
    idx: np.ndarray,
    aug: AugmentConfig,
    rng: np.random.Generator,
    mask_token: int,
    items: np.ndarray,
    n_items: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop and reorder the positions `idx`; returns (positions, input items after masking).

    Masking replaces an input by the mask token; substitution (SSE, Wu et al. 2019)
    by a uniformly drawn item, which regularises the item table itself.
    """
    n = len(idx)
    if aug.crop_prob and n > 3 and rng.random() < aug.crop_prob:
        keep = max(3, int(np.ceil(n * rng.uniform(aug.crop_min_ratio, 1.0))))
        start = int(rng.integers(0, n - keep + 1))
        idx = idx[start : start + keep]
        n = len(idx)
    if aug.reorder_prob and n > 3 and rng.random() < aug.reorder_prob:
        span = max(2, int(n * aug.reorder_ratio))
        start = int(rng.integers(0, n - span + 1))
        idx = idx.copy()
        idx[start : start + span] = rng.permutation(idx[start : start + span])
    inputs = items[idx].copy()
    if aug.mask_prob:
        hit = rng.random(len(inputs)) < aug.mask_prob
        hit[-1] = False  # the last input predicts the target: keep it
        inputs[hit] = mask_token
    if aug.substitute_prob and n_items:
        hit = (rng.random(len(inputs)) < aug.substitute_prob) & (inputs != mask_token)
        hit[-1] = False
        inputs[hit] = rng.integers(1, n_items + 1, int(hit.sum()))
    return idx, inputs


def train_batch(
    seqs: Sequences,
    users: np.ndarray,
    max_len: int,
    weight_buckets_n: int,
    objective: str,
    mask_token: int,
    rng: np.random.Generator,
    aug: AugmentConfig | None = None,
    mask_prob: float = 0.2,
    random_windows: bool = False,
    n_items: int | None = None,
    user_substitute_prob: float = 0.0,
) -> Batch:
    """Training inputs and targets for `users`.

    causal: inputs seq[:-1], targets seq[1:] (every position predicts the next item).
    masked: a random `mask_prob` of positions (at least one, and the last with
    probability one half) replaced by the mask token; targets only at masked positions.
    With `random_windows`, a sequence longer than the window contributes a random
    window of itself rather than its latest one. With `user_substitute_prob`, a
    sequence's user is swapped for a random one (SSE-PT's regulariser of user vectors).
    """
    if n_items is None and aug is not None and aug.substitute_prob:  # substitution draws 1..n
        n_items = int(seqs.items.max(initial=1))
    rows: dict[str, list[np.ndarray]] = {
        k: [] for k in ("items", "gaps", "events", "weights", "targets", "tw")
    }
    for u in users:
        sl = seqs.user(int(u))
        window = max_len + 1 if objective == "causal" else max_len
        stop = sl.stop
        if random_windows and sl.stop - sl.start > window:
            stop = int(rng.integers(sl.start + window, sl.stop + 1))
        idx = np.arange(max(sl.start, stop - window), stop)
        inputs = seqs.items[idx]
        if aug is not None:
            idx, inputs = _augment(idx, aug, rng, mask_token, seqs.items, n_items)
        if objective == "causal":
            src, tgt = idx[:-1], idx[1:]
            inp = inputs[:-1]
            targets = seqs.items[tgt]
            tw = seqs.weights[tgt]
        else:
            src = idx
            inp = inputs.copy()
            hit = rng.random(len(src)) < mask_prob
            if rng.random() < 0.5:
                hit[-1] = True
            if not hit.any():
                hit[int(rng.integers(0, len(src)))] = True
            targets = np.where(hit, seqs.items[src], 0)
            tw = np.where(hit, seqs.weights[src], 0.0).astype(np.float32)
            inp[hit] = mask_token
        masked_slot = inp == mask_token
        rows["items"].append(inp)
        rows["gaps"].append(np.where(masked_slot, 0, seqs.gaps[src]))
        rows["events"].append(np.where(masked_slot, 0, seqs.events[src]))
        rows["weights"].append(
            np.where(masked_slot, 0, weight_buckets(seqs.weights[src], weight_buckets_n))
        )
        rows["targets"].append(targets)
        rows["tw"].append(tw.astype(np.float32))
    lengths = np.array([len(x) for x in rows["items"]], dtype=np.int64)
    width = max(1, int(lengths.max(initial=1)))
    return Batch(
        items=torch.from_numpy(_pad(rows["items"], width)),
        gaps=torch.from_numpy(_pad(rows["gaps"], width)),
        events=torch.from_numpy(_pad(rows["events"], width)),
        weights=torch.from_numpy(_pad(rows["weights"], width)),
        lengths=torch.from_numpy(lengths),
        targets=torch.from_numpy(_pad(rows["targets"], width)),
        target_weights=torch.from_numpy(_pad(rows["tw"], width)),
        users=torch.from_numpy(_user_rows(users, seqs.n_users, user_substitute_prob, rng)),
    )


def _user_rows(
    users: np.ndarray, n_users: int, substitute_prob: float, rng: np.random.Generator
) -> np.ndarray:
    """(B,) user-table rows (index + 1), each swapped for a random user with the given odds."""
    rows = np.asarray(users, dtype=np.int64) + 1
    if substitute_prob:
        swap = rng.random(len(rows)) < substitute_prob
        rows[swap] = rng.integers(1, n_users + 1, int(swap.sum()))
    return rows
