"""Instance segmentation metrics on instance id maps: aggregated Jaccard index and IoU-threshold matching.

Both metrics compare a predicted id map with a ground-truth id map of the same ``(H, W)`` shape, ``0`` = background
and every other value one instance (ids need not be consecutive). They need no scores, so they fit score-less
post-processing such as watershed; for COCO mask AP of scored instances see :class:`maskworks.metrics.MaskAP`.

**Aggregated Jaccard index** (Kumar et al., "A Dataset and a Technique for Generalized Nuclear Segmentation for
Computational Pathology", IEEE TMI 2017): each ground-truth instance ``G_i`` is paired with the predicted instance
``S_j`` of largest IoU with it (a prediction may be chosen by several ground-truth instances; ties go to the
prediction with the smaller id); ``C`` sums ``|G_i & S_j|`` and ``U`` sums ``|G_i | S_j|`` over these pairs; a
ground-truth instance that overlaps no prediction adds its area to ``U``; every prediction chosen by no ground-truth
instance adds its area to ``U``; ``AJI = C / U``. This is the definition of the MoNuSeg challenge code and of
HoVer-Net's ``get_fast_aji``. ``one_to_one=True`` gives AJI+ (Graham et al., "HoVer-Net", MedIA 2019): the pairs
are a one-to-one assignment maximising the summed IoU (Hungarian algorithm), so a prediction is never counted twice.

**Instance matching** (Schmidt et al., "Cell Detection with Star-convex Polygons" (StarDist), MICCAI 2018, and the
Kaggle Data Science Bowl 2018 metric, Caicedo et al., Nature Methods 2019): at an IoU threshold ``t`` a predicted and
a ground-truth instance match when ``IoU >= t``, under the one-to-one assignment with the most matches (ties broken
by the larger summed IoU; for ``t > 0.5`` the matches are unique anyway). Matches are true positives (TP),
unmatched predictions false positives (FP), unmatched ground-truth instances false negatives (FN);
``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1 = 2 TP / (2 TP + FP + FN)`` and
``accuracy = TP / (TP + FP + FN)``. The last is what the DSB 2018 and StarDist call "average precision"; its mean
over the thresholds ``0.5, 0.55, ..., 0.95`` is reported as ``ap``. The DSB compared with ``IoU > t`` (strictly);
the two differ only for a pair whose IoU equals a threshold exactly.

Streaming: ``update`` adds images, ``compute`` reports dataset numbers. Dataset values pool the counts of all
images (``aji_pooled = sum C / sum U``; TP / FP / FN summed before the ratios, as StarDist's
``matching_dataset(by_image=False)``); per-image means are reported beside them (``aji``: the mean of per-image AJI,
the MoNuSeg / HoVer-Net convention; ``ap_per_image``: the mean of per-image ``ap``, the DSB 2018 leaderboard score).
An image with neither ground-truth nor predicted instances has no per-image value and is left out of those means.
Undefined ratios (``0 / 0``) are ``NaN``.

Pixels marked in the optional ``ignore`` mask are removed from both maps before matching (their area counts
nowhere).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "AggregatedJaccardIndex",
    "InstanceMatching",
    "aggregated_jaccard_index",
    "match_instances",
    "pairwise_instance_iou",
    "DSB_THRESHOLDS",
]

DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95
_DENSE_LIMIT = 1 << 16


# ---------------------------------------------------------------------------------------------- overlaps
def _id_map(x: Any, name: str) -> np.ndarray:
    """A 2D non-negative integer id map as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) instance id map, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integer instance ids (0 = background), got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must hold instance ids >= 0 (0 = background), got {int(a.min())}")
    return a


