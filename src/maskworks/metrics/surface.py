"""Streaming surface-distance metrics: Hausdorff distance, percentile Hausdorff distance (HD95) and ASSD.

For every image and every evaluated class ``c`` the binary masks ``P = (pred == c)`` and ``T = (target == c)`` are
reduced to their surfaces (edges), and distances are measured between the edge pixels / voxels. The definitions
are those of MONAI (``monai.metrics.HausdorffDistanceMetric`` / ``SurfaceDistanceMetric`` with the default
``distance_metric="euclidean"``, which follow DeepMind's ``surface-distance``):

* **Edges**: ``edge(M) = M & ~binary_erosion(M)`` with scipy's default structuring element (face connectivity:
  the 4-neighbourhood in 2-D, the 6-neighbourhood in 3-D) and the image border counted as background, so an
  object touching the border has an edge along it. A non-empty mask always has a non-empty edge.
* **Directed distances**: ``d(P -> T)`` holds, for each edge pixel of ``P``, the Euclidean distance (in physical
  units, see ``spacing``) to the nearest edge pixel of ``T``; likewise ``d(T -> P)``.
* **Hausdorff distance** ``hd = max(max d(P -> T), max d(T -> P))``.
* **Percentile Hausdorff distance** ``hd95 = max(q(d(P -> T)), q(d(T -> P)))`` where ``q`` is the ``percentile``-th
  percentile with linear interpolation (``numpy.percentile`` / ``torch.quantile`` defaults), computed per
  direction and then maximised: MONAI ``HausdorffDistanceMetric(percentile=95)``. With ``percentile=100`` it
  equals ``hd``. The key stays ``hd95`` whatever ``percentile`` is; ``compute`` also returns ``percentile``.
* **ASSD** (average symmetric surface distance) is the mean of the *pooled* distances of both directions,
  ``(sum d(P -> T) + sum d(T -> P)) / (|edge(P)| + |edge(T)|)``, exactly as MONAI
  ``SurfaceDistanceMetric(symmetric=True)`` (``torch.cat(distances).mean()``). This weights each direction by its
  number of edge pixels; it is *not* the average of the two directed means.

Distances are exact Euclidean distances from ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``,
computed on the bounding box of ``P | T`` grown by one pixel (clipped to the image). The crop is exact: every edge
pixel lies inside the box, the one-pixel margin (or the image border) supplies the background the erosion needs,
and distances between points of the box do not depend on what lies outside it.

Ignored pixels (``target == ignore_index``) belong to no class in either map: for every class they are removed
from both ``P`` and ``T`` before the edges are taken, so the prediction there never matters. This is MONAI's
``ignore_index`` behaviour (prediction and one-hot target multiplied by the valid mask). Where an object is cut by
an ignored region its edge runs along the region; when the prediction agrees with the target up to that region
the two cut edges coincide and add zero distances. If ``ignore_index`` is itself a class id, that class never has
a target mask, so its distances are ``NaN`` and it is left out of the means (counted pixels predicted as it only
show up in its ``num_target_empty``).

Empty masks (per image and class, after removing ignored pixels):

* ``P`` and ``T`` both empty (class absent from both, e.g. an all-ignored image): every distance is undefined,
  stored as ``NaN`` and counted in ``num_both_empty``. MONAI also gives ``NaN``.
* exactly one empty (``T`` present but never predicted: ``num_pred_empty``; predicted but absent from the target:
  ``num_target_empty``): there is nothing to measure against, the distances are infinite and ``hd``, ``hd95``,
  ``assd`` are stored as ``inf``. MONAI gives ``inf`` for HD and ASSD too; for a percentile HD it gives ``NaN`` (an
  artefact of interpolating between infinite values in ``torch.quantile``), reported here as ``inf`` as well so
  that ``NaN`` always means "both empty".

``compute`` averages each class over the images where its distances are *finite* (both masks present); the
``num_*`` counts tell how many images were left out and why. Leaving out missed or hallucinated objects makes the
means optimistic, so read them together with ``num_pred_empty`` / ``num_target_empty`` (or with Dice / IoU from
:class:`~maskworks.metrics.confusion.ConfusionMatrix`). A class with no finite value is ``NaN`` and left out of the
class means ``mhd`` / ``mhd95`` / ``massd``. These are means of per-class means, i.e. every class weighs the same;
MONAI's ``reduction="mean"`` instead averages over classes within each image first (and returns ``inf`` as soon
as one value is infinite), while its ``reduction="mean_batch"`` matches the per-class lists when no value is
infinite. ``NaN`` and ``inf`` are plain Python floats; ``json.dumps`` writes them as ``NaN`` / ``Infinity``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from maskworks.metrics.confusion import _as_tensor, check_common_args, labels_from_scores

__all__ = ["SurfaceDistance"]

_MAX_LISTED = 10  # offending values listed in error messages
_METRICS = ("hd", "hd95", "assd")


def _list_values(values: np.ndarray) -> str:
    uniq = np.unique(values).tolist()
    more = f" ... ({len(uniq)} distinct)" if len(uniq) > _MAX_LISTED else ""
    return f"{uniq[:_MAX_LISTED]}{more}"


def _check_spacing(spacing: Any, name: str = "spacing") -> float | tuple[float, ...] | None:
    """Validate ``spacing``: ``None``, a positive number, or a sequence of positive numbers (one per axis)."""
    if spacing is None:
        return None
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    elif isinstance(spacing, np.ndarray):
        spacing = spacing.tolist()
    if isinstance(spacing, Real) and not isinstance(spacing, bool):
        values: tuple[Any, ...] = (spacing,)
        scalar = True
    elif isinstance(spacing, Sequence) and not isinstance(spacing, str):
        values = tuple(spacing)
        scalar = False
    else:
        raise ValueError(f"{name} must be None, a positive number or a sequence of positive numbers, got {spacing!r}")
    if not values or not all(
        isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ValueError(
            f"{name} must be a positive finite number or a sequence of them (one per axis), got {spacing!r}"
        )
    return float(values[0]) if scalar else tuple(float(v) for v in values)


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty ``mask`` grown by ``margin`` on every side, clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Surface pixels: the mask minus its erosion (face connectivity, outside of the array = background)."""
    return mask & ~ndimage.binary_erosion(mask)


