"""Instance segmentation comparisons of the Q15, Q16 and Q18 notes, each model trained here from scratch.

    python benchmarks/instance_compare.py --study q15 --data synthetic --budget 200
    python benchmarks/instance_compare.py --study q15 --data isbi2012_instances --budget 300
    python benchmarks/instance_compare.py --study softnms --budget 180
    python benchmarks/instance_compare.py --study pointrend --epochs 8
    python benchmarks/instance_compare.py --study q15 --budget 10 --num-train 8   # smoke run

* ``q15``: two-stage Mask R-CNN against single-stage YOLACT and SOLOv2, all three on the same ResNet-50-FPN, each
  with its own recipe, under the **same wall-clock training budget**: a one-epoch probe measures each model's
  epoch time, and the model then trains ``floor(budget / epoch time)`` epochs (at least one) with a cosine schedule
  from the same seed. Reported: COCO mask AP / AP50 of the final weights (pycocotools), the actual training time
  and the eval latency of one validation image (median, ``inference_mode``, float32, post-processing and mask
  pasting included).
* ``softnms``: dense synthetic scenes (``SyntheticShapes(dense=True)``: shapes centred next to each other, touching
  and occluding). One Mask R-CNN (ResNet-18-FPN) and one YOLACT (ResNet-18) are trained for the budget, then each
  is evaluated with its hard NMS and with linear / Gaussian Soft-NMS (mask AP, AP50, AP75 and recall of the GT
  instances at IoU 0.5), and the detections scoring >= 0.3 are layered into one id map by score and by
  :func:`maskworks.ops.occlusion_order`: the share of contested pixels (covered by two or more predicted masks)
  that end up with the prediction matched to the pixel's true instance.
* ``pointrend``: Mask R-CNN (ResNet-18-FPN) with the standard 28x28 mask head against ``mask_head="pointrend"``,
  same steps and seed, synthetic shapes with corners (triangles, stars) at ``--size``: mask AP and the boundary
  quality of the masks of matched instances (each GT instance with its best-IoU detection of any score, IoU >= 0.5):
  boundary F1 at 1 px (:class:`maskworks.metrics.BoundaryF1`) and Boundary IoU
  (:class:`maskworks.metrics.BoundaryIoU`).

Every run goes through :class:`maskworks.engine.Trainer` with :class:`maskworks.tasks.InstanceTask`, bf16 autocast
where the CPU has AMX, batch 4, grad clip 10, ``--threads`` threads. ``--json`` keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from instance_budget import COMMON, budget_trainer  # benchmarks/ (the script's folder) is on sys.path
from torchvision.transforms import v2

from maskworks import create_model
from maskworks.data import ISBI2012Instances, SyntheticShapes
from maskworks.engine import Trainer, seed_everything
from maskworks.metrics import BoundaryF1, BoundaryIoU
from maskworks.metrics.coco import MaskAP
from maskworks.ops import mask_iou, occlusion_order, resolve_overlaps
from maskworks.tasks import InstanceTask

# Mask R-CNN proposal / RoI counts per data set: instance_budget.py's, plus the dense scenes' (more, smaller objects)
RCNN = {
    **COMMON,
    "dense": {
        "rpn_pre_nms_top_n_train": 512,
        "rpn_post_nms_top_n_train": 256,
        "rpn_pre_nms_top_n_test": 512,
        "rpn_post_nms_top_n_test": 128,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 64,
        "box_detections_per_img": 50,
    },
}


def recipes(data: str, size: int) -> list[tuple[str, str, dict, dict]]:
    """(label, registered model, constructor options, optimiser settings) of the Q15 models on ``data``."""
    isbi = data == "isbi2012_instances"
    many = {"max_detections": 200} if isbi else {}
    return [
        (
            "Mask R-CNN R-50-FPN",
            "mask_rcnn_resnet50_fpn",
            {"min_size": size, "max_size": size, **RCNN[data]},
            {"optimizer": "sgd", "lr": 0.01 if isbi else 0.02, "warmup": 2.0 if isbi else 1.0},
        ),
        (
            "YOLACT R-50-FPN",
            "yolact_resnet50_fpn",
            ({"anchor_sizes": (4, 8, 16, 32, 64)} if isbi else {}) | many,
            {"optimizer": "adamw", "lr": 2e-4, "warmup": 0.5},
        ),
        (
            "SOLOv2 R-50-FPN",
            "solov2_resnet50_fpn",
            many,
            {"optimizer": "sgd", "lr": 0.01, "warmup": 0.5},
        ),
    ]


def datasets(args, data: str):
    flips = [v2.RandomHorizontalFlip(0.5)]
    if data == "isbi2012_instances":  # whole slices resized to --size for every model, in training and evaluation
        resize = v2.Resize(args.size, antialias=True)
        train = ISBI2012Instances(
            args.root, split="train", transform=v2.Compose([resize, *flips, v2.RandomVerticalFlip(0.5)])
        )
        return train, ISBI2012Instances(args.root, split="val", transform=resize)
    kw = {
        "image_size": args.size,
        "num_classes": args.classes,
        "max_shapes": args.max_shapes,
        "radius_range": tuple(args.radius),
        "cache": True,
    }
    if data == "dense":
        kw.update(
            dense=True, min_shapes=args.dense_shapes[0], max_shapes=args.dense_shapes[1], radius_range=(0.12, 0.22)
        )
    train = SyntheticShapes(args.num_train, split="train", transform=v2.Compose(flips), **kw)
    return train, SyntheticShapes(args.num_val, split="val", **kw)


def make_trainer(model, train, val, run, epochs, opt, args) -> Trainer:
    return budget_trainer(model, train, val, run, InstanceTask(class_names=train.class_names), epochs, opt)


def build(name: str, train, options: dict):
    return create_model(name, num_classes=train.num_classes, in_channels=train.in_channels, **options)


def train_for_budget(name, options, opt, train, val, args) -> tuple[torch.nn.Module, dict]:
    """Probe one epoch, then train a fresh model from the same seed for as many epochs as fit the budget."""
    with tempfile.TemporaryDirectory() as run:
        seed_everything(0)
        probe = make_trainer(build(name, train, options), train, None, run, 1, opt, args)
        t0 = time.perf_counter()
        probe.fit()
        epoch_s = time.perf_counter() - t0
    epochs = max(1, math.floor(args.budget / epoch_s)) if args.epochs is None else args.epochs
    return train_fixed(name, options, opt, train, val, args, epochs, probe_epoch_s=epoch_s)


def train_fixed(name, options, opt, train, val, args, epochs, probe_epoch_s=None):
    seed_everything(0)
    model = build(name, train, options)
    with tempfile.TemporaryDirectory() as run:
        trainer = make_trainer(model, train, val, run, epochs, opt, args)
        t0 = time.perf_counter()
        final = trainer.fit()["final"]
        train_s = time.perf_counter() - t0
    info = {
        "epochs": epochs,
        "steps": trainer.steps_per_epoch * epochs,
        "train_s": train_s,
        "probe_epoch_s": probe_epoch_s,
        "trainer_mask_ap50": final["val_mask_ap50"],  # the trainer's evaluation (at most 100 detections per image)
    }
    return model, info


@torch.inference_mode()
def predictions(model, dataset) -> tuple[list[dict], float]:
    """Eval outputs (CPU) of every image and the median single-image latency in ms (the first image excluded)."""
    model.eval()
    outs, times = [], []
    for i in range(len(dataset)):
        x = dataset[i]["image"]
        t0 = time.perf_counter()
        out = model([x])[0]
        times.append(time.perf_counter() - t0)
        masks = out["masks"]
        if masks.ndim == 4:
            masks = masks[:, 0] > 0.5
        outs.append({**{k: v for k, v in out.items() if k != "masks"}, "masks": masks.bool()})
    return outs, 1000 * median(times[1:] if len(times) > 1 else times)


def coco_ap(outs: list[dict], dataset) -> dict:
    """COCO mask AP with up to 300 detections per image (ISBI slices hold up to 132 cells)."""
    metric = MaskAP("segm", max_dets=(1, 10, 300))
    for i, out in enumerate(outs):
        t = dataset[i]["instances"]
        pred = {"masks": out["masks"], "scores": out["scores"].float(), "labels": out["labels"]}
        metric.update([pred], [{"labels": t["labels"], "masks": t["masks"].bool()}])
    r = metric.compute()
    return {"mask_ap": r["map"], "mask_ap50": r["map_50"], "mask_ap75": r["map_75"]}


def matched_pairs(outs, dataset, min_score: float = 0.0):
    """Per GT instance its best-IoU detection (score >= min_score) when the IoU is >= 0.5: lists of (pred, gt)."""
    preds, gts = [], []
    for i, out in enumerate(outs):
        gt = dataset[i]["instances"]["masks"].bool()
        keep = out["scores"] >= min_score
        pm = out["masks"][keep]
        if not len(gt) or not len(pm):
            continue
        iou = mask_iou(pm, gt)  # (P, G)
        best, idx = iou.max(0)
        for g in torch.nonzero(best >= 0.5).flatten().tolist():
            preds.append(pm[idx[g]])
            gts.append(gt[g])
    return preds, gts


def recall50(outs, dataset) -> float:
    found = total = 0
    for i, out in enumerate(outs):
        gt = dataset[i]["instances"]["masks"].bool()
        total += len(gt)
        if len(gt) and len(out["masks"]):
            found += int((mask_iou(out["masks"], gt).max(0).values >= 0.5).sum())
    return found / max(total, 1)


def contested_accuracy(outs, dataset, order: str, min_score: float = 0.3) -> tuple[float, int]:
    """Share of contested pixels (two or more predicted masks, on a GT instance) whose owner in the id map is the
    detection matched (best IoU >= 0.5) to that pixel's GT instance."""
    right = contested = 0
    for i, out in enumerate(outs):
        inst = dataset[i]["instances"]
        keep = out["scores"] >= min_score
        masks, scores = out["masks"][keep], out["scores"][keep]
        if len(masks) < 2 or not len(inst["masks"]):
            continue
        gt = inst["masks"].bool()
        gt_ids = resolve_overlaps(gt, torch.arange(len(gt)))  # visible GT masks are disjoint
        iou = mask_iou(masks, gt)
        best, match = iou.max(1)
        match = torch.where(best >= 0.5, match + 1, torch.full_like(match, -1))  # GT id per detection, -1: none
        probs = out.get("mask_probs")
        key = (
            scores.double()
            if order == "score"
            else occlusion_order(masks, scores, None if probs is None else probs[keep])
        )
        ids = resolve_overlaps(masks, key)
        where = (masks.sum(0) >= 2) & (gt_ids > 0)
        owner_gt = torch.where(ids > 0, match[(ids - 1).clamp(min=0)], torch.full_like(ids, -1))
        right += int((owner_gt[where] == gt_ids[where]).sum())
        contested += int(where.sum())
    return right / max(contested, 1), contested


