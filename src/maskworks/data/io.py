"""Reading images and label masks, the dataset error type, and the sample format shared by every dataset.

A dataset returns ``dataset[i]`` as a dict (see :class:`SegmentationDataset`)::

    {"image": float32 (C, H, W) normalised by the dataset mean/std,
     "mask": int64 (H, W), class ids 0..K-1 and 255 = ignore,
     "instances": {"boxes": float32 (N, 4) xyxy, "labels": int64 (N,), "masks": bool (N, H, W)[,
                   "iscrowd": int64 (N,)]},  # when available; iscrowd only from datasets that have crowd regions
     "meta": {"file": str | None, "index": int, "orig_size": (H, W)}}

The pipeline of every ``__getitem__`` is: read the *raw* sample (``image`` a ``tv_tensors.Image`` uint8 (C, H, W),
``mask`` a ``tv_tensors.Mask`` int64 (H, W), ``instances`` with ``tv_tensors.BoundingBoxes`` and
:class:`~maskworks.data.transforms.InstanceMasks`), check it, apply the dataset's ``transform`` to it, then
convert the image to float and normalise it (:func:`~maskworks.data.transforms.normalize_image`). Transforms never
need to know mean/std; instances that a transform moved out of view are dropped and boxes are recomputed from the
visible instance masks (pixel-edge convention: a box spans ``[x1, x2) x [y1, y2)``). An optional per-instance
``iscrowd`` (int64 ``(N,)``, 1 = crowd region) is a plain tensor that transforms pass through unchanged; it is
filtered together with the labels when instances are dropped.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from maskworks.data.transforms import InstanceMasks, normalize_image

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_LOW_DEPTH_STEPS = {"L;2": 85, "L;4": 17}  # raw mode -> Pillow's stretch factor to 0..255


class DatasetError(ValueError):
    """Bad dataset files: the message names the file and what was expected."""


def _too_large(path: Path, kind: str, what: str) -> DatasetError:
    return DatasetError(
        f"{kind} file {path} is too large: {what}; expected at most {Image.MAX_IMAGE_PIXELS} pixels "
        f"(Pillow's decompression-bomb limit: set PIL.Image.MAX_IMAGE_PIXELS higher, or to None, to allow it)"
    )


def _open_header(path: Path, kind: str) -> Image.Image:
    """Open an image file lazily (header only) and check its declared size.

    Raises:
        DatasetError: missing or unreadable file, zero width or height, or more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb limit; Pillow only warns between one and two
            times the limit, maskworks refuses the file).
    """
    try:
        img = Image.open(path)
    except FileNotFoundError as e:
        raise DatasetError(f"{kind} file {path} does not exist") from e
    except Image.DecompressionBombError as e:
        raise _too_large(path, kind, str(e)) from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, ...
        raise DatasetError(
            f"cannot read {kind} file {path}: {type(e).__name__}: {e}; expected a complete image "
            f"file ({', '.join(IMAGE_EXTENSIONS)})"
        ) from e
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise DatasetError(f"{kind} file {path} is {width}x{height} (WxH); expected an image of at least 1x1 pixels")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        img.close()
        raise _too_large(path, kind, f"{width}x{height} (WxH) = {width * height} pixels")
    return img


def _raw_mode(img: Image.Image) -> str | None:
    """The decoder's raw mode of a not yet loaded image (e.g. ``"L;2"`` for a 2-bit grayscale PNG), if known."""
    try:
        args = img.tile[0].args if img.tile else None
    except (AttributeError, IndexError, TypeError):
        return None
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else None


def _open(path: Path, kind: str) -> tuple[Image.Image, str | None]:
    """Open and fully decode an image file (so truncated files fail here, not later); also return its raw mode."""
    img = _open_header(path, kind)
    raw_mode = _raw_mode(img)
    try:
        img.load()
    except Exception as e:  # see _open_header
        img.close()
        raise DatasetError(
            f"cannot read {kind} file {path}: {type(e).__name__}: {e}; expected a complete image "
            f"file ({', '.join(IMAGE_EXTENSIONS)})"
        ) from e
    return img, raw_mode


