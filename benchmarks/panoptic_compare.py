"""Panoptic FPN against Mask2Former on synthetic panoptic scenes, each trained from scratch for the same wall-clock
budget.

    python benchmarks/panoptic_compare.py --budget 300
    python benchmarks/panoptic_compare.py --budget 20 --num-train 16     # smoke run

Data: ``SyntheticShapes(panoptic=True)`` at ``--size`` px: ``--stuff`` textured stuff classes (stripes, checks, ...)
as smooth regions, shapes of ``--things`` classes as things (up to ``--max-shapes``, several per class possible).
Both models use the same encoder (``--encoder``, random init) with their own heads at full width and their own
recipes: Panoptic FPN as our Mask R-CNN's synthetic recipe (SGD 0.02, momentum 0.9, 1 warm-up epoch, the
synthetic proposal counts of ``instance_budget.py``, images kept at their size; the fusion's stuff area limit scaled
from detectron2's 4096 px at ~800 x 1333 to the same share of the image, 16 px at 64 px), Mask2Former with AdamW 5e-4 and
gradient clipping at 1, by default with a narrow decoder (64 wide, 16 queries, 3 layers, 256 points;
``--m2f-full``: 100 queries, 9 layers, 256 wide, 12,544 points, AdamW 5e-4). A one-epoch probe measures each model's epoch
time; a fresh model from the same seed then trains ``floor(budget / epoch time)`` epochs with a cosine schedule,
batch 4, bf16 autocast where the CPU has AMX. Reported: PQ / SQ / RQ overall, for things and for stuff (panopticapi's
rules, :class:`maskworks.tasks.PanopticTask`), the training time and the eval latency of one image (median,
``inference_mode``, float32, fusion / merging included).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from statistics import median

import torch
from instance_budget import COMMON, budget_trainer  # benchmarks/ (the script's folder) is on sys.path
from torchvision.transforms import v2

from maskworks import create_model
from maskworks.data import SyntheticShapes
from maskworks.engine import Trainer, seed_everything
from maskworks.tasks import PanopticTask

# Mask2Former's decoder at test width (maskworks.testing.TINY_MASK2FORMER's, 16 queries): the full one (256 wide,
# 100 queries, 9 layers, 12,544 points) does not get past the object threshold in a few minutes from scratch
NARROW = {
    "hidden_dim": 64,
    "mask_dim": 64,
    "num_heads": 4,
    "num_queries": 16,
    "enc_layers": 1,
    "enc_ffn_dim": 128,
    "dec_layers": 3,
    "dec_ffn_dim": 128,
    "num_points": 256,
}


def recipes(args) -> list[tuple[str, str, dict, dict]]:
    return [
        (
            f"Panoptic FPN ({args.encoder}-FPN)",
            "panoptic_fpn",
            {
                "encoder": args.encoder,
                "min_size": args.size,
                "max_size": args.size,
                # detectron2's 4096 px is for ~800 x 1333 images: the same share of a --size image
                "stuff_area_limit": max(1, round(4096 * args.size**2 / (800 * 1333))),
                **COMMON["synthetic"],
            },
            {"optimizer": "sgd", "lr": 0.02, "warmup": 1.0, "grad_clip": 10.0},
        ),
        (
            f"Mask2Former ({args.encoder}, {'full width' if args.m2f_full else 'narrow decoder'})",
            "mask2former",
            {"encoder": args.encoder, "task": "panoptic", **({} if args.m2f_full else NARROW)},
            {"optimizer": "adamw", "lr": 5e-4 if args.m2f_full else 1e-3, "warmup": 0.5, "grad_clip": 1.0},
        ),
    ]


def datasets(args):
    kw = {
        "image_size": args.size,
        "num_classes": args.things + 1,
        "max_shapes": args.max_shapes,
        "radius_range": (0.15, 0.3),
        "panoptic": True,
        "num_stuff": args.stuff,
        "cache": True,
    }
    train = SyntheticShapes(args.num_train, split="train", transform=v2.RandomHorizontalFlip(0.5), **kw)
    return train, SyntheticShapes(args.num_val, split="val", **kw)


def make_trainer(model, train, val, run, epochs, opt) -> Trainer:
    task = PanopticTask(class_names=train.class_names, isthing=train.isthing)
    return budget_trainer(model, train, val, run, task, epochs, opt, grad_clip=opt["grad_clip"])


def build(name, options, train):
    return create_model(name, num_classes=train.num_classes, thing_classes=train.thing_classes, **options)


@torch.inference_mode()
def latency_ms(model, dataset) -> float:
    model.eval()
    times = []
    for i in range(min(len(dataset), 11)):
        x = dataset[i]["image"]
        t0 = time.perf_counter()
        model([x])
        times.append(time.perf_counter() - t0)
    return 1000 * median(times[1:])


def run(label, name, options, opt, train, val, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        seed_everything(0)
        probe = make_trainer(build(name, options, train), train, None, tmp, 1, opt)
        t0 = time.perf_counter()
        probe.fit()
        epoch_s = time.perf_counter() - t0
    epochs = max(1, math.floor(args.budget / epoch_s))
    seed_everything(0)
    model = build(name, options, train)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, train, val, tmp, epochs, opt)
        t0 = time.perf_counter()
        final = trainer.fit()["final"]
        train_s = time.perf_counter() - t0
    row = {
        "model": label,
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "probe_epoch_s": round(epoch_s, 1),
        "train_s": round(train_s, 1),
        **{k: final[f"val_{k}"] for k in ("pq", "sq", "rq", "pq_things", "pq_stuff")},
        "latency_ms": round(latency_ms(model, val), 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per model")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--stuff", type=int, default=2)
    p.add_argument("--things", type=int, default=2)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument("--num-train", type=int, default=128)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m2f-full", action="store_true", help="Mask2Former at full width (default: a narrow decoder)")
    p.add_argument("--only", nargs="+", choices=("panoptic_fpn", "mask2former"), help="run only these models")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, val = datasets(args)
    rows = [run(*r, train, val, args) for r in recipes(args) if not args.only or r[1] in args.only]
    print("| model | params | epochs in budget | train s | PQ | SQ | RQ | PQ things | PQ stuff | latency ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['epochs']} | {r['train_s']:.0f} | {r['pq']:.3f} | "
            f"{r['sq']:.3f} | {r['rq']:.3f} | {r['pq_things']:.3f} | {r['pq_stuff']:.3f} | {r['latency_ms']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
