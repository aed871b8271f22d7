"""Streaming calibration metrics for per-pixel class probabilities.

For every counted pixel (target not ``ignore_index``) with class probabilities ``p`` and label ``y``:

* **ECE** (expected calibration error, Naeini et al. 2015; Guo et al. 2017): the confidence ``max_k p_k`` is put
  in one of ``n_bins`` equal-width bins ``[lo, hi)`` (the last bin is closed, ``[lo, 1]``);
  ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` with ``acc_b`` the fraction of correct argmax predictions in bin ``b``
  and ``conf_b`` its mean confidence. **MCE** is ``max_b |acc_b - conf_b|`` over non-empty bins.
  torchmetrics' ``MulticlassCalibrationError`` uses the same ``[lo, hi)`` bins but gives a confidence of exactly
  1.0 a bin of its own; the two agree unless some confidence is exactly 1.0.
* **NLL**: mean of ``-log p_y`` (``p_y`` clamped at ``1e-12`` so a confident mistake is large but finite).
* **Brier score**: mean of ``sum_k (p_k - [y = k])^2`` (the multi-class form of Brier 1950, range ``[0, 2]``).

Counts are exact int64 and sums float64, so results do not depend on how the data is split into batches.
Inputs are probabilities; pass ``from_logits=True`` to apply the softmax here. Probabilities that do not sum
to one (logits passed by mistake) are rejected rather than silently giving a wrong number. With no counted
pixel ``compute`` returns ``NaN`` everywhere and ``num_pixels = 0``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from maskworks.metrics.confusion import _as_tensor, check_finite

__all__ = ["Calibration"]


class Calibration:
    """Streaming ECE / MCE / NLL / Brier score and reliability-diagram data.

    Args:
        num_classes: K, the size of the class dimension of the probabilities.
        n_bins: number of equal-width confidence bins (15 is the usual choice).
        ignore_index: target value of pixels that are not counted.
        from_logits: apply a softmax over the class dimension to the inputs.
        device: where the statistics live; by default the device of the first batch.
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        ignore_index: int | None = 255,
        from_logits: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        self.num_classes, self.n_bins = int(num_classes), int(n_bins)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.from_logits = bool(from_logits)
        self._device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        dev = self._device or torch.device("cpu")
        self.count = torch.zeros(self.n_bins, dtype=torch.int64, device=dev)
        self.correct = torch.zeros(self.n_bins, dtype=torch.int64, device=dev)
        self.conf_sum = torch.zeros(self.n_bins, dtype=torch.float64, device=dev)
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.brier_sum = torch.zeros((), dtype=torch.float64, device=dev)

    def __repr__(self) -> str:
        return f"Calibration(num_classes={self.num_classes}, n_bins={self.n_bins}, num_pixels={int(self.count.sum())})"

    @torch.no_grad()
    def update(self, probs: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch.

        Args:
            probs: ``(B, K, *spatial)`` probabilities (or logits with ``from_logits=True``); ``(K, *spatial)`` for
                one image.
            target: ``(B, *spatial)`` (or ``(*spatial)``) integer class ids, ``ignore_index`` for unlabelled pixels.

        Raises:
            ValueError: on mismatched shapes, NaN / inf inputs (anywhere, also at ignored pixels), probabilities
                that are not a distribution over dim 1, or target labels outside ``0..K-1``.
        """
        probs, target = _as_tensor(probs, "probs"), _as_tensor(target, "target")
        if not probs.is_floating_point():
            raise TypeError(f"probs must be a float tensor of class probabilities, got dtype {probs.dtype}")
        check_finite(probs, "probs", "logits" if self.from_logits else "probabilities")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")
        if probs.dim() == target.dim() + 1 and probs.shape[1:] == target.shape:  # one image: (K, *S) with (*S)
            probs, target = probs[None], target[None]
        if probs.dim() != target.dim() + 1 or probs.shape[0] != target.shape[0] or probs.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"probs {tuple(probs.shape)} and target {tuple(target.shape)} do not match; expected probs "
                f"(B, K, *spatial) and target (B, *spatial)"
            )
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"probs has {probs.shape[1]} classes on dim 1, expected num_classes={self.num_classes}")
        if self._device is None:
            self._device = probs.device
            if self.count.device != probs.device:
                self.reset()
        probs = probs.to(self.count.device)
        target = target.to(self.count.device).long()
        p = probs.movedim(1, -1).reshape(-1, self.num_classes).double()
        t = target.reshape(-1)
        keep = t != self.ignore_index if self.ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
        p, t = p[keep], t[keep]
        if t.numel() == 0:
            return
        if int(t.min()) < 0 or int(t.max()) >= self.num_classes:
            raise ValueError(
                f"target holds labels outside 0..{self.num_classes - 1} that are not ignore_index={self.ignore_index}"
            )
        if self.from_logits:
            p = torch.softmax(p, dim=1)
        else:
            bad = (p.min() < -1e-6) or (p.max() > 1 + 1e-6) or bool(((p.sum(1) - 1).abs() > 1e-3).any())
            if bad:
                raise ValueError(
                    "probs are not probabilities over dim 1 (values outside [0, 1] or not summing to 1); pass "
                    "from_logits=True if these are logits"
                )
        conf, pred = p.max(1)
        bins = (conf * self.n_bins).long().clamp_(0, self.n_bins - 1)  # [lo, hi), 1.0 in the last bin
        self.count += torch.bincount(bins, minlength=self.n_bins)
        self.correct += torch.bincount(bins, weights=(pred == t).double(), minlength=self.n_bins).long()
        self.conf_sum += torch.bincount(bins, weights=conf, minlength=self.n_bins)
        p_y = p.gather(1, t[:, None])[:, 0]
        self.nll_sum += -torch.log(p_y.clamp_min(1e-12)).sum()
        self.brier_sum += ((p * p).sum(1) - 2 * p_y + 1).sum()

    def compute(self) -> dict[str, Any]:
        """``ece``, ``mce``, ``nll``, ``brier``, ``num_pixels`` and ``reliability`` (per-bin ``edges``,
        ``count``, ``accuracy`` and ``confidence``; NaN for empty bins)."""
        count = self.count.cpu()
        n = int(count.sum())
        acc = torch.full((self.n_bins,), math.nan, dtype=torch.float64)
        conf = torch.full((self.n_bins,), math.nan, dtype=torch.float64)
        nz = count > 0
        acc[nz] = self.correct.cpu()[nz].double() / count[nz].double()
        conf[nz] = self.conf_sum.cpu()[nz] / count[nz].double()
        gap = (acc - conf).abs()
        if n:
            ece = float((gap[nz] * count[nz].double()).sum() / n)
            mce = float(gap[nz].max())
            nll, brier = float(self.nll_sum) / n, float(self.brier_sum) / n
        else:
            ece = mce = nll = brier = math.nan
        return {
            "ece": ece,
            "mce": mce,
            "nll": nll,
            "brier": brier,
            "num_pixels": n,
            "reliability": {
                "edges": torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64).tolist(),
                "count": count.tolist(),
                "accuracy": acc.tolist(),
                "confidence": conf.tolist(),
            },
        }