def _to_uint8(arr: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """High bit-depth or float grayscale data to uint8 by the range of the *type*, never of the image.

    Integer modes (``I;16*`` and 32-bit ``I``) are 16-bit data: ``v -> round(v / 257)``, so 65535 -> 255 and
    250 -> 1 in every image; 32-bit values outside 0..65535 are refused. Float (``F``) images hold 0..1:
    ``v -> round(255 v)``; values outside 0..1 and non-finite values are refused.
    """
    if arr.dtype == np.uint8:
        return arr
    if mode == "F":
        if not np.isfinite(arr).all():
            raise DatasetError(
                f"image {path} (float mode 'F') holds NaN or infinite values; expected finite values in 0..1"
            )
        low, high = float(arr.min()), float(arr.max())
        if low < 0.0 or high > 1.0:
            raise DatasetError(
                f"image {path} (float mode 'F') holds values {low:g}..{high:g}; expected 0..1 (float images are "
                f"read as 0..1 -> 0..255; save the image as 8-bit or 16-bit integers instead)"
            )
        return np.rint(arr.astype(np.float32) * np.float32(255.0)).astype(np.uint8)
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > 65535:
        raise DatasetError(
            f"image {path} (integer mode {mode!r}) holds values {low}..{high}; expected 0..65535 (integer "
            f"images are read as 16-bit data, 65535 -> 255; save the image as 8-bit or 16-bit PNG/TIFF)"
        )
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257), exact in integers


def image_channels(path: str | Path) -> int:
    """Channels an image file becomes when read: 1 for grayscale modes, 3 otherwise (alpha is dropped).

    Reads only the header (palette images count as colour).

    Raises:
        DatasetError: the file is missing, unreadable, empty (0 pixels) or over the decompression-bomb limit.
    """
    path = Path(path)
    with _open_header(path, "image") as img:
        mode = img.mode
    return 1 if mode in _GRAY_MODES else 3


