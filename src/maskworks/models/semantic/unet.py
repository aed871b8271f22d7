"""U-Net (Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015).

Two models:

* :class:`UNetVanilla` (``unet_vanilla``): the paper's network built from double 3x3 convs,
  max-pooling, 2x2 transposed-conv upsampling and concatenated skips. ``padding="same"`` is the
  common modern variant (padded convs + BatchNorm, output = input size); ``padding="valid"``
  is the paper's (unpadded convs, no BatchNorm, skips centre-cropped before concatenation,
  572x572 -> 388x388), the form the overlap-tile strategy is defined for.
* :class:`UNet` (``unet``): a pretrained-backbone encoder with the U-Net decoder of
  segmentation_models_pytorch. Module names and state-dict keys equal ``smp.Unet``'s, so an smp
  checkpoint loads as-is and gives the same logits.

The encoder extracts *what* is in the image (semantics, coarse), the decoder recovers *where*
(localisation); the skips concatenate (not add) the fine encoder maps into the decoder, which is
what keeps boundaries sharp and small objects alive.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers import ConvNormAct
from maskworks.models._utils import (
    build_encoder,
    center_crop,
    check_positive_int,
    crop_to,
    init_like_smp,
    pad_to_multiple,
)
from maskworks.registry import register_model

__all__ = ["UNetVanilla", "UNet", "UnetDecoder", "UnetDecoderBlock", "valid_output_size", "valid_input_size"]

# Every valid-mode level loses 2 pixels per 3x3 conv, i.e. 4 per double conv.
_VALID_LOSS = 4
# Output of a valid-mode U-Net with bottleneck input m: 2**depth * (m - _VALID_M0) + 4.
_VALID_M0 = 8


# --------------------------------------------------------------------------- valid-mode size arithmetic
def _check_depth(depth: int) -> int:
    """Validate ``depth``; return the smallest bottleneck input size that keeps every map non-empty."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    # bottleneck output b gives decoder maps 2**k * (b - 4) + 4: b >= 4 always works, b = 3 only for one level
    return 7 if depth == 1 else 8


def valid_output_size(in_size: int, depth: int = 4) -> int:
    """Output side length of a ``padding="valid"`` U-Net with ``depth`` pooling levels.

    Legal inputs are ``2**depth * m + 4 * (2**depth - 1)`` with ``m >= 8`` (``m >= 7`` for one
    level), ``m`` being the bottleneck input size: each level's double conv removes 4 pixels and
    the pooling needs an even size. The output is then ``2**depth * (m - 8) + 4``; for the paper
    (depth 4, m = 32), 572 -> 388.

    Args:
        in_size: input height or width.
        depth: number of pooling levels (``len(features)``).

    Returns:
        The output height or width.

    Raises:
        ValueError: ``in_size`` is not a legal input size; the message names the nearest legal ones.
    """
    min_m = _check_depth(depth)
    scale, offset = 2**depth, _VALID_LOSS * (2**depth - 1)
    m, rem = divmod(in_size - offset, scale)
    if rem or m < min_m:
        lower = scale * m + offset if m >= min_m else None
        upper = scale * max(m + 1, min_m) + offset
        hint = f"nearest legal sizes: {lower}, {upper}" if lower is not None else f"smallest legal size: {upper}"
        raise ValueError(
            f"input size {in_size} is not legal for padding='valid' with {depth} levels "
            f"(legal sizes are {scale}*m + {offset}, m >= {min_m}); {hint}"
        )
    return scale * (m - _VALID_M0) + _VALID_LOSS


def valid_input_size(out_size: int, depth: int = 4) -> int:
    """Smallest legal ``padding="valid"`` input whose output is at least ``out_size``.

    The output for the returned input is ``valid_output_size(valid_input_size(n)) >= n``, equal
    to ``n`` when ``n`` is itself a reachable output size (``2**depth * k + 4``).

    Args:
        out_size: wanted output height or width.
        depth: number of pooling levels (``len(features)``).

    Returns:
        The input height or width.
    """
    min_m = _check_depth(depth)
    if not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f"out_size must be a positive int, got {out_size!r}")
    scale = 2**depth
    m = max(min_m, _VALID_M0 + math.ceil((out_size - _VALID_LOSS) / scale))
    return scale * m + _VALID_LOSS * (scale - 1)


