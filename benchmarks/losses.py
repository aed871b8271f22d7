"""Forward + backward time of maskworks losses against smp and MONAI, measured alternately in one run.

    python benchmarks/losses.py                       # (8, 12, 512, 512), as in the issue
    python benchmarks/losses.py --shape 2 12 128 128  # quick

Prints one row per (loss, peer) with milliseconds and the ratio ours / peer (<= 1.0: ours is at
least as fast). Peers get the same logits and the same integer target (MONAI's as (B, 1, H, W)).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=(8, 12, 512, 512), metavar=("B", "K", "H", "W"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    import monai.losses as ml
    import segmentation_models_pytorch as smp

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b, k, h, w = args.shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, k, h, w, generator=g).to(device)
    target = torch.randint(0, k, (b, h, w), generator=g).to(device)
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
    for name, fn in ours.items():
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
    meta = {"shape": [b, k, h, w], "device": str(device), "threads": torch.get_num_threads()}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
