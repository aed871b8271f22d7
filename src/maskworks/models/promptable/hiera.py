"""Hiera image encoder of SAM 2 (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024) and its FPN
neck.

The trunk is the hierarchical ViT of Ryali et al. ("Hiera: A Hierarchical Vision Transformer without the
Bells-and-Whistles", ICML 2023) in the "HieraDet" form SAM 2 uses:

* :class:`HieraPatchEmbed`: a 7x7 stride-4 convolution (padding 3) to a channels-last ``(B, H/4, W/4, C)`` map.
* Windowed absolute position embedding (Bolya et al., "Window Attention is Bugged", WACV 2024): a "background"
  table (``pos_embed``, e.g. 7x7) resized bicubically to the token grid, plus one window-sized table
  (``pos_embed_window``, the first stage's window) tiled over the grid.
* :class:`MultiScaleBlock`: pre-norm attention + MLP blocks on channels-last maps. Blocks attend inside
  non-overlapping windows (the "mask units", zero-padded at the bottom / right), except the few global-attention
  blocks (``global_att_blocks``) that attend over the whole map. The first block of stages 2..``q_pool + 1``
  halves the resolution by max-pooling its *queries* (2x2, stride 2) inside each window and doubles the width;
  its shortcut is the normed input projected to the new width and pooled the same way. The window size lags by a
  block: the first block of a stage uses the previous stage's window (before pooling).
* :class:`FpnNeck`: a 1x1 conv per stage to ``d_model`` channels; the top-down path (nearest 2x upsampling,
  summed) only feeds the levels in ``fpn_top_down_levels`` (the two coarsest), so the two finest levels are the
  lateral convs alone.
* :class:`Sam2ImageEncoder`: trunk + neck, dropping the ``scalp`` coarsest levels (SAM 2 keeps the 1/4, 1/8 and
  1/16 maps; the 1/16 map is the image embedding, the other two are the high-resolution features of the mask
  decoder).

Inputs of any size work (the reference code needs token grids that are multiples of the first window): the
window table is tiled past the grid and cropped, and windows of pooled blocks are reassembled from the padded map.

The neck's sine position encoding only feeds SAM 2's memory attention (video mode); image mode uses the prompt
encoder's dense random-feature encoding instead, so it is not computed here.

Parameter names follow the official ``sam2`` modules (``trunk.blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 /
proj``, ``neck.convs.{i}``), except that the block MLPs reuse :class:`maskworks.layers.Mlp` (``fc1`` / ``fc2``)
and the neck convs are plain ``nn.Conv2d`` (no ``.conv`` wrapper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers import DropPath, Mlp
from maskworks.layers.window import pad_to_window, window_partition, window_reverse

__all__ = [
    "FpnNeck",
    "Hiera",
    "HieraPatchEmbed",
    "MultiScaleAttention",
    "MultiScaleBlock",
    "Sam2ImageEncoder",
]


def _pool_nhwc(x: torch.Tensor, stride: tuple[int, int] | None) -> torch.Tensor:
    """Max-pool a channels-last map ``(B, H, W, C)`` with kernel = stride (floor of odd sizes); ``None``: as is."""
    if stride is None:
        return x
    x = F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride)  # (B, C, H / s, W / s)
    return x.permute(0, 2, 3, 1)  # (B, H / s, W / s, C)


class HieraPatchEmbed(nn.Module):
    """Overlapping patch embedding: ``Conv2d(in_chans, embed_dim, 7, stride 4, padding 3)`` to channels-last.

    Args:
        in_chans: input channels.
        embed_dim: output channels.
        kernel_size: convolution kernel.
        stride: convolution stride (the token grid is ``1 / stride`` of the image).
        padding: convolution padding.
    """

    def __init__(
        self, in_chans: int = 3, embed_dim: int = 96, kernel_size: int = 7, stride: int = 4, padding: int = 3
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, C, H', W') -> (B, H', W', C)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention on a channels-last map, optionally pooling the queries.

    With ``q_stride`` the queries are max-pooled over the map (a window, or the whole map for global attention)
    before attending to all keys, so the output map is ``q_stride`` times smaller.

    Args:
        dim: input width.
        dim_out: width of the queries, keys, values and output.
        num_heads: attention heads.
        q_stride: query pooling stride ``(s_h, s_w)``, or ``None``.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: tuple[int, int] | None = None) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim_out={dim_out}")
        self.dim, self.dim_out, self.num_heads = dim, dim_out, num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, dim)`` -> ``(B, H', W', dim_out)`` (``H' = H / s_h`` with query pooling)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)  # (B, HW, 3, heads, d)
        q, k, v = qkv.unbind(2)  # (B, HW, heads, d) each
        if self.q_stride is not None:
            q = _pool_nhwc(q.reshape(b, h, w, -1), self.q_stride)  # (B, H', W', heads * d)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)  # (B, H'W', heads, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, h, w, -1)  # (B, heads, H'W', d) -> (B, H', W', dim_out)
        return self.proj(out)


class MultiScaleBlock(nn.Module):
    """Hiera block: ``x = shortcut + attn(norm1(x))``, ``x = x + mlp(norm2(x))``, windowed or global.

    Args:
        dim: input width.
        dim_out: output width (a stage transition doubles it; the shortcut is then ``proj(norm1(x))``).
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim_out``.
        drop_path: stochastic depth of both branches.
        q_stride: query pooling stride of a stage transition, or ``None``.
        window_size: attention window (before pooling); 0 for global attention.
        norm_layer: channels-last normalisation class.
        act_layer: MLP activation class.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if q_stride is not None and window_size > 0 and any(window_size % s for s in q_stride):
            raise ValueError(f"window_size={window_size} must be a multiple of the query stride {q_stride}")
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = norm_layer(dim)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), act_layer=act_layer)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, dim)`` -> ``(B, H', W', dim_out)``."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
        shortcut = _pool_nhwc(shortcut, self.q_stride)  # (B, H', W', dim_out)
        window = self.window_size
        if window > 0:
            x, _ = pad_to_window(x, window)
            hp, wp = x.shape[1:3]
            x = window_partition(x, window)  # (B * nW, window, window, dim)
        x = self.attn(x)
        if window > 0:
            wh = ww = window
            if self.q_stride is not None:  # the windows were pooled with the queries
                sh, sw = self.q_stride
                wh, ww, hp, wp = window // sh, window // sw, hp // sh, wp // sw
            h, w = shortcut.shape[1:3]
            x = window_reverse(x, (wh, ww), hp, wp)[:, :h, :w]  # (B, H', W', dim_out)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Hiera(nn.Module):
    """The HieraDet trunk of SAM 2: four stages of :class:`MultiScaleBlock` s at strides 4, 8, 16 and 32.

    Args:
        embed_dim: width of the first stage (multiplied by ``dim_mul`` at each stage transition).
        num_heads: heads of the first stage (multiplied by ``head_mul`` at each stage transition).
        stages: blocks per stage.
        global_att_blocks: indices (over all blocks) of the global-attention blocks.
        window_spec: attention window per stage.
        window_pos_embed_bkg_spatial_size: size ``(h, w)`` of the background position table.
        q_pool: number of stage transitions that pool the queries (the first ``q_pool``).
        q_stride: query pooling stride.
        dim_mul: width multiplier at a stage transition.
        head_mul: heads multiplier at a stage transition.
        mlp_ratio: MLP hidden width over the block width.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        in_chans: input channels.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"stages {tuple(stages)} and window_spec {tuple(window_spec)} differ in length")
        if not 0 <= q_pool < len(stages):
            raise ValueError(f"q_pool must lie in [0, {len(stages) - 1}], got {q_pool}")
        self.stages = tuple(stages)
        self.window_spec = tuple(window_spec)
        self.global_att_blocks = tuple(global_att_blocks)
        self.q_stride = tuple(q_stride)
        depth = sum(stages)
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.patch_embed = HieraPatchEmbed(in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear from 0
        self.blocks = nn.ModuleList()
        stage, dim = 0, embed_dim
        for i in range(depth):
            window = 0 if i in self.global_att_blocks else self.window_spec[stage]  # lags a block behind
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out, num_heads, stage = int(dim * dim_mul), int(num_heads * head_mul), stage + 1
            self.blocks.append(
                MultiScaleBlock(
                    dim,
                    dim_out,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    drop_path=dpr[i],
                    q_stride=self.q_stride if i in q_pool_blocks else None,
                    window_size=window,
                )
            )
            dim = dim_out
        self.channel_list = [self.blocks[i].dim_out for i in self.stage_ends]  # fine to coarse
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _get_pos_embed(self, size: tuple[int, int]) -> torch.Tensor:
        """Background table resized to ``size`` plus the tiled window table: ``(1, h, w, C)``."""
        h, w = size
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")  # (1, C, h, w)
        wh, ww = self.pos_embed_window.shape[-2:]
        tiles = (1, 1, -(-h // wh), -(-w // ww))
        pos = pos + self.pos_embed_window.tile(tiles)[..., :h, :w]
        return pos.permute(0, 2, 3, 1)  # (1, h, w, C)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(B, 3, H, W)`` -> the output of every stage, ``(B, C_i, H / 2^(i+2), W / 2^(i+2))``."""
        x = self.patch_embed(x)  # (B, H / 4, W / 4, C)
        x = x + self._get_pos_embed(x.shape[1:3])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))  # (B, C_i, H_i, W_i)
        return outputs


