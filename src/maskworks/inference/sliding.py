"""Sliding-window (tiled) inference over 2-D and 3-D images of any size.

The image is covered by windows of a fixed size placed on a regular grid with a given fractional overlap; the
last window of each axis is moved back to end exactly at the border, so every pixel is predicted. The model's
per-window logits (or probabilities, with ``activation=``) are weighted by an importance map and averaged pixel
by pixel; class labels are never averaged. Two blends are available: ``"constant"`` (plain mean) and
``"gaussian"`` (a Gaussian centred on the window with ``sigma = sigma_scale * window``, which down-weights the
window borders where a zero-padded network sees no context; Isensee et al. 2021, nnU-Net).

Window placement, the Gaussian map (including its floor at ``1e-3`` for tiny values) and the padding of images
smaller than the window (split evenly before and after) follow ``monai.inferers.sliding_window_inference``, so
both give the same result for the same options.

``margin > 0`` selects the overlap-tile strategy of the U-Net paper (Ronneberger et al. 2015): each window is fed
with ``margin`` extra pixels of context on every side, mirrored where it runs past the image border, and only
the central ``window`` of the prediction is kept. With a margin at least the receptive-field radius of the
network, tiled inference equals whole-image inference on the mirror-padded image. The model may return logits
for the whole input tile (the centre is cropped) or, for valid (unpadded) convolutions, only for the centre.

Memory: the accumulator is the output itself (``B x K x spatial``, float32) on ``output_device``; windows are
extracted one batch at a time, and the per-pixel weight sum used to normalise is computed in slabs of one
window, so no full-size count map and no padded copy of the image are made.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from maskworks.losses import split_outputs

__all__ = ["SlidingWindow", "importance_map", "plan_windows", "resolve_window", "sliding_window"]

BLENDS = ("gaussian", "constant")
ACTIVATIONS = (None, "softmax", "sigmoid")
PADDING_MODES = ("reflect", "replicate", "constant")
_MIN_WEIGHT = 1e-3  # floor of the importance map, as in monai.data.utils.compute_importance_map
_WINDOW_EXPECTED = "an int or one per axis (positive, or -1 for the whole axis)"

Model = Callable[[torch.Tensor], Any]  # returns logits, or a dict with "out"
Corner = tuple[int, ...]


@dataclass(frozen=True)
class WindowOptions:
    """Validated sliding-window options, one value per spatial axis where it applies (see :func:`sliding_window`)."""

    window: tuple[int, ...]
    overlap: tuple[float, ...]
    margin: tuple[int, ...]
    sigma_scale: tuple[float, ...]
    blend: str
    batch_size: int
    activation: str | None
    padding_mode: str
    cval: float
    channels_last: bool = True

    @property
    def tile(self) -> tuple[int, ...]:
        """The spatial size of the model's input: the window plus the margin on both sides."""
        return tuple(w + 2 * m for w, m in zip(self.window, self.margin))


