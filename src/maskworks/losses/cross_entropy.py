"""Cross-entropy for segmentation logits, with ``ignore_index`` and deep-supervision outputs.

Models return logits ``(B, K, H, W)`` (``K = 1`` for binary tasks) or, in training with
auxiliary heads, ``{"out": logits, "aux": [logits, ...]}``. Targets are int64 ``(B, H, W)`` with
``255`` marking pixels that contribute nothing to the value or the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskworks.losses._utils import check_labels
from maskworks.losses.base import SegLoss, split_outputs

__all__ = ["cross_entropy", "CrossEntropyLoss", "split_outputs"]


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = 255,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multiclass CE for ``K > 1`` channels, binary CE with logits for ``K == 1``.

    The value (and gradient) equals ``F.cross_entropy`` for every batch with at least one counted pixel. A batch
    without one (every pixel ``ignore_index``, or only pixels of classes whose ``weight`` is 0) gives a loss of 0
    with an all-zero gradient instead of PyTorch's ``NaN`` (``0 / 0``), so it cannot poison a training run.

    Args:
        logits: ``(B, K, H, W)`` raw scores.
        target: ``(B, H, W)`` integer class ids; ``ignore_index`` pixels are excluded.
        weight: optional per-class weights ``(K,)`` (multiclass only).
        ignore_index: label value that is ignored.
        label_smoothing: multiclass label smoothing in ``[0, 1)``.
        reduction: ``"mean"`` (over non-ignored pixels, weighted by ``weight``), ``"sum"`` or ``"none"``.

    Returns:
        The loss (a scalar unless ``reduction="none"``, then ``(B, H, W)`` with zeros at ignored pixels).

    Raises:
        ValueError: on mismatched shapes, or a target label outside ``0..K-1`` (``{0, 1}`` for ``K == 1``) that is
            not ``ignore_index``: the labels are named instead of the ``IndexError`` / device-side assert that
            PyTorch's indexing would give.
    """
    if logits.dim() != target.dim() + 1:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)}: expected (B,K,H,W) and (B,H,W)"
        )
    if logits.shape[2:] != target.shape[1:]:
        target = F.interpolate(target[:, None].float(), size=logits.shape[2:], mode="nearest")[:, 0]
    target = target.long()
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss itself runs in float32 (float64 stays float64)
        logits = logits.float()
    k = logits.shape[1]
    check_labels(target, max(k, 2), ignore_index)  # K == 1 (binary): labels 0 and 1
    valid = target != ignore_index
    if k > 1:
        w = None if weight is None else weight.to(logits.dtype)
        if reduction != "mean":
            return F.cross_entropy(
                logits, target, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing,
                reduction=reduction,
            )  # fmt: skip
        # mean = sum / (number or total weight of counted pixels), guarded so that an empty batch gives 0, not 0/0
        total = F.cross_entropy(
            logits, target, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
        )
        if w is None:
            denom = valid.sum().to(total.dtype)
        else:
            safe = torch.where(valid, target, torch.zeros_like(target))
            denom = (w[safe] * valid).sum()
        has = denom > 0
        return torch.where(has, total / torch.where(has, denom, torch.ones_like(denom)), total * 0)
    loss = F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).to(logits.dtype), reduction="none") * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


class CrossEntropyLoss(SegLoss):
    """Cross-entropy on logits that also accepts deep-supervision outputs.

    Args:
        weight: optional per-class weights.
        ignore_index: label value excluded from the loss.
        label_smoothing: multiclass label smoothing (PyTorch convention: epsilon / K to every class).
        reduction: ``"mean"`` (over non-ignored pixels), ``"sum"`` or ``"none"``.
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        weight=None,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        aux_weight: float = 0.4,
    ):
        super().__init__(reduction, aux_weight)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.register_class_weight(weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, self.weight, self.ignore_index, self.label_smoothing, self.reduction)
