"""Attention visualisation for vision transformers: captured attention maps, CLS attention, attention rollout.

* :func:`attention_maps` runs a model once with every :class:`~maskworks.layers.vit_layers.Attention` on its
  explicit path (through :func:`~maskworks.layers.vit_layers.capture_attention`) and returns the probabilities of
  each block, ``(B, heads, T, T)``; the fused-attention flags are restored afterwards and the model's outputs are
  those of its normal forward.
* :func:`cls_attention` cuts the class-token row of one map into per-head patch-grid maps ``(B, heads, h, w)``.
* :func:`attention_rollout` implements attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in
  Transformers", ACL 2020) with the head fusion and low-attention discarding of jacobgil/vit-explain
  (``vit_rollout.py``), with the paper's per-row normalisation.
* :func:`overlay_attention` blends an upsampled heat map over an image; :func:`plot_head_attention` writes a grid
  of per-head maps as PNG.

Attention weights show where information is mixed, not why a prediction is made (Jain & Wallace, 2019); rollout
assumes the residual stream and the attention contribute equally (the ``0.5 (A + I)`` term).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.vit_layers import Attention, PatchEmbed, capture_attention
from maskworks.viz.render import to_uint8_hwc

__all__ = [
    "attention_maps",
    "cls_attention",
    "attention_rollout",
    "overlay_attention",
    "plot_head_attention",
    "token_grid_size",
]

log = logging.getLogger(__name__)

HEAD_FUSIONS = ("mean", "max", "min")


def _grid(num_tokens: int, grid_size: int | Sequence[int] | None, num_prefix_tokens: int) -> tuple[int, int]:
    n = num_tokens - num_prefix_tokens
    if n < 1:
        raise ValueError(f"maps have {num_tokens} tokens, not more than num_prefix_tokens={num_prefix_tokens}")
    if grid_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{n} patch tokens ({num_tokens} tokens - {num_prefix_tokens} prefix) do not form a square grid; "
                "pass grid_size=(h, w) (or check num_prefix_tokens)"
            )
        return side, side
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    if len(grid_size) != 2 or int(grid_size[0]) * int(grid_size[1]) != n:
        raise ValueError(
            f"grid_size {tuple(grid_size)} does not match the {n} patch tokens "
            f"({num_tokens} tokens - {num_prefix_tokens} prefix)"
        )
    return int(grid_size[0]), int(grid_size[1])


def token_grid_size(model: nn.Module, image_size: Sequence[int]) -> tuple[int, int]:
    """The patch-token grid ``(h, w)`` a ViT-family model makes of an image of ``image_size = (H, W)``.

    Uses the model's ``patch_embed`` (or its first :class:`~maskworks.layers.vit_layers.PatchEmbed`, e.g. inside an
    encoder): ``dynamic_feat_size`` when present, else ``H // p, W // p``.
    """
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    if embed is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed; pass grid_size explicitly")
    size = (int(image_size[0]), int(image_size[1]))
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(embed.dynamic_feat_size(size))
    ph, pw = embed.patch_size if isinstance(embed.patch_size, (tuple, list)) else (embed.patch_size,) * 2
    return size[0] // ph, size[1] // pw


def attention_maps(
    model: nn.Module, images: torch.Tensor, detach: bool = True, return_output: bool = False
) -> list[torch.Tensor] | tuple[list[torch.Tensor], Any]:
    """Attention probabilities of every attention call in one forward pass of ``model``.

    The explicit attention path is switched on only while the model runs (``capture_attention``); afterwards
    every ``fused_attn`` flag is as before, even after an exception. The model's mode is not changed: call
    ``model.eval()`` first for deterministic maps (the maps are taken before attention dropout either way).

    Args:
        model: a model containing maskworks :class:`~maskworks.layers.vit_layers.Attention` modules (ViT, DeiT,
            a segmentation model with a ViT encoder, ...).
        images: its input ``(B, C, H, W)``.
        detach: run without gradients and return detached maps; ``False`` keeps them in the autograd graph
            (for gradient-weighted explanations).
        return_output: also return the model's output.

    Returns:
        One ``(B, heads, T, T)`` tensor per attention call (block 0 first), rows summing to 1; with
        ``return_output``, the pair ``(maps, output)``.

    Raises:
        ValueError: the model has no maskworks ``Attention`` module (not a ViT-family model), or none ran.
    """
    if not any(isinstance(m, Attention) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no maskworks Attention modules, so there are no attention maps to show; "
            "use a ViT-family model (e.g. vit_base_patch16_224, deit_*)"
        )
    grad = torch.no_grad() if detach else contextlib.nullcontext()
    with grad, capture_attention(model, detach=detach) as sink:
        output = model(images)
    maps = list(sink)
    if not maps:
        raise ValueError(f"{type(model).__name__}.forward ran none of its Attention modules")
    return (maps, output) if return_output else maps


def cls_attention(
    attn: torch.Tensor, grid_size: int | Sequence[int] | None = None, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Per-head attention of the class token (token 0) to the patch tokens, as grid maps.

    Args:
        attn: one layer's probabilities ``(B, heads, T, T)`` (or ``(B, T, T)`` for one fused map).
        grid_size: patch grid ``(h, w)``; ``None`` for a square grid.
        num_prefix_tokens: tokens before the patches (1 for ViT, 2 for DeiT with distillation, 1 + registers).

    Returns:
        ``(B, heads, h, w)`` (``(B, h, w)`` for a 3-D input): row 0 of the map over the patch columns. The
        values are not renormalised; their sum is the share of the class token's attention that goes to patches.
    """
    if num_prefix_tokens < 1:
        raise ValueError(f"cls_attention needs a class token (num_prefix_tokens >= 1), got {num_prefix_tokens}")
    if attn.ndim not in (3, 4) or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, heads, T, T) or (B, T, T), got shape {tuple(attn.shape)}")
    h, w = _grid(attn.shape[-1], grid_size, num_prefix_tokens)
    row = attn[..., 0, num_prefix_tokens:]  # (B, heads, N) or (B, N)
    return row.reshape(*row.shape[:-1], h, w)  # (B, heads, h, w) or (B, h, w)


