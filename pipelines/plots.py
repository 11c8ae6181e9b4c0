"""Plots logged with every run: training curves, metrics by segment, attention heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss and validation metrics per epoch."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(title="training loss", xlabel="epoch")
    for key in sorted({k for h in history for k in h if k.startswith("valid_")}):
        xs = [h["epoch"] for h in history if key in h]
        b.plot(xs, [h[key] for h in history if key in h], marker="o", label=key)
    b.set(title="validation", xlabel="epoch")
    if b.lines:  # no validation epochs: an empty panel, without an empty legend's warning
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def segment_bars(
    segments: dict[str, dict[str, float]], path: Path, metric: str = "ndcg@10"
) -> Path:
    """Full-ranking metric by segment (history length, cold vs warm targets)."""
    plt = _plt()
    names = list(segments)
    vals = [segments[n].get(metric, 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, vals)
    for i, n in enumerate(names):
        ax.text(vals[i], i, f" {vals[i]:.3f} (n={segments[n]['users']})", va="center", fontsize=7)
    ax.set(title=f"test {metric} by segment (full ranking)", xlabel=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_heatmap(rows: list[dict[str, Any]], path: Path) -> Path:
    """For sample users: attention of the prediction point over their latest history items."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.3 * len(rows) + 0.6), squeeze=False)
    for ax, row in zip(axes[:, 0], rows, strict=True):
        weights = np.asarray(row["attention"])[None, :]
        ax.imshow(weights, aspect="auto", cmap="viridis")
        ax.set_yticks([0], [f"user {row['user']}"], fontsize=7)  # a pseudonym
        labels = [str(t)[:14] for t in row["titles"]]
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=6)
    axes[0, 0].set_title("attention over the history when predicting the next item (last layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
