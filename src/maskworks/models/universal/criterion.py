"""Mask2Former's set-prediction loss (Cheng et al., CVPR 2022; MaskFormer's, with point-sampled mask losses).

After :class:`~maskworks.models.universal.HungarianMatcher` pairs queries with ground-truth segments:

* ``loss_ce``: cross-entropy of every query's ``K + 1`` class logits, the matched queries against their segment's
  class and all others against "no object" (the last class), whose weight is ``no_object_weight`` (0.1): with 100
  queries and a handful of segments, unweighted no-object terms would drown the matched ones;
* ``loss_mask`` / ``loss_dice``: sigmoid BCE and Dice of each matched query's mask logits against its segment,
  computed on ``num_points`` points per pair rather than on whole masks: PointRend's importance sampling
  (:func:`~maskworks.ops.get_uncertain_point_coords_with_randomness`, ``oversample_ratio`` 3, 75 % of the points the
  most uncertain of the oversampled set, ``-|logit|``, the rest uniform), the targets read at the same points. Both
  are summed over the pairs and divided by the number of segments in the batch (at least 1).

The weighted total is ``class_weight * loss_ce + mask_weight * loss_mask + dice_weight * loss_dice`` (2, 5, 5) for
the final prediction and for every auxiliary (intermediate decoder layer) prediction, each matched on its own; the
auxiliary terms are named ``loss_ce_0``, ``loss_mask_0``, ... in layer order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from maskworks.models.universal.matcher import HungarianMatcher
from maskworks.ops.points import get_uncertain_point_coords_with_randomness, point_sample

__all__ = ["SetCriterion"]


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    return -logits.abs()


class SetCriterion(nn.Module):
    """Mask2Former's loss (see the module docstring).

    Args:
        num_classes: ``K`` real classes (the logits have ``K + 1``, the last one "no object").
        matcher: the matcher (default: :class:`HungarianMatcher` with the loss weights as costs and ``num_points``).
        no_object_weight: class weight of "no object" in ``loss_ce``.
        class_weight, mask_weight, dice_weight: weights of the three terms.
        num_points: points per matched pair (112 * 112).
        oversample_ratio: candidate points per kept point.
        importance_sample_ratio: share of the points chosen by uncertainty.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        no_object_weight: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= no_object_weight <= 1.0:
            raise ValueError(f"no_object_weight must be in [0, 1], got {no_object_weight!r}")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.weights = {
            "loss_ce": float(class_weight),
            "loss_mask": float(mask_weight),
            "loss_dice": float(dice_weight),
        }
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def layer_losses(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        targets: Sequence[Mapping[str, torch.Tensor]],
        num_masks: float,
    ) -> dict[str, torch.Tensor]:
        """Unweighted ``loss_ce``, ``loss_mask``, ``loss_dice`` of one prediction (its own matching)."""
        indices = self.matcher(pred_logits, pred_masks, targets)
        b, q, _ = pred_logits.shape
        # class loss over every query
        classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=pred_logits.device)
        for i, (rows, cols) in enumerate(indices):
            classes[i, rows.to(classes.device)] = targets[i]["labels"][cols].to(classes.device)
        loss_ce = F.cross_entropy(pred_logits.float().transpose(1, 2), classes, weight=self.empty_weight)
        # mask losses over the matched pairs, on sampled points
        batch_idx = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(indices)])
        query_idx = torch.cat([rows for rows, _ in indices])
        if query_idx.numel() == 0:
            zero = pred_masks.sum() * 0.0
            return {"loss_ce": loss_ce, "loss_mask": zero, "loss_dice": zero.clone()}
        masks = pred_masks[batch_idx, query_idx][:, None].float()  # (M, 1, h, w)
        size = max(t["masks"].shape[-2] for t in targets), max(t["masks"].shape[-1] for t in targets)
        target = torch.cat([_pad(t["masks"][cols].float(), size) for t, (_, cols) in zip(targets, indices)])[:, None]
        with torch.no_grad():
            points = get_uncertain_point_coords_with_randomness(
                masks, _uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            labels = point_sample(target.to(masks.device), points).squeeze(1)
        logits = point_sample(masks, points).squeeze(1)  # (M, P)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * labels).sum(-1) + 1) / (prob.sum(-1) + labels.sum(-1) + 1)
        return {"loss_ce": loss_ce, "loss_mask": bce, "loss_dice": dice.sum() / num_masks}

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of ``outputs`` (``pred_logits (B, Q, K + 1)``, ``pred_masks (B, Q, h, w)`` and optional
        ``aux_outputs``, a list of such dicts) against per-image ``labels (G,)`` / ``masks (G, H, W)``.

        Predicted and target masks are read at the same ``[0, 1]`` points, so both must cover the same canvas: the
        padded batch (targets of smaller images zero-padded at the bottom / right to it, as a batch pads images)."""
        num_masks = float(sum(len(t["labels"]) for t in targets))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # the global batch's mean segment count per process, as the original code: DDP = one process
            device = outputs["pred_logits"].device
            count = torch.tensor([num_masks], dtype=torch.float64, device=device)
            dist.all_reduce(count)
            num_masks = float(count.item()) / dist.get_world_size()
        num_masks = max(num_masks, 1.0)
        parts = self.layer_losses(outputs["pred_logits"], outputs["pred_masks"], targets, num_masks)
        losses = {k: v * self.weights[k] for k, v in parts.items()}
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            parts = self.layer_losses(aux["pred_logits"], aux["pred_masks"], targets, num_masks)
            losses.update({f"{k}_{i}": v * self.weights[k] for k, v in parts.items()})
        return losses


def _pad(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``(G, H, W)`` masks at the bottom / right to ``size`` (a batch's largest image)."""
    return F.pad(masks, (0, size[1] - masks.shape[-1], 0, size[0] - masks.shape[-2]))
