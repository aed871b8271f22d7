"""Volumes and microscopy on 2 CPU cores: 3D sliding window and the ``dynunet`` training step against MONAI, and the
ISBI 2012 instance pipeline (watershed vs connected components).

Stages (each appends to ``benchmarks/results/volumetric.json``):

- ``sliding``: a 256^3 one-channel volume, 96^3 windows, overlap 0.5, Gaussian blending, 4 windows per call, the
  same small 3D model (3x3x3 conv 1->8, ReLU, 1x1x1 conv 8->3): :func:`maskworks.inference.sliding_window` against
  ``monai.inferers.sliding_window_inference``; median time and peak resident memory (:func:`maskworks.bench.compare`).
- ``train_step``: nnU-Net's default 3D network for a 1-channel, 3-class task (5 stages, 32-320 features, instance
  norm, LeakyReLU) as our ``dynunet`` and MONAI's ``DynUNet`` with the same weights: forward + cross-entropy +
  backward + AdamW step on a batch of 2 patches of 64^3.
- ``isbi``: a U-Net (``unet_vanilla``, features 16-128) with foreground / boundary / distance heads trained for
  ``--budget-min`` on ISBI 2012 (slices 0-15, 256-pixel crops, flips), then on the held-out slices 16-19: instance
  AP over IoU 0.5:0.95 (:class:`~maskworks.metrics.InstanceMatching`), AP50 and the aggregated Jaccard index of the
  marker-controlled watershed against connected components of the same model's foreground.

    python benchmarks/volumetric.py --stage sliding
    python benchmarks/volumetric.py --stage train_step
    python benchmarks/volumetric.py --stage isbi --budget-min 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from maskworks.bench import compare  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "volumetric.json"


def _save(key: str, value) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))


def stage_sliding(args) -> None:
    from monai.inferers import sliding_window_inference

    from maskworks.inference import sliding_window

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 3, 1)).eval()
    x = torch.randn(1, 1, args.size, args.size, args.size)
    window = (96, 96, 96)
    with torch.no_grad():
        ours = sliding_window(model, x, window, overlap=0.5, blend="gaussian", batch_size=4, padding_mode="constant")
        ref = sliding_window_inference(x, window, 4, model, overlap=0.5, mode="gaussian")
    diff = float((ours - ref).abs().max())

    def run_ours():
        with torch.no_grad():
            return sliding_window(
                model, x, window, overlap=0.5, blend="gaussian", batch_size=4, padding_mode="constant"
            )

    def run_monai():
        with torch.no_grad():
            return sliding_window_inference(x, window, 4, model, overlap=0.5, mode="gaussian")

    c = compare({"maskworks": run_ours, "monai": run_monai}, warmup=1, repeats=args.repeats)
    print(c.markdown("monai"), flush=True)
    result = {"size": args.size, "window": list(window), "max_abs_diff": diff, "comparison": c.to_dict()}
    _save("sliding_window_3d", result)


def stage_train_step(args) -> None:
    from monai.networks.nets import DynUNet as MonaiDynUNet

    from maskworks.convert import convert_monai_dynunet
    from maskworks.models.volumetric import DynUNet

    kernels = [[3, 3, 3]] * 5
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
    torch.manual_seed(0)
    ref = MonaiDynUNet(3, 1, 3, kernels, strides, strides[1:], filters=[32, 64, 128, 256, 320])
    ours = DynUNet(1, 3, kernels, strides, strides[1:], filters=[32, 64, 128, 256, 320])
    ours.load_state_dict(convert_monai_dynunet(ref.state_dict())[0])
    x = torch.randn(2, 1, 64, 64, 64)
    y = torch.randint(0, 3, (2, 64, 64, 64))
    loss_fn = nn.CrossEntropyLoss()

    def step_fn(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    ref.train(), ours.train()
    c = compare({"maskworks": step_fn(ours), "monai": step_fn(ref)}, warmup=1, repeats=args.repeats)
    print(c.markdown("monai"), flush=True)
    _save("dynunet_train_step", {"patch": [2, 1, 64, 64, 64], "comparison": c.to_dict()})


def _cut(t: torch.Tensor, window: tuple, crop: int) -> torch.Tensor:
    """``t[index]``'s ``crop`` square at ``(top, left)``, mirrored left-right when asked."""
    index, top, left, flip = window
    out = t[index, ..., top : top + crop, left : left + crop]
    return out.flip(-1) if flip else out


