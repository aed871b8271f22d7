"""Rare-class-aware sampling: repeat-factor sampling of the images that contain rare classes (seed Q6).

Following LVIS's repeat-factor sampling (Gupta et al. 2019), adapted to semantic classes: with
``f_c`` the fraction of images containing class ``c`` and a threshold ``t``, the class repeat factor
is ``r_c = max(1, sqrt(t / f_c))`` and an image is drawn ``r_i = max_{c in image} r_c`` times as
often as an image of common classes only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from maskworks.data.io import DatasetError

__all__ = ["image_class_presence", "repeat_factors"]


def image_class_presence(
    data: Iterable, num_classes: int, ignore_index: int = 255, progress: bool = False
) -> np.ndarray:
    """Boolean ``(N, K)``: which classes each mask (or dataset sample's ``"mask"``) contains."""
    rows = []
    for i, item in enumerate(tqdm(data, desc="class presence", disable=not progress)):
        m = item["mask"] if isinstance(item, dict) else item
        m = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).reshape(-1).long()
        m = m[m != ignore_index]
        if m.numel() and (m.min() < 0 or m.max() >= num_classes):
            meta = item.get("meta") if isinstance(item, dict) else None
            where = (meta or {}).get("file") or f"sample {i}"
            bad = torch.unique(m[(m < 0) | (m >= num_classes)])[:10].tolist()
            raise DatasetError(
                f"mask of {where} holds labels {bad} outside 0..{num_classes - 1}; expected class ids or "
                f"{ignore_index} (ignore)"
            )
        rows.append(torch.bincount(m, minlength=num_classes).numpy() > 0)
    if not rows:
        raise DatasetError("no masks given; expected a non-empty dataset or list of masks")
    return np.stack(rows)


def repeat_factors(presence: np.ndarray, threshold: float = 0.1) -> torch.Tensor:
    """Per-image repeat factors ``(N,)`` from a class-presence matrix ``(N, K)``.

    Args:
        presence: boolean ``(N, K)`` from :func:`image_class_presence`.
        threshold: image frequency below which a class is oversampled (``t`` above), in ``(0, 1]``.

    Returns:
        float64 weights ``>= 1`` for :class:`maskworks.engine.Trainer` ``sample_weights``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    presence = np.asarray(presence, dtype=bool)
    freq = presence.mean(0)  # (K,) fraction of images containing each class
    with np.errstate(divide="ignore"):
        r_class = np.where(freq > 0, np.maximum(1.0, np.sqrt(threshold / np.maximum(freq, 1e-12))), 1.0)
    r_image = np.where(presence, r_class[None], 1.0).max(1)
    return torch.tensor(r_image, dtype=torch.float64)
