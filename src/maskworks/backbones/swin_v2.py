"""Swin Transformer V2 backbones (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022).

The V1 layout (:mod:`maskworks.backbones.swin`: 4x4 patch embedding, four stages, shifted windows every second block)
with V2's changes:

* scaled cosine attention: ``cos(q, k) * exp(min(logit_scale, log 100))`` per head instead of ``q k^T / sqrt(d)``;
* a continuous relative position bias: a small MLP (``cpb_mlp``: ``Linear(2, 512) -> ReLU -> Linear(512, heads)``)
  maps the log-spaced offsets of the window (``relative_coords_table``: each offset divided by ``M - 1``, or by
  ``pretrained_window_size - 1`` when that is given, times 8, then ``sign(x) log2(|x| + 1) / log2(8)``) to
  ``16 sigmoid(.)`` per head;
* ``qkv`` without bias, plus ``q_bias`` and ``v_bias`` parameters (the key bias is a zero buffer);
* res-post-norm blocks: ``x + drop_path(norm1(attn(x)))`` then ``x + drop_path(norm2(mlp(x)))``;
* :class:`~maskworks.layers.window.PatchMerging` with ``order="v2"`` (reduction, then norm).

State-dict keys equal timm's ``swinv2_*`` keys (``patch_embed.proj / norm``, ``layers.N.downsample.reduction / norm``,
``layers.N.blocks.M.attn.logit_scale / q_bias / v_bias / qkv / proj / cpb_mlp.0 / cpb_mlp.2``, ``norm1 / mlp.fc1 /
mlp.fc2 / norm2``, ``norm``) without the classifier ``head.*``. ``k_bias``, ``relative_coords_table`` and
``relative_position_index`` are non-persistent buffers, as in timm.

Input size: any, as V1 (zero-padding to the patch, to the window and in the patch merging; the window clipped and
the shift dropped along axes no longer than the window). A clipped window computes its bias from the coordinates
table of that window, as timm's block built for that map size does, so the weights are the same at any size; for
the same reason a checkpoint trained with one window loads into a model with another (the MLP is shared).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.backbones.swin import SwinFeatures, SwinPatchEmbed
from maskworks.layers.vit_layers import DropPath, Mlp, to_2tuple
from maskworks.layers.window import (
    PatchMerging,
    relative_position_index,
    shifted_window_attention,
)
from maskworks.registry import register_model

__all__ = [
    "SwinTransformerV2",
    "SwinV2WindowAttention",
    "SwinTransformerV2Block",
    "SwinTransformerV2Stage",
    "log_spaced_coords_table",
    "swinv2_tiny_window8_256",
    "swinv2_tiny_window16_256",
    "swinv2_small_window8_256",
    "swinv2_small_window16_256",
    "swinv2_base_window8_256",
    "swinv2_base_window16_256",
    "swinv2_base_window12to16_192to256",
    "swinv2_base_window12to24_192to384",
]

_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)


def log_spaced_coords_table(
    window_size: int | Sequence[int],
    pretrained_window_size: int | Sequence[int] = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``(1, 2 M_h - 1, 2 M_w - 1, 2)`` log-spaced offsets ``(dy, dx)`` of a window (timm's
    ``relative_coords_table``).

    Each offset is divided by ``pretrained_window_size - 1`` when that is positive, else by ``M - 1`` (at least 1),
    scaled to ``[-8, 8]`` and mapped by ``sign(x) log2(|x| + 1) / log2(8)``.
    """
    mh, mw = to_2tuple(window_size, "window_size")
    ph, pw = to_2tuple(pretrained_window_size, "pretrained_window_size")
    dh = ph if ph > 0 else mh
    dw = pw if ph > 0 else mw
    ys = torch.arange(-(mh - 1), mh, device=device, dtype=torch.float32) / max(dh - 1, 1)
    xs = torch.arange(-(mw - 1), mw, device=device, dtype=torch.float32) / max(dw - 1, 1)
    table = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).unsqueeze(0) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


