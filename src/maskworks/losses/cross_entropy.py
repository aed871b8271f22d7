"""Cross-entropy for segmentation logits, with ``ignore_index`` and deep-supervision outputs.

Models return logits ``(B, K, H, W)`` (``K = 1`` for binary tasks) or, in training with
auxiliary heads, ``{"out": logits, "aux": [logits, ...]}``. Targets are int64 ``(B, H, W)`` with
``255`` marking pixels that contribute nothing to the value or the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

    Args:
        logits: ``(B, K, H, W)`` raw scores.
        target: ``(B, H, W)`` integer class ids; ``ignore_index`` pixels are excluded.
        weight: optional per-class weights ``(K,)`` (multiclass only).
        ignore_index: label value that is ignored.
        label_smoothing: multiclass label smoothing in ``[0, 1)``.
        reduction: ``"mean"`` (over non-ignored pixels), ``"sum"`` or ``"none"``.

    Returns:
        The loss (a scalar unless ``reduction="none"``, then ``(B, H, W)`` with zeros at ignored pixels).
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
    if logits.shape[1] > 1:
        return F.cross_entropy(
            logits,
            target,
            weight=None if weight is None else weight.to(logits.dtype),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
    valid = target != ignore_index
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
