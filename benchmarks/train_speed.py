"""Training speed of maskworks' default path against a plain PyTorch loop over ``smp.Unet``, on the same CamVid recipe.

    python benchmarks/train_speed.py                         # 24 steps a run, 2 rounds, ResNet-18 U-Net
    python benchmarks/train_speed.py --steps 48 --rounds 3 --json benchmarks/results/train_speed_cpu.json

ours: :class:`maskworks.engine.Trainer` exactly as ``maskworks train --config configs/camvid_unet.yaml`` builds it
(the default path: channels-last convolutions, the trainer's loader, loss and optimizer), timed over one epoch of
``steps`` batches. peer: the loop of smp's README, ``smp.Unet`` in the default NCHW layout, ``torch.optim.AdamW``
and ``nn.CrossEntropyLoss``, over a DataLoader of the same dataset, batch and workers. Both start from the same
weights (smp's initial state dict, identical keys), see the same images in the same crops, and run one after the
other in this process, alternating, with a fixed thread count: the ratio is ours / peer in training steps per
second (higher is better), median over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from maskworks import create_model
from maskworks.data import CamVid, build_transforms
from maskworks.data import collate_samples as collate
from maskworks.engine import Trainer, seed_everything
from maskworks.losses import CrossEntropyLoss

CAMVID_MEDIAN_FREQ = [0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614]


def recipe_dataset(root: str, n: int) -> Subset:
    """The first ``n`` CamVid training images with the augmentation of ``configs/camvid_unet.yaml``."""
    tf = build_transforms(train=True, crop_size=(352, 480), scale_range=(0.5, 2.0), hflip=0.5, color_jitter=0.2)
    return Subset(CamVid(root, split="train", transform=tf), list(range(n)))


def run_ours(state: dict, data: Subset, args) -> float:
    """Steps per second of the maskworks trainer's default path over one epoch."""
    model = create_model("unet", encoder=args.encoder, num_classes=11)
    model.load_state_dict(state)
    weights = torch.tensor(CAMVID_MEDIAN_FREQ)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            model,
            data,
            None,
            run_dir,
            loss_fn=CrossEntropyLoss(weight=weights),
            epochs=1,
            batch_size=args.batch_size,
            lr=1e-3,
            num_workers=args.workers,
            device="cpu",
            progress=False,
            seed=0,
            amp=args.amp,
        )
        t0 = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t0
    return trainer.steps_per_epoch / seconds


def run_peer(state: dict, data: Subset, args) -> float:
    """Steps per second of smp's README loop (NCHW) over one epoch of the same data."""
    import segmentation_models_pytorch as smp

    model = smp.Unet(args.encoder, encoder_weights=None, classes=11)
    model.load_state_dict(state)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(CAMVID_MEDIAN_FREQ), ignore_index=255)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = DataLoader(
        data, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers, collate_fn=collate
    )
    model.train()
    t0 = time.perf_counter()
    steps = 0
    for batch in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(batch["image"]), batch["mask"])
        loss.backward()
        optimizer.step()
        steps += 1
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/camvid")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--steps", type=int, default=24, help="training steps per run")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (ours, peer)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--amp",
        default="auto",
        help="the trainer's train.amp (auto: bfloat16 on CPUs with AMX; off: float32, channels-last only)",
    )
    p.add_argument("--json", help="write the result to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import segmentation_models_pytorch as smp

    seed_everything(0)
    state = smp.Unet(args.encoder, encoder_weights=None, classes=11).state_dict()
    data = recipe_dataset(args.data, args.steps * args.batch_size)
    rows = {"maskworks": [], "smp": []}
    for r in range(args.rounds):
        for impl, fn in (("maskworks", run_ours), ("smp", run_peer)):
            seed_everything(r)
            rows[impl].append(fn(state, data, args))
            print(f"round {r + 1}: {impl:9s} {rows[impl][-1]:.3f} steps/s", flush=True)
    ours, peer = statistics.median(rows["maskworks"]), statistics.median(rows["smp"])
    result = {
        "recipe": "configs/camvid_unet.yaml: crop 352x480, scale 0.5-2, hflip, colour jitter, batch 8",
        "encoder": args.encoder,
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "workers": args.workers,
        "threads": args.threads,
        "amp": args.amp,
        "maskworks_steps_per_s": rows["maskworks"],
        "smp_steps_per_s": rows["smp"],
        "ratio_median": ours / peer,
        "torch": torch.__version__,
    }
    print(
        f"training steps/s, median of {args.rounds}: maskworks {ours:.3f}, smp loop {peer:.3f}, ratio {ours / peer:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
