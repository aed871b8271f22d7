"""Mask R-CNN speed: maskworks against torchvision on the same weights, interleaved in one run.

    python benchmarks/mask_rcnn.py                                   # R-50-FPN v1, v2, MobileNetV3; 800 px; CPU, 2 threads
    python benchmarks/mask_rcnn.py --models mask_rcnn_resnet50_fpn --size 512 --repeats 5
    python benchmarks/mask_rcnn.py --size 128 --repeats 1            # smoke run
    python benchmarks/mask_rcnn.py --device cuda

The peer is torchvision's own builder (``maskrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn_v2`` with ``weights=None,
weights_backbone=None``; for MobileNetV3 torchvision's ``MaskRCNN`` on ``_mobilenet_extractor`` with the anchors of
``fasterrcnn_mobilenet_v3_large_fpn``, the same graph as ours); ours loads its state dict (``load_weights(source=
"torchvision")``), so both compute the same detections. Both run with ``min_size = max_size = --size`` on square
``--size`` images, torchvision's ImageNet normalisation, and otherwise default settings. Eval: latency of one image
(``no_grad``), including post-processing and mask pasting; ours also thresholds the masks to bool, as its output
contract says. Train: forward and backward of a batch of ``--train-batch`` images with three box / mask instances
each (no optimizer step, so both keep the same weights). Median of ``--repeats`` interleaved rounds after one warm-up
round; ratio = ours / torchvision in time (<= 1.0: ours at least as fast).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn as nn
import torchvision.models.detection as tvd
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor

import maskworks.models.instance  # noqa: F401  (registers the Mask R-CNN models)
from maskworks import create_model, load_weights
from maskworks.bench import add_throughput_args, compare, setup_throughput_run, write_rows

TV_MEAN, TV_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _tv_mobilenet(num_classes: int, **kwargs) -> nn.Module:
    backbone = _mobilenet_extractor(mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d), True, 6)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return tvd.MaskRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **kwargs)


# our model name -> torchvision builder(num_classes, **MaskRCNN kwargs); ours takes the same kwargs
PEERS: dict[str, Callable[..., nn.Module]] = {
    "mask_rcnn_resnet50_fpn": lambda k, **kw: tvd.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=k, **kw
    ),
    "mask_rcnn_resnet50_fpn_v2": lambda k, **kw: tvd.maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=k, **kw
    ),
    "mask_rcnn_mobilenet_v3_large_fpn": _tv_mobilenet,
}


def _targets(batch: int, size: int, num_classes: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Three axis-aligned rectangles per image, with their boxes, labels and masks."""
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        boxes, masks = [], torch.zeros(3, size, size, dtype=torch.uint8)
        for i in range(3):
            x1, y1 = (torch.rand(2, generator=g) * size * 0.5).long().tolist()
            w, h = (torch.rand(2, generator=g) * size * 0.4 + size * 0.1).long().tolist()
            boxes.append([x1, y1, x1 + w, y1 + h])
            masks[i, y1 : y1 + h, x1 : x1 + w] = 1
        labels = torch.randint(1, num_classes, (3,), generator=g)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels, "masks": masks})
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def measure(name: str, args, device: torch.device) -> list[dict]:
    opts = {"min_size": args.size, "max_size": args.size, "image_mean": TV_MEAN, "image_std": TV_STD}
    if name == "mask_rcnn_mobilenet_v3_large_fpn":  # ours defaults to the 320 recipe; use torchvision's defaults
        opts |= {"rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000, "rpn_score_thresh": 0.05}
    torch.manual_seed(0)
    peer = PEERS[name](args.num_classes, **opts)
    ours = create_model(name, num_classes=args.num_classes, **opts)
    load_weights(ours, peer.state_dict(), source="torchvision", strict=True)
    image = torch.rand(3, args.size, args.size, device=device)
    batch = [torch.rand(3, args.size, args.size, device=device) for _ in range(args.train_batch)]
    targets = _targets(args.train_batch, args.size, args.num_classes, device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    rows = []
    for train in (False, True):
        peer.to(device).train(train)
        ours.to(device).train(train)
        if train:

            def step(model: nn.Module) -> Callable[[], None]:
                def run() -> None:
                    model.zero_grad(set_to_none=True)
                    with cast:
                        losses = model(batch, targets)
                    sum(losses.values()).backward()

                return run

        else:

            def step(model: nn.Module) -> Callable[[], object]:
                def run() -> object:
                    with torch.no_grad(), cast:
                        return model([image])

                return run

        result = compare({"ours": step(ours), "torchvision": step(peer)}, warmup=1, repeats=args.repeats, device=device)
        per = args.train_batch if train else 1
        ours_t, tv_t = result.timings["ours"].median, result.timings["torchvision"].median
        row = {
            "model": name,
            "mode": "train" if train else "eval",
            "images": per,
            "input": [args.size, args.size],
            "ours_s_per_img": ours_t / per,
            "torchvision_s_per_img": tv_t / per,
            "time_ratio": ours_t / tv_t,
            "ours_iqr_s": result.timings["ours"].iqr,
            "torchvision_iqr_s": result.timings["torchvision"].iqr,
            "ours_peak_mib": result.timings["ours"].peak_mib,
            "torchvision_peak_mib": result.timings["torchvision"].peak_mib,
        }
        if not train:
            with torch.no_grad():
                row["detections"] = int(ours([image])[0]["boxes"].shape[0])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--size", type=int, default=800, help="image side; also min_size = max_size (default 800)")
    p.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2)")
    p.add_argument("--num-classes", type=int, default=91)
    add_throughput_args(p, repeats=3)
    args = p.parse_args()
    device, limit = setup_throughput_run(args)
    print(f"machine limit: matmul {limit:.1f} GFLOP/s on {device} ({'bf16' if args.amp else 'fp32'})", flush=True)
    rows = [row for name in args.models for row in measure(name, args, device)]
    print("| model | mode | ours s/img | torchvision s/img | ours / torchvision (time) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['mode']} | {r['ours_s_per_img']:.3f} | {r['torchvision_s_per_img']:.3f} | "
            f"{r['time_ratio']:.3f} |"
        )
    write_rows(args, device, limit, rows)


if __name__ == "__main__":
    main()
