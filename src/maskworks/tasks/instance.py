"""Instance segmentation: torchvision-style detection models, COCO mask / box AP.

Models follow torchvision's detection convention: in training ``model(images, targets)`` returns a dict of losses,
in eval ``model(images)`` returns one dict per image with ``boxes (N, 4)`` xyxy, ``labels (N,)``, ``scores (N,)``
and ``masks (N, H, W)`` bool at the image's size (DESIGN.md, "Instance output"). Images of one batch may differ in
size: they travel as lists.

Training targets come from each sample's ``instances`` (``boxes``, ``labels``, ``masks`` and optionally
``iscrowd``). Crowd regions (``iscrowd=1``) are left out of the training targets, as torchvision's and
detectron2's COCO training does; the evaluator passes them to COCO's crowd matching instead, where predictions
that fall on them are ignored rather than counted as false positives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from maskworks.tasks.base import ImageListTask

__all__ = ["PASTE_ORDERS", "InstanceTask", "InstanceEvaluator"]

PASTE_ORDERS = ("occlusion", "score")  # how overlapping instances are layered in id maps and overlays

_TARGET_KEYS = ("boxes", "labels", "masks", "iscrowd")


def _empty_instances(image: torch.Tensor) -> dict[str, torch.Tensor]:
    h, w = image.shape[-2:]
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, h, w, dtype=torch.bool),
        "iscrowd": torch.zeros(0, dtype=torch.int64),
    }


def _as_target(instances: dict[str, Any], image: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    missing = [k for k in ("boxes", "labels", "masks") if k not in instances]
    if missing:
        raise ValueError(f"{where}: instances lack {missing}; expected boxes (N, 4), labels (N,) and masks (N, H, W)")
    target = {k: torch.as_tensor(instances[k]) for k in _TARGET_KEYS if k in instances}
    target["masks"] = target["masks"].bool()
    target["boxes"] = target["boxes"].float()
    target["labels"] = target["labels"].long()
    n = target["labels"].shape[0]
    target.setdefault("iscrowd", torch.zeros(n, dtype=torch.int64))
    if target["masks"].shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"{where}: instance masks are {tuple(target['masks'].shape[-2:])} but the image is "
            f"{tuple(image.shape[-2:])}; expected masks at the image's size"
        )
    return target


class InstanceEvaluator:
    """COCO mask AP (headline) and box AP of instance outputs, through :class:`~maskworks.metrics.MaskAP`.

    :meth:`compute` returns ``mask_ap``, ``mask_ap50``, ``mask_ap75``, ``box_ap``, ``box_ap50``, ``box_ap75``,
    ``mask_ar100``, the per-class mask AP (``mask_ap_per_class`` with ``classes`` / ``class_names``) and ``coco``:
    every number of :meth:`MaskAP.compute <maskworks.metrics.MaskAP.compute>`.
    """

    def __init__(self, class_names: Sequence[str] | None = None):
        from maskworks.metrics import MaskAP

        self.class_names = list(class_names) if class_names else None
        self.metric = MaskAP(iou_type=("segm", "bbox"), class_names=self.class_names)

    def __len__(self) -> int:
        return len(self.metric)

    def reset(self) -> None:
        self.metric.reset()

    def update(self, outputs: Sequence[dict[str, Any]], batch: dict[str, Any]) -> None:
        targets = batch["targets"]
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs for a batch of {len(targets)} images")
        preds = []
        for out in outputs:
            masks = out["masks"]
            if masks.ndim == 4:  # torchvision's (N, 1, H, W) probabilities
                masks = masks[:, 0] > 0.5
            preds.append(
                {
                    "masks": masks.bool().cpu(),
                    "scores": out["scores"].float().cpu(),
                    "labels": out["labels"].cpu(),
                    "boxes": out["boxes"].float().cpu(),
                }
            )
        gts = [{k: v.cpu() for k, v in t.items() if k in ("masks", "labels", "iscrowd", "boxes")} for t in targets]
        self.metric.update(preds, gts)

    def all_reduce(self) -> InstanceEvaluator:
        """Gather every rank's images on every rank, in the order of a single-process run (the validation sampler
        gives rank ``r`` the images ``r::world``)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        world = dist.get_world_size()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, self.metric._images)
        merged = []
        for i in range(max(len(g) for g in gathered)):
            merged.extend(g[i] for g in gathered if i < len(g))
        self.metric._images = merged
        return self

    def compute(self) -> dict[str, Any]:
        r = self.metric.compute()
        out = {
            "mask_ap": r["segm_map"],
            "mask_ap50": r["segm_map_50"],
            "mask_ap75": r["segm_map_75"],
            "mask_ar100": r.get(f"segm_mar_{self.metric.max_dets[-1]}"),
            "box_ap": r["bbox_map"],
            "box_ap50": r["bbox_map_50"],
            "box_ap75": r["bbox_map_75"],
            "classes": r["classes"],
            "mask_ap_per_class": r["segm_map_per_class"],
            "box_ap_per_class": r["bbox_map_per_class"],
            "num_images": len(self.metric),
            "coco": r,
        }
        if "class_names" in r:
            out["class_names"] = r["class_names"]
        return out


