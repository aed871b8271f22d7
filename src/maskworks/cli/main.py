"""The ``maskworks`` command line: demo, train, eval, predict, models, bench, pretrain-mae, complexity, attention, sam,
serve."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys

from maskworks.cli import commands
from maskworks.cli.config import ConfigError

EPILOG = """examples:
  maskworks demo                                   # synthetic data, small U-Net, report in runs/demo
  maskworks train --data camvid --set train.epochs=50 --run-dir runs/camvid
  maskworks train --config configs/camvid_unet.yaml --set model.encoder=resnet34
  maskworks train --data folder --set data.root=my_data --resume --run-dir runs/mine
  maskworks train --data voc --root ../data/VOCdevkit --set data.train_split=train_aug
  maskworks eval --checkpoint runs/camvid/best.safetensors
  maskworks predict --checkpoint runs/camvid/best.safetensors photos/ --out preds/
  maskworks bench unet_resnet34 --mode both         # ours vs smp, same weights, interleaved timing
  maskworks pretrain-mae --images unlabeled/ --model mae_vit_base_patch16 --epochs 100 --out runs/mae
  maskworks attention photo.jpg --model vit_base_patch16_224 --checkpoint vit.safetensors --out attn/
  maskworks complexity --dim 768 --heads 12 --tokens 196 784 3136 --out complexity/
  maskworks sam photo.jpg --checkpoint sam_vit_b_01ec64.pth --point 420,310      # or --box x0,y0,x1,y1, or --auto
  maskworks serve --checkpoint runs/camvid/best.safetensors --sam sam_vit_b_01ec64.pth   # web page + REST API
  maskworks export runs/camvid/best.safetensors --dynamic --int8 --calib photos/ --out deploy/  # ONNX + INT8
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
    p.add_argument(
        "--data",
        help="dataset shortcut for data.name: synthetic | folder | camvid | isbi2012 | isbi2012_instances | voc | "
        "cityscapes | ade20k | cocostuff | coco | coco_panoptic",
    )
    p.add_argument("--root", help="shortcut for data.root (dataset folder)")
    p.add_argument("--model", help="shortcut for model.name (see `maskworks models`)")
    p.add_argument("--epochs", type=int, help="shortcut for train.epochs")
    p.add_argument("--device", help="shortcut for train.device: auto | cpu | cuda | cuda:N")
    _add_task_arg(p)


