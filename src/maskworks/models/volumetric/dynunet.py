"""Dynamic U-Net (nnU-Net's network, Isensee et al. 2021) and the 3D U-Net of Cicek et al. (MICCAI 2016).

:class:`DynUNet` (``dynunet``) takes its topology from a plan (``maskworks plan``): per stage a kernel size and a
stride per axis (anisotropic data gets ``1x3x3`` kernels and ``(1, 2, 2)`` strides until the spacing evens out),
features doubling from 32 up to 320, two conv-InstanceNorm-LeakyReLU per stage (optionally residual), transposed
convolutions up, one 1x1 head per decoder level for deep supervision. Its state dict converts from MONAI's
``DynUNet`` (:func:`maskworks.convert.convert_monai_dynunet`) and it computes the same function.

:class:`UNet3D` (``unet3d``) is the 3D U-Net paper's network: three poolings, two 3x3x3 conv + BatchNorm + ReLU per
level with the channels doubling inside the analysis blocks (32-64, 64-128, 128-256, 256-512), 2x2x2 transposed
convolutions, concatenated skips, same padding.

Both take volumes ``(B, C, D, H, W)`` of any size (padded internally to the product of the strides, logits
cropped back). Deep supervision outputs (training only, when enabled) come as ``{"out": logits, "aux": [...]}``,
highest resolution first, at their own resolution (the loss downsamples the target, as nnU-Net does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.models.volumetric.unetr import crop_nd, resolve_out_channels
from maskworks.registry import register_model

__all__ = ["DynUNet", "UNet3D", "ConvBlock3d", "UpBlock3d", "default_topology", "pad_volume", "nnunet_ds_weights"]

Triple = tuple[int, int, int]


def _triple(v: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    t = (int(v),) * ndim if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)
    if len(t) != ndim or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or {ndim} of them, got {v!r}")
    return t


def _padding(kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    pad = tuple((k - s + 1) / 2 for k, s in zip(kernel, stride))
    if min(pad) < 0:
        raise ValueError(f"kernel {tuple(kernel)} smaller than stride {tuple(stride)}")
    return tuple(int(p) for p in pad)


def pad_volume(x: torch.Tensor, multiple: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the end of each spatial axis of ``x`` to a multiple of ``multiple`` (per axis); returns the padded
    tensor and the original spatial size (crop back with ``y[..., :d, :h, :w]``)."""
    size = tuple(x.shape[2:])
    pad = []
    for s, m in zip(reversed(size), reversed(tuple(multiple))):
        pad += [0, (-s) % m]
    return (F.pad(x, pad) if any(pad) else x), size


def nnunet_ds_weights(n: int) -> list[float]:
    """nnU-Net's deep-supervision weights for ``n`` outputs (highest resolution first): ``1 / 2**i``, the lowest
    resolution output set to 0, normalised to sum 1. ``[1.0]`` for one output."""
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    if n == 1:
        return [1.0]
    w = np.array([1.0 / 2**i for i in range(n)])
    w[-1] = 0.0
    return (w / w.sum()).tolist()