def stage_isbi(args) -> None:
    from maskworks.data import ISBI2012Instances
    from maskworks.methods.microscopy import (
        MicroscopyLoss,
        connected_component_instances,
        decode_outputs,
        instance_map_from_masks,
        instance_targets,
        microscopy_model,
        watershed_instances,
    )
    from maskworks.metrics import AggregatedJaccardIndex, InstanceMatching

    val_slices = list(range(16, 20))
    train = ISBI2012Instances(args.data, split="train", val_slices=val_slices)
    val = ISBI2012Instances(args.data, split="val", val_slices=val_slices)
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    ids = np.stack([instance_map_from_masks(train[i]["instances"]["masks"]) for i in range(len(train))])
    ignore = torch.stack([train[i]["mask"] for i in range(len(train))]) == 255
    targets = instance_targets(ids, ignore=ignore)
    torch.manual_seed(0)
    model = microscopy_model("unet_vanilla", in_channels=1, features=(16, 32, 64, 128))
    loss_fn = MicroscopyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    crop, batch = 256, 4
    budget, t0, steps = args.budget_min * 60, time.perf_counter(), 0
    g = torch.Generator().manual_seed(0)
    model.train()
    while time.perf_counter() - t0 < budget:
        idx = torch.randint(len(images), (batch,), generator=g)
        top = torch.randint(images.shape[-2] - crop + 1, (batch,), generator=g)
        left = torch.randint(images.shape[-1] - crop + 1, (batch,), generator=g)
        flip = torch.rand(batch, generator=g) < 0.5

        windows = list(zip(idx.tolist(), top.tolist(), left.tolist(), flip.tolist()))
        x = torch.stack([_cut(images, w, crop) for w in windows])
        tgt = {k: torch.stack([_cut(v, w, crop) for w in windows]) for k, v in targets.items()}
        frac = (time.perf_counter() - t0) / budget
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - frac) ** 0.9
        loss = loss_fn(model(x), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    methods = {
        "watershed (defaults)": lambda fg, b, d: watershed_instances(fg, b, d),
        "watershed (marker_threshold 0.1, min_marker_size 10)": lambda fg, b, d: watershed_instances(
            fg, b, d, marker_threshold=0.1, min_marker_size=10
        ),
        "connected components of the foreground": lambda fg, b, d: connected_component_instances(fg),
    }
    scores = {name: (InstanceMatching(), AggregatedJaccardIndex(), InstanceMatching(0.5)) for name in methods}
    for i in range(len(val)):
        sample = val[i]
        target = instance_map_from_masks(sample["instances"]["masks"])
        with torch.inference_mode():
            maps = decode_outputs(model(sample["image"][None]))
        fg, boundary, distance = maps["foreground"][0], maps["boundary"][0], maps["distance"][0]
        for name, fn in methods.items():
            pred = fn(fg, boundary, distance)
            for metric in scores[name]:
                metric.update(pred, target)
    rows = []
    for name, (matching, aji, m50) in scores.items():
        rows.append({"method": name, "ap": matching.compute()["ap"], "ap50": m50.compute()["ap"],
                     "aji": aji.compute()["aji"]})  # fmt: skip
        print(rows[-1], flush=True)
    _save("isbi_instances", {"budget_min": args.budget_min, "steps": steps, "val_slices": val_slices, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("sliding", "train_step", "isbi"), required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=256, help="sliding: volume side")
    p.add_argument("--budget-min", type=float, default=6.0, help="isbi: training minutes")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isbi2012"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"sliding": stage_sliding, "train_step": stage_train_step, "isbi": stage_isbi}[args.stage](args)


if __name__ == "__main__":
    main()
