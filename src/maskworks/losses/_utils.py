"""Shared helpers of the loss library: mode checks, ignore handling, one-hot targets, reduction."""

from __future__ import annotations

import torch

MODES = ("binary", "multiclass", "multilabel")
REDUCTIONS = ("mean", "sum", "none")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def valid_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Boolean mask of pixels that count (all True when ``ignore_index`` is None)."""
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def label_range_error(bad: list, num_classes: int, ignore_index: int | None) -> ValueError:
    """The one-line error for class ids outside ``0..K-1`` that are not ``ignore_index`` (shared by every loss)."""
    skip = "no value is ignored" if ignore_index is None else f"only ignore_index={ignore_index} marks ignored pixels"
    return ValueError(
        f"target holds labels {bad[:10]} outside 0..{num_classes - 1} for num_classes={num_classes}; {skip}"
    )


def binary_label_error(target: torch.Tensor, valid: torch.Tensor, ignore_index: int | None, what: str) -> ValueError:
    """The one-line error for a binary target holding values other than 0 and 1 at counted pixels."""
    bad = torch.unique(target[valid & (target != 0) & (target != 1)]).tolist()[:10]
    skip = "no value is ignored" if ignore_index is None else f"only ignore_index={ignore_index} marks ignored pixels"
    return ValueError(f"{what}: target holds labels {bad}; a binary target holds 0 and 1, {skip}")


def check_labels(target: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> bool:
    """Check that every non-ignored class id lies in ``0..K-1`` (one host sync); returns whether any pixel counts.

    Raises:
        ValueError: naming the offending labels, ``K`` and the ignore value (instead of the ``IndexError`` or
            device-side assert that indexing with them would give).
    """
    if target.numel() == 0:
        return False
    valid = valid_mask(target, ignore_index)
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    lo, hi = torch.aminmax(safe)
    lo, hi, any_valid = torch.stack([lo, hi, valid.any().long()]).tolist()
    if lo < 0 or hi >= num_classes:
        bad = torch.unique(safe[(safe < 0) | (safe >= num_classes)]).tolist()
        raise label_range_error(bad, num_classes, ignore_index)
    return bool(any_valid)


def one_hot_with_ignore(
    target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(one_hot (B, K, *spatial) float, valid (B, 1, *spatial) bool)`` for int targets ``(B, *spatial)``.

    Ignored pixels get an all-zero one-hot row (never an index error, unlike ``F.one_hot`` on 255); other labels
    outside ``0..K-1`` raise the ValueError of :func:`label_range_error`.
    """
    valid = valid_mask(target, ignore_index)
    all_valid = bool(valid.all())
    safe = (target if all_valid else torch.where(valid, target, torch.zeros_like(target))).long()
    lo, hi = torch.aminmax(safe)
    if lo < 0 or hi >= num_classes:
        bad = torch.unique(safe[(safe < 0) | (safe >= num_classes)]).tolist()
        raise label_range_error(bad, num_classes, ignore_index)
    shape = (safe.shape[0], num_classes, *safe.shape[1:])
    # scatter straight into a float tensor: no int64 one-hot and no channel-last copy
    oh = torch.zeros(shape, dtype=torch.float32, device=safe.device).scatter_(1, safe.unsqueeze(1), 1.0)
    valid = valid.unsqueeze(1)
    if not all_valid:
        oh.mul_(valid)
    return oh, valid


def reduce(loss: torch.Tensor, reduction: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (optionally weighted by ``weight``, e.g. the valid-pixel mask), sum, or none."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum() if weight is None else (loss * weight).sum()
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1)