def _fuse_heads(attn: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if attn.ndim == 3:  # already one map per sample
        return attn
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    return attn.amin(dim=1)


def _discard_lowest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the ``int(T^2 * discard_ratio)`` smallest entries of each sample's ``(T, T)`` map, except the
    class-to-class entry (vit-explain's rule: ranking over the whole flattened map, flat index 0 kept)."""
    b, t, _ = fused.shape
    k = int(t * t * discard_ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, t * t)  # (B, T*T)
    idx = flat.topk(k, dim=-1, largest=False).indices  # (B, k)
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    drop[:, 0] = False  # never the CLS -> CLS entry
    return flat.masked_fill(drop, 0.0).reshape(b, t, t)  # (B, T, T)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
    grid_size: int | Sequence[int] | None = None,
    normalize: str | None = "max",
) -> torch.Tensor:
    """Attention rollout of the class token over the patch grid (Abnar & Zuidema 2020; jacobgil/vit-explain).

    For every layer, in order: the heads are fused (``mean`` / ``max`` / ``min``) into ``A`` ``(T, T)``; with
    ``discard_ratio > 0`` the ``int(T^2 * discard_ratio)`` smallest entries of ``A`` (over the whole map of the
    sample, as vit-explain does) are set to 0, except the class-to-class entry; the residual path is added,
    ``A' = 0.5 (A + I)``, and each row of ``A'`` is normalised to sum 1; the layers are multiplied,
    ``R = A'_L ... A'_1``. The result is the class-token row of ``R`` over the patch tokens.

    Differences from vit-explain: every sample of the batch is processed (vit-explain discards in sample 0 only),
    the input maps are not modified in place, rows are normalised per row (vit-explain's ``a / a.sum(dim=-1)``
    broadcasts the row sums along the last axis, which is the same only when all rows already sum to 1, e.g.
    ``mean`` fusion without discarding), and any number of prefix tokens and non-square grids are supported.

    Args:
        attentions: per-layer maps ``(B, heads, T, T)`` (or already fused ``(B, T, T)``), first layer first.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over the heads.
        discard_ratio: fraction in ``[0, 1)`` of the lowest attention weights to drop per layer.
        num_prefix_tokens: tokens before the patches; the class token is token 0.
        grid_size: patch grid ``(h, w)``; ``None`` for a square grid.
        normalize: ``"max"`` (divide by the per-image maximum, as vit-explain), ``"minmax"`` (to exactly
            ``[0, 1]``) or ``None`` (raw rollout values). A constant map becomes all ones (all zeros when 0).

    Returns:
        ``(B, h, w)`` float maps.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    if normalize not in ("max", "minmax", None):
        raise ValueError(f"normalize must be 'max', 'minmax' or None, got {normalize!r}")
    if num_prefix_tokens < 1:
        raise ValueError(f"rollout follows the class token: num_prefix_tokens must be >= 1, got {num_prefix_tokens}")
    attentions = list(attentions)
    if not attentions:
        raise ValueError("attentions is empty; pass the maps of at least one layer")
    first = attentions[0]
    if first.ndim not in (3, 4) or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"each map must be (B, heads, T, T) or (B, T, T), got shape {tuple(first.shape)}")
    b, t = first.shape[0], first.shape[-1]
    h, w = _grid(t, grid_size, num_prefix_tokens)
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    eye = torch.eye(t, device=first.device, dtype=dtype)

    result = None
    for i, attn in enumerate(attentions):
        if attn.shape[0] != b or attn.shape[-2:] != (t, t) or attn.ndim not in (3, 4):
            raise ValueError(f"map {i} has shape {tuple(attn.shape)}; expected (B={b}, heads, {t}, {t})")
        fused = _fuse_heads(attn.detach().to(dtype), head_fusion)  # (B, T, T)
        if discard_ratio > 0:
            fused = _discard_lowest(fused, discard_ratio)
        a = 0.5 * (fused + eye)  # (B, T, T)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result  # (B, T, T)

    rollout = result[:, 0, num_prefix_tokens:].reshape(b, h, w)  # (B, h, w)
    if normalize is None:
        return rollout
    flat = rollout.reshape(b, -1)  # (B, h*w)
    hi = flat.amax(dim=1, keepdim=True)
    lo = flat.amin(dim=1, keepdim=True) if normalize == "minmax" else torch.zeros_like(hi)
    span = hi - lo
    constant = span <= torch.finfo(dtype).tiny
    out = torch.where(constant, (hi > 0).to(dtype).expand_as(flat), (flat - lo) / span.clamp_min(1e-30))
    return out.reshape(b, h, w)


def _heat_to_numpy(heatmap: Any) -> np.ndarray:
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().float().cpu().numpy()
    heat = np.asarray(heatmap, dtype=np.float64)
    while heat.ndim > 2 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (h, w), got shape {heat.shape}")
    return heat


def _resize_heat(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if heat.shape == size:
        return heat
    t = torch.from_numpy(heat)[None, None]  # (1, 1, h, w)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()  # (H, W)


def _colorize(values: np.ndarray, cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    if cmap not in colormaps:
        raise ValueError(f"unknown matplotlib colour map {cmap!r} (e.g. 'jet', 'viridis', 'inferno')")
    return colormaps[cmap](np.clip(values, 0.0, 1.0))[..., :3]  # (H, W, 3) floats in [0, 1]


def overlay_attention(image: Any, heatmap: Any, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map over an image.

    The map is upsampled bilinearly to the image size, min-max normalised to ``[0, 1]`` (a constant map shows the
    lowest colour), coloured with a matplotlib colour map and blended: ``(1 - alpha) * image + alpha * colour``.

    Args:
        image: an image accepted by :func:`maskworks.viz.render.to_uint8_hwc` (uint8 ``(H, W, 3)``, ``(C, H, W)``
            tensor in ``[0, 1]``, grayscale, a PIL image through ``np.asarray``, ...).
        heatmap: ``(h, w)`` map (tensor or array; leading singleton dims are dropped), e.g. one rollout map.
        alpha: opacity of the heat map in ``[0, 1]``.
        cmap: matplotlib colour map name.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    rgb = to_uint8_hwc(np.asarray(image) if not isinstance(image, (np.ndarray, torch.Tensor)) else image)
    heat = _heat_to_numpy(heatmap)
    if not np.isfinite(heat).all():
        raise ValueError("heatmap holds NaN or infinite values")
    heat = _resize_heat(heat, rgb.shape[:2])
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    color = _colorize(heat, cmap) * 255.0
    out = (1.0 - alpha) * rgb.astype(np.float64) + alpha * color
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def plot_head_attention(
    head_maps: Any,
    path: str | PathLike,
    image: Any | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    alpha: float = 0.5,
    dpi: int = 100,
) -> Path:
    """Write a grid of per-head attention maps (e.g. the class-token maps of the last block) as a PNG.

    Args:
        head_maps: ``(heads, h, w)`` (or ``(1, heads, h, w)``) maps, e.g. ``cls_attention(maps[-1])[0]``.
        path: output PNG file.
        image: optional image; each head is then shown as :func:`overlay_attention` over it.
        title: figure title.
        cmap: colour map.
        alpha: overlay opacity when ``image`` is given.
        dpi: resolution.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(head_maps, torch.Tensor):
        head_maps = head_maps.detach().float().cpu().numpy()
    maps = np.asarray(head_maps, dtype=np.float64)
    if maps.ndim == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.ndim != 3:
        raise ValueError(f"head_maps must be (heads, h, w), got shape {maps.shape}")
    heads = maps.shape[0]
    ncol = math.ceil(math.sqrt(heads))
    nrow = math.ceil(heads / ncol)
    fig = Figure(figsize=(2.4 * ncol, 2.4 * nrow + (0.4 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= heads:
            continue
        if image is not None:
            ax.imshow(overlay_attention(image, maps[i], alpha=alpha, cmap=cmap))
        else:
            ax.imshow(maps[i], cmap=cmap, interpolation="nearest")
        ax.set_title(f"head {i}", fontsize=9)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
