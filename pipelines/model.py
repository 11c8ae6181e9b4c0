"""The attention-flow Transformer.

An encoder reads a person's attention sequence; heads on top of it train it and
serve it:

    item ids ---> item vectors (id embedding, fused with MiniLM text through a gate)
                  + time-gap, event-type and attention-weight embeddings
                  --(inputs_embeds)--> Hugging Face backbone (GPT-2: causal, SASRec-style;
                  BERT: bidirectional, BERT4Rec-style), built from a config, no download
                  --> hidden states (B, L, d)
    training head  : next-item / masked-item softmax cross-entropy, full or sampled
    inference head : `Recommender.score` / `recommend` (+ attention for explanations)

Scores are dot products with the same item vectors that feed the encoder (tied),
so an item never seen in training still gets a vector from its text (cold start).

Models are saved as safetensors weights plus a JSON spec and rebuilt from that spec,
never from code defaults, and never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.config import ModelConfig
from pipelines.errors import AttnflowError, ConfigError
from pipelines.sequences import Batch
from pipelines.text import TEXT_DIM

FORMAT_VERSION = 1


class ModelCorrupted(AttnflowError):
    """A saved model's files do not match its manifest, or cannot be rebuilt."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: its config and the sizes of its data."""

    model: dict[str, Any]  # ModelConfig as saved
    n_items: int  # known items 1..n_items (scored in evaluation)
    n_catalog: int  # all items 1..n_catalog (cold items after the known ones)
    event_vocab: list[str] = field(default_factory=list)
    order_only: bool = False
    has_text: bool = False
    n_users: int = 0  # users with a learned vector (model.user_embeddings), rows 1..n_users
    format_version: int = FORMAT_VERSION

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model)

    @property
    def mask_token(self) -> int:
        return self.n_catalog + 1

    @property
    def backbone(self) -> str:
        cfg = self.config
        if cfg.backbone != "auto":
            return cfg.backbone
        return "gpt2" if cfg.objective == "causal" else "bert"


def _build_backbone(spec: ModelSpec) -> nn.Module:
    """A Hugging Face encoder from a config alone (random init, nothing downloaded)."""
    cfg = spec.config
    inner = max(1, round(cfg.hidden * cfg.ffn_mult))
    if cfg.hidden % cfg.heads:
        raise ConfigError(f"model.hidden ({cfg.hidden}) must be divisible by model.heads")
    if spec.backbone == "gpt2":
        if cfg.objective == "masked":
            raise ConfigError("model.backbone gpt2 is causal only; use bert for 'masked'")
        from transformers import GPT2Config, GPT2Model

        hf = GPT2Config(
            n_embd=cfg.hidden,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            n_inner=inner,
            n_positions=cfg.max_len,
            vocab_size=1,
            bos_token_id=None,
            eos_token_id=None,
            activation_function="relu" if cfg.activation == "relu" else "gelu_new",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
        )
        hf._attn_implementation = "sdpa"
        return GPT2Model(hf)
    from transformers import BertConfig, BertModel

    hf = BertConfig(
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=inner,
        hidden_act=cfg.activation,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_len,
        vocab_size=1,
        type_vocab_size=1,
        pad_token_id=0,
        is_decoder=cfg.objective == "causal",
    )
    hf._attn_implementation = "sdpa"
    return BertModel(hf, add_pooling_layer=False)


