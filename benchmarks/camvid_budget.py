"""Accuracy under a wall-clock budget: maskworks ``unet`` against smp ``Unet`` on CamVid, trained side by side.

    python benchmarks/camvid_budget.py                       # 20-minute budget, ResNet-18 encoder
    python benchmarks/camvid_budget.py --budget-min 2        # smoke run
    python benchmarks/camvid_budget.py --data /path/to/camvid --encoder resnet34

Both runs use :mod:`camvid_unet` (this folder) with the same arguments: the same encoder, loss (median-frequency
weighted cross-entropy), optimiser (AdamW 2e-3, poly schedule over elapsed time), augmentation, batch, seed and
budget, and the SAME initial weights (both start from ``smp.Unet`` built with the seed; the keys are identical)
and therefore the same data order. They run at the same time, one CPU thread each, so machine noise affects both
alike; what differs is only the code that runs the network (steps reached in the budget) and hence the
validation mIoU. Results print as a table and go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=20.0)
    p.add_argument("--data", default="../shared/data/camvid")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--threads", type=int, default=1, help="threads per run (both run at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write both results to this file")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"CamVid not found at {args.data}; pass --data (the SegNet layout, see ../shared/data)")
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = {}, {}
        for impl in ("maskworks", "smp"):
            outs[impl] = Path(tmp) / f"{impl}.json"
            cmd = [
                sys.executable,
                str(HERE / "camvid_unet.py"),
                "--impl",
                impl,
                "--model-kwargs",
                json.dumps({"encoder": args.encoder}),
                "--same-init-as-smp",
                "--budget-min",
                str(args.budget_min),
                "--data",
                args.data,
                "--threads",
                str(args.threads),
                "--seed",
                str(args.seed),
                "--json",
                str(outs[impl]),
            ]
            log = open(Path(tmp) / f"{impl}.log", "w")  # noqa: SIM115 - closed below
            procs[impl] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        results = {}
        for impl, (proc, log) in procs.items():
            rc = proc.wait()
            log.close()
            if rc != 0:
                raise SystemExit(f"{impl} run failed:\n{(Path(tmp) / f'{impl}.log').read_text()[-3000:]}")
            results[impl] = json.loads(outs[impl].read_text())
    print(f"CamVid, unet {args.encoder}, {args.budget_min:g} min each, {args.threads} thread(s) each, run side by side")
    print("| implementation | steps | epochs | val mIoU | pixel acc | mean class acc | latency 360x480 ms |")
    print("|---|---|---|---|---|---|---|")
    for impl, r in results.items():
        print(
            f"| {impl} | {r['steps']} | {r['epochs']} | {r['val_miou']:.4f} | {r['val_pixel_acc']:.4f} | "
            f"{r['val_mean_acc']:.4f} | {r['latency_ms_360x480']:.1f} |"
        )
    ours, smp = results["maskworks"], results["smp"]
    print(
        f"steps ours / smp: {ours['steps'] / smp['steps']:.3f}; mIoU ours - smp: {ours['val_miou'] - smp['val_miou']:+.4f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