def boundary_quality(outs, dataset) -> dict:
    preds, gts = matched_pairs(outs, dataset)
    if not preds:
        return {"matched": 0, "bf1_1px": float("nan"), "boundary_iou": float("nan")}
    bf1, biou = BoundaryF1(2, tolerance=1, ignore_index=None), BoundaryIoU(2, ignore_index=None)
    p, g = torch.stack(preds).long(), torch.stack(gts).long()
    bf1.update(p, g)
    biou.update(p, g)
    return {
        "matched": len(preds),
        "bf1_1px": bf1.compute()["bf1"][1],
        "boundary_iou": biou.compute()["boundary_iou"][1],
    }


def study_q15(args) -> list[dict]:
    train, val = datasets(args, args.data)
    rows = []
    for label, name, options, opt in recipes(args.data, args.size):
        model, info = train_for_budget(name, options, opt, train, val, args)
        outs, latency = predictions(model, val)
        row = {"study": "q15", "data": args.data, "config": label, "model": name, **info, **coco_ap(outs, val)}
        row.update(params_m=sum(q.numel() for q in model.parameters()) / 1e6, latency_ms=latency, recipe=opt)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nq15 on {args.data} ({args.size} px, budget {args.budget} s, {args.threads} threads)")
    print(f"{'model':<22} {'params':>7} {'epochs':>6} {'train s':>8} {'mask AP':>8} {'AP50':>6} {'latency':>9}")
    for r in rows:
        print(
            f"{r['config']:<22} {r['params_m']:6.1f}M {r['epochs']:6d} {r['train_s']:8.0f} {r['mask_ap']:8.3f} "
            f"{r['mask_ap50']:6.3f} {r['latency_ms']:7.0f}ms"
        )
    return rows


