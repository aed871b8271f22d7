"""``maskworks export``: a checkpoint to ONNX (verified in onnxruntime), optionally INT8-quantized with calibration
images; SAM checkpoints become two graphs (image encoder, prompt decoder)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

__all__ = ["add_parser", "parse_size", "run"]

log = logging.getLogger("maskworks")


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` or ``"512x1024"`` (height x width) -> ``(h, w)``."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects H or HxW in pixels (e.g. 512x1024), got {text!r}") from None
    return parts[0], parts[1]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (verified in onnxruntime), optionally INT8 (needs maskworks[export])",
        description="Export a semantic checkpoint's logits to ONNX with the class names, palette and mean / std in the "
        "graph's metadata, verify it against PyTorch in onnxruntime (on a second size and batch with --dynamic), and "
        "with --int8 quantize it (onnxruntime static quantization, QDQ, calibration images from --calib). A SAM "
        "checkpoint (official, HF or maskworks) becomes <name>_encoder.onnx and <name>_decoder.onnx (prompt encoder + "
        "mask decoder with the image embedding as an input, the official repository's interface). Writes "
        "export.json with what was written and the measured differences.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  maskworks export runs/camvid/best.safetensors --dynamic --out deploy/\n"
        "  maskworks export runs/camvid/best.safetensors --size 360x480 --int8 --calib ../shared/data/camvid/val\n"
        "  maskworks predict --backend onnxruntime --checkpoint deploy/best.onnx photos/ --out preds/\n"
        "  maskworks export sam_vit_b_01ec64.pth --out deploy/      # sam_vit_b_01ec64_encoder / _decoder.onnx\n",
    )
    p.add_argument("checkpoint", help="a maskworks checkpoint (.safetensors + .json) or SAM weights")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (onnx)")
    p.add_argument("--out", default="export", help="output folder (default: export)")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic batch, height and width (refused, with the reason, for models whose graph fixes the size)",
    )
    p.add_argument(
        "--size",
        type=parse_size,
        help="example / fixed input size HxW (default: the training crop or image size, else 512x512)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.add_argument("--int8", action="store_true", help="also write <name>_int8.onnx (static INT8, QDQ)")
    p.add_argument("--calib", help="--int8: folder of calibration images (e.g. training or validation images)")
    p.add_argument("--calib-count", type=int, default=32, help="--int8: images used for calibration (default 32)")
    p.add_argument(
        "--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax", help="--int8: range estimator"
    )
    p.add_argument(
        "--int8-all",
        action="store_true",
        help="--int8: quantize the first and last convolutions too (by default they stay float: on CamVid that "
        "keeps Fast-SCNN within 0.2 mIoU points of fp32 instead of losing 8)",
    )
    p.add_argument("--sam-model", help="SAM architecture when the weights do not tell (sam_vit_base / _large / _huge)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check (not recommended)")
    p.set_defaults(func=run)
    return p


def _is_sam(path: Path) -> bool:
    if path.suffix == ".safetensors" and path.with_suffix(".json").exists():
        from maskworks.checkpoint import read_model_meta
        from maskworks.registry import model_entry

        try:
            return model_entry(read_model_meta(path)["model"]).task == "promptable"
        except (KeyError, ValueError):
            return False
    return path.suffix in (".pth", ".pt", ".bin", ".safetensors")


def run(args: argparse.Namespace) -> int:
    import torch

    from maskworks.checkpoint import atomic_write_bytes
    from maskworks.cli.commands import prepare_out_dir
    from maskworks.cli.config import ConfigError

    try:
        from maskworks.export import export_sam, to_onnx
    except ImportError as e:
        raise ConfigError(f'maskworks export needs onnx and onnxruntime: pip install "maskworks[export]" ({e})') from e
    if args.int8 and not args.calib:
        raise ConfigError("--int8 needs --calib FOLDER of calibration images (the model's own kind of images)")
    if args.calib_count < 1:
        raise ConfigError(f"--calib-count must be >= 1, got {args.calib_count}")
    source = Path(args.checkpoint)
    if not source.exists():
        raise FileNotFoundError(f"checkpoint {source} not found")
    out = prepare_out_dir(args.out)
    report: dict = {"checkpoint": str(source), "files": {}}
    if _is_sam(source):
        from maskworks.cli.sam import load_sam

        if args.int8:
            raise ConfigError("--int8 applies to semantic checkpoints; SAM exports in fp32")
        model = load_sam(checkpoint=str(source), model=args.sam_model)
        paths = export_sam(model, out, name=source.stem, opset=args.opset, verify=not args.no_verify)
        report["files"] = {k: str(v) for k, v in paths.items()}
        for kind, path in paths.items():
            print(f"wrote SAM {kind}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    else:
        from maskworks.cli.commands import _model_and_meta, checkpoint_task

        model, meta, _ = _model_and_meta(str(source), "cpu")
        kind = checkpoint_task(model, meta)
        if kind not in ("semantic", "instance"):
            raise ConfigError(
                f"{source} is a {kind} model; maskworks export writes semantic and instance (Mask R-CNN) models and "
                "SAM: panoptic inference selects segments with data-dependent control flow that tracing freezes"
            )
        data = meta.get("data_config") or {}
        size = args.size or data.get("crop_size") or data.get("image_size") or 512
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        in_ch = int(meta.get("in_channels", 3))
        path = out / f"{source.stem}.onnx"
        if kind == "instance":
            from maskworks.export import to_onnx_instance

            if args.int8:
                raise ConfigError("--int8 applies to semantic checkpoints")
            result = to_onnx_instance(model, path, torch.rand(in_ch, h, w), opset=args.opset, verify=not args.no_verify)
        else:
            result = to_onnx(
                model,
                path,
                torch.randn(1, in_ch, h, w),
                dynamic=args.dynamic,
                opset=args.opset,
                verify=not args.no_verify,
            )
        print(f"wrote {result}")
        report["files"]["fp32"] = str(path)
        report["max_abs_diff"] = result.max_abs_diff
        report["dynamic"] = result.dynamic
        report["input_shape"] = list(result.input_shape)
        if args.int8:
            from maskworks.export.quantize import calibration_batches, quantize_onnx

            batches = calibration_batches(
                args.calib,
                meta.get("mean", [0.5] * in_ch),
                meta.get("std", [0.25] * in_ch),
                in_ch,
                size=None if args.dynamic else (h, w),
                limit=args.calib_count,
            )
            int8 = quantize_onnx(
                path, out / f"{source.stem}_int8.onnx", batches, method=args.calib_method, keep_ends=not args.int8_all
            )
            print(f"wrote {int8} (INT8 QDQ, {len(batches)} calibration images, {int8.stat().st_size / 2**20:.1f} MiB)")
            report["files"]["int8"] = str(int8)
            report["calibration_images"] = len(batches)
    atomic_write_bytes(out / "export.json", json.dumps(report, indent=2).encode())
    return 0
