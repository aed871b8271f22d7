"""Memory-bounded sliding-window prediction of images too large for a whole-image float accumulator.

:func:`predict_large_image` gives the same blended prediction as :func:`~maskworks.inference.sliding.sliding_window`
on the whole image (same window grid, importance map and order of summation), but walks the image in horizontal
strips: for each row of windows it reads only the input rows those windows need (plus the overlap-tile margin),
adds their weighted predictions into a float buffer of one window height, and as soon as rows can receive no more
windows it normalises them, takes the labels (and optionally probabilities) and writes them to ``.npy`` files on
disk. Peak memory is therefore a few strips (``K x window_h x W`` floats and the input rows), whatever the height
of the image, plus the pages of the output files themselves.

Inputs are read by region: ``.npy`` arrays and uncompressed TIFFs by positional reads of the rows needed (no
whole-file mapping), compressed or tiled TIFFs (with the optional ``tifffile``, ``pip install maskworks[tiff]``)
one strip or tile row at a time, other formats (PNG, JPEG, BMP, WebP) through Pillow, which must decode the whole
file once (Pillow's own buffer, 1 to 4 bytes per pixel; rows are converted to float one strip at a time).

Outputs are written to a temporary file beside the destination and renamed when complete, so a crash never
leaves a truncated result under the final name.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from maskworks.data.io import IMAGENET_MEAN, IMAGENET_STD
from maskworks.inference.sliding import (
    Model,
    WindowOptions,
    axis_starts,
    bands,
    check_options,
    eval_mode,
    importance_map,
    model_device,
    resolve_window,
    stitch,
    weight_sum,
)

__all__ = ["LargeImagePrediction", "predict_large_image"]

log = logging.getLogger(__name__)

_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0}
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_PIL_UINT16 = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_TIFF_SUFFIXES = (".tif", ".tiff")
_JPEG_COMPRESSIONS = frozenset({6, 7, 33007, 34892})
_FINISH_ROWS = 256  # rows normalised and labelled at a time (bounds the temporaries of argmax / softmax)


class LargeImagePrediction(NamedTuple):
    """Files written by :func:`predict_large_image`.

    Attributes:
        labels: ``.npy`` file of the ``(H, W)`` label map (uint8, or int16 for more than 256 classes).
        probs: ``.npy`` file of the ``(K, H, W)`` uint8 probabilities (``round(255 p)``), or None.
        png: PNG of the label map, or None.
    """

    labels: Path
    probs: Path | None
    png: Path | None


# ------------------------------------------------------------------------------------------------- region readers


class RegionReader(ABC):
    """Reads rows of an ``(H, W, C)`` image without loading all of it.

    Attributes:
        name: the file (or a description) for error messages.
        shape: ``(H, W, C)``.
        dtype: numpy dtype of the pixels.
    """

    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype

    @abstractmethod
    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as an ``(stop - start, W, C)`` array."""

    def close(self) -> None:  # noqa: B027 - most readers hold nothing to release
        """Release open files."""


def _image_shape(name: str, shape: Sequence[int], channel_first: bool = False) -> tuple[int, int, int]:
    """``(H, W, C)`` from an array shape ``(H, W)``, ``(H, W, C)`` (or ``(C, H, W)``), with a clear error."""
    if len(shape) == 2:
        h, w, c = *shape, 1
    elif len(shape) == 3:
        c, h, w = shape if channel_first else (shape[2], shape[0], shape[1])
    else:
        raise ValueError(f"{name} has shape {tuple(shape)}; expected an image of shape (H, W) or (H, W, C)")
    if min(h, w, c) < 1:
        raise ValueError(f"{name} is empty (shape {tuple(shape)})")
    return int(h), int(w), int(c)


class ArrayReader(RegionReader):
    """Rows of an in-memory or memory-mapped array (numpy, zarr): ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``."""

    def __init__(self, array: Any, name: str = "array", channel_first: bool = False):
        self.name = name
        self.shape = _image_shape(name, array.shape, channel_first)
        self.dtype = np.dtype(array.dtype)
        self._array = array
        self._channel_first = channel_first

    def read(self, start: int, stop: int) -> np.ndarray:
        a = self._array
        if self._channel_first:
            return np.moveaxis(np.asarray(a[:, start:stop]), 0, -1)  # (C, h, W) -> (h, W, C)
        rows = np.asarray(a[start:stop])
        return rows[..., None] if rows.ndim == 2 else rows