def _norm(kind: str, channels: int, ndim: int) -> nn.Module:
    if kind == "instance":
        return (nn.InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if kind == "batch":
        return (nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d)(channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {kind!r}")


class ConvBlock3d(nn.Module):
    """Two convolutions, each followed by a norm and LeakyReLU (the first strided); ``residual=True`` adds the
    input (through a strided 1x1 conv + norm when the shape changes) before the last activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        norm: str = "instance",
        negative_slope: float = 0.01,
        dropout: float | None = None,
        residual: bool = False,
    ):
        super().__init__()
        ndim = len(kernel_size)
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.conv1 = conv(in_channels, out_channels, kernel_size, stride, _padding(kernel_size, stride), bias=False)
        self.norm1 = _norm(norm, out_channels, ndim)
        self.conv2 = conv(out_channels, out_channels, kernel_size, 1, _padding(kernel_size, [1] * ndim), bias=False)
        self.norm2 = _norm(norm, out_channels, ndim)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.residual = residual
        if residual and (in_channels != out_channels or any(s != 1 for s in stride)):
            self.conv3 = conv(in_channels, out_channels, 1, stride, 0, bias=False)
            self.norm3 = _norm(norm, out_channels, ndim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.drop(self.conv1(x))))
        out = self.norm2(self.drop(self.conv2(out)))
        if self.residual:
            skip = self.norm3(self.conv3(x)) if hasattr(self, "conv3") else x
            out = out + skip
        return self.act(out)


class UpBlock3d(nn.Module):
    """Transposed convolution (kernel = stride), concatenation with the skip, then a :class:`ConvBlock3d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        norm: str = "instance",
        negative_slope: float = 0.01,
        dropout: float | None = None,
        bias: bool = False,
    ):
        super().__init__()
        tconv = nn.ConvTranspose3d if len(stride) == 3 else nn.ConvTranspose2d
        self.transp_conv = tconv(in_channels, out_channels, stride, stride, bias=bias)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        one = [1] * len(stride)
        self.conv_block = ConvBlock3d(2 * out_channels, out_channels, kernel_size, one, norm, negative_slope, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.drop(self.transp_conv(x)), skip], 1))


def default_topology(num_stages: int = 5, spatial_dims: int = 3) -> dict[str, list]:
    """An isotropic plan: kernel 3, strides ``[1, 2, 2, ...]``, features ``32 * 2**i`` capped at 320 (3D) / 512 (2D)."""
    if num_stages < 3:
        raise ValueError(f"num_stages must be >= 3, got {num_stages}")
    one, two, three = [1] * spatial_dims, [2] * spatial_dims, [3] * spatial_dims
    return {
        "kernel_size": [three] * num_stages,
        "strides": [one] + [two] * (num_stages - 1),
        "filters": [min(32 * 2**i, 320 if spatial_dims == 3 else 512) for i in range(num_stages)],
    }


def _read_plan(plan: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such plan file (write one with `maskworks plan DATA --out plan.json`)")
        plan = json.loads(path.read_text())
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict or a JSON file path, got {type(plan).__name__}")
    return plan


class DynUNet(nn.Module):
    """nnU-Net's dynamic U-Net with MONAI ``DynUNet``'s arguments (see the module docstring).

    Args:
        in_channels: input channels (modalities).
        out_channels: classes (logits channels); ``num_classes`` is an alias.
        kernel_size: per stage, one int or one per axis (``len(strides)`` stages, at least 3).
        strides: per stage; the first applies to the input block (usually 1).
        upsample_kernel_size: per decoder stage, must equal ``strides[1:]`` (kept for MONAI's signature).
        filters: features per stage (default ``min(32 * 2**i, 320)``).
        spatial_dims: 3 (volumes) or 2 (slices).
        norm: ``"instance"`` (affine, nnU-Net) or ``"batch"``.
        negative_slope: LeakyReLU slope (0.01).
        dropout: dropout after each convolution (None: none).
        deep_supervision: return the decoder's lower-resolution logits too in training.
        deep_supr_num: how many of them (default: every decoder level but the bottleneck's, as nnU-Net).
        res_block: residual convolution blocks.
        trans_bias: biases in the transposed convolutions.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        kernel_size: Sequence[int | Sequence[int]] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        upsample_kernel_size: Sequence[int | Sequence[int]] | None = None,
        filters: Sequence[int] | None = None,
        spatial_dims: int = 3,
        norm: str = "instance",
        negative_slope: float = 0.01,
        dropout: float | None = None,
        deep_supervision: bool = False,
        deep_supr_num: int | None = None,
        res_block: bool = False,
        trans_bias: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__()
        out_channels = resolve_out_channels(out_channels, num_classes)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        topo = default_topology(5, spatial_dims)
        kernel_size = topo["kernel_size"] if kernel_size is None else kernel_size
        strides = topo["strides"][: len(kernel_size)] if strides is None else strides
        if len(kernel_size) != len(strides) or len(strides) < 3:
            raise ValueError(
                f"kernel_size and strides need the same length, at least 3; got {len(kernel_size)} and {len(strides)}"
            )
        kernels = [_triple(k, spatial_dims, f"kernel_size[{i}]") for i, k in enumerate(kernel_size)]
        strides_ = [_triple(s, spatial_dims, f"strides[{i}]") for i, s in enumerate(strides)]
        if upsample_kernel_size is not None:
            up = [_triple(u, spatial_dims, "upsample_kernel_size") for u in upsample_kernel_size]
            if up != strides_[1:]:
                raise ValueError(f"upsample_kernel_size must equal strides[1:] = {strides_[1:]}, got {up}")
        n = len(strides_)
        if filters is None:
            filters = [min(32 * 2**i, 320 if spatial_dims == 3 else 512) for i in range(n)]
        if len(filters) < n:
            raise ValueError(f"filters needs {n} entries (one per stage), got {len(filters)}")
        filters = [int(f) for f in filters[:n]]
        if deep_supr_num is None:
            deep_supr_num = max(1, n - 2)
        if deep_supervision and not 1 <= deep_supr_num < n - 1:
            raise ValueError(f"deep_supr_num must be in 1..{n - 2} for {n} stages, got {deep_supr_num}")
        self.kernel_size, self.strides, self.filters = kernels, strides_, filters
        self.in_channels, self.out_channels, self.spatial_dims = in_channels, out_channels, spatial_dims
        self.deep_supervision, self.deep_supr_num, self.norm = deep_supervision, deep_supr_num, norm
        block = {"norm": norm, "negative_slope": negative_slope, "dropout": dropout}
        self.input_block = ConvBlock3d(in_channels, filters[0], kernels[0], strides_[0], residual=res_block, **block)
        self.downsamples = nn.ModuleList(
            ConvBlock3d(filters[i - 1], filters[i], kernels[i], strides_[i], residual=res_block, **block)
            for i in range(1, n - 1)
        )
        self.bottleneck = ConvBlock3d(filters[-2], filters[-1], kernels[-1], strides_[-1], residual=res_block, **block)
        # decoder, deepest first: upsamples[j] brings stage n-1-j up to stage n-2-j
        self.upsamples = nn.ModuleList(
            UpBlock3d(filters[i + 1], filters[i], kernels[i + 1], strides_[i + 1], bias=trans_bias, **block)
            for i in reversed(range(n - 1))
        )
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.output_block = conv(filters[0], out_channels, 1)
        if deep_supervision:  # heads on the decoder outputs at stages 1..deep_supr_num
            self.deep_supervision_heads = nn.ModuleList(
                conv(filters[i + 1], out_channels, 1) for i in range(deep_supr_num)
            )
        self.apply(_init_weights)

    @property
    def size_multiple(self) -> tuple[int, ...]:
        """Each input axis must divide by this (the product of the strides); inputs are padded to it."""
        return tuple(int(np.prod([s[a] for s in self.strides])) for a in range(self.spatial_dims))

    @classmethod
    def from_plan(cls, plan: dict[str, Any] | str | Path, **overrides: Any) -> DynUNet:
        """Build from a ``maskworks plan`` JSON (or its dict): its ``kernel_size``, ``strides``, ``filters``,
        ``num_input_channels`` and ``num_classes``; ``overrides`` win."""
        plan = _read_plan(plan)
        kwargs = {
            "in_channels": plan.get("num_input_channels", 1),
            "out_channels": plan.get("num_classes"),
            "kernel_size": plan["kernel_size"],
            "strides": plan["strides"],
            "filters": plan.get("filters"),
            "spatial_dims": 2 if plan.get("dimension") == "2d" else 3,
        }
        kwargs.update(overrides)
        if kwargs.get("num_classes") is not None:
            kwargs["out_channels"] = kwargs.pop("num_classes")
        return cls(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"DynUNet with spatial_dims={self.spatial_dims} expects {self.spatial_dims + 2}D input, got {tuple(x.shape)}"
            )
        x, size = pad_volume(x, self.size_multiple)
        if self.norm == "instance" and all(s == m for s, m in zip(x.shape[2:], self.size_multiple)):
            raise ValueError(
                f"input {tuple(size)} pools to a single voxel at the bottleneck (strides multiply to "
                f"{self.size_multiple}), where instance norm is undefined: use an input at least twice that along "
                "one axis, or fewer stages"
            )
        skips = [self.input_block(x)]
        for down in self.downsamples:
            skips.append(down(skips[-1]))
        y = self.bottleneck(skips[-1])
        decoded = []
        for up, skip in zip(self.upsamples, reversed(skips)):
            y = up(y, skip)
            decoded.append(y)
        # decoded[-1] is stage 0, decoded[-2] stage 1, ...
        out = self.output_block(decoded[-1])
        first = [int(np.prod(s)) for s in zip(*self.strides[:1])]
        logits = crop_nd(out, [s // f for s, f in zip(size, first)]) if max(first) > 1 else crop_nd(out, size)
        if not (self.training and self.deep_supervision):
            return logits
        aux = []
        for i, head in enumerate(self.deep_supervision_heads):
            feat = decoded[-2 - i]
            aux.append(crop_nd(head(feat), [-(-s // m) for s, m in zip(size, _stride_product(self.strides[: i + 2]))]))
        return {"out": logits, "aux": aux}


def _stride_product(strides: Sequence[Sequence[int]]) -> list[int]:
    return [int(np.prod(a)) for a in zip(*strides)]


def _init_weights(module: nn.Module) -> None:
    """He initialisation with LeakyReLU's slope, zero biases (nnU-Net's InitWeights_He)."""
    if isinstance(module, (nn.Conv3d, nn.Conv2d, nn.ConvTranspose3d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model(task="volumetric")
def dynunet(
    num_classes: int | None = None,
    in_channels: int = 1,
    plan: dict[str, Any] | str | Path | None = None,
    **kwargs: Any,
) -> DynUNet:
    """nnU-Net's dynamic U-Net; ``plan=`` (a ``maskworks plan`` JSON) sets the topology, otherwise the arguments of
    :class:`DynUNet` (default: 5 isotropic stages)."""
    if plan is not None:
        return DynUNet.from_plan(plan, in_channels=in_channels, num_classes=num_classes, **kwargs)
    out_channels = kwargs.pop("out_channels", None)
    return DynUNet(in_channels, resolve_out_channels(out_channels, num_classes), **kwargs)


class UNet3D(nn.Module):
    """The 3D U-Net of Cicek et al. (see the module docstring); 19,071,459 parameters with the defaults
    (``base_channels=32``, one input channel, 3 classes).

    Args:
        in_channels: input channels.
        num_classes: classes (logits channels); ``out_channels`` is an alias.
        base_channels: channels of the first convolution (32 in the paper).
        depth: number of poolings (3 in the paper).
        norm: ``"batch"`` (the paper) or ``"instance"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int | None = None,
        base_channels: int = 32,
        depth: int = 3,
        norm: str = "batch",
        out_channels: int | None = None,
    ):
        super().__init__()
        num_classes = resolve_out_channels(out_channels, num_classes)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")

        def double(cin: int, mid: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(cin, mid, 3, padding=1, bias=False), _norm(norm, mid, 3), nn.ReLU(inplace=True),
                nn.Conv3d(mid, cout, 3, padding=1, bias=False), _norm(norm, cout, 3), nn.ReLU(inplace=True),
            )  # fmt: skip

        c = base_channels
        # analysis: level l has convs (c_l, 2 c_l) with c_0 = base, c_l = 2 c_{l-1}... as in the paper (32-64, 64-128)
        self.encoder = nn.ModuleList()
        cin, widths = in_channels, []
        for level in range(depth + 1):
            mid = c * 2**level
            self.encoder.append(double(cin, mid, 2 * mid))
            widths.append(2 * mid)
            cin = 2 * mid
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose3d(cin, cin, 2, 2))
            out = widths[level]
            self.decoder.append(double(cin + widths[level], out, out))
            cin = out
        self.head = nn.Conv3d(cin, num_classes, 1)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"UNet3D expects (B, C, D, H, W) input, got {tuple(x.shape)}")
        x, size = pad_volume(x, (2**self.depth,) * 3)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([up(x), skips.pop()], 1))
        return crop_nd(self.head(x), size)


@register_model(task="volumetric")
def unet3d(num_classes: int | None = None, in_channels: int = 1, **kwargs: Any) -> UNet3D:
    """The 3D U-Net of Cicek et al. (2016); see :class:`UNet3D`."""
    return UNet3D(in_channels=in_channels, num_classes=num_classes, **kwargs)
