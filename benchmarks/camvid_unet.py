"""Train a registered model (default ``unet`` with a ResNet-18 encoder, from scratch) on CamVid for a fixed
wall-clock budget.

Prints the validation mIoU (11 classes, void ignored), the model's inference latency at CamVid's full 360x480
(batch 1, median of 10 after warm-up) and, for ``unet``, first a side-by-side training throughput check against
``segmentation_models_pytorch.Unet`` with the same encoder (both built with random weights, same batch, same
input size).

    python benchmarks/camvid_unet.py --budget-min 20
    python benchmarks/camvid_unet.py --budget-min 2 --data ../shared/data/camvid   # smoke run
    python benchmarks/camvid_unet.py --steps 900 --loss ce          # fixed step budget, plain CE
    python benchmarks/camvid_unet.py --steps 900 --loss wce+dice    # same budget, weighted CE + Dice
    python benchmarks/camvid_unet.py --model bisenetv2 --budget-min 20   # real-time nets, same budget
    python benchmarks/camvid_unet.py --model fast_scnn --model-kwargs '{"aux": true}'
    python benchmarks/camvid_unet.py --model mask2former --model-kwargs '{"encoder": "resnet50"}' --lr 5e-4 --grad-clip 1

``--loss`` is ``ce`` (unweighted cross-entropy), ``wce`` (SegNet median-frequency weighted CE, the
default) or any :func:`maskworks.losses.build_loss` spec; ``wce`` inside a spec means the weighted CE,
so ``wce+dice`` is median-frequency weighted CE plus multiclass Dice. ``--steps`` replaces the
wall-clock budget by a fixed number of optimizer steps (the schedule then runs over steps), which
makes two runs comparable even when the machine is shared. A set-prediction model (``mask2former``) trains with its
own loss (one target segment per class present; ``--loss`` does not apply); ``--grad-clip`` clips the gradient norm.

The learning rate follows a poly schedule over *elapsed time* (lr * (1 - t/T)^0.9), so the run
ends annealed whatever the machine's speed. Training uses random scale + crop at
``--train-scale`` of the original resolution; evaluation resizes images by ``--eval-scale``
and upsamples the logits to the full 480x360 label maps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maskworks import create_model
from maskworks.data import CamVid, build_transforms
from maskworks.data import collate_samples as collate
from maskworks.engine import build_optimizer, seed_everything
from maskworks.losses import build_loss
from maskworks.metrics import ConfusionMatrix

CAMVID_MEDIAN_FREQ = [0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614]


def throughput(model: torch.nn.Module, batch: int, size: tuple[int, int], steps: int = 5) -> float:
    """Training images per second (forward + backward + SGD step)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, *size)
    y = torch.randint(0, 11, (batch, *size))
    model.train()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def latency_ms(model: torch.nn.Module, size: tuple[int, int] = (360, 480), runs: int = 10) -> float:
    """Median eval-mode forward time of one ``size`` image, after two warm-up calls."""
    model.eval()
    x = torch.randn(1, 3, *size)
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        model(x)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def peer_speed(batch: int, size: tuple[int, int]) -> dict | None:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return None
    torch.manual_seed(0)
    ours = create_model("unet", encoder="resnet18", num_classes=11)
    peer = smp.Unet("resnet18", encoder_weights=None, classes=11)
    rows = {}
    for _ in range(2):  # alternate to share machine noise
        rows.setdefault("maskworks", []).append(throughput(ours, batch, size))
        rows.setdefault("smp", []).append(throughput(peer, batch, size))
    best = {k: max(v) for k, v in rows.items()}
    return {"maskworks_img_s": best["maskworks"], "smp_img_s": best["smp"], "ratio": best["maskworks"] / best["smp"]}