def _per_axis(name: str, value: Any, ndim: int, kind: type, valid: Callable[[Any], bool], expected: str) -> tuple:
    """``value`` (one number or one per axis) as a tuple of ``ndim`` numbers, checked with ``valid``."""
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(
            f"{name} has {len(values)} values {tuple(values)!r} but the image has {ndim} spatial dimensions; "
            f"expected one number or {ndim}"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise TypeError(f"{name} must be {expected}, got {value!r}")
        if not valid(v):
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    return values


def resolve_window(window: int | Sequence[int], image_size: Sequence[int]) -> tuple[int, ...]:
    """The window size for an image, with MONAI's "whole axis" entries resolved.

    As ``roi_size`` of ``monai.inferers.sliding_window_inference`` (``monai.utils.fall_back_tuple``), a
    non-positive entry (conventionally ``-1``) stands for the image's size along that axis, and a single
    non-positive int for the whole image.

    Args:
        window: one int or one per spatial axis; ``-1`` (any value ``<= 0``) means the whole axis.
        image_size: the spatial size of the image, e.g. ``(H, W)``.

    Returns:
        One positive int per axis.
    """
    ndim = len(image_size)
    values = _per_axis("window", window, ndim, Integral, lambda v: True, _WINDOW_EXPECTED)
    return tuple(int(size) if v <= 0 else int(v) for v, size in zip(values, image_size))


def _window_placeholder(window: Any) -> Any:
    """``window`` with whole-axis entries (``<= 0``) replaced by 1, to check it before the image size is known."""

    def fill(v: Any) -> Any:
        return 1 if isinstance(v, Integral) and not isinstance(v, bool) and v <= 0 else v

    if isinstance(window, Sequence) and not isinstance(window, str):
        return tuple(fill(v) for v in window)
    return fill(window)


def check_options(
    ndim: int,
    window: int | Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    sigma_scale: float | Sequence[float] = 0.125,
    margin: int | Sequence[int] = 0,
    activation: str | None = None,
    padding_mode: str = "reflect",
    cval: float = 0.0,
    channels_last: bool = True,
) -> WindowOptions:
    """Validate the sliding-window options for an image with ``ndim`` spatial dimensions.

    ``window`` must be resolved to positive sizes here (see :func:`resolve_window` for MONAI's ``-1``).

    Args:
        ndim: number of spatial dimensions (2 or 3).
        window, overlap, blend, batch_size, sigma_scale, margin, activation, padding_mode, cval, channels_last:
            see :func:`sliding_window`.

    Returns:
        The options with every per-axis value expanded to a tuple of ``ndim`` entries.
    """
    window = _per_axis("window", window, ndim, Integral, lambda v: v >= 1, "a positive int or one per axis")
    overlap = _per_axis("overlap", overlap, ndim, Real, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
    margin = _per_axis("margin", margin, ndim, Integral, lambda v: v >= 0, "a non-negative int or one per axis")
    sigma_scale = _per_axis("sigma_scale", sigma_scale, ndim, Real, lambda v: v > 0, "a positive number")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {list(BLENDS)}, got {blend!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (windows per model call), got {batch_size!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {list(PADDING_MODES)}, got {padding_mode!r}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be True or False, got {channels_last!r}")
    return WindowOptions(
        window=tuple(int(v) for v in window),
        overlap=tuple(float(v) for v in overlap),
        margin=tuple(int(v) for v in margin),
        sigma_scale=tuple(float(v) for v in sigma_scale),
        blend=blend,
        batch_size=int(batch_size),
        activation=activation,
        padding_mode=padding_mode,
        cval=float(cval),
        channels_last=channels_last,
    )


# ----------------------------------------------------------------------------------------------- window planning


def axis_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis of length ``size``.

    The stride is ``int(window * (1 - overlap))`` (at least 1). Windows start at multiples of the stride until one
    reaches the end; that last one is moved back to end at the border. An axis shorter than the window gets one
    window centred on it (so its start is negative: the image is padded by ``(window - size) // 2`` before).

    Args:
        size: length of the axis.
        window: window length.
        overlap: fraction of the window shared by neighbouring windows, in [0, 1).

    Returns:
        The increasing start offsets, in image coordinates.
    """
    canvas = max(size, window)
    before = (canvas - size) // 2
    stride = window if window == canvas else max(int(window * (1 - overlap)), 1)
    last = -(-(canvas - window) // stride)  # index of the first window reaching the end
    return [min(k * stride, canvas - window) - before for k in range(last + 1)]


def plan_windows(
    image_size: Sequence[int], window: int | Sequence[int], overlap: float | Sequence[float] = 0.25
) -> list[Corner]:
    """The corners of the windows covering an image, in row-major order (the first axis varies slowest).

    Args:
        image_size: the spatial size, e.g. ``(H, W)`` or ``(D, H, W)``.
        window: the window size, one int or one per axis; ``-1`` (any value ``<= 0``) spans the whole axis.
        overlap: the overlap fraction, one or one per axis, in [0, 1).

    Returns:
        One tuple of start offsets per window. Offsets are negative along axes shorter than the window (the window
        is centred on the image there); see :func:`axis_starts`.
    """
    ndim = len(image_size)
    window = resolve_window(window, image_size)
    overlap = _per_axis("overlap", overlap, ndim, Real, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
    return list(itertools.product(*(axis_starts(s, w, o) for s, w, o in zip(image_size, window, overlap))))


# ------------------------------------------------------------------------------------------------ importance maps


def importance_map(
    window: Sequence[int],
    blend: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The per-pixel weight of a window's prediction in the blend.

    ``"gaussian"`` is the product over axes of ``exp(-x^2 / (2 sigma^2))`` with ``x`` the distance to the window
    centre and ``sigma = sigma_scale * window``; values below ``1e-3`` are raised to ``1e-3`` so that pixels only
    seen by window borders keep a positive weight. Computed in float32 exactly as
    ``monai.data.utils.compute_importance_map``. ``"constant"`` is all ones.

    Args:
        window: the window size, e.g. ``(H, W)``.
        blend: ``"gaussian"`` or ``"constant"``.
        sigma_scale: the Gaussian's standard deviation as a fraction of the window, one or one per axis.
        device: device of the map.
        dtype: dtype of the map.

    Returns:
        A tensor of shape ``window``.
    """
    window = tuple(window)
    sigma_scale = _per_axis("sigma_scale", sigma_scale, len(window), Real, lambda v: v > 0, "a positive number")
    if blend == "constant":
        weight = torch.ones(window, dtype=torch.float32, device=device)
    elif blend == "gaussian":
        weight = None
        for size, scale in zip(window, sigma_scale):
            x = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32, device=device)
            x = torch.exp(x**2 / (-2 * (size * scale) ** 2))
            weight = x if weight is None else weight.unsqueeze(-1) * x  # outer product, one axis at a time
    else:
        raise ValueError(f"blend must be one of {list(BLENDS)}, got {blend!r}")
    floor = max(weight.min().item(), _MIN_WEIGHT)
    return weight.clamp_(min=floor).to(dtype)


# ------------------------------------------------------------------------------------------------------- stitching


def _reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror positions into ``[0, size)`` without repeating the edge (``F.pad`` "reflect", any pad length)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index < size, index, period - index)


def extract_tile(
    source: torch.Tensor,
    origin: Sequence[int],
    image_size: Sequence[int],
    lo: Sequence[int],
    hi: Sequence[int],
    padding_mode: str = "reflect",
    cval: float = 0.0,
) -> torch.Tensor:
    """The region ``[lo, hi)`` of an image, padded where it runs past the image border.

    Only the pixels of the region are copied (views when it lies inside the image), so the image is never padded
    as a whole. ``source`` may hold only part of the image (a strip of rows): its first pixel is at ``origin``.

    Args:
        source: ``(B, C, *spatial)`` pixels of the image from ``origin`` on.
        origin: image coordinates of ``source``'s first pixel.
        image_size: the spatial size of the whole image (where the padding starts).
        lo: first pixel of the region, per axis (may be negative).
        hi: one past the last pixel (may exceed the image size).
        padding_mode: ``"reflect"`` (mirror without repeating the edge pixel, repeated for pads longer than the
            image), ``"replicate"`` or ``"constant"``.
        cval: the fill value for ``"constant"``.

    Returns:
        ``(B, C, *(hi - lo))``.
    """
    x = source
    pads: list[int] = []  # F.pad order: last axis first
    for axis, (a, b, size, o) in enumerate(zip(lo, hi, image_size, origin)):
        dim = axis + 2
        if a >= 0 and b <= size or padding_mode == "constant":
            ca, cb = max(a, 0), min(b, size)
            assert o <= ca < cb <= o + x.shape[dim], "tile outside the pixels held in source"
            x = x.narrow(dim, ca - o, cb - ca)
            pads = [ca - a, b - cb, *pads]
            continue
        index = torch.arange(a, b)
        index = _reflect_index(index, size) if padding_mode == "reflect" else index.clamp(0, size - 1)
        assert o <= int(index.min()) and int(index.max()) < o + x.shape[dim], "tile outside the pixels in source"
        x = x.index_select(dim, (index - o).to(x.device))
        pads = [0, 0, *pads]
    if any(pads):
        x = F.pad(x, pads, mode="constant", value=cval)
    return x


def _core_slices(
    corner: Corner, window: Sequence[int], image_size: Sequence[int], origin: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where the part of a window inside the image goes: slices into a buffer starting at ``origin``, and into the
    window."""
    dst, src = [], []
    for s, w, size, o in zip(corner, window, image_size, origin):
        a, b = max(s, 0), min(s + w, size)
        dst.append(slice(a - o, b - o))
        src.append(slice(a - s, b - s))
    return tuple(dst), tuple(src)


def predict_tiles(model: Model, tiles: torch.Tensor, opts: WindowOptions) -> torch.Tensor:
    """Run the model on a batch of tiles and keep the central ``window`` of each prediction.

    Args:
        model: any callable from ``(N, C, *tile)`` images to logits (a tensor or a dict with ``"out"``).
        tiles: ``(N, C, *tile)`` input tiles (window plus margin).
        opts: the options (window, margin, activation).

    Returns:
        ``(N, K, *window)`` logits, or probabilities when ``opts.activation`` is set.
    """
    out, _ = split_outputs(model(tiles))
    spatial = tuple(out.shape[2:])
    if out.ndim != tiles.ndim or out.shape[0] != tiles.shape[0] or spatial not in (opts.tile, opts.window):
        valid = f" or (N, K, *{opts.window}) (the centre only, valid convolutions)" if any(opts.margin) else ""
        raise ValueError(
            f"model returned shape {tuple(out.shape)} for input tiles of shape {tuple(tiles.shape)}; expected "
            f"(N, K, *{opts.tile}) logits at input resolution{valid}"
        )
    if spatial != opts.window:
        out = out[(slice(None), slice(None), *(slice(m, m + w) for m, w in zip(opts.margin, opts.window)))]
    if opts.activation == "softmax":
        out = out.softmax(dim=1)
    elif opts.activation == "sigmoid":
        out = out.sigmoid()
    return out


def batch_tiles(parts: Sequence[torch.Tensor], device: torch.device, channels_last: bool) -> torch.Tensor:
    """Stack ``(1, C, *tile)`` tiles into one ``(N, C, *tile)`` batch on ``device``, copied once.

    With ``channels_last`` the batch is laid out channels-last (``channels_last_3d`` for volumes), which oneDNN
    and cuDNN convolutions run several times faster on, with smaller temporaries; values are unchanged.
    """
    if not channels_last or parts[0].ndim not in (4, 5):
        return torch.cat(list(parts)).to(device)
    fmt = torch.channels_last if parts[0].ndim == 4 else torch.channels_last_3d
    batch = torch.empty((len(parts), *parts[0].shape[1:]), dtype=parts[0].dtype, device=device, memory_format=fmt)
    for dst, part in zip(batch, parts):
        dst.copy_(part[0])
    return batch


def stitch(
    model: Model,
    source: torch.Tensor,
    windows: Sequence[tuple[int, Corner]],
    opts: WindowOptions,
    weight: torch.Tensor,
    *,
    image_size: Sequence[int],
    source_origin: Sequence[int] | None = None,
    acc: torch.Tensor | None = None,
    acc_origin: Sequence[int] | None = None,
    device: torch.device | None = None,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Predict windows in batches and add each prediction, times the importance map, into an accumulator.

    Args:
        model: the predictor (see :func:`predict_tiles`).
        source: ``(B, C, *spatial)`` image pixels from ``source_origin`` on (the whole image or a strip).
        windows: ``(batch index, corner)`` pairs; the corner is in image coordinates.
        opts: validated options.
        weight: the importance map (shape ``opts.window``), on the accumulator's device and dtype.
        image_size: the spatial size of the whole image.
        source_origin: image coordinates of ``source``'s first pixel (default: zeros).
        acc: ``(B, K, *spatial)`` accumulator, or None to allocate one of the image size (zeros, on
            ``weight``'s device, float32 or wider) once the number of classes is known.
        acc_origin: image coordinates of ``acc``'s first pixel (default: zeros).
        device: device the model runs on (default: ``source``'s).
        bar: progress bar, advanced by one per batch.

    Returns:
        The accumulator.
    """
    zeros = (0,) * len(image_size)
    source_origin = zeros if source_origin is None else tuple(source_origin)
    acc_origin = zeros if acc_origin is None else tuple(acc_origin)
    device = source.device if device is None else device
    for i in range(0, len(windows), opts.batch_size):
        chunk = windows[i : i + opts.batch_size]
        parts = [
            extract_tile(
                source[b : b + 1],
                source_origin,
                image_size,
                lo=[s - m for s, m in zip(corner, opts.margin)],
                hi=[s + w + m for s, w, m in zip(corner, opts.window, opts.margin)],
                padding_mode=opts.padding_mode,
                cval=opts.cval,
            )
            for b, corner in chunk
        ]
        pred = predict_tiles(model, batch_tiles(parts, device, opts.channels_last), opts).to(weight.device)
        if acc is None:
            dtype = torch.promote_types(pred.dtype, weight.dtype)
            acc = torch.zeros((source.shape[0], pred.shape[1], *image_size), dtype=dtype, device=weight.device)
        elif pred.shape[1] != acc.shape[1]:
            raise ValueError(f"model returned {pred.shape[1]} channels; expected {acc.shape[1]} (num_classes)")
        for p, (b, corner) in zip(pred, chunk):
            dst, src = _core_slices(corner, opts.window, image_size, acc_origin)
            acc[b][(slice(None), *dst)].addcmul_(p[(slice(None), *src)], weight[src])
        if bar is not None:
            bar.update(1)
    assert acc is not None, "no windows"
    return acc


def weight_sum(
    starts: Sequence[Sequence[int]],
    window: Sequence[int],
    weight: torch.Tensor,
    region: Sequence[tuple[int, int]],
    cache: dict | None = None,
) -> torch.Tensor:
    """The total importance each pixel of ``region`` receives from the window grid (the blend's normaliser).

    Args:
        starts: the window starts along each axis (the grid is their product), from :func:`axis_starts`.
        window: the window size.
        weight: the importance map.
        region: ``(lo, hi)`` per axis, inside the image.
        cache: a dict holding the last result; a region placed the same way relative to the windows (the bands
            between consecutive window rows, away from the border) reuses it instead of summing again.

    Returns:
        A tensor of the region's shape, on ``weight``'s device and dtype (do not modify it when cached);
        positive everywhere.
    """
    touching = [[s for s in axis if s < b and s + w > a] for axis, w, (a, b) in zip(starts, window, region)]
    key = tuple((b - a, *(s - a for s in axis)) for axis, (a, b) in zip(touching, region))
    if cache is not None and cache.get("key") == key:
        return cache["value"]
    total = torch.zeros([hi - lo for lo, hi in region], dtype=weight.dtype, device=weight.device)
    for corner in itertools.product(*touching):
        dst, src = [], []
        for s, w, (a, b) in zip(corner, window, region):
            c0, c1 = max(s, a), min(s + w, b)
            dst.append(slice(c0 - a, c1 - a))
            src.append(slice(c0 - s, c1 - s))
        total[tuple(dst)] += weight[tuple(src)]
    if cache is not None:
        cache.update(key=key, value=total)
    return total


def bands(starts: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Split an axis at the window starts: ``[(start_i, start_i+1), ..., (start_last, size)]``, clipped to the image.

    All windows touching a band start at or before it, so once a row of windows is done the band above the next
    row's start is final; interior bands lie the same way relative to the windows (see :func:`weight_sum`).
    """
    edges = [max(s, 0) for s in starts] + [size]
    return list(zip(edges[:-1], edges[1:]))


def normalise(acc: torch.Tensor, starts: Sequence[Sequence[int]], window: Sequence[int], weight: torch.Tensor) -> None:
    """Divide a whole-image accumulator ``(B, K, *spatial)`` by the weight sum in place, one band along the first
    axis at a time (see :func:`bands`)."""
    cache: dict = {}
    rest = [(0, s) for s in acc.shape[3:]]
    for lo, hi in bands(starts[0], acc.shape[2]):
        acc[:, :, lo:hi].div_(weight_sum(starts, window, weight, [(lo, hi), *rest], cache))


# ------------------------------------------------------------------------------------------------------ public API


def _check_image_dims(image: torch.Tensor) -> None:
    """Raise a ValueError naming the supported layouts unless ``image`` is ``(B, C, H, W)`` or ``(B, C, D, H, W)``."""
    if image.ndim in (4, 5):
        return
    msg = (
        "sliding_window supports 2-D images (B, C, H, W) and 3-D volumes (B, C, D, H, W); got a "
        f"{image.ndim}-dimensional tensor of shape {tuple(image.shape)}"
    )
    if image.ndim == 3:
        msg += " (1-D signals (B, C, L) are not supported; one (C, H, W) image needs its batch axis: image[None])"
    elif image.ndim == 2:
        msg += " (one (H, W) image needs batch and channel axes: image[None, None])"
    elif image.ndim > 5:
        msg += f", i.e. {image.ndim - 2} spatial dimensions, which are not supported"
    raise ValueError(msg)


@contextmanager
def eval_mode(model: Model) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode for the duration (restoring training mode afterwards)."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def model_device(model: Model, default: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer, else ``default`` (plain callables)."""
    if isinstance(model, nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):
            return t.device
    return default


def sliding_window(
    model: Model,
    image: torch.Tensor,
    window: int | Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    *,
    sigma_scale: float | Sequence[float] = 0.125,
    margin: int | Sequence[int] = 0,
    activation: str | None = None,
    padding_mode: str = "reflect",
    cval: float = 0.0,
    channels_last: bool = True,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Predict an image of any size window by window and blend the overlapping predictions.

    Runs under ``torch.no_grad()``; an ``nn.Module`` in training mode is put in eval mode for the call and restored
    afterwards.

    Args:
        model: any callable from ``(N, C, *window)`` images to ``(N, K, *window)`` logits (or a dict with
            ``"out"``): a model, a TTA wrapper (test-time augmentation inside each window), a function.
        image: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` float image, normalised as the model expects.
        window: the window size, one int or one per spatial axis; larger than the image is fine (the image is
            padded, see ``padding_mode``). ``-1`` (any value ``<= 0``, as MONAI's ``roi_size``) spans the whole
            axis, e.g. ``(256, -1)`` for full-width strips; a single ``-1`` is the whole image (one window).
        overlap: the fraction of a window shared with its neighbour, in [0, 1), one or one per axis.
        blend: ``"gaussian"`` (centre-weighted) or ``"constant"`` (plain mean).
        batch_size: windows per model call.
        sigma_scale: Gaussian standard deviation as a fraction of the window (0.125 as in MONAI and nnU-Net).
        margin: overlap-tile mode when > 0: each window gets this much context on every side (mirrored at the image
            border when ``padding_mode="reflect"``), and only the central ``window`` of the prediction is kept.
        activation: ``None`` (blend logits), ``"softmax"`` or ``"sigmoid"`` (blend probabilities), applied to each
            window before blending.
        padding_mode: how pixels outside the image are made, for windows larger than the image and for the
            margin: ``"reflect"``, ``"replicate"`` or ``"constant"`` (``cval``; MONAI's default).
        cval: fill value for ``padding_mode="constant"``.
        channels_last: feed the model channels-last batches (``channels_last_3d`` for volumes): the same values,
            and on CPU (oneDNN) and GPU (cuDNN) convolutions run several times faster with smaller temporaries.
            Set False for a model that needs contiguous NCHW input (e.g. one that calls ``.view`` on it).
        device: device the model runs on (default: the model's parameters' device, else the image's).
        output_device: device of the blended output (default: the image's); e.g. ``"cpu"`` with a GPU model keeps
            only one batch of windows on the GPU.
        progress: show a tqdm progress bar over the batches.

    Returns:
        ``(B, K, *spatial)`` blended logits (probabilities with ``activation``), float32 (float64 for float64
        models), on ``output_device``.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor (B, C, H, W) or (B, C, D, H, W), got {type(image).__name__}")
    _check_image_dims(image)
    if not image.is_floating_point():
        raise TypeError(f"image must be a normalised float tensor, got dtype {image.dtype}")
    opts = check_options(
        image.ndim - 2,
        resolve_window(window, image.shape[2:]),
        overlap,
        blend,
        batch_size,
        sigma_scale,
        margin,
        activation,
        padding_mode,
        cval,
        channels_last,
    )
    size = tuple(image.shape[2:])
    device = model_device(model, image.device) if device is None else torch.device(device)
    output_device = image.device if output_device is None else torch.device(output_device)
    starts = [axis_starts(s, w, o) for s, w, o in zip(size, opts.window, opts.overlap)]
    corners = list(itertools.product(*starts))
    windows = [(b, c) for b in range(image.shape[0]) for c in corners]
    weight = importance_map(opts.window, opts.blend, opts.sigma_scale, output_device)
    bar = tqdm(total=math.ceil(len(windows) / opts.batch_size), desc="sliding window", disable=not progress)
    with torch.no_grad(), eval_mode(model), bar:
        acc = stitch(model, image, windows, opts, weight, image_size=size, device=device, bar=bar)
        normalise(acc, starts, opts.window, weight.to(acc.dtype))
    return acc


class SlidingWindow:
    """:func:`sliding_window` with its options stored: ``SlidingWindow(window=256)(model, image)``.

    Args:
        window, overlap, blend, batch_size, sigma_scale, margin, activation, padding_mode, cval, channels_last,
            device, output_device, progress: see :func:`sliding_window`; checked here, and again against the image's
            number of spatial dimensions when called.
    """

    def __init__(
        self,
        window: int | Sequence[int],
        overlap: float | Sequence[float] = 0.25,
        blend: str = "gaussian",
        batch_size: int = 4,
        *,
        sigma_scale: float | Sequence[float] = 0.125,
        margin: int | Sequence[int] = 0,
        activation: str | None = None,
        padding_mode: str = "reflect",
        cval: float = 0.0,
        channels_last: bool = True,
        device: torch.device | str | None = None,
        output_device: torch.device | str | None = None,
        progress: bool = False,
    ):
        per_axis = (window, overlap, sigma_scale, margin)
        ndim = next((len(v) for v in per_axis if isinstance(v, Sequence) and not isinstance(v, str)), 2)
        resolve_window(window, (1,) * ndim)  # type and length of the window, -1 entries allowed
        check_options(
            ndim,
            _window_placeholder(window),  # -1 entries are resolved against each image
            overlap,
            blend,
            batch_size,
            sigma_scale,
            margin,
            activation,
            padding_mode,
            cval,
            channels_last,
        )
        self.window = window
        self.overlap = overlap
        self.blend = blend
        self.batch_size = batch_size
        self.sigma_scale = sigma_scale
        self.margin = margin
        self.activation = activation
        self.padding_mode = padding_mode
        self.cval = cval
        self.channels_last = channels_last
        self.device = device
        self.output_device = output_device
        self.progress = progress

    def __call__(self, model: Model, image: torch.Tensor) -> torch.Tensor:
        """Blended ``(B, K, *spatial)`` prediction of ``model`` on ``image`` (see :func:`sliding_window`)."""
        return sliding_window(
            model,
            image,
            self.window,
            self.overlap,
            self.blend,
            self.batch_size,
            sigma_scale=self.sigma_scale,
            margin=self.margin,
            activation=self.activation,
            padding_mode=self.padding_mode,
            cval=self.cval,
            channels_last=self.channels_last,
            device=self.device,
            output_device=self.output_device,
            progress=self.progress,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(window={self.window!r}, overlap={self.overlap!r}, blend={self.blend!r}, "
            f"batch_size={self.batch_size}, margin={self.margin!r}, activation={self.activation!r})"
        )
