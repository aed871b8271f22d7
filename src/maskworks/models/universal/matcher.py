"""Bipartite matching of query predictions to ground-truth segments (MaskFormer / Mask2Former).

Set prediction trains each ground-truth segment against exactly one of the ``Q`` queries: the assignment that
minimises the total matching cost, found by the Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment`).
The cost of query ``q`` for segment ``g`` (Cheng et al., "Masked-attention Mask Transformer for Universal Image
Segmentation", CVPR 2022) is

    C[q, g] = w_class * (-p_q(c_g)) + w_mask * BCE(m_q, t_g) + w_dice * Dice(m_q, t_g)

a *lower* cost for a higher class probability (the negative softmax probability of the segment's class; a positive
sign would match the least likely queries), and the mask terms computed on ``num_points`` points drawn uniformly in
the image and shared by predictions and targets (bilinear samples of the mask logits and of the binary targets), not
on whole masks: with 112 x 112 points the cost is as informative and far cheaper.

* ``BCE(m, t)`` is the mean over the points of the sigmoid cross-entropy, as one matrix product for all pairs.
* ``Dice(m, t) = 1 - (2 sum(sigmoid(m) t) + 1) / (sum(sigmoid(m)) + sum(t) + 1)``.

Queries left unmatched are "no object". Non-finite costs (a diverged prediction) are replaced by the largest finite
value, so such a pair is matched only when nothing else can be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.ops.points import point_sample

__all__ = ["HungarianMatcher", "assign", "pairwise_mask_costs"]


def pairwise_mask_costs(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid BCE and Dice costs of every (prediction, target) pair.

    Args:
        pred: ``(Q, P)`` mask logits at ``P`` points.
        target: ``(G, P)`` binary (or soft) targets at the same points.

    Returns:
        ``(Q, G)`` BCE (mean over the points) and ``(Q, G)`` Dice costs.
    """
    pred, target = pred.float(), target.float()
    num_points = pred.shape[1]
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")  # -log sigmoid(m)
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")  # -log(1 - sigmoid(m))
    bce = (pos @ target.T + neg @ (1 - target).T) / num_points
    prob = pred.sigmoid()
    dice = 1 - (2 * prob @ target.T + 1) / (prob.sum(-1)[:, None] + target.sum(-1)[None, :] + 1)
    return bce, dice


def assign(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum-cost assignment of rows to columns (``min(R, C)`` pairs), rows in increasing order.

    Non-finite entries become the largest finite value of the dtype (matched only when nothing else can be).

    Returns:
        int64 row indices and column indices.
    """
    from scipy.optimize import linear_sum_assignment

    if cost.ndim != 2:
        raise ValueError(f"cost must be a (rows, columns) matrix, got shape {tuple(cost.shape)}")
    big = torch.finfo(cost.dtype).max if cost.is_floating_point() else None
    c = torch.nan_to_num(cost.detach(), nan=big, posinf=big, neginf=big) if big is not None else cost
    rows, cols = linear_sum_assignment(c.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """Match queries to ground-truth segments image by image (see the module docstring).

    Args:
        cost_class: weight of the class term (Mask2Former: 2).
        cost_mask: weight of the point-sampled sigmoid BCE (5).
        cost_dice: weight of the point-sampled Dice (5).
        num_points: points per image shared by predictions and targets (112 * 112).
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 112 * 112
    ) -> None:
        super().__init__()
        for name, v in (("cost_class", cost_class), ("cost_mask", cost_mask), ("cost_dice", cost_dice)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if cost_class == cost_mask == cost_dice == 0:
            raise ValueError("cost_class, cost_mask and cost_dice cannot all be 0")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be a positive int, got {num_points!r}")
        self.cost_class, self.cost_mask, self.cost_dice = float(cost_class), float(cost_mask), float(cost_dice)
        self.num_points = num_points

    def cost_matrix(
        self, logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, target_masks: torch.Tensor
    ) -> torch.Tensor:
        """``(Q, G)`` cost of one image: ``logits (Q, K + 1)``, mask logits ``(Q, h, w)``, ``labels (G,)``,
        ``target_masks (G, H, W)`` (any size: both are sampled at the same ``[0, 1]`` points, drawn here with
        ``torch.rand``)."""
        cost_class = -logits.float().softmax(-1)[:, labels]
        points = torch.rand(1, self.num_points, 2, device=masks.device)
        pred = point_sample(masks[:, None].float(), points.expand(masks.shape[0], -1, -1)).squeeze(1)
        tgt = point_sample(target_masks[:, None].float(), points.expand(target_masks.shape[0], -1, -1)).squeeze(1)
        bce, dice = pairwise_mask_costs(pred, tgt)
        return self.cost_mask * bce + self.cost_class * cost_class + self.cost_dice * dice

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        targets: Sequence[Mapping[str, torch.Tensor]],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image ``(query indices, target indices)``, ``min(Q, G)`` pairs each.

        Args:
            pred_logits: ``(B, Q, K + 1)`` class logits (the last class is "no object").
            pred_masks: ``(B, Q, h, w)`` mask logits.
            targets: per image ``labels (G,)`` int64 and ``masks (G, H, W)``.
        """
        if pred_logits.shape[:2] != pred_masks.shape[:2] or len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"pred_logits {tuple(pred_logits.shape)}, pred_masks {tuple(pred_masks.shape)} and {len(targets)} "
                "targets must agree on batch size and queries"
            )
        out = []
        for b, t in enumerate(targets):
            labels, masks = t["labels"], t["masks"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            out.append(assign(self.cost_matrix(pred_logits[b], pred_masks[b], labels, masks)))
        return out