def study_softnms(args) -> list[dict]:
    train, val = datasets(args, "dense")
    configs = [
        ("Mask R-CNN R-18-FPN", "mask_rcnn", {"encoder": "resnet18", "min_size": args.size, "max_size": args.size,
                                              "return_mask_probs": True, **RCNN["dense"]},
         {"optimizer": "sgd", "lr": 0.02, "warmup": 1.0}, "box_nms", ("hard", "soft_linear", "soft_gaussian")),
        ("YOLACT R-18", "yolact", {"encoder": "resnet18", "return_mask_probs": True},
         {"optimizer": "adamw", "lr": 2e-4, "warmup": 0.5}, "box_nms", ("fast", "soft_linear", "soft_gaussian")),
    ]  # fmt: skip
    rows = []
    for label, name, options, opt, key, methods in configs:
        if args.only and name not in args.only:
            continue
        model, info = train_for_budget(name, options, opt, train, val, args)
        for method in methods:
            if name == "mask_rcnn":
                model.roi_heads.nms_method = method
            else:
                model.options[key] = method
            outs, latency = predictions(model, val)
            row = {"study": "softnms", "config": label, "nms": method, **info, **coco_ap(outs, val)}
            row["recall50"] = recall50(outs, val)
            for order in ("score", "occlusion"):
                row[f"contested_acc_{order}"], row["contested_px"] = contested_accuracy(outs, val, order)
            row["latency_ms"] = latency
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nsoftnms on dense synthetic scenes ({args.size} px, budget {args.budget} s)")
    print(f"{'model':<20} {'nms':<14} {'AP':>6} {'AP50':>6} {'AP75':>6} {'recall':>7} {'score':>6} {'occl':>6}")
    for r in rows:
        print(
            f"{r['config']:<20} {r['nms']:<14} {r['mask_ap']:6.3f} {r['mask_ap50']:6.3f} {r['mask_ap75']:6.3f} "
            f"{r['recall50']:7.3f} {r['contested_acc_score']:6.3f} {r['contested_acc_occlusion']:6.3f}"
        )
    return rows


