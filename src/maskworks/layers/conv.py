"""Convolution -> normalisation -> activation, the block every CNN decoder is made of.

:class:`ConvNormAct` names its children ``0`` (conv), ``1`` (norm) and ``2`` (act), the layout of
segmentation_models_pytorch's ``Conv2dReLU``, so checkpoints of smp decoders load as-is.
A missing norm or activation is an ``nn.Identity`` placeholder: the indices never shift.
:class:`ConvBNReLU` is the same block under the names of the real-time segmentation code bases
(CoinCheung/BiSeNet: ``conv``, ``bn``, ``relu``; Tramac/Fast-SCNN: ``conv.0``, ``conv.1``, ``conv.2``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["ConvBNReLU", "ConvNormAct", "create_act"]


def create_act(act_layer: Callable[..., nn.Module] | None, inplace: bool = True) -> nn.Module:
    """Instantiate an activation class, in place when it supports it.

    Args:
        act_layer: activation class (``nn.ReLU``, ``nn.GELU``, ...) or ``None`` for identity.
        inplace: ask for an in-place activation where the class takes an ``inplace`` argument.

    Returns:
        The activation module.
    """
    if act_layer is None:
        return nn.Identity()
    try:
        return act_layer(inplace=inplace)
    except TypeError:  # e.g. nn.GELU, nn.Sigmoid have no `inplace`
        return act_layer()


class ConvNormAct(nn.Sequential):
    """``Conv2d`` -> norm -> activation as an ``nn.Sequential`` with children ``0``, ``1``, ``2``.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: convolution kernel size.
        stride: convolution stride.
        padding: convolution padding; ``None`` keeps the size at stride 1 (``dilation * (k - 1) // 2``).
        dilation: convolution dilation.
        groups: convolution groups.
        bias: convolution bias; ``None`` means a bias only when there is no norm layer.
        norm_layer: normalisation class called with ``out_ch`` (``nn.BatchNorm2d``), or ``None``.
        act_layer: activation class (``nn.ReLU``), or ``None``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool | None = None,
        norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        if bias is None:
            bias = norm_layer is None
        conv = nn.Conv2d(
            in_ch, out_ch, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias
        )
        norm = norm_layer(out_ch) if norm_layer is not None else nn.Identity()
        super().__init__(conv, norm, create_act(act_layer))


class ConvBNReLU(nn.Module):
    """``Conv2d`` (no bias) -> norm -> ReLU, the :class:`ConvNormAct` of the real-time segmentation code bases.

    Two key layouts:

    * ``nested=False`` (CoinCheung/BiSeNet): children ``conv`` (the ``Conv2d``), ``bn``, ``relu``;
    * ``nested=True`` (Tramac/Fast-SCNN's ``_ConvBNReLU``): one child ``conv``, the :class:`ConvNormAct`
      (keys ``conv.0.*``, ``conv.1.*``).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: kernel size (odd); the padding ``dilation * (kernel_size - 1) // 2`` keeps the size at
            stride 1.
        stride: convolution stride.
        dilation: convolution dilation.
        groups: convolution groups (``in_ch`` for a depthwise conv).
        norm_layer: normalisation class; :class:`~maskworks.layers.PooledBatchNorm2d` after global pooling.
        nested: the key layout, see above.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        nested: bool = False,
    ) -> None:
        super().__init__()
        block = ConvNormAct(
            in_ch, out_ch, kernel_size, stride=stride, dilation=dilation, groups=groups, norm_layer=norm_layer
        )
        self.nested = nested
        if nested:
            self.conv = block
        else:
            self.conv, self.bn, self.relu = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nested:
            return self.conv(x)
        return self.relu(self.bn(self.conv(x)))
