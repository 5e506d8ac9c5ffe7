"""The seed's loss plot: moving-average training loss and validation loss, as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    data = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(data)))
    if len(data) == 0:
        return data
    return np.convolve(data, np.ones(window) / window, mode="valid")


def loss_plot_png(
    step_losses: Sequence[float],
    steps_per_epoch: float,
    val_losses: Sequence[float],
    *,
    title: str = "Losses",
) -> bytes:
    """Training loss per step (smoothed over ~a fifth of an epoch) and validation loss per
    epoch, on one axis of epochs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    window = max(1, round(steps_per_epoch / 5))
    smooth = moving_average(step_losses, window)
    if len(smooth):
        x = (np.arange(len(smooth)) + window) / max(steps_per_epoch, 1)
        ax.plot(x, smooth, label=f"train loss (moving average, {window} steps)")
    if len(val_losses):
        ax.plot(np.arange(1, len(val_losses) + 1), val_losses, "o-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(True, alpha=0.4)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
