"""``maskworks plan``: fingerprint a Medical Segmentation Decathlon / nnU-Net raw folder and plan a volumetric run
the way nnU-Net does (target spacing, normalisation, patch and batch size, U-Net topology); writes the plan as JSON
for ``maskworks train``."""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

__all__ = ["add_parser", "format_plan", "run"]

log = logging.getLogger("maskworks")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``maskworks plan``."""
    p = subparsers.add_parser(
        "plan",
        help="plan a 3D / 2D training run from a NIfTI dataset (nnU-Net rules): spacing, patch, batch, topology",
        description="Read every training case of a Medical Segmentation Decathlon / nnU-Net raw folder, compute its "
        "fingerprint (spacings, sizes after cropping to the non-zero region, foreground intensity statistics per "
        "channel, class frequencies) and plan with nnU-Net v2's default rules: the target spacing (median; the 10th "
        "percentile along a much coarser axis), the normalisation per channel (CT: clip to the foreground 0.5 / 99.5 "
        "percentiles + the dataset's z-score; others: per-image z-score), the patch and batch size under a GPU memory "
        "budget, pooling and kernel sizes per axis, and 3D vs 2D. Writes the plan (MONAI DynUNet argument names: "
        "kernel_size, strides, upsample_kernel_size, filters) as JSON. Axes are (D, H, W) = NIfTI (z, y, x) with "
        "spacing (sz, sy, sx).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  maskworks plan data/Task09_Spleen --out runs/spleen/plan.json --modality CT\n"
        "  maskworks plan data/Dataset001_BrainTumour --out plan.json --gpu-memory-gb 24\n"
        "  maskworks plan data/Task05_Prostate --out plan.json --dimension 2d --fingerprint fingerprint.json\n",
    )
    p.add_argument(
        "data",
        help="dataset folder: imagesTr/<case>_0000.nii.gz, <case>_0001.nii.gz, ... (or one 4D <case>.nii.gz), "
        "labelsTr/<case>.nii.gz, optional dataset.json with channel_names (or modality) and labels",
    )
    p.add_argument("--out", default="plan.json", help="plan JSON file to write (default: plan.json)")
    p.add_argument(
        "--gpu-memory-gb", type=float, default=8.0, help="GPU memory budget the patch and batch fit (default 8)"
    )
    p.add_argument(
        "--modality",
        help="channel names, comma-separated (one name applies to every channel), e.g. CT or T1,T1ce,T2,FLAIR; "
        "CT selects CT normalisation (default: dataset.json's channel_names, else per-image z-score)",
    )
    p.add_argument(
        "--dimension",
        choices=("auto", "3d", "2d"),
        default="auto",
        help="configuration to select: auto (3d unless the data are effectively 2D), 3d or 2d (default auto)",
    )
    p.add_argument(
        "--num-classes", type=int, help="classes including background (default: dataset.json's labels, else labels)"
    )
    p.add_argument(
        "--samples-per-case",
        type=int,
        default=10_000,
        help="foreground voxels sampled per case and channel for the intensity statistics (default 10000)",
    )
    p.add_argument("--fingerprint", help="also write the dataset fingerprint to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _fmt(values, spec: str = "g") -> str:
    return " x ".join(format(v, spec) for v in values)


def format_plan(plan, fingerprint=None) -> str:
    """A readable summary of a :class:`~maskworks.models.volumetric.planner.Plan` (and its fingerprint)."""
    lines = []
    if fingerprint is not None:
        freqs = ", ".join(f"{i}: {f:.4f}" for i, f in enumerate(fingerprint.class_frequencies))
        lines.append(
            f"dataset: {fingerprint.num_cases} cases, {fingerprint.num_channels} channel(s) "
            f"({', '.join(fingerprint.modalities)}), {plan.num_classes} classes (voxel fractions {freqs})"
        )
    lines.append(
        f"median spacing (z, y, x): {_fmt(plan.median_spacing, '.3g')} mm, median size after cropping: "
        f"{_fmt(plan.median_shape, '.0f')}"
    )
    for c, (name, norm) in enumerate(zip(plan.modalities, plan.normalization)):
        detail = ""
        if norm.scheme == "ct":
            detail = f": clip [{norm.clip[0]:.4g}, {norm.clip[1]:.4g}], mean {norm.mean:.4g}, std {norm.std:.4g}"
        elif norm.use_mask:
            detail = " inside the non-zero region"
        lines.append(f"channel {c} ({name}): {norm.scheme}{detail}")
    for key, conf in plan.configurations.items():
        chosen = " (selected)" if key == plan.configuration else ""
        where = f", slices across axis {conf.slice_axis}" if conf.slice_axis is not None else ""
        lines.append(
            f"{key}{chosen}: spacing {_fmt(conf.spacing, '.3g')} mm, median size {_fmt(conf.median_shape, '.0f')}, "
            f"patch {_fmt(conf.patch_size)}{where}, batch {conf.batch_size}, {len(conf.strides)} stages"
        )
        lines.append(f"  strides: {'  '.join('x'.join(map(str, s)) for s in conf.strides)}")
        lines.append(f"  kernels: {'  '.join('x'.join(map(str, k)) for k in conf.kernel_size)}")
        lines.append(f"  filters: {' '.join(map(str, conf.filters))}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Fingerprint ``args.data``, plan, print the summary and write ``args.out`` (and ``args.fingerprint``)."""
    from tqdm import tqdm

    from maskworks.cli.config import ConfigError
    from maskworks.models.volumetric.planner import compute_fingerprint, iter_msd_cases, msd_dataset, plan_experiment

    if not args.gpu_memory_gb > 0:
        raise ConfigError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}")
    if args.samples_per_case < 1:
        raise ConfigError(f"--samples-per-case must be >= 1, got {args.samples_per_case}")
    if args.num_classes is not None and args.num_classes < 2:
        raise ConfigError(f"--num-classes must be >= 2 (background + foreground), got {args.num_classes}")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; expected a JSON file name (e.g. {out / 'plan.json'})")
    info = msd_dataset(args.data)
    cases = iter_msd_cases(args.data)
    first = next(cases)
    channels = first[0].shape[0]
    if args.modality:
        modalities = [m.strip() for m in args.modality.split(",") if m.strip()]
        if len(modalities) == 1:
            modalities *= channels
        if len(modalities) != channels:
            raise ConfigError(f"--modality names {len(modalities)} channels but the images have {channels}")
    elif info["modalities"] is not None:
        modalities = info["modalities"]
    else:
        modalities = ["zscore"] * channels
        log.warning("no dataset.json channel_names and no --modality: z-scoring every channel (CT data: --modality CT)")
    if info["modalities"] is not None and len(info["modalities"]) != channels:
        raise ConfigError(
            f"{args.data}/dataset.json names {len(info['modalities'])} channels; the images have {channels}"
        )
    num_classes = args.num_classes or info["num_classes"]
    progress = tqdm(
        itertools.chain([first], cases), total=len(info["cases"]), desc="fingerprint", disable=args.no_progress
    )
    fingerprint = compute_fingerprint(
        progress, modalities, num_classes=num_classes, samples_per_case=args.samples_per_case
    )
    plan = plan_experiment(fingerprint, args.gpu_memory_gb, num_classes=num_classes, dimension=args.dimension)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.to_json(out)
    if args.fingerprint:
        Path(args.fingerprint).parent.mkdir(parents=True, exist_ok=True)
        fingerprint.to_json(args.fingerprint)
    print(format_plan(plan, fingerprint))
    print(f"wrote {out}" + (f" and {args.fingerprint}" if args.fingerprint else ""))
    return 0