class InstanceTask(ImageListTask):
    """Instance segmentation with detection-style models (see the module docstring).

    Args:
        class_names: names of the labels (index 0 is the background of torchvision-style models).
        score_threshold: results below this score are dropped by :meth:`postprocess` (not by the evaluator, which
            needs every detection for AP).
    """

    kind = "instance"
    headline = "mask_ap"
    headline_label = "mask AP"
    channels_last = False  # the detection transform re-batches images into a fresh NCHW tensor

    def __init__(self, class_names: Sequence[str] | None = None, score_threshold: float = 0.5):
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.class_names = list(class_names) if class_names else None
        self.score_threshold = score_threshold

    def __repr__(self) -> str:
        return f"InstanceTask(classes={len(self.class_names) if self.class_names else None})"

    # ------------------------------------------------------------------ batches
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"images": [(C, H, W)...], "targets": [dict...], "meta": [...]}``: images of any sizes, as lists."""
        images, targets = [], []
        for i, s in enumerate(samples):
            image = s["image"]
            inst = s.get("instances")
            where = f"sample {(s.get('meta') or {}).get('file') or i}"
            if inst is None:
                raise ValueError(
                    f"{where} has no 'instances'; an instance model needs a dataset that returns instances "
                    "(boxes, labels, masks), e.g. synthetic, coco or isbi2012_instances"
                )
            images.append(image)
            targets.append(_as_target(inst, image, where) if len(inst.get("labels", [])) else _empty_instances(image))
        return {"images": images, "targets": targets, "meta": [s.get("meta") for s in samples]}

    # ------------------------------------------------------------------ model calls
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        targets = []
        for t in batch["targets"]:
            keep = t["iscrowd"] == 0
            targets.append(
                {"boxes": t["boxes"][keep], "labels": t["labels"][keep], "masks": t["masks"][keep].to(torch.uint8)}
            )
        losses = model(batch["images"], targets)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(
                f"an instance model must return a dict of losses in training (torchvision's convention), got "
                f"{type(losses).__name__}"
            )
        total = sum(losses.values())
        return {"loss": total, **losses}

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        return model(batch["images"])

    # ------------------------------------------------------------------ evaluation
    def evaluator(self) -> InstanceEvaluator:
        return InstanceEvaluator(self.class_names)

    def history_row(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {
            k: metrics[k.removeprefix("val_")] for k in ("val_mask_ap", "val_mask_ap50", "val_box_ap", "val_box_ap50")
        }

    # ------------------------------------------------------------------ results
    def postprocess(self, outputs: Sequence[dict[str, Any]], batch: dict[str, Any] | None = None) -> list[dict]:
        """Per-image dicts on the CPU (``boxes``, ``labels``, ``scores``, ``masks`` bool, and ``mask_probs`` float
        when the model gives probabilities), detections below ``score_threshold`` dropped, highest score first."""
        results = []
        for out in outputs:
            masks, probs = out["masks"], out.get("mask_probs")
            if masks.ndim == 4:
                probs = masks[:, 0] if masks.is_floating_point() else probs
                masks = masks[:, 0] > 0.5 if masks.is_floating_point() else masks[:, 0]
            scores = out["scores"].float().cpu()
            keep = torch.nonzero(scores >= self.score_threshold).flatten()
            keep = keep[scores[keep].argsort(descending=True, stable=True)]
            result = {
                "boxes": out["boxes"].float().cpu()[keep],
                "labels": out["labels"].cpu()[keep],
                "scores": scores[keep],
                "masks": masks.bool().cpu()[keep],
            }
            if probs is not None:
                result["mask_probs"] = probs.float().cpu()[keep]
            results.append(result)
        return results

    @staticmethod
    def paste_key(result: dict[str, Any], paste_order: str = "score") -> torch.Tensor:
        """The front-to-back key of a result's instances (higher = in front): ``"occlusion"``
        (:func:`maskworks.ops.occlusion_order`: each overlapping pair decided by its overlap, mask probabilities
        first when the result has them) or ``"score"`` (the detection score)."""
        from maskworks.ops import occlusion_order

        if paste_order not in PASTE_ORDERS:
            raise ValueError(f"paste_order must be one of {', '.join(PASTE_ORDERS)}, got {paste_order!r}")
        masks, scores = torch.as_tensor(result["masks"]).bool(), torch.as_tensor(result["scores"]).float()
        if paste_order == "score":
            return scores.double()
        probs = result.get("mask_probs")
        return occlusion_order(masks, scores, None if probs is None else torch.as_tensor(probs))

    def id_map(self, result: dict[str, Any], paste_order: str = "score") -> torch.Tensor:
        """``(H, W)`` int64 instance ids, one owner per pixel: ``i + 1`` for the result's ``i``-th instance (its row
        in ``coco_results.json``), 0 for background; where masks overlap, the front one (:meth:`paste_key`) wins."""
        from maskworks.ops import resolve_overlaps

        return resolve_overlaps(torch.as_tensor(result["masks"]).bool(), self.paste_key(result, paste_order))

    def write_ids(self, result: dict[str, Any], path: str | Path, paste_order: str = "score") -> Path:
        """:meth:`id_map` as a 16-bit gray PNG (values = instance ids; up to 65,535 instances)."""
        import io

        from PIL import Image

        from maskworks.checkpoint import atomic_write_bytes

        ids = self.id_map(result, paste_order)
        if ids.numel() and int(ids.max()) > 65535:
            raise ValueError(f"{path}: {int(ids.max())} instances do not fit a 16-bit id PNG (at most 65,535)")
        buf = io.BytesIO()
        Image.fromarray(ids.numpy().astype(np.uint16)).save(buf, format="PNG")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def result_rows(
        self,
        result: dict[str, Any],
        image_id: int,
        file_name: str | None = None,
        meta: dict[str, Any] | None = None,
        polygons: bool = False,
    ) -> list[dict[str, Any]]:
        """COCO results of one image, as ``COCO.loadRes`` reads them: ``image_id``, ``category_id`` (the label
        mapped back through ``meta["category_ids"]`` when the model was trained on a COCO dataset), ``bbox`` xywh,
        ``score``, ``segmentation`` (compressed RLE, ``counts`` as text); plus ``file_name``, ``category_name`` and,
        with ``polygons``, COCO polygons (``polygons``: flat ``[x1, y1, x2, y2, ...]`` lists, pixel-edge
        coordinates)."""
        from pycocotools import mask as mask_utils

        meta = meta or {}
        class_names = meta.get("class_names") or self.class_names
        category_ids = meta.get("category_ids")
        masks = result["masks"]
        masks = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        rows = []
        for j, label in enumerate(int(v) for v in result["labels"]):
            rle = mask_utils.encode(np.asfortranarray(masks[j].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = (float(v) for v in result["boxes"][j])
            category = category_ids[label] if category_ids and 0 < label < len(category_ids) else label
            row = {
                "image_id": int(image_id),
                "category_id": int(category),
                "score": float(result["scores"][j]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "segmentation": rle,
            }
            if file_name is not None:
                row["file_name"] = str(file_name)
            if class_names and 0 <= label < len(class_names):
                row["category_name"] = class_names[label]
            if polygons:
                from maskworks.data.coco import mask_to_polygons

                row["polygons"] = mask_to_polygons(masks[j])
            rows.append(row)
        return rows

    def write_overlay(
        self,
        result: dict[str, Any],
        image: np.ndarray,
        path: str | Path,
        meta: dict[str, Any] | None = None,
        alpha: float = 0.5,
        paste_order: str = "score",
    ) -> Path:
        """``image`` (uint8 RGB or gray) with each instance in its own colour, outlined, with class and score,
        painted back to front in ``paste_order`` (:meth:`paste_key`)."""
        from maskworks.viz import draw_instances, save_rgb_png

        class_names = (meta or {}).get("class_names") or self.class_names
        order = self.paste_key(result, paste_order)
        return save_rgb_png(draw_instances(image, result, class_names=class_names, alpha=alpha, order=order), path)

    def write(
        self,
        results: Sequence[dict[str, Any]],
        out_dir: str | Path,
        names: Sequence[str | Path],
        images: Sequence[np.ndarray] | None = None,
        meta: dict[str, Any] | None = None,
        overlay: bool = True,
        alpha: float = 0.5,
        polygons: bool = False,
        paste_order: str = "score",
    ) -> list[Path]:
        """Per image ``<name>_ids.png`` (:meth:`write_ids`) and ``<name>_instances.png`` (:meth:`write_overlay`,
        when ``images`` are given), and ``coco_results.json`` in ``out_dir`` with every image's :meth:`result_rows`
        (``image_id`` = the image's index in ``names``)."""
        from maskworks.checkpoint import atomic_write_bytes

        out_dir = Path(out_dir)
        written: list[Path] = []
        rows: list[dict[str, Any]] = []
        for i, (res, name) in enumerate(zip(results, names)):
            target = out_dir / name
            written.append(self.write_ids(res, target.with_name(f"{target.name}_ids.png"), paste_order))
            if overlay and images is not None:
                written.append(
                    self.write_overlay(
                        res, images[i], target.with_name(f"{target.name}_instances.png"), meta, alpha, paste_order
                    )
                )
            rows.extend(self.result_rows(res, i, str(name), meta, polygons))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "coco_results.json"
        atomic_write_bytes(path, json.dumps(rows).encode())
        written.append(path)
        return written
