"""Overlap losses on logits: Dice, Generalized Dice, Jaccard (soft IoU), Tversky, Focal Tversky, log-cosh Dice.

Papers:
    - Dice: Milletari, Navab, Ahmadi (2016), "V-Net: Fully Convolutional Neural Networks for Volumetric Medical
      Image Segmentation", 3DV.
    - Generalized Dice: Sudre et al. (2017), "Generalised Dice overlap as a deep learning loss function for highly
      unbalanced segmentations", DLMIA.
    - Tversky: Salehi, Erdogmus, Gholipour (2017), "Tversky loss function for image segmentation using 3D fully
      convolutional deep networks", MLMI.
    - Focal Tversky: Abraham, Khan (2019), "A novel focal Tversky loss function with improved attention U-Net for
      lesion segmentation", ISBI.
    - Log-cosh Dice: Jadon (2020), "A survey of loss functions for semantic segmentation", CIBCB.

Conventions shared by every loss here:

- Inputs are logits ``(B, K, *spatial)``: softmax over ``K`` for ``mode="multiclass"``, sigmoid for ``"binary"``
  (``K == 1``) and ``"multilabel"``.
- Targets: ``(B, *spatial)`` class ids for multiclass; ``(B, *spatial)`` or ``(B, 1, *spatial)`` in ``{0, 1}`` for
  binary; ``(B, K, *spatial)`` in ``{0, 1}`` for multilabel (per element). Pixels (elements) equal to
  ``ignore_index`` are zeroed in both prediction and target, so they add nothing to the value and get exactly zero
  gradient. A target whose spatial size differs from the logits (auxiliary heads) is resized with nearest.
- Soft counts per class ``c`` over the aggregation unit (the whole batch, or each image with ``per_image=True``):
  ``TP = sum p*g``, ``FP = sum p - TP``, ``FN = sum g - TP`` (with ``squared=True``, ``sum p**2`` and ``sum g**2``
  replace ``sum p`` and ``sum g``, as MONAI's ``squared_pred``).
- Smoothing: ``smooth`` is added to the numerator and ``smooth_dr`` (defaults to ``smooth``) to the denominator of
  the score, written in its natural form, and the denominator is then clamped to at least ``eps``:

  * Dice    ``(2 TP + smooth) / (sum p + sum g + smooth_dr)``  (Milletari; MONAI's ``smooth_nr/smooth_dr``)
  * Jaccard ``(TP + smooth) / (sum p + sum g - TP + smooth_dr)``
  * Tversky ``(TP + smooth) / (TP + alpha FP + beta FN + smooth_dr)``  (smp and MONAI)

  So Tversky with ``alpha = beta = 0.5`` and smoothing ``s`` equals Dice with smoothing ``2 s``, and smp's Dice
  with ``smooth=s`` (which smp computes as a Tversky score) equals ours with ``smooth=2 s``.
- Absent classes: a class with no (non-ignored) target pixel in an aggregation unit has ``TP = FN = 0``. With
  ``smooth == 0`` its score is undefined (``0 / 0``, or ``0`` once the denominator is clamped); with
  ``smooth > 0`` it is ``smooth / (c sum p + smooth_dr)`` (``c`` the false-positive weight: 1 for Dice and
  Jaccard, ``alpha`` for Tversky), so its loss penalises the probability mass put on the class (as MONAI, which
  never masks). ``mask_absent=None`` (default) masks such entries exactly when ``smooth == 0`` and keeps them
  otherwise; ``True`` / ``False`` force it. Masked entries contribute zero, and ``reduction="mean"`` averages
  over the entries that are kept (weighted by ``weight`` when given), so an absent class never dilutes the loss
  of the present ones. Nothing is ever NaN.
- What smp does (``segmentation_models_pytorch`` ``DiceLoss`` / ``JaccardLoss`` / ``TverskyLoss``, checked
  against 0.6.0): it computes every class's loss, multiplies it by ``target.sum() > 0`` for **every** ``smooth``
  (not only 0), then takes the plain mean over all ``K`` channels (``sum(w l) / sum(w)`` over all channels with
  ``class_weights``), so a masked class adds 0 to the numerator but still counts in the denominator. Two
  intentional differences follow, both asserted against smp in the parity tests: (1) with ``smooth > 0`` our
  default keeps absent classes (pass ``mask_absent=True`` to mask them as smp does); (2) our mean skips masked
  entries, so smp's value is ``loss(..., mask_absent=True, reduction="none").mean()`` (unweighted: our kept mean
  times ``n_kept / K``). The two agree whenever every class is present.
- ``reduction="none"`` returns the per-class losses, shape ``(K',)`` or ``(B, K')`` with ``per_image=True``
  (zeros at masked entries); ``"sum"`` and ``"mean"`` reduce them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from maskworks.losses._utils import check_mode, check_reduction, one_hot_with_ignore, valid_mask
from maskworks.losses.base import SegLoss

__all__ = [
    "dice_loss",
    "generalized_dice_loss",
    "jaccard_loss",
    "tversky_loss",
    "focal_tversky_loss",
    "log_cosh_dice_loss",
    "DiceLoss",
    "GeneralizedDiceLoss",
    "JaccardLoss",
    "TverskyLoss",
    "FocalTverskyLoss",
]

GDL_WEIGHT_TYPES = ("square", "simple", "uniform")


# ----------------------------------------------------------------------------------------------------------- helpers
def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    """Half precision is promoted to float32; float32/float64 are kept (float64 for gradcheck)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def match_target(target: torch.Tensor, logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Checks ``target`` against ``logits`` and resizes it (nearest) when only the spatial size differs.

    Args:
        target: class ids ``(B, *spatial)``, or ``(B, 1|K, *spatial)`` for binary / multilabel.
        logits: ``(B, K, *spatial)``.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.

    Returns:
        The target with the spatial size of ``logits`` (``(B, *spatial)`` for multiclass, ``(B, K, *spatial)``
        for binary and multilabel).
    """
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, K, *spatial), got shape {tuple(logits.shape)}")
    if mode == "binary" and logits.shape[1] != 1:
        raise ValueError(f"mode='binary' needs logits with 1 channel, got {logits.shape[1]}")
    if mode == "multiclass" and logits.shape[1] < 2:
        raise ValueError("mode='multiclass' needs logits with K >= 2 channels (use mode='binary' for one channel)")
    if mode == "binary" and target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    want = logits.dim() - 1 if mode == "multiclass" else logits.dim()
    if target.dim() != want or target.shape[0] != logits.shape[0]:
        raise ValueError(f"mode={mode!r}: logits {tuple(logits.shape)} do not fit target {tuple(target.shape)}")
    if mode == "multilabel" and target.shape[1] != logits.shape[1]:
        raise ValueError(f"mode='multilabel': target has {target.shape[1]} channels, logits {logits.shape[1]}")
    spatial = target.shape[1:] if mode == "multiclass" else target.shape[2:]
    if spatial != logits.shape[2:]:
        t = target.unsqueeze(1) if mode == "multiclass" else target
        t = F.interpolate(t.float(), size=logits.shape[2:], mode="nearest").to(target.dtype)
        target = t[:, 0] if mode == "multiclass" else t
    return target


def prepare_probs_targets(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str,
    ignore_index: int | None = 255,
    classes: Sequence[int] | None = None,
    include_background: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, dense targets and valid mask, flattened to ``(B, K', N)``, with ignored pixels zeroed.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: see the module docstring for the shape per mode.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        ignore_index: label value whose pixels are excluded (``None``: none).
        classes: channels to keep (default: all).
        include_background: when False, channel 0 is dropped (no effect when ``K == 1``).

    Returns:
        ``(probs, gt, valid)``, each ``(B, K', N)`` (``valid`` may be ``(B, 1, N)``) in the logits' float dtype;
        ``probs`` and ``gt`` are zero where ``valid`` is zero, so ignored pixels get zero gradient.
    """
    logits = _float_logits(logits)
    target = match_target(target, logits, mode)
    b, k = logits.shape[:2]
    if mode == "multiclass":
        probs = logits.softmax(dim=1)
        gt, valid = one_hot_with_ignore(target, k, ignore_index)
    else:
        probs = logits.sigmoid()
        valid = valid_mask(target, ignore_index)
        gt = torch.where(valid, target, torch.zeros_like(target))
        if not gt.is_floating_point() and ((gt != 0) & (gt != 1)).any():
            bad = torch.unique(gt[(gt != 0) & (gt != 1)]).tolist()[:10]
            raise ValueError(f"mode={mode!r}: target holds labels {bad} (expected 0, 1 or ignore_index)")
    all_valid = bool(valid.all())
    valid = valid.to(logits.dtype)
    gt = gt.to(logits.dtype)
    if not all_valid:  # zero ignored pixels (skipped when nothing is ignored: two full-size multiplies saved)
        gt = gt * valid
        probs = probs * valid
    if classes is not None or (not include_background and k > 1):
        keep = list(range(k)) if classes is None else [int(c) for c in classes]
        if any(c < 0 or c >= k for c in keep):
            raise ValueError(f"classes {list(keep)} out of range for {k} channels")
        if not include_background and k > 1:
            keep = [c for c in keep if c != 0]
        index = torch.as_tensor(keep, device=logits.device, dtype=torch.long)
        probs, gt = probs.index_select(1, index), gt.index_select(1, index)
        if valid.shape[1] > 1:
            valid = valid.index_select(1, index)
    return probs.reshape(b, probs.shape[1], -1), gt.reshape(b, gt.shape[1], -1), valid.reshape(b, valid.shape[1], -1)


def _soft_counts(
    probs: torch.Tensor, gt: torch.Tensor, per_image: bool, squared: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(TP, sum p, sum g)`` per class, shape ``(K',)`` or ``(B, K')``; squared sums with ``squared=True``."""
    dims = (2,) if per_image else (0, 2)
    tp = (probs * gt).sum(dims)
    if squared:
        return tp, (probs * probs).sum(dims), (gt * gt).sum(dims)
    return tp, probs.sum(dims), gt.sum(dims)


def _weighted_reduce(
    loss: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """Reduce per-class losses (last dim = classes), skipping masked entries and applying class weights."""
    w = torch.ones_like(loss) if keep is None else keep.to(loss.dtype).expand_as(loss)
    if weight is not None:
        w = w * weight.to(loss)
    if reduction == "none":
        return loss if keep is None else loss * keep
    total = (loss * w).sum()
    if reduction == "sum":
        return total
    denom = w.sum()
    return torch.where(denom > 0, total / denom.clamp_min(torch.finfo(loss.dtype).tiny), total * 0)


def _select_weight(
    weight: torch.Tensor | Sequence[float] | None,
    num_channels: int,
    classes: Sequence[int] | None,
    include_background: bool,
) -> torch.Tensor | None:
    """Class weights given for all ``K`` channels, restricted to the kept channels."""
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=torch.float64)
    if weight.numel() != num_channels:
        raise ValueError(f"weight has {weight.numel()} entries, logits have {num_channels} channels")
    keep = list(range(num_channels)) if classes is None else [int(c) for c in classes]
    if not include_background and num_channels > 1:
        keep = [c for c in keep if c != 0]
    return weight[keep]


def _check_common(
    mode: str,
    smooth: float,
    smooth_dr: float | None,
    eps: float,
    classes: Sequence[int] | None,
    weight: torch.Tensor | Sequence[float] | None,
    reduction: str,
) -> None:
    check_mode(mode)
    check_reduction(reduction)
    if smooth < 0 or (smooth_dr is not None and smooth_dr < 0):
        raise ValueError(f"smooth and smooth_dr must be >= 0, got {smooth} and {smooth_dr}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if classes is not None:
        if mode == "binary":
            raise ValueError("classes cannot be chosen with mode='binary' (there is one channel)")
        if len(classes) == 0 or any(int(c) < 0 for c in classes):
            raise ValueError(f"classes must be a non-empty list of channel indices, got {classes}")
    if weight is not None:
        w = torch.as_tensor(weight)
        if w.dim() != 1 or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weight must be a 1-D sequence of non-negative per-class weights with a positive sum")


def _overlap_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str,
    tp_weight: float,
    alpha: float,
    beta: float,
    gamma: float = 1.0,
    log_cosh: bool = False,
    classes: Sequence[int] | None,
    include_background: bool,
    smooth: float,
    smooth_dr: float | None,
    eps: float,
    squared: bool,
    per_image: bool,
    log_loss: bool,
    ignore_index: int | None,
    weight: torch.Tensor | Sequence[float] | None,
    mask_absent: bool | None,
    reduction: str,
) -> torch.Tensor:
    """Shared core: score ``(w TP + s) / (w TP + alpha FP + beta FN + s_dr)`` per class, then loss and reduction."""
    _check_common(mode, smooth, smooth_dr, eps, classes, weight, reduction)
    probs, gt, _ = prepare_probs_targets(logits, target, mode, ignore_index, classes, include_background)
    tp, psum, gsum = _soft_counts(probs, gt, per_image, squared)
    fp, fn = psum - tp, gsum - tp
    smooth_dr = smooth if smooth_dr is None else smooth_dr
    score = (tp_weight * tp + smooth) / (tp_weight * tp + alpha * fp + beta * fn + smooth_dr).clamp_min(eps)
    if log_loss:
        loss = -torch.log(score.clamp_min(eps))
    else:
        loss = 1.0 - score
    if gamma != 1.0:  # focal Tversky; safe power: exactly zero value and gradient where the loss is zero
        base = loss.clamp_min(0)
        pos = base > 0
        loss = torch.where(pos, torch.where(pos, base, torch.ones_like(base)) ** gamma, torch.zeros_like(base))
    if log_cosh:  # log(cosh(x)) = x + softplus(-2x) - log 2, stable for every x
        loss = loss + F.softplus(-2.0 * loss) - math.log(2.0)
    if mask_absent is None:
        mask_absent = smooth == 0
    keep = gsum > 0 if mask_absent else None
    w = _select_weight(weight, logits.shape[1], classes, include_background)
    return _weighted_reduce(loss, keep, w, reduction)


# -------------------------------------------------------------------------------------------------------- functional
def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str = "multiclass",
    *,
    classes: Sequence[int] | None = None,
    include_background: bool = True,
    smooth: float = 0.0,
    smooth_dr: float | None = None,
    eps: float = 1e-7,
    squared: bool = False,
    per_image: bool = False,
    log_loss: bool = False,
    ignore_index: int | None = 255,
    weight: torch.Tensor | Sequence[float] | None = None,
    mask_absent: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 TP + smooth) / (sum p + sum g + smooth_dr)`` per class (Milletari et al. 2016).

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: class ids (multiclass) or ``{0, 1}`` masks (binary / multilabel), ``ignore_index`` allowed.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        classes: channels that enter the loss (default: all).
        include_background: when False, channel 0 is left out (multiclass / multilabel).
        smooth: added to the numerator ``2 TP``.
        smooth_dr: added to the denominator ``sum p + sum g`` (default: ``smooth``).
        eps: lower bound of the denominator.
        squared: use ``sum p**2 + sum g**2`` in the denominator.
        per_image: one Dice per image and class instead of one per class over the whole batch.
        log_loss: ``-log(dice)`` instead of ``1 - dice`` (as smp).
        ignore_index: label value of pixels that are excluded.
        weight: per-class weights ``(K,)``; the mean becomes ``sum w l / sum w`` over kept entries.
        mask_absent: mask classes absent from the target (default: only when ``smooth == 0``; smp masks them for
            every ``smooth``, see the module docstring).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-class losses).

    Returns:
        The loss; shape ``()`` or, with ``reduction="none"``, ``(K',)`` / ``(B, K')``.
    """
    return _overlap_loss(
        logits, target, mode=mode, tp_weight=2.0, alpha=1.0, beta=1.0, classes=classes,
        include_background=include_background, smooth=smooth, smooth_dr=smooth_dr, eps=eps, squared=squared,
        per_image=per_image, log_loss=log_loss, ignore_index=ignore_index, weight=weight, mask_absent=mask_absent,
        reduction=reduction,
    )  # fmt: skip


def jaccard_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str = "multiclass",
    *,
    classes: Sequence[int] | None = None,
    include_background: bool = True,
    smooth: float = 0.0,
    smooth_dr: float | None = None,
    eps: float = 1e-7,
    squared: bool = False,
    per_image: bool = False,
    log_loss: bool = False,
    ignore_index: int | None = 255,
    weight: torch.Tensor | Sequence[float] | None = None,
    mask_absent: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft Jaccard (IoU) loss ``1 - (TP + smooth) / (sum p + sum g - TP + smooth_dr)`` per class.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: class ids (multiclass) or ``{0, 1}`` masks (binary / multilabel), ``ignore_index`` allowed.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        classes: channels that enter the loss (default: all).
        include_background: when False, channel 0 is left out (multiclass / multilabel).
        smooth: added to the numerator ``TP``.
        smooth_dr: added to the denominator (default: ``smooth``).
        eps: lower bound of the denominator.
        squared: use ``sum p**2 + sum g**2 - TP`` as the union.
        per_image: one score per image and class instead of one per class over the batch.
        log_loss: ``-log(iou)`` instead of ``1 - iou``.
        ignore_index: label value of pixels that are excluded.
        weight: per-class weights ``(K,)``.
        mask_absent: mask classes absent from the target (default: only when ``smooth == 0``; smp masks them for
            every ``smooth``, see the module docstring).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-class losses).

    Returns:
        The loss; shape ``()`` or, with ``reduction="none"``, ``(K',)`` / ``(B, K')``.
    """
    return _overlap_loss(
        logits, target, mode=mode, tp_weight=1.0, alpha=1.0, beta=1.0, classes=classes,
        include_background=include_background, smooth=smooth, smooth_dr=smooth_dr, eps=eps, squared=squared,
        per_image=per_image, log_loss=log_loss, ignore_index=ignore_index, weight=weight, mask_absent=mask_absent,
        reduction=reduction,
    )  # fmt: skip


def _check_tversky(alpha: float, beta: float, gamma: float) -> None:
    if alpha < 0 or beta < 0 or alpha + beta <= 0:
        raise ValueError(f"alpha and beta must be >= 0 with a positive sum, got {alpha} and {beta}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str = "multiclass",
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    classes: Sequence[int] | None = None,
    include_background: bool = True,
    smooth: float = 0.0,
    smooth_dr: float | None = None,
    eps: float = 1e-7,
    per_image: bool = False,
    log_loss: bool = False,
    ignore_index: int | None = 255,
    weight: torch.Tensor | Sequence[float] | None = None,
    mask_absent: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Tversky loss ``1 - (TP + smooth) / (TP + alpha FP + beta FN + smooth_dr)`` per class (Salehi et al. 2017).

    ``alpha`` weighs false positives and ``beta`` false negatives (defaults 0.3 / 0.7 from the paper);
    ``alpha = beta = 0.5`` is Dice (with doubled smoothing), ``alpha = beta = 1`` is Jaccard.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: class ids (multiclass) or ``{0, 1}`` masks (binary / multilabel), ``ignore_index`` allowed.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        alpha: weight of false positives.
        beta: weight of false negatives.
        classes: channels that enter the loss (default: all).
        include_background: when False, channel 0 is left out (multiclass / multilabel).
        smooth: added to the numerator ``TP``.
        smooth_dr: added to the denominator (default: ``smooth``).
        eps: lower bound of the denominator.
        per_image: one score per image and class instead of one per class over the batch.
        log_loss: ``-log(TI)`` instead of ``1 - TI``.
        ignore_index: label value of pixels that are excluded.
        weight: per-class weights ``(K,)``.
        mask_absent: mask classes absent from the target (default: only when ``smooth == 0``; smp masks them for
            every ``smooth``, see the module docstring).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-class losses).

    Returns:
        The loss; shape ``()`` or, with ``reduction="none"``, ``(K',)`` / ``(B, K')``.
    """
    _check_tversky(alpha, beta, 1.0)
    return _overlap_loss(
        logits, target, mode=mode, tp_weight=1.0, alpha=alpha, beta=beta, classes=classes,
        include_background=include_background, smooth=smooth, smooth_dr=smooth_dr, eps=eps, squared=False,
        per_image=per_image, log_loss=log_loss, ignore_index=ignore_index, weight=weight, mask_absent=mask_absent,
        reduction=reduction,
    )  # fmt: skip


def focal_tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str = "multiclass",
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 0.75,
    classes: Sequence[int] | None = None,
    include_background: bool = True,
    smooth: float = 0.0,
    smooth_dr: float | None = None,
    eps: float = 1e-7,
    per_image: bool = False,
    ignore_index: int | None = 255,
    weight: torch.Tensor | Sequence[float] | None = None,
    mask_absent: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal Tversky loss ``(1 - TI_c) ** gamma`` per class, then reduced (Abraham & Khan 2019).

    The paper writes the exponent as ``1 / gamma`` with ``gamma`` in ``[1, 3]`` and uses ``4/3``; here ``gamma``
    is the exponent itself (default ``0.75 = 1 / (4/3)``). The power is applied per class before averaging (smp
    applies it to the class mean; both agree for one class). ``gamma = 1`` is the Tversky loss.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: class ids (multiclass) or ``{0, 1}`` masks (binary / multilabel), ``ignore_index`` allowed.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        alpha: weight of false positives.
        beta: weight of false negatives.
        gamma: exponent applied to each class's Tversky loss.
        classes: channels that enter the loss (default: all).
        include_background: when False, channel 0 is left out (multiclass / multilabel).
        smooth: added to the numerator ``TP``.
        smooth_dr: added to the denominator (default: ``smooth``).
        eps: lower bound of the denominator.
        per_image: one score per image and class instead of one per class over the batch.
        ignore_index: label value of pixels that are excluded.
        weight: per-class weights ``(K,)``.
        mask_absent: mask classes absent from the target (default: only when ``smooth == 0``; smp masks them for
            every ``smooth``, see the module docstring).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-class losses).

    Returns:
        The loss; shape ``()`` or, with ``reduction="none"``, ``(K',)`` / ``(B, K')``.
    """
    _check_tversky(alpha, beta, gamma)
    return _overlap_loss(
        logits, target, mode=mode, tp_weight=1.0, alpha=alpha, beta=beta, gamma=gamma, classes=classes,
        include_background=include_background, smooth=smooth, smooth_dr=smooth_dr, eps=eps, squared=False,
        per_image=per_image, log_loss=False, ignore_index=ignore_index, weight=weight, mask_absent=mask_absent,
        reduction=reduction,
    )  # fmt: skip


def log_cosh_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str = "multiclass",
    *,
    classes: Sequence[int] | None = None,
    include_background: bool = True,
    smooth: float = 0.0,
    smooth_dr: float | None = None,
    eps: float = 1e-7,
    squared: bool = False,
    per_image: bool = False,
    ignore_index: int | None = 255,
    weight: torch.Tensor | Sequence[float] | None = None,
    mask_absent: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Log-cosh Dice loss ``log(cosh(L_dice))`` (Jadon 2020), applied to each per-class Dice loss, then reduced.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: as for :func:`dice_loss`.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        classes: channels that enter the loss (default: all).
        include_background: when False, channel 0 is left out (multiclass / multilabel).
        smooth: added to the numerator ``2 TP``.
        smooth_dr: added to the denominator (default: ``smooth``).
        eps: lower bound of the denominator.
        squared: squared denominator.
        per_image: one Dice per image and class instead of one per class over the batch.
        ignore_index: label value of pixels that are excluded.
        weight: per-class weights ``(K,)``.
        mask_absent: mask classes absent from the target (default: only when ``smooth == 0``; smp masks them for
            every ``smooth``, see the module docstring).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-class losses).

    Returns:
        The loss; shape as for :func:`dice_loss`.
    """
    return _overlap_loss(
        logits, target, mode=mode, tp_weight=2.0, alpha=1.0, beta=1.0, classes=classes,
        include_background=include_background, smooth=smooth, smooth_dr=smooth_dr, eps=eps, squared=squared,
        per_image=per_image, log_loss=False, ignore_index=ignore_index, weight=weight, mask_absent=mask_absent,
        reduction=reduction, log_cosh=True,
    )  # fmt: skip


