"""Streaming panoptic quality (PQ, SQ, RQ) for panoptic segmentation.

Definitions (Kirillov et al., "Panoptic Segmentation", CVPR 2019): per category, a predicted segment ``p`` and a
ground-truth segment ``g`` of the same category are matched when ``IoU(p, g) > 0.5``; with non-overlapping segments
this makes the matching unique. Matched pairs are true positives (TP), unmatched predicted segments false positives
(FP), unmatched ground-truth segments false negatives (FN), and

* ``SQ = sum of matched IoUs / TP`` (segmentation quality),
* ``RQ = TP / (TP + FP / 2 + FN / 2)`` (recognition quality),
* ``PQ = SQ * RQ = sum of matched IoUs / (TP + FP / 2 + FN / 2)``.

TP / FP / FN counts (exact, int64) and IoU sums (float64) are accumulated per category over the whole dataset, and
the metrics are computed from the totals at the end, as the COCO panopticapi (``pq_compute``) does; averaging
per-image PQ values would be a different (and non-standard) number. ``pq`` / ``sq`` / ``rq`` are plain means over
the categories that occur, split as ``*_things`` and ``*_stuff`` too.

Each image is matched with a single ``torch.bincount`` over the combined ``gt_index * (P + 1) + pred_index`` pair
indices (int64), which yields every segment area and every pairwise intersection at once; the matching, FP and FN
rules are then vectorised over the (few) non-empty intersections. The ``IoU > 0.5`` test is done exactly in
integers (``2 * intersection > union``), so a pair with IoU of exactly 0.5 is never matched.

Two input forms, accumulated into the same statistics:

* :meth:`PanopticQuality.update` takes torchmetrics-style tensors ``(B, *spatial, 2)`` holding
  ``(category_id, instance_id)`` per pixel and follows ``torchmetrics.detection.PanopticQuality``: the instance id of
  a stuff category is ignored (one segment per stuff category per image); a target category outside
  ``things | stuffs`` is void; in the prediction such a category raises unless ``allow_unknown_pred=True`` or it is
  ``void_label``, and is then void. As in torchmetrics, void is symmetric here: the IoU union leaves out the
  predicted pixels that fall on target void *and* the target pixels that are predicted void, and a target segment
  more than half of which is predicted void is not a false negative.
* :meth:`PanopticQuality.update_segments` takes COCO-panoptic id maps (``0`` = void) with ``segments_info`` lists of
  ``{"id", "category_id", "isthing"?, "score"?, "iscrowd"?}`` and follows panopticapi's ``pq_compute_single_core``:
  ``IoU = |p & g| / (|p| + |g| - |p & g| - |p & void_gt|)`` (only ground-truth void is removed); ground-truth
  segments with ``iscrowd`` are never matched and never false negatives; an unmatched predicted segment is not a
  false positive when more than half of it lies on ground-truth void plus the crowd region(s) of its own category.

The two forms give identical results whenever the prediction has no void pixels, the ground truth has no crowd
regions and each stuff category has at most one segment per image.

Absent categories (how :meth:`PanopticQuality.compute` treats category ``c`` with ``n_c = TP + FP + FN``):

* ``n_c = 0`` (never in the ground truth nor in the prediction, or only as ignored crowd / void-covered segments):
  PQ, SQ and RQ are undefined, reported as ``NaN`` in ``per_class`` and left out of every mean (panopticapi and
  torchmetrics skip these categories too, but report 0.0 for them per class).
* ``n_c > 0`` but ``TP = 0`` (only false positives and/or false negatives): ``PQ = RQ = 0`` and ``SQ = 0`` by the
  panopticapi / torchmetrics convention (strictly, a mean IoU over no matches is undefined), and the category
  counts in all means, so ``pq``, ``sq`` and ``rq`` equal the reference numbers.
* With no category counted at all (nothing updated, or only void), every mean is ``NaN``; ``NaN`` values are plain
  Python floats.

Differences from the references, all on malformed or unusual inputs:

* Segment areas come from the id maps, not from a JSON ``area`` field (the two agree for COCO data).
* A ground-truth segment listed in ``segments_info`` but absent from the map (e.g. after cropping) has no pixels
  and is skipped; panopticapi would count it as a false negative using its JSON area. A predicted segment listed but
  absent raises, as in panopticapi.
* A non-zero id in either map that is not listed in its ``segments_info``, or a listed segment with an unknown
  category, raises ``ValueError`` (panopticapi raises ``KeyError`` for predictions and silently keeps such
  ground-truth regions as unmatched non-void pixels).
* Several crowd segments of one category in one image all count as that category's crowd region; panopticapi only
  keeps the last one listed (COCO has at most one per category and image).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from maskworks.metrics.confusion import _as_tensor, _list_values

__all__ = ["PanopticQuality"]

_DENSE_LIMIT = 1 << 16  # joint (gt, pred) histograms up to this size (or 4x the pixel count) use a dense bincount


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _parse_categories(values: Any, name: str) -> set[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Collection):
        raise ValueError(f"{name} must be a collection of int category ids, got {values!r}")
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise ValueError(f"{name} must hold int category ids, got non-int values {bad[:10]!r}")
    return {int(v) for v in values}


def _integer_tensor(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {t.dtype}")
    return t


class PanopticQuality:
    """Streaming panoptic quality over things and stuff categories (see the module docstring for the rules).

    Args:
        things: category ids of countable "thing" classes (segments are instances).
        stuffs: category ids of amorphous "stuff" classes. ``things`` and ``stuffs`` must be disjoint and not both
            empty.
        allow_unknown_pred: if ``True``, predicted pixels (tensor form) or predicted segments (COCO form) whose
            category is outside ``things | stuffs`` are treated as void instead of raising ``ValueError`` (the
            torchmetrics ``allow_unknown_preds_category`` option). Ground-truth categories outside the two sets are
            always void in the tensor form and always an error in the COCO form.
        void_label: optional category id that marks void pixels in the tensor form (prediction and target) and is
            accepted even when ``allow_unknown_pred`` is ``False``; must not be a thing or stuff id.
        class_names: optional names, either a mapping ``{category_id: name}`` covering every category or a sequence
            in the order of ``compute()["categories"]`` (sorted things, then sorted stuffs).

    Example:
        >>> pq = PanopticQuality(things={1}, stuffs={2})
        >>> x = torch.tensor([[[[1, 5], [2, 0]], [[1, 5], [2, 0]]]])  # (B=1, H=2, W=2, 2)
        >>> pq.update(x, x)
        >>> pq.compute()["pq"]
        1.0
    """

    def __init__(
        self,
        things: Collection[int],
        stuffs: Collection[int],
        *,
        allow_unknown_pred: bool = False,
        void_label: int | None = None,
        class_names: Mapping[int, str] | Sequence[str] | None = None,
    ) -> None:
        things_set = _parse_categories(things, "things")
        stuffs_set = _parse_categories(stuffs, "stuffs")
        if things_set & stuffs_set:
            raise ValueError(f"things and stuffs must be disjoint, both contain {sorted(things_set & stuffs_set)}")
        if not (things_set or stuffs_set):
            raise ValueError("at least one of things and stuffs must be non-empty")
        if void_label is not None:
            if not _is_int(void_label):
                raise ValueError(f"void_label must be an int or None, got {void_label!r}")
            if int(void_label) in things_set | stuffs_set:
                raise ValueError(f"void_label={void_label} is also a thing/stuff category id")
        self.things = things_set
        self.stuffs = stuffs_set
        self.allow_unknown_pred = bool(allow_unknown_pred)
        self.void_label = None if void_label is None else int(void_label)
        # contiguous index: sorted things first, then sorted stuffs (torchmetrics' per-class order)
        self.categories: list[int] = sorted(things_set) + sorted(stuffs_set)
        self._index = {c: i for i, c in enumerate(self.categories)}
        self._isthing = torch.tensor([c in things_set for c in self.categories], dtype=torch.bool)
        order = sorted(range(len(self.categories)), key=lambda i: self.categories[i])
        self._sorted_ids = torch.tensor([self.categories[i] for i in order], dtype=torch.int64)
        self._sorted_to_index = torch.tensor(order, dtype=torch.int64)
        self.class_names = self._parse_class_names(class_names)
        k = len(self.categories)
        self.tp = torch.zeros(k, dtype=torch.int64)
        self.fp = torch.zeros(k, dtype=torch.int64)
        self.fn = torch.zeros(k, dtype=torch.int64)
        self.iou_sum = torch.zeros(k, dtype=torch.float64)
        self.num_images = 0

    def _parse_class_names(self, class_names: Any) -> list[str] | None:
        if class_names is None:
            return None
        k = len(self.categories)
        if isinstance(class_names, Mapping):
            missing = [c for c in self.categories if c not in class_names]
            if missing:
                raise ValueError(f"class_names mapping lacks names for category ids {missing[:10]}")
            return [str(class_names[c]) for c in self.categories]
        if isinstance(class_names, str) or not isinstance(class_names, Sequence):
            raise ValueError(f"class_names must be a mapping {{category_id: name}} or a sequence of {k} names")
        if len(class_names) != k:
            raise ValueError(
                f"class_names has {len(class_names)} entries, expected {k} (sorted things, then sorted stuffs: "
                f"{self.categories})"
            )
        return [str(n) for n in class_names]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(things={sorted(self.things)}, stuffs={sorted(self.stuffs)}, "
            f"num_images={self.num_images})"
        )

    # ------------------------------------------------------------------ tensor form (torchmetrics)
    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch of ``(category_id, instance_id)`` maps (torchmetrics semantics).

        Args:
            pred: integer tensor / array ``(B, *spatial, 2)``, e.g. ``(B, H, W, 2)``; ``[..., 0]`` is the category id,
                ``[..., 1]`` the instance id (ignored for stuff categories).
            target: same shape and layout; categories outside ``things | stuffs`` are void.

        Raises:
            ValueError: on mismatched shapes, fewer than 3 dimensions, a last dimension other than 2, or predicted
                categories outside ``things | stuffs`` (other than ``void_label``) when ``allow_unknown_pred`` is
                ``False``.
            TypeError: on non-integer inputs.
        """
        pred = _integer_tensor(pred, "pred")
        target = _integer_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
        if pred.ndim < 3 or pred.shape[-1] != 2:
            raise ValueError(
                "pred and target must be (B, *spatial, 2) holding (category_id, instance_id) per pixel, e.g. "
                f"(B, H, W, 2); got shape {tuple(pred.shape)}"
            )
        pred = pred.to(target.device)
        b = pred.shape[0]
        pred = pred.reshape(b, -1, 2).to(torch.int64)
        target = target.reshape(b, -1, 2).to(torch.int64)
        sorted_ids = self._sorted_ids.to(target.device)
        sorted_to_index = self._sorted_to_index.to(target.device)
        isthing = self._isthing.to(target.device)
        p_cat, p_known = self._category_index(pred[..., 0], sorted_ids, sorted_to_index)
        t_cat, t_known = self._category_index(target[..., 0], sorted_ids, sorted_to_index)
        if not self.allow_unknown_pred:
            bad = ~p_known
            if self.void_label is not None:
                bad &= pred[..., 0] != self.void_label
            if bool(bad.any()):
                raise ValueError(
                    f"pred holds category ids outside things={sorted(self.things)} | stuffs={sorted(self.stuffs)}: "
                    f"{_list_values(pred[..., 0][bad])}; pass allow_unknown_pred=True (or void_label=...) to treat "
                    "them as void"
                )
        stats = self._zeros(target.device)
        for i in range(b):
            p_idx, p_seg_cat = self._pair_segments(p_cat[i], pred[i, :, 1], p_known[i], isthing)
            t_idx, t_seg_cat = self._pair_segments(t_cat[i], target[i, :, 1], t_known[i], isthing)
            crowd = torch.zeros_like(t_seg_cat, dtype=torch.bool)
            self._match(stats, t_idx, p_idx, t_seg_cat, crowd, p_seg_cat, symmetric_void=True)
        self._add(stats, b)

    @staticmethod
    def _category_index(
        cat: torch.Tensor, sorted_ids: torch.Tensor, sorted_to_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous category index per pixel (``-1`` for unknown) and the known-category mask."""
        pos = torch.searchsorted(sorted_ids, cat.contiguous()).clamp_(max=sorted_ids.numel() - 1)
        known = sorted_ids[pos] == cat
        return torch.where(known, sorted_to_index[pos], torch.full_like(cat, -1)), known

    @staticmethod
    def _pair_segments(
        cat: torch.Tensor, inst: torch.Tensor, known: torch.Tensor, isthing: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment index per pixel (0 = void, segments 1..S) and the category index of each segment (``-1`` at 0)."""
        inst = torch.where(known & isthing[cat.clamp(min=0)], inst, torch.zeros_like(inst))  # stuff: one segment
        if not bool(known.any()):
            return torch.zeros_like(cat), torch.full((1,), -1, dtype=torch.int64, device=cat.device)
        lo, hi = int(inst[known].min()), int(inst[known].max())
        span = hi - lo + 1
        if (int(isthing.numel()) + 1) * span < (1 << 62):
            key = torch.where(known, cat * span + (inst - lo), torch.full_like(cat, -1))
            uniq, inv = torch.unique(key, return_inverse=True)
            seg_cat = torch.div(uniq, span, rounding_mode="floor")
        else:  # instance ids too spread out to pack with the category into one int64
            pairs = torch.stack([cat, torch.where(known, inst, torch.full_like(inst, torch.iinfo(torch.int64).min))], 1)
            uniq_pairs, inv = torch.unique(pairs, dim=0, return_inverse=True)
            seg_cat = uniq_pairs[:, 0]
        if bool(seg_cat[0] < 0):  # void present: it sorts first and becomes index 0
            return inv, seg_cat
        return inv + 1, torch.cat([seg_cat.new_full((1,), -1), seg_cat])

    # ------------------------------------------------------------------ COCO form (panopticapi)
    @torch.no_grad()
    def update_segments(
        self,
        pred_map: torch.Tensor | np.ndarray,
        pred_segments: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        gt_map: torch.Tensor | np.ndarray,
        gt_segments: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
    ) -> None:
        """Add COCO-panoptic predictions and ground truth (panopticapi semantics, including crowd regions).

        Args:
            pred_map: integer segment-id map ``(H, W)`` (0 = void), or ``(B, H, W)`` for a batch.
            pred_segments: the prediction's ``segments_info``: dicts with ``id`` and ``category_id`` (``isthing``,
                if present, must agree with ``things``; ``score`` and other keys are ignored); for a batch, one such
                list per image.
            gt_map: ground-truth id map, same shape as ``pred_map`` (0 = void).
            gt_segments: the ground truth's ``segments_info``, like ``pred_segments`` plus an optional ``iscrowd``.

        Raises:
            ValueError: on mismatched shapes, negative ids, a non-zero id in a map that is not in its
                ``segments_info``, duplicate or zero segment ids, unknown categories (predicted ones are void instead
                with ``allow_unknown_pred=True``), an ``isthing`` flag that contradicts ``things``, or a predicted
                segment listed but absent from ``pred_map``.
            TypeError: on non-integer maps or segment lists of the wrong type.
        """
        pred_map = _integer_tensor(pred_map, "pred_map")
        gt_map = _integer_tensor(gt_map, "gt_map")
        if pred_map.shape != gt_map.shape:
            raise ValueError(
                f"pred_map and gt_map shapes differ: pred_map {tuple(pred_map.shape)} vs gt_map {tuple(gt_map.shape)}"
            )
        if pred_map.ndim == 2:
            pred_map, gt_map = pred_map[None], gt_map[None]
            pred_segments, gt_segments = [pred_segments], [gt_segments]  # type: ignore[list-item]
        elif pred_map.ndim != 3:
            raise ValueError(f"pred_map and gt_map must be (H, W) or (B, H, W) id maps, got {tuple(pred_map.shape)}")
        b = pred_map.shape[0]
        for name, segs in (("pred_segments", pred_segments), ("gt_segments", gt_segments)):
            if isinstance(segs, (str, bytes, Mapping)) or not isinstance(segs, Sequence) or len(segs) != b:
                raise ValueError(
                    f"{name} must be a list of segment dicts for an (H, W) map, or a list of {b} such lists for a "
                    f"(B, H, W) batch; got {type(segs).__name__}"
                    + (f" of length {len(segs)}" if isinstance(segs, Sequence) else "")
                )
        pred_map = pred_map.to(gt_map.device).reshape(b, -1).to(torch.int64)
        gt_map = gt_map.reshape(b, -1).to(torch.int64)
        for name, m in (("pred_map", pred_map), ("gt_map", gt_map)):
            if m.numel() and bool((m < 0).any()):
                raise ValueError(f"{name} holds negative segment ids: {_list_values(m[m < 0])}")
        parsed = [
            (
                self._parse_segments(pred_segments[i], "pred_segments", is_gt=False),
                self._parse_segments(gt_segments[i], "gt_segments", is_gt=True),
            )
            for i in range(b)
        ]
        stats = self._zeros(gt_map.device)
        for i, (p_info, g_info) in enumerate(parsed):
            where = f" (image {i} of the batch)" if b > 1 else ""
            p_idx, p_cat, _ = self._id_segments(pred_map[i], p_info, "pred", where)
            g_idx, g_cat, g_crowd = self._id_segments(gt_map[i], g_info, "gt", where)
            self._match(stats, g_idx, p_idx, g_cat, g_crowd, p_cat, symmetric_void=False)
        self._add(stats, b)

    def _parse_segments(self, segments: Any, name: str, is_gt: bool) -> dict[int, tuple[int, bool]]:
        """``{segment id: (category index or -1 for void, iscrowd)}`` after validating ``segments_info``."""
        if isinstance(segments, (str, bytes, Mapping)) or not isinstance(segments, Sequence):
            raise TypeError(f"{name} must be a list of segment dicts, got {type(segments).__name__}")
        out: dict[int, tuple[int, bool]] = {}
        for s in segments:
            if not isinstance(s, Mapping) or "id" not in s or "category_id" not in s:
                raise ValueError(f"each entry of {name} must be a dict with 'id' and 'category_id', got {s!r}")
            sid, cat = s["id"], s["category_id"]
            if not _is_int(sid) or int(sid) <= 0:
                raise ValueError(f"{name}: segment id must be a positive int (0 is void), got {sid!r}")
            sid = int(sid)
            if sid in out:
                raise ValueError(f"{name}: duplicate segment id {sid}")
            if not _is_int(cat):
                raise ValueError(f"{name}: segment {sid} has a non-int category_id {cat!r}")
            idx = self._index.get(int(cat), -1)
            if idx < 0 and (is_gt or not self.allow_unknown_pred):
                hint = "" if is_gt else "; pass allow_unknown_pred=True to treat such segments as void"
                raise ValueError(
                    f"{name}: segment {sid} has category_id {cat}, not in things={sorted(self.things)} | "
                    f"stuffs={sorted(self.stuffs)}{hint}"
                )
            if (
                idx >= 0
                and "isthing" in s
                and s["isthing"] is not None
                and bool(s["isthing"]) != bool(self._isthing[idx])
            ):
                raise ValueError(
                    f"{name}: segment {sid} of category {cat} has isthing={s['isthing']!r}, but category {cat} is "
                    f"a {'thing' if bool(self._isthing[idx]) else 'stuff'} category"
                )
            crowd = bool(s.get("iscrowd", 0)) if is_gt else False
            out[sid] = (idx, crowd)
        return out

    @staticmethod
    def _id_segments(
        ids: torch.Tensor, info: dict[int, tuple[int, bool]], side: str, where: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment index per pixel (0 = void), category index per segment (-1 at 0), crowd flag per segment."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        present = uniq.tolist()
        has_void = bool(present) and present[0] == 0
        seg_ids = present[1:] if has_void else present
        missing = [i for i in seg_ids if i not in info]
        if missing:
            more = f" ... ({len(missing)} in all)" if len(missing) > 10 else ""
            raise ValueError(f"{side}_map{where} holds segment ids not listed in {side}_segments: {missing[:10]}{more}")
        if side == "pred":
            absent = sorted(set(info) - set(seg_ids))
            if absent:
                raise ValueError(
                    f"pred_segments{where} lists segment ids absent from pred_map: {absent[:10]} (every predicted "
                    "segment must cover at least one pixel)"
                )
        # segments of unknown category (allowed in predictions with allow_unknown_pred) become void (index 0)
        kept = [i for i in seg_ids if info[i][0] >= 0]
        new_index = {sid: j + 1 for j, sid in enumerate(kept)}
        lut = [0] * has_void + [new_index.get(i, 0) for i in seg_ids]  # indexed like torch.unique's output
        idx = torch.tensor(lut, dtype=torch.int64, device=ids.device)[inv]
        cats = [-1] + [info[i][0] for i in kept]
        crowd = [False] + [info[i][1] for i in kept]
        return (
            idx,
            torch.tensor(cats, dtype=torch.int64, device=ids.device),
            torch.tensor(crowd, dtype=torch.bool, device=ids.device),
        )

    # ------------------------------------------------------------------ matching core
    def _zeros(self, device: torch.device) -> dict[str, torch.Tensor]:
        k = len(self.categories)
        return {
            "tp": torch.zeros(k, dtype=torch.int64, device=device),
            "fp": torch.zeros(k, dtype=torch.int64, device=device),
            "fn": torch.zeros(k, dtype=torch.int64, device=device),
            "iou_sum": torch.zeros(k, dtype=torch.float64, device=device),
        }

    def _add(self, stats: dict[str, torch.Tensor], num_images: int) -> None:
        self.tp += stats["tp"].cpu()
        self.fp += stats["fp"].cpu()
        self.fn += stats["fn"].cpu()
        self.iou_sum += stats["iou_sum"].cpu()
        self.num_images += int(num_images)

    @staticmethod
    def _match(
        stats: dict[str, torch.Tensor],
        gt_idx: torch.Tensor,
        pred_idx: torch.Tensor,
        gt_cat: torch.Tensor,
        gt_crowd: torch.Tensor,
        pred_cat: torch.Tensor,
        symmetric_void: bool,
    ) -> None:
        """Match one image's segments and add its per-category TP / FP / FN / IoU sums to ``stats``.

        ``gt_idx`` / ``pred_idx``: flat int64 segment indices (0 = void, 1..G / 1..P); ``gt_cat`` / ``pred_cat``:
        contiguous category index per segment (``-1`` for void at 0); ``gt_crowd``: crowd flag per ground-truth segment.
        """
        k = stats["tp"].numel()
        g1, p1 = gt_cat.numel(), pred_cat.numel()
        n = gt_idx.numel()
        pair = gt_idx * p1 + pred_idx  # int64: no overflow for any realistic image
        if g1 * p1 <= max(4 * n, _DENSE_LIMIT):
            joint = torch.bincount(pair, minlength=g1 * p1)
            nz = joint.nonzero().squeeze(1)
            inter = joint[nz]
        else:  # very many segments: histogram only the pairs that occur
            nz, inter = torch.unique(pair, return_counts=True)
        g, p = torch.div(nz, p1, rounding_mode="floor"), nz % p1
        gt_area = torch.bincount(gt_idx, minlength=g1)
        pred_area = torch.bincount(pred_idx, minlength=p1)
        on_gt_void, on_pred_void = g == 0, p == 0
        pred_void = torch.zeros(p1, dtype=torch.int64, device=nz.device).index_add_(
            0, p[on_gt_void], inter[on_gt_void]
        )  # pixels of each predicted segment on ground-truth void
        gt_void = torch.zeros(g1, dtype=torch.int64, device=nz.device).index_add_(
            0, g[on_pred_void], inter[on_pred_void]
        )  # pixels of each ground-truth segment predicted void
        same = ~on_gt_void & ~on_pred_void & (gt_cat[g] == pred_cat[p])
        crowd_pair = same & gt_crowd[g]
        cand = same & ~gt_crowd[g]
        gc, pc, ic = g[cand], p[cand], inter[cand]
        union = pred_area[pc] + gt_area[gc] - ic - pred_void[pc]
        if symmetric_void:
            union = union - gt_void[gc]
        hit = 2 * ic > union  # IoU > 0.5, exactly
        gm, pm = gc[hit], pc[hit]
        cats = gt_cat[gm]
        stats["tp"] += torch.bincount(cats, minlength=k)
        stats["iou_sum"].index_add_(0, cats, ic[hit].double() / union[hit].double())
        gt_matched = torch.zeros(g1, dtype=torch.bool, device=nz.device)
        gt_matched[gm] = True
        pred_matched = torch.zeros(p1, dtype=torch.bool, device=nz.device)
        pred_matched[pm] = True
        # false negatives: unmatched, non-crowd ground-truth segments
        fn = ~gt_matched & ~gt_crowd & (gt_area > 0)
        if symmetric_void:
            fn &= 2 * gt_void <= gt_area
        fn[0] = False
        stats["fn"] += torch.bincount(gt_cat[fn], minlength=k)
        # false positives: unmatched predicted segments not mostly on void + same-category crowd
        ignored = pred_void.index_add(0, p[crowd_pair], inter[crowd_pair])
        fp = ~pred_matched & (pred_area > 0) & (2 * ignored <= pred_area)
        fp[0] = False
        stats["fp"] += torch.bincount(pred_cat[fp], minlength=k)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Zero all counts."""
        self.tp.zero_()
        self.fp.zero_()
        self.fn.zero_()
        self.iou_sum.zero_()
        self.num_images = 0

    def merge(self, other: PanopticQuality) -> PanopticQuality:
        """Add another metric's counts into this one (e.g. from another worker) and return ``self``.

        Raises:
            ValueError: if ``other`` has different things / stuffs categories.
        """
        if not isinstance(other, PanopticQuality):
            raise TypeError(f"can only merge another PanopticQuality, got {type(other).__name__}")
        if other.things != self.things or other.stuffs != self.stuffs:
            raise ValueError(
                f"cannot merge PanopticQuality(things={sorted(other.things)}, stuffs={sorted(other.stuffs)}) into "
                f"things={sorted(self.things)}, stuffs={sorted(self.stuffs)}"
            )
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        self.num_images += other.num_images
        return self

    # ------------------------------------------------------------------ metrics
    def compute(self) -> dict[str, Any]:
        """PQ / SQ / RQ from the accumulated counts (see the module docstring for absent categories).

        Returns:
            Dict of plain Python numbers / lists (``NaN`` marks undefined values): ``pq``, ``sq``, ``rq`` (means over
            the ``n`` categories with ``TP + FP + FN > 0``); ``pq_things``, ``sq_things``, ``rq_things``, ``n_things``
            and ``pq_stuff``, ``sq_stuff``, ``rq_stuff``, ``n_stuff`` (the same over thing / stuff categories);
            ``per_class``: dict of lists ``pq``, ``sq``, ``rq`` (floats), ``tp``, ``fp``, ``fn`` (ints), in the order
            of ``categories`` (sorted things, then sorted stuffs); ``categories``, ``isthing`` (per-class bools);
            total ``tp``, ``fp``, ``fn``; ``num_images``; and ``class_names`` when given.
        """
        tp = self.tp.double()
        den = tp + 0.5 * (self.fp + self.fn).double()
        counted = den > 0
        nan = torch.full_like(tp, math.nan)
        safe_den = torch.where(counted, den, torch.ones_like(den))
        pq = torch.where(counted, self.iou_sum / safe_den, nan)
        rq = torch.where(counted, tp / safe_den, nan)
        sq = torch.where(counted, torch.where(tp > 0, self.iou_sum / tp.clamp(min=1), torch.zeros_like(tp)), nan)

        def mean(x: torch.Tensor, keep: torch.Tensor) -> float:
            return float(x[keep].mean()) if bool(keep.any()) else math.nan

        out: dict[str, Any] = {}
        for suffix, sel in (("", torch.ones_like(counted)), ("_things", self._isthing), ("_stuff", ~self._isthing)):
            keep = counted & sel
            out[f"pq{suffix}"] = mean(pq, keep)
            out[f"sq{suffix}"] = mean(sq, keep)
            out[f"rq{suffix}"] = mean(rq, keep)
            out[f"n{suffix}"] = int(keep.sum())
        out["per_class"] = {
            "pq": pq.tolist(),
            "sq": sq.tolist(),
            "rq": rq.tolist(),
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
        }
        out["categories"] = list(self.categories)
        out["isthing"] = self._isthing.tolist()
        out["tp"], out["fp"], out["fn"] = int(self.tp.sum()), int(self.fp.sum()), int(self.fn.sum())
        out["num_images"] = self.num_images
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out
