"""``maskworks complexity`` and ``maskworks attention``: attention cost tables and ViT attention maps.

:func:`add_parsers` adds both subcommands to the ``maskworks`` parser; :func:`complexity` and :func:`attention` are
the command functions (thin wrappers over :mod:`maskworks.explain.complexity` and
:mod:`maskworks.explain.attention`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger("maskworks")

__all__ = ["add_parsers", "complexity", "attention"]

# without checkpoint meta: the normalisation of the original ViT weights in timm (DeiT uses the ImageNet mean / std)
_DEFAULT_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])

COMPLEXITY_EPILOG = """examples:
  maskworks complexity                                  # D=768, 12 heads, N = 196, 784, 3136, all variants
  maskworks complexity --dim 96 --heads 3 --img-sizes 224 448 --patch 4 --window 7
  maskworks complexity --tokens 196 576 1024 4096 --variants full window --no-measure
  maskworks complexity --models swin_tiny_patch4_window7_224 vit_base_patch16_224 --img-sizes 224 448 896
"""

ATTENTION_EPILOG = """examples:
  maskworks attention cat.jpg --model vit_base_patch16_224 --checkpoint vit_b16.safetensors
  maskworks attention photos/ --checkpoint runs/vit/best.safetensors --head-fusion max --discard-ratio 0.9
