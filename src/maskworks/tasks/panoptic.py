"""Panoptic segmentation: every pixel gets a class, thing pixels also an instance; scored by panoptic quality (PQ).

The contract (DESIGN.md "Panoptic output", extended to samples, targets and model outputs):

* Samples carry one ``instances`` entry per *segment*, things and stuff (``boxes``, ``labels`` 0..K-1, ``masks``,
  ``iscrowd``, ``isthing``) and the semantic ``mask`` (255 = void).
* :meth:`PanopticTask.collate` -> ``{"images": [(C, H, W)...], "targets": [{boxes, labels, masks, iscrowd, isthing,
  semantic}...], "meta": [...]}``; images may differ in size.
* Training: ``model(images, targets)`` with crowd segments removed from the per-segment keys (the ``semantic`` map
  stays whole) returns a dict of losses (torchvision's convention).
* Eval: ``model(images)`` returns per image ``{"panoptic_seg": (H, W) int32 ids (0 = void), "segments_info":
  [{"id", "category_id" (label), "isthing", "score"}, ...]}``.
* :meth:`PanopticTask.postprocess` gives per image the DESIGN.md tuple ``(panoptic_id_map (H, W) int32,
  segments_info)``; :meth:`PanopticTask.write` writes COCO panoptic PNGs, overlays and ``panoptic_results.json``
  (category ids mapped back through ``meta["category_ids"]``).

The evaluator matches predictions against ground-truth id maps built from the targets
(:func:`~maskworks.data.instances_to_panoptic`: crowd segments with ``iscrowd``, void = pixels no segment covers)
with :meth:`maskworks.metrics.PanopticQuality.update_segments`, i.e. panopticapi's rules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from maskworks.tasks.base import ImageListTask

__all__ = ["PanopticTask", "PanopticEvaluator", "check_panoptic_output"]

_TARGET_KEYS = ("boxes", "labels", "masks", "iscrowd", "isthing")


def _isthing_table(
    isthing: Sequence[bool] | None, thing_classes: Sequence[int] | None, num_classes: int | None
) -> list[bool] | None:
    if isthing is not None:
        table = [bool(t) for t in isthing]
        if thing_classes is not None and sorted(int(c) for c in thing_classes) != [i for i, t in enumerate(table) if t]:
            raise ValueError(
                f"thing_classes={list(thing_classes)} disagrees with isthing={table}; give one of them (or both "
                "describing the same classes)"
            )
        return table
    if thing_classes is None:
        return None
    if num_classes is None:
        raise ValueError("thing_classes needs the number of classes: give class_names or isthing as well")
    bad = [c for c in thing_classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"thing_classes {bad} are outside the labels 0..{num_classes - 1}")
    things = {int(c) for c in thing_classes}
    return [i in things for i in range(num_classes)]


def check_panoptic_output(out: Any, where: str = "the model's output") -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Validate one image's panoptic output (``{"panoptic_seg", "segments_info"}`` or a ``(map, segments_info)``
    tuple) against the contract and return it as ``(int32 (H, W) map on the CPU, segments_info with plain Python
    values)``.

    Raises:
        ValueError: a map that is not ``(H, W)`` integers, negative ids, duplicate or non-positive segment ids, a
            listed id absent from the map, or a non-zero id of the map that is not listed.
    """
    if isinstance(out, dict):
        if "panoptic_seg" not in out or "segments_info" not in out:
            raise ValueError(f"{where} lacks 'panoptic_seg' / 'segments_info' (found {sorted(out)})")
        ids, segments = out["panoptic_seg"], out["segments_info"]
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        ids, segments = out
    else:
        raise ValueError(f"{where} must be a dict with 'panoptic_seg' and 'segments_info', got {type(out).__name__}")
    ids = torch.as_tensor(ids).detach().cpu()
    if ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: panoptic_seg must be an (H, W) integer id map, got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{where}: panoptic_seg holds negative ids")
    infos = []
    for s in segments:
        info = {
            "id": int(s["id"]),
            "category_id": int(s["category_id"]),
            "isthing": bool(s["isthing"]) if s.get("isthing") is not None else None,
            "score": float(s.get("score", 1.0)),
        }
        if info["isthing"] is None:
            del info["isthing"]
        infos.append(info)
    listed = [s["id"] for s in infos]
    if len(set(listed)) != len(listed) or any(i <= 0 for i in listed):
        raise ValueError(f"{where}: segment ids must be unique and > 0 (0 is void), got {listed}")
    present = set(torch.unique(ids).tolist()) - {0}
    absent, unlisted = sorted(set(listed) - present), sorted(present - set(listed))
    if absent or unlisted:
        raise ValueError(
            f"{where}: segments_info and panoptic_seg disagree (listed but absent {absent[:10]}, in the map but not "
            f"listed {unlisted[:10]}); expected every listed id in the map and every non-zero id listed"
        )
    if ids.numel() and int(ids.max()) > 2**31 - 1:
        raise ValueError(f"{where}: segment ids above 2**31 - 1 do not fit an int32 map")
    return ids.to(torch.int32), infos