def generalized_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mode: str = "multiclass",
    *,
    weight_type: str = "square",
    classes: Sequence[int] | None = None,
    include_background: bool = True,
    smooth: float = 1e-5,
    smooth_dr: float | None = None,
    eps: float = 1e-7,
    per_image: bool = False,
    ignore_index: int | None = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized Dice loss ``1 - (2 sum_c w_c TP_c + s) / (sum_c w_c (sum p_c + sum g_c) + s_dr)`` (Sudre 2017).

    ``w_c = 1 / G_c**2`` (``"square"``), ``1 / G_c`` (``"simple"``) or ``1`` (``"uniform"``) with ``G_c`` the
    target volume of class ``c``; a class absent from the target (infinite weight) gets the largest finite weight,
    as in NiftyNet and MONAI. Aggregation units (the batch, or each image) without any valid target pixel are
    skipped by the mean.

    Args:
        logits: ``(B, K, *spatial)`` raw scores.
        target: class ids (multiclass) or ``{0, 1}`` masks (binary / multilabel), ``ignore_index`` allowed.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        weight_type: ``"square"``, ``"simple"`` or ``"uniform"``.
        classes: channels that enter the loss (default: all).
        include_background: when False, channel 0 is left out (multiclass / multilabel).
        smooth: added to the numerator (MONAI's ``smooth_nr``, default 1e-5 as there).
        smooth_dr: added to the denominator (default: ``smooth``).
        eps: lower bound of the denominator.
        per_image: one score per image (MONAI's ``batch=False``) instead of one over the batch.
        ignore_index: label value of pixels that are excluded.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)`` with ``per_image``, else a scalar).

    Returns:
        The loss.
    """
    _check_common(mode, smooth, smooth_dr, eps, classes, None, reduction)
    if weight_type not in GDL_WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {GDL_WEIGHT_TYPES}, got {weight_type!r}")
    probs, gt, _ = prepare_probs_targets(logits, target, mode, ignore_index, classes, include_background)
    tp, psum, gsum = _soft_counts(probs, gt, per_image)
    if weight_type == "square":
        w = 1.0 / (gsum * gsum)
    elif weight_type == "simple":
        w = 1.0 / gsum
    else:
        w = torch.ones_like(gsum)
    inf = torch.isinf(w)
    w = w.masked_fill(inf, 0.0)
    w = w + inf * w.amax(dim=-1, keepdim=True)
    smooth_dr = smooth if smooth_dr is None else smooth_dr
    numer = 2.0 * (w * tp).sum(-1) + smooth
    denom = (w * (psum + gsum)).sum(-1) + smooth_dr
    loss = 1.0 - numer / denom.clamp_min(eps)
    return _weighted_reduce(loss, gsum.sum(-1) > 0, None, reduction)


# ----------------------------------------------------------------------------------------------------------- modules
class _OverlapLoss(SegLoss):
    """Shared constructor of the Dice / Jaccard / Tversky / Focal Tversky modules (options validated here)."""

    _fn = staticmethod(dice_loss)

    def __init__(
        self,
        mode: str = "multiclass",
        *,
        classes: Sequence[int] | None = None,
        include_background: bool = True,
        smooth: float = 0.0,
        smooth_dr: float | None = None,
        eps: float = 1e-7,
        per_image: bool = False,
        ignore_index: int | None = 255,
        weight: torch.Tensor | Sequence[float] | None = None,
        mask_absent: bool | None = None,
        reduction: str = "mean",
        aux_weight: float = 0.4,
        **extra,
    ):
        super().__init__(reduction, aux_weight)
        _check_common(mode, smooth, smooth_dr, eps, classes, weight, reduction)
        self.mode = mode
        self.classes = None if classes is None else [int(c) for c in classes]
        self.include_background = include_background
        self.smooth = smooth
        self.smooth_dr = smooth_dr
        self.eps = eps
        self.per_image = per_image
        self.ignore_index = ignore_index
        self.mask_absent = mask_absent
        self.register_class_weight(weight)
        self.extra = extra

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return type(self)._fn(
            logits, target, self.mode, classes=self.classes, include_background=self.include_background,
            smooth=self.smooth, smooth_dr=self.smooth_dr, eps=self.eps, per_image=self.per_image,
            ignore_index=self.ignore_index, weight=self.weight, mask_absent=self.mask_absent,
            reduction=self.reduction, **self.extra,
        )  # fmt: skip


class DiceLoss(_OverlapLoss):
    """Soft Dice loss module; see :func:`dice_loss` for the formula and every option.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        squared: squared denominator ``sum p**2 + sum g**2``.
        log_loss: ``-log(dice)`` instead of ``1 - dice``.
        **kwargs: ``classes``, ``include_background``, ``smooth``, ``smooth_dr``, ``eps``, ``per_image``,
            ``ignore_index``, ``weight``, ``mask_absent``, ``reduction``, ``aux_weight``.
    """

    _fn = staticmethod(dice_loss)

    def __init__(self, mode: str = "multiclass", *, squared: bool = False, log_loss: bool = False, **kwargs):
        super().__init__(mode, squared=squared, log_loss=log_loss, **kwargs)


class JaccardLoss(_OverlapLoss):
    """Soft Jaccard (IoU) loss module; see :func:`jaccard_loss`.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        squared: squared sums in the union.
        log_loss: ``-log(iou)`` instead of ``1 - iou``.
        **kwargs: as for :class:`DiceLoss`.
    """

    _fn = staticmethod(jaccard_loss)

    def __init__(self, mode: str = "multiclass", *, squared: bool = False, log_loss: bool = False, **kwargs):
        super().__init__(mode, squared=squared, log_loss=log_loss, **kwargs)


class TverskyLoss(_OverlapLoss):
    """Tversky loss module; see :func:`tversky_loss`.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        alpha: weight of false positives (default 0.3).
        beta: weight of false negatives (default 0.7).
        log_loss: ``-log(TI)`` instead of ``1 - TI``.
        **kwargs: as for :class:`DiceLoss`.
    """

    _fn = staticmethod(tversky_loss)

    def __init__(
        self, mode: str = "multiclass", *, alpha: float = 0.3, beta: float = 0.7, log_loss: bool = False, **kwargs
    ):
        _check_tversky(alpha, beta, 1.0)
        super().__init__(mode, alpha=alpha, beta=beta, log_loss=log_loss, **kwargs)


class FocalTverskyLoss(_OverlapLoss):
    """Focal Tversky loss module; see :func:`focal_tversky_loss`.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        alpha: weight of false positives (default 0.3).
        beta: weight of false negatives (default 0.7).
        gamma: exponent of each class's Tversky loss (default 0.75).
        **kwargs: as for :class:`DiceLoss`.
    """

    _fn = staticmethod(focal_tversky_loss)

    def __init__(
        self, mode: str = "multiclass", *, alpha: float = 0.3, beta: float = 0.7, gamma: float = 0.75, **kwargs
    ):
        _check_tversky(alpha, beta, gamma)
        super().__init__(mode, alpha=alpha, beta=beta, gamma=gamma, **kwargs)


class GeneralizedDiceLoss(SegLoss):
    """Generalized Dice loss module; see :func:`generalized_dice_loss`.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        weight_type: ``"square"``, ``"simple"`` or ``"uniform"``.
        classes: channels that enter the loss (default: all).
        include_background: when False, channel 0 is left out.
        smooth: numerator smoothing (default 1e-5).
        smooth_dr: denominator smoothing (default: ``smooth``).
        eps: lower bound of the denominator.
        per_image: one score per image instead of one over the batch.
        ignore_index: label value of pixels that are excluded.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        mode: str = "multiclass",
        *,
        weight_type: str = "square",
        classes: Sequence[int] | None = None,
        include_background: bool = True,
        smooth: float = 1e-5,
        smooth_dr: float | None = None,
        eps: float = 1e-7,
        per_image: bool = False,
        ignore_index: int | None = 255,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        _check_common(mode, smooth, smooth_dr, eps, classes, None, reduction)
        if weight_type not in GDL_WEIGHT_TYPES:
            raise ValueError(f"weight_type must be one of {GDL_WEIGHT_TYPES}, got {weight_type!r}")
        self.kwargs = dict(
            mode=mode, weight_type=weight_type, classes=None if classes is None else [int(c) for c in classes],
            include_background=include_background, smooth=smooth, smooth_dr=smooth_dr, eps=eps,
            per_image=per_image, ignore_index=ignore_index, reduction=reduction,
        )  # fmt: skip

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return generalized_dice_loss(logits, target, **self.kwargs)
