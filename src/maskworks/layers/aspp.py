"""Atrous spatial pyramid pooling (Chen et al., "Rethinking Atrous Convolution for Semantic Image
Segmentation", 2017 -- DeepLabv3; separable variant from Chen et al., "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation", ECCV 2018 -- DeepLabv3+).

Five parallel branches look at the same map with different context: a 1x1 conv, one 3x3 atrous
conv per rate, and image pooling (global average -> 1x1 conv -> broadcast back); their outputs
are concatenated and projected by a 1x1 conv, BatchNorm, ReLU and dropout. Every branch keeps
the spatial size, so the output is ``(B, out_channels, h, w)`` for any ``h, w`` (1x1 included).
Because the branches are parallel, rates such as 6/12/18 that would grid when stacked are safe
here (see :mod:`maskworks.layers.atrous`).

The module layout is the one torchvision (``torchvision.models.segmentation.deeplabv3.ASPP``)
and segmentation_models_pytorch (``decoders/deeplabv3/decoder.py``) share: ``convs.0`` (1x1
branch: conv, BN, ReLU), ``convs.1..n`` (atrous branches: conv, BN, ReLU, or for the separable
variant ``SeparableConv2d`` = depthwise ``0.0`` + pointwise ``0.1``, BN, ReLU), ``convs.{n+1}``
(pooling: pool, conv ``1``, BN ``2``, ReLU) and ``project.0..3`` (conv, BN, ReLU, Dropout), so
both libraries' state dicts load unchanged. The pooling branch's BatchNorm is a
:class:`~maskworks.layers.PooledBatchNorm2d` (same keys), which trains at batch size 1, where
``nn.BatchNorm2d`` on a 1x1 map raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from maskworks.layers.conv import ConvNormAct
from maskworks.layers.norm import PooledBatchNorm2d

__all__ = ["ASPP", "ASPPConv", "ASPPPooling", "ASPPSeparableConv", "SeparableConv2d"]


class SeparableConv2d(nn.Sequential):
    """Depthwise ``k x k`` conv (child ``0``, no bias) followed by a pointwise 1x1 conv (child ``1``).

    Args:
        in_channels: input channels (also the depthwise conv's groups).
        out_channels: output channels of the pointwise conv.
        kernel_size: depthwise kernel size.
        stride: depthwise stride.
        padding: depthwise padding; ``None`` keeps the size at stride 1 (``dilation * (k - 1) // 2``).
        dilation: depthwise dilation (atrous rate).
        bias: bias of the pointwise conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
        )
        pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        super().__init__(depthwise, pointwise)


class ASPPConv(ConvNormAct):
    """Atrous branch: 3x3 conv at rate ``dilation`` (padding = rate), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)


class ASPPSeparableConv(nn.Sequential):
    """Atrous separable branch: :class:`SeparableConv2d` at rate ``dilation``, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            SeparableConv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Sequential):
    """Image-pooling branch: global average pool, 1x1 conv, :class:`PooledBatchNorm2d`, ReLU, and
    back to the input size (bilinear from a 1x1 map is a broadcast, so it is done as one)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            PooledBatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = super().forward(x)  # (B, C, 1, 1)
        # == F.interpolate(pooled, (h, w), mode="bilinear", align_corners=False), without the arithmetic
        return pooled.expand(-1, -1, h, w)  # (B, C, h, w)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with the torchvision / smp module layout.

    Args:
        in_channels: channels of the input map (the backbone's last map; 2048 for ResNet-50).
        out_channels: channels of every branch and of the output.
        atrous_rates: one 3x3 atrous branch per rate. The paper uses (6, 12, 18) at output stride
            16 and (12, 24, 36) at output stride 8.
        separable: depthwise-separable atrous branches (DeepLabv3+; smp's ``aspp_separable``).
        dropout: dropout probability after the projection.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        atrous_rates: Sequence[int] = (12, 24, 36),
        separable: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(atrous_rates, (int, str)) or not isinstance(atrous_rates, Sequence):
            raise TypeError(f"atrous_rates must be a sequence of positive ints, got {atrous_rates!r}")
        rates = tuple(atrous_rates)
        if not rates or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in rates):
            raise ValueError(f"atrous_rates must be a non-empty sequence of positive ints, got {atrous_rates!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.atrous_rates = rates
        branch = ASPPSeparableConv if separable else ASPPConv
        self.convs = nn.ModuleList(
            [
                ConvNormAct(in_channels, out_channels, 1, bias=False),
                *(branch(in_channels, out_channels, r) for r in rates),
                ASPPPooling(in_channels, out_channels),
            ]
        )
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, h, w)`` -> ``(B, out_channels, h, w)``."""
        x = torch.cat([branch(x) for branch in self.convs], dim=1)  # (B, (len(rates) + 2) * C, h, w)
        return self.project(x)
