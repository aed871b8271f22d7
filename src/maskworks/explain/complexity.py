"""Cost of attention: analytic multiply-accumulates, measured time and memory, and ViT-level totals.

Counts are **MACs** (multiply-accumulates, the unit of fvcore and of timm's "GMACs"; the ViT paper's
"GFLOPs" are MACs too). ``torch.utils.flop_counter`` reports FLOPs = 2 MACs. Softmax, normalisation, activations,
exponentials and other elementwise work are not counted. For one attention layer on ``N`` tokens of dimension
``D`` with ``h`` heads of dimension ``d = D / h`` (batch 1):

===========  ===========================================================================================
variant      MACs
===========  ===========================================================================================
full         ``4 N D^2 + 2 N^2 D``: ``qkv`` 3ND^2, scores ``Q K^T`` N^2 D, weighted sum ``A V`` N^2 D,
             ``proj`` ND^2 (Swin paper eq. 1, ``Omega(MSA) = 4hwC^2 + 2(hw)^2 C``)
linear       ``4 N D^2 + 2 N D d + N D``: summary ``phi(K)^T V`` and ``phi(Q) S`` (N d^2 per head each),
             normaliser ``phi(Q) z`` (N d per head)
window       ``4 N D^2 + 2 N_pad M_h M_w D`` with ``N_pad = ceil(H / M_h) M_h ceil(W / M_w) M_w`` (the padded grid;
             window clipped to the grid); ``4 hwC^2 + 2 M^2 hwC`` when the grid divides (Swin eq. 2)
performer    ``4 N D^2 + 4 N m D + N m h`` for ``m`` random features per head: feature maps of Q and K
             (N m d per head each), ``phi(K)^T V`` and ``phi(Q) S`` (N m d each), normaliser (N m)
pooled       ``2 N D^2 + 2 N' D^2 + N' r^2 D^2 + 2 N N' D`` with ``N' = ceil(H / r) ceil(W / r)``: queries and
             ``proj`` (2ND^2), keys/values of the reduced tokens (2N'D^2), the stride-r reduction conv
             (N' r^2 D^2; 0 for average pooling), scores and weighted sum (2 N N' D); full attention at ``r = 1``
===========  ===========================================================================================

Whole models are measured by :func:`model_macs`: ``torch.utils.flop_counter`` counts every matmul and convolution of
one forward pass on the meta device (shapes only: no weights, no compute, any model size in a fraction of a second),
split into the attention term (the batched ``Q K^T`` / ``A V`` products and fused SDPA) and the rest.
:func:`model_scaling` tabulates that over image sizes: Swin-T grows linearly with the number of tokens (4.49, 17.96,
71.84 GMACs at 224 / 448 / 896: x4 per doubling of the side), ViT-B/16 faster (17.56, 78.50, 449.68) because its
attention term grows with the square of the token count (0.72, 11.36, 181.39: x16 per doubling).

A whole ViT (:func:`vit_macs`) with ``T = N + prefix`` tokens and MLP width ``r_mlp D``:
``N (C p^2) D`` (patch embedding) ``+ depth (4 T D^2 + 2 T^2 D + 2 r_mlp T D^2)`` ``+ D K`` (head), e.g.
17.56 GMACs for ViT-B/16 at 224 px (timm lists 17.6).

:func:`attention_complexity` tabulates the formulas and times the modules of
:mod:`maskworks.layers.efficient_attention` with :func:`maskworks.bench.compare` (interleaved repetitions, median,
peak memory); :func:`plot_complexity` draws both on log-log axes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from maskworks.layers.efficient_attention import (
    LinearAttention,
    PerformerAttention,
    PooledKVAttention,
    WindowAttention2d,
    _pair,
)
from maskworks.layers.vit_layers import Attention

__all__ = [
    "VARIANTS",
    "ATTENTION_OPS",
    "attention_macs",
    "model_macs",
    "model_scaling",
    "model_scaling_table",
    "attention_complexity",
    "build_attention",
    "complexity_table",
    "count_attention_macs",
    "num_patches",
    "plot_complexity",
    "vit_macs",
]

log = logging.getLogger(__name__)

VARIANTS = ("full", "linear", "window", "performer", "pooled")
_GRID_VARIANTS = ("window", "pooled")


def num_patches(img_size: int | Sequence[int], patch_size: int | Sequence[int]) -> int:
    """Patch tokens of an image: ``(H // p_h) * (W // p_w)`` (196 / 576 / 1024 / 4096 at 224 / 384 / 512 / 1024
    with ``p = 16``; the ``N^2`` attention cost grows 436.7x from 224 to 1024 px)."""
    (h, w), (ph, pw) = _pair(img_size, "img_size"), _pair(patch_size, "patch_size")
    return (h // ph) * (w // pw)


def _tokens_and_grid(tokens: int | Sequence[int], need_grid: bool) -> tuple[int, tuple[int, int] | None]:
    """``tokens`` (a count or an ``(H, W)`` grid) -> ``(N, grid)``; a count must be square when a grid is needed."""
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        if tokens < 1:
            raise ValueError(f"token counts must be positive, got {tokens}")
        side = math.isqrt(tokens)
        if side * side == tokens:
            return tokens, (side, side)
        if need_grid:
            raise ValueError(
                f"{tokens} tokens do not form a square grid, which the window / pooled variants need; "
                "give the grid as (H, W)"
            )
        return tokens, None
    grid = _pair(tokens, "token grid")
    return grid[0] * grid[1], grid


def _default_num_features(head_dim: int) -> int:
    return max(1, int(head_dim * math.log(head_dim)))


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; expected one of {VARIANTS}")


def attention_macs(
    variant: str,
    tokens: int | Sequence[int],
    dim: int,
    num_heads: int,
    window_size: int | Sequence[int] = 7,
    num_features: int | None = None,
    sr_ratio: int = 2,
    pool: str = "conv",
    breakdown: bool = False,
) -> int | dict[str, int]:
    """MACs of one attention layer on one image (formulas in the module docstring).

    Args:
        variant: one of :data:`VARIANTS`.
        tokens: token count ``N`` (a square grid for ``window`` / ``pooled``) or the grid ``(H, W)``.
        dim: token dimension ``D``.
        num_heads: heads ``h``; must divide ``dim``.
        window_size: window ``M`` or ``(M_h, M_w)`` of ``window``.
        num_features: random features ``m`` of ``performer`` (default ``int(d ln d)``, as the module).
        sr_ratio: reduction ``r`` of ``pooled``.
        pool: ``"conv"`` or ``"avg"`` reduction of ``pooled``.
        breakdown: return ``{"qkv", "reduction", "attention", "proj", "total"}`` instead of the total.

    Returns:
        The MAC count (an int), or the breakdown.
    """
    _check_variant(variant)
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    n, grid = _tokens_and_grid(tokens, variant in _GRID_VARIANTS)
    d = dim // num_heads
    qkv, proj, reduction = 3 * n * dim * dim, n * dim * dim, 0
    if variant == "full":
        attn = 2 * n * n * dim
    elif variant == "linear":
        attn = 2 * n * dim * d + n * dim
    elif variant == "performer":
        m = num_features or _default_num_features(d)
        attn = 4 * n * m * dim + n * m * num_heads
    elif variant == "window":
        mh, mw = _pair(window_size, "window_size")
        mh, mw = min(mh, grid[0]), min(mw, grid[1])
        n_pad = math.ceil(grid[0] / mh) * mh * math.ceil(grid[1] / mw) * mw
        attn = 2 * n_pad * mh * mw * dim
    else:  # pooled
        if pool not in ("conv", "avg"):
            raise ValueError(f"pool must be 'conv' or 'avg', got {pool!r}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        n_red = math.ceil(grid[0] / sr_ratio) * math.ceil(grid[1] / sr_ratio) if sr_ratio > 1 else n
        qkv = n * dim * dim + 2 * n_red * dim * dim
        reduction = n_red * sr_ratio * sr_ratio * dim * dim if sr_ratio > 1 and pool == "conv" else 0
        attn = 2 * n * n_red * dim
    parts = {"qkv": qkv, "reduction": reduction, "attention": attn, "proj": proj}
    parts["total"] = sum(parts.values())
    return parts if breakdown else parts["total"]


def vit_macs(
    img_size: int | Sequence[int],
    patch: int | Sequence[int],
    dim: int,
    depth: int,
    mlp_ratio: float = 4.0,
    in_channels: int = 3,
    num_classes: int = 1000,
    num_prefix_tokens: int = 1,
) -> int:
    """MACs of a whole ViT forward pass on one image (patch embedding, ``depth`` blocks, linear head).

    ``N (C p_h p_w) D + depth (4 T D^2 + 2 T^2 D + 2 T D H_mlp) + D K`` with ``T = N + num_prefix_tokens`` and
    ``H_mlp = int(D * mlp_ratio)``; norms, softmax, GELU and the position embedding are not counted. ViT-B/16 at
    224: 17,563,828,224 (timm lists 17.6 GMACs; the seed calls them "GFLOPs").

    Args:
        img_size: image size, an int or ``(H, W)``.
        patch: patch size, an int or ``(p_h, p_w)``.
        dim: embedding dimension ``D``.
        depth: number of blocks.
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        in_channels: image channels ``C``.
        num_classes: classes ``K`` of the head (0: no head).
        num_prefix_tokens: class / distillation / register tokens.

    Returns:
        The MAC count.
    """
    (ih, iw), (ph, pw) = _pair(img_size, "img_size"), _pair(patch, "patch")
    n = (ih // ph) * (iw // pw)
    if n == 0:
        raise ValueError(f"img_size {(ih, iw)} is smaller than the patch {(ph, pw)}")
    t = n + num_prefix_tokens
    hidden = int(dim * mlp_ratio)
    embed = n * in_channels * ph * pw * dim
    block = 4 * t * dim * dim + 2 * t * t * dim + 2 * t * dim * hidden
    return embed + depth * block + dim * num_classes


def build_attention(
    variant: str,
    dim: int,
    num_heads: int,
    window_size: int | Sequence[int] = 7,
    num_features: int | None = None,
    sr_ratio: int = 2,
    pool: str = "conv",
    qkv_bias: bool = True,
) -> nn.Module:
    """The module of ``variant``: :class:`~maskworks.layers.vit_layers.Attention` for ``"full"``, else the class of
    :mod:`maskworks.layers.efficient_attention`."""
    _check_variant(variant)
    if variant == "full":
        return Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
    if variant == "linear":
        return LinearAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
    if variant == "window":
        ws = _pair(window_size, "window_size")
        return WindowAttention2d(dim, num_heads=num_heads, window_size=ws, qkv_bias=qkv_bias)
    if variant == "performer":
        return PerformerAttention(dim, num_heads=num_heads, num_features=num_features, qkv_bias=qkv_bias)
    return PooledKVAttention(dim, num_heads=num_heads, sr_ratio=sr_ratio, pool=pool, qkv_bias=qkv_bias)


def _call(module: nn.Module, variant: str, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    return module(x, grid_size=grid) if variant in _GRID_VARIANTS else module(x)


def count_attention_macs(module: nn.Module, x: torch.Tensor, grid_size: Sequence[int] | None = None) -> int:
    """MACs of one call of an attention module counted by ``torch.utils.flop_counter`` (FLOPs / 2), with every
    ``fused_attn`` flag switched off for the count: the flop counter does not see inside the CPU SDPA kernel
    (it reports 0 for it), the explicit path computes the same products as matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x, grid_size=grid_size) if grid_size is not None else module(x)
    finally:
        for m, fused in saved:
            m.fused_attn = fused
    return counter.get_total_flops() // 2