def _add_task_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        choices=("semantic", "instance", "panoptic"),
        help="the task of a model that serves several (mask2former); default: the model's own task (the one a "
        "checkpoint was trained for). A model registered with one task refuses any other",
    )


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    """Options shared by eval and predict."""
    p.add_argument(
        "--threshold", type=float, default=0.5, help="binary models (one output): foreground where p > this (0.5)"
    )
    p.add_argument(
        "--fuse-bn",
        action="store_true",
        help="fold BatchNorm layers into the convolutions before running (same outputs to float rounding, faster)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskworks",
        description="Image segmentation with CNNs and vision transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="train a small U-Net on synthetic shapes and write a report",
        description="Generate synthetic shapes, train a small U-Net on the CPU or GPU, evaluate it, "
        "and write metrics.json, training curves, prediction overlays and report.html into the run "
        "folder. One to three minutes on 2 CPU cores (about one with native bfloat16, e.g. AMX).",
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <run-dir>/checkpoints/last.pt with the run's saved config.yaml (only --epochs, --device, "
        "data.root and logging settings may change)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a --run-dir that already holds a run, deleting its checkpoints and logs "
        "(without it such a folder is refused)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=commands.train)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a dataset",
        description="Evaluate a checkpoint. Semantic models: prints a per-class table (IoU, Dice, precision, recall, "
        "boundary F1, boundary IoU) with mIoU, calibration (ECE, NLL, Brier) and, on request, Hausdorff distances, and "
        "writes eval.json, confusion_matrix.png and reliability.png into --out (default: beside the checkpoint). "
        "Instance models: COCO mask and box AP (AP, AP50, AP75, per class) into eval.json. Panoptic models: PQ, SQ and "
        "RQ over all classes, things and stuff, and per class, into eval.json.",
    )
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint with its .json beside it")
    _add_config_args(p)
    p.add_argument(
        "--split",
        default="val",
        help="dataset split: train, val; test (camvid, cityscapes), trainval / train_aug (voc), train_extra (cityscapes "
        "with data.annotations=gtCoarse), all (isbi2012, folder)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", help="folder for the report (default: the checkpoint's folder)")
    p.add_argument(
        "--metrics",
        default="confusion,boundary,calibration",
        help="comma-separated metric groups: confusion (always), boundary (boundary F1 / IoU), calibration "
        "(ECE, NLL, Brier, reliability diagram), surface (Hausdorff, HD95, ASSD; slower). "
        "Default: confusion,boundary,calibration",
    )
    _add_inference_args(p)
    p.set_defaults(func=commands.evaluate)

    p = sub.add_parser(
        "predict",
        help="segment image files or folders",
        description="Segment images of any size. Semantic models: writes <name>_label.png (palette PNG of class ids), "
        "keeping the inputs' folder structure below their common folder (files that share a name keep their "
        "extension in it, e.g. scene_png_label.png), "
        "<name>_overlay.png and, with --uncertainty, <name>_uncertainty.png (normalised predictive entropy) for "
        "every input image. --tile runs a Gaussian-blended sliding window; --tta averages the probabilities of "
        "flipped/rotated/rescaled inputs (inside every tile when tiling); --crf refines with a dense CRF. "
        "Instance models: writes <name>_instances.png (each instance in its own colour, with class and score), "
        "<name>_ids.png (16-bit instance ids: pixel value i = the image's i-th row of coco_results.json; where "
        "masks overlap, --paste-order picks the owner) and coco_results.json (COCO results with RLE masks, category ids of the training data; polygons with "
        "--polygons). Panoptic models: writes <name>_panoptic.png (COCO panoptic RGB ids, id = R + 256 G + 256^2 B), "
        "<name>_panoptic_overlay.png (stuff in class colours, things each in its own colour, outlined) and "
        "panoptic_results.json (COCO panoptic annotations and categories). Volumetric models: NIfTI inputs (files, "
        "or folders of <case>_0000.nii.gz channel files) give <case>.nii.gz label volumes with the input's affine and "
        "header, predicted at the training spacing by a Gaussian-blended sliding window (--tta mirror: nnU-Net's "
        "mirroring).",
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images (or NIfTI volumes)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a .safetensors checkpoint with its .json beside it (or, with --backend onnxruntime, an exported .onnx)",
    )
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="torch (default), or onnxruntime for a graph written by `maskworks export` (semantic models; the "
        "graph's metadata gives classes, palette and mean / std)",
    )
    _add_task_arg(p)
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--no-overlay", action="store_true", help="write label PNGs only")
    p.add_argument("--tile", type=int, help="sliding-window size in pixels (e.g. 512); default: whole image at once")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction in [0, 1) (default 0.25)")
    p.add_argument(
        "--tta",
        help="test-time augmentation preset: flip, mirror, rot90, d4, scales, flip_scales, ms_flip (default: none)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="semantic models: predict at this fraction of the image size and upsample the probabilities (e.g. 0.5 "
        "for about 4x less compute; default 1)",
    )
    p.add_argument("--crf", action="store_true", help="refine with a dense CRF (mean field, Potts, 5 iterations)")
    p.add_argument("--crf-iterations", type=int, default=5, help="mean-field iterations of --crf (default 5)")
    p.add_argument("--uncertainty", action="store_true", help="also write <name>_uncertainty.png (entropy heat map)")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="instance models: keep detections scoring at least this much (default 0.5)",
    )
    p.add_argument(
        "--polygons", action="store_true", help="instance models: also write COCO polygons into coco_results.json"
    )
    p.add_argument(
        "--paste-order",
        choices=("occlusion", "score"),
        default="score",
        help="instance models: which of overlapping masks lies in front in <name>_ids.png and the overlays: "
        "'score' puts the higher score in front; 'occlusion' decides each overlapping pair from the overlap (the "
        "mask more confident there when the model returns mask probabilities, else the instance mostly covered by "
        "the other); on dense synthetic scenes it assigns 3 points more contested pixels rightly for YOLACT and 2 "
        "fewer for Mask R-CNN (benchmarks/RESULTS.md) (default: score)",
    )
    _add_inference_args(p)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=commands.MAX_WHOLE_IMAGE_PIXELS,
        help=f"images above this many pixels are predicted in {commands.AUTO_TILE}-pixel tiles when --tile is not "
        f"given (default {commands.MAX_WHOLE_IMAGE_PIXELS}, i.e. 2048x2048); above {commands.STRIP_PIXELS} pixels "
        "the image is read and predicted by strips when neither --crf nor --uncertainty needs its probabilities",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=commands.PREDICT_MAX_IMAGE_PIXELS,
        help="refuse image files above this many pixels (decompression-bomb guard; default 2^30)",
    )
    p.set_defaults(func=commands.predict)

    p = sub.add_parser(
        "models",
        help="list registered models and backbones with parameter counts",
        description="List registered names matching a glob pattern, with parameter counts.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern, e.g. 'resnet*' (default: all)")
    p.add_argument("--no-params", action="store_true", help="skip building models to count parameters")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="list the published weights of the matching models instead: tag, source, file, SHA-256, licence",
    )
    p.set_defaults(func=commands.models)

    from maskworks.cli import bench, export, mae, plan, sam, serve, vit_tools

    bench.add_parser(sub)
    mae.add_parser(sub)
    sam.add_parser(sub)
    serve.add_parser(sub)
    export.add_parser(sub)
    plan.add_parser(sub)
    vit_tools.add_parsers(sub)
    return parser


