"""Implementations of the ``maskworks`` subcommands (thin wrappers over the library)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from maskworks.cli import builders
from maskworks.cli.config import ConfigError, apply_overrides, load_config

log = logging.getLogger("maskworks")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def resolve_config(args) -> dict:
    cfg = load_config(getattr(args, "config", None))
    shortcuts = []
    for flag, key in (
        ("data", "data.name"),
        ("root", "data.root"),
        ("model", "model.name"),
        ("epochs", "train.epochs"),
        ("device", "train.device"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            shortcuts.append(f"{key}={value}")
    return apply_overrides(cfg, shortcuts + list(getattr(args, "overrides", [])))


# --------------------------------------------------------------------------- train
def train(args) -> int:
    from maskworks.engine import Trainer, seed_everything
    from maskworks.engine.distributed import cleanup_distributed

    cfg = resolve_config(args)
    seed_everything(int(cfg["train"]["seed"]))  # the initial weights depend on the seed too
    if args.run_dir:
        cfg["run_dir"] = args.run_dir
    run_dir = Path(cfg["run_dir"])
    train_set, val_set = builders.build_datasets(cfg["data"])
    base = builders.base_dataset(train_set)
    if cfg["data"].get("copy_paste"):
        builders.add_copy_paste(train_set, cfg["data"]["copy_paste"], progress=not args.no_progress)
    model = builders.build_model(cfg["model"], base.num_classes, base.in_channels)
    loss = builders.build_loss(cfg["train"], train_set)
    sample_weights = None
    if cfg["train"].get("rare_class_sampling"):
        from maskworks.data import image_class_presence, repeat_factors

        presence = image_class_presence(train_set, base.num_classes, progress=not args.no_progress)
        sample_weights = repeat_factors(presence, float(cfg["train"]["rare_class_sampling"]))
        log.info("rare-class sampling: repeat factors %.2f..%.2f", sample_weights.min(), sample_weights.max())
    trainer = Trainer(
        model,
        train_set,
        val_set,
        run_dir,
        loss_fn=loss,
        progress=not args.no_progress,
        meta={"data_config": cfg["data"]},
        sample_weights=sample_weights,
        **builders.trainer_kwargs(cfg["train"]),
    )
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "model %s (%.2fM params), %d train / %d val samples, run folder %s",
            cfg["model"]["name"],
            n_params / 1e6,
            len(train_set),
            len(val_set) if val_set is not None else 0,
            run_dir,
        )
    try:
        summary = trainer.fit(resume=args.resume)
    finally:
        cleanup_distributed()
    if trainer.dist.is_main:
        _plot_history(summary["history"], run_dir / "training_curves.png")
        best = summary["best_miou"]
        print(f"done: best val mIoU {best:.4f}" if best is not None else "done", f"- run folder {run_dir}")
    return 0


def _plot_history(history: list[dict], path: Path) -> None:
    from maskworks.viz import plot_training_curves

    if history:
        plot_training_curves(history, path)


# --------------------------------------------------------------------------- eval
def _model_and_meta(checkpoint: str, device: str):
    from maskworks.checkpoint import load_model
    from maskworks.engine import resolve_device

    dev = resolve_device(device)
    model = load_model(checkpoint, map_location=dev).eval()
    return model, model.maskworks_meta, dev


EVAL_METRICS = ("confusion", "boundary", "calibration", "surface")


def parse_eval_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown:
        raise ConfigError(f"--metrics: unknown {unknown}; choose from {', '.join(EVAL_METRICS)}")
    return ["confusion"] + [m for m in names if m != "confusion"]


def evaluate(args) -> int:
    from tqdm.auto import tqdm

    from maskworks.data import collate_samples as collate
    from maskworks.losses import split_outputs
    from maskworks.metrics import Calibration, ConfusionMatrix
    from maskworks.viz import plot_confusion_matrix, plot_reliability

    wanted = parse_eval_metrics(args.metrics)
    cfg = resolve_config(args)
    model, meta, dev = _model_and_meta(args.checkpoint, cfg["train"]["device"])
    data_cfg = dict(cfg["data"])
    if args.data is None and not any(o.startswith("data.") for o in args.overrides) and "data_config" in meta:
        data_cfg = {**data_cfg, **meta["data_config"]}
        if args.root:
            data_cfg["root"] = args.root
    dataset = builders.build_split(data_cfg, args.split)
    base = builders.base_dataset(dataset)
    names = list(getattr(base, "class_names", None) or meta.get("class_names") or [])
    k = getattr(base, "num_classes", None) or meta.get("num_classes")
    names = names or [str(i) for i in range(k)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
    metrics: dict[str, Any] = {"confusion": ConfusionMatrix(k, class_names=names, device=dev)}
    if "boundary" in wanted:
        from maskworks.metrics import BoundaryF1, BoundaryIoU

        metrics["boundary_f1"] = BoundaryF1(k, class_names=names)
        metrics["boundary_iou"] = BoundaryIoU(k, class_names=names)
    if "surface" in wanted:
        from maskworks.metrics import SurfaceDistance

        metrics["surface"] = SurfaceDistance(k, include_background=True, class_names=names)
    if "calibration" in wanted and k > 1:
        metrics["calibration"] = Calibration(k, from_logits=True)

    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", dynamic_ncols=True):
            logits, _ = split_outputs(model(batch["image"].to(dev)))
            target = batch["mask"].to(dev)
            pred = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
            for name, metric in metrics.items():
                metric.update(logits if name == "calibration" else pred, target)
    results = {name: metric.compute() for name, metric in metrics.items()}
    result = results["confusion"]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(args.checkpoint),
        "data": data_cfg,
        "split": args.split,
        "num_images": len(dataset),
        "seconds": time.perf_counter() - t0,
        **result,
        **{name: value for name, value in results.items() if name != "confusion"},
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    written = [
        out / "eval.json",
        plot_confusion_matrix(metrics["confusion"].matrix.cpu().numpy(), names, out / "confusion_matrix.png"),
    ]
    if "calibration" in results:
        written.append(plot_reliability(results["calibration"], out / "reliability.png"))
    print(format_table(result, names, results))
    print("report: " + ", ".join(str(w) for w in written))
    return 0


def format_table(result: dict, names: list[str], extra: dict | None = None) -> str:
    """Per-class table (IoU / Dice / precision / recall, and boundary F1 / boundary IoU / HD95 when evaluated)
    followed by the summary numbers."""
    extra = extra or {}
    width = max(8, *(len(n) for n in names))
    columns = [
        ("IoU", result["iou"]),
        ("Dice", result["dice"]),
        ("Prec", result["precision"]),
        ("Recall", result["recall"]),
    ]
    if "boundary_f1" in extra:
        columns.append(("BF1", extra["boundary_f1"]["bf1"]))
    if "boundary_iou" in extra:
        columns.append(("BIoU", extra["boundary_iou"]["boundary_iou"]))
    if "surface" in extra:
        columns.append(("HD95", extra["surface"]["hd95"]))
    lines = [f"{'class':<{width}}  " + " ".join(f"{c:>7}" for c, _ in columns)]
    for i, name in enumerate(names):
        cells = [values[i] for _, values in columns]
        lines.append(f"{name:<{width}}  " + " ".join("    n/a" if math.isnan(c) else f"{c:7.4f}" for c in cells))
    lines.append("-" * len(lines[0]))
    lines.append(
        f"{'mIoU':<{width}}  {result['miou']:7.4f}   mDice {result['mdice']:.4f}   "
        f"pixel acc {result['pixel_acc']:.4f}   mean acc {result['mean_acc']:.4f}   fwIoU {result['fwiou']:.4f}"
    )
    summary = []
    if "boundary_f1" in extra:
        summary.append(f"boundary F1 {extra['boundary_f1']['mbf1']:.4f}")
    if "boundary_iou" in extra:
        summary.append(f"boundary IoU {extra['boundary_iou']['mboundary_iou']:.4f}")
    if "surface" in extra:
        s = extra["surface"]
        summary.append(f"HD {s['mhd']:.2f}  HD95 {s['mhd95']:.2f}  ASSD {s['massd']:.2f} px")
    if "calibration" in extra:
        c = extra["calibration"]
        summary.append(f"ECE {c['ece']:.4f}  NLL {c['nll']:.4f}  Brier {c['brier']:.4f}")
    if summary:
        lines.append("   ".join(summary))
    return "\n".join(lines)


# --------------------------------------------------------------------------- predict
def _collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return files


def load_image_for_model(path: Path, in_channels: int, mean, std) -> tuple[np.ndarray, torch.Tensor]:
    """``(uint8 HWC RGB image for overlays, normalised (1, C, H, W) tensor)`` for a file."""
    from maskworks.data import DatasetError, normalize_image, read_image

    try:
        arr = read_image(path, channels=1 if in_channels == 1 else 3)  # (H, W, C) uint8
    except DatasetError as e:
        raise ValueError(str(e)) from e
    x = normalize_image(torch.from_numpy(arr.copy()).permute(2, 0, 1), mean, std)  # (C, H, W)
    return (arr if arr.shape[2] == 3 else np.repeat(arr, 3, axis=2)), x[None]


def predict_probs(model, x: torch.Tensor, args, num_classes: int) -> torch.Tensor:
    """Class probabilities ``(1, K, H, W)`` for a normalised image: optional TTA inside optional tiling."""
    from maskworks.inference import TTAWrapper, sliding_window
    from maskworks.losses import split_outputs

    binary = num_classes == 1
    activation = "sigmoid" if binary else "softmax"
    net = model
    if args.tta:
        net = TTAWrapper(model, transforms=args.tta, activation=activation, as_logits=True)
    if args.tile:
        probs = sliding_window(net, x, window=args.tile, overlap=args.overlap, activation=activation, batch_size=4)
    else:
        logits, _ = split_outputs(net(x))
        probs = torch.sigmoid(logits) if binary else torch.softmax(logits, 1)
    return torch.cat([1 - probs, probs], 1) if binary else probs


def predict(args) -> int:
    from tqdm.auto import tqdm

    from maskworks.inference import MeanFieldCRF, entropy_map
    from maskworks.viz import default_palette, overlay, save_label_png, save_rgb_png

    if args.tile is not None and args.tile < 8:
        raise ConfigError(f"--tile must be at least 8 pixels, got {args.tile}")
    if not 0 <= args.overlap < 1:
        raise ConfigError(f"--overlap must be in [0, 1), got {args.overlap}")
    model, meta, dev = _model_and_meta(args.checkpoint, args.device)
    files = _collect_images(args.inputs)
    k = meta.get("num_classes") or model.num_classes
    in_ch = meta.get("in_channels", 3)
    mean, std = meta.get("mean", [0.5] * in_ch), meta.get("std", [0.25] * in_ch)
    palette = [tuple(c) for c in meta.get("palette") or default_palette(max(k, 2))]
    crf = MeanFieldCRF(max(k, 2), iterations=args.crf_iterations).to(dev) if args.crf else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for f in tqdm(files, desc="predict", dynamic_ncols=True):
            rgb, x = load_image_for_model(f, in_ch, mean, std)
            probs = predict_probs(model, x.to(dev), args, k)  # (1, K', H, W), K' = max(K, 2)
            if crf is not None:
                guide = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float().to(dev)  # 0-255 RGB
                probs = crf(torch.log(probs.clamp_min(1e-8)), guide).exp()
            pred = probs.argmax(1)[0].cpu().numpy()
            save_label_png(pred, out / f"{f.stem}_label.png", palette)
            if not args.no_overlay:
                save_rgb_png(overlay(rgb, pred, palette, alpha=args.alpha), out / f"{f.stem}_overlay.png")
            if args.uncertainty:
                ent = entropy_map(probs)[0] / math.log(probs.shape[1])  # normalised to [0, 1]
                save_rgb_png(heatmap(ent.cpu().numpy()), out / f"{f.stem}_uncertainty.png")
    extras = [name for name, on in (("TTA " + str(args.tta), args.tta), ("tiles", args.tile), ("CRF", args.crf)) if on]
    print(f"wrote {len(files)} prediction(s) to {out}" + (f" ({', '.join(extras)})" if extras else ""))
    return 0


def heatmap(values: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """uint8 RGB image of values in [0, 1] through a matplotlib colour map."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- models
def models(args) -> int:
    from maskworks.registry import create_model, list_models, model_entry

    names = list_models(args.pattern)
    if not names:
        print(f"no registered model matches {args.pattern!r}")
        return 1
    print(f"{'name':<32} {'kind':<9} {'task':<11} {'params':>10}")
    for name in names:
        entry = model_entry(name)
        count = ""
        if not args.no_params:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                m = create_model(name)
            count = f"{sum(p.numel() for p in m.parameters()) / 1e6:9.2f}M"
        print(f"{name:<32} {entry.kind:<9} {entry.task:<11} {count:>10}")
    return 0


# --------------------------------------------------------------------------- demo
def demo(args) -> int:
    from maskworks.cli.demo import run_demo

    summary = run_demo(Path(args.run_dir), epochs=args.epochs, device=args.device, seed=args.seed)
    print(f"demo finished in {summary['seconds']:.0f} s: validation mIoU {summary['miou']:.3f}")
    print(f"report: {summary['report']}")
    return 0