@torch.no_grad()
def evaluate(model, dataset, eval_scale: float, device) -> dict:
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, class_names=dataset.class_names, device=device)
    for batch in DataLoader(dataset, batch_size=4, collate_fn=collate):
        x = batch["image"].to(device)
        if eval_scale != 1.0:
            x = F.interpolate(x, scale_factor=eval_scale, mode="bilinear", align_corners=False)
        logits = model(x)
        logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1), batch["mask"].to(device))
    return cm.compute()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet", help="registered model name")
    p.add_argument(
        "--model-kwargs", default=None, help='JSON constructor arguments (default for unet: {"encoder": "resnet18"})'
    )
    p.add_argument(
        "--impl", choices=("maskworks", "smp"), default="maskworks", help="smp: train smp.Unet (same encoder) instead"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--same-init-as-smp",
        action="store_true",
        help="unet only: start from smp.Unet's initial weights (built with the same seed) for a like-for-like run",
    )
    p.add_argument("--budget-min", type=float, default=20.0, help="training wall-clock budget in minutes")
    p.add_argument("--steps", type=int, default=0, help="fixed number of optimizer steps (overrides --budget-min)")
    p.add_argument("--loss", default="wce", help="ce | wce | a build_loss spec where wce is the weighted CE")
    p.add_argument("--data", default="../shared/data/camvid")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--train-scale", type=float, default=0.5, help="mean training scale of the 480x360 images")
    p.add_argument("--crop", type=int, nargs=2, default=(160, 224), metavar=("H", "W"))
    p.add_argument("--eval-scale", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--default-path",
        action="store_true",
        help="train as maskworks.engine.Trainer does by default: channels-last convolutions and, on CPUs with AMX "
        "(and on GPUs), bfloat16 autocast",
    )
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if args.impl == "smp" and args.model != "unet":
        raise SystemExit("--impl smp trains smp.Unet: use it with --model unet")

    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.model == "unet":
        model_kwargs.setdefault("encoder", "resnet18")
    speed = None
    if args.model == "unet" and args.impl == "maskworks" and not args.threads:
        speed = peer_speed(args.batch_size, tuple(args.crop))
    if speed:
        print(
            f"training throughput at {args.crop[0]}x{args.crop[1]}, batch {args.batch_size}: maskworks "
            f"{speed['maskworks_img_s']:.2f} img/s, smp {speed['smp_img_s']:.2f} img/s, ratio {speed['ratio']:.2f}"
        )

    s = args.train_scale
    tf = build_transforms(
        train=True, crop_size=tuple(args.crop), scale_range=(0.75 * s, 1.5 * s), hflip=0.5, color_jitter=0.2
    )
    train_set = CamVid(args.data, split="train", transform=tf)
    val_set = CamVid(args.data, split="val", transform=build_transforms(train=False))
    if args.impl == "smp" or args.same_init_as_smp:
        import segmentation_models_pytorch as smp

        # built first in both runs, so the random state that follows (data order, augmentation) is the same too
        reference = smp.Unet(model_kwargs["encoder"], encoder_weights=None, classes=train_set.num_classes)
    if args.impl == "smp":
        model = reference.to(device)
    else:
        model = create_model(args.model, num_classes=train_set.num_classes, **model_kwargs)
        if args.same_init_as_smp:
            model.load_state_dict(reference.state_dict())  # identical keys: the same initial function
        model = model.to(device)
    channels_last, amp_dtype = False, None
    if args.default_path:
        from maskworks.engine.perf import to_channels_last
        from maskworks.engine.trainer import cpu_has_native_bf16

        channels_last = to_channels_last(model)
        if device.type == "cuda" or cpu_has_native_bf16():
            amp_dtype = torch.bfloat16
    opt = build_optimizer(model, "adamw", lr=args.lr, weight_decay=1e-4)
    set_prediction = bool(getattr(model, "set_prediction", False))
    weighted = "wce" in args.loss  # the median-frequency weights go to the CE term only
    options = {"ce": {"weight": torch.tensor(CAMVID_MEDIAN_FREQ)}} if weighted else None
    loss_fn = build_loss(args.loss.replace("wce", "ce"), options=options)
    loss_fn = loss_fn.to(device)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    budget = args.budget_min * 60.0
    t0, steps, epochs, done = time.perf_counter(), 0, 0, False
    while not done:
        model.train()
        for batch in loader:
            frac = steps / args.steps if args.steps else (time.perf_counter() - t0) / budget
            if frac >= 1.0:
                done = True
                break
            for g in opt.param_groups:
                g["lr"] = args.lr * (1.0 - frac) ** 0.9
            images = batch["image"].to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = batch["mask"].to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                if set_prediction:  # Mask2Former: its own set loss on one segment per class present
                    loss = sum(model(images, [{"semantic": m} for m in masks]).values())
                else:
                    out = model(images)
            if not set_prediction:
                loss = loss_fn(out, masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            steps += 1
            if steps % 50 == 0:
                print(
                    f"  {time.perf_counter() - t0:7.0f} s  epoch {epochs}  step {steps}  loss {loss.item():.4f}",
                    flush=True,
                )
        else:
            epochs += 1
    train_s = time.perf_counter() - t0
    metrics = evaluate(model, val_set, args.eval_scale, device)
    latency = latency_ms(model) if device.type == "cpu" else None
    result = {
        "model": args.model,
        "impl": args.impl,
        "model_kwargs": model_kwargs,
        "params": sum(p.numel() for p in model.parameters()),
        "latency_ms_360x480": latency,
        "budget_min": None if args.steps else args.budget_min,
        "budget_steps": args.steps or None,
        "loss": "set loss (Mask2Former)" if set_prediction else args.loss,
        "lr": args.lr,
        "grad_clip": args.grad_clip or None,
        "train_seconds": round(train_s, 1),
        "steps": steps,
        "epochs": round(steps * args.batch_size / len(train_set), 2),
        "val_miou": metrics["miou"],
        "val_pixel_acc": metrics["pixel_acc"],
        "val_mean_acc": metrics["mean_acc"],
        "per_class_iou": dict(zip(train_set.class_names, metrics["iou"])),
        "speed_vs_smp": speed,
        "device": str(device),
        "default_path": {"channels_last": channels_last, "autocast": str(amp_dtype)} if args.default_path else None,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    budget_txt = f"{args.steps} steps" if args.steps else f"{args.budget_min:g} min"
    print(f"{args.impl} {args.model}: val mIoU after {budget_txt} ({args.loss}): {metrics['miou']:.4f}")


if __name__ == "__main__":
    main()