def read_image(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Read an image as uint8 ``(H, W, C)``.

    Conversion rules (the same for every image of a dataset, never depending on the pixel values of one image):

    - 8-bit modes are kept; palette ("P", "PA"), CMYK, YCbCr, LAB, HSV and RGBA/RGBX images become RGB (Pillow's
      ``convert("RGB")``) and alpha is dropped. Grayscale modes ("1", "L", "LA") stay 1-channel ("1": 0/1 -> 0/255).
    - 16-bit ("I;16", "I;16B", ...) and 32-bit integer ("I") grayscale images are scaled by the 16-bit range:
      ``round(v / 257)`` (65535 -> 255, 250 -> 1). 32-bit values outside 0..65535 raise :class:`DatasetError`.
    - Float ("F") grayscale images must hold 0..1 and are scaled by 255; values outside 0..1, NaN or infinity raise
      :class:`DatasetError`.
    - ``channels=3`` repeats a grayscale image over three channels; ``channels=1`` converts colour to luminance
      (ITU-R 601-2, Pillow's ``convert("L")``).

    Args:
        path: image file (png, jpg, bmp, tif, webp, ...).
        channels: 1 (grayscale) or 3 (RGB) to convert to; None keeps grayscale images 1-channel and makes every
            other mode RGB.

    Returns:
        A ``(H, W, channels)`` uint8 array.

    Raises:
        DatasetError: the file is missing, truncated or not an image, has zero width or height, exceeds
            ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression-bomb limit), has a mode that cannot become RGB or
            grayscale (e.g. "LAB"), or holds values outside the ranges above. The message names the file.
    """
    path = Path(path)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    img, _ = _open(path, "image")
    try:
        return image_to_array(img, channels, path)
    finally:
        img.close()


def image_to_array(img: Image.Image, channels: int | None, where: str | Path) -> np.ndarray:
    """A loaded Pillow image as uint8 ``(H, W, C)`` by the conversion rules of :func:`read_image` (the same code
    path, so an image decoded from bytes equals the file read by :func:`read_image`); ``where`` names the image in
    errors.

    Raises:
        DatasetError: a mode that cannot become RGB or grayscale, or values outside the documented ranges.
    """
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        arr = _to_uint8(np.asarray(img), mode, where)[..., None]
        return np.repeat(arr, 3, axis=2) if channels == 3 else arr
    if channels is None:
        channels = 1 if mode in _GRAY_MODES else 3
    target = "L" if channels == 1 else "RGB"
    try:
        arr = np.asarray(img if mode == target else img.convert(target))
    except (ValueError, OSError) as e:
        raise DatasetError(
            f"image {where} has image mode {mode!r} which cannot be converted to {target!r} ({e}); expected a "
            f"grayscale, RGB(A), palette, CMYK or 16-bit image"
        ) from e
    return arr[..., None] if arr.ndim == 2 else arr


def _encode_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _map_colors(
    rgb: np.ndarray, colors: Sequence[Sequence[int]], ignore_colors: Sequence[Sequence[int]], path: Path
) -> np.ndarray:
    """Map an RGB colour mask to class ids (``colors[i]`` -> i, ``ignore_colors`` -> 255)."""
    table = {int(c): i for i, c in enumerate(_encode_rgb(np.asarray(colors, dtype=np.int64)))}
    for c in _encode_rgb(np.asarray(ignore_colors, dtype=np.int64).reshape(-1, 3)):
        table.setdefault(int(c), IGNORE_INDEX)
    keys = np.array(sorted(table), dtype=np.int64)
    values = np.array([table[k] for k in keys], dtype=np.int64)
    codes = _encode_rgb(rgb)
    pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    known = keys[pos] == codes
    if not known.all():
        unknown = np.unique(codes[~known])
        shown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in unknown[:10].tolist()]
        raise DatasetError(
            f"mask {path}: {len(unknown)} colour(s) not in the class colours, e.g. {shown}; expected "
            f"only the colours of the class file ({len(colors)} classes) or a void/ignore colour"
        )
    return values[pos]


def read_mask(
    path: str | Path, colors: Sequence[Sequence[int]] | None = None, ignore_colors: Sequence[Sequence[int]] = ()
) -> np.ndarray:
    """Read a label mask as int64 ``(H, W)`` raw label values.

    Palette ("P", "PA": the palette index), grayscale ("L", "LA": the gray value, "1": 0/1, 2- and 4-bit PNGs: the
    stored value) and integer ("I;16", "I") masks hold class indices directly. RGB(A/X) masks are mapped through
    ``colors`` (class ``i`` has colour ``colors[i]``; ``ignore_colors`` become 255); without colours an RGB mask is
    accepted only when it is gray (all channels equal). Float ("F"), CMYK, YCbCr, LAB and HSV masks are refused.

    Args:
        path: mask file.
        colors: class colours for RGB masks.
        ignore_colors: colours meaning "ignore" in RGB masks.

    Returns:
        An int64 ``(H, W)`` array (not yet checked against the number of classes).

    Raises:
        DatasetError: unreadable, truncated, empty or oversized file, a refused mode, or unknown colours; the
            message names the file.
    """
    path = Path(path)
    img, raw_mode = _open(path, "mask")
    try:
        mode = img.mode
        if mode in ("P", "L", "1") or mode.startswith("I"):
            values = np.asarray(img).astype(np.int64)
            # Pillow stretches 2- and 4-bit grayscale PNGs to 0..255; undo it to get the stored label values back
            if mode == "L" and raw_mode in _LOW_DEPTH_STEPS:
                values //= _LOW_DEPTH_STEPS[raw_mode]
            return values
        if mode in ("LA", "La", "PA"):
            return np.asarray(img)[..., 0].astype(np.int64)
        if mode not in ("RGB", "RGBA", "RGBX"):
            raise DatasetError(
                f"mask {path} has image mode {mode!r}; expected an index mask (P, L, 1, 16-bit) or an RGB colour mask"
            )
        rgb = np.asarray(img)[..., :3]
    finally:
        img.close()
    if colors is not None:
        return _map_colors(rgb, colors, ignore_colors, path)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return rgb[..., 0].astype(np.int64)
    raise DatasetError(
        f"mask {path} is an RGB colour mask but no class colours are known; expected an index mask "
        f"(palette or grayscale PNG) or a class file with 'name r g b' lines"
    )


def label_lut(num_classes: int, extra: dict[int, int] | None = None) -> np.ndarray:
    """A raw-value -> class-id lookup table: ``0..K-1`` -> themselves, 255 -> 255, everything else invalid (-1).

    Args:
        num_classes: K.
        extra: additional raw -> id entries (e.g. ``{11: 255}`` for CamVid's void label).

    Returns:
        An int64 array of 256 entries.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise DatasetError(f"num_classes must be an integer in 1..{IGNORE_INDEX}, got {num_classes!r}")
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise DatasetError(f"num_classes must be in 1..{IGNORE_INDEX} ({IGNORE_INDEX} = ignore), got {num_classes}")
    lut = np.full(256, -1, dtype=np.int64)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for raw, value in (extra or {}).items():
        lut[raw] = value
    return lut


def _describe_values(values: np.ndarray) -> str:
    """``[0 1 2 3 7 255]`` -> ``"0..3, 7, 255"``."""
    parts, values = [], [int(v) for v in values]
    start = prev = values[0] if values else None
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        start = prev = v
    return ", ".join(parts)


def map_labels(raw: np.ndarray, lut: np.ndarray, path: str | Path) -> np.ndarray:
    """Map raw label values through ``lut`` and reject values it marks invalid.

    Args:
        raw: int64 raw label values (from :func:`read_mask`).
        lut: table from :func:`label_lut` (-1 = invalid value).
        path: the mask file, for the error message.

    Returns:
        int64 class ids (0..K-1, 255 = ignore).
    """
    in_range = (raw >= 0) & (raw < len(lut))
    mapped = lut[np.clip(raw, 0, len(lut) - 1)]
    bad = ~in_range | (mapped < 0)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(v) for v in values[:20].tolist()) + (" ..." if len(values) > 20 else "")
        raise DatasetError(
            f"mask {path}: label values [{shown}] out of range; expected only "
            f"{_describe_values(np.flatnonzero(lut >= 0))} (255 = ignore)"
        )
    return mapped


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: str | Path, mask_path: str | Path) -> None:
    """Raise :class:`DatasetError` unless ``image`` ``(H, W, C)`` and ``mask`` ``(H, W)`` have the same size."""
    if image.shape[:2] != mask.shape[:2]:
        raise DatasetError(
            f"image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW) but its mask {mask_path} "
            f"is {mask.shape[0]}x{mask.shape[1]}; expected the same size"
        )