class RawReader(RegionReader):
    """Rows of a C-ordered array stored uncompressed in a file at ``offset`` (``.npy``, uncompressed TIFF), read
    with positional reads so no page of the file stays mapped in the process.

    Args:
        path: the file.
        offset: byte offset of the first pixel.
        dtype: pixel dtype.
        shape: the stored array shape: ``(H, W)``, ``(H, W, C)``, or ``(C, H, W)`` with ``planar=True``.
        planar: channels stored as separate planes.
    """

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: Sequence[int], planar: bool = False):
        self.name = str(path)
        self.shape = _image_shape(self.name, shape, planar)
        self.dtype = np.dtype(dtype)
        self._offset = int(offset)
        self._planar = planar
        self._fd = os.open(path, os.O_RDONLY)

    def _pread(self, nbytes: int, offset: int) -> np.ndarray:
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise ValueError(f"{self.name} is truncated: expected {nbytes} bytes at offset {offset + done}")
            done += n
        return np.frombuffer(buf, dtype=self.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        h, w, c = self.shape
        item = self.dtype.itemsize
        if not self._planar:
            row = w * c * item
            flat = self._pread((stop - start) * row, self._offset + start * row)
            return flat.reshape(stop - start, w, c)  # (h, W, C)
        planes = [self._pread((stop - start) * w * item, self._offset + (k * h + start) * w * item) for k in range(c)]
        return np.stack([p.reshape(stop - start, w) for p in planes], axis=-1)  # C x (h, W) -> (h, W, C)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PILReader(RegionReader):
    """Rows of an image file decoded by Pillow (PNG, JPEG, BMP, WebP, ...), converted to ``channels`` channels
    like :func:`maskworks.data.io.read_image` (16-bit and float grayscale are kept at full depth).

    The file is decoded once, whole (Pillow cannot decode these formats by region); the decompression-bomb
    limit is lifted for this file since large images are the point.
    """

    def __init__(self, path: Path, channels: int):
        self.name = str(path)
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
            raise ValueError(
                f"cannot read image file {path}: {type(e).__name__}: {e}; expected an image Pillow can decode, "
                "a .npy array or a TIFF"
            ) from e
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        self._img = img
        w, h = img.size
        try:
            self._check_mode(channels)
        except Exception:
            img.close()
            raise
        self.shape = (h, w, channels)

    def _check_mode(self, channels: int) -> None:
        img, path = self._img, self.name
        if img.mode in _PIL_UINT16 or img.mode == "F":
            self.dtype = np.dtype(np.uint16 if img.mode in _PIL_UINT16 else np.float32)
            self._mode = None
            if channels not in (1, 3):
                raise ValueError(f"{path} is a single-channel {img.mode} image; expected {channels} channels")
        elif img.mode == "I":
            raise TypeError(f"{path} has 32-bit integer pixels (mode 'I'); expected 8/16-bit or float pixels")
        elif channels in _PIL_MODES:
            self.dtype = np.dtype(np.uint8)
            self._mode = _PIL_MODES[channels]
        else:
            raise ValueError(
                f"{path} is a {img.mode} image, which converts to 1, 3 or 4 channels; expected {channels} channels "
                "(the length of mean/std); store images with other channel counts as .npy or TIFF"
            )

    def read(self, start: int, stop: int) -> np.ndarray:
        crop = self._img.crop((0, start, self.shape[1], stop))
        if self._mode is not None and crop.mode != self._mode:
            crop = crop.convert(self._mode)
        rows = np.asarray(crop).reshape(stop - start, self.shape[1], -1)  # (h, W) or (h, W, C) -> (h, W, C)
        if rows.shape[2] != self.shape[2]:  # high-depth grayscale to 3 channels
            rows = np.repeat(rows, self.shape[2], axis=2)
        return rows

    def close(self) -> None:
        self._img.close()


class TiffReader(RegionReader):
    """Rows of a compressed, striped or tiled TIFF (first page), decoding only the strips or tile rows needed.

    Decoded bands are kept while later reads still overlap them (reads move down the image), so each strip or
    tile row is decoded about once.
    """

    def __init__(self, path: Path, tifffile: Any):
        self.name = str(path)
        self._tif = tifffile.TiffFile(path)
        try:
            page = self._tif.pages.first
            separate, depth, h, w, contig = page.shaped
            if depth != 1:
                raise ValueError(f"{path} is a volume (image depth {depth}); expected a 2-D image")
            self.shape = (h, w, separate * contig)
            self.dtype = np.dtype(page.dtype)
            if page.is_tiled:
                self._band_h, tile_w = page.tilelength, page.tilewidth
            else:
                self._band_h, tile_w = min(page.rowsperstrip or h, h), w
        except Exception:
            self._tif.close()
            raise
        self._page = page
        self._separate, self._contig = separate, contig
        self._cols = math.ceil(w / tile_w)
        self._bands_per_plane = math.ceil(h / self._band_h)
        self._decodeargs: dict[str, Any] = {}
        if page.compression in _JPEG_COMPRESSIONS:
            self._decodeargs = {"jpegtables": page.jpegtables, "jpegheader": page.keyframe.jpegheader}
        self._cache: dict[int, np.ndarray] = {}
        if self._band_h > 4096:
            log.warning("%s stores %d rows per strip: each strip is decoded whole", path, self._band_h)

    def _band(self, band: int) -> np.ndarray:
        if band in self._cache:
            return self._cache[band]
        h, w, c = self.shape
        y0 = band * self._band_h
        rows = np.zeros((min(self._band_h, h - y0), w, c), dtype=self.dtype)
        page = self._page
        indices = [
            (s * self._bands_per_plane + band) * self._cols + col
            for s in range(self._separate)
            for col in range(self._cols)
        ]
        offsets = [page.dataoffsets[i] for i in indices]
        counts = [page.databytecounts[i] for i in indices]
        segments = self._tif.filehandle.read_segments(offsets, counts, indices=indices, sort=True, flat=True)
        for data, index in segments:
            try:
                seg, (s, _, y, x, _), _ = page.decode(data, index, **self._decodeargs)
            except Exception as e:  # missing codec, corrupt data
                raise ValueError(f"cannot decode {self.name} (segment {index}): {type(e).__name__}: {e}") from e
            if seg is None:  # empty segment: zeros
                continue
            seg = seg[0, : rows.shape[0], : w - x]  # (1, h, w, S) -> (h, w, S), tiles cropped at the border
            assert y == y0, "segment from another band"
            rows[: seg.shape[0], x : x + seg.shape[1], s * self._contig : (s + 1) * self._contig] = seg
        self._cache[band] = rows
        return rows

    def read(self, start: int, stop: int) -> np.ndarray:
        first, last = start // self._band_h, (stop - 1) // self._band_h
        for band in [b for b in self._cache if b < first]:  # reads move down: older bands are done
            del self._cache[band]
        out = np.empty((stop - start, self.shape[1], self.shape[2]), dtype=self.dtype)
        for band in range(first, last + 1):
            rows, y0 = self._band(band), band * self._band_h
            a, b = max(start, y0), min(stop, y0 + rows.shape[0])
            out[a - start : b - start] = rows[a - y0 : b - y0]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


def _open_npy(path: Path) -> RegionReader:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a .npy array: {type(e).__name__}: {e}") from e
    if isinstance(array, np.memmap) and array.flags.c_contiguous:
        return RawReader(path, array.offset, array.dtype, array.shape)
    return ArrayReader(array, str(path))


def _open_tiff(path: Path) -> RegionReader:
    try:
        import tifffile
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs tifffile: pip install 'maskworks[tiff]' (or convert the image to .npy)"
        ) from e
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            planar = page.planarconfig == 2 and page.shaped[0] > 1
        mapped = tifffile.memmap(path, page=0, mode="r")
    except ValueError:  # compressed or not contiguous: decode by strips / tiles
        mapped = None
    except Exception as e:
        raise ValueError(f"cannot read {path} as a TIFF: {type(e).__name__}: {e}") from e
    if mapped is not None:
        if mapped.flags.c_contiguous and mapped.ndim in (2, 3):
            return RawReader(path, mapped.offset, mapped.dtype, mapped.shape, planar=planar and mapped.ndim == 3)
        return ArrayReader(mapped, str(path), channel_first=planar)
    try:
        return TiffReader(path, tifffile)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a TIFF: {type(e).__name__}: {e}") from e