# --------------------------------------------------------------------------- vanilla U-Net
def _double_conv(in_ch: int, out_ch: int, padding: int, batch_norm: bool) -> nn.Sequential:
    """(3x3 conv with bias -> [BN] -> ReLU) x 2, as in the paper (BN is the modern addition)."""
    norm = nn.BatchNorm2d if batch_norm else None
    return nn.Sequential(
        ConvNormAct(in_ch, out_ch, 3, padding=padding, bias=True, norm_layer=norm),
        ConvNormAct(out_ch, out_ch, 3, padding=padding, bias=True, norm_layer=norm),
    )


@register_model(name="unet_vanilla")
class UNetVanilla(nn.Module):
    """The original U-Net: four-level encoder, bottleneck, decoder with concatenated skips.

    With the defaults (same padding, BatchNorm, 3 -> 1 channels) it has 31,043,521 parameters.

    Args:
        in_channels: input image channels.
        num_classes: output channels (logits); 1 for binary with a sigmoid loss, K for K classes.
        features: channels of each encoder level; the bottleneck has ``2 * features[-1]``.
        padding: ``"same"`` (padded convs; any input size, output = input size) or ``"valid"``
            (unpadded convs as in the paper; input must be a legal size, see :func:`valid_output_size`).
        batch_norm: BatchNorm after every conv; ``None`` means True for ``"same"`` and False for
            ``"valid"`` (the paper has none).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        features: Sequence[int] = (64, 128, 256, 512),
        padding: str = "same",
        batch_norm: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        features = tuple(features)
        if not features or not all(isinstance(f, int) and f > 0 for f in features):
            raise ValueError(f"features must be a non-empty sequence of positive ints, got {features!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.features = features
        self.padding = padding
        self.depth = len(features)
        batch_norm = (padding == "same") if batch_norm is None else bool(batch_norm)
        conv_pad = 1 if padding == "same" else 0

        self.encoder = nn.ModuleList()
        ch = in_channels
        for f in features:
            self.encoder.append(_double_conv(ch, f, conv_pad, batch_norm))
            ch = f
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = _double_conv(ch, 2 * ch, conv_pad, batch_norm)
        ch = 2 * ch
        self.upsamples = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for f in reversed(features):
            self.upsamples.append(nn.ConvTranspose2d(ch, f, kernel_size=2, stride=2))
            self.decoder.append(_double_conv(2 * f, f, conv_pad, batch_norm))
            ch = f
        self.head = nn.Conv2d(ch, num_classes, kernel_size=1)

    def valid_output_size(self, in_size: int) -> int:
        """Output side for input side ``in_size`` in ``"valid"`` mode (see :func:`valid_output_size`)."""
        return valid_output_size(in_size, self.depth)

    def valid_input_size(self, out_size: int) -> int:
        """Smallest legal ``"valid"`` input side giving at least ``out_size`` (see :func:`valid_input_size`)."""
        return valid_input_size(out_size, self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` ("same"), or ``(B, num_classes, H', W')`` ("valid")."""
        if self.padding == "valid":
            for side in x.shape[-2:]:
                self.valid_output_size(side)  # raises ValueError on an illegal size
            return self._forward(x)
        x, size = pad_to_multiple(x, 2**self.depth)
        return crop_to(self._forward(x), size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # x already has a size the network can take (padded, or checked for "valid")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.upsamples, self.decoder, reversed(skips)):
            x = up(x)
            if self.padding == "valid":
                skip = center_crop(skip, x.shape[-2:])
            x = block(torch.cat([skip, x], dim=1))  # (B, 2C, H, W)
        return self.head(x)


# --------------------------------------------------------------------------- encoder-based U-Net (smp layout)
class UnetDecoderBlock(nn.Module):
    """Upsample (nearest) to the skip's size, concatenate ``[x, skip]``, two conv-norm-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, batch_norm: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else None
        self.conv1 = ConvNormAct(in_ch + skip_ch, out_ch, 3, norm_layer=norm)
        self.conv2 = ConvNormAct(out_ch, out_ch, 3, norm_layer=norm)

    def forward(self, x: torch.Tensor, size: Sequence[int], skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, self._gate_skip(x, skip)], dim=1)  # (B, C_x + C_skip, H, W)
        return self.conv2(self.conv1(x))

    def _gate_skip(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The skip as it is concatenated to the upsampled ``x`` (unchanged here; gated in Attention U-Net)."""
        return skip


class UnetDecoder(nn.Module):
    """smp's U-Net decoder: one block per encoder map, the last one upsampling to the input size.

    Args:
        encoder_channels: channels of the encoder maps, highest resolution first.
        decoder_channels: output channels of each block, deepest first; one per encoder map.
        batch_norm: BatchNorm in the blocks (without it the convs get a bias).
    """

    block_cls: type[UnetDecoderBlock] = UnetDecoderBlock

    def __init__(
        self, encoder_channels: Sequence[int], decoder_channels: Sequence[int], batch_norm: bool = True
    ) -> None:
        super().__init__()
        encoder_channels, decoder_channels = tuple(encoder_channels), tuple(decoder_channels)
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                f"decoder_channels needs one entry per encoder map ({len(encoder_channels)}), got {decoder_channels!r}"
            )
        deep_first = encoder_channels[::-1]
        in_chs = [deep_first[0], *decoder_channels[:-1]]
        skip_chs = [*deep_first[1:], 0]
        self.blocks = nn.ModuleList(
            self.block_cls(i, s, o, batch_norm) for i, s, o in zip(in_chs, skip_chs, decoder_channels)
        )

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Decode encoder maps (highest resolution first) to ``(B, decoder_channels[-1], *size)``."""
        x, *skips = features[::-1]
        sizes = [s.shape[-2:] for s in skips] + [size]
        for i, block in enumerate(self.blocks):
            x = block(x, sizes[i], skips[i] if i < len(skips) else None)
        return x


class _EncoderUNet(nn.Module):
    """Construction and forward shared by the encoder-based U-Nets (:class:`UNet`, Attention U-Net, U-Net++):
    ``encoder`` (a registered backbone), ``decoder`` (of class ``decoder_cls``), a 3x3 ``segmentation_head``,
    smp's initialisation. The arguments are :class:`UNet`'s."""

    decoder_cls: type[nn.Module]

    def __init__(
        self,
        encoder: str = "resnet34",
        num_classes: int = 1,
        in_channels: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_batch_norm: bool = True,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes, allow_bool=True)
        decoder_channels = tuple(decoder_channels)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder = build_encoder(encoder, in_channels, encoder_weights)
        enc_channels = [info["num_chs"] for info in self.encoder.feature_info]
        # A hierarchical encoder (Swin, ConvNeXt, ...) starts at stride 4: with one decoder block more than it has
        # maps, the stride-2 level gets an empty (0-channel) skip, as smp does for such encoders, so the decoder
        # still upsamples one octave at a time.
        self._empty_stride2 = (
            self.encoder.feature_info[0]["reduction"] == 4 and len(decoder_channels) == len(enc_channels) + 1
        )
        if self._empty_stride2:
            enc_channels = [0, *enc_channels]
        self.decoder = self.decoder_cls(enc_channels, decoder_channels, batch_norm=decoder_batch_norm)
        self.segmentation_head = nn.Sequential(nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1))
        init_like_smp(self.decoder, self.segmentation_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size."""
        x, size = pad_to_multiple(x, self.encoder.feature_info[-1]["reduction"])
        features = self._encode(x)
        x = self.decoder(features, x.shape[-2:])  # (B, decoder_channels[-1], H_pad, W_pad)
        return crop_to(self.segmentation_head(x), size)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder maps, highest resolution first, with the empty stride-2 map of a stride-4-first encoder."""
        features = self.encoder.forward_intermediates(x)
        if self._empty_stride2:
            h, w = x.shape[-2:]
            features = [x.new_zeros(x.shape[0], 0, h // 2, w // 2), *features]
        return features


@register_model(name="unet")
class UNet(_EncoderUNet):
    """U-Net with a registered backbone as encoder; the layout and keys of ``smp.Unet``.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``), e.g. ``"resnet34"``.
        num_classes: output channels (logits).
        in_channels: input image channels.
        decoder_channels: output channels of the decoder blocks, one per encoder map (5 for ResNet); an encoder
            whose first map is at stride 4 (Swin, ConvNeXt: 4 maps) takes 5 as well, the stride-2 block then has
            no skip (smp's handling of such encoders), or 4, the last block then upsamples 4x.
        decoder_batch_norm: BatchNorm in the decoder.
        encoder_weights: ``\"imagenet\"`` / a published tag (``maskworks models --pretrained``), or a path of a local checkpoint for the encoder (torchvision / timm / maskworks
            ResNet keys; see :func:`maskworks.convert.load_weights`), or ``None`` for random init.
    """

    decoder_cls = UnetDecoder
