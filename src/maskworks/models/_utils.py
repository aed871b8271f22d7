"""Helpers shared by models: padding inputs to the multiple a network needs and cropping back.

Models accept any ``H, W`` (see DESIGN.md): they pad the bottom and right edges up to their
required multiple, run, and crop the logits back to the input size, so the top-left pixel
grid is unchanged and cropping is a plain slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple", "crop_to", "center_crop"]


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "constant", value: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom and right of ``x`` so that ``H`` and ``W`` are multiples of ``multiple``.

    Zeros (``mode="constant"``) are the default: inputs are mean/std normalised, so zero is the
    dataset mean, and it works for any size, where ``"reflect"`` needs the pad to be smaller
    than the image.

    Args:
        x: tensor ``(..., H, W)``.
        multiple: the required divisor of ``H`` and ``W``.
        mode: ``F.pad`` mode: ``"constant"``, ``"reflect"`` or ``"replicate"``.
        value: fill value for ``mode="constant"``.

    Returns:
        The padded tensor (``x`` itself when nothing is needed) and the original ``(H, W)``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple!r}")
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode, value=value if mode == "constant" else None)
    return x, (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (H, W)`` of ``x``."""
    h, w = size
    if x.shape[-2:] == (h, w):
        return x
    return x[..., :h, :w]


def center_crop(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The central ``size = (H, W)`` window of ``x`` (U-Net's crop-and-concat for valid convs)."""
    h, w = x.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"cannot centre-crop a {h}x{w} map to {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]
