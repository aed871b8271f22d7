"""Swin Transformer window layers (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021; Liu et al., "Swin Transformer V2", CVPR 2022).

Model-agnostic pieces with timm's names and semantics, so timm Swin checkpoints load without renaming:

* :func:`window_partition` / :func:`window_reverse`: ``(B, H, W, C)`` maps <-> ``(B * nW, M_h, M_w, C)`` windows,
  row-major over the window grid, and :func:`pad_to_window` (zeros at the bottom / right up to a multiple of
  the window, as timm's block does before partitioning).
* :func:`shifted_window_mask`: the additive SW-MSA mask ``(nW, N, N)``. It is built on the *shifted* layout
  (after ``torch.roll(x, (-s_h, -s_w))``): the last ``M`` rows / columns of the rolled map hold tokens from both
  ends of the original map, so each axis is split into the regions ``[0, H - M)``, ``[H - M, H - s)`` and
  ``[H - s, H)``; two tokens of one window may attend to each other iff they lie in the same region, i.e. iff
  they were neighbours before the roll (no attention across the wrapped border).
* :func:`relative_position_index` / :class:`RelativePositionBias`: the learned bias table
  ``((2 M_h - 1)(2 M_w - 1), heads)`` indexed by the relative offset ``(dy + M_h - 1) (2 M_w - 1) + dx + M_w - 1``
  of every token pair, plus :func:`resize_relative_position_bias_table` for a new window.
* :class:`WindowAttention` (``qkv``, ``proj``, ``relative_position_bias_table``, buffer
  ``relative_position_index``): W-MSA / SW-MSA on ``(B * nW, N, C)`` windows, SDPA by default, an explicit path
  that can return the probabilities.
* :class:`PatchMerging` (``norm``, ``reduction``): 2x2 neighbour concatenation to ``4C`` then a bias-free linear
  map to ``2C``; ``order="v1"`` normalises before the reduction (Swin V1), ``order="v2"`` after it (Swin V2's
  res-post-norm). Odd maps are zero-padded at the bottom / right.
* :func:`window_and_shift_for_size`: clip the window to a smaller map and drop the shift there (a window covering
  the whole axis needs no shift), as timm's block does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.vit_layers import LayerFactory, _QKVProjections, to_2tuple

__all__ = [
    "window_partition",
    "window_reverse",
    "pad_to_window",
    "window_and_shift_for_size",
    "shifted_window_mask",
    "relative_position_index",
    "resize_relative_position_bias_table",
    "RelativePositionBias",
    "WindowAttention",
    "PatchMerging",
]


def window_partition(x: torch.Tensor, window_size: int | Sequence[int]) -> torch.Tensor:
    """Split ``(B, H, W, C)`` into non-overlapping windows ``(B * nW, M_h, M_w, C)``.

    Windows are ordered batch first, then row-major over the ``(H / M_h, W / M_w)`` window grid.

    Raises:
        ValueError: ``H`` or ``W`` is not a multiple of the window (pad first, see :func:`pad_to_window`).
    """
    mh, mw = to_2tuple(window_size, "window_size")
    b, h, w, c = x.shape
    if h % mh or w % mw:
        raise ValueError(f"map size ({h}, {w}) must be a multiple of window_size ({mh}, {mw}); pad it first")
    x = x.reshape(b, h // mh, mh, w // mw, mw, c).permute(0, 1, 3, 2, 4, 5)  # (B, H/M, W/M, M, M, C)
    return x.reshape(-1, mh, mw, c)


def window_reverse(windows: torch.Tensor, window_size: int | Sequence[int], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, M_h, M_w, C)`` (or ``(B * nW, N, C)``) -> ``(B, H, W, C)``."""
    mh, mw = to_2tuple(window_size, "window_size")
    if H % mh or W % mw:
        raise ValueError(f"map size ({H}, {W}) must be a multiple of window_size ({mh}, {mw})")
    c = windows.shape[-1]
    x = windows.reshape(-1, H // mh, W // mw, mh, mw, c).permute(0, 1, 3, 2, 4, 5)  # (B, H/M, M, W/M, M, C)
    return x.reshape(-1, H, W, c)


def pad_to_window(x: torch.Tensor, window_size: int | Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``(B, H, W, C)`` at the bottom / right to multiples of the window.

    Returns:
        The padded map and ``(pad_h, pad_w)``; crop with ``x[:, :H, :W]`` after :func:`window_reverse`.
    """
    mh, mw = to_2tuple(window_size, "window_size")
    pad_h, pad_w = (-x.shape[1]) % mh, (-x.shape[2]) % mw
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def window_and_shift_for_size(
    input_size: int | Sequence[int], window_size: int | Sequence[int], shift_size: int | Sequence[int] = 0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window and shift used on a map of ``input_size`` (timm's ``_calc_window_shift``).

    Along an axis no longer than the window, the window is clipped to the axis and the shift dropped: the single
    window already covers the axis, and rolling it would only mix its two ends.
    """
    size = to_2tuple(input_size, "input_size")
    win = to_2tuple(window_size, "window_size")
    shift = to_2tuple(shift_size, "shift_size")
    out_win = tuple(min(r, m) for r, m in zip(size, win))
    out_shift = tuple(0 if r <= m else s for r, m, s in zip(size, win, shift))
    return out_win, out_shift  # type: ignore[return-value]


def _axis_regions(length: int, window: int, shift: int, device) -> torch.Tensor:
    """Region label of every position of one axis of the rolled map (0, 1, 2; all 0 without shift)."""
    pos = torch.arange(length, device=device)
    if not shift:
        return torch.zeros(length, dtype=torch.long, device=device)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def shifted_window_mask(
    H: int,
    W: int,
    window_size: int | Sequence[int],
    shift_size: int | Sequence[int],
    device: torch.device | str | None = None,
    mask_value: float = -100.0,
) -> torch.Tensor:
    """The additive SW-MSA attention mask ``(nW, N, N)`` for a (padded) map of ``H x W`` tokens.

    Built on the cyclically shifted layout: pixels of the rolled map are labelled by the region they came from
    (timm's ``img_mask`` slices ``(0, -M), (-M, -s), (-s, None)`` per axis) and a query may attend to a key of
    its window iff both carry the same label. Allowed pairs get ``0``, the others ``mask_value`` (``-100`` as
    timm; ``float("-inf")`` is safe too, every query keeps at least itself).

    Args:
        H, W: map size, multiples of the window (pad first).
        window_size: ``M`` or ``(M_h, M_w)``.
        shift_size: ``s`` or ``(s_h, s_w)``, each ``0 <= s < M``.
        device: device of the mask.
        mask_value: value of the masked pairs.

    Returns:
        ``(H W / (M_h M_w), M_h M_w, M_h M_w)`` float mask, windows in :func:`window_partition` order.
    """
    mh, mw = to_2tuple(window_size, "window_size")
    sh, sw = to_2tuple(shift_size, "shift_size")
    if not (0 <= sh < mh and 0 <= sw < mw):
        raise ValueError(f"shift_size ({sh}, {sw}) must lie in [0, window_size) = [0, ({mh}, {mw}))")
    if H % mh or W % mw:
        raise ValueError(f"map size ({H}, {W}) must be a multiple of window_size ({mh}, {mw}); pad it first")
    rows = _axis_regions(H, mh, sh, device)
    cols = _axis_regions(W, mw, sw, device)
    labels = (rows[:, None] * 3 + cols[None, :]).to(torch.float32)  # (H, W)
    label_windows = window_partition(labels[None, :, :, None], (mh, mw)).reshape(-1, mh * mw)  # (nW, N)
    same = label_windows[:, None, :] == label_windows[:, :, None]  # (nW, N, N)
    zero = torch.zeros((), device=same.device)
    return torch.where(same, zero, torch.full((), mask_value, device=same.device))


def relative_position_index(window_size: int | Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, N)`` int64 index of the relative offset of every token pair of a window into the bias table.

    For tokens ``i = (y_i, x_i)`` and ``j = (y_j, x_j)`` in row-major order it is
    ``(y_i - y_j + M_h - 1) (2 M_w - 1) + (x_i - x_j + M_w - 1)``, in ``[0, (2 M_h - 1)(2 M_w - 1))``.
    """
    mh, mw = to_2tuple(window_size, "window_size")
    ys, xs = torch.meshgrid(
        torch.arange(mh, device=device, dtype=torch.long),
        torch.arange(mw, device=device, dtype=torch.long),
        indexing="ij",
    )
    ys, xs = ys.reshape(-1), xs.reshape(-1)  # (N,)
    dy = ys[:, None] - ys[None, :] + (mh - 1)  # (N, N) in [0, 2 M_h - 2]
    dx = xs[:, None] - xs[None, :] + (mw - 1)
    return dy * (2 * mw - 1) + dx


def _geometric_positions(src: int, dst: int) -> torch.Tensor:
    """Source sample positions of BEiT's table resize: offsets growing geometrically so that the outermost
    source entry lands at about ``dst // 2`` (bisection on the ratio, as timm / unilm)."""

    def reach(ratio: float, n: int) -> float:
        return (1.0 - ratio**n) / (1.0 - ratio)

    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2.0
        if reach(mid, src // 2) > dst // 2:
            hi = mid
        else:
            lo = mid
    ratio = (lo + hi) / 2.0
    side, cur = [], 1.0
    for i in range(src // 2):
        side.append(cur)
        cur += ratio ** (i + 1)
    return torch.tensor([-v for v in reversed(side)] + [0.0] + side, dtype=torch.float64)


def _linear_weights(src_pos: torch.Tensor, dst_pos: torch.Tensor) -> torch.Tensor:
    """``(len(dst), len(src))`` matrix of linear interpolation on an uneven grid, clamped at the ends."""
    dst_pos = dst_pos.clamp(src_pos[0], src_pos[-1])
    right = torch.bucketize(dst_pos, src_pos).clamp(1, len(src_pos) - 1)
    left = right - 1
    t = (dst_pos - src_pos[left]) / (src_pos[right] - src_pos[left])
    weights = torch.zeros(len(dst_pos), len(src_pos), dtype=torch.float64)
    rows = torch.arange(len(dst_pos))
    weights[rows, left] += 1.0 - t
    weights[rows, right] += t
    return weights


def resize_relative_position_bias_table(
    table: torch.Tensor,
    old_window: int | Sequence[int],
    new_window: int | Sequence[int],
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resize a flat bias table ``((2 M_h - 1)(2 M_w - 1), heads)`` from ``old_window`` to ``new_window``.

    The table is viewed per head as a ``(2 M_h - 1, 2 M_w - 1)`` grid of offsets and resampled:

    * ``mode="bicubic"``: ``F.interpolate(..., mode="bicubic", align_corners=False)`` (timm's
      ``resize_rel_pos_bias_table_simple``, the Swin V1 fine-tuning recipe).
    * ``mode="geometric"``: BEiT's resize, the source offsets placed at geometrically growing positions so the
      small offsets keep their values, then linear interpolation at the integer target offsets (timm's
      ``resize_rel_pos_bias_table`` without scipy).

    The same window returns the table unchanged. The result has the table's dtype and device.
    """
    (oh, ow), (nh, nw) = to_2tuple(old_window, "old_window"), to_2tuple(new_window, "new_window")
    src, dst = (2 * oh - 1, 2 * ow - 1), (2 * nh - 1, 2 * nw - 1)
    if table.ndim != 2 or table.shape[0] != src[0] * src[1]:
        raise ValueError(
            f"table of shape {tuple(table.shape)} does not match a {old_window} window ({src[0] * src[1]}, heads)"
        )
    if src == dst:
        return table
    heads = table.shape[1]
    grid = table.t().reshape(1, heads, *src).float()  # (1, heads, 2M_h-1, 2M_w-1)
    if mode == "bicubic":
        out = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    elif mode == "geometric":
        wy = _linear_weights(_geometric_positions(src[0], dst[0]), torch.arange(dst[0]) - dst[0] // 2)
        wx = _linear_weights(_geometric_positions(src[1], dst[1]), torch.arange(dst[1]) - dst[1] // 2)
        out = torch.einsum("yi,bhij,xj->bhyx", wy, grid.double().cpu(), wx).to(grid.device, torch.float32)
    else:
        raise ValueError(f"mode must be 'bicubic' or 'geometric', got {mode!r}")
    return out.reshape(heads, -1).t().contiguous().to(table.dtype)


def _gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(heads, N, N)`` bias from a ``(P, heads)`` table and an ``(N, N)`` index."""
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()


class RelativePositionBias(nn.Module):
    """Learned relative position bias of a window (Swin V1).

    Args:
        window_size: ``M`` or ``(M_h, M_w)``.
        num_heads: heads.

    Attributes:
        relative_position_bias_table: ``((2 M_h - 1)(2 M_w - 1), heads)``, truncated-normal init (std 0.02).
        relative_position_index: ``(N, N)`` int64 buffer (not saved in the state dict, as timm).
    """

    def __init__(self, window_size: int | Sequence[int], num_heads: int) -> None:
        super().__init__()
        self.window_size = to_2tuple(window_size, "window_size")
        self.num_heads = num_heads
        mh, mw = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * mh - 1) * (2 * mw - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def set_window_size(self, window_size: int | Sequence[int], mode: str = "bicubic") -> None:
        """Resize the table to a new window (see :func:`resize_relative_position_bias_table`)."""
        _set_window_size(self, window_size, mode)

    def forward(self) -> torch.Tensor:
        """The bias ``(heads, N, N)``."""
        return _gather_bias(self.relative_position_bias_table, self.relative_position_index)


def _set_window_size(module: nn.Module, window_size: int | Sequence[int], mode: str) -> None:
    new = to_2tuple(window_size, "window_size")
    if new == module.window_size:
        return
    table = module.relative_position_bias_table
    with torch.no_grad():
        resized = resize_relative_position_bias_table(table.detach(), module.window_size, new, mode=mode)
    module.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)
    module.relative_position_index = relative_position_index(new, device=table.device)
    module.window_size = new


class WindowAttention(_QKVProjections):
    """Window multi-head self-attention with relative position bias (W-MSA / SW-MSA of Swin V1, timm's
    ``WindowAttention``).

    ``softmax(q k^T * scale + B + mask) v`` over the ``N = M_h M_w`` tokens of every window, ``B`` from
    ``relative_position_bias_table[relative_position_index]``. ``fused_attn=True`` (default) calls
    ``F.scaled_dot_product_attention`` with bias and mask folded into one additive ``attn_mask``; the explicit
    path is taken when ``fused_attn=False`` or when the probabilities are asked for.

    Args:
        dim: token dimension.
        num_heads: heads; must divide ``dim``.
        window_size: ``M`` or ``(M_h, M_w)``.
        qkv_bias: bias of the ``qkv`` projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.

    Attributes:
        fused_attn: use SDPA when no probabilities are wanted.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(dim, num_heads, qkv_bias, False, proj_drop, nn.LayerNorm, attn_drop=attn_drop)
        self.window_size = to_2tuple(window_size, "window_size")
        mh, mw = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * mh - 1) * (2 * mw - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.fused_attn = True

    @property
    def window_area(self) -> int:
        return self.window_size[0] * self.window_size[1]

    def set_window_size(self, window_size: int | Sequence[int], mode: str = "bicubic") -> None:
        """Resize the bias table to a new window (see :func:`resize_relative_position_bias_table`)."""
        _set_window_size(self, window_size, mode)

    def relative_position_bias(self) -> torch.Tensor:
        """The bias ``(heads, N, N)``."""
        return _gather_bias(self.relative_position_bias_table, self.relative_position_index)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend within windows.

        Args:
            x: window tokens ``(B * nW, N, C)``, windows in :func:`window_partition` order.
            mask: additive mask ``(nW, N, N)`` (e.g. :func:`shifted_window_mask`) or ``None``.
            return_attention: also return the probabilities ``(B * nW, heads, N, N)`` (explicit path).

        Returns:
            ``(B * nW, N, C)``, or ``(output, probabilities)`` when ``return_attention``.
        """
        bw, n, _ = x.shape
        if n != self.window_area:
            raise ValueError(f"expected {self.window_area} tokens per window, got {n}")
        q, k, v = self._split_heads(x)  # (B*nW, h, N, d) each
        bias = self.relative_position_bias().to(q.dtype).unsqueeze(0)  # (1, h, N, N)
        if mask is not None:
            nw = mask.shape[0]
            if bw % nw:
                raise ValueError(f"{bw} windows is not a multiple of the mask's {nw} windows")
            bias = (bias.unsqueeze(1) + mask.to(q.dtype)[None, :, None]).reshape(-1, self.num_heads, n, n)
            bias = bias.repeat(bw // nw, 1, 1, 1) if bw != nw else bias  # (B*nW, h, N, N)
        attn = None
        if self.fused_attn and not return_attention:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B*nW, h, N, N)
            x = self.attn_drop(attn) @ v
        x = self._merge_heads(x)
        return (x, attn) if return_attention else x


class PatchMerging(nn.Module):
    """Merge 2x2 neighbouring tokens of an NHWC map: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim)``.

    Each output token concatenates its four inputs in timm's current layout, ``x.reshape(B, H/2, 2, W/2, 2, C)
    .permute(0, 1, 3, 4, 2, 5)``: column offset major, row offset minor, i.e. ``[x(0,0), x(1,0), x(0,1), x(1,1)]``
    (the original Swin order ``x0, x1, x2, x3``). Odd ``H`` / ``W`` are zero-padded at the bottom / right first.

    Args:
        dim: input channels ``C``.
        out_dim: output channels (``2 C`` if ``None``).
        norm_layer: normalisation class, called with its channel count.
        order: ``"v1"``: ``reduction(norm(x))`` with ``norm`` over ``4 C`` (Swin V1); ``"v2"``:
            ``norm(reduction(x))`` with ``norm`` over ``out_dim`` (Swin V2).
    """

    def __init__(
        self, dim: int, out_dim: int | None = None, norm_layer: LayerFactory = nn.LayerNorm, order: str = "v1"
    ) -> None:
        super().__init__()
        if order not in ("v1", "v2"):
            raise ValueError(f"order must be 'v1' or 'v2', got {order!r}")
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.order = order
        if order == "v1":
            self.norm = norm_layer(4 * dim)
            self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
        else:
            self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
            self.norm = norm_layer(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        if self.order == "v1":
            return self.reduction(self.norm(x))
        return self.norm(self.reduction(x))


def shifted_window_attention(
    x: torch.Tensor,
    attn: nn.Module,
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int] = 0,
    pad_first: bool = False,
) -> torch.Tensor:
    """(S)W-MSA on an NHWC map of any size, as a Swin block runs it.

    Two orders exist in the reference code and give different results when a map is not a multiple of the window:

    * ``pad_first=False`` (timm, the default): window and shift clamped to the map
      (:func:`window_and_shift_for_size`), cyclic shift, padding to the window, partition, attention with the
      shifted-window mask, reverse, crop and shift back.
    * ``pad_first=True`` (the official Swin segmentation / detection code, mmseg, HF ``SwinBackbone``): padding to a
      multiple of the window first, then the cyclic shift of the padded map; the window and shift are never
      clamped (a map smaller than the window is padded up to one window).

    Args:
        x: ``(B, H, W, C)`` map.
        attn: window attention taking ``(B * nW, N, C)`` tokens, an additive ``mask`` and the ``window_size`` used.
        window_size: the block's window.
        shift_size: the block's shift (0 for W-MSA).
        pad_first: pad before shifting, never clamp (mmseg's order).

    Returns:
        ``(B, H, W, C)``.
    """
    _, h, w, c = x.shape
    if pad_first:
        window, shift = to_2tuple(window_size, "window_size"), to_2tuple(shift_size, "shift_size")
        x, _ = pad_to_window(x, window)
    else:
        window, shift = window_and_shift_for_size((h, w), window_size, shift_size)
    has_shift = any(shift)
    if has_shift:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    if not pad_first:
        x, _ = pad_to_window(x, window)
    hp, wp = x.shape[1], x.shape[2]
    mask = shifted_window_mask(hp, wp, window, shift, device=x.device) if has_shift else None
    windows = window_partition(x, window).reshape(-1, window[0] * window[1], c)
    windows = attn(windows, mask=mask, window_size=window)
    x = window_reverse(windows.reshape(-1, window[0], window[1], c), window, hp, wp)
    if not pad_first:
        x = x[:, :h, :w]
    if has_shift:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :h, :w] if pad_first else x
