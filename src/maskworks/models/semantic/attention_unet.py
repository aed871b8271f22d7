"""Attention U-Net (Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018).

Additive attention gates filter every skip before it is concatenated into the decoder::

    alpha = sigmoid(BN(psi(relu(BN(W_g g) + BN(W_x x)))))      # (B, 1, H, W), in (0, 1)
    out   = x * alpha

with ``x`` the skip (encoder) features, ``g`` the gating signal from the decoder and 1x1 convs
``W_g``, ``W_x`` (to ``inter_channels``) and ``psi`` (to one channel). Irrelevant regions of the skip
(background clutter) get small ``alpha`` and are suppressed before the decoder sees them.

Variant: the gate is computed at the **skip's resolution, on the decoder feature after it has been
upsampled** for the concatenation (the common variant, as in MONAI's ``AttentionUnet`` and
LeeJunHyun's ``AttU_Net``). Oktay et al.'s original instead brings ``x`` to the coarse gating
resolution with a strided ``W_x`` and resamples ``alpha`` back up. We implement the common variant
because the decoder upsamples ``g`` anyway, ``alpha`` is then computed at full skip resolution with
no second resampling (sharper gates on thin structures), and it works for any ratio between the
skip and the decoder map (e.g. dilated encoders), where a fixed stride-2 ``W_x`` does not.

:class:`AttentionUNet` (``attention_unet``) is :class:`~maskworks.models.semantic.unet.UNet` (smp
layout) plus one gate per skip, at ``decoder.blocks.{i}.attention_gate``; every other key is a
``UNet`` key, so a ``UNet`` / ``smp.Unet`` checkpoint loads with only the gate keys missing. The
seed's 31,394,089-parameter model is the gated *vanilla* U-Net (no pretrained encoder), which this
module does not build.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers import ConvNormAct
from maskworks.models._utils import check_positive_int
from maskworks.models.semantic.unet import UnetDecoder, UnetDecoderBlock, _EncoderUNet
from maskworks.registry import register_model

__all__ = ["AttentionGate", "AttentionDecoderBlock", "AttentionUnetDecoder", "AttentionUNet"]


class AttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. (2018): ``x * alpha(g, x)``.

    Parameters: ``inter * (gate + skip + 5) + 2`` with BatchNorm (1x1 convs without bias, BN
    affine on ``W_g``, ``W_x`` and ``psi``), ``inter * (gate + skip + 3) + 1`` without (convs with bias).

    Args:
        gate_channels: channels of the gating signal ``g`` (the decoder feature).
        skip_channels: channels of the gated features ``x`` (the skip).
        inter_channels: channels of the intermediate map (``skip_channels // 2`` in the paper's code).
        batch_norm: BatchNorm after each 1x1 conv.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int, batch_norm: bool = True) -> None:
        super().__init__()
        for name, value in (
            ("gate_channels", gate_channels),
            ("skip_channels", skip_channels),
            ("inter_channels", inter_channels),
        ):
            check_positive_int(name, value, allow_bool=True)
        norm = nn.BatchNorm2d if batch_norm else None
        self.W_g = ConvNormAct(gate_channels, inter_channels, 1, norm_layer=norm, act_layer=None)
        self.W_x = ConvNormAct(skip_channels, inter_channels, 1, norm_layer=norm, act_layer=None)
        self.psi = ConvNormAct(inter_channels, 1, 1, norm_layer=norm, act_layer=nn.Sigmoid)
        self.relu = nn.ReLU(inplace=True)

    def coefficients(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Attention coefficients ``alpha`` ``(B, 1, H, W)`` in ``(0, 1)`` at the resolution of ``x``.

        Args:
            g: gating signal ``(B, gate_channels, H_g, W_g)``; resized bilinearly (``align_corners=False``)
                after ``W_g`` when its size differs from ``x``'s (not the case inside :class:`AttentionUNet`).
            x: features to gate ``(B, skip_channels, H, W)``.
        """
        g1 = self.W_g(g)  # (B, inter, H_g, W_g)
        x1 = self.W_x(x)  # (B, inter, H, W)
        if g1.shape[-2:] != x1.shape[-2:]:
            g1 = F.interpolate(g1, size=x1.shape[-2:], mode="bilinear", align_corners=False)
        return self.psi(self.relu(g1 + x1))  # (B, 1, H, W)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The gated features ``x * alpha`` ``(B, skip_channels, H, W)``."""
        return x * self.coefficients(g, x)


class AttentionDecoderBlock(UnetDecoderBlock):
    """:class:`UnetDecoderBlock` whose skip passes an :class:`AttentionGate` before the concatenation.

    The gating signal is the block input after nearest upsampling to the skip's size.

    Args:
        in_ch: channels of the block input (the gating signal).
        skip_ch: channels of the skip; 0 for a block without skip (no gate).
        out_ch: output channels.
        batch_norm: BatchNorm in the convs and the gate.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, batch_norm: bool = True) -> None:
        super().__init__(in_ch, skip_ch, out_ch, batch_norm)
        self.attention_gate = AttentionGate(in_ch, skip_ch, max(skip_ch // 2, 1), batch_norm) if skip_ch else None

    def _gate_skip(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip if self.attention_gate is None else self.attention_gate(x, skip)


class AttentionUnetDecoder(UnetDecoder):
    """The U-Net decoder of :class:`~maskworks.models.semantic.unet.UnetDecoder` with gated skips.

    Args:
        encoder_channels: channels of the encoder maps, highest resolution first.
        decoder_channels: output channels of each block, deepest first; one per encoder map.
        batch_norm: BatchNorm in the blocks and gates.
    """

    block_cls = AttentionDecoderBlock


@register_model(name="attention_unet")
class AttentionUNet(_EncoderUNet):
    """Attention U-Net with a registered backbone as encoder: ``UNet`` plus a gate on every skip.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``), e.g. ``"resnet34"``.
        num_classes: output channels (logits).
        in_channels: input image channels.
        decoder_channels: output channels of the decoder blocks, one per encoder map (5 for ResNet).
        decoder_batch_norm: BatchNorm in the decoder and the gates.
        encoder_weights: ``\"imagenet\"`` / a published tag (``maskworks models --pretrained``), or a path of a local checkpoint for the encoder (see
            :func:`maskworks.convert.load_weights`), or ``None`` for random init.
    """

    decoder_cls = AttentionUnetDecoder

    def attention_gates(self) -> list[AttentionGate]:
        """The gates, deepest skip first."""
        return [b.attention_gate for b in self.decoder.blocks if b.attention_gate is not None]