def raw_sample(image: np.ndarray, mask: np.ndarray, instances: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Wrap arrays as the raw sample a transform receives.

    Args:
        image: uint8 ``(H, W, C)``.
        mask: ``(H, W)`` class ids.
        instances: optional ``{"labels": (N,), "masks": (N, H, W)[, "boxes": (N, 4) xyxy][, "iscrowd": (N,)]}``;
            boxes default to the tight boxes of the masks; ``iscrowd`` (0/1) is kept as int64 when given.

    Returns:
        ``{"image": tv_tensors.Image, "mask": tv_tensors.Mask[, "instances": {...}]}``.
    """
    sample: dict[str, Any] = {
        "image": tv_tensors.Image(
            torch.from_numpy(np.require(image.transpose(2, 0, 1), requirements="CW"))
        ),  # (C, H, W)
        "mask": tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64, copy=False))),
    }
    if instances is not None:
        masks = torch.from_numpy(np.asarray(instances["masks"], dtype=np.uint8))  # (N, H, W)
        boxes = instances.get("boxes")
        boxes = masks_to_boxes(masks.bool()) if boxes is None else torch.as_tensor(boxes, dtype=torch.float32)
        sample["instances"] = {
            "boxes": tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=tuple(mask.shape)),
            "labels": torch.as_tensor(instances["labels"], dtype=torch.int64),
            "masks": InstanceMasks(masks),
        }
        if instances.get("iscrowd") is not None:
            sample["instances"]["iscrowd"] = torch.as_tensor(np.asarray(instances["iscrowd"]), dtype=torch.int64)
    return sample


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel-edge convention, ``x2 = last column + 1``) of boolean ``(N, H, W)`` masks."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    h, w = masks.shape[-2:]
    ys, xs = torch.arange(h), torch.arange(w)
    y1 = torch.where(rows, ys, h).amin(1)
    y2 = torch.where(rows, ys, -1).amax(1) + 1
    x1 = torch.where(cols, xs, w).amin(1)
    x2 = torch.where(cols, xs, -1).amax(1) + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


def finalize_instances(instances: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop instances with no visible pixel and recompute their boxes from the masks.

    Instance masks count a pixel as set only where the value is exactly 1, so any fill a transform used for
    padding never creates instance pixels. An ``iscrowd`` entry, when present, is filtered like ``labels``.
    """
    labels = torch.as_tensor(instances["labels"]).as_subclass(torch.Tensor).to(torch.int64)
    iscrowd = instances.get("iscrowd")
    if iscrowd is not None:
        iscrowd = torch.as_tensor(iscrowd).as_subclass(torch.Tensor).to(torch.int64).reshape(-1)
        if iscrowd.shape[0] != labels.shape[0]:
            raise ValueError(
                f"instances have {labels.shape[0]} labels but {iscrowd.shape[0]} iscrowd flags; expected one flag "
                f"per instance (a transform that adds or removes instances must update 'iscrowd' too)"
            )
    if "masks" not in instances:
        boxes = torch.as_tensor(instances["boxes"]).as_subclass(torch.Tensor).float().reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out = {"boxes": boxes[keep], "labels": labels[keep]}
    else:
        masks = instances["masks"].as_subclass(torch.Tensor) == 1  # (N, H, W)
        keep = masks.flatten(1).any(1)
        masks = masks[keep]
        out = {"boxes": masks_to_boxes(masks), "labels": labels[keep], "masks": masks}
    if iscrowd is not None:
        out["iscrowd"] = iscrowd[keep]
    return out


def finalize_sample(
    sample: dict[str, Any], mean: Sequence[float], std: Sequence[float], meta: dict[str, Any]
) -> dict[str, Any]:
    """Turn a (transformed) raw sample into the model-ready sample (float normalised image, int64 mask, meta)."""
    image, mask = sample["image"], sample["mask"]
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        raise ValueError(
            f"sample {meta.get('file') or meta.get('index')}: after the transform the image is "
            f"{tuple(image.shape[-2:])} but the mask is {tuple(mask.shape[-2:])}; expected a transform that "
            f"moves both (keep the mask a tv_tensors.Mask and use torchvision.transforms.v2)"
        )
    out = {"image": normalize_image(image, mean, std), "mask": mask.as_subclass(torch.Tensor).to(torch.int64)}
    if "instances" in sample:
        out["instances"] = finalize_instances(sample["instances"])
    out["meta"] = meta
    return out


class SegmentationDataset(Dataset, ABC):
    """Base of every maskworks dataset: raw sample -> ``transform`` -> float normalised sample.

    Subclasses implement ``__len__`` and :meth:`load_raw` and set the attributes below.

    Attributes:
        num_classes: K; masks hold 0..K-1 and ``ignore_index``.
        class_names: K names.
        palette: K ``(r, g, b)`` colours.
        mean: per-channel mean in 0-1 units, used to normalise the image.
        std: per-channel std in 0-1 units.
        in_channels: image channels C.
        ignore_index: 255.
        transform: callable on the raw sample dict (see the module docstring), or None.
    """

    ignore_index: int = IGNORE_INDEX
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int

    def __init__(self, transform: Callable[[dict], dict] | None = None) -> None:
        self.transform = transform

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load_raw(self, index: int) -> dict[str, Any]:
        """The raw sample ``{"image", "mask"[, "instances"]}`` before the transform, plus ``"file"`` (str or None)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} samples")
        index = int(index) % n
        sample = self.load_raw(index)
        meta = {"file": sample.pop("file", None), "index": index, "orig_size": tuple(sample["image"].shape[-2:])}
        if self.transform is not None:
            sample = self.transform(sample)
        return finalize_sample(sample, self.mean, self.std, meta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes, in_channels={self.in_channels})"


def collate_samples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: stack ``image`` ``(B, C, H, W)`` and ``mask`` ``(B, H, W)``, keep the rest as lists.

    Args:
        batch: samples from a maskworks dataset.

    Returns:
        ``{"image": Tensor, "mask": Tensor, "instances": [...], "meta": [...]}`` (keys as present in the samples).
    """
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        if key in ("image", "mask"):
            shapes = sorted({tuple(v.shape) for v in values})
            if len(shapes) > 1:
                files = [(s.get("meta") or {}).get("file") for s in batch]
                raise ValueError(
                    f"cannot batch {key}s of different shapes {shapes} (files {files}); expected equal "
                    f"sizes: use build_transforms(crop_size=...) for training or batch_size=1"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
