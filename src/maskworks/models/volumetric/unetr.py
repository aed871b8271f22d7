"""UNETR (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022), computing what
MONAI's ``monai.networks.nets.UNETR`` computes, so that MONAI checkpoints run unchanged after
:func:`maskworks.convert.monai_transformers.convert_monai_unetr`.

Encoder: a plain ViT on the volume cut into 16^3 patches (``vit``: ``patch_embed`` convolution with kernel =
stride = 16, a learned position table ``pos_embed`` with one row per patch of ``img_size``, 12 pre-norm blocks,
final LayerNorm ``norm``). Decoder (the paper's Fig. 2): the outputs of blocks 3, 6, 9 counted from 0 (the 4th,
7th and 10th blocks: MONAI's ``hidden_states_out[3]``, ``[6]``, ``[9]``; the paper names them z3, z6, z9, which
would be the 3rd, 6th and 9th) and the final normalised tokens are reshaped to maps at 1/16 and brought up by
:class:`~maskworks.layers.unetr_blocks.ProjUpBlock` (``encoder2..4``: 2x transposed convolutions, each but the
first followed by a residual conv block) to 1/2, 1/4, 1/8; ``encoder1`` is a conv block on the input;
``decoder5..2`` (:class:`~maskworks.layers.unetr_blocks.UpBlock`) upsample 2x, concatenate the skip and convolve;
``out`` is a 1x1 convolution to the classes. Norms are MONAI's ``norm_name`` (instance norm by default, no affine).

Any input size: the input is zero-padded at the end of every axis to a multiple of 16 and the logits are cropped
back. When the padded grid differs from ``img_size // 16``, the position table is resampled to it (trilinear /
bilinear, ``align_corners=False``); MONAI raises on any other size. Instance norm statistics are taken over the
padded volume, so a padded input is not exactly the crop of a larger one.

Differences from MONAI 1.6.1, none of which changes the function:

* MONAI's ``TransformerBlock`` always creates a ``norm_cross_attn`` LayerNorm that a block without
  cross-attention never uses (12 x 2 x ``hidden_size`` parameters: 18,432 at the default size); ours has none, so
  the default 3-D model (1 input channel, 14 classes, 96^3) has 92,784,046 parameters where MONAI counts
  92,802,478. The converter drops those keys.
* ``proj_type="perceptron"`` (MONAI: a rearrangement and a linear layer) builds the same convolution as ``"conv"``:
  both are one linear map of every flattened patch; the converter reshapes the linear weight into the kernel.
* ``save_attn`` is not an argument: :func:`maskworks.layers.vit_layers.capture_attention` collects the attention
  maps of every block.
* ``use_checkpoint`` (gradient checkpointing of the transformer blocks in training) is an addition.

Parameter names: ``vit.patch_embed``, ``vit.pos_embed``, ``vit.blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``vit.norm`` (timm's block names), then MONAI's ``encoder1..4``, ``decoder2..5``, ``out``
without MONAI's ``Convolution`` wrapper level (``conv1.weight`` for MONAI's ``conv1.conv.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

from maskworks.layers.unetr_blocks import NormName, ProjUpBlock, UpBlock, make_conv_block, make_norm
from maskworks.layers.vit_layers import Block, Mlp
from maskworks.models._utils import check_positive_int
from maskworks.registry import register_model

__all__ = ["UNETR", "VolumeViT", "pad_to_multiple_nd", "crop_nd", "resolve_out_channels"]

PATCH_SIZE = 16  # fixed in UNETR: four 2x decoder steps bring the 1/16 tokens back to full resolution
NUM_LAYERS = 12
SKIP_BLOCKS = (3, 6, 9)  # 0-based indices of the blocks whose outputs feed encoder2..4


def resolve_out_channels(out_channels: int | None, num_classes: int | None) -> int:
    """``out_channels`` or its alias ``num_classes`` (the name the registry and CLI use); both given must agree.

    Raises:
        ValueError: neither is given, they differ, or the value is not a positive int.
    """
    if out_channels is None and num_classes is None:
        raise ValueError("out_channels (or its alias num_classes) is required")
    if out_channels is not None and num_classes is not None and out_channels != num_classes:
        raise ValueError(f"out_channels ({out_channels!r}) and num_classes ({num_classes!r}) differ; give one")
    return check_positive_int("out_channels", out_channels if out_channels is not None else num_classes)


def as_tuple(value: int | Sequence[int], length: int, name: str) -> tuple[int, ...]:
    """``value`` repeated to ``length`` positive ints, or the ``length`` entries of a sequence."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * length
    value = tuple(value)
    if len(value) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{name} must be a positive int or {length} positive ints, got {value!r}")
    return value


