"""Losses that are robust to noisy labels (technique notes Q55).

* Symmetric cross-entropy: Wang et al. (2019), "Symmetric Cross Entropy for Robust Learning with Noisy
  Labels", ICCV. ``alpha * CE + beta * RCE`` where the reverse CE ``-sum_k p_k log q_k`` uses
  ``log 0 := A`` for the one-hot label ``q`` (the paper's ``A = -4``), so ``RCE = -A * (1 - p_y)``.
  The official code clamps the one-hot at ``1e-4`` (``A = log 1e-4 = -9.21``); pass ``log_zero`` to match it.
* Generalized cross-entropy (L_q): Zhang & Sabuncu (2018), "Generalized Cross Entropy Loss for Training Deep
  Neural Networks with Noisy Labels", NeurIPS. ``(1 - p_y^q) / q``; ``q -> 0`` is CE, ``q = 1`` is MAE
  (``1 - p_y``). The truncated variant holds the loss at ``L_q(k)`` (zero gradient) where ``p_y <= k``.
  ``p_y^q`` is computed as ``exp(q * log_softmax)``, which has a bounded gradient as ``p_y -> 0``.
* Bootstrapping: Reed et al. (2015), "Training Deep Neural Networks on Noisy Labels with Bootstrapping",
  ICLR workshop. Soft: target ``beta * y + (1 - beta) * p`` (beta 0.95 in the paper); hard: target
  ``beta * y + (1 - beta) * one_hot(argmax p)`` (beta 0.8). Not to be confused with "bootstrapped CE" in the
  sense of hard-pixel mining, which is :func:`maskworks.losses.ohem.topk_cross_entropy`.
* Confidence-weighted CE: per-pixel weights from a confidence map (e.g. annotator agreement, or the detached
  model confidence as in the seed's ``ConfidenceWeightedLoss``), ``sum(c * CE) / sum(c)``.
"""

from __future__ import annotations

import torch

from maskworks.losses._utils import check_reduction, reduce
from maskworks.losses.base import SegLoss
from maskworks.losses.soft import (
    check_range,
    check_target,
    class_log_probs,
    pixel_cross_entropy,
    target_log_prob,
)

__all__ = [
    "symmetric_cross_entropy",
    "SymmetricCrossEntropyLoss",
    "generalized_cross_entropy",
    "GeneralizedCrossEntropyLoss",
    "bootstrapped_cross_entropy",
    "BootstrappedCrossEntropyLoss",
    "confidence_weighted_cross_entropy",
    "ConfidenceWeightedCrossEntropyLoss",
]

BOOTSTRAP_BETA = {"soft": 0.95, "hard": 0.8}


def _log_p_y(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None):
    check_target(logits, target)
    log_p = class_log_probs(logits)
    log_p_y, valid = target_log_prob(log_p, target, ignore_index)
    return log_p, log_p_y, valid


def symmetric_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_zero: float = -4.0,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric cross-entropy ``alpha * CE + beta * RCE`` with ``RCE = -log_zero * (1 - p_y)``.

    Args:
        logits: ``(B, K, *spatial)`` raw scores (``K == 1``: binary).
        target: ``(B, *spatial)`` integer labels.
        alpha: weight of the CE term (paper: 0.1 on CIFAR-10, 6.0 on CIFAR-100).
        beta: weight of the reverse CE term (paper: 1.0).
        log_zero: the constant ``A = log 0`` of the one-hot label, negative (paper: -4).
        ignore_index: label value that is ignored.
        reduction: ``"mean"`` over valid pixels, ``"sum"`` or ``"none"``.

    Returns:
        The loss.
    """
    check_reduction(reduction)
    _, log_p_y, valid = _log_p_y(logits, target, ignore_index)
    loss = (-alpha * log_p_y + beta * (-log_zero) * (1 - log_p_y.exp())) * valid
    return reduce(loss, reduction, valid.to(loss.dtype))


def generalized_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    q: float = 0.7,
    truncated: bool = False,
    k: float = 0.5,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized cross-entropy ``(1 - p_y^q) / q``, optionally truncated.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: ``(B, *spatial)`` integer labels.
        q: exponent in ``(0, 1]`` (paper: 0.7).
        truncated: use the truncated L_q loss: ``L_q(k)``, a constant, where ``p_y <= k``.
        k: truncation threshold in ``(0, 1)`` (paper: 0.5).
        ignore_index: label value that is ignored.
        reduction: ``"mean"`` over valid pixels, ``"sum"`` or ``"none"``.

    Returns:
        The loss.
    """
    check_reduction(reduction)
    _, log_p_y, valid = _log_p_y(logits, target, ignore_index)
    loss = (1 - torch.exp(q * log_p_y)) / q
    if truncated:
        loss = torch.where(log_p_y.exp() <= k, torch.full_like(loss, (1 - k**q) / q), loss)
    loss = loss * valid
    return reduce(loss, reduction, valid.to(loss.dtype))