def _sequential(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids relabelled 1..N in increasing order of the original ids (0 stays 0), and N."""
    uniq, inv = np.unique(ids.ravel(), return_inverse=True)
    if uniq.size and uniq[0] != 0:
        inv = inv + 1
        n = uniq.size
    else:
        n = uniq.size - 1
    return inv.astype(np.int64), max(n, 0)


@dataclass
class _Pairs:
    """Overlaps of one image: ``inter[k]`` pixels shared by ground truth ``g[k]`` and prediction ``p[k]``
    (0-based instance indices), and the instance areas."""

    g: np.ndarray
    p: np.ndarray
    inter: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        return self.inter / (self.gt_area[self.g] + self.pred_area[self.p] - self.inter)


def _overlaps(pred: Any, target: Any, ignore: Any = None) -> _Pairs:
    p_map, g_map = _id_map(pred, "pred"), _id_map(target, "target")
    if p_map.shape != g_map.shape:
        raise ValueError(f"pred and target must have the same shape, got {p_map.shape} and {g_map.shape}")
    if ignore is not None:
        keep = ~_ignore_mask(ignore, g_map.shape)
        p_map, g_map = np.where(keep, p_map, 0), np.where(keep, g_map, 0)
    p_idx, n_p = _sequential(p_map)
    g_idx, n_g = _sequential(g_map)
    pred_area = np.bincount(p_idx, minlength=n_p + 1)[1:]
    gt_area = np.bincount(g_idx, minlength=n_g + 1)[1:]
    both = (p_idx > 0) & (g_idx > 0)
    code = (g_idx[both] - 1) * n_p + (p_idx[both] - 1)  # (K,) int64 pair codes
    if n_g * n_p <= max(4 * code.size, _DENSE_LIMIT):
        joint = np.bincount(code, minlength=n_g * n_p)
        code = np.flatnonzero(joint)
        inter = joint[code]
    else:
        code, inter = np.unique(code, return_counts=True)
    g, p = np.divmod(code, max(n_p, 1))
    return _Pairs(g, p, inter.astype(np.int64), gt_area.astype(np.int64), pred_area.astype(np.int64))


def _ignore_mask(ignore: Any, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(ignore, torch.Tensor):
        ignore = ignore.detach().cpu().numpy()
    m = np.asarray(ignore)
    if m.shape != shape:
        raise ValueError(f"ignore must be a bool mask of the map shape {shape}, got shape {m.shape}")
    return m.astype(bool)


def pairwise_instance_iou(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense IoU matrix between the ground-truth and the predicted instances of one image.

    Args:
        pred: ``(H, W)`` predicted id map (0 = background), numpy or torch.
        target: ``(H, W)`` ground-truth id map.

    Returns:
        ``(iou, target_ids, pred_ids)``: float64 ``(G, P)`` with ``iou[i, j]`` the IoU of ``target_ids[i]`` and
        ``pred_ids[j]``; the ids sorted increasingly.
    """
    pairs = _overlaps(pred, target)
    iou = np.zeros((pairs.gt_area.size, pairs.pred_area.size))
    iou[pairs.g, pairs.p] = pairs.iou
    ids = [np.unique(_id_map(m, name)) for m, name in ((target, "target"), (pred, "pred"))]
    return iou, ids[0][ids[0] > 0], ids[1][ids[1] > 0]


# ---------------------------------------------------------------------------------------------- AJI
def _aji_counts(pairs: _Pairs, one_to_one: bool) -> tuple[int, int]:
    """``(C, U)`` of one image (see the module docstring)."""
    n_g, n_p = pairs.gt_area.size, pairs.pred_area.size
    if pairs.inter.size == 0:
        return 0, int(pairs.gt_area.sum() + pairs.pred_area.sum())
    iou = pairs.iou
    if one_to_one:
        sel = _max_iou_assignment(pairs.g, pairs.p, iou, n_g, n_p)
    else:
        order = np.lexsort((pairs.p, -iou, pairs.g))  # by gt, then largest IoU, then smallest pred id
        g_sorted = pairs.g[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = g_sorted[1:] != g_sorted[:-1]
        sel = order[first]
    g, p, inter = pairs.g[sel], pairs.p[sel], pairs.inter[sel]
    union = pairs.gt_area[g] + pairs.pred_area[p] - inter
    gt_paired = np.zeros(n_g, dtype=bool)
    gt_paired[g] = True
    pred_paired = np.zeros(n_p, dtype=bool)
    pred_paired[p] = True
    c = int(inter.sum())
    u = int(union.sum() + pairs.gt_area[~gt_paired].sum() + pairs.pred_area[~pred_paired].sum())
    return c, u


def _max_iou_assignment(g: np.ndarray, p: np.ndarray, iou: np.ndarray, n_g: int, n_p: int) -> np.ndarray:
    """Indices into the pair list of the one-to-one assignment of largest summed IoU (overlapping pairs only)."""
    from scipy.optimize import linear_sum_assignment

    rows, g_local = np.unique(g, return_inverse=True)
    cols, p_local = np.unique(p, return_inverse=True)
    cost = np.zeros((rows.size, cols.size))
    cost[g_local, p_local] = -iou
    r, c = linear_sum_assignment(cost)
    pair_of = np.full((rows.size, cols.size), -1, dtype=np.int64)
    pair_of[g_local, p_local] = np.arange(g.size)
    sel = pair_of[r, c]
    return sel[sel >= 0]


def aggregated_jaccard_index(pred: Any, target: Any, one_to_one: bool = False, ignore: Any = None) -> float:
    """Aggregated Jaccard index (AJI, Kumar et al. 2017) of one image; AJI+ with ``one_to_one=True``.

    Args:
        pred: ``(H, W)`` predicted id map (0 = background), numpy or torch.
        target: ``(H, W)`` ground-truth id map.
        one_to_one: AJI+ (one-to-one pairs of largest summed IoU) instead of Kumar's AJI.
        ignore: optional bool ``(H, W)``; these pixels are removed from both maps.

    Returns:
        ``C / U`` (see the module docstring); ``NaN`` when neither map has an instance.
    """
    c, u = _aji_counts(_overlaps(pred, target, ignore), one_to_one)
    return c / u if u > 0 else math.nan


# ---------------------------------------------------------------------------------------------- matching
def _check_thresholds(thresholds: float | Sequence[float]) -> tuple[float, ...]:
    ts = (thresholds,) if isinstance(thresholds, (int, float)) else tuple(thresholds)
    if not ts or not all(isinstance(t, (int, float, np.floating)) and 0 < float(t) <= 1 for t in ts):
        raise ValueError(f"thresholds must be IoU values in (0, 1], got {thresholds!r}")
    return tuple(float(t) for t in ts)


def _match_counts(pairs: _Pairs, thresholds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(tp (T,) int64, sum of matched IoU (T,) float64)`` of one image at each threshold."""
    iou = pairs.iou
    tp = np.zeros(len(thresholds), dtype=np.int64)
    iou_sum = np.zeros(len(thresholds))
    for k, t in enumerate(thresholds):
        cand = np.flatnonzero(iou >= t)
        if cand.size == 0:
            continue
        g, p = pairs.g[cand], pairs.p[cand]
        if np.unique(g).size < g.size or np.unique(p).size < p.size:  # not one-to-one: possible only for t <= 0.5
            cand = cand[_most_matches(g, p, iou[cand])]
        tp[k] = cand.size
        iou_sum[k] = iou[cand].sum()
    return tp, iou_sum


def _most_matches(g: np.ndarray, p: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Indices of a one-to-one subset of candidate pairs: most pairs, then largest summed IoU."""
    from scipy.optimize import linear_sum_assignment

    rows, g_local = np.unique(g, return_inverse=True)
    cols, p_local = np.unique(p, return_inverse=True)
    n = min(rows.size, cols.size)
    cost = np.zeros((rows.size, cols.size))
    cost[g_local, p_local] = -1.0 - iou / (2 * n)  # a match always outweighs any IoU tie-break
    r, c = linear_sum_assignment(cost)
    pair_of = np.full((rows.size, cols.size), -1, dtype=np.int64)
    pair_of[g_local, p_local] = np.arange(g.size)
    sel = pair_of[r, c]
    return sel[sel >= 0]


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float]:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, math.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out.tolist()


def _matching_stats(tp: np.ndarray, n_pred: int, n_true: int, iou_sum: np.ndarray) -> dict[str, list]:
    fp, fn = n_pred - tp, n_true - tp
    return {
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp, tp + fp + fn),
        "mean_matched_iou": _ratio(iou_sum, tp),
    }


def match_instances(
    pred: Any, target: Any, thresholds: float | Sequence[float] = DSB_THRESHOLDS, ignore: Any = None
) -> dict[str, Any]:
    """Match the instances of one image at IoU thresholds (StarDist / DSB 2018 definition, see the module docstring).

    Args:
        pred: ``(H, W)`` predicted id map (0 = background), numpy or torch.
        target: ``(H, W)`` ground-truth id map.
        thresholds: IoU threshold(s) in ``(0, 1]``; a pair matches when ``IoU >= t``.
        ignore: optional bool ``(H, W)``; these pixels are removed from both maps.

    Returns:
        ``thresholds``; per threshold (lists aligned with it) ``tp``, ``fp``, ``fn``, ``precision``, ``recall``,
        ``f1``, ``accuracy`` (``TP / (TP + FP + FN)``) and ``mean_matched_iou``; ``ap``: the mean of ``accuracy``
        over the thresholds; ``n_true``, ``n_pred``.
    """
    ts = _check_thresholds(thresholds)
    pairs = _overlaps(pred, target, ignore)
    tp, iou_sum = _match_counts(pairs, ts)
    n_pred, n_true = int(pairs.pred_area.size), int(pairs.gt_area.size)
    out: dict[str, Any] = {"thresholds": list(ts), **_matching_stats(tp, n_pred, n_true, iou_sum)}
    out["ap"] = float(np.mean(out["accuracy"]))
    out["n_true"], out["n_pred"] = n_true, n_pred
    return out


# ---------------------------------------------------------------------------------------------- streaming
def _as_list(maps: Any, name: str) -> list[Any]:
    """A batch ``(B, H, W)``, a single ``(H, W)`` map or a sequence of maps -> list of ``(H, W)`` maps."""
    if maps is None:
        return []
    if isinstance(maps, (torch.Tensor, np.ndarray)):
        if maps.ndim == 2:
            return [maps]
        if maps.ndim == 3:
            return list(maps)
        raise ValueError(f"{name} must be (H, W) or (B, H, W), got shape {tuple(maps.shape)}")
    return list(maps)


def _batch(preds: Any, targets: Any, ignore: Any) -> list[tuple[Any, Any, Any]]:
    p, t = _as_list(preds, "preds"), _as_list(targets, "targets")
    if len(p) != len(t):
        raise ValueError(f"got {len(p)} predicted and {len(t)} target maps; expected one prediction per target")
    ig = _as_list(ignore, "ignore") if ignore is not None else [None] * len(t)
    if len(ig) != len(t):
        raise ValueError(f"got {len(ig)} ignore masks for {len(t)} targets")
    return list(zip(p, t, ig))


class _Streaming(ABC):
    """Sums in named tensors: ``reset`` / ``merge`` / ``all_reduce`` work on every name in ``_state``."""

    _state: tuple[str, ...] = ()

    @abstractmethod
    def _zeros(self) -> dict[str, torch.Tensor]:
        """Fresh zero sums, one tensor per name in ``_state``."""

    def reset(self) -> None:
        """Forget every image."""
        for name, value in self._zeros().items():
            setattr(self, name, value)

    def merge(self, other: Any) -> Any:
        """Add another metric's sums into this one (e.g. from another worker) and return ``self``."""
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(f"cannot merge {other!r} into {self!r}: expected the same metric and settings")
        for name in self._state:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def all_reduce(self) -> Any:
        """Sum the state over all ``torch.distributed`` ranks in place (no-op when not initialised); returns ``self``.

        Every rank must call it (it is a collective).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        for name in self._state:
            value = getattr(self, name)
            buf = value.to(device) if device is not None else value.clone()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            setattr(self, name, buf.to(value.device))
        return self

    def _config(self) -> tuple:
        return ()


class AggregatedJaccardIndex(_Streaming):
    """Streaming aggregated Jaccard index (Kumar et al. 2017; AJI+ with ``one_to_one=True``).

    Args:
        one_to_one: AJI+ (Graham et al. 2019): one-to-one pairs of largest summed IoU.

    Example::

        aji = AggregatedJaccardIndex()
        aji.update(pred_ids, target_ids)      # (H, W) or (B, H, W), or lists of maps
        aji.compute()["aji"]
    """

    _state = ("inter", "union", "aji_sum", "aji_count", "num_images")

    def __init__(self, one_to_one: bool = False) -> None:
        self.one_to_one = bool(one_to_one)
        self.reset()

    def _config(self) -> tuple:
        return (self.one_to_one,)

    def __repr__(self) -> str:
        return f"AggregatedJaccardIndex(one_to_one={self.one_to_one}, {int(self.num_images)} images)"

    def _zeros(self) -> dict[str, torch.Tensor]:
        z = torch.zeros((), dtype=torch.int64)
        f = torch.zeros((), dtype=torch.float64)
        return {"inter": z, "union": z, "aji_sum": f, "aji_count": z, "num_images": z}

    def update(self, preds: Any, targets: Any, ignore: Any = None) -> None:
        """Add images.

        Args:
            preds: predicted id map(s): ``(H, W)``, ``(B, H, W)`` or a sequence of ``(H, W)`` maps (0 = background).
            targets: ground-truth id map(s), in the same form.
            ignore: optional bool mask(s) of pixels to leave out, in the same form.
        """
        for pred, target, ign in _batch(preds, targets, ignore):
            c, u = _aji_counts(_overlaps(pred, target, ign), self.one_to_one)
            self.inter = self.inter + c
            self.union = self.union + u
            if u > 0:
                self.aji_sum = self.aji_sum + c / u
                self.aji_count = self.aji_count + 1
            self.num_images = self.num_images + 1

    def compute(self) -> dict[str, Any]:
        """The metric over the images seen.

        Returns:
            ``aji``: mean of the per-image AJI (images with no instance at all left out); ``aji_pooled``:
            ``sum C / sum U`` over all images; ``num_images``. ``NaN`` when undefined.
        """
        count, union = int(self.aji_count), int(self.union)
        return {
            "aji": float(self.aji_sum) / count if count else math.nan,
            "aji_pooled": int(self.inter) / union if union else math.nan,
            "num_images": int(self.num_images),
        }


class InstanceMatching(_Streaming):
    """Streaming instance matching at IoU thresholds: precision, recall, F1 and the DSB 2018 / StarDist "AP".

    See the module docstring for the definitions; the default thresholds are ``0.5, 0.55, ..., 0.95``.

    Args:
        thresholds: IoU threshold(s) in ``(0, 1]``; a pair matches when ``IoU >= t``.

    Example::

        m = InstanceMatching()
        m.update(pred_ids, target_ids)
        m.compute()["ap"]
    """

    _state = ("tp", "iou_sum", "n_pred", "n_true", "ap_image_sum", "ap_image_count", "num_images")

    def __init__(self, thresholds: float | Sequence[float] = DSB_THRESHOLDS) -> None:
        self.thresholds = _check_thresholds(thresholds)
        self.reset()

    def _config(self) -> tuple:
        return self.thresholds

    def __repr__(self) -> str:
        return f"InstanceMatching(thresholds={list(self.thresholds)}, {int(self.num_images)} images)"

    def _zeros(self) -> dict[str, torch.Tensor]:
        t = len(self.thresholds)
        z = torch.zeros((), dtype=torch.int64)
        return {
            "tp": torch.zeros(t, dtype=torch.int64),
            "iou_sum": torch.zeros(t, dtype=torch.float64),
            "n_pred": z,
            "n_true": z,
            "ap_image_sum": torch.zeros((), dtype=torch.float64),
            "ap_image_count": z,
            "num_images": z,
        }

    def update(self, preds: Any, targets: Any, ignore: Any = None) -> None:
        """Add images (same input forms as :meth:`AggregatedJaccardIndex.update`)."""
        for pred, target, ign in _batch(preds, targets, ignore):
            pairs = _overlaps(pred, target, ign)
            tp, iou_sum = _match_counts(pairs, self.thresholds)
            n_pred, n_true = pairs.pred_area.size, pairs.gt_area.size
            self.tp = self.tp + torch.from_numpy(tp)
            self.iou_sum = self.iou_sum + torch.from_numpy(iou_sum)
            self.n_pred = self.n_pred + n_pred
            self.n_true = self.n_true + n_true
            if n_pred + n_true > 0:
                self.ap_image_sum = self.ap_image_sum + float(np.mean(tp / (n_pred + n_true - tp)))
                self.ap_image_count = self.ap_image_count + 1
            self.num_images = self.num_images + 1

    def compute(self) -> dict[str, Any]:
        """The matching statistics over the images seen.

        Returns:
            ``thresholds``; per threshold from the pooled counts (lists aligned with it) ``tp``, ``fp``, ``fn``,
            ``precision``, ``recall``, ``f1``, ``accuracy`` (``TP / (TP + FP + FN)``) and ``mean_matched_iou``;
            ``ap``: mean of ``accuracy`` over the thresholds; ``ap_50`` / ``ap_75``: ``accuracy`` at 0.5 / 0.75 when
            those are thresholds; ``ap_per_image``: mean over images of each image's mean accuracy (the DSB 2018
            score); ``n_true``, ``n_pred``, ``num_images``. ``NaN`` marks undefined values.
        """
        stats = _matching_stats(self.tp.numpy(), int(self.n_pred), int(self.n_true), self.iou_sum.numpy())
        out: dict[str, Any] = {"thresholds": list(self.thresholds), **stats}
        acc = np.asarray(stats["accuracy"])
        out["ap"] = float(acc.mean()) if not np.isnan(acc).any() else math.nan
        for key, t in (("ap_50", 0.5), ("ap_75", 0.75)):
            if t in self.thresholds:
                out[key] = stats["accuracy"][self.thresholds.index(t)]
        count = int(self.ap_image_count)
        out["ap_per_image"] = float(self.ap_image_sum) / count if count else math.nan
        out["n_true"], out["n_pred"], out["num_images"] = int(self.n_true), int(self.n_pred), int(self.num_images)
        return out
