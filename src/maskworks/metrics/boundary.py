"""Streaming boundary-quality metrics for semantic segmentation: boundary F1 and Boundary IoU.

Both metrics are computed **per class** on label maps: the boundary of class ``c`` is taken from the binary masks
``pred == c`` and ``target == c``. Running a binary boundary operator on a multi-class label map directly (so
"non-zero" is one mask) mixes all classes into one foreground and can give scores outside ``[0, 1]``; every
per-class score here lies in ``[0, 1]``.

Everything runs in torch on the device of the inputs (CPU or CUDA), works on whole batches at once (all classes
and both maps in the same passes) and is memory bounded (large batches are processed about a million pixels at a
time). Labels of any integer dtype (``uint8``, ``int16``, ...) are range-checked after widening to int32 / int64,
never in their own dtype, and flat indices and histogram bins are formed in int64 (int32 only where the largest
value provably fits), so narrow dtypes cannot overflow whatever the number of classes.

**Boundary F1** (:class:`BoundaryF1`; Csurka, Larlus and Perronnin, "What is a good evaluation measure for
semantic segmentation?", BMVC 2013):

* The boundary of a binary mask ``M`` is the set of pixels of ``M`` with at least one 4-neighbour outside ``M``.
  Only neighbours inside the image count, so the image border is **not** a boundary. Pixels whose target is
  ``ignore_index`` are neither part of any mask nor a neighbour that makes a boundary: an object edge that runs
  along an ignored region is not a boundary, and ignored pixels can never be matched. Predicted labels under
  ignored pixels therefore have no effect at all.
* An ``ignore_index`` inside ``0..K-1`` (e.g. 0 for a background class) excludes that class, as in
  :class:`~maskworks.metrics.confusion.ConfusionMatrix`: its per-class values (both metrics) are ``NaN`` and left
  out of ``mbf1`` / ``mboundary_iou``, while counted pixels predicted as it are simply not part of their true
  class's predicted mask.
* Precision = fraction of predicted boundary pixels lying within Euclidean distance ``theta`` (inclusive, i.e. in a
  disk of radius ``theta``) of a target boundary pixel of the same class; recall = fraction of target boundary
  pixels within ``theta`` of a predicted one; F1 = 2PR / (P + R). ``theta`` is ``tolerance`` pixels when given,
  else ``tolerance_frac`` times the image diagonal ``sqrt(H**2 + W**2)`` (Csurka et al. use 0.75 %; the DAVIS
  benchmark uses 0.8 %). ``tolerance=0`` requires boundary pixels to coincide exactly. Matching is exact (no
  distance-transform approximation): boundary pixels are keyed by image, class, row and column and sorted, and
  each of the ``2 floor(theta) + 1`` rows of the disk is one binary search per still-unmatched pixel.
* Per image and class (presence is judged on non-ignored pixels):

  - class absent from both prediction and target: the class is **skipped** for that image;
  - class present in only one of them: F1 = 0;
  - present in both and neither has a boundary pixel (the class covers every counted pixel of a connected
    region in both): F1 = 1; only one of the two has boundary pixels: F1 = 0;
  - otherwise 2PR / (P + R), or 0 when P = R = 0.

* ``bf1[c]`` is the mean of the per-image F1 over the images where class ``c`` was evaluated (Csurka et al.'s
  per-image averaging), ``NaN`` when it never was; ``mbf1`` is the nan-mean over classes. ``precision``,
  ``recall`` and ``bf1_pooled`` instead pool the boundary-pixel counts of the whole dataset per class (``NaN``
  precision when no predicted boundary pixel of the class was seen, ``NaN`` recall when no target boundary pixel
  was seen, ``bf1_pooled`` ``NaN`` when neither was and 0 when only one of them was).

**Boundary IoU** (:class:`BoundaryIoU`; Cheng, Girshick, Dollar, Berg and Kirillov, "Boundary IoU: Improving
Object-Centric Image Segmentation Evaluation", CVPR 2021), following ``mask_to_boundary`` of the reference
implementation (bowenc0221/boundary-iou-api, ``boundary_iou_api/utils/boundary_utils.py``) exactly:

* ``d = max(1, round(dilation_ratio * sqrt(H**2 + W**2)))`` (Python ``round``, i.e. halves to even, like the
  reference). The mask is zero-padded by one pixel, eroded ``d`` times with a 3x3 square kernel, cropped back,
  and the boundary band is ``mask - eroded``: the pixels of the mask within Chebyshev distance ``d`` of a pixel
  outside it. Because of the zero padding the image border **does** count as outside here, so a mask touching the
  border has a band along it (unlike boundary F1 above). ``d`` erosions with a 3x3 square equal one erosion with
  a ``(2d+1) x (2d+1)`` square, which is what is computed (as sliding-window min/max of the label map, so all
  classes are done in one pass).
* Pixels whose target is ``ignore_index`` belong to no class mask, in the prediction as well as in the target
  (the predicted labels there are discarded), so they act like "outside" for the erosion of both, and they are
  left out of every count. A prediction equal to the target on all counted pixels therefore scores 1.
* ``boundary_iou[c] = |B(G_c) & B(P_c)| / |B(G_c) | B(P_c)|`` with the intersection and union summed as exact
  int64 counts over the dataset (not averaged per image). A class whose bands never had a pixel (union 0) is
  ``NaN`` and left out of ``mboundary_iou`` (nan-mean), like absent classes in
  :class:`~maskworks.metrics.confusion.ConfusionMatrix`; a class with a band only in the prediction or only in
  the target scores 0 and counts in the mean.

``compute`` returns plain Python floats / lists with ``NaN`` for undefined values (see
:class:`~maskworks.metrics.confusion.ConfusionMatrix` about ``NaN`` in JSON) and never raises on empty or fully
ignored inputs.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from maskworks.metrics.confusion import (
    _as_tensor,
    _list_values,
    _nanmean,
    _safe_ratio,
    check_common_args,
    labels_from_scores,
)

__all__ = ["BoundaryF1", "BoundaryIoU"]

_CHUNK_PIXELS = 1 << 20  # pixels processed at once (bounds memory; larger chunks gain nothing on CPU caches)
_EPS = 1e-9  # slack for "distance <= theta" with a float theta
_NARROW_INT = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32)


# ---------------------------------------------------------------------------------------------------- helpers
def _check_real(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    """``value`` as a finite float >= 0, else ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) or value < 0:
        expected = "a finite number >= 0" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _labels_from_scores(scores: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels from float scores ``(B, K, H, W)`` against ``(B, H, W)`` or ``(K, H, W)`` against ``(H, W)``."""
    if scores.ndim not in (3, 4):
        raise ValueError(
            f"float pred must be scores (B, K, H, W) matching target (B, H, W) or (K, H, W) matching (H, W); got "
            f"pred {tuple(scores.shape)} vs target {tuple(target.shape)}"
        )
    return labels_from_scores(scores, target, num_classes)


def _inner_boundary(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pixels with a valid 4-neighbour of another label (``(..., H, W)``; the image border is not a boundary).

    ``valid`` must broadcast against ``labels``.

    A pixel ``p`` of class ``c = labels[p]`` returned here is exactly a boundary pixel of the binary mask
    ``(labels == c) & valid``: ``p`` is valid and has a valid neighbour outside that mask.
    """
    out = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    dh = (labels[..., :, 1:] != labels[..., :, :-1]) & (valid[..., :, 1:] & valid[..., :, :-1])
    out[..., :, 1:] |= dh
    out[..., :, :-1] |= dh
    dv = (labels[..., 1:, :] != labels[..., :-1, :]) & (valid[..., 1:, :] & valid[..., :-1, :])
    out[..., 1:, :] |= dv
    out[..., :-1, :] |= dv
    return out


def _sliding(x: torch.Tensor, k: int, dim: int, op) -> torch.Tensor:
    """``op`` (``torch.maximum`` / ``torch.minimum``) over windows of ``k`` along ``dim`` (valid positions only).

    Uses window doubling, so the cost is ``O(log k)`` passes instead of ``k``.
    """
    n_out = x.size(dim) - k + 1
    m, s = x, 1
    while 2 * s <= k:
        n = m.size(dim) - s
        m = op(m.narrow(dim, 0, n), m.narrow(dim, s, n))  # m[i] = op over x[i : i + 2s]
        s *= 2
    if s < k:  # s < k < 2s: two overlapping windows of size s cover [i, i + k)
        return op(m.narrow(dim, 0, n_out), m.narrow(dim, k - s, n_out))
    return m.narrow(dim, 0, n_out)


def _boundary_band(labels: torch.Tensor, d: int) -> torch.Tensor:
    """Boundary band of every class at once, as in the reference ``mask_to_boundary`` (``(B, H, W)`` bool).

    Pixel ``p`` of class ``c = labels[p]`` is in the band of ``c`` iff the eroded mask is 0 there, i.e. iff the
    ``(2d+1) x (2d+1)`` square around ``p`` leaves the image or holds a label other than ``c`` (zero padding).
    ``labels`` must be >= 0 (the padding value -1 marks "outside the image").
    """
    b, h, w = labels.shape
    padded = torch.full((b, h + 2 * d, w + 2 * d), -1, dtype=labels.dtype, device=labels.device)
    padded[:, d : d + h, d : d + w] = labels
    k = 2 * d + 1
    hi = _sliding(_sliding(padded, k, 2, torch.maximum), k, 1, torch.maximum)
    lo = _sliding(_sliding(padded, k, 2, torch.minimum), k, 1, torch.minimum)
    return (hi != labels) | (lo != labels)


def _small_int_dtype(max_value: int) -> torch.dtype:
    """Narrowest signed dtype holding ``-1 .. max_value`` (cheaper window passes / comparisons)."""
    if max_value < 2**15 - 1:
        return torch.int16
    if max_value < 2**31 - 1:
        return torch.int32
    return torch.int64


def _boundary_keys(labels: torch.Tensor, valid: torch.Tensor, num_classes: int, pad: int) -> torch.Tensor:
    """Sorted keys of the boundary pixels of every class of ``(B, H, W)`` label maps (``valid``: ``(b, H, W)``).

    ``B`` is a multiple of ``b``: stacked groups of ``b`` maps share the same ``valid`` mask.

    A boundary pixel ``(b, y, x)`` of class ``c = labels[b, y, x]`` gets the key
    ``(b * K + c) * H' * W' + (y + pad) * W' + (x + pad)`` with ``H' = H + 2 pad``, ``W' = W + 2 pad``: pixels of one
    image and class form one block, and the ``pad`` empty rows / columns around each block keep disk searches of
    radius <= ``pad`` from reaching into a neighbouring row or block (see :func:`_matched`).
    """
    b, h, w = labels.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    bnd = _inner_boundary(labels.view(-1, valid.shape[0], h, w), valid)  # ``valid`` repeats over leading maps
    lin = bnd.reshape(-1).nonzero().squeeze(1)
    cls = labels.reshape(-1)[lin].to(torch.int64)
    img = torch.div(lin, h * w, rounding_mode="floor")
    rem = lin - img * (h * w)
    y = torch.div(rem, w, rounding_mode="floor")
    x = rem - y * w
    keys = (img * num_classes + cls) * (hp * wp) + (y + pad) * wp + (x + pad)
    return torch.sort(keys).values


def _matched(queries: torch.Tensor, ref_keys: torch.Tensor, row_len: int, theta: float) -> torch.Tensor:
    """Which query pixels have a reference pixel of the same image and class within Euclidean distance ``theta``.

    Both key tensors are sorted keys from :func:`_boundary_keys` (padded by at least ``floor(theta)``), so a pixel
    ``dy`` rows below is ``dy * row_len`` keys further and a run of columns is a run of keys. For each row offset
    ``dy`` the disk covers the columns ``|dx| <= floor(sqrt(theta^2 - dy^2))`` of row ``y + dy``, so one
    ``searchsorted`` per row offset decides whether any reference pixel lies in that run. Row offsets are visited in
    order of increasing ``|dy|`` and matched queries are dropped along the way, so the work shrinks quickly when
    most boundary pixels match.
    """
    n = queries.numel()
    if n == 0 or ref_keys.numel() == 0:
        return torch.zeros(n, dtype=torch.bool, device=queries.device)
    sentinel = torch.full((1,), torch.iinfo(ref_keys.dtype).max, dtype=ref_keys.dtype, device=ref_keys.device)
    ref = torch.cat([ref_keys, sentinel])  # searchsorted may return len(ref_keys): it then finds the sentinel
    r2 = theta * theta
    r = math.floor(theta + _EPS)
    dys = [0] + [s * i for i in range(1, r + 1) for s in (-1, 1)]
    q = queries
    hit_all = None
    idx = None  # positions of the remaining queries in ``queries`` (None: all of them)
    got = None  # hits of the remaining queries since the last compaction
    for j, dy in enumerate(dys):
        half = math.floor(math.sqrt(max(r2 - dy * dy, 0.0)) + _EPS)
        start = q + (dy * row_len - half)
        found = ref[torch.searchsorted(ref, start)]  # first reference key >= start of the run
        hit = (found - start) <= 2 * half  # ... lies inside the run
        got = hit if got is None else got.logical_or_(hit)
        if j % 2 == 1 and j != len(dys) - 1:
            continue  # compact after dy = 0 and after each pair -dy, +dy
        if hit_all is None:
            hit_all = got
        else:
            hit_all[idx[got]] = True
        if j == len(dys) - 1:
            break
        keep = (~got).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        idx = keep if idx is None else idx[keep]
        q = q[keep]
        got = None
    return hit_all


# ---------------------------------------------------------------------------------------------------- base class
class _BoundaryMetric(ABC):
    """Argument checks, input preparation, chunking and device handling shared by the boundary metrics."""

    _state_names: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None,
        class_names: Sequence[str] | None,
        device: str | torch.device | None,
    ) -> None:
        class_names = check_common_args(num_classes, ignore_index, class_names)
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.class_names = class_names
        self._fixed_device = device is not None
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_images = 0
        self._init_state()

    @abstractmethod
    def _init_state(self) -> None:
        """Create the running totals (zeros) of the subclass."""

    @property
    def device(self) -> torch.device:
        return self._device

    def reset(self) -> None:
        """Zero all accumulated statistics (keeps the device)."""
        for name in self._state_names:
            getattr(self, name).zero_()
        self.num_images = 0

    def _device_for(self, target: torch.Tensor) -> torch.device:
        """Device to compute on: the inputs'; state created with ``device=None`` moves there with its values."""
        if not self._fixed_device and self._device != target.device:
            for name in self._state_names:
                setattr(self, name, getattr(self, name).to(target.device))
            self._device = target.device
        return target.device

    def _prepare(self, pred: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``(B, H, W)`` pred labels and target on the compute device (original integer dtypes)."""
        pred = _as_tensor(pred, "pred")
        target = _as_tensor(target, "target")
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")
        if pred.is_complex():
            raise TypeError(f"pred must be integer labels or float scores, got dtype {pred.dtype}")
        if target.ndim not in (2, 3):
            raise ValueError(f"target must be a label map (H, W) or a batch (B, H, W), got shape {tuple(target.shape)}")
        if pred.is_floating_point():
            pred = _labels_from_scores(pred, target, self.num_classes)
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
        device = self._device_for(target)
        pred, target = pred.to(device), target.to(device)
        if target.ndim == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        return pred, target

    def _chunks(self, pred: torch.Tensor, target: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Checked ``(labels, valid)`` for groups of whole images of at most ~``_CHUNK_PIXELS`` pixels each.

        ``labels`` is ``(2, b, H, W)`` (prediction, target) in a narrow signed dtype, with ``num_classes`` in place
        of every ignored pixel in both maps (so predicted labels under ignored pixels are never used); stacking
        the two maps lets every later step process both in one pass. ``valid`` is ``(b, H, W)``.

        Raises:
            ValueError: on target values outside ``0..K-1`` that are not ``ignore_index``, or predicted labels
                outside ``0..K-1`` at counted pixels.
        """
        b, h, w = target.shape
        step = max(1, _CHUNK_PIXELS // max(1, h * w))
        k = self.num_classes
        ignore = self.ignore_index
        # values are checked in int32 when that holds every input value, else int64 (never in the input dtype)
        narrow = all(x.dtype in _NARROW_INT for x in (pred, target)) and k < 2**31 - 1
        work = torch.int32 if narrow and (ignore is None or -(2**31) <= ignore < 2**31) else torch.int64
        small = _small_int_dtype(k)
        if h * w == 0:
            return
        for s in range(0, b, step):
            t = target[s : s + step]
            valid = t != ignore if ignore is not None else torch.ones_like(t, dtype=torch.bool)
            both = torch.stack([pred[s : s + step].to(work), t.to(work)])
            both = torch.where(valid, both, 0)
            lo, hi = torch.aminmax(both.reshape(2, -1), dim=1)
            (p_lo, t_lo), (p_hi, t_hi) = torch.stack([lo, hi]).tolist()  # one host sync
            if t_lo < 0 or t_hi >= k:
                bad = valid & ((both[1] < 0) | (both[1] >= k))
                raise ValueError(
                    f"target holds values outside 0..{k - 1} that are not ignore_index={ignore}: "
                    f"{_list_values(both[1][bad])}"
                )
            if p_lo < 0 or p_hi >= k:
                bad = (both[0] < 0) | (both[0] >= k)
                raise ValueError(f"pred holds labels outside 0..{k - 1}: {_list_values(both[0][bad])}")
            yield torch.where(valid, both.to(small), k), valid

    def _exclude_ignored_class(self, *per_class: torch.Tensor) -> None:
        """Set the entries of an ``ignore_index`` inside ``0..K-1`` to ``NaN`` in place (left out of the means)."""
        c = self.ignore_index
        if c is not None and 0 <= c < self.num_classes:
            for values in per_class:
                values[c] = math.nan

    def _base_output(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_images": int(self.num_images)}
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out


# ---------------------------------------------------------------------------------------------------- boundary F1
class BoundaryF1(_BoundaryMetric):
    """Streaming per-class boundary F1 (BF score, Csurka et al. 2013); see the module docstring for definitions.

    Args:
        num_classes: number of classes ``K`` (>= 1).
        tolerance: match distance ``theta`` in pixels (Euclidean, inclusive). ``None`` (default) uses
            ``tolerance_frac`` of the image diagonal instead.
        tolerance_frac: ``theta`` as a fraction of the image diagonal when ``tolerance`` is ``None``; the default
            0.0075 is Csurka et al.'s 0.75 % (4.5 px on a 360 x 480 image).
        ignore_index: target value whose pixels are ignored (``None`` counts every pixel).
        class_names: optional ``K`` names, returned by :meth:`compute` as ``class_names``.
        device: where the statistics live. ``None`` (default) follows the inputs (moved on the first update).

    Example:
        >>> target = torch.zeros(8, 8, dtype=torch.long)
        >>> target[2:5, 2:5] = 1
        >>> pred = torch.roll(target, 1, dims=1)  # shifted one pixel to the right
        >>> exact, tolerant = BoundaryF1(2, tolerance=0), BoundaryF1(2, tolerance=1)
        >>> exact.update(pred, target)
        >>> tolerant.update(pred, target)
        >>> [round(v, 4) for v in exact.compute()["bf1"]], tolerant.compute()["mbf1"]
        ([0.3333, 0.5], 1.0)
    """

    _state_names = (
        "f1_sum",
        "f1_count",
        "pred_boundary",
        "pred_matched",
        "target_boundary",
        "target_matched",
    )

    def __init__(
        self,
        num_classes: int,
        tolerance: float | None = None,
        tolerance_frac: float = 0.0075,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.tolerance = _check_real(tolerance, "tolerance", allow_none=True)
        self.tolerance_frac = _check_real(tolerance_frac, "tolerance_frac")
        super().__init__(num_classes, ignore_index, class_names, device)

    def _init_state(self) -> None:
        k, dev = self.num_classes, self._device
        self.f1_sum = torch.zeros(k, dtype=torch.float64, device=dev)  # sum of per-image F1
        self.f1_count = torch.zeros(k, dtype=torch.int64, device=dev)  # images where the class was evaluated
        self.pred_boundary = torch.zeros(k, dtype=torch.int64, device=dev)  # predicted boundary pixels
        self.pred_matched = torch.zeros(k, dtype=torch.int64, device=dev)  # ... within theta of a target one
        self.target_boundary = torch.zeros(k, dtype=torch.int64, device=dev)
        self.target_matched = torch.zeros(k, dtype=torch.int64, device=dev)

    def __repr__(self) -> str:
        tol = f"tolerance={self.tolerance}" if self.tolerance is not None else f"tolerance_frac={self.tolerance_frac}"
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, {tol}, ignore_index={self.ignore_index}, "
            f"num_images={self.num_images}, device={self._device})"
        )

    def theta(self, height: int, width: int) -> float:
        """Match distance in pixels used for ``height x width`` images."""
        if self.tolerance is not None:
            return self.tolerance
        return self.tolerance_frac * math.sqrt(height * height + width * width)

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch of images.

        Args:
            pred: predicted labels of any integer (or bool) dtype with the shape of ``target``; or float scores
                ``(B, K, H, W)`` (``(K, H, W)`` for a single ``(H, W)`` target), reduced with ``argmax``.
            target: ``(B, H, W)`` batch or one ``(H, W)`` map of labels ``0..K-1`` or ``ignore_index``.

        Raises:
            ValueError: on mismatched shapes, a target that is not 2-D or 3-D, a float ``pred`` whose class
                dimension is not ``K``, or labels outside ``0..K-1`` (other than ``ignore_index`` in the target).
            TypeError: on a floating-point ``target`` or an unsupported input type.

        The statistics are only changed once the whole batch has been checked.
        """
        pred, target = self._prepare(pred, target)
        b, h, w = target.shape
        # no two pixels are further apart than the diagonal: a larger tolerance changes nothing but the cost
        theta = min(self.theta(h, w), math.sqrt(max(h - 1, 0) ** 2 + max(w - 1, 0) ** 2))
        parts = [self._chunk_stats(labels, valid, theta) for labels, valid in self._chunks(pred, target)]
        for part in parts:
            for name, value in zip(self._state_names, part):
                getattr(self, name).add_(value.to(self._device))
        self.num_images += b

    def _chunk_stats(self, labels: torch.Tensor, valid: torch.Tensor, theta: float) -> tuple[torch.Tensor, ...]:
        """Per-class sums of one chunk; ``labels`` is ``(2, b, H, W)`` (prediction, target), K at ignored pixels."""
        k = self.num_classes
        _, b, h, w = labels.shape
        flat = labels.reshape(2 * b, h, w)  # images 0..b-1: prediction, b..2b-1: target
        idx_dtype = torch.int32 if 2 * b * (k + 1) < 2**31 else torch.int64
        img = torch.arange(2 * b, device=labels.device, dtype=idx_dtype).view(2 * b, 1, 1) * (k + 1)
        counts = torch.bincount((img + flat).reshape(-1), minlength=2 * b * (k + 1))  # label K: ignored
        present = counts.view(2, b, k + 1)[:, :, :k].reshape(2, b * k) > 0
        pres_p, pres_t = present[0], present[1]
        pad = math.floor(theta + _EPS)
        block = (h + 2 * pad) * (w + 2 * pad)
        keys = _boundary_keys(flat, valid, k, pad)
        split = b * k * block  # first key of the target images
        n_pred = int(torch.searchsorted(keys, torch.tensor([split], dtype=keys.dtype, device=keys.device)))
        keys_p, keys_t = keys[:n_pred], keys[n_pred:] - split
        if b * k * block < 2**31 - 1:  # smaller keys make the searches faster
            keys_p, keys_t = keys_p.to(torch.int32), keys_t.to(torch.int32)
        hit_p = _matched(keys_p, keys_t, w + 2 * pad, theta)
        hit_t = _matched(keys_t, keys_p, w + 2 * pad, theta)
        bc_p = torch.div(keys_p, block, rounding_mode="floor").to(torch.int64)  # image * K + class
        bc_t = torch.div(keys_t, block, rounding_mode="floor").to(torch.int64)
        n_p = torch.bincount(bc_p, minlength=b * k)
        m_p = torch.bincount(bc_p[hit_p], minlength=b * k)
        n_t = torch.bincount(bc_t, minlength=b * k)
        m_t = torch.bincount(bc_t[hit_t], minlength=b * k)

        # per-image F1 (flattened over images x classes)
        prec = m_p.double() / n_p.clamp_min(1).double()
        rec = m_t.double() / n_t.clamp_min(1).double()
        den = prec + rec
        f1 = torch.where(den > 0, 2 * prec * rec / den.clamp_min(1e-300), torch.zeros_like(den))
        f1 = torch.where((n_p == 0) | (n_t == 0), torch.zeros_like(f1), f1)  # one side without boundary
        f1 = torch.where((n_p == 0) & (n_t == 0), torch.ones_like(f1), f1)  # neither has a boundary
        f1 = torch.where(pres_p & pres_t, f1, torch.zeros_like(f1))  # present in only one of them
        evaluated = (pres_p | pres_t).view(b, k)
        f1 = torch.where(evaluated, f1.view(b, k), torch.zeros_like(f1.view(b, k)))
        return (
            f1.sum(0),
            evaluated.sum(0),
            n_p.view(b, k).sum(0),
            m_p.view(b, k).sum(0),
            n_t.view(b, k).sum(0),
            m_t.view(b, k).sum(0),
        )

    def compute(self) -> dict[str, Any]:
        """Metrics from the accumulated statistics (see the module docstring for the conventions).

        Returns:
            Dict of plain Python numbers / lists (``NaN`` marks undefined values): ``bf1`` (per class, mean
            per-image F1 over the images where the class was evaluated), ``mbf1`` (nan-mean of ``bf1``),
            ``bf1_pooled``, ``precision``, ``recall`` (per class, from boundary-pixel counts pooled over the
            dataset), ``num_evaluated`` (per class, images where it was evaluated), ``num_images`` (images seen)
            and ``class_names`` when given.
        """
        f1_sum = self.f1_sum.detach().cpu()
        f1_count = self.f1_count.detach().cpu()
        n_p, m_p = self.pred_boundary.detach().cpu(), self.pred_matched.detach().cpu()
        n_t, m_t = self.target_boundary.detach().cpu(), self.target_matched.detach().cpu()
        bf1 = _safe_ratio(f1_sum, f1_count)
        precision = _safe_ratio(m_p, n_p)
        recall = _safe_ratio(m_t, n_t)
        p0, r0 = torch.nan_to_num(precision, nan=0.0), torch.nan_to_num(recall, nan=0.0)
        den = p0 + r0
        pooled = torch.where(den > 0, 2 * p0 * r0 / den.clamp_min(1e-300), torch.zeros_like(den))
        pooled = torch.where((n_p + n_t) == 0, torch.full_like(pooled, math.nan), pooled)
        self._exclude_ignored_class(bf1, pooled, precision, recall)
        out: dict[str, Any] = {
            "bf1": bf1.tolist(),
            "mbf1": _nanmean(bf1),
            "bf1_pooled": pooled.tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "num_evaluated": f1_count.tolist(),
        }
        out.update(self._base_output())
        return out


# ---------------------------------------------------------------------------------------------------- Boundary IoU
class BoundaryIoU(_BoundaryMetric):
    """Streaming per-class Boundary IoU (Cheng et al. 2021); see the module docstring for definitions.

    Args:
        num_classes: number of classes ``K`` (>= 1).
        dilation_ratio: band width as a fraction of the image diagonal (default 0.02 as in the paper and the
            reference code); the band is ``d = max(1, round(dilation_ratio * diagonal))`` pixels wide.
        ignore_index: target value whose pixels are ignored (``None`` counts every pixel).
        class_names: optional ``K`` names, returned by :meth:`compute` as ``class_names``.
        device: where the counts live. ``None`` (default) follows the inputs (moved on the first update).

    Example:
        >>> target = torch.zeros(10, 10, dtype=torch.long)
        >>> target[3:7, 3:7] = 1
        >>> m = BoundaryIoU(2)
        >>> m.update(torch.roll(target, 1, dims=1), target)
        >>> round(m.compute()["boundary_iou"][1], 4)  # 6 / 18 (d = 1 on a 10 x 10 image)
        0.3333
    """

    _state_names = ("intersection", "union", "target_band", "pred_band")

    def __init__(
        self,
        num_classes: int,
        dilation_ratio: float = 0.02,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.dilation_ratio = _check_real(dilation_ratio, "dilation_ratio")
        super().__init__(num_classes, ignore_index, class_names, device)

    def _init_state(self) -> None:
        k, dev = self.num_classes, self._device
        self.intersection = torch.zeros(k, dtype=torch.int64, device=dev)
        self.union = torch.zeros(k, dtype=torch.int64, device=dev)
        self.target_band = torch.zeros(k, dtype=torch.int64, device=dev)
        self.pred_band = torch.zeros(k, dtype=torch.int64, device=dev)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, dilation_ratio={self.dilation_ratio}, "
            f"ignore_index={self.ignore_index}, num_images={self.num_images}, device={self._device})"
        )

    def band_width(self, height: int, width: int) -> int:
        """Band width ``d`` in pixels for ``height x width`` images (as in the reference ``mask_to_boundary``)."""
        return max(1, int(round(self.dilation_ratio * math.sqrt(height * height + width * width))))

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch of images (same input conventions and errors as :meth:`BoundaryF1.update`).

        The counts are only changed once the whole batch has been checked.
        """
        pred, target = self._prepare(pred, target)
        b, h, w = target.shape
        d = self.band_width(h, w)
        k = self.num_classes
        parts = []
        for labels, _valid in self._chunks(pred, target):
            # ignored pixels carry label K in both maps: outside every class mask, and dropped from the counts
            band = _boundary_band(labels.reshape(-1, h, w), d).view(labels.shape)
            code = torch.where(band, labels, k)  # K: not in a band, or ignored
            code_p, code_t = code[0], code[1].to(torch.int64)
            if (k + 1) ** 2 <= _CHUNK_PIXELS:  # one joint histogram gives all three counts
                joint = torch.bincount((code_t * (k + 1) + code_p).reshape(-1), minlength=(k + 1) ** 2)
                joint = joint.view(k + 1, k + 1)
                inter = torch.diagonal(joint)[:k]
                n_t = joint.sum(1)[:k]  # band pixels of each class in the target
                n_p = joint.sum(0)[:k]  # ... and in the prediction
            else:
                inter = torch.bincount(torch.where(code_t == code_p, code_t, k).reshape(-1), minlength=k + 1)[:k]
                n_t = torch.bincount(code_t.reshape(-1), minlength=k + 1)[:k]
                n_p = torch.bincount(code_p.reshape(-1), minlength=k + 1)[:k]
            parts.append((inter, n_t + n_p - inter, n_t, n_p))
        for part in parts:
            for name, value in zip(self._state_names, part):
                getattr(self, name).add_(value.to(self._device))
        self.num_images += b

    def compute(self) -> dict[str, Any]:
        """Metrics from the accumulated counts.

        Returns:
            Dict of plain Python numbers / lists (``NaN`` marks undefined values): ``boundary_iou`` (per class;
            ``NaN`` where the union of the bands is empty), ``mboundary_iou`` (nan-mean), ``num_images`` and
            ``class_names`` when given.
        """
        biou = _safe_ratio(self.intersection.detach().cpu(), self.union.detach().cpu())
        self._exclude_ignored_class(biou)
        out: dict[str, Any] = {"boundary_iou": biou.tolist(), "mboundary_iou": _nanmean(biou)}
        out.update(self._base_output())
        return out