class AttnFlowEncoder(nn.Module):
    """Attention sequences (B, L) -> hidden states (B, L, d), and the item vector table."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        cfg = spec.config
        d = cfg.hidden
        self.item_emb = nn.Embedding(spec.n_catalog + 2, d, padding_idx=0)  # +pad, +mask
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.gap_emb = (
            nn.Embedding(cfg.time_buckets + 1, d, padding_idx=0)
            if cfg.time_gaps and not spec.order_only
            else None
        )
        self.event_emb = (
            nn.Embedding(len(spec.event_vocab) + 1, d, padding_idx=0)
            if cfg.event_types and len(spec.event_vocab) > 1
            else None
        )
        self.weight_emb = (
            nn.Embedding(cfg.weight_buckets + 1, d, padding_idx=0)
            if cfg.attention_weights
            else None
        )
        # SSE-PT-style personalisation: one vector per known user, added at every position;
        # row 0 (unknown user: an explicit history, or a user newer than the model) is zero.
        self.user_emb = (
            nn.Embedding(spec.n_users + 1, d, padding_idx=0)
            if cfg.user_embeddings and spec.n_users
            else None
        )
        for emb in (self.gap_emb, self.event_emb, self.weight_emb, self.user_emb):
            if emb is not None:  # small, like the item embeddings, so they do not drown them
                nn.init.normal_(emb.weight, std=0.02)
                with torch.no_grad():
                    emb.weight[0].zero_()
        known = torch.zeros(spec.n_catalog + 2, dtype=torch.bool)
        known[1 : spec.n_items + 1] = True
        known[spec.mask_token] = True
        self.register_buffer("known", known, persistent=True)
        if spec.has_text:
            self.register_buffer("text_table", torch.zeros(spec.n_catalog + 2, TEXT_DIM))
            self.text_proj = nn.Linear(TEXT_DIM, d)
            self.gate = nn.Linear(2 * d, d)
        self.item_bias = nn.Parameter(torch.zeros(spec.n_catalog + 2)) if cfg.item_bias else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.backbone = _build_backbone(spec)
        # Items enter through inputs_embeds: the backbone's own token table is never used.
        self.backbone.get_input_embeddings().weight.requires_grad_(False)
        self.scale = math.sqrt(d)

    def item_vectors(
        self, idx: torch.Tensor | None = None, text_table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fused vectors of items `idx` (any shape) or of every item: (..., d).

        With text, vector = g * id + (1 - g) * text, g = sigmoid(W [id; text]); items
        never seen in training (cold) use their text vector alone.
        """
        ids = self.item_emb.weight if idx is None else self.item_emb(idx)
        if not self.spec.has_text:
            return ids
        table = self.text_table if text_table is None else text_table
        text = self.text_proj(table if idx is None else table[idx])
        g = torch.sigmoid(self.gate(torch.cat([ids, text], dim=-1)))
        fused = g * ids + (1 - g) * text
        known = self.known if idx is None else self.known[idx]
        return torch.where(known.unsqueeze(-1), fused, text)

    def bias(self, idx: torch.Tensor | None = None) -> torch.Tensor | float:
        """Per-item output bias for `idx` (or every item); 0 when the model has none."""
        if self.item_bias is None:
            return 0.0
        return self.item_bias if idx is None else self.item_bias[idx]

    def forward(
        self, batch: Batch, text_table: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """(hidden (B, L, d), attentions or None). Padding is on the right."""
        items = batch.items
        B, L = items.shape
        x = self.item_vectors(items, text_table) * self.scale
        if self.gap_emb is not None:
            x = x + self.gap_emb(batch.gaps)
        if self.event_emb is not None:
            x = x + self.event_emb(batch.events)
        if self.weight_emb is not None:
            x = x + self.weight_emb(batch.weights)
        if self.user_emb is not None and batch.users is not None:
            users = torch.where(batch.users <= self.spec.n_users, batch.users, 0)  # (B,)
            x = x + self.user_emb(users).unsqueeze(1)  # (B, 1, d) broadcast over positions
        x = self.dropout(x)
        positions = torch.arange(L, device=items.device).expand(B, L)
        mask = positions < batch.lengths.unsqueeze(1)  # (B, L) real events
        if self.spec.config.positions == "from_end":
            pos_ids = (batch.lengths.unsqueeze(1) - 1 - positions).clamp(min=0)
        else:
            pos_ids = positions
        out = self.backbone(
            inputs_embeds=x,
            attention_mask=mask.long(),
            position_ids=pos_ids,
            output_attentions=output_attentions,
        )
        return out.last_hidden_state, (out.attentions if output_attentions else None)

    def last_hidden(self, batch: Batch, text_table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d): the hidden state at each sequence's last position (its prediction point)."""
        hidden, _ = self(batch, text_table)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, batch.lengths - 1]


# --- training head -----------------------------------------------------------------------------