def _surface_distances(
    pred_mask: np.ndarray, target_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed edge distances ``d(pred -> target)`` and ``d(target -> pred)`` of two non-empty boolean masks.

    Args:
        pred_mask, target_mask: boolean arrays of the same shape, both with at least one ``True``.
        spacing: voxel size per axis.

    Returns:
        Two float64 arrays: one distance per edge pixel of ``pred_mask`` (to the nearest edge pixel of
        ``target_mask``), and one per edge pixel of ``target_mask``.
    """
    box = _bounding_box(pred_mask | target_mask, margin=1)
    edge_p = _edges(pred_mask[box])
    edge_t = _edges(target_mask[box])
    d_pt = ndimage.distance_transform_edt(~edge_t, sampling=spacing)[edge_p]
    d_tp = ndimage.distance_transform_edt(~edge_p, sampling=spacing)[edge_t]
    return d_pt, d_tp


class SurfaceDistance:
    """Streaming per-image Hausdorff distance, percentile Hausdorff distance (HD95) and ASSD per class.

    Each :meth:`update` measures every image of the batch against its target (see the module docstring for the
    definitions, ignored pixels and empty masks) and keeps the per-image values; :meth:`compute` averages them.
    The work runs on the CPU with scipy, one image and class at a time.

    Args:
        num_classes: number of classes ``K`` (>= 1).
        include_background: whether class 0 is evaluated. When ``False`` (default, as in MONAI) class 0 is
            skipped: its entries in the per-class lists and per-image tables are ``NaN`` with zero counts, and it
            is left out of the class means.
        percentile: percentile of the directed distances for ``hd95``, in ``(0, 100]`` (default 95). ``0`` is
            refused because MONAI reads a falsy percentile as "plain maximum".
        spacing: voxel size in physical units, as MONAI's ``spacing``: a positive number (isotropic) or one number
            per spatial axis in array order (``(H, W)`` or ``(D, H, W)``). ``None`` means 1. Distances are in the
            same units.
        ignore_index: target value whose pixels belong to no class (``None``: every pixel counts).
        class_names: optional ``K`` names, returned by :meth:`compute` as ``class_names``.

    Example:
        >>> sd = SurfaceDistance(2)
        >>> target = torch.zeros(1, 32, 32, dtype=torch.long)
        >>> target[0, 8:20, 8:20] = 1
        >>> pred = torch.roll(target, 3, dims=2)  # the square shifted by 3 pixels
        >>> sd.update(pred, target)
        >>> sd.compute()["hd"][1]
        3.0
    """

    def __init__(
        self,
        num_classes: int,
        include_background: bool = False,
        percentile: float = 95.0,
        spacing: float | Sequence[float] | None = None,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        class_names = check_common_args(num_classes, ignore_index, class_names)
        if not isinstance(include_background, (bool, np.bool_)):
            raise ValueError(f"include_background must be a bool, got {include_background!r}")
        if not include_background and num_classes == 1:
            raise ValueError(
                "include_background=False with num_classes=1 leaves no class to evaluate; "
                "use num_classes=2 (background + foreground) or include_background=True"
            )
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, Real)
            or not math.isfinite(percentile)
            or not 0 < percentile <= 100
        ):
            raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
        self.num_classes = int(num_classes)
        self.include_background = bool(include_background)
        self.percentile = float(percentile)
        self.spacing = _check_spacing(spacing)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.class_names = class_names
        self.reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, include_background={self.include_background}, "
            f"percentile={self.percentile}, spacing={self.spacing}, ignore_index={self.ignore_index}, "
            f"num_images={self.num_images})"
        )

    @property
    def classes(self) -> list[int]:
        """Evaluated class ids (all of ``0..K-1``, or ``1..K-1`` without the background)."""
        return list(range(0 if self.include_background else 1, self.num_classes))

    @property
    def num_images(self) -> int:
        return sum(len(t) for t in self._present_t)

    # ------------------------------------------------------------------ accumulation
    def reset(self) -> None:
        """Forget every image seen so far."""
        self._tables: dict[str, list[np.ndarray]] = {m: [] for m in _METRICS}
        self._present_p: list[np.ndarray] = []
        self._present_t: list[np.ndarray] = []

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor | np.ndarray,
        target: torch.Tensor | np.ndarray,
        spacing: float | Sequence[float] | None = None,
    ) -> None:
        """Measure one batch and store its per-image values.

        Args:
            pred: predicted labels of any integer (or bool) dtype with the same shape as ``target``; or float
                scores ``(B, K, H, W)`` / ``(B, K, D, H, W)``, reduced with ``argmax`` over dim 1.
            target: integer labels ``0..K-1`` or ``ignore_index``, any integer dtype, shaped ``(B, H, W)`` (a batch
                of 2-D images) or ``(B, D, H, W)`` (a batch of 3-D volumes). The batch dimension is required.
            spacing: voxel size for this batch, overriding the one given to the constructor (same forms).

        Raises:
            ValueError: on a target that is not 3-D / 4-D, mismatched shapes, a float ``pred`` whose class
                dimension is not ``K``, target values outside ``0..K-1`` that are not ``ignore_index``, predicted
                labels outside ``0..K-1`` (at non-ignored pixels), or a ``spacing`` with the wrong number of axes.
            TypeError: on a floating-point ``target`` or an unsupported input type.
        """
        pred = _as_tensor(pred, "pred")
        target = _as_tensor(target, "target")
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")
        if pred.is_complex():
            raise TypeError(f"pred must be integer labels or float scores, got dtype {pred.dtype}")
        if target.ndim not in (3, 4):
            hint = " (add the batch dimension, e.g. target[None])" if target.ndim == 2 else ""
            raise ValueError(
                f"target must be a batch of 2-D label maps (B, H, W) or of 3-D volumes (B, D, H, W), got shape "
                f"{tuple(target.shape)}{hint}"
            )
        if pred.is_floating_point():
            pred = self._argmax(pred, target)
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
        ndim = target.ndim - 1
        sampling = self._sampling(self.spacing if spacing is None else _check_spacing(spacing), ndim)

        t = target.detach().cpu().to(torch.int64).numpy()
        p = pred.detach().cpu().to(torch.int64).numpy()
        valid = np.ones(t.shape, dtype=bool) if self.ignore_index is None else t != self.ignore_index
        k = self.num_classes
        bad_t = valid & ((t < 0) | (t >= k))
        if bad_t.any():
            raise ValueError(
                f"target holds values outside 0..{k - 1} that are not ignore_index={self.ignore_index}: "
                f"{_list_values(t[bad_t])}"
            )
        bad_p = valid & ((p < 0) | (p >= k))
        if bad_p.any():
            raise ValueError(f"pred holds labels outside 0..{k - 1}: {_list_values(p[bad_p])}")

        b = t.shape[0]
        tables = {m: np.full((b, k), math.nan) for m in _METRICS}
        present_p = np.zeros((b, k), dtype=bool)
        present_t = np.zeros((b, k), dtype=bool)
        for i in range(b):
            vi, pi, ti = valid[i], p[i], t[i]
            for c in self.classes:
                pm = (pi == c) & vi
                tm = (ti == c) & vi
                has_p, has_t = bool(pm.any()), bool(tm.any())
                present_p[i, c], present_t[i, c] = has_p, has_t
                if not (has_p and has_t):
                    if has_p or has_t:
                        for m in _METRICS:
                            tables[m][i, c] = math.inf
                    continue
                d_pt, d_tp = _surface_distances(pm, tm, sampling)
                tables["hd"][i, c] = max(d_pt.max(), d_tp.max())
                tables["hd95"][i, c] = max(np.percentile(d_pt, self.percentile), np.percentile(d_tp, self.percentile))
                tables["assd"][i, c] = (d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)
        for m in _METRICS:
            self._tables[m].append(tables[m])
        self._present_p.append(present_p)
        self._present_t.append(present_t)

    def _argmax(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Labels from float scores ``(B, K, ...)`` against a ``(B, ...)`` target."""
        return labels_from_scores(scores, target, self.num_classes, batched_only=True)

    @staticmethod
    def _sampling(spacing: float | tuple[float, ...] | None, ndim: int) -> tuple[float, ...]:
        """Per-axis voxel size for ``ndim`` spatial axes from a validated ``spacing``."""
        if spacing is None:
            return (1.0,) * ndim
        if isinstance(spacing, float):
            return (spacing,) * ndim
        if len(spacing) != ndim:
            raise ValueError(
                f"spacing has {len(spacing)} entries {spacing} but the inputs have {ndim} spatial axes; give one "
                f"number per axis in array order, or a single number"
            )
        return spacing

    def merge(self, other: SurfaceDistance) -> SurfaceDistance:
        """Append another instance's images (e.g. from another worker) to this one and return ``self``.

        Raises:
            ValueError: if ``other`` has a different number of classes, background setting, percentile or ignore
                index.
        """
        if not isinstance(other, SurfaceDistance):
            raise TypeError(f"can only merge another SurfaceDistance, got {type(other).__name__}")
        mine = (self.num_classes, self.include_background, self.percentile, self.ignore_index)
        theirs = (other.num_classes, other.include_background, other.percentile, other.ignore_index)
        if mine != theirs:
            raise ValueError(
                "cannot merge SurfaceDistance with (num_classes, include_background, percentile, ignore_index)="
                f"{theirs} into {mine}"
            )
        for m in _METRICS:
            self._tables[m].extend(a.copy() for a in other._tables[m])
        self._present_p.extend(a.copy() for a in other._present_p)
        self._present_t.extend(a.copy() for a in other._present_t)
        return self

    # ------------------------------------------------------------------ results
    def _stack(self, parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.num_classes), dtype=dtype)
        return np.concatenate(parts, axis=0)

    @property
    def values(self) -> dict[str, np.ndarray]:
        """Per-image tables ``{"hd", "hd95", "assd"}``, each a float64 array ``(N, K)`` (a copy).

        ``NaN``: class not evaluated or absent from both masks; ``inf``: present in exactly one of them.
        """
        return {m: self._stack(self._tables[m], np.float64) for m in _METRICS}

    def compute(self, per_image: bool = False) -> dict[str, Any]:
        """Averages of the stored per-image values (see the module docstring for empty masks).

        Args:
            per_image: also return the per-image tables as ``per_image = {"hd", "hd95", "assd"}``, each a list of
                ``N`` lists of ``K`` floats (``NaN`` / ``inf`` as in :attr:`values`).

        Returns:
            Dict of plain Python numbers / lists (``NaN`` marks undefined values): ``hd``, ``hd95``, ``assd``
            (per-class lists of length ``K``: mean over the images where the class is present in both maps, so the
            value is finite); ``mhd``, ``mhd95``, ``massd`` (means of those over classes, ``NaN`` ones left out);
            per-class int lists ``num_finite`` (images averaged), ``num_both_empty``, ``num_pred_empty`` (in the
            target, not predicted), ``num_target_empty`` (predicted, not in the target); ``num_images``;
            ``percentile``; and ``class_names`` when given.
        """
        vals = self.values
        present_p = self._stack(self._present_p, bool)
        present_t = self._stack(self._present_t, bool)
        evaluated = np.zeros(self.num_classes, dtype=bool)
        evaluated[self.classes] = True
        both = present_p & present_t
        out: dict[str, Any] = {}
        for m, mean_key in zip(_METRICS, ("mhd", "mhd95", "massd")):
            per_class = np.full(self.num_classes, math.nan)
            for c in np.flatnonzero(evaluated & both.any(axis=0)):
                per_class[c] = float(vals[m][both[:, c], c].mean())
            out[m] = [float(v) for v in per_class]
            keep = ~np.isnan(per_class)
            out[mean_key] = float(per_class[keep].mean()) if keep.any() else math.nan
        out["num_finite"] = [int(v) for v in both.sum(axis=0)]
        out["num_both_empty"] = [int(v) for v in ((~present_p & ~present_t).sum(axis=0) * evaluated)]
        out["num_pred_empty"] = [int(v) for v in (present_t & ~present_p).sum(axis=0)]
        out["num_target_empty"] = [int(v) for v in (present_p & ~present_t).sum(axis=0)]
        out["num_images"] = int(present_t.shape[0])
        out["percentile"] = self.percentile
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        if per_image:
            out["per_image"] = {m: [[float(v) for v in row] for row in vals[m]] for m in _METRICS}
        return out
