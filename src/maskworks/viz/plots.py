"""Training curves, confusion-matrix and reliability figures, written as PNG files.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through ``pyplot``, so
plotting works headless, from worker threads, and does not touch the user's global backend or open windows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["plot_training_curves", "plot_confusion_matrix", "plot_reliability"]

log = logging.getLogger(__name__)

_NORMALIZE = ("true", "pred", "all", None)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _number(v: Any) -> float | None:
    """A finite float from a history value, else ``None`` (missing, NaN, strings, ...)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _series(history: Sequence[dict], key: str, x_keys: Sequence[str]) -> tuple[list[float], list[float], str]:
    """``(xs, ys, x_label)`` for ``key``, sorted by x: x is the first of ``x_keys`` present in every row holding
    ``key``, else the row index."""
    rows = [(i, r) for i, r in enumerate(history) if _number(r.get(key)) is not None]
    x_key = next((xk for xk in x_keys if rows and all(_number(r.get(xk)) is not None for _, r in rows)), None)
    points = sorted((float(r[x_key]) if x_key else float(i), float(r[key])) for i, r in rows)
    return [x for x, _ in points], [y for _, y in points], x_key or "row"


def _classify_keys(history: Sequence[dict]) -> tuple[list[str], list[str], list[str]]:
    """Numeric keys split into losses, metrics (``train_*`` / ``val_*``) and learning rates, in first-seen order."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k, v in row.items() if k not in keys and _number(v) is not None)
    losses = [k for k in keys if "loss" in k]
    lrs = [k for k in keys if k == "lr" or k.startswith("lr_")]
    metrics = [k for k in keys if k not in losses and k not in lrs and k.startswith(("val_", "train_"))]
    return losses, metrics, lrs


def plot_training_curves(history: Sequence[dict], path: str | PathLike, dpi: int = 100) -> Path:
    """Plot losses, validation metrics and the learning rate from a training log.

    Rows look like ``{"epoch": 1, "step": 100, "train_loss": 0.5, "val_miou": 0.6, "lr": 1e-3}``; any key may be
    missing from any row (rows without a key are skipped for that curve, as are non-finite values). Keys with
    ``loss`` in the name are plotted against ``step`` when every row holding them has one, else ``epoch``; other
    ``train_*`` / ``val_*`` numbers against ``epoch``; ``lr`` (log scale when positive) against ``step``/``epoch``.
    Panels without data are left out.

    Args:
        history: list of log rows (dicts of numbers).
        path: output PNG file (parent folders are created).
        dpi: resolution.

    Returns:
        The written path.

    Raises:
        ValueError: if ``history`` is empty.
    """
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")
    losses, metrics, lrs = _classify_keys(history)
    panels = [
        (title, ks, xs)
        for title, ks, xs in (
            ("loss", losses, ("step", "epoch")),
            ("metrics", metrics, ("epoch", "step")),
            ("learning rate", lrs, ("step", "epoch")),
        )
        if ks
    ]
    fig = _new_figure(5.0 * max(1, len(panels)), 3.8)
    if not panels:
        log.warning("history has no loss, train_/val_ metric or lr values; writing an empty figure to %s", path)
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no numeric series in history", ha="center", va="center")
        ax.set_axis_off()
    for i, (title, keys, x_keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        x_labels = set()
        values = []
        for key in keys:
            xs, ys, xl = _series(history, key, x_keys)
            x_labels.add(xl)
            values.extend(ys)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        if title == "learning rate" and values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(" / ".join(sorted(x_labels)))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path, dpi)


def plot_confusion_matrix(
    matrix: Any,
    class_names: Sequence[str],
    path: str | PathLike,
    normalize: str | None = "true",
    dpi: int = 100,
    annotate: bool | None = None,
) -> Path:
    """Draw a confusion matrix as a heat map (rows: true class, columns: predicted class).

    Args:
        matrix: ``(K, K)`` counts (numpy array, tensor or nested lists), e.g. ``ConfusionMatrix.matrix``.
        class_names: ``K`` names for the axes.
        path: output PNG file (parent folders are created).
        normalize: ``"true"`` (each row sums to 1: recall on the diagonal), ``"pred"`` (columns sum to 1:
            precision), ``"all"`` (fractions of all pixels) or ``None`` (raw counts). Empty rows/columns stay 0.
        dpi: resolution.
        annotate: write the value in each cell; default only when ``K <= 20``.

    Returns:
        The written path.
    """
    m = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square (K, K), got shape {m.shape}")
    k = m.shape[0]
    if len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} entries, expected {k} for a {k}x{k} matrix")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    m = m.astype(np.float64)
    if normalize == "true":
        den = m.sum(1, keepdims=True)
    elif normalize == "pred":
        den = m.sum(0, keepdims=True)
    elif normalize == "all":
        den = np.full((1, 1), m.sum())
    else:
        den = None
    if den is not None:
        m = np.divide(m, den, out=np.zeros_like(m), where=den > 0)
    annotate = k <= 20 if annotate is None else annotate
    side = min(max(4.0, 0.45 * k + 2.5), 40.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    vmax = 1.0 if normalize else max(float(m.max()), 1.0)
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(k)
    names = [str(n) for n in class_names]
    ax.set_xticks(ticks, labels=names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(ticks, labels=names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({'normalized over ' + normalize if normalize else 'counts'})")
    if annotate:
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                text = f"{v:.2f}" if normalize else f"{int(v)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if v > 0.6 * vmax else "black")
    return _save(fig, path, dpi)


def plot_reliability(calibration: dict[str, Any], path: str | PathLike, dpi: int = 100) -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the gap to the diagonal and bin counts.

    Args:
        calibration: the dict of :meth:`maskworks.metrics.Calibration.compute` (uses ``reliability``, ``ece``).
        path: output PNG file (parent folders are created).
        dpi: resolution.

    Returns:
        The written path.
    """
    rel = calibration.get("reliability") if isinstance(calibration, dict) else None
    if not rel or not {"edges", "count", "accuracy", "confidence"} <= set(rel):
        raise ValueError("calibration must be Calibration.compute() output with a 'reliability' entry")
    edges = np.asarray(rel["edges"], dtype=np.float64)
    count = np.asarray(rel["count"], dtype=np.float64)
    acc = np.asarray(rel["accuracy"], dtype=np.float64)
    conf = np.asarray(rel["confidence"], dtype=np.float64)
    if len(edges) != len(count) + 1:
        raise ValueError(f"reliability has {len(edges)} edges for {len(count)} bins; expected one more edge than bins")
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    ok = count > 0
    fig = _new_figure(5.5, 6.5)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.bar(centers[ok], acc[ok], width=widths[ok], color="#4c72b0", edgecolor="white", label="accuracy")
    ax.bar(
        centers[ok],
        conf[ok] - acc[ok],
        bottom=acc[ok],
        width=widths[ok],
        color="#dd8452",
        alpha=0.45,
        edgecolor="#dd8452",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ece = calibration.get("ece")
    title = "reliability diagram" + (f" (ECE {ece:.4f})" if isinstance(ece, float) and math.isfinite(ece) else "")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(centers, count / max(count.sum(), 1), width=widths, color="#55a868", edgecolor="white")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("pixel fraction")
    return _save(fig, path, dpi)