def softmax_loss(
    encoder: AttnFlowEncoder,
    batch: Batch,
    loss: str = "full",
    negatives: int = 1024,
    weight_loss: bool = False,
    generator: torch.Generator | None = None,
    text_table: torch.Tensor | None = None,
    neg_probs: torch.Tensor | None = None,
    logq: bool = True,
    hidden: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    per_target: bool = False,
    chunk_mb: float = 16.0,
) -> torch.Tensor:
    """Cross-entropy of the next (causal) or masked-out (masked) item at every target.

    full: softmax over all known items, `chunk_mb` of logits at a time (see
    `full_cross_entropy`). sampled: over the target and `negatives`
    items shared by the batch, drawn uniformly or, with `neg_probs` (n_items + 1,),
    from that distribution with the logQ correction that keeps the estimate unbiased;
    accidental hits are masked out. bce: SASRec's logistic loss, each target against
    `negatives` uniform items of its own. `hidden` (B, L, d): the encoder's output for
    `batch` when the caller has it already. `label_smoothing` (full and sampled): that
    share of each target's probability mass is spread evenly over its candidates.
    `per_target` (sampled): each target gets `negatives` items of its own instead of
    sharing the batch's, so far more of the catalogue is pushed down per step.
    """
    if hidden is None:
        hidden, _ = encoder(batch, text_table)  # (B, L, d)
    sel = batch.targets > 0
    h = hidden[sel]  # (N, d) states at target positions
    t = batch.targets[sel]  # (N,)
    n_items = encoder.spec.n_items
    pos = (h * encoder.item_vectors(t, text_table)).sum(-1) + encoder.bias(t)  # (N,)
    if loss == "full":
        table = encoder.item_vectors(text_table=text_table)[1 : n_items + 1]  # (n_items, d)
        bias = encoder.bias()
        weights = None
        if weight_loss and batch.target_weights is not None:
            weights = batch.target_weights[sel].float()
        return full_cross_entropy(
            h,
            table,
            bias[1 : n_items + 1] if torch.is_tensor(bias) else None,
            t - 1,
            weights,
            label_smoothing,
            chunk_mb,
        )
    if loss == "bce":
        neg = torch.randint(1, n_items + 1, (len(t), negatives), generator=generator).to(h.device)
        neg_logits = torch.einsum("nd,nkd->nk", h, encoder.item_vectors(neg, text_table))
        neg_logits = neg_logits + encoder.bias(neg)  # (N, K)
        bce = nn.functional.binary_cross_entropy_with_logits
        losses = bce(pos.float(), torch.ones_like(pos, dtype=torch.float), reduction="none")
        losses = losses + bce(
            neg_logits.float(), torch.zeros_like(neg_logits, dtype=torch.float), reduction="none"
        ).mean(1)
    else:
        shape = (len(t), negatives) if per_target else (negatives,)
        if neg_probs is None:
            neg = torch.randint(1, n_items + 1, shape, generator=generator).to(h.device)
        else:
            draws = torch.multinomial(
                neg_probs, math.prod(shape), replacement=True, generator=generator
            )
            neg = draws.view(shape).to(h.device)
        vectors = encoder.item_vectors(neg, text_table)  # (K, d) shared or (N, K, d) per target
        if per_target:
            neg_logits = torch.einsum("nd,nkd->nk", h, vectors) + encoder.bias(neg)  # (N, K)
            hits = neg == t.unsqueeze(1)
        else:
            neg_logits = h @ vectors.T + encoder.bias(neg)  # (N, K)
            hits = neg.unsqueeze(0) == t.unsqueeze(1)
        if neg_probs is not None and logq:  # logQ correction: subtract log(K q(item))
            log_q = torch.log(neg_probs.to(h.device) * negatives)
            pos = pos - log_q[t]
            neg_logits = neg_logits - log_q[neg]
        neg_logits = neg_logits.masked_fill(hits, float("-inf"))
        logits = torch.cat([pos.unsqueeze(1), neg_logits], dim=1)
        labels = torch.zeros(len(t), dtype=torch.long, device=h.device)
        losses = smoothed_cross_entropy(logits, labels, label_smoothing)
    if weight_loss and batch.target_weights is not None:
        w = batch.target_weights[sel].float()
        return (losses * w).sum() / w.sum().clamp(min=1e-6)
    return losses.mean()


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """(N,) cross-entropy with label smoothing over each row's finite logits.

    logits (N, C), where -inf marks a column that is not a candidate for that row (a
    sampled negative that is the target itself); labels (N,). torch's own
    `label_smoothing` would average over every column, -inf ones included, and give inf.
    """
    logits = logits.float()
    if smoothing == 0.0:
        return nn.functional.cross_entropy(logits, labels, reduction="none")
    logp = torch.log_softmax(logits, dim=-1)  # (N, C)
    nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)  # (N,)
    finite = torch.isfinite(logits)
    uniform = -logp.masked_fill(~finite, 0.0).sum(1) / finite.sum(1)  # (N,) mean over candidates
    return (1.0 - smoothing) * nll + smoothing * uniform