def _materialised_mib(
    variant: str, n: int, grid: tuple[int, int] | None, heads: int, head_dim: int, batch: int, opts: dict
) -> float:
    """Size of the largest per-layer attention intermediate (scores / features), fp32, in MiB."""
    if variant == "full":
        per_query = n
    elif variant == "linear":
        per_query = head_dim
    elif variant == "performer":
        per_query = opts["num_features"] or _default_num_features(head_dim)
    elif variant == "window":
        mh, mw = _pair(opts["window_size"], "window_size")
        per_query = min(mh, grid[0]) * min(mw, grid[1])
    else:
        r = opts["sr_ratio"]
        per_query = math.ceil(grid[0] / r) * math.ceil(grid[1] / r)
    return 4.0 * batch * heads * n * per_query / 2**20


def attention_complexity(
    dim: int,
    num_heads: int,
    token_counts: Sequence[int | Sequence[int]],
    variants: Sequence[str] = VARIANTS,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    window_size: int | Sequence[int] = 7,
    num_features: int | None = None,
    sr_ratio: int = 2,
    pool: str = "conv",
    batch_size: int = 1,
    measure: bool = True,
    max_memory_mib: float = 4096.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Analytic MACs and measured forward time / peak memory of attention variants over token counts.

    For every token count the modules of all variants (sharing the ``qkv`` / ``proj`` weights of one standard
    attention) run on the same random tokens ``(batch_size, N, dim)`` under ``torch.no_grad()`` and in eval mode,
    timed with :func:`maskworks.bench.compare` (1 warm-up round, ``repeats`` interleaved rounds; peak memory of one
    call: CUDA allocator peak on GPU, resident-set growth on Linux CPUs). A variant whose largest attention
    intermediate (fp32 scores / features, batch included) would exceed ``max_memory_mib`` is not run; its row keeps
    the analytic count and says why in ``skipped``.

    Args:
        dim: token dimension ``D``.
        num_heads: heads.
        token_counts: token counts ``N`` (square grids for ``window`` / ``pooled``) or grids ``(H, W)``.
        variants: subset of :data:`VARIANTS`.
        repeats: timed rounds per token count.
        device: where to run (``"cpu"``, ``"cuda"``).
        window_size: window of ``window``.
        num_features: random features of ``performer`` (default ``int(d ln d)``).
        sr_ratio: reduction of ``pooled``.
        pool: ``"conv"`` or ``"avg"`` reduction of ``pooled``.
        batch_size: images per forward (the MACs are per image).
        measure: time the modules; ``False`` gives the analytic columns only.
        max_memory_mib: skip measurements above this estimated size.
        seed: seed of the weights and tokens.

    Returns:
        One dict per (token count, variant) with ``variant``, ``tokens``, ``grid`` (``[H, W]`` or ``None``),
        ``dim``, ``num_heads``, ``macs`` (per image), ``attention_macs`` (the part beyond the projections),
        ``macs_vs_full``, ``time_ms`` (median), ``time_min_ms``, ``time_max_ms``, ``peak_mib``, ``device`` and
        ``skipped`` (``None`` or the reason).
    """
    from maskworks.bench import compare

    variants = list(dict.fromkeys(variants))
    for v in variants:
        _check_variant(v)
    if not token_counts:
        raise ValueError("token_counts is empty")
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")
    device = torch.device(device)
    opts = {"window_size": window_size, "num_features": num_features, "sr_ratio": sr_ratio, "pool": pool}
    head_dim = dim // num_heads if num_heads > 0 else 0

    modules: dict[str, nn.Module] = {}
    if measure:
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's generator
            torch.manual_seed(seed)
            base = build_attention("full", dim, num_heads).to(device).eval()
            for v in variants:
                if v == "full":
                    modules[v] = base
                else:  # same qkv / proj weights as the standard attention
                    modules[v] = _CLASSES[v].from_attention(base, **_variant_kwargs(v, opts)).eval()

    rows: list[dict[str, Any]] = []
    for tokens in token_counts:
        n, grid = _tokens_and_grid(tokens, any(v in _GRID_VARIANTS for v in variants))
        full = attention_macs("full", n, dim, num_heads)
        fns: dict[str, Callable[[], Any]] = {}
        x = None
        if measure:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            x = torch.randn(batch_size, n, dim, generator=gen).to(device)
        for v in variants:
            parts = attention_macs(v, grid if v in _GRID_VARIANTS else n, dim, num_heads, breakdown=True, **opts)
            row = {
                "variant": v,
                "tokens": n,
                "grid": list(grid) if grid else None,
                "dim": dim,
                "num_heads": num_heads,
                "macs": parts["total"],
                "attention_macs": parts["attention"],
                "macs_vs_full": parts["total"] / full,
                "time_ms": None,
                "time_min_ms": None,
                "time_max_ms": None,
                "peak_mib": None,
                "device": str(device),
                "skipped": None if measure else "not measured",
            }
            rows.append(row)
            if not measure:
                continue
            est = _materialised_mib(v, n, grid, num_heads, head_dim, batch_size, opts)
            if est > max_memory_mib:
                row["skipped"] = (
                    f"estimated {est:.0f} MiB of attention intermediates > max_memory_mib={max_memory_mib:g}"
                )
                log.info("%s at %d tokens skipped: %s", v, n, row["skipped"])
                continue
            fns[v] = _runner(modules[v], v, x, grid)
        if fns:
            result = compare(fns, warmup=1, repeats=repeats, device=device)
            for row in rows[-len(variants) :]:
                t = result.timings.get(row["variant"])
                if t is not None:
                    row["time_ms"] = 1e3 * t.median
                    row["time_min_ms"] = 1e3 * min(t.times)
                    row["time_max_ms"] = 1e3 * max(t.times)
                    row["peak_mib"] = t.peak_mib
    return rows


_CLASSES = {
    "linear": LinearAttention,
    "window": WindowAttention2d,
    "performer": PerformerAttention,
    "pooled": PooledKVAttention,
}


def _variant_kwargs(variant: str, opts: dict) -> dict:
    if variant == "window":
        return {"window_size": _pair(opts["window_size"], "window_size")}
    if variant == "performer":
        return {"num_features": opts["num_features"]}
    if variant == "pooled":
        return {"sr_ratio": opts["sr_ratio"], "pool": opts["pool"]}
    return {}


def _runner(module: nn.Module, variant: str, x: torch.Tensor, grid: tuple[int, int] | None) -> Callable[[], Any]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return _call(module, variant, x, grid)

    return run


def complexity_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`attention_complexity` rows: tokens, variant, GMACs, ratio to full, time, memory."""
    lines = [
        "| tokens | variant | GMACs | vs full | median ms | min-max ms | peak MiB | note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        t = "-" if r["time_ms"] is None else f"{r['time_ms']:.2f}"
        span = "-" if r["time_min_ms"] is None else f"{r['time_min_ms']:.2f}-{r['time_max_ms']:.2f}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        note = r["skipped"] or ""
        lines.append(
            f"| {r['tokens']} | {r['variant']} | {r['macs'] / 1e9:.4f} | {r['macs_vs_full']:.3f} | {t} | {span} | "
            f"{peak} | {note} |"
        )
    return "\n".join(lines)


def plot_complexity(rows: Sequence[dict[str, Any]], path: str | PathLike, dpi: int = 100) -> Path:
    """Log-log plot of :func:`attention_complexity` rows: analytic GMACs (left) and measured median time (right)
    against the token count, one line per variant, written as PNG (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("rows is empty; nothing to plot")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_macs, ax_time = fig.subplots(1, 2)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for v in variants:
        pts = sorted((r["tokens"], r["macs"], r["time_ms"]) for r in rows if r["variant"] == v)
        ax_macs.plot([p[0] for p in pts], [p[1] / 1e9 for p in pts], marker="o", label=v)
        timed = [(p[0], p[2]) for p in pts if p[2] is not None]
        if timed:
            ax_time.plot([p[0] for p in timed], [p[1] for p in timed], marker="o", label=v)
    first = rows[0]
    for ax, ylabel, title in (
        (ax_macs, "GMACs per image (analytic)", "MACs of one attention layer"),
        (ax_time, "median forward time (ms)", f"measured on {first.get('device', '?')}"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    if not ax_time.lines:
        ax_time.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax_time.transAxes)
    fig.suptitle(f"attention cost, D={first['dim']}, heads={first['num_heads']}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


# aten ops of the attention term: the batched Q K^T and A V products (explicit or the math SDPA path) and fused SDPA
ATTENTION_OPS = (
    "aten.bmm",
    "aten.baddbmm",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_cudnn_attention",
)


def _on_meta(name: str, kwargs: dict) -> nn.Module:
    """The registered model ``name`` on the meta device (built there, or built on the CPU and moved)."""
    from maskworks.registry import create_model

    try:
        with torch.device("meta"):
            return create_model(name, **kwargs).eval()
    except (RuntimeError, NotImplementedError):  # an initialiser that reads tensor values cannot run on meta
        return create_model(name, **kwargs).eval().to("meta")


def model_macs(
    model: nn.Module | str, img_size: int | Sequence[int], in_channels: int = 3, **kwargs: Any
) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass of a model on one ``(in_channels, H, W)`` image, measured by
    ``torch.utils.flop_counter`` on the meta device (FLOPs / 2).

    Args:
        model: a module (deep-copied to the meta device) or a registered name (built there). A ViT-family name is
            built with ``img_size`` set to the image size when it takes one (its position table then fits).
        img_size: ``S`` or ``(H, W)``.
        in_channels: image channels.
        **kwargs: constructor arguments for a registered name.

    Returns:
        ``{"macs": total, "attention_macs": the ATTENTION_OPS part, "other_macs": the rest, "by_op": {op: MACs}}``.
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    h, w = _pair(img_size, "img_size")
    if isinstance(model, str):
        try:
            module = _on_meta(model, {"img_size": (h, w), **kwargs})
        except TypeError as err:  # no img_size argument: the model takes any size
            if "img_size" not in str(err):
                raise
            module = _on_meta(model, kwargs)
    else:
        module = copy.deepcopy(model).eval().to("meta")
    forward = getattr(module, "forward_features", None) if not hasattr(module, "num_classes") else None
    x = torch.empty(1, in_channels, h, w, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        (forward or module)(x)
    by_op = {str(op): int(flops) // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    attention = sum(v for op, v in by_op.items() if op in ATTENTION_OPS)
    total = sum(by_op.values())
    return {"macs": total, "attention_macs": attention, "other_macs": total - attention, "by_op": by_op}


def model_scaling(
    models: Sequence[str] = ("swin_tiny_patch4_window7_224", "vit_base_patch16_224"),
    img_sizes: Sequence[int] = (224, 448, 896),
) -> list[dict[str, Any]]:
    """Measured MACs (:func:`model_macs`) of registered models over square image sizes, with the growth relative
    to the first size (the Swin paper's linear vs. quadratic claim, measured). Backbones are measured without a
    classifier (their ``forward_features``); classification ViTs with theirs (a constant ``D K``)."""
    rows = []
    for name in models:
        first = None
        for size in img_sizes:
            m = model_macs(name, size)
            first = first or m
            rows.append(
                {
                    "model": name,
                    "img_size": size,
                    "macs": m["macs"],
                    "attention_macs": m["attention_macs"],
                    "other_macs": m["other_macs"],
                    "growth": m["macs"] / first["macs"],
                    "attention_growth": m["attention_macs"] / first["attention_macs"]
                    if first["attention_macs"]
                    else None,
                }
            )
    return rows


def model_scaling_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of :func:`model_scaling` rows (GMACs)."""
    lines = [
        f"{'model':<34} {'size':>5} {'GMACs':>9} {'x first':>8} {'attn GMACs':>11} {'attn x first':>12}",
    ]
    for r in rows:
        growth = "-" if r["attention_growth"] is None else f"{r['attention_growth']:.1f}"
        lines.append(
            f"{r['model']:<34} {r['img_size']:>5} {r['macs'] / 1e9:>9.2f} {r['growth']:>8.2f} "
            f"{r['attention_macs'] / 1e9:>11.2f} {growth:>12}"
        )
    return "\n".join(lines)
