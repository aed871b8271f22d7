"""The NMS family.

* :func:`batched_nms`: greedy class-aware NMS (boxes of different classes never suppress each other), torchvision's
  kernel with its coordinate-offset trick; equal to ``torchvision.ops.batched_nms``.
* :func:`soft_nms` (Bodla et al., ICCV 2017): instead of removing the boxes that overlap the current best one, decay
  their scores, linearly ``s * (1 - IoU)`` where ``IoU >= iou_threshold`` or with a Gaussian ``s * exp(-IoU^2 /
  sigma)``; boxes whose score falls below ``score_threshold`` are dropped. Class-aware.
* :func:`fast_nms` (YOLACT, Bolya et al., ICCV 2019): per class, the IoU matrix of the score-sorted boxes is
  kept above its diagonal and each box is dropped when its largest IoU with *any* higher-scoring box, suppressed or
  not, exceeds the threshold: one matrix operation, slightly more aggressive than greedy NMS.
* :func:`matrix_nms` (SOLOv2, Wang et al., NeurIPS 2020): every mask's score decays by its IoU with higher-scoring
  masks of its class, each term compensated by how much that higher mask was itself overlapped:
  ``decay_j = min_i f(IoU_ij) / f(max_k IoU_ki)`` over higher-scoring ``i`` (``k`` higher than ``i``), with
  ``f(x) = exp(-sigma x^2)`` (Gaussian) or ``1 - x`` (linear).
* :func:`mask_nms`: greedy class-aware NMS with mask IoU instead of box IoU.
"""

from __future__ import annotations

import torch

from maskworks.ops.boxes import box_iou

__all__ = ["batched_nms", "fast_nms", "mask_iou", "mask_nms", "matrix_nms", "soft_nms"]


