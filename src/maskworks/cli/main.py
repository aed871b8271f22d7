"""The ``maskworks`` command line: demo, train, eval, predict, models, bench, pretrain-mae, complexity, attention."""

from __future__ import annotations

import argparse
import logging
import sys

from maskworks.cli import commands
from maskworks.cli.config import ConfigError

EPILOG = """examples:
  maskworks demo                                   # synthetic data, small U-Net, report in runs/demo
  maskworks train --data camvid --set train.epochs=50 --run-dir runs/camvid
  maskworks train --config configs/camvid_unet.yaml --set model.encoder=resnet34
  maskworks train --data folder --set data.root=my_data --resume --run-dir runs/mine
  maskworks eval --checkpoint runs/camvid/best.safetensors
  maskworks predict --checkpoint runs/camvid/best.safetensors photos/ --out preds/
  maskworks bench unet_resnet34 --mode both         # ours vs smp, same weights, interleaved timing
  maskworks pretrain-mae --images unlabeled/ --model mae_vit_base_patch16 --epochs 100 --out runs/mae
  maskworks attention photo.jpg --model vit_base_patch16_224 --checkpoint vit.safetensors --out attn/
  maskworks complexity --dim 768 --heads 12 --tokens 196 784 3136 --out complexity/
  torchrun --nproc_per_node 2 -m maskworks.cli.main train --config my.yaml   # DDP
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with model/data/train sections (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.01 --set model.encoder=resnet34 (repeatable)",
    )
    p.add_argument("--data", help="dataset shortcut for data.name: synthetic | folder | camvid | isbi2012")
    p.add_argument("--root", help="shortcut for data.root (dataset folder)")
    p.add_argument("--model", help="shortcut for model.name (see `maskworks models`)")
    p.add_argument("--epochs", type=int, help="shortcut for train.epochs")
    p.add_argument("--device", help="shortcut for train.device: auto | cpu | cuda | cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskworks",
        description="Image segmentation with CNNs and vision transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="train a small U-Net on synthetic shapes and write a report",
        description="Generate synthetic shapes, train a small U-Net on the CPU or GPU, evaluate it, "
        "and write metrics.json, training curves, prediction overlays and report.html into the run "
        "folder. About 2-3 minutes on 2 CPU cores.",
    )
    p.add_argument("--run-dir", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the tuned demo recipe)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.demo)

    p = sub.add_parser(
        "train",
        help="train a model from a config",
        description="Train a segmentation model. Config = built-in defaults < --config YAML < "
        "shortcuts < --set overrides; the resolved config is saved as config.yaml in the run folder. "
        "Checkpoints are written after every epoch; --resume continues an interrupted run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument("--run-dir", help="output folder (default: run_dir from the config, runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=commands.train)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a dataset",
        description="Evaluate a checkpoint: prints a per-class table (IoU, Dice, precision, recall, boundary F1, "
        "boundary IoU) with mIoU, calibration (ECE, NLL, Brier) and, on request, Hausdorff distances, and writes "
        "eval.json, confusion_matrix.png and reliability.png into --out (default: beside the checkpoint).",
    )
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint with its .json beside it")
    _add_config_args(p)
    p.add_argument("--split", default="val", help="dataset split (default: val)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", help="folder for the report (default: the checkpoint's folder)")
    p.add_argument(
        "--metrics",
        default="confusion,boundary,calibration",
        help="comma-separated metric groups: confusion (always), boundary (boundary F1 / IoU), calibration "
        "(ECE, NLL, Brier, reliability diagram), surface (Hausdorff, HD95, ASSD; slower). "
        "Default: confusion,boundary,calibration",
    )
    p.set_defaults(func=commands.evaluate)

    p = sub.add_parser(
        "predict",
        help="segment image files or folders",
        description="Segment images of any size: writes <name>_label.png (palette PNG of class ids), "
        "<name>_overlay.png and, with --uncertainty, <name>_uncertainty.png (normalised predictive entropy) for "
        "every input image. --tile runs a Gaussian-blended sliding window; --tta averages the probabilities of "
        "flipped/rotated/rescaled inputs (inside every tile when tiling); --crf refines with a dense CRF.",
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint with its .json beside it")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--device", default="auto")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--no-overlay", action="store_true", help="write label PNGs only")
    p.add_argument("--tile", type=int, help="sliding-window size in pixels (e.g. 512); default: whole image at once")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction in [0, 1) (default 0.25)")
    p.add_argument(
        "--tta",
        help="test-time augmentation preset: flip, mirror, rot90, d4, scales, flip_scales, ms_flip (default: none)",
    )
    p.add_argument("--crf", action="store_true", help="refine with a dense CRF (mean field, Potts, 5 iterations)")
    p.add_argument("--crf-iterations", type=int, default=5, help="mean-field iterations of --crf (default 5)")
    p.add_argument("--uncertainty", action="store_true", help="also write <name>_uncertainty.png (entropy heat map)")
    p.set_defaults(func=commands.predict)

    p = sub.add_parser(
        "models",
        help="list registered models and backbones with parameter counts",
        description="List registered names matching a glob pattern, with parameter counts.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern, e.g. 'resnet*' (default: all)")
    p.add_argument("--no-params", action="store_true", help="skip building models to count parameters")
    p.set_defaults(func=commands.models)

    from maskworks.cli import bench, mae, vit_tools

    bench.add_parser(sub)
    mae.add_parser(sub)
    vit_tools.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"maskworks {args.command}: error: {e}", file=sys.stderr)
        if args.verbose:
            raise
        return 2
    except KeyboardInterrupt:
        print(f"maskworks {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # TrainingDiverged and friends
        print(f"maskworks {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        if args.verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