def bootstrapped_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    beta: float | None = None,
    kind: str = "soft",
    detach: bool = False,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bootstrapping loss ``-sum_k (beta * y_k + (1 - beta) * z_k) log p_k`` (Reed et al. 2015).

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: ``(B, *spatial)`` integer labels.
        beta: weight of the given label; ``None`` takes the paper's value for ``kind`` (0.95 soft, 0.8 hard).
        kind: ``"soft"`` (``z = p``, equivalent to entropy regularisation) or ``"hard"`` (``z = one_hot(argmax p)``).
        detach: soft kind only: stop the gradient through ``z = p`` (a fixed target per step, as in many
            re-implementations); the paper's form (False) keeps it, i.e. minimises the prediction entropy.
        ignore_index: label value that is ignored.
        reduction: ``"mean"`` over valid pixels, ``"sum"`` or ``"none"``.

    Returns:
        The loss.
    """
    check_reduction(reduction)
    if kind not in BOOTSTRAP_BETA:
        raise ValueError(f"kind must be one of {tuple(BOOTSTRAP_BETA)}, got {kind!r}")
    beta = BOOTSTRAP_BETA[kind] if beta is None else beta
    log_p, log_p_y, valid = _log_p_y(logits, target, ignore_index)
    if kind == "soft":
        p = log_p.exp()
        self_term = -((p.detach() if detach else p) * log_p).sum(1)
    else:
        self_term = -log_p.max(1).values  # log-probability of the predicted class
    loss = (-beta * log_p_y + (1 - beta) * self_term) * valid
    return reduce(loss, reduction, valid.to(loss.dtype))


def confidence_weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    confidence: torch.Tensor | None = None,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy with per-pixel weights from a confidence map, ``sum(c * CE) / sum(c)``.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: ``(B, *spatial)`` integer labels.
        confidence: non-negative per-pixel weights ``(B, *spatial)`` (e.g. annotator agreement in ``[0, 1]``);
            ``None`` uses the detached max softmax probability of the model (the seed's choice).
        ignore_index: label value that is ignored.
        reduction: ``"mean"`` (confidence-weighted mean over valid pixels), ``"sum"`` or ``"none"``.

    Returns:
        The loss.
    """
    check_reduction(reduction)
    loss, _, valid = pixel_cross_entropy(logits, target, None, ignore_index)
    if confidence is None:
        confidence = class_log_probs(logits.detach()).max(1).values.exp()
    elif confidence.shape != target.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} must have the target's shape {tuple(target.shape)}")
    elif (confidence < 0).any():
        raise ValueError("confidence must be non-negative")
    weight = confidence.detach().to(loss.dtype) * valid
    loss = loss * weight
    if reduction == "mean":
        return loss.sum() / weight.sum().clamp_min(torch.finfo(loss.dtype).tiny)
    return reduce(loss, reduction)


class SymmetricCrossEntropyLoss(SegLoss):
    """Module form of :func:`symmetric_cross_entropy`.

    Args:
        alpha: weight of CE, ``>= 0``.
        beta: weight of reverse CE, ``>= 0``.
        log_zero: ``A``, the log of a zero label probability, ``< 0``.
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 1.0,
        log_zero: float = -4.0,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise ValueError(f"alpha and beta must be >= 0 and not both 0, got {alpha}, {beta}")
        if log_zero >= 0:
            raise ValueError(f"log_zero must be negative, got {log_zero}")
        self.alpha, self.beta, self.log_zero, self.ignore_index = alpha, beta, log_zero, ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return symmetric_cross_entropy(
            logits, target, self.alpha, self.beta, self.log_zero, self.ignore_index, self.reduction
        )


class GeneralizedCrossEntropyLoss(SegLoss):
    """Module form of :func:`generalized_cross_entropy`.

    Args:
        q: exponent in ``(0, 1]``.
        truncated: use the truncated L_q loss.
        k: truncation threshold in ``(0, 1)``.
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        q: float = 0.7,
        truncated: bool = False,
        k: float = 0.5,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        self.q = check_range("q", q, 0.0, 1.0, low_open=True)
        self.k = check_range("k", k, 0.0, 1.0, low_open=True, high_open=True)
        self.truncated, self.ignore_index = truncated, ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return generalized_cross_entropy(
            logits, target, self.q, self.truncated, self.k, self.ignore_index, self.reduction
        )


class BootstrappedCrossEntropyLoss(SegLoss):
    """Module form of :func:`bootstrapped_cross_entropy` (Reed et al. 2015 bootstrapping).

    Args:
        beta: weight of the given label in ``[0, 1]``; ``None``: 0.95 for soft, 0.8 for hard.
        kind: ``"soft"`` or ``"hard"``.
        detach: soft kind: stop the gradient through the prediction part of the target.
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        beta: float | None = None,
        kind: str = "soft",
        detach: bool = False,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        if kind not in BOOTSTRAP_BETA:
            raise ValueError(f"kind must be one of {tuple(BOOTSTRAP_BETA)}, got {kind!r}")
        self.beta = BOOTSTRAP_BETA[kind] if beta is None else check_range("beta", beta, 0.0, 1.0)
        self.kind, self.detach, self.ignore_index = kind, detach, ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bootstrapped_cross_entropy(
            logits, target, self.beta, self.kind, self.detach, self.ignore_index, self.reduction
        )


class ConfidenceWeightedCrossEntropyLoss(SegLoss):
    """Module form of :func:`confidence_weighted_cross_entropy`; ``forward(output, target, confidence=None)``.

    Args:
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(self, ignore_index: int | None = 255, reduction: str = "mean", aux_weight: float = 0.4):
        super().__init__(reduction, aux_weight)
        self.ignore_index = ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        return confidence_weighted_cross_entropy(logits, target, confidence, self.ignore_index, self.reduction)
