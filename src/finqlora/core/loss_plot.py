"""loss.png: training loss per step and validation loss at each evaluation, on one chart."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from finqlora.core.fileio import atomic_write_bytes


def plot_losses(
    train_points: Sequence[tuple[int, float]],
    val_points: Sequence[tuple[int, float]],
    path: str | Path,
    *,
    title: str = "Training and validation loss",
    best_step: int | None = None,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Draw train (step, loss) and val (step, loss) curves into a PNG (written atomically).

    Non-finite losses are left out of the chart (a NaN would hide every other point).
    `labels` replaces the English words (keys train_loss, val_loss, best, step, loss), e.g.
    with the report's Chinese ones.
    """
    words = {"train_loss": "train loss", "val_loss": "val loss", "best": f"best (step {best_step})",
             "step": "optimizer step", "loss": "cross-entropy loss (answer tokens)", **(labels or {})}
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in Colab's background
    import matplotlib.pyplot as plt

    train_clean = [(s, v) for s, v in train_points if math.isfinite(v)]
    val_clean = [(s, v) for s, v in val_points if math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    try:
        if train_clean:
            steps, values = zip(*train_clean)
            ax.plot(steps, values, label=words["train_loss"], color="#1f77b4", linewidth=1.2, alpha=0.85)
        if val_clean:
            steps, values = zip(*val_clean)
            ax.plot(steps, values, label=words["val_loss"], color="#d62728", marker="o", linewidth=1.6)
        if best_step is not None:
            ax.axvline(best_step, color="#2ca02c", linestyle="--", linewidth=1, label=words["best"])
        ax.set_xlabel(words["step"])
        ax.set_ylabel(words["loss"])
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if train_clean or val_clean:
            ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