def open_image_regions(source: str | os.PathLike | np.ndarray, channels: int) -> RegionReader:
    """A reader of rows of ``source``, checked to have ``channels`` channels and a supported pixel type.

    Args:
        source: an image file (``.npy`` of shape ``(H, W)`` / ``(H, W, C)``; TIFF; anything Pillow reads) or an
            array ``(H, W)`` / ``(H, W, C)`` (e.g. a ``np.memmap``).
        channels: the number of channels the model expects.

    Returns:
        The reader; call ``close()`` when done.
    """
    if isinstance(source, np.ndarray):
        reader: RegionReader = ArrayReader(source, f"source array {type(source).__name__}{tuple(source.shape)}")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"input image {path} does not exist (or is not a file)")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            reader = _open_npy(path)
        elif suffix in _TIFF_SUFFIXES:
            reader = _open_tiff(path)
        else:
            reader = PILReader(path, channels)
    else:
        raise TypeError(f"source must be a file path or a numpy array (H, W[, C]), got {type(source).__name__}")
    try:
        if reader.dtype not in _SCALES and reader.dtype.kind != "f":
            raise TypeError(
                f"{reader.name} has pixels of type {reader.dtype}; expected uint8, uint16, bool or float (0-1)"
            )
        if reader.shape[2] != channels:
            raise ValueError(
                f"{reader.name} has {reader.shape[2]} channel(s) (shape (H, W, C) = {reader.shape}); expected "
                f"{channels}, one per value of mean/std"
            )
    except Exception:
        reader.close()
        raise
    return reader


