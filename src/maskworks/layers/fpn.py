"""Feature Pyramid Network (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017).

Two pieces live here:

* :class:`FeaturePyramid`: the FPN neck of the paper. Every backbone map ``C_i`` gets a 1x1
  *lateral* convolution to ``out_channels``; a top-down pass upsamples the coarser merged map
  (nearest neighbour) to the size of the next finer one and adds it; a 3x3 *output* convolution
  smooths each merged map (reducing the aliasing of the upsampling). The result is one map per
  input, all with ``out_channels`` channels, at the input resolutions. It is the reusable neck for
  detection, panoptic and transformer segmentation models (children ``lateral_convs`` /
  ``output_convs``, each a :class:`~maskworks.layers.ConvNormAct`).
* :class:`FPNDecoder` and its blocks: the semantic-segmentation FPN decoder of
  segmentation_models_pytorch (after Kirillov et al.'s Panoptic FPN semantic branch): a top-down
  pyramid (``p5`` then ``p4``/``p3``/``p2`` :class:`FPNBlock` with ``skip_conv``), one
  :class:`SegmentationBlock` per level (3x3 conv + GroupNorm(32) + ReLU, x2 bilinear up until
  1/4), merged by :class:`MergeBlock` (sum or concatenation) and spatial dropout. Module names
  are smp's, so ``smp.FPN`` state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.conv import ConvNormAct

__all__ = [
    "FeaturePyramid",
    "Conv3x3GNReLU",
    "FPNBlock",
    "SegmentationBlock",
    "MergeBlock",
    "FPNDecoder",
]


_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def _upsample_like(x: torch.Tensor, ref: torch.Tensor, mode: str) -> torch.Tensor:
    """Resize ``x`` to the spatial size of ``ref`` (``align_corners=False`` for the modes that take it)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    return F.interpolate(x, size=ref.shape[-2:], mode=mode, align_corners=align)


def _check_mode(name: str, mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"{name} must be one of {_MODES}, got {mode!r}")


# --------------------------------------------------------------------------- generic FPN neck (Lin et al.)
class FeaturePyramid(nn.Module):
    """FPN neck: lateral 1x1 convs, top-down nearest upsampling + addition, 3x3 output convs.

    Args:
        in_channels: channels of the input maps, highest resolution first (e.g. ``(256, 512, 1024, 2048)``).
        out_channels: channels of every pyramid level (256 in the paper).
        norm_layer: normalisation after each conv (``None`` in the paper; ``nn.BatchNorm2d`` or a
            GroupNorm factory for segmentation necks). A conv gets a bias only without a norm.
        act_layer: activation after each conv (``None`` in the paper, ``nn.ReLU`` in UPerNet's neck).
        upsample_mode: ``F.interpolate`` mode of the top-down pathway (``"nearest"`` in the paper;
            ``"bilinear"`` is used with ``align_corners=False``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        in_channels = tuple(in_channels)
        if not in_channels or not all(isinstance(c, int) and c > 0 for c in in_channels):
            raise ValueError(f"in_channels must be a non-empty sequence of positive ints, got {in_channels!r}")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        _check_mode("upsample_mode", upsample_mode)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.upsample_mode = upsample_mode
        self.lateral_convs = nn.ModuleList(
            ConvNormAct(c, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer) for c in in_channels
        )
        self.output_convs = nn.ModuleList(
            ConvNormAct(out_channels, out_channels, 3, norm_layer=norm_layer, act_layer=act_layer) for _ in in_channels
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Pyramid maps for backbone maps.

        Args:
            features: one map ``(B, in_channels[i], H_i, W_i)`` per input level, highest resolution first.

        Returns:
            One map ``(B, out_channels, H_i, W_i)`` per level, highest resolution first.
        """
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"expected {len(self.lateral_convs)} feature maps, got {len(features)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        # top-down: coarsest first, each merged map is upsampled and added to the next finer lateral
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _upsample_like(laterals[i], laterals[i - 1], self.upsample_mode)
        return [conv(p) for conv, p in zip(self.output_convs, laterals)]


