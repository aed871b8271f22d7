"""COCO mask (and box) average precision for instance segmentation, evaluated with pycocotools.

:class:`MaskAP` collects per-image instance predictions and targets in the torchvision detection format and, on
:meth:`MaskAP.compute`, runs the reference ``COCOeval`` on them (Lin et al., "Microsoft COCO: Common Objects in
Context", ECCV 2014; the metric definitions are those of http://cocodataset.org/#detection-eval). Results use the
key names of torchmetrics' ``MeanAveragePrecision`` (``map``, ``map_50``, ``map_75``, ``map_small`` ...,
``mar_1``, ``mar_10``, ``mar_100`` ..., ``map_per_class``, ``classes``).

Masks are run-length encoded (``pycocotools.mask.encode``) as soon as they are passed to :meth:`MaskAP.update`, so
only the RLE strings are kept between batches, not the dense ``(N, H, W)`` masks. Images may have different sizes.

Inputs, one dict per image (tensors or numpy arrays, any device):

* predictions: ``masks (N, H, W)`` bool (or 0/1 integer) at the original image size, ``scores (N,)``,
  ``labels (N,)`` integer class ids and, optionally, ``boxes (N, 4)`` xyxy in pixels;
* targets: ``masks (N, H, W)``, ``labels (N,)`` and optionally ``iscrowd (N,)`` (0/1, default 0), ``area (N,)``
  (default: the mask area in pixels) and ``boxes (N, 4)`` xyxy.

For ``iou_type="bbox"`` boxes that are not given are taken from the masks as the tight box around the mask's
pixels in continuous coordinates (pixel ``i`` covers ``[i, i + 1)``, so a mask spanning columns 2..5 gets
``x1 = 2, x2 = 6``), as COCO's own annotations do (``pycocotools.mask.toBbox``). With a bbox-only metric the
masks may be left out when boxes are given. For the detections of the segm evaluation the area used for the
small / medium / large ranges is the mask area; for the bbox evaluation it is the box area (``w * h``), as
``COCO.loadRes`` sets them; the target area is shared by both.

Undefined values (``-1`` in ``COCOeval``'s arrays: no target instance of a class, or none in an area range) are
reported as ``NaN``, never ``-1``:

* a class with targets but no (matching) predictions has AP = AR = 0;
* a class that is only predicted (no target instance anywhere) has AP = AR = ``NaN`` and is left out of ``map``,
  as COCO does; its false positives are not penalised anywhere. Predictions on images without any target do count
  as false positives for classes that have targets elsewhere;
* with no target instances at all (or nothing updated) every value is ``NaN``; with targets but no predictions
  every defined value is 0.

Crowd targets (``iscrowd=1``) are matched with COCO's crowd rule (IoU = intersection / prediction area) and
predictions matched to them are ignored rather than counted as true or false positives.

``COCOeval.summarize`` assumes exactly three ``maxDets``; the summary here is computed from ``COCOeval``'s
accumulated ``precision`` / ``recall`` arrays with the same averaging, so any increasing ``max_dets`` works. All AP
values (``map`` and per-area, per-class) use the largest ``max_dets``. With the default ``(1, 10, 100)`` the
twelve values equal ``COCOeval.stats`` exactly. That includes pycocotools' ``tp / (tp + fp + eps)`` precision, so
a perfect score on very few instances can read ``0.9999999999999998`` rather than ``1.0``: compare with a tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["MaskAP"]

log = logging.getLogger(__name__)

_IOU_TYPES = ("segm", "bbox")
_AREAS = ("small", "medium", "large")


def _import_pycocotools() -> tuple[Any, Any, Any]:
    """``(COCO, COCOeval, pycocotools.mask)``, or an ImportError saying how to install them."""
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'MaskAP needs pycocotools: pip install "maskworks[coco]" (or pip install pycocotools)'
        ) from err
    return COCO, COCOeval, mask_utils


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _shape(a: np.ndarray) -> str:
    return str(tuple(a.shape))


class _Image:
    """What is kept of one image: RLE masks and small per-instance arrays."""

    __slots__ = (
        "height",
        "width",
        "gt_labels",
        "gt_rles",
        "gt_boxes",
        "gt_area",
        "gt_crowd",
        "dt_labels",
        "dt_scores",
        "dt_rles",
        "dt_boxes",
    )

    def __init__(self) -> None:
        self.height = self.width = 0
        self.gt_labels: list[int] = []
        self.gt_rles: list[dict] | None = None
        self.gt_boxes: list[list[float]] | None = None  # xywh
        self.gt_area: list[float] = []
        self.gt_crowd: list[int] = []
        self.dt_labels: list[int] = []
        self.dt_scores: list[float] = []
        self.dt_rles: list[dict] | None = None
        self.dt_boxes: list[list[float]] | None = None  # xywh


class MaskAP:
    """COCO average precision / recall of instance masks (``"segm"``), boxes (``"bbox"``) or both.

    Args:
        iou_type: ``"segm"`` (mask IoU, the default), ``"bbox"`` (box IoU), or a sequence of both, e.g.
            ``("bbox", "segm")``. With more than one type every result key is prefixed with the type
            (``segm_map``, ``bbox_map`` ...), as torchmetrics does; ``classes`` is shared.
        class_names: optional names of the class ids, either a sequence indexed by the label or a mapping
            ``{label: name}``. :meth:`compute` then also returns ``class_names`` aligned with ``classes``, and
            labels without a name are rejected by :meth:`update`.
        max_dets: increasing limits on the number of detections per image (``COCOeval.params.maxDets``); one
            ``mar_<d>`` result per entry, and AP uses the last one.
        verbose: let pycocotools print its progress messages and log the usual COCO summary table (logger
            ``maskworks.metrics.coco``, level INFO) during :meth:`compute`.

    Raises:
        ImportError: if pycocotools is not installed (``pip install "maskworks[coco]"``).

    Example:
        >>> m = MaskAP()
        >>> mask = torch.zeros(1, 8, 8, dtype=torch.bool)
        >>> mask[0, 2:6, 2:6] = True
        >>> m.update([{"masks": mask, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}],
        ...          [{"masks": mask, "labels": torch.tensor([1])}])
        >>> round(m.compute()["map"], 6)
        1.0
    """

    def __init__(
        self,
        iou_type: str | Sequence[str] = "segm",
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        max_dets: Sequence[int] = (1, 10, 100),
        verbose: bool = False,
    ) -> None:
        self._COCO, self._COCOeval, self._mask_utils = _import_pycocotools()
        types = (iou_type,) if isinstance(iou_type, str) else tuple(iou_type)
        if not types or any(t not in _IOU_TYPES for t in types) or len(set(types)) != len(types):
            raise ValueError(f"iou_type must be 'segm', 'bbox' or a sequence of distinct ones, got {iou_type!r}")
        self.iou_types: tuple[str, ...] = types
        dets = list(max_dets) if isinstance(max_dets, Sequence) and not isinstance(max_dets, str) else None
        if (
            not dets
            or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dets)
            or any(a >= b for a, b in zip(dets, dets[1:]))
        ):
            raise ValueError(f"max_dets must be a non-empty increasing sequence of positive ints, got {max_dets!r}")
        self.max_dets: tuple[int, ...] = tuple(int(d) for d in dets)
        if class_names is None:
            self.class_names: dict[int, str] | None = None
        elif isinstance(class_names, Mapping):
            self.class_names = {int(k): str(v) for k, v in class_names.items()}
        elif isinstance(class_names, Sequence) and not isinstance(class_names, str):
            self.class_names = {i: str(n) for i, n in enumerate(class_names)}
        else:
            raise TypeError(f"class_names must be a sequence or a mapping of names, got {type(class_names).__name__}")
        self.verbose = bool(verbose)
        self._images: list[_Image] = []

    def __repr__(self) -> str:
        types = self.iou_types[0] if len(self.iou_types) == 1 else self.iou_types
        return f"{type(self).__name__}(iou_type={types!r}, max_dets={self.max_dets}, num_images={len(self._images)})"

    def __len__(self) -> int:
        """Number of images seen since the last :meth:`reset`."""
        return len(self._images)

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add a batch of images: ``preds[i]`` and ``targets[i]`` describe the same image.

        Masks are RLE-encoded here, so the dense masks are not kept. An image without predictions (or without
        targets) is a dict whose arrays have 0 rows (``masks`` may then be left out).

        Raises:
            ValueError: if ``preds`` and ``targets`` differ in length, a required key is missing, an array has the
                wrong shape (``masks`` not ``(N, H, W)`` with ``N = len(labels)``, ``boxes`` not ``(N, 4)``, ...),
                prediction and target masks of one image differ in size, ``scores`` / ``boxes`` / ``area`` hold
                NaN or inf (a NaN score would sort arbitrarily in the ranking), or a label has no name in
                ``class_names``.
            TypeError: on non-dict items, non-integer labels, float masks or unsupported array types.
        """
        for name, seq in (("preds", preds), ("targets", targets)):
            if isinstance(seq, Mapping) or not isinstance(seq, Sequence):
                raise TypeError(f"{name} must be a list of dicts (one per image), got {type(seq).__name__}")
        if len(preds) != len(targets):
            raise ValueError(
                f"preds and targets must have one dict per image each, got {len(preds)} preds and "
                f"{len(targets)} targets"
            )
        images = [self._parse(p, t, i) for i, (p, t) in enumerate(zip(preds, targets))]
        self._images.extend(images)  # only after the whole batch validated

    def _parse(self, pred: Mapping[str, Any], target: Mapping[str, Any], i: int) -> _Image:
        for name, item in (("preds", pred), ("targets", target)):
            if not isinstance(item, Mapping):
                raise TypeError(f"{name}[{i}] must be a dict, got {type(item).__name__}")
        need_masks = "segm" in self.iou_types
        need_boxes = "bbox" in self.iou_types
        img = _Image()
        sizes: dict[str, tuple[int, int]] = {}

        # ---- targets
        where = f"targets[{i}]"
        labels = self._labels(target, where)
        n = len(labels)
        masks = self._masks(target, where, n, required=need_masks or "boxes" not in target)
        boxes = self._boxes(target, where, n) if need_boxes else None
        crowd = self._vector(target, "iscrowd", where, n)
        area = self._vector(target, "area", where, n)
        rles = self._encode(masks)
        if masks is not None:
            sizes["targets"] = masks.shape[1:]
        img.gt_labels = labels
        img.gt_crowd = [0] * n if crowd is None else [int(c != 0) for c in crowd]
        if need_masks:
            img.gt_rles = rles
        if need_boxes:
            img.gt_boxes = boxes if boxes is not None else self._mask_boxes(rles)
        if area is not None:
            img.gt_area = [float(a) for a in area]
        elif rles is not None:
            img.gt_area = [float(a) for a in self._mask_utils.area(rles)] if n else []
        else:
            img.gt_area = [b[2] * b[3] for b in img.gt_boxes or []]

        # ---- predictions
        where = f"preds[{i}]"
        labels = self._labels(pred, where)
        n = len(labels)
        scores = self._vector(pred, "scores", where, n, required=True)
        masks = self._masks(pred, where, n, required=need_masks or "boxes" not in pred)
        boxes = self._boxes(pred, where, n) if need_boxes else None
        if masks is not None:
            sizes["preds"] = masks.shape[1:]
        if len(sizes) == 2 and sizes["preds"] != sizes["targets"]:
            raise ValueError(
                f"preds[{i}]['masks'] and targets[{i}]['masks'] must have the same image size (H, W), got "
                f"{tuple(sizes['preds'])} and {tuple(sizes['targets'])}"
            )
        rles = self._encode(masks) if need_masks or boxes is None else None
        img.dt_labels = labels
        img.dt_scores = [float(s) for s in scores]
        if need_masks:
            img.dt_rles = rles
        if need_boxes:
            img.dt_boxes = boxes if boxes is not None else self._mask_boxes(rles)
        if sizes:
            img.height, img.width = (int(s) for s in next(iter(sizes.values())))
        return img

    def _labels(self, item: Mapping[str, Any], where: str) -> list[int]:
        if "labels" not in item:
            raise ValueError(f"{where} has no 'labels' (keys: {sorted(item)})")
        labels = _to_numpy(item["labels"], f"{where}['labels']")
        if labels.ndim != 1:
            raise ValueError(f"{where}['labels'] must have shape (N,), got {_shape(labels)}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{where}['labels'] must hold integer class ids, got dtype {labels.dtype}")
        out = labels.astype(np.int64).tolist()
        if self.class_names is not None:
            unnamed = sorted(set(out) - self.class_names.keys())
            if unnamed:
                raise ValueError(f"{where}['labels'] holds labels without a name in class_names: {unnamed[:10]}")
        return out

    @staticmethod
    def _vector(item: Mapping[str, Any], key: str, where: str, n: int, required: bool = False) -> np.ndarray | None:
        if key not in item or item[key] is None:
            if required:
                raise ValueError(f"{where} has no {key!r} (keys: {sorted(item)})")
            return None
        v = _to_numpy(item[key], f"{where}[{key!r}]")
        if v.shape != (n,):
            raise ValueError(f"{where}[{key!r}] must have shape ({n},) to match {where}['labels'], got {_shape(v)}")
        if v.dtype.kind not in "biuf":
            raise TypeError(f"{where}[{key!r}] must be numeric, got dtype {v.dtype}")
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise ValueError(
                f"{where}[{key!r}] holds non-finite values (NaN or inf): {v[~np.isfinite(v)][:10].tolist()}"
            )
        return v

    @staticmethod
    def _masks(item: Mapping[str, Any], where: str, n: int, required: bool) -> np.ndarray | None:
        if item.get("masks") is None:
            if required and n > 0:
                raise ValueError(f"{where} has no 'masks' (keys: {sorted(item)}); expected (N, H, W) with N={n}")
            return None
        masks = _to_numpy(item["masks"], f"{where}['masks']")
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(
                f"{where}['masks'] must have shape (N, H, W) with N={n} (the length of {where}['labels']), "
                f"got {_shape(masks)}"
            )
        if masks.dtype.kind not in "biu" and n > 0:  # empty placeholders of any dtype are fine
            raise TypeError(
                f"{where}['masks'] must be bool (or 0/1 integers), got dtype {masks.dtype}; threshold soft masks "
                "first, e.g. masks > 0.5"
            )
        return masks

    @staticmethod
    def _boxes(item: Mapping[str, Any], where: str, n: int) -> list[list[float]] | None:
        """Given xyxy boxes as COCO xywh lists, or ``None`` when absent."""
        if item.get("boxes") is None:
            return None
        boxes = _to_numpy(item["boxes"], f"{where}['boxes']")
        if boxes.shape != (n, 4):
            raise ValueError(
                f"{where}['boxes'] must have shape (N, 4) xyxy with N={n} (the length of {where}['labels']), "
                f"got {_shape(boxes)}"
            )
        b = boxes.astype(np.float64)
        if not np.isfinite(b).all():
            raise ValueError(f"{where}['boxes'] holds non-finite coordinates (NaN or inf)")
        return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1).tolist()

    def _encode(self, masks: np.ndarray | None) -> list[dict] | None:
        if masks is None:
            return None
        if masks.shape[0] == 0:
            return []
        # (N, H, W) -> Fortran-ordered (H, W, N) uint8, the layout pycocotools.mask.encode expects
        return self._mask_utils.encode(np.asfortranarray((masks != 0).transpose(1, 2, 0), dtype=np.uint8))

    def _mask_boxes(self, rles: list[dict] | None) -> list[list[float]]:
        if not rles:
            return []
        return self._mask_utils.toBbox(rles).astype(np.float64).tolist()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._images = []

    # ------------------------------------------------------------------ evaluation
    def _classes(self) -> list[int]:
        seen: set[int] = set()
        for img in self._images:
            seen.update(img.gt_labels)
            seen.update(img.dt_labels)
        return sorted(seen)

    def _coco_gt(self, classes: list[int]) -> Any:
        images, annotations = [], []
        for image_id, img in enumerate(self._images, start=1):
            images.append({"id": image_id, "height": img.height, "width": img.width})
            for k, label in enumerate(img.gt_labels):
                ann = {
                    "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched": ids start at 1
                    "image_id": image_id,
                    "category_id": label,
                    "area": img.gt_area[k],
                    "iscrowd": img.gt_crowd[k],
                }
                if img.gt_rles is not None:
                    ann["segmentation"] = img.gt_rles[k]
                if img.gt_boxes is not None:
                    ann["bbox"] = img.gt_boxes[k]
                annotations.append(ann)
        names = self.class_names or {}
        gt = self._COCO()
        gt.dataset = {
            "info": {"description": "maskworks MaskAP"},
            "images": images,
            "categories": [{"id": c, "name": names.get(c, str(c))} for c in classes],
            "annotations": annotations,
        }
        gt.createIndex()
        return gt

    def _coco_dt(self, gt: Any, iou_type: str) -> Any:
        dets = []
        for image_id, img in enumerate(self._images, start=1):
            for k, label in enumerate(img.dt_labels):
                det = {"image_id": image_id, "category_id": label, "score": img.dt_scores[k]}
                if iou_type == "segm":
                    det["segmentation"] = img.dt_rles[k]  # loadRes: area = mask area, bbox = toBbox
                else:
                    det["bbox"] = img.dt_boxes[k]  # loadRes: area = w * h
                dets.append(det)
        if dets:
            return gt.loadRes(dets)
        dt = self._COCO()  # loadRes cannot take an empty list
        dt.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        dt.createIndex()
        return dt

    def compute(self) -> dict[str, Any]:
        """Run ``COCOeval`` on everything seen since the last :meth:`reset`.

        Returns:
            Dict of plain Python floats / lists (``NaN`` where undefined, see the module docstring), per IoU type
            (keys prefixed ``segm_`` / ``bbox_`` when both are evaluated): ``map`` (AP at IoU 0.50:0.95),
            ``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large``, ``mar_<d>`` for each ``d`` in
            ``max_dets``, ``mar_small``, ``mar_medium``, ``mar_large``, and per class ``map_per_class`` and
            ``mar_<max_dets[-1]>_per_class`` aligned with ``classes``; then ``classes`` (sorted class ids seen in
            predictions or targets) and, when ``class_names`` was given, ``class_names`` aligned with ``classes``.
        """
        classes = self._classes()
        out: dict[str, Any] = {}
        gt = None
        for iou_type in self.iou_types:
            prefix = "" if len(self.iou_types) == 1 else f"{iou_type}_"
            if not classes:  # nothing updated, or no instance anywhere
                out.update(self._summary(None, prefix, 0))
                continue
            quiet = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
            with quiet:
                if gt is None:
                    gt = self._coco_gt(classes)
                ev = self._COCOeval(gt, self._coco_dt(gt, iou_type), iouType=iou_type)
                ev.params.maxDets = list(self.max_dets)
                ev.evaluate()
                ev.accumulate()
            if self.verbose:
                log.info("MaskAP (%s):", iou_type)
            out.update(self._summary(ev, prefix, len(classes)))
        out["classes"] = classes
        if self.class_names is not None:
            out["class_names"] = [self.class_names[c] for c in classes]
        return out

    def _summary(self, ev: Any, prefix: str, num_classes: int) -> dict[str, Any]:
        """The twelve COCO numbers (same averaging as ``COCOeval.summarize``) and the per-class ones."""
        last = self.max_dets[-1]
        if ev is None:
            out = {f"{prefix}{k}": math.nan for k in ("map", "map_50", "map_75")}
            out.update({f"{prefix}map_{a}": math.nan for a in _AREAS})
            out.update({f"{prefix}mar_{d}": math.nan for d in self.max_dets})
            out.update({f"{prefix}mar_{a}": math.nan for a in _AREAS})
            out[f"{prefix}map_per_class"] = []
            out[f"{prefix}mar_{last}_per_class"] = []
            return out
        p = ev.params
        precision = ev.eval["precision"]  # (T, R, K, A, M)
        recall = ev.eval["recall"]  # (T, K, A, M)
        area_index = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
        m_last = len(p.maxDets) - 1

        def mean_valid(s: np.ndarray) -> float:
            valid = s[s > -1]
            return float(np.mean(valid)) if valid.size else math.nan

        def ap(iou: float | None = None, area: str = "all") -> float:
            s = precision[..., area_index[area], m_last]
            if iou is not None:
                s = s[np.flatnonzero(np.isclose(p.iouThrs, iou))]
            return mean_valid(s)

        def ar(m: int = m_last, area: str = "all") -> float:
            return mean_valid(recall[:, :, area_index[area], m])

        out = {
            f"{prefix}map": ap(),
            f"{prefix}map_50": ap(0.5),
            f"{prefix}map_75": ap(0.75),
            **{f"{prefix}map_{a}": ap(area=a) for a in _AREAS},
            **{f"{prefix}mar_{d}": ar(m) for m, d in enumerate(p.maxDets)},
            **{f"{prefix}mar_{a}": ar(area=a) for a in _AREAS},
        }
        if self.verbose:
            self._print_table(out, prefix, p)
        out[f"{prefix}map_per_class"] = [mean_valid(precision[:, :, k, 0, m_last]) for k in range(num_classes)]
        out[f"{prefix}mar_{last}_per_class"] = [mean_valid(recall[:, k, 0, m_last]) for k in range(num_classes)]
        return out

    @staticmethod
    def _print_table(values: dict[str, float], prefix: str, p: Any) -> None:
        line = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
        span = f"{p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}"
        last = p.maxDets[-1]
        rows = [(1, span, "all", last, "map"), (1, "0.50", "all", last, "map_50"), (1, "0.75", "all", last, "map_75")]
        rows += [(1, span, a, last, f"map_{a}") for a in _AREAS]
        rows += [(0, span, "all", d, f"mar_{d}") for d in p.maxDets]
        rows += [(0, span, a, last, f"mar_{a}") for a in _AREAS]
        for is_ap, iou, area, dets, key in rows:
            v = values[prefix + key]
            title, short = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
            log.info(line.format(title, short, iou, area, dets, -1.0 if math.isnan(v) else v))
