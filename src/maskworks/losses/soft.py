"""Soft-target cross-entropy, label smoothing and boundary-aware label smoothing.

Soft labels describe fuzzy or ambiguous boundaries (technique notes Q11): the target of a pixel is a
distribution over classes instead of one class. The loss is always computed from **logits**
(``log_softmax``), never from probabilities, which was the seed's defect.

Label smoothing follows the PyTorch convention of Szegedy et al. (2016), "Rethinking the Inception
Architecture": ``t = (1 - eps) * one_hot + eps / K``, identical to
``F.cross_entropy(label_smoothing=eps)``. The seed's convention (``1 - eps`` on the true class,
``eps / (K - 1)`` on the others) is the same target with ``eps' = eps * K / (K - 1)``.

This module also holds the small helpers shared by the other loss files of this package:
per-class log-probabilities for single-channel (binary) and multi-channel logits, the log-probability
of the labelled class with ``ignore_index`` handled, and the base ``nn.Module`` that accepts
deep-supervision outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskworks.losses._utils import check_reduction, one_hot_with_ignore, reduce
from maskworks.losses.base import SegLoss

__all__ = [
    "class_log_probs",
    "target_log_prob",
    "pixel_cross_entropy",
    "soft_cross_entropy",
    "SoftCrossEntropyLoss",
    "boundary_label_smoothing",
]


def class_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Per-class log-probabilities ``(B, K, *spatial)`` from logits.

    A single channel (binary task) is read as the logit of class 1, so the result has two channels
    ``[log(1 - sigmoid(x)), log(sigmoid(x))]``; multi-channel logits go through ``log_softmax``.

    Args:
        logits: ``(B, K, *spatial)`` raw scores, ``K >= 1``.

    Returns:
        Log-probabilities with ``max(K, 2)`` channels, in the dtype of ``logits``.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be (B, K, *spatial), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    return F.log_softmax(logits, dim=1)


def check_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise a ValueError unless ``target`` is ``(B, *spatial)`` for ``logits`` ``(B, K, *spatial)``."""
    if target.dim() != logits.dim() - 1 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)}: expected (B, K, *spatial) and (B, *spatial)"
        )