def version_string() -> str:
    import platform

    import torch
    import torchvision

    from maskworks import __version__

    return (
        f"maskworks {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()})"
    )


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def _check_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Exit with "did you mean" for a mistyped subcommand (argparse itself only lists the choices)."""
    word = next((a for a in argv if not a.startswith("-")), None)  # the only top-level flags take no value
    names = _commands(parser)
    if word is None or word in names:
        return
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    parser.print_usage(sys.stderr)
    print(f"maskworks: error: unknown command '{word}'; {hint}commands: {', '.join(names)}", file=sys.stderr)
    sys.exit(2)


def _describe(e: BaseException) -> str:
    """One line for an error, with the file for OS errors (errno names such as 'No space left on device')."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, FileNotFoundError | FileExistsError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror.lower()}{where}"
    text = " ".join(str(e).split("\n")[0].split()) if str(e) else type(e).__name__
    if isinstance(e, FileNotFoundError) and e.strerror and e.filename:
        text = f"{e.strerror.lower()}: {e.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_command(parser, argv)
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
    except KeyboardInterrupt:
        print(f"maskworks {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, TypeError) as e:
        # Bad input: a config value, a dataset or checkpoint file, a path. Dataset errors may list several files.
        message = str(e) if isinstance(e, ValueError) and "\n" in str(e) else _describe(e)
        print(f"maskworks {args.command}: error: {message}", file=sys.stderr)
        if args.verbose:
            raise
        return 2
    except OSError as e:  # disk full, permissions, I/O errors while writing outputs
        print(f"maskworks {args.command}: error: {_describe(e)}", file=sys.stderr)
        if args.verbose:
            raise
        return 1
    except RuntimeError as e:  # TrainingDiverged and friends
        print(f"maskworks {args.command}: {type(e).__name__}: {_describe(e)}", file=sys.stderr)
        if args.verbose:
            raise
        return 1
    except Exception as e:  # a defect: one line here, the traceback with -v
        print(
            f"maskworks {args.command}: internal error: {type(e).__name__}: {_describe(e)} (run with -v for the "
            "traceback)",
            file=sys.stderr,
        )
        if args.verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
