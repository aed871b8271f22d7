"""Pyramid pooling module (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017).

The last backbone map is average-pooled to ``b x b`` grids for each bin size ``b`` in
``(1, 2, 3, 6)`` (global, then coarser-to-finer sub-regions), each pooled map is projected by a
1x1 conv-norm-ReLU to ``C / len(bins)`` channels, upsampled (bilinear) back to the map's size and
concatenated with the map itself: every pixel then sees global and sub-region context.

Module names follow segmentation_models_pytorch (``PSPBlock.pool = [AdaptiveAvgPool2d,
Conv2dReLU]``, ``PSPModule.blocks``, ``PSPDecoder.psp / conv / dropout``), so ``smp.PSPNet``
state dicts load unchanged. Like smp, the bin-1 branch has no BatchNorm by default (its map is
``1 x 1``, where BatchNorm fails in training at batch size 1) and its conv gets a bias instead;
``global_norm=True`` gives it a :class:`~maskworks.layers.PooledBatchNorm2d` (the paper's /
mmseg's layout, safe at batch size 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.conv import ConvNormAct
from maskworks.layers.norm import PooledBatchNorm2d

__all__ = ["PSPBlock", "PSPModule", "PSPDecoder"]

NormLayer = Callable[[int], nn.Module]


class PSPBlock(nn.Module):
    """One pyramid level: adaptive average pooling to ``pool_size x pool_size``, 1x1 conv-norm-ReLU,
    bilinear upsampling (``align_corners=True``, as smp) back to the input size.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        pool_size: side of the pooled grid (the bin size).
        norm_layer: normalisation class, or ``None`` (the conv then has a bias).
        global_norm: for ``pool_size == 1``, keep a norm (``PooledBatchNorm2d`` in place of
            ``nn.BatchNorm2d``) instead of dropping it as smp does.
        align_corners: ``align_corners`` of the upsampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pool_size: int,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        global_norm: bool = False,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
        if pool_size == 1 and norm_layer is not None:
            # statistics over one value per channel and image: undefined at batch size 1
            if not global_norm:
                norm_layer = None
            elif norm_layer is nn.BatchNorm2d:
                norm_layer = PooledBatchNorm2d
        self.pool_size = pool_size
        self.align_corners = align_corners
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(output_size=(pool_size, pool_size)),
            ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.pool(x)  # (B, out_channels, pool_size, pool_size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


class PSPModule(nn.Module):
    """Pyramid pooling: the input concatenated after one :class:`PSPBlock` per bin size.

    Output channels: ``in_channels + len(sizes) * out_channels``.

    Args:
        in_channels: input channels.
        sizes: bin sizes (``(1, 2, 3, 6)`` in the paper).
        out_channels: channels of each branch; ``None`` means ``in_channels // len(sizes)`` (the paper, smp).
        norm_layer: normalisation class of the branches, or ``None``.
        global_norm: keep a (batch-1-safe) norm in the bin-1 branch; see :class:`PSPBlock`.
        align_corners: ``align_corners`` of the upsampling.
    """

    def __init__(
        self,
        in_channels: int,
        sizes: Sequence[int] = (1, 2, 3, 6),
        out_channels: int | None = None,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        global_norm: bool = False,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        sizes = tuple(sizes)
        if not sizes:
            raise ValueError(f"sizes must be a non-empty sequence of positive ints, got {sizes!r}")
        if out_channels is None:
            out_channels = in_channels // len(sizes)
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels!r} (in_channels={in_channels})")
        self.out_channels = in_channels + len(sizes) * out_channels
        self.blocks = nn.ModuleList(
            PSPBlock(in_channels, out_channels, s, norm_layer, global_norm, align_corners) for s in sizes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(x) for block in self.blocks] + [x], dim=1)  # (B, C + len(sizes) * C', H, W)


class PSPDecoder(nn.Module):
    """smp's PSPNet decoder: :class:`PSPModule` on the last encoder map, 1x1 conv-norm-ReLU, ``Dropout2d``.

    Args:
        encoder_channels: channels of the encoder maps; only the last is used.
        batch_norm: BatchNorm in the convs (without it the convs get a bias).
        out_channels: output channels (``psp_out_channels``).
        dropout: ``Dropout2d`` probability.
        sizes: bin sizes of the pyramid.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        batch_norm: bool = True,
        out_channels: int = 512,
        dropout: float = 0.2,
        sizes: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        norm = nn.BatchNorm2d if batch_norm else None
        in_ch = tuple(encoder_channels)[-1]
        self.psp = PSPModule(in_ch, sizes=sizes, norm_layer=norm)
        self.conv = ConvNormAct(self.psp.out_channels, out_channels, 1, norm_layer=norm)
        self.dropout = nn.Dropout2d(p=dropout)
        self.out_channels = out_channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, out_channels, h, w)`` from the last encoder map ``(B, C, h, w)``."""
        return self.dropout(self.conv(self.psp(features[-1])))