# --------------------------------------------------------------------------- smp's FPN segmentation decoder
class Conv3x3GNReLU(nn.Module):
    """3x3 conv (no bias) -> GroupNorm(32) -> ReLU, then optionally x2 bilinear upsampling (``align_corners=True``).

    Args:
        in_channels: input channels.
        out_channels: output channels; a multiple of 32 (the GroupNorm groups).
        upsample: upsample the result by 2.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False) -> None:
        super().__init__()
        if out_channels % 32:
            raise ValueError(f"out_channels must be a multiple of 32 (GroupNorm groups), got {out_channels!r}")
        self.upsample = upsample
        self.block = ConvNormAct(in_channels, out_channels, 3, bias=False, norm_layer=partial(nn.GroupNorm, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return x


class FPNBlock(nn.Module):
    """Top-down step: upsample the coarser pyramid map to the skip's size and add the 1x1-projected skip.

    Args:
        pyramid_channels: channels of the pyramid maps.
        skip_channels: channels of the encoder map (projected by ``skip_conv``).
        interpolation_mode: ``F.interpolate`` mode of the upsampling (``"nearest"`` in smp and the paper).
    """

    def __init__(self, pyramid_channels: int, skip_channels: int, interpolation_mode: str = "nearest") -> None:
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_channels, pyramid_channels, kernel_size=1)
        self.interpolation_mode = interpolation_mode

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = self.skip_conv(skip)
        return _upsample_like(x, skip, self.interpolation_mode) + skip


class SegmentationBlock(nn.Module):
    """``max(1, n_upsamples)`` :class:`Conv3x3GNReLU` blocks, each upsampling x2 when ``n_upsamples > 0``.

    Args:
        in_channels: input channels.
        out_channels: output channels (multiple of 32).
        n_upsamples: number of x2 upsamplings (3 for P5 -> 1/4, 0 for P2).
    """

    def __init__(self, in_channels: int, out_channels: int, n_upsamples: int = 0) -> None:
        super().__init__()
        blocks = [Conv3x3GNReLU(in_channels, out_channels, upsample=n_upsamples > 0)]
        blocks += [Conv3x3GNReLU(out_channels, out_channels, upsample=True) for _ in range(1, n_upsamples)]
        self.block = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class MergeBlock(nn.Module):
    """Merge same-size maps by element-wise sum (``"add"``) or channel concatenation (``"cat"``).

    Args:
        policy: ``"add"`` or ``"cat"``.
    """

    def __init__(self, policy: str = "add") -> None:
        super().__init__()
        if policy not in ("add", "cat"):
            raise ValueError(f"merge policy must be 'add' or 'cat', got {policy!r}")
        self.policy = policy

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.policy == "add":
            out = x[0]
            for t in x[1:]:
                out = out + t
            return out
        return torch.cat(list(x), dim=1)  # (B, len(x) * C, H, W)


class FPNDecoder(nn.Module):
    """smp's FPN decoder over the last four encoder maps (strides 4, 8, 16, 32 for ResNet).

    Args:
        encoder_channels: channels of the encoder maps, highest resolution first; the last four are used.
        pyramid_channels: channels of the top-down pyramid (``p5``..``p2``).
        segmentation_channels: channels of each segmentation block (multiple of 32).
        dropout: ``Dropout2d`` probability after merging.
        merge_policy: ``"add"`` (output ``segmentation_channels``) or ``"cat"`` (``4 * segmentation_channels``).
        interpolation_mode: upsampling mode of the top-down pathway.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        pyramid_channels: int = 256,
        segmentation_channels: int = 128,
        dropout: float = 0.2,
        merge_policy: str = "add",
        interpolation_mode: str = "nearest",
    ) -> None:
        super().__init__()
        encoder_channels = tuple(encoder_channels)
        if len(encoder_channels) < 4:
            raise ValueError(f"the FPN decoder needs at least 4 encoder maps, got channels {encoder_channels!r}")
        if merge_policy not in ("add", "cat"):
            raise ValueError(f"merge_policy must be 'add' or 'cat', got {merge_policy!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        _check_mode("interpolation_mode", interpolation_mode)
        self.out_channels = segmentation_channels * (1 if merge_policy == "add" else 4)
        c2, c3, c4, c5 = encoder_channels[-4:]
        self.p5 = nn.Conv2d(c5, pyramid_channels, kernel_size=1)
        self.p4 = FPNBlock(pyramid_channels, c4, interpolation_mode)
        self.p3 = FPNBlock(pyramid_channels, c3, interpolation_mode)
        self.p2 = FPNBlock(pyramid_channels, c2, interpolation_mode)
        self.seg_blocks = nn.ModuleList(
            SegmentationBlock(pyramid_channels, segmentation_channels, n_upsamples=n) for n in (3, 2, 1, 0)
        )
        self.merge = MergeBlock(merge_policy)
        self.dropout = nn.Dropout2d(p=dropout, inplace=True)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode encoder maps (highest resolution first) to ``(B, out_channels, H_2, W_2)`` at the stride of C2."""
        c2, c3, c4, c5 = features[-4:]
        p5 = self.p5(c5)
        p4 = self.p4(p5, c4)
        p3 = self.p3(p4, c3)
        p2 = self.p2(p3, c2)
        pyramid = [block(p) for block, p in zip(self.seg_blocks, (p5, p4, p3, p2))]
        return self.dropout(self.merge(pyramid))