def rows_to_tensor(rows: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(h, W, C)`` pixels -> normalised float32 ``(1, C, h, W)``: ``(x / scale - mean) / std``.

    ``scale`` is 255 for uint8, 65535 for uint16 and 1 for float and bool; computed in one pass as
    ``x * (1 / (scale * std)) - mean / std``.

    Args:
        rows: the pixels.
        mean: per-channel mean in 0-1 units.
        std: per-channel standard deviation in 0-1 units.

    Returns:
        A contiguous ``(1, C, h, W)`` float32 tensor.
    """
    scale = _SCALES.get(rows.dtype, 1.0)
    if rows.dtype != np.uint8:
        rows = rows.astype(np.float32)
    elif not rows.flags.writeable:  # torch wants writable memory even to read it
        rows = rows.copy()
    src = torch.from_numpy(rows).permute(2, 0, 1)  # (C, h, W)
    std_t = torch.as_tensor(std, dtype=torch.float64).view(-1, 1, 1)
    gain = (1.0 / (scale * std_t)).float()
    shift = (-torch.as_tensor(mean, dtype=torch.float64).view(-1, 1, 1) / std_t).float()
    out = torch.empty(src.shape, dtype=torch.float32)
    return torch.addcmul(shift, src, gain, out=out)[None]


# -------------------------------------------------------------------------------------------------- output files


def _temporary(dest: Path) -> Path:
    """A fresh name beside ``dest`` for writing it before renaming."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


class NpyWriter:
    """Writes a C-ordered ``.npy`` array row block by row block with positional writes.

    The written pages go to the operating system's file cache, not to this process's memory (a writable memory map
    would keep every written page resident until it is flushed and unmapped).

    Args:
        path: the file to create.
        dtype: element type.
        shape: ``(H, W)`` or ``(K, H, W)``; rows are along the ``H`` axis.
    """

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]):
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        with open(path, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_1_0(f, header)
            self._offset = f.tell()
            f.truncate(self._offset + math.prod(self.shape) * self.dtype.itemsize)
        self._fd = os.open(path, os.O_WRONLY)

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (``(n, W)``, or ``(K, n, W)`` for a 3-D array) at row ``start``."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        h, w = self.shape[-2:]
        planes = rows[None] if rows.ndim == 2 else rows
        for k, plane in enumerate(planes):
            data, offset = memoryview(plane).cast("B"), self._offset + ((k * h + start) * w) * self.dtype.itemsize
            while data:
                n = os.pwrite(self._fd, data, offset)
                data, offset = data[n:], offset + n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _probs_path(out_path: Path) -> Path:
    return out_path.with_name(f"{out_path.stem}_probs.npy")


def argmax0(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(0)`` (the first maximum) for ``(K, ...)`` values, as uint8 / int16 / int64 by the number of
    classes; a pass per class, which on CPU is several times faster than ``argmax`` over a leading dimension."""
    k = values.shape[0]
    dtype = torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int64
    best = values[0].clone()
    labels = torch.zeros(values.shape[1:], dtype=dtype, device=values.device)
    for c in range(1, k):
        labels.masked_fill_(values[c] > best, c)
        torch.maximum(best, values[c], out=best)
    return labels


def _finish_rows(
    values: torch.Tensor, activation: str | None, with_probs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels and probabilities of blended rows.

    Args:
        values: ``(K, n, W)`` blended logits (probabilities when ``activation`` is set).
        activation: the activation applied per window.
        with_probs: also return probabilities.

    Returns:
        ``(n, W)`` labels and ``(K, n, W)`` probabilities (None unless ``with_probs``).
    """
    if values.shape[0] == 1:  # binary: positive where the probability is above 0.5 (the logit above 0)
        probs = values if activation else values.sigmoid()
        return probs[0] > 0.5, probs if with_probs else None
    labels = argmax0(values)
    if not with_probs:
        return labels, None
    return labels, values if activation else values.softmax(dim=0)


def _write_png(labels_path: Path, png_path: Path) -> None:
    labels = np.load(labels_path, mmap_mode="r")
    array = np.asarray(labels) if labels.dtype == np.uint8 else np.asarray(labels).astype(np.uint16)
    tmp = _temporary(png_path)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, png_path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ public API


def _check_large_options(
    num_classes: int, mean: Sequence[float], std: Sequence[float], out_path: Path, png_path: Path | None
) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or not 1 <= num_classes <= 32768:
        raise ValueError(f"num_classes must be an int in 1..32768, got {num_classes!r}")
    if len(mean) != len(std) or len(mean) < 1:
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)} values")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    if out_path.suffix.lower() != ".npy":
        raise ValueError(f"out_path must be a .npy file (the label map), got {out_path}")
    for p in (out_path, png_path):
        if p is not None and not p.parent.is_dir():
            raise FileNotFoundError(f"output folder {p.parent} does not exist (for {p})")
    if png_path is not None and png_path.suffix.lower() != ".png":
        raise ValueError(f"png_path must end in .png, got {png_path}")


