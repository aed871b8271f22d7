"""Input checks shared by the instance models (one-line errors naming the argument)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["check_image_list", "check_loss_weights", "check_normalisation", "check_targets", "pad_batch"]


def check_image_list(images: torch.Tensor | Sequence[torch.Tensor], in_channels: int) -> list[torch.Tensor]:
    """``images`` as a list of ``(in_channels, H, W)`` tensors (a ``(B, C, H, W)`` tensor is split)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(
                f"images must be a list of (C, H, W) tensors or a (B, C, H, W) tensor, got shape {tuple(images.shape)}"
            )
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of (C, H, W) tensors, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != in_channels:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a ({in_channels}, H, W) tensor, got {shape}")
    return list(images)


def check_normalisation(options: dict[str, Any], in_channels: int) -> None:
    """Validate ``options["image_mean"]`` / ``["image_std"]`` in place: ``None`` becomes 0 / 1 per channel."""
    for name, fill in (("image_mean", 0.0), ("image_std", 1.0)):
        value = options[name]
        if value is None:
            options[name] = [fill] * in_channels
            continue
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        if (
            values is None
            or len(values) != in_channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            raise ValueError(f"{name} must be None or {in_channels} numbers (one per input channel), got {value!r}")
        if name == "image_std" and not all(v > 0 for v in values):
            raise ValueError(f"image_std must be positive, got {value!r}")
        options[name] = [float(v) for v in values]


def pad_batch(images: Sequence[torch.Tensor], multiple: int = 32) -> torch.Tensor:
    """Zero-pad images (bottom / right) to one ``(B, C, H, W)`` whose ``H, W`` are multiples of ``multiple``."""
    h = -(-max(i.shape[-2] for i in images) // multiple) * multiple
    w = -(-max(i.shape[-1] for i in images) // multiple) * multiple
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for k, image in enumerate(images):
        batch[k, :, : image.shape[-2], : image.shape[-1]] = image
    return batch


def check_loss_weights(loss_weights: Mapping[str, float] | None, defaults: Mapping[str, float]) -> dict[str, float]:
    """``defaults`` updated by ``loss_weights`` (loss name -> finite weight >= 0; unknown names refused)."""
    weights = dict(defaults)
    if loss_weights is None:
        return weights
    if not isinstance(loss_weights, Mapping):
        raise ValueError(f"loss_weights must be a dict over {list(defaults)}, got {loss_weights!r}")
    for key, value in loss_weights.items():
        if key not in weights:
            raise ValueError(f"loss_weights has unknown loss {key!r}; the losses are {list(defaults)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"loss_weights[{key!r}] must be a finite number >= 0, got {value!r}")
        weights[key] = float(value)
    return weights


def check_targets(targets: Any, images: Sequence[torch.Tensor], num_classes: int) -> None:
    """Training targets: one dict per image with ``boxes (N, 4)``, ``labels (N,)`` in ``1..num_classes-1`` and
    ``masks (N, H, W)`` at the image's size."""
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise ValueError(f"targets must be a list of {len(images)} dicts (one per image), got {targets!r:.80}")
    for i, (t, image) in enumerate(zip(targets, images)):
        missing = [k for k in ("boxes", "labels", "masks") if k not in t]
        if missing:
            raise ValueError(f"targets[{i}] lacks {missing}; expected boxes (N, 4), labels (N,), masks (N, H, W)")
        n = t["labels"].shape[0]
        if t["boxes"].shape != (n, 4) or t["masks"].shape != (n, *image.shape[-2:]):
            raise ValueError(
                f"targets[{i}]: boxes {tuple(t['boxes'].shape)} and masks {tuple(t['masks'].shape)} must be "
                f"({n}, 4) and ({n}, {image.shape[-2]}, {image.shape[-1]}) for {n} labels and the image's size"
            )
        if n and not bool(((t["labels"] >= 1) & (t["labels"] < num_classes)).all()):
            raise ValueError(
                f"targets[{i}]: labels must be in 1..{num_classes - 1} (0 is the background), got "
                f"{t['labels'].tolist()}"
            )
