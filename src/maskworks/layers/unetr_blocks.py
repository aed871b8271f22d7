"""Convolutional blocks of the UNETR family (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image
Segmentation", WACV 2022; "Swin UNETR", BrainLes 2021) for 2-D and 3-D maps, computing what MONAI's
``UnetResBlock``, ``UnetBasicBlock``, ``UnetrUpBlock`` and ``UnetrPrUpBlock`` compute.

* :class:`ResConvBlock` (``conv1, norm1, conv2, norm2`` and, when the channels change, the 1x1 shortcut
  ``conv3, norm3``): two 3x3(x3) convolutions without bias, each normalised, LeakyReLU(0.01) after the first and
  after the residual sum (MONAI's ``UnetResBlock``).
* :class:`BasicConvBlock` (``conv1, norm1, conv2, norm2``): the same without the residual (``UnetBasicBlock``).
* :class:`UpBlock` (``transp_conv``, ``conv_block``): 2x transposed convolution without bias, concatenation with
  the skip, then a residual or basic block (``UnetrUpBlock``).
* :class:`ProjUpBlock` (``transp_conv_init``, ``blocks``): the projection-upsampling path of UNETR's skips: one
  2x transposed convolution, then ``num_layer`` times (2x transposed convolution, conv block) (``UnetrPrUpBlock``).
* :func:`make_norm`: MONAI's ``norm_name`` (``"instance"``, ``"batch"``, ``"group"``, ``"syncbatch"``, or a
  ``(name, kwargs)`` pair such as ``("group", {"num_groups": 8})``) -> a normalisation module. ``"instance"`` is
  ``nn.InstanceNorm{2,3}d`` with torch's defaults: no affine parameters, no running statistics.

Parameter names are MONAI's without its ``Convolution`` wrapper (``conv1.conv.weight`` here is ``conv1.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = ["NormName", "make_norm", "make_conv_block", "ResConvBlock", "BasicConvBlock", "UpBlock", "ProjUpBlock"]

NormName = str | tuple[str, Mapping]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORMS = {
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "syncbatch": {2: nn.SyncBatchNorm, 3: nn.SyncBatchNorm},
}


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def make_norm(norm_name: NormName, channels: int, spatial_dims: int = 3) -> nn.Module:
    """A normalisation layer from MONAI's ``norm_name``.

    Args:
        norm_name: ``"instance"``, ``"batch"``, ``"group"`` or ``"syncbatch"`` (case-insensitive), or a pair
            ``(name, kwargs)`` whose keyword arguments go to the torch class (``("group", {"num_groups": 8})``,
            ``("instance", {"affine": True})``).
        channels: channels to normalise.
        spatial_dims: 2 or 3.

    Returns:
        The module.

    Raises:
        ValueError: an unknown name, a malformed pair, or ``"group"`` without ``num_groups``.
    """
    _check_dims(spatial_dims)
    if isinstance(norm_name, str):
        name, kwargs = norm_name, {}
    elif isinstance(norm_name, (tuple, list)) and len(norm_name) == 2 and isinstance(norm_name[1], Mapping):
        name, kwargs = norm_name[0], dict(norm_name[1])
    else:
        raise ValueError(f"norm_name must be a name or a (name, kwargs) pair, got {norm_name!r}")
    name = str(name).lower()
    if name == "group":
        if "num_groups" not in kwargs:
            raise ValueError(f"norm_name 'group' needs num_groups, e.g. ('group', {{'num_groups': 8}}), got {kwargs}")
        return nn.GroupNorm(num_channels=channels, **kwargs)
    if name not in _NORMS:
        raise ValueError(f"norm_name must be one of 'instance', 'batch', 'group', 'syncbatch', got {name!r}")
    return _NORMS[name][spatial_dims](channels, **kwargs)


def _conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    return _CONV[spatial_dims](in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)


def _up(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """2x transposed convolution (kernel = stride = 2), no bias."""
    return _CONV_T[spatial_dims](in_channels, out_channels, 2, stride=2, bias=False)


class BasicConvBlock(nn.Module):
    """``act(norm2(conv2(act(norm1(conv1(x))))))`` with 3x3(x3) bias-free convolutions and LeakyReLU(0.01).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        norm_name: see :func:`make_norm`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm_name: NormName) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        self.conv1 = _conv(spatial_dims, in_channels, out_channels, 3)
        self.conv2 = _conv(spatial_dims, out_channels, out_channels, 3)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = make_norm(norm_name, out_channels, spatial_dims)
        self.norm2 = make_norm(norm_name, out_channels, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrelu(self.norm1(self.conv1(x)))
        return self.lrelu(self.norm2(self.conv2(x)))


class ResConvBlock(nn.Module):
    """``act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))``, the shortcut a 1x1(x1) convolution and norm
    (``conv3``, ``norm3``) when the channels change, the identity otherwise.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        norm_name: see :func:`make_norm`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm_name: NormName) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        self.conv1 = _conv(spatial_dims, in_channels, out_channels, 3)
        self.conv2 = _conv(spatial_dims, out_channels, out_channels, 3)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = make_norm(norm_name, out_channels, spatial_dims)
        self.norm2 = make_norm(norm_name, out_channels, spatial_dims)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.conv3 = _conv(spatial_dims, in_channels, out_channels, 1)
            self.norm3 = make_norm(norm_name, out_channels, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.norm3(self.conv3(x)) if self.has_shortcut else x
        out = self.lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.lrelu(out + residual)


def make_conv_block(
    spatial_dims: int, in_channels: int, out_channels: int, norm_name: NormName, res_block: bool
) -> nn.Module:
    """:class:`ResConvBlock` when ``res_block``, else :class:`BasicConvBlock`."""
    cls = ResConvBlock if res_block else BasicConvBlock
    return cls(spatial_dims, in_channels, out_channels, norm_name)


class UpBlock(nn.Module):
    """Decoder step: ``conv_block(cat(transp_conv(x), skip))``; ``transp_conv`` doubles the size and maps to
    ``out_channels``, the skip has ``out_channels`` channels too.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser input.
        out_channels: output channels (and the skip's).
        norm_name: see :func:`make_norm`.
        res_block: a :class:`ResConvBlock` (else a :class:`BasicConvBlock`) after the concatenation.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm_name: NormName, res_block: bool = True
    ) -> None:
        super().__init__()
        self.transp_conv = _up(_check_dims(spatial_dims), in_channels, out_channels)
        self.conv_block = make_conv_block(spatial_dims, 2 * out_channels, out_channels, norm_name, res_block)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv(x)  # (B, C_out, 2 * S)
        if x.shape[2:] != skip.shape[2:]:
            raise ValueError(f"upsampled map {tuple(x.shape[2:])} and skip {tuple(skip.shape[2:])} differ in size")
        return self.conv_block(torch.cat((x, skip), dim=1))  # (B, 2 C_out, 2 * S) -> (B, C_out, 2 * S)


class ProjUpBlock(nn.Module):
    """Projection upsampling of a token map: ``transp_conv_init`` (2x, to ``out_channels``), then ``num_layer``
    more 2x steps, each a transposed convolution followed (``conv_block=True``) by a conv block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the token map.
        out_channels: output channels.
        num_layer: further 2x steps after ``transp_conv_init`` (total upsampling ``2^(num_layer + 1)``).
        norm_name: see :func:`make_norm`.
        conv_block: a conv block after each further transposed convolution (``blocks.{i}.{0: up, 1: block}``);
            ``False``: bare transposed convolutions (``blocks.{i}``).
        res_block: residual (else basic) conv blocks.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_layer: int,
        norm_name: NormName,
        conv_block: bool = True,
        res_block: bool = True,
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        self.transp_conv_init = _up(spatial_dims, in_channels, out_channels)
        if conv_block:
            self.blocks = nn.ModuleList(
                nn.Sequential(
                    _up(spatial_dims, out_channels, out_channels),
                    make_conv_block(spatial_dims, out_channels, out_channels, norm_name, res_block),
                )
                for _ in range(num_layer)
            )
        else:
            self.blocks = nn.ModuleList(_up(spatial_dims, out_channels, out_channels) for _ in range(num_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for block in self.blocks:
            x = block(x)
        return x