class SwinV2WindowAttention(nn.Module):
    """Window attention of Swin V2 (timm's ``swin_transformer_v2.WindowAttention``) on ``(B * nW, N, C)`` windows.

    ``softmax(cos(q, k) * exp(min(logit_scale, log 100)) + 16 sigmoid(cpb_mlp(table))[index] + mask) v``; the
    attention runs on windows of its own size or of a smaller one (given in ``forward``), whose table and index are
    computed at run time. ``fused_attn=True`` (default) uses ``F.scaled_dot_product_attention``.

    Args:
        dim: token dimension.
        num_heads: heads; must divide ``dim``.
        window_size: ``M`` or ``(M_h, M_w)``.
        qkv_bias: learn ``q_bias`` and ``v_bias`` (the key has none).
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
        pretrained_window_size: the window the weights were trained with (``0``: this one); it sets the
            normalisation of the coordinates table.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int] = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int | Sequence[int] = 0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = to_2tuple(window_size, "window_size")
        self.pretrained_window_size = to_2tuple(pretrained_window_size, "pretrained_window_size")
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer(
            "relative_coords_table",
            log_spaced_coords_table(self.window_size, self.pretrained_window_size),
            persistent=False,
        )
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.fused_attn = True

    def relative_position_bias(self, window_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The bias ``(heads, N, N)`` (``16 sigmoid(.)``) of the attention's window or of a smaller ``window_size``."""
        if window_size is None or tuple(window_size) == self.window_size:
            table, index = self.relative_coords_table, self.relative_position_index
        else:
            device = self.relative_coords_table.device
            table = log_spaced_coords_table(window_size, self.pretrained_window_size, device=device)
            index = relative_position_index(window_size, device=device)
        table = table.to(self.cpb_mlp[0].weight.dtype)
        n = index.shape[0]
        bias = self.cpb_mlp(table).reshape(-1, self.num_heads)[index.reshape(-1)].reshape(n, n, -1)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        window_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: window tokens ``(B * nW, N, C)``, windows in :func:`~maskworks.layers.window.window_partition` order.
            mask: additive mask ``(nW, N, N)`` or ``None``.
            window_size: the windows' size when smaller than the attention's (``None``: its own).
        """
        window = self.window_size if window_size is None else to_2tuple(window_size, "window_size")
        if window[0] > self.window_size[0] or window[1] > self.window_size[1]:
            raise ValueError(f"window {window} is larger than the attention's window {self.window_size}")
        bw, n, c = x.shape
        if n != window[0] * window[1]:
            raise ValueError(f"expected {window[0] * window[1]} tokens per window, got {n}")
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B*nW, h, N, d)
        logit_scale = torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()
        q = F.normalize(q, dim=-1) * logit_scale
        k = F.normalize(k, dim=-1)
        attn_bias = self.relative_position_bias(window).to(q.dtype).unsqueeze(0)  # (1, h, N, N)
        if mask is not None:
            nw = mask.shape[0]
            if bw % nw:
                raise ValueError(f"{bw} windows is not a multiple of the mask's {nw} windows")
            attn_bias = (attn_bias.unsqueeze(1) + mask.to(q.dtype)[None, :, None]).reshape(-1, self.num_heads, n, n)
            attn_bias = attn_bias.repeat(bw // nw, 1, 1, 1) if bw != nw else attn_bias
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.0, scale=1.0
            )
        else:
            attn = (q @ k.transpose(-2, -1) + attn_bias).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))


class SwinTransformerV2Block(nn.Module):
    """Res-post-norm block on ``(B, H, W, C)`` maps: ``x + drop_path(norm1(attn(x)))`` then
    ``x + drop_path(norm2(mlp(x)))``.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window ``M`` (clipped per axis to smaller maps at run time).
        shift_size: cyclic shift (``0``: W-MSA; ``M // 2``: SW-MSA); dropped along axes no longer than the window.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: learn ``q_bias`` / ``v_bias``.
        proj_drop: dropout after the projections and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic-depth probability of both residual branches.
        pretrained_window_size: see :class:`SwinV2WindowAttention`.
    """

    pad_first = False  # mmseg's window order; set by the backbone's window_padding="mmseg"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int] = 8,
        shift_size: int | Sequence[int] = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pretrained_window_size: int | Sequence[int] = 0,
    ) -> None:
        super().__init__()
        self.window_size = to_2tuple(window_size, "window_size")
        self.shift_size = to_2tuple(shift_size, "shift_size")
        if not all(0 <= s < m for s, m in zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift_size {self.shift_size} must lie in [0, window_size {self.window_size})")
        self.attn = SwinV2WindowAttention(
            dim,
            num_heads,
            self.window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            pretrained_window_size=pretrained_window_size,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_window_attention(x, self.attn, self.window_size, self.shift_size, self.pad_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class SwinTransformerV2Stage(nn.Module):
    """Optional :class:`~maskworks.layers.window.PatchMerging` (``order="v2"``, as ``downsample``), then ``depth``
    blocks alternating W-MSA and SW-MSA (shift ``window // 2``)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        drop_path_rates: Sequence[float],
        pretrained_window_size: int = 0,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, order="v2") if downsample else nn.Identity()
        window = to_2tuple(window_size, "window_size")
        half = (window[0] // 2, window[1] // 2)
        self.blocks = nn.Sequential(
            *(
                SwinTransformerV2Block(
                    out_dim,
                    num_heads,
                    window,
                    shift_size=(0, 0) if i % 2 == 0 else half,
                    drop_path=drop_path_rates[i],
                    pretrained_window_size=pretrained_window_size,
                    **block_kwargs,
                )
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwinTransformerV2(SwinFeatures):
    """Swin Transformer V2 feature extractor (no classifier) returning the outputs of the four stages.

    Args:
        embed_dim: channels of the first stage (doubled by every later stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window.
        in_channels: channels of the input image.
        patch_size: patch-embedding stride.
        mlp_ratio: MLP hidden width over the block width.
        qkv_bias: learn ``q_bias`` / ``v_bias``.
        drop_rate: dropout after projections and in the MLPs.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all blocks.
        pretrained_window_sizes: per stage, the window the weights were trained with (``0``: the model's own);
            it sets the normalisation of the position-bias coordinates.
        out_norms: add one LayerNorm per stage map (``stage_norms``), applied by ``forward_intermediates``
            (HF ``Swinv2Backbone``'s ``hidden_states_norms``). Off by default, as in timm.
        window_padding: ``"timm"`` (default: shift, then pad; windows clipped to small maps) or ``"mmseg"``
            (pad, then shift; windows never clipped), see :func:`~maskworks.layers.window.shifted_window_attention`.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 8,
        in_channels: int = 3,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
        out_norms: bool = False,
        window_padding: str = "timm",
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        pretrained_window_sizes = tuple(pretrained_window_sizes)
        if len(depths) != len(num_heads) or not depths or len(pretrained_window_sizes) != len(depths):
            raise ValueError(
                "depths, num_heads and pretrained_window_sizes must have one entry per stage, got "
                f"{depths!r}, {num_heads!r}, {pretrained_window_sizes!r}"
            )
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.in_channels = in_channels
        self.patch_embed = SwinPatchEmbed(in_channels, embed_dim, patch_size)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).split(depths)
        block_kwargs = {
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "proj_drop": drop_rate,
            "attn_drop": attn_drop_rate,
        }
        layers, prev, reduction = [], embed_dim, patch_size
        self.feature_info = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**i
            reduction *= 1 if i == 0 else 2
            layers.append(
                SwinTransformerV2Stage(
                    prev,
                    dim,
                    depth,
                    heads,
                    window_size,
                    i > 0,
                    rates[i].tolist(),
                    pretrained_window_size=pretrained_window_sizes[i],
                    **block_kwargs,
                )
            )
            self.feature_info.append({"num_chs": dim, "reduction": reduction, "module": f"layers.{i}"})
            prev = dim
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(prev)
        self._build_stage_norms(out_norms)
        self._set_window_padding(window_padding)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's initialisation: truncated normal std 0.02 for linear layers, zero biases, and zero res-post-norms
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SwinTransformerV2Block):
                for norm in (m.norm1, m.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)


_TINY = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}
_SMALL = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)}
_BASE = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}


def _swinv2(arch: dict, window_size: int, in_channels: int, drop_path_rate: float, **kwargs) -> SwinTransformerV2:
    return SwinTransformerV2(
        **arch, window_size=window_size, in_channels=in_channels, drop_path_rate=drop_path_rate, **kwargs
    )


@register_model(kind="backbone")
def swinv2_tiny_window8_256(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-T backbone (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 8)."""
    return _swinv2(_TINY, 8, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swinv2_tiny_window16_256(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-T backbone (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 16)."""
    return _swinv2(_TINY, 16, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swinv2_small_window8_256(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-S backbone (embed 96, depths 2-2-18-2, heads 3-6-12-24, window 8)."""
    return _swinv2(_SMALL, 8, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swinv2_small_window16_256(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-S backbone (embed 96, depths 2-2-18-2, heads 3-6-12-24, window 16)."""
    return _swinv2(_SMALL, 16, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swinv2_base_window8_256(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-B backbone (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 8)."""
    return _swinv2(_BASE, 8, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swinv2_base_window16_256(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-B backbone (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 16)."""
    return _swinv2(_BASE, 16, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swinv2_base_window12to16_192to256(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-B backbone, window 16, position bias normalised for windows 12-12-12-6 (pre-trained at 192)."""
    kwargs.setdefault("pretrained_window_sizes", (12, 12, 12, 6))
    return _swinv2(_BASE, 16, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swinv2_base_window12to24_192to384(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformerV2:
    """SwinV2-B backbone, window 24, position bias normalised for windows 12-12-12-6 (pre-trained at 192)."""
    kwargs.setdefault("pretrained_window_sizes", (12, 12, 12, 6))
    return _swinv2(_BASE, 24, in_channels, drop_path_rate, **kwargs)
