"""Turning label maps into pictures: palettes, colourised masks, overlays, label PNGs and image grids.

Everything here works on numpy arrays (torch tensors are accepted and moved to the CPU) and returns
``uint8`` ``(H, W, 3)`` RGB arrays. Label maps hold class ids ``0..K-1`` with ``255`` as the ignore value, the
library-wide convention. The default palette is the PASCAL VOC bit-interleaved colour map (Everingham et al.,
"The PASCAL Visual Object Classes Challenge", IJCV 2010, development kit), so class 0 is black and every id below
2**24 gets a distinct colour.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from maskworks.data.palette import default_palette

__all__ = [
    "default_palette",
    "colorize",
    "overlay",
    "denormalize",
    "to_uint8_hwc",
    "label_png_bytes",
    "save_label_png",
    "save_rgb_png",
    "make_grid",
    "IGNORE_INDEX",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
Color = tuple[int, int, int]


# ------------------------------------------------------------------------------------------------ palettes
def _palette_array(palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Validate a palette and return it as ``(N, 3)`` uint8."""
    arr = np.asarray(palette)
    if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) == 0:
        raise ValueError(f"palette must be a non-empty sequence of (r, g, b) triples, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or (arr < 0).any() or (arr > 255).any():
        raise ValueError(f"palette colours must be numbers in 0..255, got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint8)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _label_array(mask: Any, name: str = "mask") -> np.ndarray:
    """A 2-D integer label map as int64 (squeezes a leading singleton dim)."""
    m = _to_numpy(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"{name} must be a (H, W) label map, got shape {m.shape}")
    if m.dtype.kind == "b":
        m = m.astype(np.int64)
    if m.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class ids, got dtype {m.dtype}")
    return m.astype(np.int64, copy=False)


def _bad_values(values: np.ndarray) -> str:
    uniq = np.unique(values)
    more = f" ... ({len(uniq)} distinct)" if len(uniq) > 10 else ""
    return f"{uniq[:10].tolist()}{more}"


# ------------------------------------------------------------------------------------------------ masks
def colorize(
    mask: Any,
    palette: Sequence[Sequence[int]] | np.ndarray,
    ignore_color: Sequence[int] = (0, 0, 0),
    ignore_index: int | None = IGNORE_INDEX,
) -> np.ndarray:
    """Colour a label map with a palette.

    Args:
        mask: ``(H, W)`` integer class ids (numpy array or tensor).
        palette: one ``(r, g, b)`` per class, e.g. from :func:`default_palette`.
        ignore_color: colour of ``ignore_index`` pixels (it wins over a palette entry with the same index).
        ignore_index: the ignore label, or ``None``.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        ValueError: if the mask holds ids outside the palette that are not ``ignore_index``.
    """
    m = _label_array(mask)
    lut = _palette_array(palette)
    ignore = m == ignore_index if ignore_index is not None else np.zeros(m.shape, dtype=bool)
    bad = ((m < 0) | (m >= len(lut))) & ~ignore
    if bad.any():
        raise ValueError(
            f"mask holds class ids without a palette colour (palette has {len(lut)} entries, "
            f"ignore_index={ignore_index}): {_bad_values(m[bad])}"
        )
    out = lut[np.where(ignore, 0, m)]  # (H, W, 3)
    out[ignore] = np.asarray(ignore_color, dtype=np.uint8)
    return out


def to_uint8_hwc(image: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Bring an image into displayable ``(H, W, 3)`` uint8 RGB form.

    Layout: a torch tensor with 3 dims is taken as ``(C, H, W)`` (the library's tensor convention); a numpy array
    as ``(H, W, C)`` unless its last dim is not 1/3/4 while its first is. ``(H, W)`` is grayscale; a leading batch
    dim of 1 is dropped. One channel is repeated to RGB; 2 channels show the first; more than 3 keep the first 3.

    Values: with ``mean`` / ``std`` the image is denormalised first (see :func:`denormalize`). Otherwise uint8 is
    used as is, floats are taken as ``[0, 1]`` and scaled by 255, other integer types are clipped to ``0..255``.

    Args:
        image: the image (numpy array or tensor).
        mean: per-channel mean the image was normalised with, or ``None``.
        std: per-channel std, or ``None``.

    Returns:
        ``(H, W, 3)`` uint8 array.
    """
    is_tensor = isinstance(image, torch.Tensor)
    x = _to_numpy(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 2:
        x = x[:, :, None]  # (H, W, 1)
    elif x.ndim == 3:
        chw = is_tensor or (x.shape[-1] not in (1, 3, 4) and x.shape[0] in (1, 2, 3, 4))
        if chw:
            x = np.moveaxis(x, 0, -1)  # (C, H, W) -> (H, W, C)
    else:
        raise ValueError(f"image must be (H, W), (H, W, C) or (C, H, W), got shape {x.shape}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        x = _denormalize_hwc(x.astype(np.float64), mean, std)
    elif x.dtype == np.uint8:
        pass
    elif x.dtype.kind == "f":
        x = np.clip(np.round(np.nan_to_num(x.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)
    elif x.dtype.kind in "iub":
        x = np.clip(x.astype(np.int64), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unsupported image dtype {x.dtype}")
    c = x.shape[-1]
    if c == 1 or c == 2:
        x = np.repeat(x[:, :, :1], 3, axis=-1)
    elif c > 3:
        x = x[:, :, :3]
    return np.ascontiguousarray(x)


def _denormalize_hwc(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    c = x.shape[-1]
    mean_a = np.asarray(mean, dtype=np.float64).reshape(-1)
    std_a = np.asarray(std, dtype=np.float64).reshape(-1)
    for name, arr in (("mean", mean_a), ("std", std_a)):
        if len(arr) not in (1, c):
            raise ValueError(f"{name} has {len(arr)} values, expected 1 or one per channel ({c})")
    x = x * std_a + mean_a
    scale = 255.0 if max(float(np.abs(mean_a).max()), float(std_a.max())) <= 1.0 else 1.0
    return np.clip(np.round(np.nan_to_num(x) * scale), 0, 255).astype(np.uint8)


def denormalize(image_tensor: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo ``(x - mean) / std`` normalisation and return a displayable image.

    ``mean`` / ``std`` in ``[0, 1]`` units (e.g. ImageNet's 0.485 / 0.229) mean pixels were scaled to ``[0, 1]``
    first, so the result is multiplied by 255; values above 1 (e.g. 123.675) are taken as ``0..255`` units.

    Args:
        image_tensor: ``(C, H, W)`` (or ``(1, C, H, W)``) tensor or array, normalised.
        mean: per-channel mean (or one value for all channels).
        std: per-channel standard deviation.

    Returns:
        ``(H, W, 3)`` uint8 RGB array (1 channel repeated; see :func:`to_uint8_hwc` for other counts).
    """
    x = _to_numpy(image_tensor).astype(np.float64)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"image_tensor must be (C, H, W), got shape {x.shape}")
    hwc = np.moveaxis(x, 0, -1)  # (C, H, W) -> (H, W, C)
    return to_uint8_hwc(_denormalize_hwc(hwc, mean, std))


def overlay(
    image: Any,
    mask: Any,
    palette: Sequence[Sequence[int]] | np.ndarray,
    alpha: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    ignore_index: int | None = IGNORE_INDEX,
) -> np.ndarray:
    """Blend a colourised label map over an image: ``(1 - alpha) * image + alpha * colour``.

    Pixels equal to ``ignore_index`` keep the image unchanged.

    Args:
        image: uint8 ``(H, W, 3)`` / ``(3, H, W)``, float ``[0, 1]``, or a normalised float tensor together with
            ``mean`` / ``std`` (see :func:`to_uint8_hwc`).
        mask: ``(H, W)`` class ids.
        palette: one colour per class.
        alpha: opacity of the mask colours in ``[0, 1]``.
        mean: normalisation mean of ``image``, if it is normalised.
        std: normalisation std of ``image``.
        ignore_index: label left uncoloured, or ``None``.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.
    """
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    rgb = to_uint8_hwc(image, mean, std)
    m = _label_array(mask)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match image size {rgb.shape[:2]}")
    blend = np.empty_like(rgb)
    rows = max(1, (1 << 20) // max(1, rgb.shape[1]))  # blocks of about a million pixels: memory bounded on any size
    for r in range(0, rgb.shape[0], rows):
        image_rows, labels = rgb[r : r + rows], m[r : r + rows]
        color = colorize(labels, palette, ignore_index=ignore_index).astype(np.float64)
        out = np.round((1.0 - alpha) * image_rows.astype(np.float64) + alpha * color).astype(np.uint8)
        if ignore_index is not None:
            keep = labels == ignore_index
            out[keep] = image_rows[keep]
        blend[r : r + rows] = out
    return blend


# ------------------------------------------------------------------------------------------------ files
def label_png_bytes(
    mask: Any, palette: Sequence[Sequence[int]] | np.ndarray, ignore_color: Sequence[int] = (0, 0, 0)
) -> bytes:
    """The bytes of the palette-mode PNG that :func:`save_label_png` writes (pixel values = class ids).

    Raises:
        ValueError: for ids outside ``0..255`` or a palette with more than 256 colours.
    """
    m = _label_array(mask)
    bad = (m < 0) | (m > 255)
    if bad.any():
        raise ValueError(f"a label PNG stores ids 0..255 only; mask holds {_bad_values(m[bad])}")
    lut = _palette_array(palette)
    if len(lut) > 256:
        raise ValueError(f"a PNG palette holds at most 256 colours, got {len(lut)}")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[255] = np.asarray(ignore_color, dtype=np.uint8)
    full[: len(lut)] = lut
    img = Image.fromarray(np.ascontiguousarray(m.astype(np.uint8)))  # mode "L", pixel values = ids
    img.putpalette(full.reshape(-1).tobytes())  # "L" -> "P" without touching the pixel values
    assert img.mode == "P"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(
    mask: Any,
    path: str | PathLike,
    palette: Sequence[Sequence[int]] | np.ndarray,
    ignore_color: Sequence[int] = (0, 0, 0),
) -> Path:
    """Write a palette-mode ("P") PNG whose pixel values are the class ids (255 kept as is).

    Reading it back with ``np.array(PIL.Image.open(path))`` gives the ids; viewers show the palette colours.
    Palette entries beyond the given colours are black, except index 255 which gets ``ignore_color`` unless the
    palette itself has 256 entries. The bytes are those of :func:`label_png_bytes`.

    Args:
        mask: ``(H, W)`` ids in ``0..255``.
        path: output file (parent folders are created).
        palette: up to 256 colours.
        ignore_color: colour shown for id 255.

    Returns:
        The written path.

    Raises:
        ValueError: for ids outside ``0..255`` or a palette with more than 256 colours.
    """
    data = label_png_bytes(mask, palette, ignore_color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def save_rgb_png(array: Any, path: str | PathLike) -> Path:
    """Write an RGB image as PNG.

    Args:
        array: ``(H, W, 3)`` uint8 (or anything :func:`to_uint8_hwc` accepts).
        path: output file (parent folders are created).

    Returns:
        The written path.
    """
    rgb = to_uint8_hwc(array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def make_grid(images: Sequence[Any], ncol: int = 3, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images into a panel, row by row (e.g. image | ground truth | prediction triplets with ``ncol=3``).

    Every cell is as large as the largest image; smaller images sit in the top-left of their cell.

    Args:
        images: images accepted by :func:`to_uint8_hwc` (uint8 ``(H, W, 3)``, grayscale, ...).
        ncol: images per row (>= 1).
        pad: pixels of border around and between cells (>= 0).
        pad_value: grey level of the border and empty cells.

    Returns:
        ``(H_total, W_total, 3)`` uint8 array.
    """
    if isinstance(ncol, bool) or not isinstance(ncol, (int, np.integer)) or ncol < 1:
        raise ValueError(f"ncol must be a positive int, got {ncol!r}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad!r}")
    if len(images) == 0:
        raise ValueError("make_grid needs at least one image")
    tiles = [to_uint8_hwc(im) for im in images]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    ncol = min(int(ncol), len(tiles))
    nrow = math.ceil(len(tiles) / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + t.shape[0], x : x + t.shape[1]] = t
    return grid