class FpnNeck(nn.Module):
    """SAM 2's feature pyramid: lateral 1x1 convs to ``d_model``, a top-down path into ``fpn_top_down_levels``.

    Args:
        d_model: output channels.
        backbone_channel_list: channels of the trunk's levels, coarsest first (``convs[0]`` maps the coarsest).
        fpn_top_down_levels: levels (0 = finest) that add the upsampled coarser level; the others, and the
            coarsest, are the lateral conv alone.
        fpn_interp_model: ``F.interpolate`` mode of the top-down upsampling.
        fuse_type: ``"sum"`` or ``"avg"`` of the lateral and top-down features.
        kernel_size: lateral conv kernel.
    """

    def __init__(
        self,
        d_model: int,
        backbone_channel_list: Sequence[int],
        fpn_top_down_levels: Sequence[int] | None = None,
        fpn_interp_model: str = "nearest",
        fuse_type: str = "sum",
        kernel_size: int = 1,
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.d_model = d_model
        self.convs = nn.ModuleList(
            nn.Conv2d(c, d_model, kernel_size=kernel_size, padding=kernel_size // 2) for c in backbone_channel_list
        )
        n = len(backbone_channel_list)
        self.fpn_top_down_levels = tuple(range(n) if fpn_top_down_levels is None else fpn_top_down_levels)
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Trunk levels fine to coarse ``(B, C_i, H_i, W_i)`` -> ``d_model``-channel levels, fine to coarse."""
        n = len(self.convs) - 1
        out: list[torch.Tensor] = [xs[0]] * (n + 1)
        prev = None
        for i in range(n, -1, -1):  # coarse to fine
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                top_down = F.interpolate(prev.float(), size=lateral.shape[-2:], mode=self.fpn_interp_model)
                prev = lateral + top_down.to(lateral.dtype)
                if self.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
        return out


class Sam2ImageEncoder(nn.Module):
    """Trunk + FPN neck, dropping the ``scalp`` coarsest levels.

    Args:
        trunk: a :class:`Hiera`.
        neck: an :class:`FpnNeck` over the trunk's levels.
        scalp: number of coarsest levels to drop (1 in SAM 2).
    """

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp
        if list(trunk.channel_list[::-1]) != [c.in_channels for c in neck.convs]:
            raise ValueError(
                f"neck expects channels {[c.in_channels for c in neck.convs]} (coarsest first), the trunk gives "
                f"{trunk.channel_list[::-1]}"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(B, 3, H, W)`` -> FPN levels fine to coarse ``(B, d_model, H / 4 / 2^i, W / 4 / 2^i)``."""
        features = self.neck(self.trunk(x))
        return features[: len(features) - self.scalp] if self.scalp > 0 else features