def full_cross_entropy(
    h: torch.Tensor,
    table: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    smoothing: float = 0.0,
    chunk_mb: float = 16.0,
) -> torch.Tensor:
    """Mean softmax cross-entropy of `h @ table.T + bias` against `labels`, a chunk of rows
    at a time: the same value and gradients as `smoothed_cross_entropy` on the whole
    logits, which never exist whole.

    h (N, d) states, table (C, d) candidates, bias (C,) or None, labels (N,) in [0, C),
    weights (N,) or None (uniform): the loss is their weighted mean. Whole logits are
    N x C floats (about 1 GB per batch on ml-latest-small); allocated and freed at every
    step, they cost as much kernel time zeroing fresh pages as the arithmetic, and more
    when other processes hold memory. Chunks of at most `chunk_mb` reuse the allocator's
    memory instead.
    """
    n, c = h.shape[0], table.shape[0]
    rows = max(1, int(chunk_mb * 2**20 // (4 * c)))  # float32 logits per chunk
    w = torch.ones(n, device=h.device) if weights is None else weights.float()
    w = w / w.sum().clamp(min=1e-6)
    if not torch.is_grad_enabled() or not (h.requires_grad or table.requires_grad):
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, n, rows):
            logits = _chunk_logits(h[s : s + rows], table, bias)
            row_loss = smoothed_cross_entropy(logits, labels[s : s + rows], smoothing)
            total = total + (w[s : s + rows] * row_loss).sum()
        return total
    return _FullCrossEntropy.apply(h, table, bias, labels, w, smoothing, rows)


def _chunk_logits(h: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = (h @ table.T).float()  # (n, C); bf16 matmul under autocast, softmax in float
    return logits if bias is None else logits.add_(bias.float())


class _FullCrossEntropy(torch.autograd.Function):
    """`full_cross_entropy` with its gradients computed chunk by chunk in the forward pass
    (the logits are needed for both and are not kept); backward only scales them."""

    @staticmethod
    def forward(ctx, h, table, bias, labels, w, smoothing: float, rows: int):
        c = table.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)  # (N, d)
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=h.device)  # (C, d)
        grad_bias = None if bias is None else torch.zeros(c, dtype=torch.float32, device=h.device)
        table_f = table.float()  # once, not per chunk (a copy when autocast made it bf16)
        for s in range(0, h.shape[0], rows):
            hc, yc, wc = h[s : s + rows], labels[s : s + rows], w[s : s + rows]
            logp = _chunk_logits(hc, table, bias)  # (n, C)
            logp.sub_(torch.logsumexp(logp, dim=1, keepdim=True))  # log-softmax, in place
            row_loss = -logp.gather(1, yc.unsqueeze(1)).squeeze(1)  # (n,)
            if smoothing:
                row_loss = (1.0 - smoothing) * row_loss - smoothing * logp.mean(1)
            total += (wc * row_loss).sum()
            # d row_loss / d logits = softmax - (1 - smoothing) onehot - smoothing / C
            g = logp.exp_()
            g.scatter_add_(1, yc.unsqueeze(1), torch.full_like(g[:, :1], smoothing - 1.0))
            if smoothing:
                g.sub_(smoothing / c)
            g.mul_(wc.unsqueeze(1))  # (n, C)
            grad_h[s : s + rows] = g @ table_f
            grad_table.addmm_(g.T, hc.float())
            if grad_bias is not None:
                grad_bias += g.sum(0)
        ctx.save_for_backward(grad_h, grad_table, grad_bias)
        ctx.dtypes = (h.dtype, table.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_table, grad_bias = ctx.saved_tensors
        dh, dt, db = ctx.dtypes
        return (
            (grad_out * grad_h).to(dh),
            (grad_out * grad_table).to(dt),
            None if grad_bias is None else (grad_out * grad_bias).to(db),
            None,
            None,
            None,
            None,
        )


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between two views of the same sequences (DuoRec's unsupervised objective).

    first, second: (B, d) representations of one batch under two dropout masks. Each
    row's positive is its other view; the other 2B - 2 rows of the batch are negatives.
    """
    z = torch.cat([first, second]).float()  # (2B, d)
    sim = (z @ z.T) / temperature  # (2B, 2B)
    sim = sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    n = first.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # (2B,)
    return nn.functional.cross_entropy(sim, partner)


# --- inference head ----------------------------------------------------------------------------


class Recommender:
    """Scores, top-k recommendations and attention explanations from an encoder."""

    def __init__(self, encoder: AttnFlowEncoder, item_ids: list[str] | None = None):
        self.encoder = encoder.eval()
        self.spec = encoder.spec
        self.item_ids = item_ids
        self._table: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def item_table(self) -> torch.Tensor:
        """(n_catalog + 2, d) item vectors, computed once per recommender."""
        if self._table is None:
            with torch.inference_mode():
                self._table = self.encoder.item_vectors()
        return self._table

    def query(self, batch: Batch) -> torch.Tensor:
        """(B, d) query vectors: the encoder state at each history's prediction point."""
        with torch.inference_mode():
            return self.encoder.last_hidden(batch.to(self.device))

    @torch.inference_mode()
    def score(self, batch: Batch, catalog: bool = False) -> torch.Tensor:
        """(B, n + 1) scores of every known item (or every catalog item); column 0 is -inf."""
        n = self.spec.n_catalog if catalog else self.spec.n_items
        scores = self.query(batch) @ self.item_table()[: n + 1].T
        bias = self.encoder.bias()
        if torch.is_tensor(bias):
            scores = scores + bias[: n + 1]
        scores[:, 0] = float("-inf")
        return scores.float()

    @torch.inference_mode()
    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """(B, C) scores of the given items (B, C) only: a few candidates per history."""
        items = items.to(self.device)
        vecs = self.item_table()[items]  # (B, C, d)
        scores = (vecs @ self.query(batch).unsqueeze(-1)).squeeze(-1)  # (B, C)
        bias = self.encoder.bias()
        if torch.is_tensor(bias):
            scores = scores + bias[items]
        return scores.float()

    @torch.inference_mode()
    def recommend(
        self, batch: Batch, k: int = 10, exclude_seen: bool = True, catalog: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (items (B, k), scores (B, k)) for each history in `batch`."""
        scores = self.score(batch, catalog)
        if exclude_seen:
            hist = batch.items.to(scores.device).clamp(max=scores.shape[1] - 1)
            scores.scatter_(1, hist, float("-inf"))
        top = torch.topk(scores, k=min(k, scores.shape[1] - 1), dim=1)
        return top.indices, top.values

    @torch.inference_mode()
    def explain(self, batch: Batch) -> torch.Tensor:
        """(B, L) attention of each prediction point over its history (last layer, heads mean)."""
        backbone = self.encoder.backbone
        previous = backbone.config._attn_implementation
        backbone.set_attn_implementation("eager")  # sdpa does not return attention weights
        try:
            _, attentions = self.encoder(batch.to(self.device), output_attentions=True)
        finally:
            backbone.set_attn_implementation(previous)
        last = attentions[-1].mean(dim=1)  # (B, L, L)
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, batch.lengths.to(last.device) - 1].float()  # (B, L)


# --- save / load without pickle ---------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save_model(
    encoder: AttnFlowEncoder,
    folder: Path,
    extra: dict[str, Any] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write spec.json, weights.safetensors, optional JSON / array extras and a manifest."""
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    from pipelines.events import atomic_path

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, tmp / "weights.safetensors")
        (tmp / "spec.json").write_text(json.dumps(asdict(encoder.spec), indent=1), "utf-8")
        for name, obj in (extra or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(obj), "utf-8")
        if arrays:
            save_np(
                {k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp / "arrays.safetensors"
            )
        manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), "utf-8")
    return folder


def verify_model_files(folder: Path) -> None:
    """Refuse a model folder whose files differ from its manifest (corruption, tampering)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise ModelCorrupted(f"{folder}: no manifest.json; not an attnflow model")
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelCorrupted(f"{manifest_path}: not valid JSON ({exc})") from None
    for name, digest in manifest.items():
        path = folder / name
        if not path.exists():
            raise ModelCorrupted(f"{folder}: {name} is missing")
        if _sha256(path) != digest:
            raise ModelCorrupted(f"{folder}: {name} does not match its SHA-256 in manifest.json")


def load_model(folder: Path, device: str | torch.device = "cpu") -> AttnFlowEncoder:
    """Rebuild a model from its own spec and load its safetensors weights (no unpickling)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    verify_model_files(folder)
    try:
        spec = ModelSpec(**json.loads((folder / "spec.json").read_text("utf-8")))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelCorrupted(f"{folder}/spec.json: cannot rebuild the model ({exc})") from None
    if spec.format_version != FORMAT_VERSION:
        raise ModelCorrupted(
            f"{folder}: model format {spec.format_version}, expected {FORMAT_VERSION}"
        )
    encoder = AttnFlowEncoder(spec)
    state = load_file(folder / "weights.safetensors", device=str(device))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelCorrupted(
            f"{folder}: weights do not fit the spec "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return encoder.to(device).eval()


def load_extra(folder: Path, name: str) -> Any:
    """A JSON extra saved with the model (for example the item ids)."""
    return json.loads((Path(folder) / f"{name}.json").read_text("utf-8"))


def load_arrays(folder: Path) -> dict[str, np.ndarray]:
    """The arrays saved with the model (for example user histories)."""
    from safetensors.numpy import load_file

    path = Path(folder) / "arrays.safetensors"
    return load_file(path) if path.exists() else {}