class PanopticEvaluator:
    """Panoptic quality of panoptic outputs against the batch targets, through
    :class:`~maskworks.metrics.PanopticQuality` (:meth:`~maskworks.metrics.PanopticQuality.update_segments`).

    Args:
        class_names: names of the labels 0..K-1.
        isthing: per label, whether it is a thing; default: from the batches' ``meta["isthing"]``.

    :meth:`compute` returns ``pq``, ``sq``, ``rq`` and the same over things (``*_things``) and stuff (``*_stuff``),
    ``n_things`` / ``n_stuff`` (categories counted), total ``tp`` / ``fp`` / ``fn``, ``per_class`` (lists in label
    order: ``classes``, ``class_names``, ``isthing``, ``pq``, ``sq``, ``rq``, ``tp``, ``fp``, ``fn``; NaN where a
    class never occurs) and ``num_images``.
    """

    def __init__(self, class_names: Sequence[str] | None = None, isthing: Sequence[bool] | None = None):
        self.class_names = list(class_names) if class_names else None
        self.isthing = [bool(t) for t in isthing] if isthing is not None else None
        self.metric: Any = None
        if self.isthing is not None:
            self._build(self.isthing)

    def _build(self, isthing: list[bool]) -> None:
        from maskworks.metrics import PanopticQuality

        if self.class_names is not None and len(self.class_names) != len(isthing):
            raise ValueError(f"{len(self.class_names)} class names for {len(isthing)} isthing flags")
        self.isthing = isthing
        things = [i for i, t in enumerate(isthing) if t]
        stuffs = [i for i, t in enumerate(isthing) if not t]
        self.metric = PanopticQuality(things, stuffs)

    def __len__(self) -> int:
        return 0 if self.metric is None else self.metric.num_images

    def reset(self) -> None:
        if self.metric is not None:
            self.metric.reset()

    def update(self, outputs: Sequence[Any], batch: dict[str, Any]) -> None:
        from maskworks.data.coco_panoptic import instances_to_panoptic

        targets = batch["targets"]
        metas = batch.get("meta") or [None] * len(targets)
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs for a batch of {len(targets)} images")
        for i, (out, target) in enumerate(zip(outputs, targets)):
            if self.metric is None:
                table = (metas[i] or {}).get("isthing")
                if table is None:
                    raise ValueError(
                        "the panoptic evaluator needs to know which classes are things: give isthing (or "
                        "thing_classes) to PanopticTask, or samples whose meta has 'isthing'"
                    )
                self._build([bool(t) for t in table])
            pred_map, pred_segments = check_panoptic_output(out, f"panoptic output {i} of the batch")
            gt_map, gt_segments = instances_to_panoptic(target, target.get("semantic"), self.isthing)
            if tuple(pred_map.shape) != tuple(gt_map.shape):
                raise ValueError(
                    f"panoptic output {i} of the batch is {tuple(pred_map.shape)} but its image is "
                    f"{tuple(gt_map.shape)}; expected the id map at the image's size"
                )
            self.metric.update_segments(pred_map, pred_segments, gt_map, gt_segments)

    def all_reduce(self) -> PanopticEvaluator:
        """Sum every rank's counts into every rank (TP / FP / FN exactly; IoU sums in float64)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        m = self.metric
        mine = None if m is None else (self.isthing, m.tp, m.fp, m.fn, m.iou_sum, m.num_images)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        parts = [g for g in gathered if g is not None]
        if not parts:
            return self
        if self.metric is None:
            self._build(list(parts[0][0]))
        m = self.metric
        m.tp = sum(p[1] for p in parts)
        m.fp = sum(p[2] for p in parts)
        m.fn = sum(p[3] for p in parts)
        m.iou_sum = sum(p[4] for p in parts)
        m.num_images = sum(p[5] for p in parts)
        return self

    def compute(self) -> dict[str, Any]:
        if self.metric is None:
            raise ValueError("nothing to evaluate: no batch was seen")
        r = self.metric.compute()
        k = len(self.isthing)
        # PanopticQuality orders classes as sorted things, then sorted stuff; report them in label order
        pos = {c: j for j, c in enumerate(r["categories"])}
        order = [pos[c] for c in range(k)]
        names = self.class_names or [str(c) for c in range(k)]
        per_class: dict[str, Any] = {"classes": list(range(k)), "class_names": names, "isthing": list(self.isthing)}
        for key in ("pq", "sq", "rq", "tp", "fp", "fn"):
            per_class[key] = [r["per_class"][key][j] for j in order]
        out = {key: r[key] for key in ("pq", "sq", "rq", "pq_things", "sq_things", "rq_things")}
        out.update({key: r[key] for key in ("pq_stuff", "sq_stuff", "rq_stuff", "n", "n_things", "n_stuff")})
        out.update({"tp": r["tp"], "fp": r["fp"], "fn": r["fn"], "per_class": per_class, "class_names": names})
        out["num_images"] = r["num_images"]
        return out


class PanopticTask(ImageListTask):
    """Panoptic segmentation (see the module docstring).

    Args:
        class_names: names of the labels 0..K-1.
        isthing: per label, whether it is a thing (countable) class; or give ``thing_classes``.
        thing_classes: the labels of the thing classes (with ``class_names`` for K).
        category_ids: label -> dataset category id, used when writing COCO JSON (default: the label itself, or
            ``meta["category_ids"]`` given to :meth:`write`).
    """

    kind = "panoptic"
    headline = "pq"
    headline_label = "PQ"
    channels_last = False  # images travel as a list of differently sized tensors

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        isthing: Sequence[bool] | None = None,
        thing_classes: Sequence[int] | None = None,
        category_ids: Sequence[int] | None = None,
    ):
        self.class_names = list(class_names) if class_names else None
        k = len(self.class_names) if self.class_names else None
        self.isthing = _isthing_table(isthing, thing_classes, k)
        if self.isthing is not None and k is not None and len(self.isthing) != k:
            raise ValueError(f"{k} class names but {len(self.isthing)} isthing flags; expected one flag per class")
        self.category_ids = [int(c) for c in category_ids] if category_ids is not None else None

    def __repr__(self) -> str:
        things = sum(self.isthing) if self.isthing else None
        n = len(self.isthing) if self.isthing else (len(self.class_names) if self.class_names else None)
        return f"PanopticTask(classes={n}, things={things})"

    # ------------------------------------------------------------------ batches
    def _target(self, sample: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        image = sample["image"]
        h, w = image.shape[-2:]
        inst = sample.get("instances")
        if inst is None:
            raise ValueError(
                f"{where} has no 'instances'; a panoptic model needs a panoptic dataset (one instance entry per "
                "segment, things and stuff), e.g. coco_panoptic or synthetic with panoptic: true"
            )
        missing = [k for k in ("labels", "masks") if k not in inst]
        if missing:
            raise ValueError(f"{where}: instances lack {missing}; expected boxes, labels, masks (one per segment)")
        labels = torch.as_tensor(inst["labels"]).reshape(-1).long()
        n = labels.shape[0]
        masks = torch.as_tensor(inst["masks"]).bool()
        if n == 0:
            masks = masks.reshape(0, h, w)
        if tuple(masks.shape) != (n, h, w):
            raise ValueError(
                f"{where}: segment masks are {tuple(masks.shape)} for {n} labels and a {h}x{w} image; expected "
                f"({n}, {h}, {w})"
            )
        if "boxes" in inst:
            boxes = torch.as_tensor(inst["boxes"]).float().reshape(-1, 4)
        else:
            from maskworks.data import masks_to_boxes

            boxes = masks_to_boxes(masks)
        iscrowd = inst.get("iscrowd")
        iscrowd = torch.zeros(n, dtype=torch.int64) if iscrowd is None else torch.as_tensor(iscrowd).long()
        isthing = inst.get("isthing")
        if isthing is None:
            table = self.isthing or (sample.get("meta") or {}).get("isthing")
            if table is None:
                raise ValueError(
                    f"{where}: instances lack 'isthing' and the task does not know which classes are things; give "
                    "PanopticTask(isthing=...) or use a panoptic dataset"
                )
            isthing = torch.as_tensor(list(table), dtype=torch.bool)[labels]
        isthing = torch.as_tensor(isthing).bool().reshape(-1)
        semantic = sample.get("mask")
        if semantic is None:  # paint the segments: crowd regions keep their class, the rest is void
            semantic = torch.full((h, w), 255, dtype=torch.int64)
            for j in range(n):
                semantic[masks[j]] = labels[j]
        semantic = torch.as_tensor(semantic).long()
        if tuple(semantic.shape) != (h, w):
            raise ValueError(f"{where}: the semantic mask is {tuple(semantic.shape)} but the image is {(h, w)}")
        return {
            "boxes": boxes,
            "labels": labels,
            "masks": masks,
            "iscrowd": iscrowd,
            "isthing": isthing,
            "semantic": semantic,
        }

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"images": [(C, H, W)...], "targets": [per image: boxes, labels, masks (bool), iscrowd, isthing,
        semantic], "meta": [...]}``: images of any sizes, as lists."""
        images, targets = [], []
        for i, s in enumerate(samples):
            where = f"sample {(s.get('meta') or {}).get('file') or i}"
            images.append(s["image"])
            targets.append(self._target(s, where))
        return {"images": images, "targets": targets, "meta": [s.get("meta") for s in samples]}

    # ------------------------------------------------------------------ model calls
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        targets = []
        for t in batch["targets"]:
            keep = t["iscrowd"] == 0
            targets.append({**{k: t[k][keep] for k in _TARGET_KEYS}, "semantic": t["semantic"]})
        losses = model(batch["images"], targets)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(
                f"a panoptic model must return a dict of losses in training (torchvision's convention), got "
                f"{type(losses).__name__}"
            )
        total = sum(losses.values())
        return {"loss": total, **losses}

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return model(batch["images"])

    # ------------------------------------------------------------------ evaluation
    def evaluator(self) -> PanopticEvaluator:
        return PanopticEvaluator(self.class_names, self.isthing)

    def history_row(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {f"val_{k}": metrics[k] for k in ("pq", "sq", "rq", "pq_things", "pq_stuff")}

    # ------------------------------------------------------------------ results
    def postprocess(
        self, outputs: Sequence[Any], batch: dict[str, Any] | None = None
    ) -> list[tuple[torch.Tensor, list[dict[str, Any]]]]:
        """Per image ``(panoptic_id_map (H, W) int32 on the CPU, segments_info)``: ``segments_info`` entries hold
        ``id``, ``category_id`` (the label), ``isthing`` and ``score`` as plain Python values (``isthing`` filled
        from the task's classes when the model leaves it out). The output is checked against the contract."""
        results = []
        for i, out in enumerate(outputs):
            ids, segments = check_panoptic_output(out, f"panoptic output {i}")
            for s in segments:
                if "isthing" not in s and self.isthing and 0 <= s["category_id"] < len(self.isthing):
                    s["isthing"] = self.isthing[s["category_id"]]
            results.append((ids, segments))
        return results

    def _classes(self, meta: dict[str, Any] | None) -> tuple[list[str] | None, list[bool] | None, list[int] | None]:
        meta = meta or {}
        names = meta.get("class_names") or self.class_names
        isthing = meta.get("isthing") or self.isthing
        category_ids = meta.get("category_ids") or self.category_ids
        return names, isthing, category_ids

    def annotation(
        self, result: tuple[Any, list[dict]], image_id: int, file_name: str, meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One image's COCO panoptic annotation: ``image_id``, ``file_name`` (its PNG) and ``segments_info``
        (``id``, ``category_id`` mapped through ``meta["category_ids"]``, ``isthing``, ``score``, ``area``,
        ``bbox`` xywh, ``iscrowd`` 0)."""
        from maskworks.data.coco_panoptic import segment_areas_and_boxes

        _, isthing, category_ids = self._classes(meta)
        ids, segments = result
        stats = segment_areas_and_boxes(ids, [s["id"] for s in segments])
        infos = []
        for s, (area, bbox) in zip(segments, stats):
            label = int(s["category_id"])
            thing = s.get("isthing")
            if thing is None and isthing and 0 <= label < len(isthing):
                thing = isthing[label]
            if category_ids:
                if not 0 <= label < len(category_ids) or category_ids[label] is None:
                    raise ValueError(f"label {label} has no category id (category_ids has {len(category_ids)} entries)")
                category = int(category_ids[label])
            else:
                category = label
            infos.append(
                {
                    "id": int(s["id"]),
                    "category_id": category,
                    "isthing": None if thing is None else bool(thing),
                    "score": float(s.get("score", 1.0)),
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
        return {"image_id": int(image_id), "file_name": str(file_name), "segments_info": infos}

    def categories(self, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """COCO panoptic ``categories`` of the class space: ``id`` (the dataset's category id), ``name``,
        ``isthing`` (0/1); empty when the classes are unknown."""
        names, isthing, category_ids = self._classes(meta)
        k = len(isthing) if isthing else (len(names) if names else 0)
        out = []
        for label in range(k):
            cat = category_ids[label] if category_ids and label < len(category_ids) else label
            out.append(
                {
                    "id": int(cat),
                    "name": names[label] if names and label < len(names) else str(label),
                    "isthing": int(bool(isthing[label])) if isthing else None,
                }
            )
        return out

    def write_png(self, result: tuple[Any, list[dict]], path: str | Path) -> Path:
        """The id map as a COCO panoptic RGB PNG (id = R + 256 G + 256^2 B)."""
        from maskworks.data.coco_panoptic import save_id_png

        return save_id_png(result[0], path)

    def write_overlay(
        self,
        result: tuple[Any, list[dict]],
        image: np.ndarray,
        path: str | Path,
        meta: dict[str, Any] | None = None,
        alpha: float = 0.5,
    ) -> Path:
        """``image`` (uint8 RGB) with the stuff segments in their class's palette colour and each thing segment in
        its own colour, outlined and captioned with class and score; void pixels stay as they are."""
        from maskworks.viz import default_palette, draw_instances, overlay, save_rgb_png

        names, isthing, _ = self._classes(meta)
        ids, segments = result
        ids = torch.as_tensor(ids).long()
        k = len(isthing) if isthing else max((s["category_id"] + 1 for s in segments), default=1)
        palette = [tuple(c) for c in (meta or {}).get("palette") or default_palette(max(k, 2))]
        stuff_map = torch.full_like(ids, 255)
        things = []
        for s in segments:
            m = ids == s["id"]
            thing = s.get("isthing")
            if thing is None and isthing and 0 <= s["category_id"] < len(isthing):
                thing = isthing[s["category_id"]]
            if thing:
                things.append((m, s))
            elif 0 <= s["category_id"] < len(palette):
                stuff_map[m] = s["category_id"]
        rgb = overlay(image, stuff_map.numpy(), palette, alpha=alpha)
        if things:
            inst = {
                "masks": torch.stack([m for m, _ in things]),
                "labels": torch.tensor([s["category_id"] for _, s in things]),
                "scores": torch.tensor([float(s.get("score", 1.0)) for _, s in things]),
            }
            rgb = draw_instances(rgb, inst, class_names=names, alpha=alpha, draw_boxes=False)
        return save_rgb_png(rgb, path)

    def write_results_json(
        self, annotations: Sequence[dict[str, Any]], path: str | Path, meta: dict[str, Any] | None = None
    ) -> Path:
        """``{"annotations": [...], "categories": [...]}`` (COCO panoptic results), written atomically."""
        from maskworks.checkpoint import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"annotations": list(annotations), "categories": self.categories(meta)}
        atomic_write_bytes(path, json.dumps(payload, default=_json_default).encode())
        return path

    def write(
        self,
        results: Sequence[tuple[Any, list[dict]]],
        out_dir: str | Path,
        names: Sequence[str | Path],
        images: Sequence[np.ndarray] | None = None,
        meta: dict[str, Any] | None = None,
        overlay: bool = True,
        alpha: float = 0.5,
    ) -> list[Path]:
        """Per image ``<name>_panoptic.png`` (:meth:`write_png`) and, with ``images``, ``<name>_panoptic_overlay.png``
        (:meth:`write_overlay`); and ``panoptic_results.json`` in ``out_dir`` with every image's :meth:`annotation`
        (``image_id`` = the image's index in ``names``, ``file_name`` = its PNG relative to ``out_dir``)."""
        out_dir = Path(out_dir)
        written: list[Path] = []
        annotations = []
        for i, (res, name) in enumerate(zip(results, names)):
            target = out_dir / name
            png = target.with_name(f"{target.name}_panoptic.png")
            written.append(self.write_png(res, png))
            if overlay and images is not None:
                written.append(
                    self.write_overlay(
                        res, images[i], target.with_name(f"{target.name}_panoptic_overlay.png"), meta, alpha
                    )
                )
            annotations.append(self.annotation(res, i, png.relative_to(out_dir).as_posix(), meta))
        written.append(self.write_results_json(annotations, out_dir / "panoptic_results.json", meta))
        return written


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(float(x)) else float(x)
    return str(x)
