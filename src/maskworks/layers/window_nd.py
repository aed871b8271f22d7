"""Shifted-window attention on 3-D (and 2-D) channels-last maps: the volumetric Swin Transformer of Swin UNETR
(Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI Images",
BrainLes 2021), after Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021, and Liu et al., "Video Swin Transformer", CVPR 2022.

The pieces work on maps ``(B, *S, C)`` with ``len(S)`` = 2 or 3 spatial axes; every window and shift is a tuple
with one entry per axis. :mod:`maskworks.layers.window` holds the 2-D layers with timm's conventions; these follow
MONAI's volumetric ones (``monai.networks.nets.swin_unetr``) so that MONAI checkpoints compute the same function:

* :func:`window_partition_nd` / :func:`window_reverse_nd`: maps <-> windows ``(B * nW, N, C)``, batch first, then
  row-major over the window grid, tokens row-major inside a window.
* :func:`window_and_shift_for_size_nd`: an axis no longer than the window gets a window clipped to the axis and no
  shift (per axis, as MONAI's ``get_window_size``).
* :func:`shifted_window_mask_nd`: the additive SW-MSA mask ``(nW, N, N)`` built on the rolled layout: each axis
  is split into ``[0, L - M)``, ``[L - M, L - s)``, ``[L - s, L)`` (one region when ``s = 0``); two tokens of a
  window may attend to each other iff they lie in the same region on every axis.
* :func:`relative_position_index_nd` and :class:`WindowAttentionNd` (``qkv``, ``proj``,
  ``relative_position_bias_table``; buffer ``relative_position_index``, not saved): window attention with a
  learned relative position bias through ``F.scaled_dot_product_attention``.
* :class:`PatchMergingNd` (``norm``, ``reduction``): ``2^d`` neighbours concatenated, normalised, linearly reduced
  to ``2 C``.

MONAI's bias lookup on a clipped window: when a window is clipped to a map smaller than it (``N`` tokens instead of
``prod(window)``), MONAI indexes the bias with the top-left ``N x N`` block of the *full* window's index rather
than the index of the clipped window; the offsets it reads are then not those of the token pairs. Checkpoints were
trained with that lookup, so :class:`WindowAttentionNd` does the same (see its ``forward``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.vit_layers import LayerFactory, _QKVProjections

__all__ = [
    "window_partition_nd",
    "window_reverse_nd",
    "window_and_shift_for_size_nd",
    "pad_to_window_nd",
    "shifted_window_mask_nd",
    "relative_position_index_nd",
    "WindowAttentionNd",
    "PatchMergingNd",
    "MERGE_ORDERS",
]


def _check_window(window_size: Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
    window = tuple(int(w) for w in window_size)
    if len(window) != len(spatial):
        raise ValueError(f"window_size {window} must have one entry per spatial axis of a {len(spatial)}-D map")
    if any(s % w for s, w in zip(spatial, window)):
        raise ValueError(f"map size {tuple(spatial)} must be a multiple of window_size {window}; pad it first")
    return window


def window_partition_nd(x: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """Split ``(B, *S, C)`` into non-overlapping windows ``(B * nW, N, C)``, ``N = prod(window_size)``.

    Windows are ordered batch first, then row-major over the window grid; tokens row-major inside a window.
    """
    b, *spatial, c = x.shape
    window = _check_window(window_size, spatial)
    nd = len(window)
    grid_shape = [v for s, w in zip(spatial, window) for v in (s // w, w)]
    x = x.reshape(b, *grid_shape, c)  # (B, S0/M0, M0, S1/M1, M1, [S2/M2, M2,] C)
    perm = (0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
    x = x.permute(perm)  # (B, S0/M0, S1/M1, [S2/M2,] M0, M1, [M2,] C)
    return x.reshape(-1, math.prod(window), c)  # (B * nW, N, C)


def window_reverse_nd(windows: torch.Tensor, window_size: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition_nd`: ``(B * nW, N, C)`` -> ``(B, *spatial, C)``."""
    window = _check_window(window_size, spatial)
    nd = len(window)
    c = windows.shape[-1]
    grid = [s // w for s, w in zip(spatial, window)]
    x = windows.reshape(-1, *grid, *window, c)  # (B, S0/M0, S1/M1, [S2/M2,] M0, M1, [M2,] C)
    perm = (0, *(v for i in range(nd) for v in (1 + i, 1 + nd + i)), 2 * nd + 1)
    x = x.permute(perm)  # (B, S0/M0, M0, S1/M1, M1, [S2/M2, M2,] C)
    return x.reshape(-1, *spatial, c)


def window_and_shift_for_size_nd(
    size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The window and shift used on a map of ``size``: along an axis no longer than the window, the window is
    clipped to the axis and the shift dropped (MONAI's ``get_window_size``)."""
    window = tuple(min(s, w) for s, w in zip(size, window_size))
    shift = tuple(0 if s <= w else sh for s, w, sh in zip(size, window_size, shift_size))
    return window, shift


def pad_to_window_nd(x: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``(B, *S, C)`` at the end of every spatial axis up to a multiple of the window."""
    spatial = x.shape[1:-1]
    pads = [(-s) % w for s, w in zip(spatial, window_size)]
    if not any(pads):
        return x
    flat: list[int] = [0, 0]  # channels
    for p in reversed(pads):  # F.pad lists the last axis first
        flat += [0, p]
    return F.pad(x, flat)


def _axis_regions(length: int, window: int, shift: int, device: torch.device | str | None) -> torch.Tensor:
    """Region label (0, 1, 2) of every position of one axis of the rolled map; all 0 without a shift."""
    if not shift:
        return torch.zeros(length, dtype=torch.long, device=device)
    pos = torch.arange(length, device=device)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def shifted_window_mask_nd(
    spatial: Sequence[int],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    device: torch.device | str | None = None,
    mask_value: float = -100.0,
) -> torch.Tensor:
    """The additive SW-MSA mask ``(nW, N, N)`` of a (padded) map of ``spatial`` tokens.

    Args:
        spatial: map size, a multiple of the window on every axis.
        window_size: the window, one entry per axis.
        shift_size: the shift, one entry per axis, each ``0 <= s < M``.
        device: device of the mask.
        mask_value: value of the pairs that may not attend (``-100`` as MONAI and the official Swin code).

    Returns:
        Float mask, ``0`` for allowed pairs, windows in :func:`window_partition_nd` order.
    """
    window = _check_window(window_size, spatial)
    shift = tuple(int(s) for s in shift_size)
    if len(shift) != len(window) or not all(0 <= s < w for s, w in zip(shift, window)):
        raise ValueError(f"shift_size {shift} must have one entry in [0, window) per axis of window {window}")
    labels = torch.zeros((), dtype=torch.long, device=device)
    for length, w, s in zip(spatial, window, shift):  # label = sum of region_i * 3^(nd - 1 - i)
        labels = labels[..., None] * 3 + _axis_regions(length, w, s, device)  # (*S so far)
    label_windows = window_partition_nd(labels[None, ..., None].float(), window).squeeze(-1)  # (nW, N)
    same = label_windows[:, None, :] == label_windows[:, :, None]  # (nW, N, N)
    return torch.zeros(same.shape, device=same.device).masked_fill_(~same, mask_value)


def relative_position_index_nd(window_size: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, N)`` int64 index of the relative offset of every token pair of a window into the bias table.

    For tokens ``i`` and ``j`` (row-major in the window) the offset along axis ``a`` is ``p_a(i) - p_a(j) + M_a - 1``
    in ``[0, 2 M_a - 2]``; the index is these offsets in mixed radix ``(2 M_0 - 1, 2 M_1 - 1, ...)``, row-major.
    """
    window = tuple(int(w) for w in window_size)
    coords = torch.stack(torch.meshgrid(*(torch.arange(w, device=device) for w in window), indexing="ij")).flatten(
        1
    )  # (nd, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (nd, N, N)
    index = torch.zeros(rel.shape[1:], dtype=torch.long, device=device)
    for a, w in enumerate(window):
        index = index * (2 * w - 1) + rel[a] + (w - 1)
    return index


class WindowAttentionNd(_QKVProjections):
    """Window multi-head self-attention with a learned relative position bias on 2-D / 3-D windows.

    ``softmax(q k^T * scale + B + mask) v`` over the ``N`` tokens of every window, through
    ``F.scaled_dot_product_attention`` (``fused_attn=True``) or an explicit path.

    Args:
        dim: token dimension.
        num_heads: heads; must divide ``dim``.
        window_size: the window, one entry per spatial axis.
        qkv_bias: bias of the ``qkv`` projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.

    Attributes:
        relative_position_bias_table: ``(prod(2 M_a - 1), heads)``, truncated-normal init (std 0.02).
        relative_position_index: ``(N, N)`` int64 buffer, not saved in the state dict.
        fused_attn: use SDPA.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(dim, num_heads, qkv_bias, False, proj_drop, nn.LayerNorm, attn_drop=attn_drop)
        self.window_size = tuple(int(w) for w in window_size)
        table_size = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        self.register_buffer("relative_position_index", relative_position_index_nd(self.window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.fused_attn = True

    def relative_position_bias(self, n: int) -> torch.Tensor:
        """The bias ``(heads, n, n)`` for windows of ``n`` tokens.

        ``n`` below ``prod(window_size)`` (a window clipped to a small map) reads the top-left ``n x n`` block of
        the full window's index, as MONAI does (see the module docstring).
        """
        index = self.relative_position_index[:n, :n].reshape(-1)  # (n * n,)
        return self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)  # (h, n, n)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: window tokens ``(B * nW, N, C)``, windows in :func:`window_partition_nd` order.
            mask: additive mask ``(nW, N, N)`` (:func:`shifted_window_mask_nd`) or ``None``.

        Returns:
            ``(B * nW, N, C)``.
        """
        bw, n, _ = x.shape
        if n > self.relative_position_index.shape[0]:
            raise ValueError(f"windows of {n} tokens exceed the window {self.window_size} of this layer")
        q, k, v = self._split_heads(x)  # (B*nW, h, N, d) each
        bias = self.relative_position_bias(n).to(q.dtype)  # (h, N, N)
        nw = 1
        if mask is not None:
            nw = mask.shape[0]
            if bw % nw:
                raise ValueError(f"{bw} windows is not a multiple of the mask's {nw} windows")
            bias = bias[None] + mask.to(q.dtype)[:, None]  # (nW, h, N, N)
        bias = bias.reshape(1, nw * self.num_heads, n, n)  # windows and heads share one batch-like axis
        q, k, v = (t.reshape(bw // nw, nw * self.num_heads, n, self.head_dim) for t in (q, k, v))  # (B, nW*h, N, d)
        drop = self.attn_drop.p if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, nW*h, N, N)
            x = self.attn_drop(attn) @ v
        return self._merge_heads(x.reshape(bw, self.num_heads, n, self.head_dim))  # (B*nW, N, C)


# Order in which the 2^d neighbours of a merged token are concatenated, as offsets per axis (MONAI's layouts).
MERGE_ORDERS: dict[tuple[str, int], tuple[tuple[int, ...], ...]] = {
    # MONAI ``PatchMerging`` (v0.9.0 layout): x0..x7 of the original 3-D code
    ("merging", 3): ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    # MONAI ``PatchMergingV2``: lexicographic over (d, h, w)
    ("mergingv2", 3): tuple(itertools.product(range(2), repeat=3)),
    # 2-D, both modes: row offset fastest
    ("merging", 2): ((0, 0), (1, 0), (0, 1), (1, 1)),
    ("mergingv2", 2): ((0, 0), (1, 0), (0, 1), (1, 1)),
}


class PatchMergingNd(nn.Module):
    """Merge ``2^d`` neighbouring tokens: ``(B, *S, C) -> (B, *ceil(S / 2), 2 C)``, ``reduction(norm(concat))``.

    Odd axes are zero-padded at the end first.

    Args:
        dim: input channels ``C``.
        norm_layer: normalisation class, called with ``2^d C``.
        spatial_dims: 2 or 3.
        mode: ``"merging"`` (MONAI's ``PatchMerging``) or ``"mergingv2"`` (``PatchMergingV2``): the order of the
            concatenated neighbours (:data:`MERGE_ORDERS`; the same in 2-D).
    """

    def __init__(
        self, dim: int, norm_layer: LayerFactory = nn.LayerNorm, spatial_dims: int = 3, mode: str = "merging"
    ) -> None:
        super().__init__()
        if (mode, spatial_dims) not in MERGE_ORDERS:
            raise ValueError(
                f"mode must be 'merging' or 'mergingv2' and spatial_dims 2 or 3, got {mode!r}, {spatial_dims!r}"
            )
        self.dim = dim
        self.spatial_dims = spatial_dims
        self.mode = mode
        self.offsets = MERGE_ORDERS[(mode, spatial_dims)]
        self.norm = norm_layer(2**spatial_dims * dim)
        self.reduction = nn.Linear(2**spatial_dims * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[1:-1]
        if len(spatial) != self.spatial_dims:
            raise ValueError(f"expected a {self.spatial_dims}-D channels-last map, got shape {tuple(x.shape)}")
        pads = [s % 2 for s in spatial]
        if any(pads):
            flat: list[int] = [0, 0]
            for p in reversed(pads):
                flat += [0, p]
            x = F.pad(x, flat)
        parts = [x[(slice(None), *(slice(o, None, 2) for o in offset))] for offset in self.offsets]
        x = torch.cat(parts, dim=-1)  # (B, *S/2, 2^d C)
        return self.reduction(self.norm(x))  # (B, *S/2, 2 C)
