"""Focal loss on logits (Lin, Goyal, Girshick, He, Dollár 2017, "Focal Loss for Dense Object Detection", ICCV).

``FL(p_t) = -alpha_t (1 - p_t) ** gamma log(p_t)`` per pixel, where ``p_t`` is the probability of the true class:

- ``mode="binary"`` / ``"multilabel"``: sigmoid per element, ``alpha_t = alpha`` for positives and ``1 - alpha``
  for negatives (scalar ``alpha`` in ``[0, 1]``, as in the paper, torchvision's ``sigmoid_focal_loss`` and smp).
- ``mode="multiclass"``: softmax, ``alpha_t = alpha[target]`` with one weight per class (a scalar ``alpha`` is
  rejected: it would only rescale the loss, the defect of the seed).

``(1 - p_t) ** gamma`` is computed in log space (``exp(gamma * log(1 - p_t))``), so it is finite and smooth for
confident predictions. ``ignore_index`` pixels contribute nothing to the value or the gradient, and
``reduction="mean"`` averages over the valid pixels (elements for multilabel). With ``gamma=0`` and
``alpha=None`` the loss equals ``F.cross_entropy`` (multiclass) or ``F.binary_cross_entropy_with_logits``.

MONAI's ``FocalLoss``: its default (``use_softmax=False`` on one-hot targets) is our ``"multilabel"`` mode, equal
value for value. Its ``use_softmax=True`` form keeps one term per pixel *and class* (zero except at the true
class) and its ``"mean"`` divides by ``K`` times the pixel count, so its value is ours divided by ``K`` (an
intentional difference: the mean is over pixels, as ``F.cross_entropy``); its ``alpha`` there weighs channel 0 by
``1 - alpha`` and the others by ``alpha``, i.e. our ``alpha=[1 - a, a, ..., a]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from maskworks.losses._utils import (
    binary_label_error,
    check_mode,
    check_reduction,
    label_range_error,
    reduce,
    valid_mask,
)
from maskworks.losses.base import SegLoss
from maskworks.losses.overlap import _float_logits, match_target

__all__ = ["focal_loss", "FocalLoss"]


def _check_focal(mode: str, alpha: float | Sequence[float] | torch.Tensor | None, gamma: float, reduction: str) -> None:
    check_mode(mode)
    check_reduction(reduction)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is None:
        return
    a = torch.as_tensor(alpha, dtype=torch.float64)
    if mode == "multiclass":
        if a.dim() != 1:
            raise ValueError("mode='multiclass' needs alpha as a per-class sequence (a scalar only rescales the loss)")
        if (a < 0).any():
            raise ValueError("per-class alpha must be non-negative")
    elif a.dim() != 0 or not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"mode={mode!r} needs a scalar alpha in [0, 1], got {alpha}")


def _log1m_pt_term(log_pt: torch.Tensor, log_1m_pt: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(1 - p_t) ** gamma`` from ``log(1 - p_t)``; exactly 1 with ``gamma == 0``."""
    if gamma == 0:
        return torch.ones_like(log_pt)
    return torch.exp(gamma * log_1m_pt)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str = "multiclass",
    *,
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    gamma: float = 2.0,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss of logits against class ids (multiclass) or ``{0, 1}`` masks (binary / multilabel).

    Args:
        logits: ``(B, K, *spatial)`` raw scores (``K == 1`` for binary).
        target: ``(B, *spatial)`` class ids (multiclass); ``(B, *spatial)`` or ``(B, 1, *spatial)`` (binary);
            ``(B, K, *spatial)`` (multilabel). ``ignore_index`` marks excluded pixels / elements.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        alpha: scalar in ``[0, 1]`` (weight of positives; binary / multilabel) or per-class sequence ``(K,)``
            (multiclass); ``None`` for no weighting.
        gamma: focusing exponent (``0`` gives cross-entropy).
        ignore_index: label value that is excluded.
        reduction: ``"mean"`` (over valid pixels), ``"sum"`` or ``"none"`` (per pixel: ``(B, *spatial)`` for
            multiclass, ``(B, K, *spatial)`` otherwise, zeros at ignored pixels).

    Returns:
        The loss.
    """
    _check_focal(mode, alpha, gamma, reduction)
    logits = _float_logits(logits)
    target = match_target(target, logits, mode)
    valid = valid_mask(target, ignore_index)
    safe = torch.where(valid, target, torch.zeros_like(target))
    if mode == "multiclass":
        k = logits.shape[1]
        safe = safe.long()
        if (safe < 0).any() or (safe >= k).any():
            raise label_range_error(torch.unique(safe[(safe < 0) | (safe >= k)]).tolist(), k, ignore_index)
        log_p = logits.log_softmax(dim=1)
        log_pt = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
        # log(1 - p_t) = logsumexp of the log-probabilities of the other classes (exact, no cancellation)
        others = log_p.scatter(1, safe.unsqueeze(1), float("-inf"))
        log_1m_pt = torch.logsumexp(others, dim=1)
        weight = None
        if alpha is not None:
            a = torch.as_tensor(alpha, dtype=logits.dtype, device=logits.device)
            if a.numel() != k:
                raise ValueError(f"alpha has {a.numel()} entries, logits have {k} classes")
            weight = a[safe]
    else:
        if safe.is_floating_point() and ((safe < 0) | (safe > 1)).any():
            raise ValueError(f"mode={mode!r}: float target must lie in [0, 1] (or be ignore_index)")
        if not safe.is_floating_point() and ((safe != 0) & (safe != 1)).any():
            raise binary_label_error(target, valid, ignore_index, f"mode={mode!r}")
        t = safe.to(logits.dtype)
        log_pt = -F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        if safe.is_floating_point() and ((t != 0) & (t != 1)).any():  # soft labels: p_t = exp(-BCE), as smp
            log_1m_pt = torch.log(-torch.expm1(log_pt).clamp_max(-torch.finfo(t.dtype).tiny))
        else:  # hard labels: log(1 - p_t) = logsigmoid(-(2t - 1) x), exact
            log_1m_pt = F.logsigmoid((1.0 - 2.0 * t) * logits)
        weight = None if alpha is None else alpha * t + (1.0 - alpha) * (1.0 - t)
    loss = -_log1m_pt_term(log_pt, log_1m_pt, gamma) * log_pt
    if weight is not None:
        loss = loss * weight
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return reduce(loss, reduction, weight=valid.to(loss.dtype))


class FocalLoss(SegLoss):
    """Focal loss module (Lin et al. 2017); see :func:`focal_loss`. Options are validated here.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        alpha: scalar in ``[0, 1]`` (binary / multilabel) or per-class sequence (multiclass), or ``None``.
        gamma: focusing exponent (default 2).
        ignore_index: label value that is excluded.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss in ``{"out", "aux"}`` outputs.
    """

    def __init__(
        self,
        mode: str = "multiclass",
        *,
        alpha: float | Sequence[float] | torch.Tensor | None = None,
        gamma: float = 2.0,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        _check_focal(mode, alpha, gamma, reduction)
        self.mode = mode
        self.gamma = gamma
        self.ignore_index = ignore_index
        if alpha is not None and mode == "multiclass":
            self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))
        else:
            self.alpha = None if alpha is None else float(alpha)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(
            logits,
            target,
            self.mode,
            alpha=self.alpha,
            gamma=self.gamma,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )
