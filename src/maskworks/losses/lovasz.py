"""Lovász-Softmax and Lovász hinge losses on logits.

Berman, Rannen Triki, Blaschko (2018), "The Lovász-Softmax loss: A tractable surrogate for the optimization of the
intersection-over-union measure in neural networks", CVPR. Follows the reference implementation
(bermanmaxim/LovaszSoftmax, ``pytorch/lovasz_losses.py``): per class, the pixel errors are sorted in decreasing
order **along the pixel axis** (all pixels of the batch, or of each image with ``per_image=True``) and dotted with
``lovasz_grad`` of the ground truth sorted the same way. The seed sorted a ``(B, H, W)`` error map along its last
axis only, mixing rows of different images; here errors are flattened to ``(groups, classes, pixels)`` first.

Both losses are vectorised over classes and images (one sort for all of them). Ignored pixels are given zero error
and a sort key below every valid error, so they land after all valid pixels, where they change neither the
value (``lovasz_grad`` at a position depends only on the pixels before it) nor the gradient (exactly zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from maskworks.losses._utils import binary_label_error, check_reduction, one_hot_with_ignore, valid_mask
from maskworks.losses.base import SegLoss
from maskworks.losses.overlap import _float_logits, match_target

__all__ = ["lovasz_grad", "lovasz_softmax", "lovasz_hinge", "LovaszSoftmaxLoss", "LovaszHingeLoss"]


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al., Alg. 1).

    Args:
        gt_sorted: ``(..., P)`` binary ground truth, sorted by decreasing error along the last axis.

    Returns:
        ``(..., P)`` weights ``J(1..i) - J(1..i-1)`` of the sorted errors.
    """
    gts = gt_sorted.sum(-1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(-1)
    union = gts + (1.0 - gt_sorted).cumsum(-1)
    jaccard = 1.0 - intersection / union
    if gt_sorted.shape[-1] > 1:
        jaccard = torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)
    return jaccard


