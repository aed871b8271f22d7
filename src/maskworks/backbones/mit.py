"""Mix Transformer (MiT) backbones, the SegFormer encoder (Xie et al., "SegFormer: Simple and Efficient Design for
Semantic Segmentation with Transformers", NeurIPS 2021).

Four stages; each starts with an *overlapping* patch embedding (a strided conv whose kernel overlaps its
neighbours, then LayerNorm): 7x7 stride 4 padding 3 for the first stage, 3x3 stride 2 padding 1 for the others.
A block is pre-norm ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (stochastic depth on both branches):

* efficient self-attention (:class:`EfficientSelfAttention`): queries from every token; keys and values from the
  token grid reduced by a ``Conv2d(C, C, r, stride=r)`` + LayerNorm, with reduction ratios ``r`` = 8, 4, 2, 1 per
  stage (``r = 1``: plain multi-head attention, no ``sr`` / ``norm``);
* Mix-FFN (:class:`MixFFN`): ``fc1`` (``C -> 4C``) -> 3x3 depthwise conv (with bias) on the token grid -> GELU ->
  ``fc2``; the depthwise conv supplies the positional information (there is no position embedding).

Each stage ends with its own LayerNorm (``stages.N.norm``) and its map is returned NCHW: strides 4, 8, 16, 32.

State-dict keys: ``stages.N.patch_embed.proj / norm``, ``stages.N.blocks.M.norm1 / attn.q / attn.k / attn.v /
attn.sr / attn.norm / attn.proj / norm2 / mlp.fc1 / mlp.dwconv / mlp.fc2``, ``stages.N.norm``. Queries, keys and
values are separate linear layers as in Hugging Face ``SegformerModel`` (the NVlabs / smp checkpoints' fused
``attn.kv`` is split by :mod:`maskworks.convert.segformer`, keys first).

Input size: any. As in Hugging Face (no padding), each patch embedding gives ``ceil(H / 4)``, then ``ceil(h / 2)``
per stage, and the reduction conv floors (``floor(h / r)``), so the outputs equal HF's at every size HF accepts;
where HF fails (a map side smaller than ``r``, inputs under ~29 px) that map is zero-padded at the bottom / right
to ``r`` before the reduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.vit_layers import DropPath
from maskworks.registry import register_model

__all__ = [
    "MixTransformer",
    "MixTransformerBlock",
    "EfficientSelfAttention",
    "MixFFN",
    "OverlapPatchEmbed",
    "MIT_CONFIGS",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
]

# variant -> (embed dims, depths); all variants: heads 1-2-5-8, reduction ratios 8-4-2-1, MLP ratio 4
MIT_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
_EPS = (
    1e-5  # LayerNorm eps of the blocks and stage norms in HF; NVlabs / mmseg / smp use 1e-6 there (see MixTransformer)
)


class OverlapPatchEmbed(nn.Module):
    """``Conv2d(k, stride, padding=k // 2)`` then LayerNorm over channels; NCHW in, tokens ``(B, h*w, C)`` out."""

    def __init__(self, in_chs: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chs, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5 in NVlabs, smp and HF alike

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w  # (B, h*w, C)


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys / values come from the token grid reduced ``sr_ratio`` times.

    ``sr`` is a ``Conv2d(C, C, r, stride=r)`` without padding (``floor(h / r)``, as HF and NVlabs), followed by
    ``norm``; ``q`` / ``k`` / ``v`` / ``proj`` are ``Linear(C, C)`` with bias. Softmax attention runs through
    ``F.scaled_dot_product_attention`` (``fused_attn = False``: the explicit softmax).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5 in NVlabs, smp and HF alike
        else:
            self.sr = None
            self.norm = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)
        kv = x
        if self.sr is not None:
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            r = self.sr_ratio
            if h < r or w < r:  # HF fails here (an empty grid); pad the map up to one reduction window
                grid = F.pad(grid, (0, max(r - w, 0), 0, max(r - h, 0)))
            kv = self.norm(self.sr(grid).flatten(2).transpose(1, 2))  # (B, N', C)
        nk = kv.shape[1]
        k = self.k(kv).view(b, nk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(kv).view(b, nk, self.num_heads, self.head_dim).transpose(1, 2)
        drop = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = F.dropout(attn, drop, self.training) @ v
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class MixFFN(nn.Module):
    """``fc1 -> 3x3 depthwise conv (on the h x w grid) -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class MixTransformerBlock(nn.Module):
    """``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        eps: float = _EPS,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformerStage(nn.Module):
    """Overlapping patch embedding, blocks, LayerNorm; NCHW in and out."""

    def __init__(
        self,
        in_chs: int,
        dim: int,
        patch_size: int,
        stride: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        drop_path_rates: Sequence[float],
        eps: float,
    ) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chs, dim, patch_size, stride)
        self.blocks = nn.ModuleList(
            MixTransformerBlock(dim, num_heads, sr_ratio, mlp_ratio, p, eps) for p in drop_path_rates
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, h, w)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous()  # (B, C, h, w)


class MixTransformer(nn.Module):
    """MiT feature extractor (no classifier) returning the four stage maps, NCHW.

    Args:
        embed_dims: channels per stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        sr_ratios: key / value spatial reduction per stage.
        in_channels: channels of the input image.
        mlp_ratio: Mix-FFN hidden width over the block width.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all blocks (NVlabs /
            HF: ``linspace(0, rate, sum(depths))``).
        patch_sizes: kernel of each overlapping patch embedding.
        strides: stride of each overlapping patch embedding.
        eps: eps of the blocks' ``norm1`` / ``norm2`` and the stage norms: ``1e-5`` as HF's ``Segformer*`` (whose
            ``config.layer_norm_eps`` is unused); the NVlabs code, mmseg and smp use ``1e-6`` there (pass it for
            bit-closer parity with those). The patch-embedding and key / value norms use ``1e-5`` everywhere.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        in_channels: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        eps: float = _EPS,
    ) -> None:
        super().__init__()
        embed_dims, depths, num_heads = tuple(embed_dims), tuple(depths), tuple(num_heads)
        sr_ratios, patch_sizes, strides = tuple(sr_ratios), tuple(patch_sizes), tuple(strides)
        n = len(embed_dims)
        if not all(len(s) == n for s in (depths, num_heads, sr_ratios, patch_sizes, strides)) or n < 1:
            raise ValueError(
                "embed_dims, depths, num_heads, sr_ratios, patch_sizes and strides must have the same length, got "
                f"{embed_dims}, {depths}, {num_heads}, {sr_ratios}, {patch_sizes}, {strides}"
            )
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.in_channels = in_channels
        total = sum(depths)
        flat = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        starts = [sum(depths[:i]) for i in range(n)]
        stages, prev, reduction = [], in_channels, 1
        self.feature_info = []
        for i in range(n):
            stages.append(
                MixTransformerStage(
                    prev, embed_dims[i], patch_sizes[i], strides[i], num_heads[i], sr_ratios[i], mlp_ratio,
                    flat[starts[i] : starts[i] + depths[i]], eps,
                )
            )  # fmt: skip
            reduction *= strides[i]
            self.feature_info.append({"num_chs": embed_dims[i], "reduction": reduction, "module": f"stages.{i}"})
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self._init_weights()

    def _init_weights(self) -> None:
        # NVlabs' initialisation: truncated normal std 0.02 linear layers, zero biases; LayerNorm 1 / 0; convs
        # normal(0, sqrt(2 / fan_out)) with fan_out = k * k * out / groups, zero biases
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Input channels followed by the channels of the four maps."""
        return (self.in_channels, *(info["num_chs"] for info in self.feature_info))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of ``stages.0`` .. ``stages.3`` (after each stage's LayerNorm).

        Args:
            x: images ``(B, in_channels, H, W)``, any size.

        Returns:
            Four maps ``(B, C_i, h_i, w_i)`` with ``h_1 = ceil(H / 4)`` and ``h_{i+1} = ceil(h_i / 2)``
            (reductions 4, 8, 16, 32 in ``feature_info``).
        """
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, embed_dims[-1], ~H / 32, ~W / 32)``."""
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x)


def _mit(variant: str, in_channels: int, drop_path_rate: float, **kwargs) -> MixTransformer:
    dims, depths = MIT_CONFIGS[variant]
    return MixTransformer(dims, depths, in_channels=in_channels, drop_path_rate=drop_path_rate, **kwargs)


@register_model(kind="backbone")
def mit_b0(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> MixTransformer:
    """MiT-B0 backbone (dims 32-64-160-256, depths 2-2-2-2; 3.3M parameters)."""
    return _mit("mit_b0", in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def mit_b1(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> MixTransformer:
    """MiT-B1 backbone (dims 64-128-320-512, depths 2-2-2-2)."""
    return _mit("mit_b1", in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def mit_b2(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> MixTransformer:
    """MiT-B2 backbone (dims 64-128-320-512, depths 3-4-6-3)."""
    return _mit("mit_b2", in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def mit_b3(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> MixTransformer:
    """MiT-B3 backbone (dims 64-128-320-512, depths 3-4-18-3)."""
    return _mit("mit_b3", in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def mit_b4(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> MixTransformer:
    """MiT-B4 backbone (dims 64-128-320-512, depths 3-8-27-3)."""
    return _mit("mit_b4", in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def mit_b5(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> MixTransformer:
    """MiT-B5 backbone (dims 64-128-320-512, depths 3-6-40-3)."""
    return _mit("mit_b5", in_channels, drop_path_rate, **kwargs)