def predict_large_image(
    model: Model,
    source: str | os.PathLike | np.ndarray,
    out_path: str | os.PathLike,
    window: int | Sequence[int] = 512,
    overlap: float | Sequence[float] = 0.25,
    *,
    num_classes: int,
    blend: str = "gaussian",
    batch_size: int = 4,
    sigma_scale: float | Sequence[float] = 0.125,
    margin: int | Sequence[int] = 0,
    activation: str | None = None,
    padding_mode: str = "reflect",
    cval: float = 0.0,
    channels_last: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    save_probs: bool = False,
    png_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> LargeImagePrediction:
    """Segment an image of any size with bounded memory, writing the label map to disk strip by strip.

    The blended values equal those of :func:`~maskworks.inference.sliding.sliding_window` on the whole
    normalised image with the same options; labels are their argmax (for ``num_classes == 1``: probability
    > 0.5). Runs under ``torch.no_grad()``, with an ``nn.Module`` in eval mode for the call.

    Args:
        model: callable from ``(N, C, h, w)`` images to ``(N, num_classes, h, w)`` logits (or a dict with
            ``"out"``).
        source: the image: ``.npy`` (``(H, W)`` or ``(H, W, C)``), TIFF (first page), another format Pillow reads,
            or a numpy array / memmap ``(H, W[, C])``. Pixels are uint8 (scaled by 1/255), uint16 (1/65535), bool
            or float (used as they are, 0-1).
        out_path: destination ``.npy`` of the ``(H, W)`` labels: uint8 for up to 256 classes, else int16.
        window: window size ``(h, w)`` or one int.
        overlap: overlap fraction in [0, 1), one or per axis.
        num_classes: K, the model's output channels.
        blend, batch_size, sigma_scale, margin, activation, padding_mode, cval, channels_last: as in
            :func:`~maskworks.inference.sliding.sliding_window`.
        mean: per-channel mean in 0-1 units; its length is the number of channels the model expects.
        std: per-channel standard deviation in 0-1 units.
        save_probs: also write ``<out_path stem>_probs.npy``: ``(K, H, W)`` uint8 probabilities ``round(255 p)``
            (softmax of the blended logits, or sigmoid for one class; the blended values themselves when
            ``activation`` is set).
        png_path: also write the label map as a PNG (8-bit, or 16-bit above 256 classes); this needs the label map
            in memory once (``H x W`` bytes), so it is off unless a path is given.
        device: device the model runs on (default: the model's); the accumulator lives on the CPU.
        progress: show a tqdm progress bar over the window batches.

    Returns:
        The paths written (:class:`LargeImagePrediction`).
    """
    out_path = Path(out_path)
    png_path = None if png_path is None else Path(png_path)
    _check_large_options(num_classes, mean, std, out_path, png_path)
    reader = open_image_regions(source, channels=len(mean))
    temporaries: list[Path] = []
    try:
        h, w, _ = reader.shape
        window = resolve_window(window, (h, w))  # MONAI's -1 = the whole axis
        opts = check_options(
            2, window, overlap, blend, batch_size, sigma_scale, margin, activation, padding_mode, cval, channels_last
        )
        labels_tmp = _temporary(out_path)
        temporaries.append(labels_tmp)
        label_dtype = np.uint8 if num_classes <= 256 else np.int16
        labels = NpyWriter(labels_tmp, label_dtype, (h, w))
        probs = None
        if save_probs:
            temporaries.append(_temporary(_probs_path(out_path)))
            probs = NpyWriter(temporaries[-1], np.uint8, (num_classes, h, w))
        device = model_device(model, torch.device("cpu")) if device is None else torch.device(device)
        try:
            with torch.no_grad(), eval_mode(model):
                _predict_strips(model, reader, opts, num_classes, mean, std, labels, probs, device, progress)
        finally:
            for writer in (labels, probs):
                if writer is not None:
                    writer.close()
        os.replace(labels_tmp, out_path)
        probs_path = None
        if save_probs:
            probs_path = _probs_path(out_path)
            os.replace(temporaries[1], probs_path)
        if png_path is not None:
            _write_png(out_path, png_path)
    finally:
        reader.close()
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
    return LargeImagePrediction(out_path, probs_path, png_path)


def _predict_strips(
    model: Model,
    reader: RegionReader,
    opts: WindowOptions,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    labels: NpyWriter,
    probs: NpyWriter | None,
    device: torch.device,
    progress: bool,
) -> None:
    """Run the windows one row of windows at a time, writing rows to ``labels`` / ``probs`` once final."""
    h, w, _ = reader.shape
    (wh, ww), (mh, _) = opts.window, opts.margin
    starts = [axis_starts(h, wh, opts.overlap[0]), axis_starts(w, ww, opts.overlap[1])]
    weight = importance_map(opts.window, opts.blend, opts.sigma_scale)
    acc = torch.zeros((1, num_classes, wh, w))  # image rows [done, done + wh)
    cache: dict = {}
    batches = len(starts[0]) * math.ceil(len(starts[1]) / opts.batch_size)
    with tqdm(total=batches, desc="large image", disable=not progress) as bar:
        for sy, (done, end) in zip(starts[0], bands(starts[0], h)):  # rows before ``done`` are written
            lo, hi = max(sy - mh, 0), min(sy + wh + mh, h)
            strip = rows_to_tensor(reader.read(lo, hi), mean, std)  # (1, C, hi - lo, W)
            windows = [(0, (sy, sx)) for sx in starts[1]]
            stitch(
                model,
                strip,
                windows,
                opts,
                weight,
                image_size=(h, w),
                source_origin=(lo, 0),
                acc=acc,
                acc_origin=(done, 0),
                device=device,
                bar=bar,
            )
            del strip
            # rows [done, end) receive no later window: normalise, then label and write a few rows at a time
            band = acc[0, :, : end - done].div_(weight_sum(starts, opts.window, weight, [(done, end), (0, w)], cache))
            for r0 in range(done, end, _FINISH_ROWS):
                r1 = min(r0 + _FINISH_ROWS, end)
                row_labels, row_probs = _finish_rows(band[:, r0 - done : r1 - done], opts.activation, probs is not None)
                labels.write_rows(r0, row_labels.numpy())
                if row_probs is not None:
                    probs.write_rows(r0, row_probs.mul(255).round_().clamp_(0, 255).to(torch.uint8).numpy())
            _shift_up(acc, end - done)


def _shift_up(acc: torch.Tensor, n: int) -> None:
    """Move rows ``n:`` of ``acc`` (dim 2) to the top and zero the rest, in blocks that never overlap."""
    keep = acc.shape[2] - n
    for a in range(0, keep, n):
        b = min(a + n, keep)
        acc[:, :, a:b].copy_(acc[:, :, a + n : b + n])
    acc[:, :, max(keep, 0) :].zero_()
