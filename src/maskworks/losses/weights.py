"""Class weights from label statistics, for imbalanced segmentation (seed Q6).

Estimators (all return a float32 tensor ``(K,)``; classes never seen get weight 0):

* ``"inverse"``: ``total / (K * n_c)`` (inverse frequency, mean 1 over seen classes).
* ``"median"``: median frequency balancing (Eigen & Fergus 2015, used by SegNet):
  ``freq_c = n_c / (pixels of the images where c is present)``, ``w_c = median(freq) / freq_c``.
* ``"effective"``: effective number of samples (Cui et al. 2019): ``(1 - beta) / (1 - beta ** n_c)``,
  normalised to sum to the number of seen classes. Counts are pixels unless ``per_image=True``.
* ``"log"``: ENet's log smoothing (Paszke et al. 2016): ``1 / ln(c + p_c)`` with ``c = 1.02``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["class_pixel_counts", "class_weights", "WEIGHT_METHODS"]

WEIGHT_METHODS = ("inverse", "median", "effective", "log")


def class_pixel_counts(
    masks: Iterable, num_classes: int, ignore_index: int = 255, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class statistics over an iterable of masks (tensors/arrays) or of dataset samples.

    Returns:
        ``(pixels (K,), image_pixels (K,), images (K,))``: pixels of each class, total pixels of the
        images in which the class appears, and the number of those images (all int64).
    """
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    images = np.zeros(num_classes, np.int64)
    for item in tqdm(masks, desc="class statistics", disable=not progress):
        m = item["mask"] if isinstance(item, dict) else item
        m = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).reshape(-1).long()
        m = m[m != ignore_index]
        if m.numel() and (m.min() < 0 or m.max() >= num_classes):
            raise ValueError(f"mask holds labels outside 0..{num_classes - 1} that are not {ignore_index}")
        counts = torch.bincount(m, minlength=num_classes).numpy()
        pixels += counts
        present = counts > 0
        image_pixels[present] += m.numel()
        images[present] += 1
    return pixels, image_pixels, images


def class_weights(
    data,
    num_classes: int | None = None,
    method: str = "median",
    ignore_index: int = 255,
    beta: float = 0.999,
    c: float = 1.02,
    per_image: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Class weights from a dataset (samples with ``"mask"``), an iterable of masks, or a counts array.

    Args:
        data: a dataset, an iterable of masks, or an array of per-class pixel counts ``(K,)``
            (only ``inverse``, ``effective`` and ``log`` can work from counts alone).
        num_classes: K (default: ``data.num_classes``, or the length of a counts array).
        method: one of ``"inverse"``, ``"median"``, ``"effective"``, ``"log"``.
        ignore_index: label excluded from the statistics.
        beta: the effective-number hyper-parameter in ``[0, 1)``.
        c: ENet's log-smoothing constant (> 1).
        per_image: effective number from image counts instead of pixel counts.
        progress: show a progress bar while scanning masks.

    Returns:
        Float32 weights ``(K,)``; classes with no pixels get 0.
    """
    if method not in WEIGHT_METHODS:
        raise ValueError(f"method must be one of {WEIGHT_METHODS}, got {method!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if c <= 1:
        raise ValueError(f"c must be > 1, got {c}")
    if isinstance(data, (np.ndarray, torch.Tensor, list, tuple)) and np.asarray(data).ndim == 1:
        pixels = np.asarray(data, dtype=np.int64)
        if method == "median" or per_image:
            raise ValueError("median frequency and per-image counts need the masks, not a counts array")
        image_pixels = images = None
    else:
        k = num_classes or getattr(data, "num_classes", None)
        if k is None:
            raise ValueError("num_classes is required when data has no num_classes attribute")
        pixels, image_pixels, images = class_pixel_counts(data, k, ignore_index, progress)
    seen = pixels > 0
    w = np.zeros(len(pixels), np.float64)
    if not seen.any():
        raise ValueError("no labelled pixel found: every pixel is ignore_index")
    if method == "inverse":
        w[seen] = pixels.sum() / (seen.sum() * pixels[seen])
    elif method == "median":
        freq = pixels[seen] / image_pixels[seen]
        w[seen] = np.median(freq) / freq
    elif method == "effective":
        n = (images if per_image else pixels)[seen].astype(np.float64)
        eff = (1.0 - beta) / (1.0 - np.power(beta, n))
        w[seen] = eff / eff.sum() * seen.sum()
    else:
        p = pixels[seen] / pixels.sum()
        w[seen] = 1.0 / np.log(c + p)
    return torch.tensor(w, dtype=torch.float32)
