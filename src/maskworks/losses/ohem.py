"""Hard-pixel mining cross-entropies: OHEM and top-k.

* OHEM cross-entropy as used for semantic segmentation by PSPNet / OCNet / mmsegmentation's
  ``OHEMPixelSampler`` (after Shrivastava et al. 2016, "Training Region-based Object Detectors with Online
  Hard Example Mining"): pixels whose predicted probability of the labelled class is below ``thresh`` are
  kept; if fewer than ``min_kept`` qualify, the threshold is raised to the ``min_kept``-th smallest probability.
* Top-k cross-entropy (Wu, Shen & van den Hengel 2016, "Bridging Category-level and Instance-level Semantic
  Image Segmentation", the "online bootstrapped" CE; nnU-Net's ``TopKLoss``): the mean CE of the ``k`` percent
  hardest valid pixels.

Selection is over all valid pixels of the batch and uses detached values; the gradient flows only through the
kept pixels' cross-entropy.
"""

from __future__ import annotations

import math

import torch

from maskworks.losses._utils import check_reduction
from maskworks.losses.base import SegLoss
from maskworks.losses.soft import check_range, class_log_probs, pixel_cross_entropy, target_log_prob

__all__ = ["ohem_cross_entropy", "OhemCrossEntropyLoss", "topk_cross_entropy", "TopKCrossEntropyLoss"]


def _masked_reduce(loss: torch.Tensor, pixel_weight: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``loss`` over the ``keep`` mask; the mean divides by the kept pixels' class weights."""
    loss = loss * keep
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (pixel_weight * keep).sum().clamp_min(torch.finfo(loss.dtype).tiny)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """OHEM cross-entropy.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: ``(B, *spatial)`` integer labels.
        thresh: probability threshold in ``(0, 1]``; pixels with ``p_y <= thresh`` are hard.
        min_kept: minimum number of pixels kept (over the whole batch); if there are no more valid pixels than
            this, all valid pixels are kept.
        weight: optional per-class weights.
        ignore_index: label value that is ignored.
        reduction: ``"mean"`` (over kept pixels, weighted like ``F.cross_entropy``), ``"sum"`` or ``"none"``
            (``(B, *spatial)`` with 0 at pixels not kept).

    Returns:
        The loss.
    """
    check_reduction(reduction)
    loss, pixel_weight, valid = pixel_cross_entropy(logits, target, weight, ignore_index)
    with torch.no_grad():
        prob = torch.exp(target_log_prob(class_log_probs(logits.detach()), target, ignore_index)[0])
        valid_prob = prob[valid]
        n_valid = valid_prob.numel()
        if n_valid <= min_kept:
            keep = valid
        else:
            threshold = thresh
            if min_kept > 0:
                kth = valid_prob.kthvalue(min_kept).values.item()
                threshold = max(threshold, kth)
            keep = valid & (prob <= threshold)
    return _masked_reduce(loss, pixel_weight, keep, reduction)


def topk_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    k: float = 10.0,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the ``k`` percent hardest valid pixels (highest loss) in the batch.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: ``(B, *spatial)`` integer labels.
        k: percentage of valid pixels kept, in ``(0, 100]`` (nnU-Net convention; ``ceil`` of the count).
        weight: optional per-class weights.
        ignore_index: label value that is ignored.
        reduction: ``"mean"`` over kept pixels, ``"sum"`` or ``"none"`` (0 at pixels not kept).

    Returns:
        The loss.
    """
    check_reduction(reduction)
    loss, pixel_weight, valid = pixel_cross_entropy(logits, target, weight, ignore_index)
    with torch.no_grad():
        n_keep = math.ceil(int(valid.sum()) * k / 100.0)
        scores = torch.where(valid, loss.detach(), torch.full_like(loss, -math.inf)).flatten()
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[scores.topk(n_keep).indices] = True
        keep = keep.view_as(valid) & valid
    return _masked_reduce(loss, pixel_weight, keep, reduction)


class OhemCrossEntropyLoss(SegLoss):
    """Module form of :func:`ohem_cross_entropy`.

    Args:
        thresh: probability threshold in ``(0, 1]``.
        min_kept: minimum number of kept pixels per batch, ``>= 0``.
        weight: optional per-class weights.
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        weight=None,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        self.thresh = check_range("thresh", thresh, 0.0, 1.0, low_open=True)
        if not isinstance(min_kept, int) or min_kept < 0:
            raise ValueError(f"min_kept must be an integer >= 0, got {min_kept!r}")
        self.min_kept = min_kept
        self.register_class_weight(weight)
        self.ignore_index = ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ohem_cross_entropy(
            logits, target, self.thresh, self.min_kept, self.weight, self.ignore_index, self.reduction
        )


class TopKCrossEntropyLoss(SegLoss):
    """Module form of :func:`topk_cross_entropy`.

    Args:
        k: percentage of hardest valid pixels kept, in ``(0, 100]``.
        weight: optional per-class weights.
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        k: float = 10.0,
        weight=None,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        self.k = check_range("k", k, 0.0, 100.0, low_open=True)
        self.register_class_weight(weight)
        self.ignore_index = ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return topk_cross_entropy(logits, target, self.k, self.weight, self.ignore_index, self.reduction)
