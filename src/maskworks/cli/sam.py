"""``maskworks sam``: promptable segmentation of one image with Segment Anything.

With prompts (``--point x,y[,label]`` any number of times, ``--box x0,y0,x1,y1``) it writes the mask(s) of the
prompt: ``mask.png`` (the best mask, 0 / 255), ``mask_{i}.png`` for every candidate of a multi-mask answer,
``overlay.png`` (the best mask over the image with the prompts drawn) and ``masks.json`` (predicted IoU, area and box
of each candidate, the prompts in original pixels). With ``--auto`` it runs the automatic mask generator and writes
``masks.json`` (COCO RLE, area, box, predicted IoU, stability score, the prompting point of each mask),
``segments.png`` (a 16-bit id map, larger masks painted first) and ``overlay.png``.

The model comes from ``--checkpoint``: an official ``segment_anything`` file (``sam_vit_b_01ec64.pth`` ...), a Hugging
Face ``SamModel`` state dict, or a maskworks checkpoint (``.safetensors`` + ``.json``); the size (ViT-B / L / H) is
read from the weights unless ``--model`` names it. ``--pretrained`` downloads the published weights instead.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskworks.checkpoint import atomic_write_bytes

__all__ = ["add_parser", "load_sam", "parse_box", "parse_point", "run"]

log = logging.getLogger("maskworks")

SAM_NAMES = {768: "sam_vit_base", 1024: "sam_vit_large", 1280: "sam_vit_huge"}


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` (label 1 foreground, 0 background) -> ``(x, y, label)``."""
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point expects x,y or x,y,label (label 1 or 0), got {text!r}") from None
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"--point label must be 1 (foreground) or 0 (background), got {text!r}")
    return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> a box with ``x0 < x1`` and ``y0 < y1``."""
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box expects x0,y0,x1,y1, got {text!r}") from None
    if not (x0 < x1 and y0 < y1):
        raise argparse.ArgumentTypeError(f"--box needs x0 < x1 and y0 < y1, got {text!r}")
    return x0, y0, x1, y1


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sam`` subcommand (``func=run``) to ``subparsers``."""
    p = subparsers.add_parser(
        "sam",
        help="segment what you point at (Segment Anything), or everything with --auto",
        description="Promptable segmentation of one image with SAM. Give points and / or a box in original image "
        "pixels, or --auto for every object. Writes mask PNGs, an overlay and masks.json into --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  maskworks sam street.jpg --checkpoint sam_vit_b_01ec64.pth --point 420,310\n"
        "  maskworks sam street.jpg --checkpoint sam_vit_b_01ec64.pth --point 420,310 --point 500,300,0\n"
        "  maskworks sam street.jpg --checkpoint sam_vit_b_01ec64.pth --box 380,250,640,420\n"
        "  maskworks sam street.jpg --pretrained --auto --points-per-side 16 --out runs/sam_auto\n",
    )
    p.add_argument("image", help="the image (png / jpg / tif / bmp / webp)")
    p.add_argument(
        "--checkpoint",
        help="SAM weights: official segment_anything .pth, Hugging Face SamModel state dict, or a maskworks "
        ".safetensors (+ .json)",
    )
    p.add_argument("--model", choices=sorted(SAM_NAMES.values()), help="architecture (default: read from weights)")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        default=None,
        metavar="TAG",
        help="use published weights instead of --checkpoint (default tag: the official release; see "
        "`maskworks models --pretrained sam*`)",
    )
    p.add_argument(
        "--point", action="append", type=parse_point, default=[], metavar="X,Y[,L]", help="a point prompt (repeat)"
    )
    p.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1", help="a box prompt")
    p.add_argument(
        "--multimask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="three candidate masks (default: on for a single point, off otherwise, as SAM recommends)",
    )
    p.add_argument("--auto", action="store_true", help="segment everything with the automatic mask generator")
    p.add_argument("--points-per-side", type=int, default=32, help="--auto: prompt grid side (default 32)")
    p.add_argument("--points-per-batch", type=int, default=64, help="--auto: prompts per decoder pass (default 64)")
    p.add_argument("--pred-iou-thresh", type=float, default=0.88, help="--auto: least predicted IoU (default 0.88)")
    p.add_argument(
        "--stability-score-thresh", type=float, default=0.95, help="--auto: least stability score (default 0.95)"
    )
    p.add_argument("--box-nms-thresh", type=float, default=0.7, help="--auto: box NMS IoU (default 0.7)")
    p.add_argument("--crop-n-layers", type=int, default=0, help="--auto: crop layers (default 0)")
    p.add_argument(
        "--min-mask-region-area", type=int, default=0, help="--auto: remove holes / islands below this area (0: off)"
    )
    p.add_argument("--out", help="output folder (default: runs/sam/<image name>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run)
    return p


def _infer_name(state_dict: dict[str, torch.Tensor], where: str) -> str:
    for key in ("image_encoder.patch_embed.proj.weight", "vision_encoder.patch_embed.projection.weight"):
        if key in state_dict:
            width = state_dict[key].shape[0]
            if width in SAM_NAMES:
                return SAM_NAMES[width]
            raise ValueError(f"{where}: a SAM image encoder of width {width} is not B / L / H; pass --model")
    raise ValueError(
        f"{where} is not a SAM checkpoint (no 'image_encoder.patch_embed.proj.weight' or HF "
        "'vision_encoder.patch_embed.projection.weight')"
    )


def load_sam(
    checkpoint: str | None = None, model: str | None = None, pretrained: bool | str | None = None
) -> torch.nn.Module:
    """A SAM from a checkpoint file (official, HF or maskworks) or published weights.

    Raises:
        ValueError: neither a checkpoint nor ``pretrained``, both, or a file that is not a SAM checkpoint.
        FileNotFoundError: the checkpoint does not exist.
    """
    from maskworks.checkpoint import load_model
    from maskworks.convert import load_weights
    from maskworks.convert.load import read_state_dict
    from maskworks.registry import create_model

    if (checkpoint is None) == (pretrained is None):
        raise ValueError(
            "give one of --checkpoint FILE (official sam_vit_*.pth, an HF SamModel state dict or a maskworks "
            "checkpoint) or --pretrained [TAG]"
        )
    if pretrained is not None:
        return create_model(model or "sam_vit_base", pretrained=pretrained).eval()
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors" and path.with_suffix(".json").exists():
        net = load_model(path)
        if not hasattr(net, "embed_image"):
            raise ValueError(f"{path} holds a {type(net).__name__}, not a promptable (SAM) model")
        return net.eval()
    state_dict = read_state_dict(path)
    net = create_model(model or _infer_name(state_dict, str(path)))
    load_weights(net, state_dict, strict=True)
    return net.eval()


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _box_xywh(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _draw_prompts(picture: np.ndarray, points: list, box: tuple | None) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(picture)
    draw = ImageDraw.Draw(img)
    radius = max(3, round(max(picture.shape[:2]) / 150))
    for x, y, label in points:
        color = (40, 220, 40) if label == 1 else (230, 40, 40)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline=(255, 255, 255))
    if box is not None:
        draw.rectangle(box, outline=(40, 120, 255), width=max(2, radius // 2))
    return np.asarray(img)


def _prompted(args: argparse.Namespace, model: torch.nn.Module, image: np.ndarray, out: Path) -> dict[str, Any]:
    from maskworks.models.promptable import SamPredictor
    from maskworks.viz import draw_instances, save_rgb_png

    predictor = SamPredictor(model)
    start = time.perf_counter()
    predictor.set_image(image)
    embed_s = time.perf_counter() - start
    coords = np.array([p[:2] for p in args.point], dtype=float) if args.point else None
    labels = np.array([p[2] for p in args.point]) if args.point else None
    multimask = args.multimask if args.multimask is not None else (len(args.point) == 1 and args.box is None)
    start = time.perf_counter()
    masks, scores, _ = predictor.predict(
        point_coords=coords,
        point_labels=labels,
        box=np.array(args.box) if args.box else None,
        multimask_output=multimask,
    )
    decode_s = time.perf_counter() - start
    best = int(np.argmax(scores))
    for i, mask in enumerate(masks):
        atomic_write_bytes(out / f"mask_{i}.png", _png_bytes(mask.astype(np.uint8) * 255))
    atomic_write_bytes(out / "mask.png", _png_bytes(masks[best].astype(np.uint8) * 255))
    overlay = draw_instances(image, {"masks": masks[best : best + 1]}, draw_boxes=False, draw_text=False)
    save_rgb_png(_draw_prompts(overlay, args.point, args.box), out / "overlay.png")
    log.info(
        "embedded the image in %.2f s, decoded the prompt in %.3f s; best mask %d (predicted IoU %.3f, %d pixels)",
        embed_s,
        decode_s,
        best,
        scores[best],
        int(masks[best].sum()),
    )
    return {
        "mode": "prompt",
        "points": [{"x": x, "y": y, "label": label} for x, y, label in args.point],
        "box": list(args.box) if args.box else None,
        "multimask_output": multimask,
        "best": best,
        "masks": [
            {
                "file": f"mask_{i}.png",
                "predicted_iou": float(scores[i]),
                "area": int(m.sum()),
                "bbox": _box_xywh(m),
            }
            for i, m in enumerate(masks)
        ],
        "seconds": {"embed": round(embed_s, 4), "decode": round(decode_s, 4)},
    }


def _automatic(args: argparse.Namespace, model: torch.nn.Module, image: np.ndarray, out: Path) -> dict[str, Any]:
    from maskworks.models.promptable import SamAutomaticMaskGenerator
    from maskworks.models.promptable.amg import rle_to_mask
    from maskworks.viz import draw_instances, save_rgb_png

    generator = SamAutomaticMaskGenerator(
        model,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
        output_mode="uncompressed_rle",
    )
    start = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - start
    records.sort(key=lambda r: -r["area"])  # large first: the smaller masks are painted over them
    h, w = image.shape[:2]
    ids = np.zeros((h, w), dtype=np.uint16)
    masks = np.zeros((len(records), h, w), dtype=bool)
    for i, record in enumerate(records):
        masks[i] = rle_to_mask(record["segmentation"])
        ids[masks[i]] = i + 1
    atomic_write_bytes(out / "segments.png", _png_bytes(ids))
    order = np.arange(len(records), dtype=float)  # later = smaller = on top
    overlay = draw_instances(image, {"masks": masks}, draw_boxes=False, draw_text=False, order=order)
    save_rgb_png(overlay, out / "overlay.png")
    try:  # COCO RLE with pycocotools (the coco extra); the uncompressed RLE otherwise
        import pycocotools.mask  # noqa: F401

        from maskworks.models.promptable.amg import coco_encode_rle
    except ImportError:
        log.warning("pycocotools is not installed: masks.json holds uncompressed RLE (pip install 'maskworks[coco]')")

        def coco_encode_rle(rle):
            return rle

    rows = []
    for i, record in enumerate(records):
        rows.append({**record, "id": i + 1, "segmentation": coco_encode_rle(record["segmentation"])})
    log.info("found %d masks in %.1f s", len(rows), seconds)
    return {"mode": "auto", "masks": rows, "seconds": {"generate": round(seconds, 3)}}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``maskworks sam``."""
    from maskworks.data.io import read_image
    from maskworks.engine.trainer import resolve_device

    if args.auto and (args.point or args.box):
        raise ValueError("--auto segments everything: leave out --point / --box (or drop --auto)")
    if not args.auto and not args.point and args.box is None:
        raise ValueError("give at least one --point x,y[,label] or a --box x0,y0,x1,y1, or --auto")
    image_path = Path(args.image)
    if not image_path.is_file():
        raise FileNotFoundError(f"image {image_path} not found")
    image = read_image(image_path)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    h, w = image.shape[:2]
    for x, y, _ in args.point:
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"--point {x:g},{y:g} lies outside the {w}x{h} image {image_path}")
    model = load_sam(args.checkpoint, args.model, args.pretrained).to(resolve_device(args.device))
    out = Path(args.out) if args.out else Path("runs/sam") / image_path.stem
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        report = _automatic(args, model, image, out) if args.auto else _prompted(args, model, image, out)
    report = {"image": str(image_path), "size": [h, w], **report}
    atomic_write_bytes(out / "masks.json", json.dumps(report, indent=1).encode())
    print(
        f"wrote {out}/masks.json, {out}/overlay.png" + (f", {out}/segments.png" if args.auto else f", {out}/mask.png")
    )
    return 0
