"""Swin Transformer V1 backbones (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021).

A 4x4 stride-4 patch embedding (conv + LayerNorm), then four stages; each stage but the first starts with a
:class:`~maskworks.layers.window.PatchMerging` (``order="v1"``) that halves the map and doubles the channels. A block
is ``x + attn(norm1(x))`` with window attention (W-MSA), then ``x + mlp(norm2(x))``; every second block shifts the
windows by half a window (SW-MSA, a cyclic ``torch.roll`` plus the additive mask of
:func:`~maskworks.layers.window.shifted_window_mask`).

State-dict keys equal timm's ``swin_*`` keys (``patch_embed.proj / norm``, ``layers.N.downsample.norm / reduction``,
``layers.N.blocks.M.norm1 / attn.qkv / attn.proj / attn.relative_position_bias_table / norm2 / mlp.fc1 / mlp.fc2``,
``norm``) without the classifier ``head.*``; ``relative_position_index`` is a non-persistent buffer, as in timm.

Input size: any. Like timm's ``PatchEmbed(dynamic_img_pad=True)``, an input whose sides are not multiples of 4 is
zero-padded at the bottom / right before the patch embedding (so the first map is ``ceil(H / 4) x ceil(W / 4)``);
each ``PatchMerging`` pads odd maps (``ceil`` per stage). Every block works out its window and shift from the map it
gets (timm's ``_calc_window_shift`` without ``always_partition``): along an axis no longer than the window the window
is clipped to the axis and the shift dropped. Then, as timm does, the map is rolled, zero-padded at the bottom / right
to a multiple of the window, attended and cropped; the shift mask is built for the padded size at run time. A
clipped window uses the centre of the bias table (the offsets it can hold), so the weights are the same at any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.vit_layers import DropPath, Mlp, to_2tuple
from maskworks.layers.window import (
    PatchMerging,
    WindowAttention,
    shifted_window_attention,
)
from maskworks.registry import register_model

__all__ = [
    "SwinTransformer",
    "SwinTransformerBlock",
    "SwinTransformerStage",
    "SwinPatchEmbed",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "swin_base_patch4_window12_384",
    "swin_large_patch4_window7_224",
    "swin_large_patch4_window12_384",
]


def _sub_window_index(full: tuple[int, int], window: tuple[int, int], device) -> torch.Tensor:
    """``(N, N)`` index into the bias table of a ``full`` window for the token pairs of a smaller ``window``."""
    (fh, fw), (mh, mw) = full, window
    ys, xs = torch.meshgrid(
        torch.arange(mh, device=device, dtype=torch.long),
        torch.arange(mw, device=device, dtype=torch.long),
        indexing="ij",
    )
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (fh - 1)
    dx = xs[:, None] - xs[None, :] + (fw - 1)
    return dy * (2 * fw - 1) + dx


class SwinWindowAttention(WindowAttention):
    """:class:`~maskworks.layers.window.WindowAttention` that also runs on windows smaller than its own (a map
    smaller than the window): the bias of such a window is read from the centre of the table."""

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_attention: bool = False,
        window_size: tuple[int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if window_size is None or tuple(window_size) == self.window_size:
            return super().forward(x, mask=mask, return_attention=return_attention)
        window_size = to_2tuple(window_size, "window_size")
        if window_size[0] > self.window_size[0] or window_size[1] > self.window_size[1]:
            raise ValueError(f"window {window_size} is larger than the attention's window {self.window_size}")
        bw, n, _ = x.shape
        if n != window_size[0] * window_size[1]:
            raise ValueError(f"expected {window_size[0] * window_size[1]} tokens per window, got {n}")
        index = _sub_window_index(self.window_size, window_size, x.device)
        q, k, v = self._split_heads(x)  # (B*nW, h, N, d) each
        bias = self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        bias = bias.to(q.dtype).unsqueeze(0)  # (1, h, N, N)
        if mask is not None:
            nw = mask.shape[0]
            if bw % nw:
                raise ValueError(f"{bw} windows is not a multiple of the mask's {nw} windows")
            bias = (bias.unsqueeze(1) + mask.to(q.dtype)[None, :, None]).reshape(-1, self.num_heads, n, n)
            bias = bias.repeat(bw // nw, 1, 1, 1) if bw != nw else bias
        attn = None
        if self.fused_attn and not return_attention:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = self._merge_heads(x)
        return (x, attn) if return_attention else x


class SwinTransformerBlock(nn.Module):
    """``x + drop_path(attn(norm1(x)))`` then ``x + drop_path(mlp(norm2(x)))`` on ``(B, H, W, C)`` maps.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window ``M`` (clipped per axis to smaller maps at run time).
        shift_size: cyclic shift (``0``: W-MSA; ``M // 2``: SW-MSA); dropped along axes no longer than the window.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: bias of the ``qkv`` projection.
        proj_drop: dropout after the projections and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic-depth probability of both residual branches.
    """

    pad_first = False  # mmseg's window order; set by the backbone's window_padding="mmseg"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int] = 7,
        shift_size: int | Sequence[int] = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = to_2tuple(window_size, "window_size")
        self.shift_size = to_2tuple(shift_size, "shift_size")
        if not all(0 <= s < m for s, m in zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift_size {self.shift_size} must lie in [0, window_size {self.window_size})")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinWindowAttention(
            dim, num_heads, self.window_size, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_window_attention(x, self.attn, self.window_size, self.shift_size, self.pad_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinTransformerStage(nn.Module):
    """Optional :class:`~maskworks.layers.window.PatchMerging` (``downsample``), then ``depth`` blocks alternating
    W-MSA and SW-MSA (shift ``window // 2``)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        drop_path_rates: Sequence[float],
        shift: bool = True,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, order="v1") if downsample else nn.Identity()
        window = to_2tuple(window_size, "window_size")
        half = (window[0] // 2, window[1] // 2) if shift else (0, 0)
        self.blocks = nn.Sequential(
            *(
                SwinTransformerBlock(
                    out_dim,
                    num_heads,
                    window,
                    shift_size=(0, 0) if i % 2 == 0 else half,
                    drop_path=drop_path_rates[i],
                    **block_kwargs,
                )
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwinPatchEmbed(nn.Module):
    """``patch x patch`` stride-``patch`` conv then LayerNorm, returning NHWC; sides not divisible by ``patch`` are
    zero-padded at the bottom / right first (timm's ``PatchEmbed(dynamic_img_pad=True, output_fmt="NHWC")``)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinFeatures(nn.Module):
    """The feature-extractor interface shared by Swin V1 and V2: ``patch_embed`` -> ``layers`` (NHWC stages) ->
    NCHW maps, with the final ``norm`` sized for the last stage and, when built with ``out_norms=True``, one
    LayerNorm per stage map (``stage_norms``, as mmseg's ``norm0..3`` and HF ``SwinBackbone``'s
    ``hidden_states_norms``)."""

    stage_norms: nn.ModuleList | None

    def _build_stage_norms(self, out_norms: bool) -> None:
        dims = [info["num_chs"] for info in self.feature_info]
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims) if out_norms else None

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Input channels followed by the channels of the four maps."""
        return (self.in_channels, *(info["num_chs"] for info in self.feature_info))

    def no_weight_decay(self) -> set[str]:
        """Parameter name patterns without weight decay (timm's and mmseg's Swin recipes): the relative position
        bias tables (V1) and, for V2, the continuous position-bias MLPs and the attention logit scales."""
        return {"*relative_position_bias_table", "*cpb_mlp.*", "*logit_scale"}

    def _set_window_padding(self, window_padding: str) -> None:
        if window_padding not in ("timm", "mmseg"):
            raise ValueError(f"window_padding must be 'timm' or 'mmseg', got {window_padding!r}")
        self.window_padding = window_padding
        for stage in self.layers:
            for block in stage.blocks:
                block.pad_first = window_padding == "mmseg"

    def prune_final_norm(self) -> None:
        """Replace the final ``norm`` (used by :meth:`forward_features` only) with an identity, as timm does for
        ``features_only`` models, so a dense model that reads the stage maps has no parameter without a gradient.
        A checkpoint's ``norm.*`` tensors are then reported as unexpected when it is loaded."""
        self.norm = nn.Identity()

    def forward_intermediates(self, x: torch.Tensor, norm: bool = False) -> list[torch.Tensor]:
        """The outputs of ``layers.0`` .. ``layers.3`` as NCHW maps.

        As timm's ``forward_intermediates``: by default no norm is applied to any map; ``norm=True`` applies the
        final ``norm`` to the last one (it is sized for the last stage only). A model built with ``out_norms=True``
        applies ``stage_norms[i]`` to map ``i`` instead (and ``norm`` is not used).

        Args:
            x: images ``(B, in_channels, H, W)``.
            norm: apply the final ``norm`` to the last map (ignored with ``out_norms``).

        Returns:
            Four maps ``(B, C_i, ceil(H / r_i), ceil(W / r_i))`` (ceil per halving) with ``C_i, r_i`` as in
            ``feature_info`` (reductions 4, 8, 16, 32).
        """
        x = self.patch_embed(x)
        features = []
        last = len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if self.stage_norms is not None:
                out = self.stage_norms[i](x)
            else:
                out = self.norm(x) if norm and i == last else x
            features.append(out.permute(0, 3, 1, 2).contiguous())
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map after the final ``norm``, NCHW (timm's ``forward_features`` returns it NHWC)."""
        x = self.layers(self.patch_embed(x))
        return self.norm(x).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x)


class SwinTransformer(SwinFeatures):
    """Swin Transformer V1 feature extractor (no classifier) returning the outputs of the four stages.

    Args:
        embed_dim: channels of the first stage (doubled by every later stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window.
        in_channels: channels of the input image.
        patch_size: patch-embedding stride.
        mlp_ratio: MLP hidden width over the block width.
        qkv_bias: bias of the ``qkv`` projections.
        drop_rate: dropout after projections and in the MLPs.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all blocks.
        shift: shift every second block's windows (``False``: W-MSA everywhere).
        out_norms: add one LayerNorm per stage map (``stage_norms``), applied by :meth:`forward_intermediates`;
            dense heads such as UPerNet use them (mmseg, HF ``SwinBackbone``). Off by default, as in timm.
        window_padding: ``"timm"`` (default: shift, then pad; windows clipped to small maps) or ``"mmseg"`` (pad,
            then shift; windows never clipped: the official Swin segmentation code, mmseg and HF ``SwinBackbone``,
            whose checkpoints were trained that way); the two agree on maps that are multiples of the window and
            larger than it. See :func:`~maskworks.layers.window.shifted_window_attention`.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        in_channels: int = 3,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        shift: bool = True,
        out_norms: bool = False,
        window_padding: str = "timm",
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths and num_heads must have one entry per stage, got {depths!r}, {num_heads!r}")
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
                SwinTransformerStage(
                    prev, dim, depth, heads, window_size, i > 0, rates[i].tolist(), shift=shift, **block_kwargs
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
        # timm's initialisation: truncated normal std 0.02 for linear layers, zero biases
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _swin(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int,
    in_channels: int,
    drop_path_rate: float,
    **kwargs,
) -> SwinTransformer:
    return SwinTransformer(
        embed_dim, depths, num_heads, window_size, in_channels=in_channels, drop_path_rate=drop_path_rate, **kwargs
    )


@register_model(kind="backbone")
def swin_tiny_patch4_window7_224(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformer:
    """Swin-T backbone (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7)."""
    return _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swin_small_patch4_window7_224(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformer:
    """Swin-S backbone (embed 96, depths 2-2-18-2, heads 3-6-12-24, window 7)."""
    return _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 7, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swin_base_patch4_window7_224(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformer:
    """Swin-B backbone (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 7)."""
    return _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 7, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swin_base_patch4_window12_384(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformer:
    """Swin-B backbone at 384 (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 12)."""
    return _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 12, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swin_large_patch4_window7_224(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformer:
    """Swin-L backbone (embed 192, depths 2-2-18-2, heads 6-12-24-48, window 7)."""
    return _swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 7, in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def swin_large_patch4_window12_384(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> SwinTransformer:
    """Swin-L backbone at 384 (embed 192, depths 2-2-18-2, heads 6-12-24-48, window 12)."""
    return _swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 12, in_channels, drop_path_rate, **kwargs)
