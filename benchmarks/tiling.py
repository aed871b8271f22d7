"""Tiled inference: wall time and peak memory of maskworks against MONAI ``sliding_window_inference``.

    python benchmarks/tiling.py                                   # 4096x4096 and 8192x8192, as in the issue
    python benchmarks/tiling.py --sizes 1024 2048 --repeats 1     # smoke run
    python benchmarks/tiling.py --sizes 4096 --window 256 --overlap 0.5 --blend constant

Three implementations run the same small convolutional model (seeded, 3x3 conv 3->8, ReLU, 1x1 conv 8->K) with the
same window, overlap, blend and batch size:

* ``monai``: ``monai.inferers.sliding_window_inference`` on the whole normalised float image, under
  ``torch.no_grad()``; returns ``(1, K, H, W)`` blended logits.
* ``monai_cl``: the same MONAI call on the image stored channels-last (``image.contiguous(memory_format=
  torch.channels_last)``), so its windows reach the model in the channels-last layout that ours use by default
  (``channels_last=True``); this separates the gain of the layout from the rest.
* ``ours``: :func:`maskworks.inference.sliding.sliding_window` on the same tensor; returns the same logits
  (``tests/inference/test_sliding.py`` checks the parity with MONAI).
* ``ours_large``: :func:`maskworks.inference.large.predict_large_image` reading the uint8 image from a ``.npy`` file
  strip by strip and writing the ``(H, W)`` uint8 label map to a ``.npy`` file (so its output is 1 byte per pixel
  on disk instead of ``4 K`` bytes per pixel in memory; the comparison shows what the memory-bounded mode buys).

Method. Every (implementation, size) runs in a fresh Python process, started by this script (``--worker``), so no
allocator state or cached memory carries over. The worker builds the model and the input first (the float input
image for the whole-image modes; the large mode only opens the file), then resets the process's resident-memory
high-water mark (writing ``5`` to ``/proc/self/clear_refs``, Linux), notes the resident size, runs the call once,
and reports the wall time of the call and ``VmHWM - VmRSS_before`` from ``/proc/self/status``: the peak memory the
call added (output, accumulators, window batches, temporaries), excluding the interpreter, torch and the input.
``getrusage(RUSAGE_SELF).ru_maxrss`` is deliberately not used: it also counts the parent's resident memory at the
fork before ``exec``. Where ``clear_refs`` is unavailable, the high-water mark also covers the imports and
overstates every row alike. Implementations alternate within each repeat; the reported time is the best of the
repeats and the memory the median.

Ratios are ours / MONAI: time <= 1.0 means at least as fast, memory <= 0.5 means at most half the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

IMPLEMENTATIONS = ("monai", "monai_cl", "ours", "ours_large")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_model(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1)).eval()


def write_image(path: Path, size: int) -> None:
    """A reproducible ``(size, size, 3)`` uint8 image, written in row blocks."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (min(size, 512), size, 3), dtype=np.uint8)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (size, size, 3)})
        for start in range(0, size, block.shape[0]):
            f.write(block[: min(block.shape[0], size - start)].tobytes())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(cfg: dict) -> dict:
    """Run one implementation once in this (fresh) process; returns seconds and the peak memory it added."""
    torch.set_num_threads(cfg["threads"])
    model = make_model(cfg["classes"])
    window, overlap, blend, bs = cfg["window"], cfg["overlap"], cfg["blend"], cfg["batch_size"]
    if cfg["impl"] == "ours_large":
        from maskworks.inference.large import predict_large_image

        def run():
            predict_large_image(
                model,
                cfg["image"],
                cfg["out"],
                window,
                overlap,
                num_classes=cfg["classes"],
                blend=blend,
                batch_size=bs,
                mean=MEAN,
                std=STD,
            )

    else:
        from maskworks.inference.large import rows_to_tensor

        pixels = np.load(cfg["image"], mmap_mode="r")
        image = torch.cat(
            [rows_to_tensor(np.asarray(pixels[r : r + 512]), MEAN, STD) for r in range(0, len(pixels), 512)], 2
        )
        del pixels
        if cfg["impl"] == "monai_cl":  # give MONAI the same channels-last layout our windows use
            image = image.contiguous(memory_format=torch.channels_last)
        if cfg["impl"].startswith("monai"):
            from monai.inferers import sliding_window_inference

            def run():
                with torch.no_grad():
                    return sliding_window_inference(image, (window, window), bs, model, overlap=overlap, mode=blend)

        else:
            from maskworks.inference.sliding import sliding_window

            def run():
                return sliding_window(model, image, window, overlap, blend, bs)

    with torch.no_grad():  # warm up the model's kernels outside the measurement
        model(torch.zeros(bs, 3, window, window))
    _reset_peak()
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    del out
    return {"seconds": seconds, "peak_mib": (peak - before) / 1024}


def measure(impl: str, image: Path, out: Path, args: argparse.Namespace) -> dict:
    cfg = {
        "impl": impl,
        "image": str(image),
        "out": str(out),
        "window": args.window,
        "overlap": args.overlap,
        "blend": args.blend,
        "batch_size": args.batch_size,
        "classes": args.classes,
        "threads": args.threads,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=(4096, 8192), help="square image sides")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--blend", choices=("gaussian", "constant"), default="gaussian")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS, default=IMPLEMENTATIONS)
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            image = Path(tmp) / f"image_{size}.npy"
            write_image(image, size)
            runs: dict[str, list[dict]] = {impl: [] for impl in args.only}
            for r in range(args.repeats):
                order = args.only if r % 2 == 0 else args.only[::-1]
                for impl in order:
                    runs[impl].append(measure(impl, image, Path(tmp) / "labels.npy", args))
            result = {
                impl: {
                    "seconds": min(x["seconds"] for x in rs),
                    "peak_mib": statistics.median(x["peak_mib"] for x in rs),
                }
                for impl, rs in runs.items()
            }
            float_output = args.classes * size * size * 4 / 2**20
            for impl, res in result.items():
                row = {"size": size, "impl": impl, **res, "float_output_mib": float_output}
                if "monai" in result and impl != "monai":
                    row["time_ratio"] = res["seconds"] / result["monai"]["seconds"]
                    row["memory_ratio"] = res["peak_mib"] / result["monai"]["peak_mib"]
                if "monai_cl" in result and not impl.startswith("monai"):
                    row["time_ratio_cl"] = res["seconds"] / result["monai_cl"]["seconds"]
                    row["memory_ratio_cl"] = res["peak_mib"] / result["monai_cl"]["peak_mib"]
                rows.append(row)
            image.unlink()

    print(
        f"window {args.window}, overlap {args.overlap}, blend {args.blend}, batch {args.batch_size}, "
        f"{args.classes} classes, {args.threads} threads; time = best of {args.repeats}, peak = median added memory"
    )
    print(
        f"{'size':>6} {'impl':<11} {'seconds':>8} {'peak MiB':>9} {'time / MONAI':>13} {'memory / MONAI':>15} "
        f"{'time / MONAI cl':>16} {'memory / MONAI cl':>18}"
    )
    for row in rows:
        cells = [f"{row[k]:.2f}" if k in row else "-" for k in ("time_ratio", "memory_ratio")]
        cells += [f"{row[k]:.2f}" if k in row else "-" for k in ("time_ratio_cl", "memory_ratio_cl")]
        print(
            f"{row['size']:>6} {row['impl']:<11} {row['seconds']:>8.2f} {row['peak_mib']:>9.1f} {cells[0]:>13} "
            f"{cells[1]:>15} {cells[2]:>16} {cells[3]:>18}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