def study_pointrend(args) -> list[dict]:
    train, val = datasets(args, "synthetic")
    rows = []
    for head in ("standard", "pointrend"):
        options = {"encoder": "resnet18", "min_size": args.size, "max_size": args.size, "mask_head": head,
                   **RCNN["synthetic"]}  # fmt: skip
        opt = {"optimizer": "sgd", "lr": 0.02, "warmup": 1.0}
        model, info = train_fixed("mask_rcnn", options, opt, train, val, args, args.epochs or 8)
        outs, latency = predictions(model, val)
        row = {"study": "pointrend", "mask_head": head, **info, **coco_ap(outs, val), **boundary_quality(outs, val)}
        row["latency_ms"] = latency
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\npointrend on synthetic shapes ({args.size} px, {rows[0]['steps']} steps)")
    print(
        f"{'mask head':<10} {'AP':>6} {'AP50':>6} {'AP75':>6} {'BF1@1px':>8} {'B-IoU':>6} {'matched':>7} {'latency':>8}"
    )
    for r in rows:
        print(
            f"{r['mask_head']:<10} {r['mask_ap']:6.3f} {r['mask_ap50']:6.3f} {r['mask_ap75']:6.3f} {r['bf1_1px']:8.3f} "
            f"{r['boundary_iou']:6.3f} {r['matched']:7d} {r['latency_ms']:6.0f}ms"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=("q15", "softnms", "pointrend"), default="q15")
    p.add_argument("--data", choices=("synthetic", "isbi2012_instances"), default="synthetic", help="q15 data")
    p.add_argument("--root", default="../shared/data/isbi2012", help="ISBI 2012 folder")
    p.add_argument("--size", type=int, default=None, help="image size (default: 128; ISBI 256; pointrend 192)")
    p.add_argument("--classes", type=int, default=4, help="synthetic: background + shape classes")
    p.add_argument("--max-shapes", type=int, default=2, help="synthetic: at most this many shapes per image")
    p.add_argument("--dense-shapes", type=int, nargs=2, default=[4, 7], help="softnms: min / max shapes per scene")
    p.add_argument("--radius", type=float, nargs=2, default=[0.2, 0.4], help="synthetic: shape radius range")
    p.add_argument("--num-train", type=int, default=96)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--budget", type=float, default=200.0, help="training seconds per model (q15, softnms)")
    p.add_argument("--epochs", type=int, default=None, help="fixed epochs instead of the budget")
    p.add_argument("--only", nargs="+", choices=("mask_rcnn", "yolact"), help="softnms: these models only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    if args.size is None:
        args.size = {"q15": 256 if args.data == "isbi2012_instances" else 128, "softnms": 128, "pointrend": 192}[
            args.study
        ]
    torch.set_num_threads(args.threads)
    rows = {"q15": study_q15, "softnms": study_softnms, "pointrend": study_pointrend}[args.study](args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