def pad_to_multiple_nd(x: torch.Tensor, multiple: int, spatial_dims: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the end of the last ``spatial_dims`` axes of ``x`` to multiples of ``multiple``.

    Returns:
        The padded tensor (``x`` itself when nothing is needed) and the original spatial size.
    """
    size = tuple(x.shape[-spatial_dims:])
    pads = [(-s) % multiple for s in size]
    if any(pads):
        flat: list[int] = []
        for p in reversed(pads):  # F.pad lists the last axis first
            flat += [0, p]
        x = F.pad(x, flat)
    return x, size


def crop_nd(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Keep the leading ``size`` of the last ``len(size)`` axes (undo :func:`pad_to_multiple_nd`)."""
    if tuple(x.shape[-len(size) :]) == tuple(size):
        return x
    return x[(..., *(slice(0, s) for s in size))]


def _checked_input(x: torch.Tensor, in_channels: int, spatial_dims: int) -> None:
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        axes = "D, H, W" if spatial_dims == 3 else "H, W"
        raise ValueError(f"expected input (B, {in_channels}, {axes}), got shape {tuple(x.shape)}")


def _check_rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class VolumeViT(nn.Module):
    """ViT encoder on a 2-D / 3-D volume (MONAI's ``ViT`` as UNETR builds it: no class token, learned positions).

    Args:
        in_channels: input channels.
        img_size: size the position table is built for (``img_size // patch_size`` rows per axis).
        patch_size: patch edge.
        hidden_size: token dimension.
        mlp_dim: hidden dimension of the MLPs.
        num_layers: transformer blocks.
        num_heads: attention heads.
        dropout_rate: dropout after the position embedding, on the attention probabilities, after the attention
            projection and in the MLP.
        qkv_bias: bias of the ``qkv`` projections.
        use_checkpoint: gradient checkpointing of the blocks in training.
    """

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int],
        patch_size: int,
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = len(img_size)
        if any(s < patch_size for s in img_size):
            raise ValueError(f"img_size {tuple(img_size)} must be at least the patch size {patch_size} on every axis")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.patch_size = patch_size
        self.grid_size = tuple(s // patch_size for s in img_size)
        self.use_checkpoint = use_checkpoint
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.patch_embed = conv(in_channels, hidden_size, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid_size), hidden_size))
        self.pos_drop = nn.Dropout(dropout_rate)

        def mlp_layer(in_features: int, hidden_features: int, act_layer, drop: float) -> nn.Module:
            return Mlp(in_features, mlp_dim, act_layer=act_layer, drop=drop)  # mlp_dim, not a ratio of the width

        self.blocks = nn.ModuleList(
            Block(
                hidden_size,
                num_heads,
                qkv_bias=qkv_bias,
                proj_drop=dropout_rate,
                attn_drop=dropout_rate,
                mlp_layer=mlp_layer,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """The position table ``(1, prod(grid), C)`` for a token grid; resampled (linear, ``align_corners=False``)
        when ``grid`` differs from the one it was built for."""
        grid = tuple(grid)
        if grid == self.grid_size:
            return self.pos_embed
        c = self.pos_embed.shape[-1]
        table = self.pos_embed.reshape(1, *self.grid_size, c).movedim(-1, 1)  # (1, C, *g)
        mode = "trilinear" if len(grid) == 3 else "bilinear"
        table = F.interpolate(table, size=grid, mode=mode, align_corners=False)  # (1, C, *G)
        return table.flatten(2).transpose(1, 2)  # (1, prod(G), C)

    def forward(
        self, x: torch.Tensor, keep: Sequence[int] = SKIP_BLOCKS
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:
        """Input ``(B, C_in, *S)``, ``S`` multiples of the patch size -> the normalised last tokens ``(B, N, C)``,
        the outputs of the blocks listed in ``keep`` (each ``(B, N, C)``) and the token grid."""
        x = self.patch_embed(x)  # (B, C, *G)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = self.pos_drop(x + self.position_embedding(grid).to(x.dtype))
        kept = []
        for i, block in enumerate(self.blocks):
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in keep:
                kept.append(x)
        return self.norm(x), kept, grid


@register_model(name="unetr", task="volumetric")
class UNETR(nn.Module):
    """UNETR: ViT encoder on 16^3 patches, convolutional decoder with skips from blocks 3, 6, 9 (counted from 0).

    Constructor arguments are MONAI's (same order) where they exist.

    Args:
        in_channels: input channels.
        out_channels: classes (logit channels); ``num_classes`` is an alias.
        img_size: input size the position table is built for (an int for a cube); other sizes resample it.
        feature_size: channels of the full-resolution decoder level (1/2: 2x, 1/4: 4x, 1/8: 8x).
        hidden_size: token dimension of the ViT.
        mlp_dim: hidden dimension of the ViT's MLPs.
        num_heads: attention heads; must divide ``hidden_size``.
        proj_type: ``"conv"`` or ``"perceptron"``; both build the same patch convolution (see the module
            docstring).
        norm_name: normalisation of the conv blocks, MONAI's form (see
            :func:`~maskworks.layers.unetr_blocks.make_norm`).
        conv_block: conv blocks after the transposed convolutions of ``encoder2..4``.
        res_block: residual (else plain) conv blocks.
        dropout_rate: dropout in the ViT (position embedding, attention, MLP).
        spatial_dims: 3 (volumes) or 2 (images).
        qkv_bias: bias of the ``qkv`` projections.
        num_classes: alias of ``out_channels`` (what the registry and CLI pass).
        use_checkpoint: gradient checkpointing of the transformer blocks in training.

    Raises:
        ValueError: an invalid argument (named in the message), e.g. ``out_channels`` and ``num_classes`` that
            differ.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        img_size: int | Sequence[int] = 96,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        proj_type: str = "conv",
        norm_name: NormName = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool = False,
        *,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if proj_type not in ("conv", "perceptron"):
            raise ValueError(f"proj_type must be 'conv' or 'perceptron', got {proj_type!r}")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = resolve_out_channels(out_channels, num_classes)
        for name, value in (("feature_size", feature_size), ("hidden_size", hidden_size), ("mlp_dim", mlp_dim)):
            check_positive_int(name, value)
        check_positive_int("num_heads", num_heads)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.img_size = as_tuple(img_size, spatial_dims, "img_size")
        self.spatial_dims = spatial_dims
        self.hidden_size = hidden_size
        f = feature_size
        self.vit = VolumeViT(
            in_channels,
            self.img_size,
            PATCH_SIZE,
            hidden_size,
            mlp_dim,
            NUM_LAYERS,
            num_heads,
            dropout_rate=_check_rate("dropout_rate", dropout_rate),
            qkv_bias=qkv_bias,
            use_checkpoint=use_checkpoint,
        )
        make_norm(norm_name, f, spatial_dims)  # validates norm_name once, with its own message
        d = spatial_dims
        self.encoder1 = make_conv_block(d, in_channels, f, norm_name, res_block)
        self.encoder2 = ProjUpBlock(d, hidden_size, 2 * f, 2, norm_name, conv_block, res_block)
        self.encoder3 = ProjUpBlock(d, hidden_size, 4 * f, 1, norm_name, conv_block, res_block)
        self.encoder4 = ProjUpBlock(d, hidden_size, 8 * f, 0, norm_name, conv_block, res_block)
        self.decoder5 = UpBlock(d, hidden_size, 8 * f, norm_name, res_block)
        self.decoder4 = UpBlock(d, 8 * f, 4 * f, norm_name, res_block)
        self.decoder3 = UpBlock(d, 4 * f, 2 * f, norm_name, res_block)
        self.decoder2 = UpBlock(d, 2 * f, f, norm_name, res_block)
        self.out = (nn.Conv3d if d == 3 else nn.Conv2d)(f, self.num_classes, 1)

    def _to_map(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """``(B, N, C)`` tokens -> ``(B, C, *grid)`` map (MONAI's ``proj_feat``)."""
        return tokens.reshape(tokens.shape[0], *grid, self.hidden_size).movedim(-1, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Volume ``(B, C_in, D, H, W)`` (or ``(B, C_in, H, W)``), any size -> logits ``(B, K, D, H, W)``."""
        _checked_input(x, self.in_channels, self.spatial_dims)
        x, size = pad_to_multiple_nd(x, PATCH_SIZE, self.spatial_dims)
        last, (h3, h6, h9), grid = self.vit(x)
        enc1 = self.encoder1(x)  # (B, f, *S)
        enc2 = self.encoder2(self._to_map(h3, grid))  # (B, 2f, *S/2)
        enc3 = self.encoder3(self._to_map(h6, grid))  # (B, 4f, *S/4)
        enc4 = self.encoder4(self._to_map(h9, grid))  # (B, 8f, *S/8)
        dec = self.decoder5(self._to_map(last, grid), enc4)  # (B, 8f, *S/8)
        dec = self.decoder4(dec, enc3)  # (B, 4f, *S/4)
        dec = self.decoder3(dec, enc2)  # (B, 2f, *S/2)
        dec = self.decoder2(dec, enc1)  # (B, f, *S)
        return crop_nd(self.out(dec), size)  # (B, K, *S_in)
