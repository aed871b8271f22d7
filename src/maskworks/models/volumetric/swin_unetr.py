"""Swin UNETR (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
Images", BrainLes 2021; "SwinUNETR-V2: Stronger Swin Transformers with Stagewise Convolutions for 3D Medical Image
Segmentation", MICCAI 2023), computing what MONAI's ``monai.networks.nets.SwinUNETR`` computes, so that MONAI
checkpoints run unchanged after :func:`maskworks.convert.monai_transformers.convert_monai_swin_unetr`.

Encoder (``swin``): a 2^3 patch embedding (``patch_embed.proj``, optional LayerNorm ``patch_embed.norm``) to
``feature_size`` channels at 1/2, then four stages of 3-D shifted-window Swin blocks, each ending in a patch merging
(``2^3`` neighbours -> 2x channels, half the size): the five maps handed to the decoder are the patch embedding and
the four stage outputs, at 1/2 .. 1/32 with ``f, 2f, 4f, 8f, 16f`` channels, each layer-normalised over its
channels without affine parameters (MONAI's ``normalize=True``). Block ``j`` of a stage uses shifted windows
(shift ``window // 2``) when ``j`` is odd; along an axis no longer than the window the window is clipped to the
axis and not shifted (see :mod:`maskworks.layers.window_nd`, which also documents MONAI's relative-position lookup
on clipped windows, reproduced here). ``use_v2=True`` (SwinUNETR-V2) puts a residual conv block (instance norm)
before every stage (``swin.stages.{i}.res_block``).

Decoder (MONAI's): residual conv blocks (``encoder1..4``, ``encoder10``) on the input and on the maps at 1/2, 1/4,
1/8 and 1/32, then ``decoder5..1`` (2x transposed convolution, concatenation with the skip, residual conv block) up
to full resolution (the 1/16 map is ``decoder5``'s skip as it is) and the 1x1 convolution ``out``.

Any input size: the input is zero-padded at the end of every axis to a multiple of 32 and the logits are cropped
back (MONAI requires multiples of 32). Instance norm statistics are taken over the padded volume. An input that
pads to 32 on every axis would leave one voxel at 1/32, on which instance norm (and batch norm in training with
one sample) fails, in MONAI too; such an input is padded to 64 along its last axis instead.

Differences from MONAI 1.6.1: the HyenaND options (``use_hyena``...) and a user module as ``downsample`` are not
supported; ``patch_size`` must be 2 (MONAI accepts others, but its decoder only fits 2); ``img_size`` (removed from
MONAI) is not an argument. ``spatial_dims=2`` builds the 2-D variant. The default model (1 input channel, 14 classes)
has 15,703,304 parameters (``feature_size=48``: 62,187,296), as MONAI's.

Parameter names: ``swin.patch_embed.{proj, norm}``, ``swin.stages.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``, ``swin.stages.{i}.downsample.{norm, reduction}``,
``swin.stages.{i}.res_block`` (V2); then MONAI's ``encoder1..4``, ``encoder10``, ``decoder1..5`` and ``out`` without
MONAI's ``Convolution`` / ``UnetrBasicBlock`` wrapper levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from maskworks.layers.unetr_blocks import NormName, ResConvBlock, UpBlock, make_norm
from maskworks.layers.vit_layers import DropPath, Mlp
from maskworks.layers.window_nd import (
    PatchMergingNd,
    WindowAttentionNd,
    pad_to_window_nd,
    shifted_window_mask_nd,
    window_and_shift_for_size_nd,
    window_partition_nd,
    window_reverse_nd,
)
from maskworks.models._utils import check_positive_int, check_positive_ints
from maskworks.models.volumetric.unetr import (
    _check_rate,
    _checked_input,
    as_tuple,
    crop_nd,
    pad_to_multiple_nd,
    resolve_out_channels,
)
from maskworks.registry import register_model

__all__ = ["SwinUNETR", "SwinTransformerNd", "SwinStage", "SwinBlockNd", "PatchEmbedNd"]

NUM_STAGES = 4
PATCH_SIZE = 2
DIVISOR = PATCH_SIZE * 2**NUM_STAGES  # 32: the 1/32 bottleneck must be whole


class SwinBlockNd(nn.Module):
    """Swin block on a channels-last map: ``x + drop_path(W-MSA(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window, one entry per spatial axis.
        shifted: use shifted windows (SW-MSA).
        mlp_ratio: MLP hidden size as a multiple of ``dim``.
        qkv_bias: bias of the ``qkv`` projection.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic depth of both branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttentionNd(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def _attend(
        self, x: torch.Tensor, window: tuple[int, ...], shift: tuple[int, ...], mask: torch.Tensor | None
    ) -> torch.Tensor:
        spatial = x.shape[1:-1]
        nd = len(spatial)
        x = pad_to_window_nd(self.norm1(x), window)  # (B, *S_pad, C)
        padded = x.shape[1:-1]
        dims = tuple(range(1, nd + 1))
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=dims)
        windows = self.attn(window_partition_nd(x, window), mask if any(shift) else None)  # (B*nW, N, C)
        x = window_reverse_nd(windows, window, padded)  # (B, *S_pad, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=dims)
        return x[(slice(None), *(slice(0, s) for s in spatial))]  # (B, *S, C)

    def forward(
        self, x: torch.Tensor, window: tuple[int, ...], shift: tuple[int, ...], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Map ``(B, *S, C)``; the window and shift clipped to ``S`` by the stage (the shift is used only when the
        block is ``shifted``), ``mask`` the stage's SW-MSA mask for that shift."""
        if not self.shifted:
            shift = (0,) * len(shift)
        x = x + self.drop_path(self._attend(x, window, shift, mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """One encoder stage: optional residual conv block (V2), ``depth`` Swin blocks alternating W-MSA and SW-MSA,
    patch merging.

    Args:
        dim: channels.
        depth: Swin blocks.
        num_heads: attention heads.
        window_size: window, one entry per spatial axis.
        drop_path: stochastic depth per block.
        mlp_ratio, qkv_bias, drop, attn_drop: see :class:`SwinBlockNd`.
        downsample: ``"merging"`` or ``"mergingv2"`` (see :class:`~maskworks.layers.window_nd.PatchMergingNd`).
        use_v2: a :class:`~maskworks.layers.unetr_blocks.ResConvBlock` (instance norm) before the blocks.
        use_checkpoint: gradient checkpointing of the blocks in training.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Sequence[int],
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        downsample: str = "merging",
        use_v2: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(w // 2 for w in self.window_size)
        self.use_checkpoint = use_checkpoint
        nd = len(self.window_size)
        self.res_block = ResConvBlock(nd, dim, dim, "instance") if use_v2 else None
        self.blocks = nn.ModuleList(
            SwinBlockNd(dim, num_heads, self.window_size, j % 2 == 1, mlp_ratio, qkv_bias, drop, attn_drop, dp)
            for j, dp in zip(range(depth), drop_path)
        )
        self.downsample = PatchMergingNd(dim, nn.LayerNorm, nd, downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last ``(B, *S, C)`` -> ``(B, *ceil(S / 2), 2 C)``."""
        if self.res_block is not None:
            x = self.res_block(x.movedim(-1, 1)).movedim(1, -1)  # conv on (B, C, *S)
        spatial = tuple(x.shape[1:-1])
        window, shift = window_and_shift_for_size_nd(spatial, self.window_size, self.shift_size)
        mask = None
        if any(shift):
            padded = tuple(-(-s // w) * w for s, w in zip(spatial, window))
            mask = shifted_window_mask_nd(padded, window, shift, device=x.device)  # (nW, N, N)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint.checkpoint(block, x, window, shift, mask, use_reentrant=False)
            else:
                x = block(x, window, shift, mask)
        return self.downsample(x)


class PatchEmbedNd(nn.Module):
    """Non-overlapping patch embedding ``proj`` (kernel = stride = patch) with an optional LayerNorm ``norm`` over
    the channels; returns a channels-last map ``(B, *S / patch, C)``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, spatial_dims: int, norm: bool) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.proj = conv(in_channels, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).movedim(1, -1))  # (B, *S/p, C)


class SwinTransformerNd(nn.Module):
    """The Swin UNETR encoder (MONAI's ``SwinTransformer``): patch embedding and four :class:`SwinStage`.

    Args:
        in_channels: input channels.
        embed_dim: channels after the patch embedding (``feature_size``).
        window_size: window, one entry per spatial axis.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio, qkv_bias: see :class:`SwinBlockNd`.
        drop_rate: dropout after the patch embedding, after the attention projections and in the MLPs.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks to this value.
        patch_norm: LayerNorm after the patch embedding.
        use_checkpoint: gradient checkpointing of the blocks in training.
        downsample: patch merging order, ``"merging"`` or ``"mergingv2"``.
        use_v2: residual conv block before each stage.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        window_size: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
    ) -> None:
        super().__init__()
        nd = len(window_size)
        self.patch_embed = PatchEmbedNd(in_channels, embed_dim, PATCH_SIZE, nd, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(
                SwinStage(
                    embed_dim * 2**i,
                    depth,
                    num_heads[i],
                    window_size,
                    rates[start : start + depth],
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    downsample,
                    use_v2,
                    use_checkpoint,
                )
            )

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """Input ``(B, C_in, *S)`` -> the patch embedding and the four stage outputs, channels first
        (``(B, f 2^i, *S / 2^(i+1))``), each layer-normalised over its channels without affine when ``normalize``."""
        x = self.pos_drop(self.patch_embed(x))  # (B, *S/2, f)
        outs = [x]
        for stage in self.stages:
            x = stage(x)  # (B, *S/2^(i+2), 2^(i+1) f)
            outs.append(x)
        if normalize:
            outs = [F.layer_norm(o, o.shape[-1:]) for o in outs]
        return [o.movedim(-1, 1) for o in outs]  # (B, C, *S') each


@register_model(name="swin_unetr", task="volumetric")
class SwinUNETR(nn.Module):
    """Swin UNETR: 3-D Swin Transformer encoder, MONAI's convolutional decoder with five skips.

    Constructor arguments are MONAI's (same order) where they exist.

    Args:
        in_channels: input channels.
        out_channels: classes (logit channels); ``num_classes`` is an alias.
        patch_size: must be 2 (MONAI's only working value).
        depths: Swin blocks per stage (four stages).
        num_heads: attention heads per stage; each must divide its stage's channels ``feature_size * 2^i``.
        window_size: attention window, an int or one entry per spatial axis.
        qkv_bias: bias of the ``qkv`` projections.
        mlp_ratio: MLP hidden size as a multiple of the channels.
        feature_size: channels after the patch embedding (and of the full-resolution decoder level).
        norm_name: normalisation of the decoder's conv blocks, MONAI's form (see
            :func:`~maskworks.layers.unetr_blocks.make_norm`).
        drop_rate: dropout in the encoder (after the patch embedding, attention projections, MLPs).
        attn_drop_rate: dropout on the attention probabilities.
        dropout_path_rate: stochastic depth, rising linearly over the Swin blocks to this value.
        normalize: layer-normalise the encoder maps handed to the decoder (no affine parameters).
        patch_norm: LayerNorm after the patch embedding.
        use_checkpoint: gradient checkpointing of the Swin blocks in training.
        spatial_dims: 3 (volumes) or 2 (images).
        downsample: patch merging order, ``"merging"`` (MONAI's default) or ``"mergingv2"``.
        use_v2: SwinUNETR-V2, a residual conv block before each stage.
        num_classes: alias of ``out_channels`` (what the registry and CLI pass).

    Raises:
        ValueError: an invalid argument (named in the message).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        patch_size: int = 2,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        feature_size: int = 24,
        norm_name: NormName = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
        downsample: str = "merging",
        use_v2: bool = False,
        *,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if patch_size != PATCH_SIZE:
            raise ValueError(
                f"patch_size must be {PATCH_SIZE} (the decoder upsamples the 1/2 map once), got {patch_size!r}"
            )
        if downsample not in ("merging", "mergingv2"):
            raise ValueError(f"downsample must be 'merging' or 'mergingv2', got {downsample!r}")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = resolve_out_channels(out_channels, num_classes)
        f = check_positive_int("feature_size", feature_size)
        depths = check_positive_ints("depths", depths, NUM_STAGES)
        num_heads = check_positive_ints("num_heads", num_heads, NUM_STAGES)
        for i, heads in enumerate(num_heads):
            if (f * 2**i) % heads:
                raise ValueError(
                    f"num_heads[{i}] ({heads}) must divide the stage's channels feature_size * 2^{i} = {f * 2**i}"
                )
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.spatial_dims = spatial_dims
        self.normalize = normalize
        self.window_size = as_tuple(window_size, spatial_dims, "window_size")
        self.swin = SwinTransformerNd(
            in_channels,
            f,
            self.window_size,
            depths,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=_check_rate("drop_rate", drop_rate),
            attn_drop_rate=_check_rate("attn_drop_rate", attn_drop_rate),
            drop_path_rate=_check_rate("dropout_path_rate", dropout_path_rate),
            patch_norm=patch_norm,
            use_checkpoint=use_checkpoint,
            downsample=downsample,
            use_v2=use_v2,
        )
        make_norm(norm_name, f, spatial_dims)  # validates norm_name once, with its own message
        d = spatial_dims
        self.encoder1 = ResConvBlock(d, in_channels, f, norm_name)
        self.encoder2 = ResConvBlock(d, f, f, norm_name)
        self.encoder3 = ResConvBlock(d, 2 * f, 2 * f, norm_name)
        self.encoder4 = ResConvBlock(d, 4 * f, 4 * f, norm_name)
        self.encoder10 = ResConvBlock(d, 16 * f, 16 * f, norm_name)
        self.decoder5 = UpBlock(d, 16 * f, 8 * f, norm_name)
        self.decoder4 = UpBlock(d, 8 * f, 4 * f, norm_name)
        self.decoder3 = UpBlock(d, 4 * f, 2 * f, norm_name)
        self.decoder2 = UpBlock(d, 2 * f, f, norm_name)
        self.decoder1 = UpBlock(d, f, f, norm_name)
        self.out = (nn.Conv3d if d == 3 else nn.Conv2d)(f, self.num_classes, 1)

    def _bottleneck_needs_space(self, batch: int) -> bool:
        """Whether ``encoder10``'s norm would fail on a single 1/32 voxel: instance norm using the input's
        statistics, or batch norm in training with one sample."""
        norm = self.encoder10.norm1
        if isinstance(norm, _InstanceNorm):
            return norm.training or not norm.track_running_stats
        if isinstance(norm, _BatchNorm):
            return norm.training and batch == 1
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Volume ``(B, C_in, D, H, W)`` (or ``(B, C_in, H, W)``), any size -> logits ``(B, K, D, H, W)``."""
        _checked_input(x, self.in_channels, self.spatial_dims)
        x, size = pad_to_multiple_nd(x, DIVISOR, self.spatial_dims)
        if all(s == DIVISOR for s in x.shape[2:]) and self._bottleneck_needs_space(x.shape[0]):
            x = F.pad(x, (0, DIVISOR))  # last axis 32 -> 64: two voxels at 1/32
        h0, h1, h2, h3, h4 = self.swin(x, self.normalize)  # 1/2 .. 1/32, f .. 16f channels
        enc0 = self.encoder1(x)  # (B, f, *S)
        enc1 = self.encoder2(h0)  # (B, f, *S/2)
        enc2 = self.encoder3(h1)  # (B, 2f, *S/4)
        enc3 = self.encoder4(h2)  # (B, 4f, *S/8)
        dec = self.decoder5(self.encoder10(h4), h3)  # (B, 8f, *S/16)
        dec = self.decoder4(dec, enc3)  # (B, 4f, *S/8)
        dec = self.decoder3(dec, enc2)  # (B, 2f, *S/4)
        dec = self.decoder2(dec, enc1)  # (B, f, *S/2)
        dec = self.decoder1(dec, enc0)  # (B, f, *S)
        return crop_nd(self.out(dec), size)  # (B, K, *S_in)
