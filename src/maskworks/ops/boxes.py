"""Boxes in ``(x1, y1, x2, y2)`` pixel coordinates: area, IoU and generalised IoU (Rezatofighi et al., CVPR 2019)."""

from __future__ import annotations

import torch

__all__ = ["box_area", "box_iou", "generalized_box_iou"]


def _check(boxes: torch.Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be (N, 4) boxes (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``(N,)`` of ``(N, 4)`` xyxy boxes (0 for degenerate boxes)."""
    _check(boxes, "boxes")
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.max(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` of xyxy boxes ``a (N, 4)`` and ``b (M, 4)`` (equal to ``torchvision.ops.box_iou``)."""
    _check(a, "a")
    _check(b, "b")
    inter, union = _inter_union(a, b)
    return inter / union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU ``(N, M)``: ``IoU - |C \\ (A u B)| / |C|`` with ``C`` the smallest enclosing box;
    in ``[-1, 1]`` (equal to ``torchvision.ops.generalized_box_iou``)."""
    _check(a, "a")
    _check(b, "b")
    inter, union = _inter_union(a, b)
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(dim=-1)
    return iou - (enclosing - union) / enclosing
