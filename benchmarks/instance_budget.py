"""Mask AP at a fixed training budget: the Q19 real-time table (R-50-FPN against MobileNetV3-FPN Mask R-CNN, with
their CPU latencies) and the Q14 ablation (RoIAlign against RoIPool, everything else equal).

    python benchmarks/instance_budget.py --study q19 --data synthetic --size 192 --classes 4 --epochs 10
    python benchmarks/instance_budget.py --study q19 --data isbi2012_instances --size 256 --epochs 40 \
        --lr 0.01 --warmup 2
    python benchmarks/instance_budget.py --study q14 --data synthetic --classes 4 --epochs 10
    python benchmarks/instance_budget.py --study q14 --data synthetic --epochs 1 --num-train 8   # smoke run

Every configuration trains from the same seed, from scratch (no pretrained weights can be downloaded here), with
the same data, schedule and number of optimizer steps (SGD, lr 0.02 (``--lr``) with warm-up (``--warmup``), cosine
decay, momentum 0.9, weight decay 1e-4, bf16 autocast where the CPU has AMX, as ``maskworks train`` does), through
:class:`maskworks.engine.Trainer` with :class:`maskworks.tasks.InstanceTask`. Reported: COCO mask AP / AP50 / box
AP50 of the final weights on the validation split (pycocotools), the training time, and the eval latency of one
validation image (median of the validation set, ``inference_mode``, float32, post-processing and mask pasting
included). ``--json`` keeps the rows.

Data: ``synthetic`` = ``SyntheticShapes`` at ``--size`` px (shape classes + background); ``isbi2012_instances`` =
the ISBI 2012 slices as cell instances (about 115 touching cells per 512x512 slice; 16 training, 4 held-out
validation slices), whole slices resized to ``--size`` inside the model in training and evaluation alike (the same
scale; masks are pasted back and scored at 512).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from maskworks import create_model
from maskworks.data import ISBI2012Instances, SyntheticShapes, build_transforms
from maskworks.engine import Trainer, seed_everything
from maskworks.tasks import InstanceTask


# the settings every configuration shares, per data set: proposal and RoI counts sized for a few large shapes in
# small images (configs/synthetic_mask_rcnn.yaml) and for ~115 cells per ISBI slice
def budget_trainer(model, train, val, run, task, epochs: int, opt: dict, grad_clip: float = 10.0) -> Trainer:
    """The Trainer of the fixed-budget comparisons (``instance_compare.py``, ``panoptic_compare.py``): batch 4,
    ``opt["optimizer"]`` at ``opt["lr"]``, weight decay 1e-4, cosine schedule with ``min(opt["warmup"], epochs / 4)``
    warm-up epochs, one evaluation at the end."""
    return Trainer(
        model,
        train,
        val,
        run,
        task=task,
        epochs=epochs,
        batch_size=4,
        optimizer=opt["optimizer"],
        lr=opt["lr"],
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=min(opt["warmup"], epochs / 4),
        grad_clip=grad_clip,
        progress=False,
        eval_every=epochs,
    )


COMMON = {
    "synthetic": {
        "rpn_pre_nms_top_n_train": 256,
        "rpn_post_nms_top_n_train": 128,
        "rpn_pre_nms_top_n_test": 256,
        "rpn_post_nms_top_n_test": 64,
        "rpn_batch_size_per_image": 32,
        "box_batch_size_per_image": 16,
        "box_detections_per_img": 20,
    },
    "isbi2012_instances": {
        "rpn_pre_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_train": 500,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 500,
        "rpn_batch_size_per_image": 256,
        "box_batch_size_per_image": 128,
        "box_detections_per_img": 200,
    },
}
STUDIES = {
    "q19": [
        ("R-50-FPN", "mask_rcnn_resnet50_fpn", {}),
        ("MobileNetV3-L-FPN", "mask_rcnn_mobilenet_v3_large_fpn", {"rpn_score_thresh": 0.0}),
    ],
    "q14": [
        ("R-50-FPN RoIAlign", "mask_rcnn_resnet50_fpn", {"pooler": "roi_align"}),
        ("R-50-FPN RoIPool", "mask_rcnn_resnet50_fpn", {"pooler": "roi_pool"}),
    ],
}


def datasets(args):
    if args.data == "synthetic":
        kw = {
            "image_size": args.size,
            "num_classes": args.classes,
            "max_shapes": args.max_shapes,
            "radius_range": tuple(args.radius),
            "cache": True,
        }
        train = SyntheticShapes(args.num_train, split="train", transform=build_transforms(train=True), **kw)
        val = SyntheticShapes(args.num_val, split="val", transform=build_transforms(train=False), **kw)
        return train, val
    train = ISBI2012Instances(args.root, split="train", transform=build_transforms(train=True, vflip=0.5))
    val = ISBI2012Instances(args.root, split="val", transform=build_transforms(train=False))
    return train, val


@torch.inference_mode()
def latency_ms(model, dataset, n: int = 8) -> float:
    model.eval()
    times = []
    for i in range(min(n, len(dataset))):
        x = dataset[i]["image"]
        t0 = time.perf_counter()
        model([x])
        times.append(time.perf_counter() - t0)
    return 1000 * median(times[1:] if len(times) > 1 else times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="q19")
    p.add_argument("--data", choices=("synthetic", "isbi2012_instances"), default="synthetic")
    p.add_argument("--root", default="../shared/data/isbi2012", help="ISBI 2012 folder")
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help="synthetic image size / model input size (ISBI slices are resized to it inside the model)",
    )
    p.add_argument("--classes", type=int, default=4, help="synthetic: background + shape classes")
    p.add_argument("--max-shapes", type=int, default=2, help="synthetic: at most this many shapes per image")
    p.add_argument("--radius", type=float, nargs=2, default=[0.2, 0.4], help="synthetic: shape radius range")
    p.add_argument("--mask-resolution", type=int, default=14, help="mask RoI size (masks of twice this side)")
    p.add_argument("--num-train", type=int, default=96)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup", type=float, default=None, help="warm-up epochs (default: min(1, epochs / 4))")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, val = datasets(args)
    min_size = args.size  # ISBI: whole 512 px slices, resized to this inside the model for training and eval
    rows = []
    for label, name, extra in STUDIES[args.study]:
        seed_everything(0)
        model = create_model(
            name,
            num_classes=train.num_classes,
            in_channels=train.in_channels,
            min_size=min_size,
            max_size=min_size,
            mask_resolution=args.mask_resolution,
            **COMMON[args.data],
            **extra,
        )
        with tempfile.TemporaryDirectory() as run:
            trainer = Trainer(
                model,
                train,
                val,
                run,
                task=InstanceTask(class_names=train.class_names),
                epochs=args.epochs,
                batch_size=args.batch_size,
                optimizer="sgd",
                lr=args.lr,
                weight_decay=1e-4,
                schedule="cosine",
                warmup_epochs=min(1.0, args.epochs / 4) if args.warmup is None else args.warmup,
                grad_clip=10.0,
                progress=False,
                eval_every=args.epochs,
            )
            t0 = time.perf_counter()
            summary = trainer.fit()
            train_s = time.perf_counter() - t0
        final = summary["final"]
        row = {
            "study": args.study,
            "data": args.data,
            "config": label,
            "model": name,
            **extra,
            "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
            "steps": trainer.steps_per_epoch * args.epochs,
            "train_s": train_s,
            "mask_ap": final["val_mask_ap"],
            "mask_ap50": final["val_mask_ap50"],
            "box_ap50": final["val_box_ap50"],
            "latency_ms": latency_ms(model, val),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.study} on {args.data} ({args.size} px, {rows[0]['steps']} steps, {args.threads} threads)")
    print(f"{'config':<22} {'params':>7} {'mask AP':>8} {'AP50':>6} {'box AP50':>9} {'train s':>8} {'latency':>9}")
    for r in rows:
        print(
            f"{r['config']:<22} {r['params_m']:6.1f}M {r['mask_ap']:8.3f} {r['mask_ap50']:6.3f} {r['box_ap50']:9.3f} "
            f"{r['train_s']:8.0f} {r['latency_ms']:7.0f}ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
