"""Eval latency with and without BatchNorm folding (``maskworks.inference.fuse_conv_bn``), side by side.

    python benchmarks/fuse_bn.py                              # CamVid-sized 360x480 input, batch 1
    python benchmarks/fuse_bn.py --size 512 1024 --json benchmarks/results/fuse_bn_cpu.json

For each model (random weights, eval mode, channels-last as ``maskworks eval`` runs it) the plain and the folded
copy are timed alternately under ``torch.inference_mode`` (median of ``--repeats`` after warm-up); the largest
logit difference between the two is reported with them, absolute and relative to the largest logit (the
BatchNorm statistics are randomised, so logits are large).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from maskworks import create_model
from maskworks.inference import fuse_conv_bn
from maskworks.testing import randomize_norms

MODELS = [
    ("unet", {"encoder": "resnet18"}),
    ("unet", {"encoder": "resnet34"}),
    ("deeplabv3plus", {"encoder": "resnet50"}),
    ("fpn", {"encoder": "resnet34"}),
    ("pspnet", {"encoder": "resnet34"}),
    ("bisenetv2", {}),
    ("fast_scnn", {}),
]


def timed(model, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 3, *args.size).contiguous(memory_format=torch.channels_last)
    rows = []
    for name, kwargs in MODELS:
        model = create_model(name, num_classes=11, **kwargs).eval()
        randomize_norms(model)
        model = model.to(memory_format=torch.channels_last)
        fused = fuse_conv_bn(copy.deepcopy(model))
        with torch.inference_mode():
            reference = model(x)
            diff = (reference - fused(x)).abs().max().item()
            scale = reference.abs().max().item()
            for m in (model, fused):
                timed(m, x)  # warm-up
            plain, folded = [], []
            for _ in range(args.repeats):
                plain.append(timed(model, x))
                folded.append(timed(fused, x))
        row = {
            "model": name,
            "kwargs": kwargs,
            "plain_ms": 1e3 * statistics.median(plain),
            "fused_ms": 1e3 * statistics.median(folded),
            "max_abs_diff": diff,
            "max_abs_logit": scale,
            "max_rel_diff": diff / max(scale, 1e-12),
        }
        row["ratio"] = row["fused_ms"] / row["plain_ms"]
        rows.append(row)
        print(
            f"{name:14s} {json.dumps(kwargs):26s} plain {row['plain_ms']:8.1f} ms  fused {row['fused_ms']:8.1f} ms  "
            f"ratio {row['ratio']:.2f}  max |diff| {diff:.1e} of max |logit| {scale:.1e} ({diff / max(scale, 1e-12):.1e})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
