"""Streaming metric speed: maskworks against torchmetrics on CamVid-sized label maps, in one run.

    python benchmarks/metrics.py                      # 100 maps of 360x480, 11 classes
    python benchmarks/metrics.py --maps 20 --json out.json

Targets are the first ``--maps`` CamVid label maps (train + val, void = 255) when the dataset is in
``--data``, else smooth random label maps; predictions are the targets with rectangular patches
relabelled at random (about 15 % of the pixels), so every metric sees realistic boundaries. Each row
times the whole stream (``update`` for every map, then ``compute``), best of ``--repeats`` rounds with
ours and the peer alternating. Ratios are ours / peer (< 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_targets(data: str, n: int, seed: int) -> tuple[list[torch.Tensor], str]:
    root = Path(data)
    if (root / "trainannot").is_dir():
        from maskworks.data import CamVid

        maps = []
        for split in ("train", "val"):
            ds = CamVid(root, split=split)
            for i in range(len(ds)):
                if len(maps) == n:
                    break
                maps.append(ds.load_raw(i)["mask"].as_subclass(torch.Tensor).clone())
        return maps, f"CamVid label maps from {root}"
    g = torch.Generator().manual_seed(seed)
    maps = [
        F.interpolate(torch.randn(1, 11, 12, 15, generator=g), size=(360, 480), mode="bilinear")[0].argmax(0)
        for _ in range(n)
    ]
    return maps, "smooth random label maps (CamVid not found)"


def corrupt(target: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    pred = target.clone()
    pred[pred == 255] = torch.randint(0, k, (1,), generator=g)
    h, w = pred.shape
    for _ in range(12):
        y, x = int(torch.randint(0, h - 40, (1,), generator=g)), int(torch.randint(0, w - 60, (1,), generator=g))
        pred[y : y + 40, x : x + 60] = int(torch.randint(0, k, (1,), generator=g))
    return pred


def time_stream(make, preds, targets) -> float:
    t0 = time.perf_counter()
    metric = make()
    for p, t in zip(preds, targets):
        metric.update(p, t)
    metric.compute()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maps", type=int, default=100)
    p.add_argument("--data", default="../shared/data/camvid")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="maps per update call")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

    import maskworks.metrics as mm

    k = 11
    targets, source = load_targets(args.data, args.maps, 0)
    g = torch.Generator().manual_seed(1)
    preds = [corrupt(t, k, g) for t in targets]
    b = args.batch
    tb = [torch.stack(targets[i : i + b]) for i in range(0, len(targets), b)]
    pb = [torch.stack(preds[i : i + b]) for i in range(0, len(preds), b)]
    print(f"{len(targets)} maps of {tuple(targets[0].shape)} ({source}), {k} classes, batch {b}")

    rows = []
    pairs = {
        "mIoU (confusion matrix)": (
            lambda: mm.ConfusionMatrix(k),
            lambda: MulticlassJaccardIndex(k, ignore_index=255, average="macro"),
            "torchmetrics MulticlassJaccardIndex",
        ),
        "mDice / F1 (confusion matrix)": (
            lambda: mm.ConfusionMatrix(k),
            lambda: MulticlassF1Score(k, ignore_index=255, average="macro", multidim_average="global"),
            "torchmetrics MulticlassF1Score",
        ),
    }
    if hasattr(mm, "BoundaryF1"):
        pairs["boundary F1 (theta = 0.75 % of the diagonal)"] = (lambda: mm.BoundaryF1(k), None, None)
    if hasattr(mm, "BoundaryIoU"):
        pairs["boundary IoU (dilation 2 % of the diagonal)"] = (lambda: mm.BoundaryIoU(k), None, None)
    for name, (ours, peer, peer_name) in pairs.items():
        ours_s, peer_s = [], []
        for _ in range(args.repeats):
            ours_s.append(time_stream(ours, pb, tb))
            if peer is not None:
                peer_s.append(time_stream(peer, pb, tb))
        o = min(ours_s)
        row = {"metric": name, "ours_s": round(o, 4)}
        if peer is not None:
            q = min(peer_s)
            row.update({"peer": peer_name, "peer_s": round(q, 4), "ratio": round(o / q, 3)})
            print(f"{name:<48} ours {o * 1e3:8.1f} ms   {peer_name} {q * 1e3:8.1f} ms   ratio {o / q:.2f}")
        else:
            print(f"{name:<48} ours {o * 1e3:8.1f} ms   (no peer in torchmetrics)")
        rows.append(row)
    meta = {"maps": len(targets), "shape": list(targets[0].shape), "source": source, "batch": b}
    meta["threads"] = torch.get_num_threads()
    meta["numpy"] = np.__version__
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
