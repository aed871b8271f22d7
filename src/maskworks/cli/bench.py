"""``maskworks bench``: our models against their peer implementations, timed interleaved in one run."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from maskworks.bench import PAIRS

    p = sub.add_parser(
        "bench",
        help="time our models against smp / torchvision / timm on the same input, interleaved",
        description=(
            "Time each model pair (ours vs the peer implementation of the same architecture, same weights, same "
            "input) interleaved A, B, A, B, ... and print median times, the ratio ours / peer, peak memory and the "
            "achieved GFLOP/s. Pairs: " + ", ".join(PAIRS) + "."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  maskworks bench unet_resnet34 --size 256 256 --batch 2\n"
            "  maskworks bench all --mode both --machine-limit --json bench.json\n"
            "  maskworks bench vit_base_patch16_224 --size 224 224 --device cuda --amp --channels-last"
        ),
    )
    p.add_argument("pairs", nargs="+", metavar="PAIR", help="pair names, or 'all'")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size (default 256x256; 224x224 for ViTs)",
    )
    p.add_argument("--batch", type=int, default=2, help="images per call (default 2)")
    p.add_argument(
        "--mode", choices=("eval", "train", "both"), default="eval", help="eval forward, training step, or both"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="models and input in the channels-last layout")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--machine-limit", action="store_true", help="also measure fp32 matmul and conv GFLOP/s")
    p.add_argument("--json", help="write rows (and machine limits) to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskworks.bench import PAIRS, bench_pair, conv_gflops, machine_info, matmul_gflops, rows_markdown

    names = list(PAIRS) if args.pairs == ["all"] else args.pairs
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        raise ValueError(f"unknown pair(s) {unknown}; expected 'all' or some of: {', '.join(PAIRS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    limits = {}
    if args.machine_limit:
        dtype = torch.bfloat16 if args.amp else torch.float32
        limits = {
            "dtype": str(dtype).removeprefix("torch."),
            "matmul_gflops": matmul_gflops(8192 if device.type == "cuda" else 2048, device=device, dtype=dtype),
            "conv_gflops": conv_gflops(device=device),
        }
        print(
            f"machine limit: {limits['dtype']} matmul {limits['matmul_gflops']:.1f} GFLOP/s, "
            f"fp32 conv {limits['conv_gflops']:.1f} GFLOP/s"
        )
    modes = {"eval": [False], "train": [True], "both": [False, True]}[args.mode]
    rows = []
    for name in names:
        size = tuple(args.size) if args.size else ((224, 224) if name.startswith("vit") else (256, 256))
        for train in modes:
            row = bench_pair(
                PAIRS[name],
                size=size,
                batch=args.batch,
                train=train,
                device=device,
                amp=args.amp,
                channels_last=args.channels_last,
                compile=args.compile,
                warmup=args.warmup,
                repeats=args.repeats,
            )
            rows.append(row)
            log.info(
                "%s %s: ours %.1f ms, peer %.1f ms, ratio %.3f",
                name,
                row["mode"],
                row["ours_ms"],
                row["peer_ms"],
                row["ratio"],
            )
    print(rows_markdown(rows, limits.get("matmul_gflops")))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine_info(device), "limits": limits, "rows": rows}, indent=2)
        )
        print(f"wrote {args.json}")
    return 0