def _offset_by_class(boxes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Shift each class's boxes to their own region of the plane, so boxes of different classes never overlap."""
    if labels is None or boxes.numel() == 0:
        return boxes
    span = boxes.max() - boxes.min() + 1
    return boxes + (labels.to(boxes) * span)[:, None]


def _check_scores(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4) xyxy, got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1] or (labels is not None and labels.shape != boxes.shape[:1]):
        raise ValueError(
            f"scores {tuple(scores.shape)} and labels {None if labels is None else tuple(labels.shape)} must be "
            f"({boxes.shape[0]},) like the boxes"
        )


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy class-aware NMS: indices of the kept boxes, by decreasing score (= ``torchvision.ops.batched_nms``).

    Args:
        boxes: ``(N, 4)`` xyxy.
        scores: ``(N,)``.
        labels: ``(N,)`` class ids; only boxes of the same class suppress each other.
        iou_threshold: boxes overlapping a kept box by more than this are removed.
    """
    from torchvision.ops import nms

    _check_scores(boxes, scores, labels)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return nms(_offset_by_class(boxes.float(), labels), scores.float(), iou_threshold)


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor | None = None,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS: decay the scores of boxes that overlap a selected one instead of removing them.

    Repeatedly select the highest-scoring remaining box ``M``; every other remaining box ``b`` gets
    ``s_b * (1 - IoU(M, b))`` if ``IoU >= iou_threshold`` (``method="linear"``) or ``s_b * exp(-IoU^2 / sigma)``
    (``"gaussian"``); boxes whose score falls below ``score_threshold`` are dropped.

    Args:
        boxes: ``(N, 4)`` xyxy.
        scores: ``(N,)``.
        labels: ``(N,)`` class ids (boxes decay only boxes of their class), or ``None``: one class.
        method: ``"gaussian"`` or ``"linear"``.
        sigma: the Gaussian's width (0.5 in the paper).
        iou_threshold: ``N_t`` of the linear method.
        score_threshold: final scores below this are dropped.

    Returns:
        The kept indices in selection order (decreasing final score) and their final scores.
    """
    if method not in ("gaussian", "linear"):
        raise ValueError(f"method must be 'gaussian' or 'linear', got {method!r}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    _check_scores(boxes, scores, labels)
    iou = box_iou(_offset_by_class(boxes.float(), labels), _offset_by_class(boxes.float(), labels))
    current = scores.float().clone()
    alive = torch.ones_like(current, dtype=torch.bool)
    keep, kept_scores = [], []
    while bool(alive.any()):
        masked = torch.where(alive, current, torch.full_like(current, -torch.inf))
        best = int(masked.argmax())
        if current[best] < score_threshold:
            break
        keep.append(best)
        kept_scores.append(current[best])
        alive[best] = False
        overlap = iou[best]
        if method == "linear":
            decay = torch.where(overlap >= iou_threshold, 1 - overlap, torch.ones_like(overlap))
        else:
            decay = torch.exp(-(overlap**2) / sigma)
        current = torch.where(alive, current * decay, current)
        alive &= current >= score_threshold
    index = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
    return index, (torch.stack(kept_scores) if kept_scores else current.new_empty(0))


def fast_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor | None = None,
    iou_threshold: float = 0.5,
    top_k: int | None = None,
) -> torch.Tensor:
    """YOLACT's Fast NMS: indices of the kept boxes, by decreasing score.

    Per class, the boxes are sorted by score (the best ``top_k`` kept, all when ``None``), the IoU matrix ``X`` is
    kept above its diagonal, and box ``j`` survives when ``max_i X_ij <= iou_threshold``: a box already suppressed
    still suppresses the boxes below it (greedy NMS would not), the price of one parallel operation.
    """
    _check_scores(boxes, scores, labels)
    labels = torch.zeros_like(scores, dtype=torch.int64) if labels is None else labels
    kept = []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[scores[idx].argsort(descending=True, stable=True)]
        if top_k is not None:
            idx = idx[:top_k]
        iou = box_iou(boxes[idx].float(), boxes[idx].float()).triu(diagonal=1)
        max_iou = iou.max(dim=0).values if len(idx) else iou.new_empty(0)
        kept.append(idx[max_iou <= iou_threshold])
    if not kept:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    out = torch.cat(kept)
    return out[scores[out].argsort(descending=True, stable=True)]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` of binary masks ``a (N, H, W)`` and ``b (M, H, W)`` (0 where both are empty)."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"masks must be (N, H, W) of one size, got {tuple(a.shape)} and {tuple(b.shape)}")
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def matrix_nms(
    masks: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor | None = None,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> torch.Tensor:
    """SOLOv2's Matrix NMS: the decayed scores ``(N,)`` of ``N`` masks (in the input order; threshold them to keep).

    Args:
        masks: ``(N, H, W)`` binary masks.
        scores: ``(N,)``.
        labels: ``(N,)`` class ids (only masks of one class decay each other), or ``None``: one class.
        kernel: ``"gaussian"`` (``f(x) = exp(-sigma x^2)``) or ``"linear"`` (``f(x) = 1 - x``).
        sigma: the Gaussian kernel's coefficient (2.0 in SOLOv2).
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    n = scores.shape[0]
    if masks.shape[0] != n or (labels is not None and labels.shape[0] != n):
        raise ValueError(f"masks {tuple(masks.shape)}, scores and labels must hold the same {n} instances")
    if n == 0:
        return scores.float().clone()
    order = scores.argsort(descending=True, stable=True)
    iou = mask_iou(masks[order], masks[order]).triu(diagonal=1)  # IoU with each higher-scoring mask (rows)
    if labels is not None:
        same = labels[order][:, None] == labels[order][None, :]
        iou = iou * same
    compensate = iou.max(dim=0).values  # how much each mask is overlapped by a higher one
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (iou**2 - compensate[:, None] ** 2))
    else:
        ratio = (1 - iou) / (1 - compensate[:, None]).clamp(min=1e-12)
    decay = ratio.min(dim=0).values  # over the higher-scoring masks i of each column j
    out = torch.empty_like(scores, dtype=torch.float32)
    out[order] = scores[order].float() * decay
    return out


def mask_nms(
    masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None = None, iou_threshold: float = 0.5
) -> torch.Tensor:
    """Greedy class-aware NMS on mask IoU: indices of the kept masks, by decreasing score."""
    n = scores.shape[0]
    if masks.shape[0] != n or (labels is not None and labels.shape[0] != n):
        raise ValueError(f"masks {tuple(masks.shape)}, scores and labels must hold the same {n} instances")
    order = scores.argsort(descending=True, stable=True)
    iou = mask_iou(masks[order], masks[order])
    if labels is not None:
        iou = iou * (labels[order][:, None] == labels[order][None, :])
    suppressed = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.int64, device=scores.device)]