def target_log_prob(
    log_probs: torch.Tensor, target: torch.Tensor, ignore_index: int | None = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of the labelled class at every pixel.

    Args:
        log_probs: ``(B, K, *spatial)`` from :func:`class_log_probs`.
        target: ``(B, *spatial)`` integer labels.
        ignore_index: label value that is ignored (its pixels read 0 and are False in the mask).

    Returns:
        ``(log_p_y, valid)``, both ``(B, *spatial)``; ``log_p_y`` is exactly 0 at ignored pixels, so no
        gradient reaches their logits.
    """
    _, valid = one_hot_with_ignore(target, log_probs.shape[1], ignore_index)  # validates the label range
    valid = valid[:, 0]
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    log_p_y = log_probs.gather(1, safe.unsqueeze(1))[:, 0]
    return log_p_y * valid, valid


def pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, ignore_index: int | None = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel cross-entropy that keeps the input dtype (float64 for gradcheck).

    Args:
        logits: ``(B, K, *spatial)``; ``K == 1`` is binary (the logit of class 1).
        target: ``(B, *spatial)`` integer labels.
        weight: optional per-class weights ``(K,)``.
        ignore_index: label value that is ignored.

    Returns:
        ``(loss, pixel_weight, valid)``, each ``(B, *spatial)``: ``loss = -w_y * log p_y`` (0 at ignored pixels),
        ``pixel_weight = w_y`` (the ``valid`` mask as float without class weights), and the valid mask.
    """
    check_target(logits, target)
    log_p_y, valid = target_log_prob(class_log_probs(logits), target, ignore_index)
    pixel_weight = valid.to(logits.dtype)
    if weight is not None:
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        pixel_weight = weight.to(logits)[safe] * valid
    return -log_p_y * pixel_weight, pixel_weight, valid


def _soft_targets(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities (B, C, *spatial), valid (B, *spatial))`` from int labels or probability maps."""
    if target.dtype.is_floating_point:
        if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
            raise ValueError(f"soft target {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        if logits.shape[1] == 1 and target.shape[1] == 1:
            target = torch.cat([1 - target, target], dim=1)
        if target.shape[1] != num_classes:
            raise ValueError(f"soft target has {target.shape[1]} channels, logits imply {num_classes} classes")
        target = target.to(logits.dtype)
        return target, target.sum(1) > 0
    check_target(logits, target)
    one_hot, valid = one_hot_with_ignore(target, num_classes, ignore_index)
    return one_hot.to(logits.dtype), valid[:, 0]


def soft_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy against soft (probability) targets or smoothed hard labels.

    ``loss = -sum_k w_k * t_k * log_softmax(logits)_k`` with ``t = (1 - smoothing) * target + smoothing / K``.

    Args:
        logits: ``(B, K, *spatial)`` raw scores (``K == 1``: binary, the logit of class 1).
        target: integer labels ``(B, *spatial)`` (``ignore_index`` pixels excluded), or a float probability
            map ``(B, K, *spatial)`` (``(B, 1, *spatial)`` for binary) whose channels sum to 1; pixels whose
            target channels are all 0 (as :func:`boundary_label_smoothing` writes for ignored pixels) are excluded.
        smoothing: label smoothing ``eps`` in ``[0, 1)``, PyTorch convention (``eps / K`` to every class).
        weight: optional per-class weights ``(K,)``; the mean divides by the number of valid pixels
            (PyTorch's convention for probability targets).
        ignore_index: label value that is ignored for integer targets.
        reduction: ``"mean"`` over valid pixels, ``"sum"`` or ``"none"`` (``(B, *spatial)``, 0 at ignored pixels).

    Returns:
        The loss.
    """
    check_reduction(reduction)
    log_p = class_log_probs(logits)
    num_classes = log_p.shape[1]
    soft, valid = _soft_targets(logits, target, num_classes, ignore_index)
    if smoothing > 0:
        soft = (1 - smoothing) * soft + smoothing / num_classes
    if weight is not None:
        soft = soft * weight.to(soft).view(1, -1, *([1] * (soft.dim() - 2)))
    loss = -(soft * log_p).sum(1) * valid
    return reduce(loss, reduction, valid.to(loss.dtype))


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False):
    """Raise a ValueError unless ``value`` lies in the interval from ``low`` to ``high``."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


class SoftCrossEntropyLoss(SegLoss):
    """Module form of :func:`soft_cross_entropy`.

    Args:
        smoothing: label smoothing in ``[0, 1)`` (PyTorch convention).
        weight: optional per-class weights.
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        smoothing: float = 0.0,
        weight=None,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        self.smoothing = check_range("smoothing", smoothing, 0.0, 1.0, high_open=True)
        self.register_class_weight(weight)
        self.ignore_index = ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, target, self.smoothing, self.weight, self.ignore_index, self.reduction)


@torch.no_grad()
def boundary_label_smoothing(
    target: torch.Tensor,
    num_classes: int,
    radius: int = 2,
    epsilon: float = 0.1,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Soft targets that are smoothed only near class boundaries.

    A pixel is *near a boundary* when its ``(2 * radius + 1)``-square window holds more than one (non-ignored)
    class. There the target is ``(1 - epsilon) * one_hot + epsilon * present / n_present``: the smoothing
    mass is shared among the classes actually present around the pixel (so a road/sidewalk edge is smoothed
    between road and sidewalk only). Elsewhere the target stays one-hot. Where every class is present this is
    exactly PyTorch's ``label_smoothing=epsilon``. Ignored pixels get an all-zero row, which
    :func:`soft_cross_entropy` excludes. Works on any device (max pooling, no scipy).

    Args:
        target: ``(B, H, W)`` (or ``(B, D, H, W)``) integer labels.
        num_classes: number of classes ``K``.
        radius: half-width of the neighbourhood in pixels, an integer ``>= 1``.
        epsilon: smoothing mass in ``[0, 1)``.
        ignore_index: label value that is ignored.

    Returns:
        Float soft targets ``(B, K, *spatial)``; rows sum to 1 at valid pixels, 0 at ignored ones.
    """
    if not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}")
    check_range("epsilon", epsilon, 0.0, 1.0, high_open=True)
    one_hot, valid = one_hot_with_ignore(target, num_classes, ignore_index)
    pool = {4: F.max_pool2d, 5: F.max_pool3d}.get(one_hot.dim())
    if pool is None:
        raise ValueError(f"target must be (B, H, W) or (B, D, H, W), got shape {tuple(target.shape)}")
    present = pool(one_hot, kernel_size=2 * radius + 1, stride=1, padding=radius)
    n_present = present.sum(1, keepdim=True)
    near = (n_present > 1) & valid
    smoothed = (1 - epsilon) * one_hot + epsilon * present / n_present.clamp_min(1)
    return torch.where(near, smoothed, one_hot)
