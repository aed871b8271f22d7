"""Instance overlays: each instance in its own colour, outlined, with its box, class and score."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["instance_colors", "draw_instances"]


def instance_colors(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 3)`` uint8 colours, well apart for neighbouring indices: hues stepped by the golden ratio."""
    phi = 0.618033988749895
    cols = [colorsys.hsv_to_rgb((seed * 0.13 + i * phi) % 1.0, 0.75, 1.0) for i in range(n)]
    return (np.asarray(cols, dtype=np.float64).reshape(n, 3) * 255 + 0.5).astype(np.uint8)


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def draw_instances(
    image: Any,
    result: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    draw_boxes: bool = True,
    draw_text: bool = True,
    order: Any = None,
) -> np.ndarray:
    """An instance result drawn over an image.

    Args:
        image: uint8 ``(H, W, 3)`` RGB (or ``(H, W)`` / ``(H, W, 1)`` gray) image.
        result: ``masks (N, H, W)`` bool, and optionally ``boxes (N, 4)`` xyxy, ``labels (N,)``, ``scores (N,)``.
        class_names: label names for the captions (labels are printed as numbers otherwise).
        alpha: opacity of the mask fill (outlines are opaque).
        draw_boxes: draw each instance's box.
        draw_text: caption each instance with ``class score``.
        order: ``(N,)`` front-to-back key (higher = painted later, on top), e.g.
            :func:`maskworks.ops.occlusion_order`; default: the scores.

    Returns:
        uint8 ``(H, W, 3)`` picture; instances are painted lowest ``order`` (score) first, so the front (best) lie on top.

    Raises:
        ValueError: masks whose size differs from the image, or ``alpha`` outside ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _np(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img.astype(np.uint8)
    masks = _np(result.get("masks", np.zeros((0, *img.shape[:2]), bool))).astype(bool)
    if masks.ndim == 4:
        masks = masks[:, 0]
    if masks.shape[1:] != img.shape[:2]:
        raise ValueError(f"instance masks are {masks.shape[1:]} but the image is {img.shape[:2]}; expected equal sizes")
    n = masks.shape[0]
    scores = _np(result["scores"]).astype(float) if "scores" in result else np.ones(n)
    labels = _np(result["labels"]).astype(int) if "labels" in result else np.zeros(n, int)
    boxes = _np(result["boxes"]).astype(float) if "boxes" in result else None
    colors = instance_colors(n)
    out = img.astype(np.float32)
    key = scores if order is None else _np(order).astype(float)
    if key.shape != (n,):
        raise ValueError(f"order must have one value per instance ({n}), got shape {key.shape}")
    order = np.argsort(key, kind="stable")  # lowest first: the front on top
    for i in order:
        m = masks[i]
        out[m] = (1 - alpha) * out[m] + alpha * colors[i]
        out[_outline(m)] = colors[i]
    picture = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    if n and (draw_boxes or draw_text):
        draw = ImageDraw.Draw(picture)
        for i in order:
            color = tuple(int(c) for c in colors[i])
            if boxes is not None:
                x1, y1, x2, y2 = boxes[i]
            else:
                ys, xs = np.nonzero(masks[i])
                if not len(xs):
                    continue
                x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            if draw_boxes:
                draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color)
            if draw_text:
                label = int(labels[i])
                name = class_names[label] if class_names and 0 <= label < len(class_names) else str(label)
                text = f"{name} {scores[i]:.2f}"
                tx, ty = float(x1), max(0.0, float(y1) - 11)
                left, top, right, bottom = draw.textbbox((tx, ty), text)
                draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
                draw.text((tx, ty), text, fill=color)
    return np.asarray(picture)