"""


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``complexity`` and ``attention`` subcommands to ``subparsers`` (from ``add_subparsers``)."""
    from maskworks.explain.attention import HEAD_FUSIONS
    from maskworks.explain.complexity import VARIANTS

    p = subparsers.add_parser(
        "complexity",
        help="analytic MACs and measured time / memory of attention variants",
        description="Tabulate the multiply-accumulates of one attention layer (full, linear, window, Performer, "
        "pooled-KV) over token counts, time the modules on the chosen device (median of interleaved repetitions, "
        "peak memory), print the table and write complexity.json and a log-log complexity.png into --out. "
        "Measurements whose attention intermediates would exceed --max-memory-mib are skipped, not crashed.",
        epilog=COMPLEXITY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dim", type=int, default=768, help="token dimension D (default 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="token counts N, square numbers for window / pooled (default: 196 784 3136)",
    )
    p.add_argument("--img-sizes", type=int, nargs="+", help="image sizes instead of --tokens: N = (size // patch)^2")
    p.add_argument("--patch", type=int, default=16, help="patch size for --img-sizes (default 16)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants (default: all)")
    p.add_argument("--window", type=int, default=7, help="window size M of 'window' (default 7)")
    p.add_argument("--features", type=int, default=None, help="random features m of 'performer' (default d ln d)")
    p.add_argument("--sr-ratio", type=int, default=2, help="spatial reduction r of 'pooled' (default 2)")
    p.add_argument("--pool", choices=("conv", "avg"), default="conv", help="reduction of 'pooled' (default conv)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per token count (default 3)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--no-measure", action="store_true", help="analytic MACs only, no timing")
    p.add_argument(
        "--max-memory-mib", type=float, default=4096.0, help="skip runs whose attention needs more (default 4096)"
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="measure whole registered models instead (MACs of one forward pass at each --img-sizes, default "
        "224 448 896, counted on the meta device: no weights, no compute), e.g. swin_tiny_patch4_window7_224 "
        "vit_base_patch16_224; writes model_macs.json",
    )
    p.add_argument("--out", default="complexity", help="output folder (default: complexity)")
    p.set_defaults(func=complexity)

    p = subparsers.add_parser(
        "attention",
        help="attention rollout and per-head attention maps of a ViT",
        description="For every image write <name>_rollout.png (attention rollout of the class token, Abnar & "
        "Zuidema 2020, overlaid on the image) and <name>_heads.png (the class-token attention of every head of "
        "the last block). The model comes from --checkpoint (a maskworks .safetensors with its .json, or a "
        "timm-layout ViT state dict together with --model) or, without one, is --model with random weights.",
        epilog=ATTENTION_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--model", help="registered ViT name, e.g. vit_base_patch16_224 (needed without a .json recipe)")
    p.add_argument("--checkpoint", help="weights; without it the model has random weights (a warning is logged)")
    p.add_argument("--img-size", type=int, help="square input size (default: the model's img_size)")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean", help="rollout head fusion (default mean)")
    p.add_argument(
        "--discard-ratio", type=float, default=0.0, help="fraction of lowest attention dropped per layer (default 0)"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map of the overlays (default jet)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="attention", help="output folder (default: attention)")
    p.set_defaults(func=attention)


# --------------------------------------------------------------------------- complexity
def complexity(args: argparse.Namespace) -> int:
    """``maskworks complexity``: print the table, write ``complexity.json`` and ``complexity.png``."""
    from maskworks.bench import machine_info
    from maskworks.engine import resolve_device
    from maskworks.explain.complexity import attention_complexity, complexity_table, plot_complexity

    if args.models:
        return _model_complexity(args)
    if args.img_sizes and args.tokens:
        raise ValueError("give either --tokens or --img-sizes, not both")
    if args.img_sizes:
        if args.patch < 1 or any(s < args.patch for s in args.img_sizes):
            raise ValueError(f"--img-sizes {args.img_sizes} must be at least --patch {args.patch}")
        tokens: list[Any] = [(s // args.patch, s // args.patch) for s in args.img_sizes]
    else:
        tokens = list(args.tokens or [196, 784, 3136])
    if args.dim < 1 or args.heads < 1 or args.dim % args.heads:
        raise ValueError(f"--dim ({args.dim}) must be a positive multiple of --heads ({args.heads})")
    device = resolve_device(args.device)
    rows = attention_complexity(
        args.dim,
        args.heads,
        tokens,
        variants=args.variants,
        repeats=args.repeats,
        device=device,
        window_size=args.window,
        num_features=args.features,
        sr_ratio=args.sr_ratio,
        pool=args.pool,
        batch_size=args.batch_size,
        measure=not args.no_measure,
        max_memory_mib=args.max_memory_mib,
    )
    print(complexity_table(rows))
    from maskworks.cli.commands import prepare_out_dir

    out = prepare_out_dir(args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    report = {"unit": "MACs per image (1 MAC = 2 FLOPs)", "config": config, "machine": machine_info(device)}
    report["rows"] = rows
    (out / "complexity.json").write_text(json.dumps(report, indent=2))
    plot_complexity(rows, out / "complexity.png")
    print(f"wrote {out / 'complexity.json'} and {out / 'complexity.png'}")
    return 0


def _model_complexity(args: argparse.Namespace) -> int:
    """``maskworks complexity --models ...``: measured MACs of whole models over image sizes."""
    from maskworks.cli.commands import prepare_out_dir
    from maskworks.explain.complexity import model_scaling, model_scaling_table
    from maskworks.registry import model_entry

    if args.tokens:
        raise ValueError("--models measures at --img-sizes; --tokens applies to single attention layers only")
    sizes = args.img_sizes or [224, 448, 896]
    if any(s < 1 for s in sizes):
        raise ValueError(f"--img-sizes must be positive, got {sizes}")
    for name in args.models:
        model_entry(name)  # unknown names fail here, with suggestions
    rows = model_scaling(args.models, sizes)
    print(model_scaling_table(rows))
    out = prepare_out_dir(args.out)
    report = {"unit": "MACs per image (1 MAC = 2 FLOPs), measured with torch.utils.flop_counter", "rows": rows}
    (out / "model_macs.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'model_macs.json'}")
    return 0


# --------------------------------------------------------------------------- attention
def _has_attention(model: nn.Module) -> bool:
    from maskworks.layers.vit_layers import Attention

    return any(isinstance(m, Attention) for m in model.modules())


def _model_from_raw_checkpoint(name: str, path: Path, size_kwargs: dict) -> nn.Module:
    """Build ``name`` and load a state dict without a maskworks recipe with :func:`maskworks.convert.load_weights`
    (timm ViT / DeiT checkpoints as ``source="timm"``, so the position table and patch kernel are resampled to the
    model; torchvision and Hugging Face ViTs are recognised). The class count comes from a timm ``head.weight``."""
    from maskworks.convert import load_weights
    from maskworks.convert.load import read_state_dict
    from maskworks.convert.vit import is_timm_vit_state_dict
    from maskworks.registry import create_model

    state = read_state_dict(path)
    head = state.get("head.weight")
    kwargs = {**size_kwargs, **({"num_classes": int(head.shape[0])} if head is not None else {})}
    model = create_model(name, **kwargs)
    try:
        result = load_weights(model, state, source="timm" if is_timm_vit_state_dict(state) else "auto")
    except ValueError as e:
        raise ValueError(f"{path} does not fit model {name!r}: {e}") from e
    missing = [k for k in result.missing_keys if not k.startswith(("head.", "head_dist."))]
    if missing:
        raise ValueError(f"{path} does not fit model {name!r}: missing {missing[:5]} ({len(missing)} keys)")
    if result.missing_keys or result.unexpected_keys:
        log.warning("checkpoint %s: missing %s, unused %s", path, result.missing_keys[:5], result.unexpected_keys[:5])
    return model


def _build_model(args: argparse.Namespace) -> tuple[nn.Module, dict, str]:
    """The model (eval mode), the checkpoint's meta dict and the model name."""
    from maskworks.checkpoint import load_model, read_model_meta
    from maskworks.registry import create_model

    size_kwargs = {"img_size": args.img_size} if args.img_size else {}
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        stem = ckpt.with_suffix("") if ckpt.suffix in (".safetensors", ".json") else ckpt
        recipe_path = stem.with_suffix(".json")
        if recipe_path.exists() and stem.with_suffix(".safetensors").exists():  # a maskworks checkpoint
            recipe = read_model_meta(ckpt)
            name = recipe["model"]
            if args.model and args.model != name:
                raise ValueError(f"--model {args.model} differs from the checkpoint's model {name!r} ({recipe_path})")
            model = load_model(ckpt)
            built = getattr(getattr(model, "patch_embed", None), "img_size", None)
            if args.img_size and built and tuple(built) != (args.img_size, args.img_size):
                if not getattr(model, "dynamic_img_size", False):
                    try:  # keep the stored position table, resampled to the new grid on the fly
                        model = load_model(ckpt, dynamic_img_size=True)
                    except TypeError as e:
                        raise ValueError(f"model {name!r} cannot run at --img-size {args.img_size}: {e}") from e
            return model.eval(), getattr(model, "maskworks_meta", {}), name
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} not found")
        if not args.model:
            raise ValueError(
                f"{ckpt} has no maskworks recipe ({recipe_path.name}) beside it; name the model with --model"
            )
        return _model_from_raw_checkpoint(args.model, ckpt, size_kwargs).eval(), {}, args.model
    if not args.model:
        raise ValueError("give --model (random weights) or --checkpoint")
    return create_model(args.model, **size_kwargs).eval(), {}, args.model


def _input_size(model: nn.Module, args: argparse.Namespace) -> tuple[int, int]:
    if args.img_size:
        return args.img_size, args.img_size
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    return tuple(size) if size else (224, 224)


def _unique_stem(path: Path, seen: set[str]) -> str:
    stem, i = path.stem, 1
    while stem in seen:
        stem, i = f"{path.stem}_{i}", i + 1
    seen.add(stem)
    return stem


def attention(args: argparse.Namespace) -> int:
    """``maskworks attention``: rollout overlay and per-head class-token maps of the last block per image."""
    from PIL import Image

    from maskworks.cli.commands import _collect_images
    from maskworks.data import normalize_image, read_image
    from maskworks.engine import resolve_device
    from maskworks.explain.attention import (
        attention_maps,
        attention_rollout,
        cls_attention,
        overlay_attention,
        plot_head_attention,
        token_grid_size,
    )
    from maskworks.viz import save_rgb_png

    if not 0.0 <= args.discard_ratio < 1.0:
        raise ValueError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be positive, got {args.img_size}")
    files = _collect_images(args.images)  # FileNotFoundError for missing inputs, before building the model
    model, meta, name = _build_model(args)
    if not _has_attention(model):
        raise ValueError(
            f"model {name!r} ({type(model).__name__}) has no maskworks Attention modules; the attention command "
            "needs a ViT-family model (vit_*, deit_*)"
        )
    if not args.checkpoint:
        log.warning("no --checkpoint: %s has random weights, so its attention maps show no learned structure", name)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if prefix < 1:
        raise ValueError(f"model {name!r} has no class token, and rollout follows the class token")
    dev = resolve_device(args.device)
    model.to(dev)
    size = _input_size(model, args)
    in_ch = int(meta.get("in_channels", getattr(model, "in_channels", 3)))
    mean = meta.get("mean", _DEFAULT_MEAN_STD[0][:in_ch])
    std = meta.get("std", _DEFAULT_MEAN_STD[1][:in_ch])
    from maskworks.cli.commands import prepare_out_dir

    out = prepare_out_dir(args.out)
    seen: set[str] = set()
    for f in files:
        try:
            rgb = read_image(f, channels=3)  # (H, W, 3) uint8
        except Exception as e:  # unreadable image: a clear message naming the file
            raise ValueError(f"cannot read image {f}: {e}") from e
        resized = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))  # (h, w, 3)
        net_in = resized if in_ch == 3 else resized[..., :1]
        x = normalize_image(torch.from_numpy(net_in.copy()).permute(2, 0, 1), mean, std)[None].to(dev)  # (1,C,h,w)
        maps = attention_maps(model, x)
        grid = token_grid_size(model, size)
        rollout = attention_rollout(
            maps,
            head_fusion=args.head_fusion,
            discard_ratio=args.discard_ratio,
            num_prefix_tokens=prefix,
            grid_size=grid,
        )[0]
        stem = _unique_stem(f, seen)
        save_rgb_png(overlay_attention(rgb, rollout, alpha=args.alpha, cmap=args.cmap), out / f"{stem}_rollout.png")
        heads = cls_attention(maps[-1], grid, num_prefix_tokens=prefix)[0]  # (heads, h, w)
        plot_head_attention(
            heads,
            out / f"{stem}_heads.png",
            image=resized,
            title=f"{f.name}: class-token attention, block {len(maps) - 1}",
            cmap=args.cmap,
            alpha=args.alpha,
        )
    print(f"wrote rollout and head maps of {len(files)} image(s) to {out} ({name}, {len(maps)} attention layers)")
    return 0
