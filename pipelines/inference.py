"""A trained model ready to answer requests in raw ids: the one inference API.

`ServedModel` is what the MLflow pyfunc and the BentoML service both wrap. It
holds the encoder, the item vocabulary, and each known user's latest history (saved
with the model), and answers:

    recommend(user_id=... | history=[...], k, exclude_seen, explain)
    similar(item_id, k)

Raw ids in, raw ids out; unknown history items are ignored and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import UnknownUser
from pipelines.model import AttnFlowEncoder, Recommender, load_arrays, load_extra, load_model
from pipelines.sequences import Batch, Sequences, history_batch


@dataclass
class Recommendation:
    """One answer: items with scores, ignored inputs, and optionally an explanation."""

    items: list[str]
    scores: list[float]
    unknown_items: list[str] = field(default_factory=list)
    explanation: list[dict[str, Any]] | None = None


class ServedModel:
    """An attnflow model loaded from its folder, answering in raw ids."""

    def __init__(
        self,
        encoder: AttnFlowEncoder,
        item_ids: list[str],
        titles: list[str],
        user_ids: list[str],
        histories: Sequences,
        lineage: dict[str, Any],
    ):
        self.encoder = encoder.eval()
        self.spec = encoder.spec
        self.cfg = self.spec.config
        self.recommender = Recommender(encoder)
        self.item_ids = item_ids  # position i holds the raw id of item index i (0: padding)
        self.titles = titles
        self.item_index = {iid: i for i, iid in enumerate(item_ids) if i > 0}
        self.user_index = {uid: u for u, uid in enumerate(user_ids)}
        self.histories = histories
        self.lineage = lineage

    @classmethod
    def load(cls, folder: Path | str, device: str = "cpu") -> ServedModel:
        """Load a model folder written by the train stage (verified, never unpickled)."""
        folder = Path(folder)
        encoder = load_model(folder, device)
        items = load_extra(folder, "items")
        users = load_extra(folder, "users")
        arrays = load_arrays(folder)
        histories = Sequences(
            items=arrays["hist_items"].astype(np.int64),
            gaps=arrays["hist_gaps"].astype(np.int64),
            events=arrays["hist_events"].astype(np.int64),
            weights=arrays["hist_weights"].astype(np.float32),
            offsets=arrays["hist_offsets"].astype(np.int64),
        )
        lineage = load_extra(folder, "lineage") if (folder / "lineage.json").exists() else {}
        return cls(encoder, items["ids"], items["titles"], users, histories, lineage)

    @property
    def mask_token(self) -> int | None:
        return self.spec.mask_token if self.cfg.objective == "masked" else None

    def _batch_for_user(self, user_id: str) -> Batch:
        u = self.user_index.get(str(user_id))
        if u is None:
            raise UnknownUser(str(user_id))
        return history_batch(
            self.histories,
            np.array([u]),
            self.cfg.max_len,
            self.cfg.weight_buckets,
            self.mask_token,
        )

    def _batch_for_history(self, history: list[str]) -> tuple[Batch, list[str]]:
        known = [self.item_index[str(i)] for i in history if str(i) in self.item_index]
        unknown = [str(i) for i in history if str(i) not in self.item_index]
        items = np.array(
            known[-(self.cfg.max_len - (self.mask_token is not None)) :] or [], dtype=np.int64
        )
        n = len(items)
        seqs = Sequences(
            items=items,
            gaps=np.ones(n, np.int64),
            events=np.zeros(n, np.int64),
            weights=np.ones(n, np.float32),
            offsets=np.array([0, n]),
        )
        batch = history_batch(
            seqs,
            np.array([0]),
            self.cfg.max_len,
            self.cfg.weight_buckets,
            self.mask_token,
            user_rows=np.array([0]),  # an explicit history belongs to no known user
        )
        return batch, unknown

    def recommend(
        self,
        user_id: str | None = None,
        history: list[str] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        explain: bool = False,
    ) -> Recommendation:
        """Top-k items for a known user (their saved history) or for an explicit history.

        Raises `UnknownUser` for a user id the model does not know. An empty history
        (or one of only unknown items) gets the most-attended items the model knows.
        """
        unknown: list[str] = []
        if history is not None:
            batch, unknown = self._batch_for_history(history)
        else:
            batch = self._batch_for_user(str(user_id))
        if int(batch.lengths[0]) - (self.mask_token is not None) <= 0:
            return self._popular(k, unknown)
        idx, scores = self.recommender.recommend(batch, k=k, exclude_seen=exclude_seen)
        rec = Recommendation(
            items=[self.item_ids[i] for i in idx[0].tolist()],
            scores=[round(float(s), 6) for s in scores[0].tolist()],
            unknown_items=unknown,
        )
        if explain:
            rec.explanation = self._explain(batch)
        return rec

    def _popular(self, k: int, unknown: list[str]) -> Recommendation:
        popular = self.lineage.get("popular_items") or self.item_ids[1 : k + 1]
        return Recommendation(
            items=list(popular[:k]), scores=[0.0] * min(k, len(popular)), unknown_items=unknown
        )

    def _explain(self, batch: Batch, top: int = 5) -> list[dict[str, Any]]:
        attn = self.recommender.explain(batch)[0]  # (L,)
        n = int(batch.lengths[0])
        items = batch.items[0, :n].tolist()
        weights = attn[:n].tolist()
        order = np.argsort(weights)[::-1]
        out = []
        for j in order:
            i = items[j]
            if i == 0 or i > self.spec.n_catalog:  # padding or the mask slot
                continue
            out.append(
                {
                    "item_id": self.item_ids[i],
                    "title": self.titles[i],
                    "attention": round(float(weights[j]), 4),
                    "position": int(j - n),
                }
            )
            if len(out) == top:
                break
        return out

    def similar(self, item_id: str, k: int = 10) -> Recommendation:
        """Items whose vectors are closest (cosine) to the item's vector."""
        i = self.item_index.get(str(item_id))
        if i is None:
            raise KeyError(str(item_id))
        table = self.recommender.item_table()[: self.spec.n_catalog + 1]
        vecs = torch.nn.functional.normalize(table.float(), dim=-1)
        sims = vecs @ vecs[i]
        sims[0] = float("-inf")
        sims[i] = float("-inf")
        top = torch.topk(sims, k=min(k, len(sims) - 2))
        return Recommendation(
            items=[self.item_ids[j] for j in top.indices.tolist()],
            scores=[round(float(s), 6) for s in top.values.tolist()],
        )
