"""Implementations of the ``maskworks`` subcommands (thin wrappers over the library)."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from maskworks.checkpoint import atomic_write_bytes
from maskworks.cli import builders
from maskworks.cli.config import (
    RESUMABLE_KEYS,
    ConfigError,
    apply_overrides,
    check_config,
    config_changes,
    load_config,
)
from maskworks.data.transforms import normalize_image
from maskworks.engine.perf import images_to

log = logging.getLogger("maskworks")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Whole-image prediction above this many pixels switches to tiles of AUTO_TILE pixels (predict --max-pixels).
MAX_WHOLE_IMAGE_PIXELS = 2048 * 2048
AUTO_TILE = 1024
# Above this many pixels, tiled prediction reads and predicts by strips (no full-size probability map) when no
# CRF or uncertainty map needs the probabilities.
STRIP_PIXELS = 8192 * 8192
# Pillow's decompression-bomb limit while reading files named on the predict command line (predict --max-image-pixels).
PREDICT_MAX_IMAGE_PIXELS = 2**30


def resolve_config(args, base: dict | None = None) -> dict:
    """Defaults (or ``base``, e.g. a resumed run's saved config) < ``--config`` < shortcuts < ``--set``."""
    cfg = load_config(getattr(args, "config", None), base=base)
    shortcuts = []
    for flag, key in (
        ("data", "data.name"),
        ("root", "data.root"),
        ("model", "model.name"),
        ("epochs", "train.epochs"),
        ("device", "train.device"),
        ("task", "task"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            shortcuts.append(f"{key}={value}")
    cfg = apply_overrides(cfg, shortcuts + list(getattr(args, "overrides", [])))
    if getattr(args, "run_dir", None):
        cfg["run_dir"] = args.run_dir
    return check_config(cfg)


def prepare_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create an output folder up front and check it can be written, so a long job never fails at its end.

    Raises:
        ConfigError: the path is an existing file, cannot be created, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is an existing file; expected a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {out} cannot be created: {e.strerror or e}") from e
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {out} is not writable: {e.strerror or e}") from e
    return out


def _resume_config(args, run_dir: Path) -> dict:
    """The config a resumed run continues with: the saved ``config.yaml`` with this command's explicit settings on
    top; settings that would change what the saved state means are refused, the rest applied and logged."""
    saved_path = run_dir / "config.yaml"
    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.exists():
        raise ConfigError(
            f"cannot resume: {run_dir} has no checkpoint (checkpoints/last.pt); start the run without --resume"
        )
    if not saved_path.exists():
        log.warning("%s has no config.yaml; resuming with the configuration given on this command line", run_dir)
        return resolve_config(args)
    saved = load_config(saved_path)
    cfg = resolve_config(args, base=saved)
    changes = {k: v for k, v in config_changes(saved, cfg).items() if k != "run_dir"}
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"cannot resume {run_dir} with changed settings ({listed}); a resumed run continues its saved "
            f"config.yaml. Drop these settings, or start a new run with --run-dir (resumable changes: "
            f"{', '.join(k for k in RESUMABLE_KEYS if k != 'run_dir')})"
        )
    for key, (old, new) in changes.items():
        log.warning("resume: %s changed from %r to %r", key, old, new)
    return cfg


# --------------------------------------------------------------------------- train
def train(args) -> int:
    from maskworks.engine import Trainer, seed_everything
    from maskworks.engine.distributed import cleanup_distributed
    from maskworks.engine.trainer import RUN_OUTPUTS

    cfg = resolve_config(args)
    run_dir = Path(cfg["run_dir"])
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is an existing file; expected a folder")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if args.resume:
        cfg = _resume_config(args, run_dir)
    else:
        earlier = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        if earlier and not args.overwrite:
            raise ConfigError(
                f"run folder {run_dir} already holds a run ({', '.join(earlier[:3])}); continue it with --resume, "
                "start a new one with --run-dir NEW_FOLDER, or replace it with --overwrite"
            )
    kind = builders.resolve_task(cfg["model"]["name"], cfg.get("task") or cfg["model"].get("task"))
    builders.check_task_settings(cfg, kind)
    seed_everything(int(cfg["train"]["seed"]))  # the initial weights depend on the seed too
    progress = not args.no_progress
    train_set, val_set = builders.build_datasets(cfg["data"])
    base = builders.base_dataset(train_set)
    task_options = builders.task_kwargs(kind, train_set, where=f"data.name={cfg['data']['name']}")
    builders.validate_datasets(cfg["data"], train_set, val_set, progress=progress)
    if cfg["data"].get("copy_paste"):
        builders.add_copy_paste(train_set, cfg["data"]["copy_paste"], progress=progress)
    thing_classes = None
    if kind == "panoptic":
        thing_classes = [i for i, t in enumerate(task_options["isthing"]) if t]
    if kind == "volumetric" and cfg["data"].get("plan") and cfg["model"]["name"] == "dynunet":
        cfg["model"].setdefault("plan", cfg["data"]["plan"])  # the planned topology
    model = builders.build_model(cfg["model"], base.num_classes, base.in_channels, kind, thing_classes)
    meta: dict[str, Any] = {"data_config": cfg["data"], "task": kind}
    if kind == "volumetric":  # what predicting a NIfTI file needs: the patch, the spacing and the normalisation
        meta["patch_size"] = list(task_options.get("patch_size") or ())
        spacing = getattr(base, "target_spacing", None)
        meta["volume"] = {"normalization": getattr(base, "normalization", None),
                          "spacing": list(spacing) if spacing else None}  # fmt: skip
    if getattr(base, "category_ids", None) is not None:  # COCO: labels map back to category ids in results
        meta["category_ids"] = list(base.category_ids)
    if kind == "panoptic":
        meta["isthing"], meta["thing_classes"] = task_options["isthing"], thing_classes
    if kind == "semantic" and (cfg.get("distill") or {}).get("teacher"):
        task_args = {"task": _distillation_task(cfg, model, train_set, base)}
        meta["distill"] = dict(cfg["distill"])
    elif kind == "semantic":
        task_args: dict[str, Any] = {"loss_fn": builders.build_loss(cfg["train"], train_set)}
    else:
        if (cfg.get("distill") or {}).get("teacher"):
            raise ConfigError(f"distill.teacher applies to semantic models; {cfg['model']['name']} is a {kind} model")
        from maskworks.tasks import build_task

        task_args = {"task": build_task(kind, **task_options)}
    sample_weights = None
    if cfg["train"].get("rare_class_sampling"):
        from maskworks.data import image_class_presence, repeat_factors

        presence = image_class_presence(train_set, base.num_classes, progress=progress)
        sample_weights = repeat_factors(presence, float(cfg["train"]["rare_class_sampling"]))
        log.info("rare-class sampling: repeat factors %.2f..%.2f", sample_weights.min(), sample_weights.max())
    trainer = Trainer(
        model,
        train_set,
        val_set,
        run_dir,
        progress=progress,
        meta=meta,
        sample_weights=sample_weights,
        **task_args,
        **{"eval_batch_size": 1, **builders.trainer_kwargs(cfg["train"])} if kind == "volumetric" else
        builders.trainer_kwargs(cfg["train"]),
    )  # fmt: skip
    if args.resume:
        trainer.load_checkpoint()  # before config.yaml is written: a failed resume changes nothing
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
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
        summary = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    finally:
        cleanup_distributed()
    if trainer.dist.is_main:
        _plot_history(summary["history"], run_dir / "training_curves.png")
        best = summary["best_metric"]
        label = trainer.task.headline_label
        print(f"done: best val {label} {best:.4f}" if best is not None else "done", f"- run folder {run_dir}")
    return 0


def _distillation_task(cfg: dict, model, train_set, base):
    """The semantic task with knowledge distillation from ``distill.teacher`` (a frozen checkpoint)."""
    from maskworks.checkpoint import load_model
    from maskworks.methods.distillation import DistillationTask

    settings = cfg["distill"]
    path = Path(settings["teacher"])
    if not path.exists():
        raise FileNotFoundError(f"distill.teacher: checkpoint {path} not found")
    teacher = load_model(path)
    classes = model_output_classes(teacher)
    if settings["kind"] in ("pixel", "cwd") and classes != base.num_classes:
        raise ConfigError(
            f"distill.teacher {path} predicts {classes} classes, the data has {base.num_classes}; logit distillation "
            "(distill.kind=pixel / cwd) needs the same classes"
        )
    x = torch.randn(1, base.in_channels, 64, 64)
    return DistillationTask(
        teacher,
        kind=settings["kind"],
        alpha=float(settings["alpha"]),
        temperature=float(settings["temperature"]),
        student=model,
        example_input=x,
        loss_fn=builders.build_loss(cfg["train"], train_set),
        num_classes=base.num_classes,
        class_names=getattr(base, "class_names", None),
    )


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


def _onnx_model_and_meta(args):
    """``maskworks predict --backend onnxruntime``: the exported graph behind the module interface predict uses
    (:class:`maskworks.export.OnnxSegmenter`), its stored metadata and the CPU device."""
    try:
        from maskworks.export import OnnxSegmenter
    except ImportError as e:
        raise ConfigError(
            f'--backend onnxruntime needs onnx and onnxruntime: pip install "maskworks[export]" ({e})'
        ) from e
    if not str(args.checkpoint).endswith(".onnx"):
        raise ConfigError(
            f"--backend onnxruntime runs an exported .onnx graph, got {args.checkpoint}; export it first: "
            "maskworks export CHECKPOINT"
        )
    if args.fuse_bn:
        raise ConfigError("--fuse-bn applies to PyTorch checkpoints; an exported graph already folds BatchNorm")
    model = OnnxSegmenter(args.checkpoint, threads=torch.get_num_threads())
    meta = model.maskworks_meta
    if meta.get("task", "semantic") != "semantic":
        raise ConfigError(f"{args.checkpoint} holds a {meta['task']} model; --backend onnxruntime runs semantic graphs")
    if model.num_classes is None:
        raise ConfigError(f"{args.checkpoint} does not say how many classes it predicts (no maskworks metadata)")
    return model, meta, torch.device("cpu")


def _inference_model(model, fuse_bn: bool):
    """The model as ``eval`` / ``predict`` run it: channels-last for convolutional models (the rule of
    :func:`maskworks.engine.perf.prefers_channels_last`) and, with ``--fuse-bn``, BatchNorm folded into the
    convolutions (:func:`maskworks.inference.fuse_conv_bn`). Returns ``(model, channels_last)``."""
    from maskworks.engine.perf import prefers_channels_last
    from maskworks.inference import prepare_for_inference

    channels_last = prefers_channels_last(model)
    if not fuse_bn:
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place: the loaded model is ours to change
        return model, channels_last
    prepared = prepare_for_inference(model, fuse=True, channels_last=channels_last)
    if fuse_bn:
        report = prepared.conv_bn_fusion
        log.info("BatchNorm folding: %d layer(s) fused, %d left", report.num_fused, report.num_left)
    return prepared, channels_last


def model_output_classes(model) -> int:
    """Output channels of a checkpoint's model: its constructor's ``num_classes`` (1 = binary, sigmoid)."""
    config = getattr(model, "maskworks_config", None) or {}
    k = config.get("kwargs", {}).get("num_classes", getattr(model, "num_classes", None))
    if k is None:
        k = (getattr(model, "maskworks_meta", None) or {}).get("num_classes")
    if k is None:
        raise ConfigError("cannot tell how many classes the checkpoint's model predicts (no num_classes)")
    return int(k)


def binary_to_two_class(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """One-channel binary logits ``(B, 1, H, W)`` -> two-class logits ``(B, 2, H, W)`` whose softmax is
    ``(1 - p, p)`` with ``p = sigmoid(x)``, shifted so that the argmax is ``p > threshold``."""
    shift = math.log(threshold / (1.0 - threshold))
    return torch.cat([torch.full_like(logits, shift), logits], 1)


def _check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    return threshold


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
    from maskworks.metrics.confusion import check_finite
    from maskworks.viz import plot_confusion_matrix, plot_reliability

    wanted = parse_eval_metrics(args.metrics)
    threshold = _check_threshold(args.threshold)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg = resolve_config(args)
    out = prepare_out_dir(args.out if args.out else Path(args.checkpoint).parent)
    model, meta, dev = _model_and_meta(args.checkpoint, cfg["train"]["device"])
    data_cfg = dict(cfg["data"])
    if args.data is None and not any(o.startswith("data.") for o in args.overrides) and "data_config" in meta:
        data_cfg = {**data_cfg, **meta["data_config"]}
        if args.root:
            data_cfg["root"] = args.root
    kind = checkpoint_task(model, meta, getattr(args, "task", None))
    if kind != "semantic":
        return _evaluate_task(args, kind, model, meta, dev, data_cfg, out)
    model, channels_last = _inference_model(model, args.fuse_bn)
    dataset = builders.build_split(data_cfg, args.split)
    builders.validate_datasets(data_cfg, dataset)
    base = builders.base_dataset(dataset)
    out_classes = model_output_classes(model)
    k = getattr(base, "num_classes", None) or meta.get("num_classes")
    builders.check_class_count(out_classes, k, f"checkpoint {args.checkpoint} on data.name={data_cfg['name']}")
    names = list(getattr(base, "class_names", None) or meta.get("class_names") or [])
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
    with torch.inference_mode():
        for batch in tqdm(loader, desc="eval", dynamic_ncols=True, disable=None):
            logits, _ = split_outputs(model(images_to(batch["image"], dev, channels_last)))
            check_finite(logits, f"the logits of {args.checkpoint}")  # argmax would count NaN as class 0
            if out_classes == 1:
                logits = binary_to_two_class(logits, threshold)
            target = batch["mask"].to(dev)
            pred = logits.argmax(1)
            for name, metric in metrics.items():
                metric.update(logits if name == "calibration" else pred, target)
    results = {name: metric.compute() for name, metric in metrics.items()}
    result = results["confusion"]
    report = {
        "checkpoint": str(args.checkpoint),
        "data": data_cfg,
        "split": args.split,
        "num_images": len(dataset),
        "seconds": time.perf_counter() - t0,
        **({"threshold": threshold} if out_classes == 1 else {}),
        **result,
        **{name: value for name, value in results.items() if name != "confusion"},
    }
    atomic_write_bytes(out / "eval.json", json.dumps(report, indent=2, default=str).encode())
    written = [
        out / "eval.json",
        plot_confusion_matrix(metrics["confusion"].matrix.cpu().numpy(), names, out / "confusion_matrix.png"),
    ]
    if "calibration" in results:
        written.append(plot_reliability(results["calibration"], out / "reliability.png"))
    print(format_table(result, names, results))
    print("report: " + ", ".join(str(w) for w in written))
    return 0


def checkpoint_task(model, meta: dict, requested: str | None = None) -> str:
    """The task a loaded checkpoint runs: ``requested`` (``--task``) when its model serves it, else the task it
    was trained for (``meta["task"]``), else its model's default; a model that serves several tasks (it has a
    ``task`` attribute, as Mask2Former) is switched to the chosen one.

    Raises:
        ConfigError: ``requested`` is a task the model does not serve, or ``--task`` for a model built outside
            the registry.
    """
    from maskworks.registry import model_entry

    config = getattr(model, "maskworks_config", None)
    name = config.get("name") if isinstance(config, dict) else None
    if name is None:
        if requested not in (None, "semantic"):
            raise ConfigError(f"--task {requested}: the checkpoint's model is not a registered model")
        return "semantic"
    current = meta.get("task") or (config.get("kwargs") or {}).get("task")
    kind = builders.resolve_task(name, requested, current)
    if len(model_entry(name).all_tasks) > 1 and isinstance(getattr(model, "task", None), str):
        model.task = kind
    return kind


def _set_thing_classes(model, task) -> None:
    """A panoptic model that takes its thing classes as an attribute (Mask2Former, which may have been trained for
    another task and switched with ``--task panoptic``) follows the panoptic task's table of things and stuff."""
    isthing = getattr(task, "isthing", None)
    if (
        isthing is not None
        and isinstance(getattr(model, "thing_classes", None), list)
        and getattr(model, "task", None) == "panoptic"
    ):
        model.thing_classes = [i for i, t in enumerate(isthing) if t]


def _evaluate_task(args, kind: str, model, meta: dict, dev, data_cfg: dict, out: Path) -> int:
    """``maskworks eval`` for every task but semantic, through the task's evaluator (instance: COCO mask and box
    AP with pycocotools; panoptic: PQ / SQ / RQ overall, for things and for stuff, and per class; volumetric: per-case
    Dice per class)."""
    from tqdm.auto import tqdm

    from maskworks.tasks import build_task

    if args.fuse_bn:
        raise ConfigError(
            f"--fuse-bn applies to semantic models; {meta.get('model', 'this checkpoint')} is a {kind} model"
        )
    dataset = builders.build_split(data_cfg, args.split)
    builders.validate_datasets(data_cfg, dataset)
    base = builders.base_dataset(dataset)
    names = list(getattr(base, "class_names", None) or meta.get("class_names") or [])
    out_classes = model_output_classes(model)
    if names and len(names) != out_classes:
        raise ConfigError(
            f"checkpoint {args.checkpoint} predicts {out_classes} classes"
            f"{' (background included)' if kind == 'instance' else ''} but "
            f"data.name={data_cfg['name']} has {len(names)}"
        )
    task = build_task(kind, **builders.task_kwargs(kind, dataset, meta, where=f"data.name={data_cfg['name']}"))
    _set_thing_classes(model, task)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=task.collate)
    evaluator = task.evaluator()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(loader, desc="eval", dynamic_ncols=True, disable=None):
            batch = task.to_device(batch, dev)
            evaluator.update(task.forward(model, batch), batch)
    result = evaluator.compute()
    report = {
        "checkpoint": str(args.checkpoint),
        "task": kind,
        "data": data_cfg,
        "split": args.split,
        "num_images": len(dataset),
        "seconds": time.perf_counter() - t0,
        **result,
    }
    atomic_write_bytes(out / "eval.json", json.dumps(report, indent=2, default=str).encode())
    tables = {"panoptic": format_panoptic_table, "volumetric": format_volumetric_table}
    print(tables.get(kind, format_instance_table)(result))
    print(f"report: {out / 'eval.json'}")
    return 0


def format_panoptic_table(result: dict) -> str:
    """Per-class PQ / SQ / RQ (with thing / stuff and TP / FP / FN) and the summary: all classes, things, stuff."""
    per = result["per_class"]
    names = per["class_names"]
    width = max(8, *(len(n) for n in names)) if names else 8

    def cell(v) -> str:
        return "    n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:7.4f}"

    lines = [f"{'class':<{width}}  {'kind':<5}  {'PQ':>7} {'SQ':>7} {'RQ':>7} {'TP':>6} {'FP':>6} {'FN':>6}"]
    for i, name in enumerate(names):
        kind = "thing" if per["isthing"][i] else "stuff"
        lines.append(
            f"{name:<{width}}  {kind:<5}  {cell(per['pq'][i])} {cell(per['sq'][i])} {cell(per['rq'][i])} "
            f"{per['tp'][i]:>6} {per['fp'][i]:>6} {per['fn'][i]:>6}"
        )
    lines.append("-" * len(lines[0]))
    for label, suffix, count in (("all", "", "n"), ("things", "_things", "n_things"), ("stuff", "_stuff", "n_stuff")):
        lines.append(
            f"{label:<{width}}  {'':<5}  {cell(result['pq' + suffix])} {cell(result['sq' + suffix])} "
            f"{cell(result['rq' + suffix])}   ({result[count]} classes)"
        )
    lines.append(
        f"PQ {cell(result['pq']).strip()}  SQ {cell(result['sq']).strip()}  RQ {cell(result['rq']).strip()}   "
        f"PQ_th {cell(result['pq_things']).strip()}   PQ_st {cell(result['pq_stuff']).strip()}   "
        f"({result['num_images']} images)"
    )
    return "\n".join(lines)


def format_volumetric_table(result: dict) -> str:
    """Per-class Dice (mean over cases) and the mean, one row per foreground class."""
    lines = [f"{'class':<20} {'Dice':>8}"]
    for name, dice in zip(result["class_names"], result["dice_per_class"]):
        lines.append(f"{name:<20} {dice:>8.4f}")
    lines.append(f"{'mean (' + str(result['cases']) + ' cases)':<20} {result['dice']:>8.4f}")
    return "\n".join(lines)


def format_instance_table(result: dict) -> str:
    """Per-class mask AP / box AP (COCO AP at IoU 0.50:0.95) and the summary numbers."""
    classes = result.get("classes") or []
    names = result.get("class_names") or [str(c) for c in classes]
    width = max(8, *(len(n) for n in names)) if names else 8

    def cell(v) -> str:
        return "    n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:7.4f}"

    lines = [f"{'class':<{width}}  {'maskAP':>7} {'boxAP':>7}"]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}  {cell(result['mask_ap_per_class'][i])} {cell(result['box_ap_per_class'][i])}")
    lines.append("-" * len(lines[0]))
    lines.append(
        f"mask AP {cell(result['mask_ap']).strip()}  AP50 {cell(result['mask_ap50']).strip()}  "
        f"AP75 {cell(result['mask_ap75']).strip()}   box AP {cell(result['box_ap']).strip()}  "
        f"AP50 {cell(result['box_ap50']).strip()}   ({result['num_images']} images)"
    )
    return "\n".join(lines)


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
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise FileNotFoundError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    unique = list(dict.fromkeys(f.resolve() for f in files))
    return unique


def output_names(files: list[Path]) -> list[Path]:
    """A distinct output stem (relative path without suffix) per input file.

    Inputs keep their folder structure below the folders' common ancestor (``a/scene.png`` and ``b/scene.png``
    become ``a/scene`` and ``b/scene``); files that still share a stem keep their extension in it (``scene.png``
    and ``scene.jpg`` become ``scene_png`` and ``scene_jpg``). A single file or a flat folder gives plain stems.
    """
    if not files:
        return []
    parents = [f.parent for f in files]
    common = Path(os.path.commonpath([str(p) for p in parents]))
    stems = [f.parent.relative_to(common) / f.stem for f in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.as_posix().lower()] = counts.get(s.as_posix().lower(), 0) + 1
    return [
        s.with_name(f"{s.name}_{f.suffix.lstrip('.').lower()}") if counts[s.as_posix().lower()] > 1 else s
        for s, f in zip(stems, files)
    ]


def load_image_for_model(path: Path, in_channels: int, mean, std) -> tuple[np.ndarray, torch.Tensor]:
    """``(uint8 HWC RGB image for overlays, normalised (1, C, H, W) tensor)`` for a file."""
    from maskworks.data import DatasetError, read_image

    try:
        arr = read_image(path, channels=1 if in_channels == 1 else 3)  # (H, W, C) uint8
    except DatasetError as e:
        raise ValueError(str(e)) from e
    x = normalize_image(torch.from_numpy(arr.copy()).permute(2, 0, 1), mean, std)  # (C, H, W)
    return (arr if arr.shape[2] == 3 else np.repeat(arr, 3, axis=2)), x[None]


def predict_probs(model, x: torch.Tensor, args, num_classes: int, tile: int | None = None) -> torch.Tensor:
    """Class probabilities ``(1, K', H, W)`` for a normalised image, ``K' = max(K, 2)``: optional TTA inside optional
    tiling. A binary model (``K = 1``) gives ``(1 - p, p)``."""
    from maskworks.inference import TTAWrapper, sliding_window
    from maskworks.losses import split_outputs

    binary = num_classes == 1
    activation = "sigmoid" if binary else "softmax"
    net = model
    if args.tta:
        net = TTAWrapper(model, transforms=args.tta, activation=activation, as_logits=True)
    tile = tile or args.tile
    if tile:
        probs = sliding_window(net, x, window=tile, overlap=args.overlap, activation=activation, batch_size=4)
    else:
        logits, _ = split_outputs(net(x))
        probs = torch.sigmoid(logits) if binary else torch.softmax(logits, 1)
    return torch.cat([1 - probs, probs], 1) if binary else probs


def semantic_prediction(
    model,
    rgb: np.ndarray,
    args,
    num_classes: int,
    mean,
    std,
    dev,
    channels_last: bool,
    tile: int | None,
    threshold: float = 0.5,
    crf=None,
    where: str = "the image",
) -> tuple[np.ndarray, torch.Tensor]:
    """One image's semantic prediction as ``maskworks predict`` makes it (and ``maskworks serve`` answers it):
    ``(labels (H, W) int64 numpy, probabilities (1, K', H, W))`` for a uint8 ``(H, W, C)`` image, normalised with
    the checkpoint's ``mean`` / ``std``, with ``args.tta`` / ``args.overlap`` and ``tile``, an optional dense CRF and
    the binary ``threshold``. Call it under ``torch.inference_mode()``.

    Raises:
        ValueError: the probabilities are not finite (``where`` names the image).
    """
    from maskworks.metrics.confusion import check_finite

    x = normalize_image(torch.from_numpy(rgb.copy()).permute(2, 0, 1), mean, std)[None]
    scale = float(getattr(args, "scale", 1.0) or 1.0)
    h, w = x.shape[-2:]
    if scale != 1.0:  # a latency knob: predict at scale x the size, upsample the probabilities back
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    x = images_to(x, dev, channels_last)
    probs = predict_probs(model, x, args, num_classes, tile=tile)  # (1, K', H, W), K' = max(K, 2)
    del x
    if probs.shape[-2:] != (h, w):
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
    check_finite(probs, f"the prediction for {where}", "probabilities")  # argmax would give class 0
    if crf is not None:
        guide = torch.tensor(_rgb3(rgb)).permute(2, 0, 1)[None].float().to(dev)  # 0-255 RGB
        probs = crf(torch.log(probs.clamp_min(1e-8)), guide).exp()
    pred = (probs[:, 1] > threshold).long()[0] if num_classes == 1 else probs.argmax(1)[0]
    return pred.cpu().numpy(), probs


def _label_strips(model, f: Path, args, k: int, in_ch: int, mean, std, out: Path, dev) -> np.ndarray:
    """Labels of a very large image through :func:`~maskworks.inference.predict_large_image` (read and predicted
    by strips: memory bounded by the tiles, not by the image); returns the label map (memory-mapped)."""
    from maskworks.inference import TTAWrapper, predict_large_image

    net = model
    if args.tta:
        activation = "sigmoid" if k == 1 else "softmax"
        net = TTAWrapper(model, transforms=args.tta, activation=activation, as_logits=True)
    fd, tmp = tempfile.mkstemp(prefix=".labels.", suffix=".npy", dir=out)
    os.close(fd)
    try:
        predict_large_image(
            net,
            f,
            tmp,
            window=args.tile or AUTO_TILE,
            overlap=args.overlap,
            num_classes=k,
            mean=mean,
            std=std,
            device=dev,
            progress=True,
        )
        return np.array(np.load(tmp, mmap_mode="r"))
    finally:
        os.unlink(tmp)


def predict(args) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from maskworks.data import read_image
    from maskworks.inference import MeanFieldCRF, entropy_map
    from maskworks.viz import default_palette, overlay, save_label_png, save_rgb_png

    if args.tile is not None and args.tile < 8:
        raise ConfigError(f"--tile must be at least 8 pixels, got {args.tile}")
    if not 0 <= args.overlap < 1:
        raise ConfigError(f"--overlap must be in [0, 1), got {args.overlap}")
    threshold = _check_threshold(args.threshold)
    if args.max_pixels < 1:
        raise ConfigError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    if not 0 < getattr(args, "scale", 1.0) <= 4:
        raise ConfigError(f"--scale must be in (0, 4], got {args.scale}")
    if any(_is_nifti_input(item) for item in args.inputs):
        return _predict_volumes(args)
    files = _collect_images(args.inputs)
    names = output_names(files)
    out = prepare_out_dir(args.out)
    if getattr(args, "backend", "torch") == "onnxruntime":
        model, meta, dev = _onnx_model_and_meta(args)
    else:
        if str(args.checkpoint).endswith(".onnx"):
            raise ConfigError(f"{args.checkpoint} is an ONNX graph: run it with --backend onnxruntime")
        model, meta, dev = _model_and_meta(args.checkpoint, args.device)
    kind = checkpoint_task(model, meta, getattr(args, "task", None))
    if kind != "semantic":
        return _predict_task(args, kind, files, names, out, model, meta, dev)
    k = model_output_classes(model)
    model, channels_last = _inference_model(model, args.fuse_bn)
    in_ch = meta.get("in_channels", 3)
    mean, std = meta.get("mean", [0.5] * in_ch), meta.get("std", [0.25] * in_ch)
    palette = [tuple(c) for c in meta.get("palette") or default_palette(max(k, 2))]
    crf = MeanFieldCRF(max(k, 2), iterations=args.crf_iterations).to(dev) if args.crf else None
    # strips need no probability map: only without CRF / uncertainty, and at the default binary threshold
    strips_allowed = crf is None and not args.uncertainty and (k > 1 or threshold == 0.5) and args.scale == 1.0
    auto_tiled = 0
    bomb_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels  # files named on the command line may be large on purpose
    try:
        with torch.inference_mode():
            for f, name in tqdm(list(zip(files, names)), desc="predict", dynamic_ncols=True, disable=None):
                rgb = read_image(f, channels=1 if in_ch == 1 else 3)  # (H, W, C) uint8
                h, w = rgb.shape[:2]
                tile = args.tile
                if tile is None and h * w > args.max_pixels:
                    tile = AUTO_TILE
                    auto_tiled += 1
                    log.warning(
                        "%s is %dx%d (%.1f Mpx, above --max-pixels %d): predicting in %d-pixel tiles with %.0f%% "
                        "overlap",
                        f,
                        h,
                        w,
                        h * w / 1e6,
                        args.max_pixels,
                        tile,
                        100 * args.overlap,
                    )
                probs = None
                if tile and strips_allowed and h * w > STRIP_PIXELS:
                    pred = _label_strips(model, f, args, k, in_ch, mean, std, out, dev)
                else:
                    pred, probs = semantic_prediction(
                        model, rgb, args, k, mean, std, dev, channels_last, tile, threshold, crf, where=str(f)
                    )
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                save_label_png(pred, target.with_name(f"{target.name}_label.png"), palette)
                if not args.no_overlay:
                    save_rgb_png(
                        overlay(_rgb3(rgb), pred, palette, alpha=args.alpha),
                        target.with_name(f"{target.name}_overlay.png"),
                    )
                if args.uncertainty:
                    ent = entropy_map(probs)[0] / math.log(probs.shape[1])  # normalised to [0, 1]
                    save_rgb_png(heatmap(ent.cpu().numpy()), target.with_name(f"{target.name}_uncertainty.png"))
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    extras = [name for name, on in (("TTA " + str(args.tta), args.tta), ("tiles", args.tile), ("CRF", args.crf)) if on]
    if auto_tiled:
        extras.append(f"{auto_tiled} large image(s) tiled automatically")
    print(f"wrote {len(files)} prediction(s) to {out}" + (f" ({', '.join(extras)})" if extras else ""))
    return 0


def _is_nifti_input(item: str) -> bool:
    p = Path(item)
    if p.is_dir():
        return any(f.name.endswith((".nii", ".nii.gz")) for f in p.iterdir())
    return p.name.endswith((".nii", ".nii.gz"))


def _volume_cases(inputs: list[str]) -> list[dict[str, Any]]:
    """NIfTI inputs as cases: a folder in the nnU-Net layout (``<case>_0000.nii.gz``, ``_0001`` ... one file per
    channel) or single files (a ``_0000`` file brings its sibling channels)."""
    from maskworks.data import msd_cases

    cases: list[dict[str, Any]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            cases.extend(msd_cases(p.parent, images=p.name, labels=None))
        elif p.is_file():
            stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
            head, _, tail = stem.rpartition("_")
            if head and tail == "0000":
                group = [c for c in msd_cases(p.parent.parent, images=p.parent.name, labels=None) if c["id"] == head]
                cases.extend(group)
            else:
                cases.append({"id": stem, "images": [p], "label": None})
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return list({c["id"]: c for c in cases}.values())


def _predict_volumes(args) -> int:
    """``maskworks predict`` for volumetric checkpoints: ``<case>.nii.gz`` label volumes with the input's affine and
    header, predicted at the training spacing (sliding window with Gaussian blending, ``--tta mirror`` for nnU-Net's
    mirroring) and resampled back to the input's grid before the argmax."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from maskworks.data import normalize_volume, read_nifti, resample_image, write_nifti
    from maskworks.tasks import build_task

    if getattr(args, "backend", "torch") != "torch":
        raise ConfigError("volumes are predicted with --backend torch")
    model, meta, dev = _model_and_meta(args.checkpoint, args.device)
    kind = checkpoint_task(model, meta, getattr(args, "task", None))
    if kind != "volumetric":
        raise ConfigError(f"NIfTI inputs need a volumetric checkpoint; {args.checkpoint} is a {kind} model")
    volume = meta.get("volume") or {}
    options = builders.task_kwargs(kind, None, meta, where=f"checkpoint {args.checkpoint}")
    if args.tta not in (None, "mirror", "flip"):
        raise ConfigError(f"--tta {args.tta}: volumes support mirror (all flips of the three axes) or none")
    task = build_task(kind, **options, overlap=args.overlap if args.overlap != 0.25 else 0.5,
                      mirror_axes=(0, 1, 2) if args.tta else ())  # fmt: skip
    out = prepare_out_dir(args.out)
    cases = _volume_cases(args.inputs)
    in_ch = meta.get("in_channels", 1)
    spacing = volume.get("spacing")
    model.eval()
    with torch.inference_mode():
        for case in tqdm(cases, desc="predict", dynamic_ncols=True, disable=None):
            arrays, info = [], None
            for path in case["images"]:
                array, this = read_nifti(path)
                info = info or this
                arrays.append(array if array.ndim == 4 else array[None])
            image = torch.as_tensor(np.concatenate(arrays).astype(np.float32))
            if image.shape[0] != in_ch:
                raise ConfigError(f"case {case['id']}: {image.shape[0]} channel(s), the model takes {in_ch}")
            if spacing is not None and tuple(spacing) != tuple(info.spacing):
                image = resample_image(image, info.spacing, spacing, order=3)
            image = normalize_volume(image, volume.get("normalization"))[None].to(dev)
            logits = task.predict_volume(model, image, progress=False)
            if tuple(logits.shape[2:]) != tuple(info.shape):
                logits = F.interpolate(logits, size=tuple(info.shape), mode="trilinear", align_corners=False)
            label = task.postprocess(logits)[0]
            write_nifti(out / f"{case['id']}.nii.gz", label.astype(np.uint8 if label.max() < 256 else np.int16), info)
    print(f"wrote {len(cases)} label volume(s) to {out}" + (" (mirroring TTA)" if args.tta else ""))
    return 0


def _predict_task(args, kind: str, files: list[Path], names: list[Path], out: Path, model, meta: dict, dev) -> int:
    """``maskworks predict`` for instance checkpoints: per image ``<name>_instances.png`` (each instance in its own
    colour with class and score), ``<name>_ids.png`` (16-bit instance ids, overlaps layered by ``--paste-order``)
    and one ``coco_results.json`` (RLE masks; COCO polygons with ``--polygons``)."""

    from maskworks.tasks import build_task

    semantic_options = [
        flag
        for flag, on in (
            ("--tile", args.tile),
            ("--tta", args.tta),
            ("--crf", args.crf),
            ("--uncertainty", args.uncertainty),
            ("--fuse-bn", args.fuse_bn),
            ("--scale", getattr(args, "scale", 1.0) != 1.0),
        )
        if on
    ]
    if semantic_options:
        raise ConfigError(
            f"{', '.join(semantic_options)} apply to semantic models; {args.checkpoint} is a {kind} model"
        )
    if kind == "panoptic":
        return _predict_panoptic(args, files, names, out, model, meta, dev)
    task = build_task(kind, class_names=meta.get("class_names"), score_threshold=args.score_threshold)
    rows: list[dict[str, Any]] = []
    counts = []
    for i, f, name, arr, result in _task_predictions(args, files, names, task, model, meta, dev):
        counts.append(len(result["labels"]))
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        task.write_ids(result, target.with_name(f"{target.name}_ids.png"), args.paste_order)
        if not args.no_overlay:
            task.write_overlay(
                result, _rgb3(arr), target.with_name(f"{target.name}_instances.png"), meta, args.alpha, args.paste_order
            )
        rows.extend(task.result_rows(result, i, str(f), meta, polygons=args.polygons))
    atomic_write_bytes(out / "coco_results.json", json.dumps(rows).encode())
    print(
        f"wrote {sum(counts)} instance(s) (score >= {args.score_threshold}) in {len(files)} image(s) to {out}: "
        f"coco_results.json, <name>_ids.png id maps ({args.paste_order} order)"
        f"{'' if args.no_overlay else ' and <name>_instances.png overlays'}"
    )
    return 0


def _predict_panoptic(args, files: list[Path], names: list[Path], out: Path, model, meta: dict, dev) -> int:
    """``maskworks predict`` for panoptic checkpoints: per image ``<name>_panoptic.png`` (COCO panoptic RGB ids),
    ``<name>_panoptic_overlay.png`` (stuff in class colours, things each in its own colour) and one
    ``panoptic_results.json`` (COCO panoptic ``annotations`` + ``categories``, category ids of the training data)."""

    from maskworks.tasks import build_task

    task = build_task("panoptic", **builders.task_kwargs("panoptic", None, meta, where=f"checkpoint {args.checkpoint}"))
    _set_thing_classes(model, task)
    annotations: list[dict[str, Any]] = []
    segments = things = 0
    for i, f, name, arr, result in _task_predictions(args, files, names, task, model, meta, dev):
        segments += len(result[1])
        things += sum(bool(s.get("isthing")) for s in result[1])
        target = out / name
        png = target.with_name(f"{target.name}_panoptic.png")
        task.write_png(result, png)
        if not args.no_overlay:
            task.write_overlay(
                result, _rgb3(arr), target.with_name(f"{target.name}_panoptic_overlay.png"), meta, args.alpha
            )
        annotations.append(task.annotation(result, i, png.relative_to(out).as_posix(), meta))
        annotations[-1]["image_file"] = str(f)
    task.write_results_json(annotations, out / "panoptic_results.json", meta)
    print(
        f"wrote {segments} segment(s) ({things} things) in {len(files)} image(s) to {out}: panoptic_results.json, "
        f"<name>_panoptic.png id maps{'' if args.no_overlay else ' and <name>_panoptic_overlay.png overlays'}"
    )
    return 0


def _task_predictions(args, files, names, task, model, meta: dict, dev):
    """``(index, file, output name, image (H, W, C) uint8, per-image result)`` for each input file, predicted through
    ``task`` one image at a time (normalised with the checkpoint's mean / std, under ``inference_mode``, with the
    decompression-bomb limit of ``--max-image-pixels`` while images are read)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from maskworks.data import read_image

    in_ch = meta.get("in_channels", 3)
    mean, std = meta.get("mean", [0.5] * in_ch), meta.get("std", [0.25] * in_ch)
    bomb_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    try:
        for i, (f, name) in enumerate(tqdm(list(zip(files, names)), desc="predict", dynamic_ncols=True, disable=None)):
            arr = read_image(f, channels=1 if in_ch == 1 else 3)  # (H, W, C) uint8
            with torch.inference_mode():
                x = normalize_image(torch.from_numpy(arr.copy()).permute(2, 0, 1), mean, std).to(dev)
                result = task.postprocess(task.forward(model, {"images": [x]}))[0]
            yield i, f, name, arr, result
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def _rgb3(arr: np.ndarray) -> np.ndarray:
    return arr if arr.shape[2] == 3 else np.repeat(arr, 3, axis=2)


def heatmap(values: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """uint8 RGB image of values in [0, 1] through a matplotlib colour map."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- models
def models(args) -> int:
    from maskworks.registry import create_model, list_models, model_entry

    if args.pretrained:
        from maskworks.hub import format_pretrained_table

        print(format_pretrained_table(args.pattern))
        return 0
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
