"""Deformable convolution v2 (Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019).

:class:`DeformConv2d` is modulated deformable convolution on :func:`torchvision.ops.deform_conv2d`: every kernel
tap ``k`` of every output position ``p`` samples the input bilinearly at ``p_0 + p_k + Δp_k`` (zero outside the
image) and scales the sample by a modulation ``Δm_k`` before the weighted sum. By default the layer predicts
``Δp`` and ``Δm`` itself with a plain convolution ``conv_offset`` of the same geometry, as mmcv's
``ModulatedDeformConv2dPack`` (mmdet's ``DCNv2``) does, with the same parameter names (``weight``, ``bias``,
``conv_offset.weight``, ``conv_offset.bias``) and the same channel layout of the prediction, so the ``conv2`` of an
mmdet DCNv2 ResNet checkpoint loads as-is:

- channels ``[0, 2 * G * kh * kw)`` are the offsets, ``(dy, dx)`` interleaved per tap, tap-major within each of the
  ``G`` offset groups (the layout of torchvision's and mmcv's kernels);
- channels ``[2 * G * kh * kw, 3 * G * kh * kw)`` are modulation logits, ``Δm = sigmoid(logit)``.

``conv_offset`` starts at zero (the paper's and mmcv's initialisation): offsets 0 and modulation
``sigmoid(0) = 0.5``, so a fresh layer computes ``0.5 * conv(x, weight) + bias``. With ``modulated=False`` it is
DCNv1 (Dai et al., ICCV 2017): ``conv_offset`` predicts only offsets and a fresh layer equals ``conv(x, weight) +
bias``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv2d"]


def _pair(name: str, value: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


class DeformConv2d(nn.Module):
    """Modulated deformable convolution (DCNv2) with its own offset / modulation predictor ``conv_offset``.

    ``forward(x)`` predicts offsets and modulation from ``x`` with ``conv_offset``; ``forward(x, offset, mask)``
    uses the given ones instead (``mask=None`` then means no modulation, as in torchvision).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size, an int or ``(kh, kw)``.
        stride: stride, an int or a pair.
        padding: zero padding, an int or a pair.
        dilation: spacing of the kernel taps before deformation, an int or a pair.
        groups: convolution groups, dividing ``in_channels`` and ``out_channels``.
        bias: add a learnable bias.
        offset_groups: groups of input channels sharing one offset (and modulation) field, dividing
            ``in_channels`` (mmcv's ``deform_groups``).
        modulated: predict a modulation per tap (DCNv2); ``False`` predicts offsets only (DCNv1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        offset_groups: int = 1,
        modulated: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(offset_groups, int) or isinstance(offset_groups, bool) or offset_groups < 1:
            raise ValueError(f"offset_groups must be a positive int, got {offset_groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups must divide in_channels and out_channels, got groups={groups}, "
                f"in_channels={in_channels}, out_channels={out_channels}"
            )
        if in_channels % offset_groups:
            raise ValueError(
                f"offset_groups must divide in_channels, got offset_groups={offset_groups}, in_channels={in_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        self.groups = groups
        self.offset_groups = offset_groups
        self.modulated = bool(modulated)

        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.conv_offset = nn.Conv2d(
            in_channels,
            offset_groups * (3 if self.modulated else 2) * kh * kw,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    @property
    def num_taps(self) -> int:
        """Kernel taps per offset group, ``kh * kw``."""
        return self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        """``weight`` and ``bias`` as ``nn.Conv2d`` initialises them; ``conv_offset`` zero (see :meth:`init_offset`)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.num_taps
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.init_offset()

    def init_offset(self) -> None:
        """Zero ``conv_offset``: offsets 0 and modulation ``sigmoid(0) = 0.5`` for every input."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output (and of ``offset`` / ``mask``) for an input of ``height x width``."""
        size = []
        for n, k, s, p, d in zip((height, width), self.kernel_size, self.stride, self.padding, self.dilation):
            size.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return size[0], size[1]

    def predict_offset(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Offsets ``(B, 2 * G * kh * kw, H', W')`` and modulation ``(B, G * kh * kw, H', W')`` (``None`` for DCNv1).

        mmcv splits the prediction as ``o1, o2, m = chunk(out, 3, dim=1); offset = cat(o1, o2)``, which is its first
        two thirds; the slices below are the same channels without the concatenation.
        """
        out = self.conv_offset(x)  # (B, G * (3 or 2) * kh * kw, H', W')
        if not self.modulated:
            return out, None
        n = 2 * self.offset_groups * self.num_taps
        return out[:, :n], torch.sigmoid(out[:, n:])

    def _check_inputs(self, x: torch.Tensor, offset: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out_h, out_w = self.output_size(x.shape[-2], x.shape[-1])
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"x of size {tuple(x.shape[-2:])} is too small for kernel_size={self.kernel_size}, "
                f"padding={self.padding}, dilation={self.dilation}"
            )
        if offset is None:
            if mask is not None:
                raise ValueError("mask was given without offset: pass both, offset alone, or neither")
            return
        batch, taps = x.shape[0], self.offset_groups * self.num_taps
        expected = (batch, 2 * taps, out_h, out_w)
        if tuple(offset.shape) != expected:
            raise ValueError(
                f"offset must have shape (B, 2 * offset_groups * kh * kw, H_out, W_out) = {expected}, "
                f"got {tuple(offset.shape)}"
            )
        if mask is not None and tuple(mask.shape) != (batch, taps, out_h, out_w):
            raise ValueError(
                f"mask must have shape (B, offset_groups * kh * kw, H_out, W_out) = {(batch, taps, out_h, out_w)}, "
                f"got {tuple(mask.shape)}"
            )

    def forward(
        self, x: torch.Tensor, offset: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Deformable convolution of ``x``.

        Args:
            x: input ``(B, in_channels, H, W)``.
            offset: ``(B, 2 * offset_groups * kh * kw, H_out, W_out)`` sampling offsets ``(dy, dx)`` per tap in
                input pixels, or ``None`` to predict them (and the modulation) with ``conv_offset``.
            mask: ``(B, offset_groups * kh * kw, H_out, W_out)`` modulation per tap, used with ``offset``;
                ``None`` with an ``offset`` means no modulation (all ones).

        Returns:
            ``(B, out_channels, H_out, W_out)``.
        """
        self._check_inputs(x, offset, mask)
        if offset is None:
            offset, mask = self.predict_offset(x)
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if not self.modulated:
            s += ", modulated=False"
        return s