def _sorted_dot(errors: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``sum_i errors_sorted[i] * lovasz_grad(gt_sorted)[i]`` along the last axis; invalid pixels sort last.

    ``errors`` must already be zero at invalid pixels; the sort key puts them after every valid pixel.
    """
    key = torch.where(valid, errors.detach(), torch.full_like(errors, float("-inf")))
    perm = torch.argsort(key, dim=-1, descending=True)
    return (errors.gather(-1, perm) * lovasz_grad(gt.gather(-1, perm))).sum(-1)


def _reduce_groups(loss: torch.Tensor, per_image: bool, reduction: str) -> torch.Tensor:
    """Loss per group ``(G,)`` -> mean / sum over images, or ``(B,)`` / scalar with ``"none"``."""
    if not per_image:
        return loss[0]
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _check_classes(classes: str | Sequence[int]) -> str | list[int]:
    if isinstance(classes, str):
        if classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present', 'all' or a list of class ids, got {classes!r}")
        return classes
    out = [int(c) for c in classes]
    if not out or any(c < 0 for c in out):
        raise ValueError(f"classes must be a non-empty list of non-negative class ids, got {classes}")
    return out


def lovasz_softmax(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    classes: str | Sequence[int] = "present",
    per_image: bool = False,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multiclass Lovász-Softmax loss of logits (softmax applied here).

    Args:
        logits: ``(B, K, *spatial)`` raw scores, ``K >= 2``.
        target: ``(B, *spatial)`` class ids; ``ignore_index`` pixels are excluded.
        classes: ``"present"`` (average over classes present in the target of each group, the reference default),
            ``"all"``, or a list of class ids to average.
        per_image: one loss per image, averaged over images, instead of one over the whole batch.
        ignore_index: label value that is excluded.
        reduction: with ``per_image``, ``"mean"`` / ``"sum"`` over images or ``"none"`` (``(B,)``); without it the
            loss is a scalar for every reduction.

    Returns:
        The loss. A group without any class to average (e.g. only ignored pixels) contributes 0.
    """
    classes = _check_classes(classes)
    check_reduction(reduction)
    logits = _float_logits(logits)
    target = match_target(target, logits, "multiclass")
    b, k = logits.shape[:2]
    probs = logits.softmax(dim=1).reshape(b, k, -1)
    fg, valid = one_hot_with_ignore(target, k, ignore_index)
    fg, valid = fg.to(probs.dtype).reshape(b, k, -1), valid.reshape(b, 1, -1)
    if isinstance(classes, list):
        if max(classes) >= k:
            raise ValueError(f"classes {classes} out of range for {k} classes")
        index = torch.as_tensor(classes, device=logits.device)
        probs, fg = probs.index_select(1, index), fg.index_select(1, index)
    errors = (fg - probs).abs() * valid
    if not per_image:  # (1, K', B*N): every pixel of the batch in one sort per class
        errors, fg, valid = (t.transpose(0, 1).reshape(1, t.shape[1], -1) for t in (errors, fg, valid))
    losses = _sorted_dot(errors, fg, valid.expand_as(errors))  # (G, K')
    if classes == "present":
        present = (fg.sum(-1) > 0).to(losses.dtype)
        loss = (losses * present).sum(-1) / present.sum(-1).clamp_min(1)
    else:
        loss = losses.mean(-1)
    return _reduce_groups(loss, per_image, reduction)


def lovasz_hinge(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    per_image: bool = True,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary Lovász hinge loss of logits (no sigmoid: the hinge acts on the raw score).

    Args:
        logits: ``(B, 1, *spatial)`` raw scores.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` in ``{0, 1}``; ``ignore_index`` pixels are excluded.
        per_image: one loss per image, averaged (the reference default), instead of one over the batch.
        ignore_index: label value that is excluded.
        reduction: with ``per_image``, ``"mean"`` / ``"sum"`` over images or ``"none"`` (``(B,)``); without it the
            loss is a scalar.

    Returns:
        The loss.
    """
    check_reduction(reduction)
    logits = _float_logits(logits)
    target = match_target(target, logits, "binary")
    b = logits.shape[0]
    valid = valid_mask(target, ignore_index)
    gt = torch.where(valid, target, torch.zeros_like(target))
    if ((gt != 0) & (gt != 1)).any():
        raise binary_label_error(target, valid, ignore_index, "lovasz_hinge")
    gt = gt.to(logits.dtype).reshape(b, -1)
    valid = valid.reshape(b, -1)
    errors = F.relu(1.0 - logits.reshape(b, -1) * (2.0 * gt - 1.0)) * valid
    if not per_image:
        errors, gt, valid = errors.reshape(1, -1), gt.reshape(1, -1), valid.reshape(1, -1)
    return _reduce_groups(_sorted_dot(errors, gt, valid), per_image, reduction)


class LovaszSoftmaxLoss(SegLoss):
    """Lovász-Softmax loss module (Berman et al. 2018); see :func:`lovasz_softmax`.

    Args:
        classes: ``"present"``, ``"all"`` or a list of class ids.
        per_image: one loss per image instead of one over the batch.
        ignore_index: label value that is excluded.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (over images with ``per_image``).
        aux_weight: weight of each auxiliary output's loss in ``{"out", "aux"}`` outputs.
    """

    def __init__(
        self,
        *,
        classes: str | Sequence[int] = "present",
        per_image: bool = False,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        self.classes = _check_classes(classes)
        self.per_image = per_image
        self.ignore_index = ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lovasz_softmax(
            logits,
            target,
            classes=self.classes,
            per_image=self.per_image,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class LovaszHingeLoss(SegLoss):
    """Binary Lovász hinge loss module (Berman et al. 2018); see :func:`lovasz_hinge`.

    Args:
        per_image: one loss per image (default) instead of one over the batch.
        ignore_index: label value that is excluded.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (over images with ``per_image``).
        aux_weight: weight of each auxiliary output's loss in ``{"out", "aux"}`` outputs.
    """

    def __init__(
        self,
        *,
        per_image: bool = True,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        self.per_image = per_image
        self.ignore_index = ignore_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lovasz_hinge(
            logits, target, per_image=self.per_image, ignore_index=self.ignore_index, reduction=self.reduction
        )
