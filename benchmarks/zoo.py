"""The semantic model zoo: parameters, GMACs and CPU latency of every registered model, and ours / reference
latency for the models that have a reference implementation, measured in the same run.

    python benchmarks/zoo.py                          # 512x1024, all models, 2 threads
    python benchmarks/zoo.py --size 256 512 --repeats 3 --only unet fpn     # quicker
    python benchmarks/zoo.py --json benchmarks/results/zoo_cpu.json

Every model is built with its standard configuration (the one its parameter-count test pins: ResNet-34 U-Net
family and FPN like smp's defaults, ResNet-50 DeepLabs, 19 classes for the real-time networks as in their
papers' Cityscapes setting, 11 elsewhere), random weights, eval mode, batch 1, no gradient. The pairs are

* ``unet``, ``unetplusplus``, ``fpn``, ``pspnet``, ``deeplabv3plus`` against the same-named smp model with the same
  encoder and options (state dicts identical: the parity tests load one into the other);
* ``deeplabv3`` against torchvision's ``deeplabv3_resnet50``.

The transformer segmenters run in their standard configurations too (UPerNet with Swin-T, SegFormer B0 / B2,
TransUNet R50-ViT-B/16, SETR-PUP on ViT-B/16 (the paper's ViT-L/16 is 3.5x larger)); their same-function peers
(HF UperNet / SegFormer) are timed in ``benchmarks/hierarchical.py`` and ``benchmarks/segformer.py``.

Each model runs in two memory layouts, contiguous (NCHW) and channels-last, for ours and for the reference alike;
the ratio column compares the same layout, and the best-vs-best column each side's faster layout. Timing: warm-up,
then ``--repeats`` interleaved rounds (ours, reference, reference, ours, ...), median reported. MACs are counted
with ``torch.utils.flop_counter`` (convolutions and matrix products).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from maskworks import create_model, list_models
from maskworks.bench import compare, count_macs, machine_info

STANDARD: dict[str, dict] = {
    "unet": {"encoder": "resnet34"},
    "unet_vanilla": {},
    "unetplusplus": {"encoder": "resnet34"},
    "attention_unet": {"encoder": "resnet34"},
    "deeplabv3": {"encoder": "resnet50", "output_stride": 8},
    "deeplabv3plus": {"encoder": "resnet50", "output_stride": 16, "atrous_rates": (12, 24, 36)},
    "fpn": {"encoder": "resnet34"},
    "pspnet": {"encoder": "resnet34"},
    "bisenetv1": {"encoder": "resnet18", "aux": False},
    "bisenetv2": {"aux": False},
    "fast_scnn": {"aux": False},
    "upernet": {"encoder": "swin_tiny_patch4_window7_224", "aux": False},
    "segformer_b0": {},
    "segformer_b2": {},
    "transunet": {},
    "setr_pup": {"encoder": "vit_base_patch16_384", "aux": False},
}
REALTIME = ("bisenetv1", "bisenetv2", "fast_scnn")
REFERENCE_NAMES = {
    "unet": "smp Unet",
    "unetplusplus": "smp UnetPlusPlus",
    "fpn": "smp FPN",
    "pspnet": "smp PSPNet",
    "deeplabv3plus": "smp DeepLabV3Plus",
    "deeplabv3": "torchvision deeplabv3_resnet50",
}


def reference(name: str, classes: int) -> nn.Module | None:
    """The peer implementation of ``name`` with the same configuration, or None."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        smp = None
    if name == "deeplabv3":
        from torchvision.models.segmentation import deeplabv3_resnet50

        model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=classes, aux_loss=False)
        return _OutOnly(model)
    if smp is None:
        return None
    kw = {"encoder_weights": None, "classes": classes}
    builders: dict[str, Callable[[], nn.Module]] = {
        "unet": lambda: smp.Unet("resnet34", **kw),
        "unetplusplus": lambda: smp.UnetPlusPlus("resnet34", **kw),
        "fpn": lambda: smp.FPN("resnet34", **kw),
        "pspnet": lambda: smp.PSPNet("resnet34", **kw),
        "deeplabv3plus": lambda: smp.DeepLabV3Plus("resnet50", encoder_output_stride=16, **kw),
    }
    return builders[name]() if name in builders else None


class _OutOnly(nn.Module):
    """torchvision segmentation models return ``{"out": ...}``; this returns the tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def _runner(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return model(x)

    return run


def measure(name: str, size: tuple[int, int], repeats: int) -> dict:
    classes = 19 if name in REALTIME else 11
    torch.manual_seed(0)
    ours = create_model(name, num_classes=classes, **STANDARD[name]).eval()
    ref = reference(name, classes)
    x = torch.randn(1, 3, *size)
    row = {
        "model": name,
        "params": sum(p.numel() for p in ours.parameters()),
        "gmacs": count_macs(ours, x) / 1e9,
        "reference": REFERENCE_NAMES.get(name) if ref is not None else None,
    }
    fns = {}
    for layout, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
        xi = x.contiguous(memory_format=fmt)
        fns[f"ours_{layout}"] = _runner(ours.to(memory_format=fmt) if layout == "cl" else ours, xi)
        if ref is not None:
            ref = ref.eval()
            fns[f"ref_{layout}"] = _runner(ref.to(memory_format=fmt) if layout == "cl" else ref, xi)
        if layout == "nchw":  # measure NCHW with NCHW weights before converting the modules
            result = compare(dict(fns), warmup=1, repeats=repeats, memory=False)
            timings = dict(result.timings)
            fns.clear()
    result = compare(fns, warmup=1, repeats=repeats, memory=False)
    timings.update(result.timings)
    for key, t in timings.items():
        row[f"{key}_ms"] = 1e3 * t.median
    if ref is not None:
        row["ratio_nchw"] = timings["ours_nchw"].median / timings["ref_nchw"].median
        row["ratio_cl"] = timings["ours_cl"].median / timings["ref_cl"].median
        best_ours = min(timings["ours_nchw"].median, timings["ours_cl"].median)
        best_ref = min(timings["ref_nchw"].median, timings["ref_cl"].median)
        row["ratio_best"] = best_ours / best_ref
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--only", nargs="+", help="model names (default: every registered semantic model)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or [n for n in list_models(kind="model") if n in STANDARD]  # the semantic models
    rows = []
    for name in names:
        row = measure(name, tuple(args.size), args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    h, w = args.size
    print(f"\n{h}x{w}, batch 1, fp32, {args.threads} threads; median of {args.repeats} interleaved runs\n")
    print(
        "| model | params (M) | GMACs | ours ms NCHW | ours ms CL | reference | ref ms NCHW | ref ms CL | "
        "ours / ref NCHW | ours / ref CL | best / best |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = r["reference"] or "-"

        def f(key, digits=1, r=r):
            return f"{r[key]:.{digits}f}" if r.get(key) is not None else "-"

        print(
            f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gmacs']:.1f} | {f('ours_nchw_ms')} | {f('ours_cl_ms')} | "
            f"{ref} | {f('ref_nchw_ms')} | {f('ref_cl_ms')} | {f('ratio_nchw', 2)} | {f('ratio_cl', 2)} | "
            f"{f('ratio_best', 2)} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "size": [h, w], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
