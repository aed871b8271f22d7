"""Forward + backward time of maskworks losses against smp and MONAI, measured alternately in one run.

    python benchmarks/losses.py                       # (8, 12, 512, 512), as in the issue
    python benchmarks/losses.py --shape 2 12 128 128  # quick
    python benchmarks/losses.py --inputs regions --only hausdorff_dt boundary

Prints one row per (loss, peer) with milliseconds and the ratio ours / peer (<= 1.0: ours is at
least as fast). Peers get the same logits and the same integer target (MONAI's as (B, 1, H, W)).

``--inputs noise`` (default): i.i.d. Gaussian logits and uniformly random labels per pixel, so every
pixel is on a class boundary. ``--inputs regions``: label maps made of smooth regions (the argmax of
bilinearly upsampled random fields on a 1/32 grid, like a scene of objects) and logits that are a
smooth field correlated with the labels plus noise, like a half-trained network's; distance-based
losses depend on this structure, the others do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from maskworks.losses import BoundaryLoss, DiceLoss, FocalLoss, HausdorffDTLoss, LovaszSoftmaxLoss
from maskworks.losses.boundary import signed_distance_map


def timed(fn, logits, repeats: int) -> float:
    """Median milliseconds of ``fn(x).backward()`` over ``repeats`` runs (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        x = logits.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(x).backward()
        if logits.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_inputs(kind: str, b: int, k: int, h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "noise":
        logits = torch.randn(b, k, h, w, generator=g)
        return logits, torch.randint(0, k, (b, h, w), generator=g)

    def field(cells: int) -> torch.Tensor:
        low = torch.randn(b, k, max(1, h // cells), max(1, w // cells), generator=g)
        return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)

    scene = field(32)
    target = scene.argmax(1)
    logits = 4.0 * (scene + 0.7 * field(16)) + 0.5 * torch.randn(b, k, h, w, generator=g)
    return logits, target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=(8, 12, 512, 512), metavar=("B", "K", "H", "W"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inputs", choices=("noise", "regions"), default="noise", help="see the module docstring")
    p.add_argument("--only", nargs="+", help="run only these losses (names as printed)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    import monai.losses as ml
    import segmentation_models_pytorch as smp

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b, k, h, w = args.shape
    g = torch.Generator().manual_seed(0)
    logits, target = make_inputs(args.inputs, b, k, h, w, g)
    logits, target = logits.to(device), target.to(device)
    target_1 = target[:, None]
    dist = signed_distance_map(target.cpu(), k).to(device)

    ours = {
        "dice": lambda x: DiceLoss("multiclass", ignore_index=None)(x, target),
        "focal": lambda x: FocalLoss("multiclass", ignore_index=None)(x, target),
        "lovasz": lambda x: LovaszSoftmaxLoss(ignore_index=None)(x, target),
        "hausdorff_dt": lambda x: HausdorffDTLoss(include_background=True, ignore_index=None)(x, target),
        "boundary (precomputed maps)": lambda x: BoundaryLoss()(x, target, dist_maps=dist),
    }
    peers = {
        "dice": [
            ("smp", lambda x: smp.losses.DiceLoss("multiclass")(x, target)),
            ("monai", lambda x: ml.DiceLoss(softmax=True, to_onehot_y=True)(x, target_1)),
        ],
        "focal": [
            ("smp", lambda x: smp.losses.FocalLoss("multiclass")(x, target)),
            ("monai", lambda x: ml.FocalLoss(use_softmax=True, to_onehot_y=True)(x, target_1)),
        ],
        "lovasz": [("smp", lambda x: smp.losses.LovaszLoss("multiclass")(x, target))],
        "hausdorff_dt": [("monai", lambda x: ml.HausdorffDTLoss(softmax=True, to_onehot_y=True)(x, target_1))],
        "boundary (precomputed maps)": [],
    }
    rows = []
    unknown = set(args.only or []) - set(ours) - {n.split()[0] for n in ours}
    if unknown:
        p.error(f"--only: unknown losses {sorted(unknown)}; available: {sorted(ours)}")
    for name, fn in ours.items():
        if args.only and name not in args.only and name.split()[0] not in args.only:
            continue
        if not peers[name]:
            ms = timed(fn, logits, args.repeats)
            rows.append({"loss": name, "peer": None, "ours_ms": round(ms, 1)})
            print(f"{name:<28} ours {ms:9.1f} ms   (no peer implementation)", flush=True)
            continue
        for peer_name, peer_fn in peers[name]:
            ours_ms, peer_ms = [], []
            for _ in range(2):  # alternate to share the machine's noise
                ours_ms.append(timed(fn, logits, args.repeats))
                peer_ms.append(timed(peer_fn, logits, args.repeats))
            o, q = min(ours_ms), min(peer_ms)
            rows.append(
                {
                    "loss": name,
                    "peer": peer_name,
                    "ours_ms": round(o, 1),
                    "peer_ms": round(q, 1),
                    "ratio": round(o / q, 3),
                }
            )
            print(f"{name:<28} ours {o:9.1f} ms   {peer_name:<6} {q:9.1f} ms   ratio {o / q:.2f}", flush=True)
    meta = {"shape": [b, k, h, w], "inputs": args.inputs, "device": str(device), "threads": torch.get_num_threads()}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
