"""Hybrid Vision Transformers: a convolutional tokenizer in front of a ViT encoder.

Two families, both built on :class:`maskworks.backbones.vit.VisionTransformer` by replacing its patchify stem
(``embed_layer``), so blocks, position table, heads and ``forward_intermediates`` are the core's:

* **R50 + ViT-B/16** of Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
  at Scale", ICLR 2021 (Sec. 3.1 "Hybrid Architecture"). The tokens are the 1x1-projected stride-16 map of a
  ResNet-50 v2 cut after its third stage, which is extended from 6 to 9 blocks (layers ``(3, 4, 9)``). That
  ResNet is BiT's (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020), *without* pre-activation: every
  convolution is weight-standardised (Qiao et al., "Weight Standardization", 2019; :class:`StdConv2d`, eps 1e-8)
  and followed by GroupNorm(32) (+ ReLU). The official weights were trained with TensorFlow "SAME" padding, so
  the stem and the stride-2 convolutions pad asymmetrically (``padding="same"``; the 3x3 / 2 max pool pads with
  ``-inf``). Parameter names equal timm's ``vit_base_r50_s16_224`` / ``vit_base_r50_s16_384`` (``HybridEmbed``
  over ``ResNetV2``): ``patch_embed.backbone.stem.{conv,norm}``,
  ``patch_embed.backbone.stages.{i}.blocks.{j}.{conv1,norm1,conv2,norm2,conv3,norm3,downsample.conv,
  downsample.norm}``, ``patch_embed.proj``, then the ViT keys, so a timm state dict loads with ``strict=True``
  and gives the same outputs. (``patch_embed.backbone.norm`` is an identity without parameters, as in timm,
  because the blocks are not pre-activation.)
* **Early convolutions** (Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021):
  the 16x16 / 16 patchify convolution is replaced by ``log2(patch)`` 3x3 / 2 convolutions with BatchNorm and
  ReLU, then a 1x1 convolution to ``embed_dim`` (:class:`ConvStemEmbed`). The paper removes one transformer
  block to keep the FLOPs equal; ``vit_small_convstem_patch16_224`` does the same (11 blocks, stem channels
  48 / 96 / 192 / 384, the paper's ViT_C-4GF). The children are named as torchvision's
  ``VisionTransformer(conv_stem_configs=...)`` numbers them (``stem.{i}.{0: conv, 1: bn, 2: relu}``), so
  :func:`maskworks.convert.vit_hf_tv.convert_torchvision_vit` also converts those checkpoints.

CNN skips for U-shaped decoders (TransUNet, Chen et al. 2021): :meth:`HybridVisionTransformer.forward_cnn_features`
returns the tokenizer's maps that are finer than the token grid (R50: the stem at 1/2, stage 1 at 1/4, stage 2
at 1/8; their channels and reductions are in ``cnn_feature_info``), and
:meth:`HybridVisionTransformer.forward_hybrid` returns those maps *and* the ViT block maps from one forward pass.
``feature_info`` stays the ViT's (one entry per block, reduction 16), as timm's.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.backbones.vit import VisionTransformer
from maskworks.layers.conv import ConvNormAct
from maskworks.layers.vit_layers import DropPath, LayerFactory, _PatchGrid, to_2tuple
from maskworks.layers.weight_init import init_kaiming
from maskworks.registry import register_model

__all__ = [
    "StdConv2d",
    "MaxPool2dSame",
    "GroupNormAct",
    "ResNetV2Bottleneck",
    "ResNetV2",
    "HybridEmbed",
    "ConvStemEmbed",
    "HybridVisionTransformer",
    "vit_base_r50_s16_224",
    "vit_base_r50_s16_384",
    "vit_test_r50_s16",
    "vit_small_convstem_patch16_224",
    "vit_test_convstem_patch16",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# TF "SAME" padding, weight-standardised convolution, GroupNorm + act
# ---------------------------------------------------------------------------------------------------------------


def _same_pad_amount(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total TF-"SAME" padding of one axis: the output has ``ceil(size / stride)`` positions."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    value: float = 0.0,
) -> torch.Tensor:
    """Pad ``x`` ``(B, C, H, W)`` as TensorFlow's ``padding="SAME"`` does: the odd pixel goes right / bottom."""
    pad_h = _same_pad_amount(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    pad_w = _same_pad_amount(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


def _resolve_padding(
    padding: int | str | None, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int | tuple[int, int], bool]:
    """``(static padding, dynamic SAME)`` for a conv / pool: ``None`` is PyTorch-style symmetric padding
    ``((s - 1) + d (k - 1)) // 2`` (timm's ``get_padding``), ``"same"`` is TF SAME (static when stride 1 and the
    kernel extent is odd, dynamic otherwise), ``"valid"`` is 0."""
    if padding is None:
        return tuple(((s - 1) + d * (k - 1)) // 2 for k, s, d in zip(kernel_size, stride, dilation)), False
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, False
        if mode != "same":
            raise ValueError(f"padding must be an int, None, 'same' or 'valid', got {padding!r}")
        static = all(s == 1 and (d * (k - 1)) % 2 == 0 for k, s, d in zip(kernel_size, stride, dilation))
        if static:
            return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation)), False
        return 0, True
    return padding, False


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization: each output filter is normalised to zero mean and unit variance
    (biased, over ``in * k * k``) before the convolution, ``w_hat = (w - mean) / sqrt(var + eps)``.

    The same layer as timm's ``StdConv2d`` (``padding=None``) and ``StdConv2dSame`` (``padding="same"``).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size.
        stride: stride.
        padding: ``None`` (symmetric, ``((s - 1) + d (k - 1)) // 2``), ``"same"`` (TF SAME, asymmetric and
            input-size dependent for stride > 1), ``"valid"`` or an explicit int.
        dilation: dilation.
        groups: groups.
        bias: add a bias.
        eps: added to the filter variance (1e-8 in the ViT hybrids, 1e-6 timm's default).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | str | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        k, s, d = to_2tuple(kernel_size, "kernel_size"), to_2tuple(stride, "stride"), to_2tuple(dilation, "dilation")
        static_pad, same_pad = _resolve_padding(padding, k, s, d)
        super().__init__(in_channels, out_channels, k, s, static_pad, d, groups, bias)
        self.same_pad = same_pad
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        """The standardised kernel ``(O, I / groups, k, k)``."""
        # batch_norm in training mode over (1, O, I*k*k) = per-filter mean / biased variance, as timm computes it
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        )  # (1, O, I * k * k)
        return w.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TF "SAME" padding (pads with ``-inf``, so padding never wins the max)."""

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None) -> None:
        k = to_2tuple(kernel_size, "kernel_size")
        s = to_2tuple(stride if stride is not None else kernel_size, "stride")
        super().__init__(k, s, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, 0)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by an activation (timm's ``GroupNormAct``; parameters ``weight`` / ``bias``).

    Args:
        num_channels: channels; must be divisible by ``num_groups``.
        num_groups: groups.
        eps: GroupNorm epsilon.
        apply_act: apply ``act_layer`` after the norm (``act`` is an identity otherwise).
        act_layer: activation class.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        apply_act: bool = True,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


# ---------------------------------------------------------------------------------------------------------------
# ResNet v2 (BiT) without pre-activation: the ViT-hybrid tokenizer
# ---------------------------------------------------------------------------------------------------------------


class _ChannelGroupNormAct(GroupNormAct):
    """GroupNorm with one group per channel (``GroupNorm(C, C)``), + optional act."""

    def __init__(self, num_channels: int, eps: float = 1e-5, apply_act: bool = True) -> None:
        super().__init__(num_channels, num_groups=num_channels, eps=eps, apply_act=apply_act)


class DownsampleConv(nn.Module):
    """Projection shortcut: strided 1x1 ``conv`` then ``norm`` (no activation)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, conv_layer: LayerFactory, norm_layer: LayerFactory):
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=stride)
        self.norm = norm_layer(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ResNetV2Bottleneck(nn.Module):
    """Post-activation bottleneck (ResNet v1.5 order, stride in the 3x3) with WS convs and GroupNorm (timm's
    ``resnetv2.Bottleneck``): ``act3(norm3(conv3(norm1/2...(x))) + shortcut)``.

    Args:
        in_chs: input channels.
        out_chs: output channels (``4 x`` the bottleneck width).
        stride: stride of ``conv2`` and of the projection shortcut.
        bottle_ratio: bottleneck width as a fraction of ``out_chs``.
        downsample: build the projection shortcut (first block of a stage).
        conv_layer: convolution class (``StdConv2d`` with the padding and eps bound).
        norm_layer: norm + act class called with channels and ``apply_act``.
        drop_path: stochastic depth of the residual branch.
        proj_norm_layer: norm class of the projection shortcut (``None``: ``norm_layer``).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        bottle_ratio: float = 0.25,
        downsample: bool = False,
        conv_layer: LayerFactory = StdConv2d,
        norm_layer: LayerFactory = GroupNormAct,
        drop_path: float = 0.0,
        proj_norm_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        mid_chs = _make_divisible(out_chs * bottle_ratio)
        proj_norm_layer = proj_norm_layer or norm_layer
        self.downsample = DownsampleConv(in_chs, out_chs, stride, conv_layer, proj_norm_layer) if downsample else None
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.norm1 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride)
        self.norm2 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, 1)
        self.norm3 = norm_layer(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act3 = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class ResNetStage(nn.Module):
    """``depth`` bottlenecks; the first one strides and projects (``blocks.{j}``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        depth: int,
        conv_layer: LayerFactory,
        norm_layer: LayerFactory,
        drop_path: Sequence[float] | None = None,
        proj_norm_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                ResNetV2Bottleneck(
                    in_chs if j == 0 else out_chs,
                    out_chs,
                    stride=stride if j == 0 else 1,
                    downsample=j == 0,
                    conv_layer=conv_layer,
                    norm_layer=norm_layer,
                    drop_path=drop_path[j],
                    proj_norm_layer=proj_norm_layer,
                )
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's ``make_divisible``: round ``v`` to a multiple of ``divisor``, never more than 10% down."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


_STEM_TYPES = ("same", "fixed", "", "valid")


class ResNetV2(nn.Module):
    """BiT ResNet v2 feature extractor without pre-activation, as the ViT-hybrid tokenizer (timm's ``ResNetV2``
    with ``preact=False``, ``num_classes=0``, ``global_pool=""``).

    Stem: 7x7 / 2 WS conv -> GroupNorm + ReLU -> 3x3 / 2 max pool; then one stage per entry of ``layers``
    (stride 1 for the first, 2 for the others) of :class:`ResNetV2Bottleneck`. Every stride-2 operation maps a
    size ``n`` to ``ceil(n / 2)`` in all padding modes, so the last map of an ``(H, W)`` input is
    ``ceil(H / r) x ceil(W / r)`` (:meth:`dynamic_feat_size`), except with ``stem_type="valid"`` (the pool maps
    ``n`` to ``floor((n - 1) / 2)``; at multiples of 16 only the 1/4 maps are one pixel short).

    Args:
        layers: blocks per stage; ``(3, 4, 9)`` for the R50 hybrid (stride 16), ``(3, 4, 6, 3)`` for a full R50.
        channels: output channels of the stages (the first ``len(layers)`` are used).
        in_channels: channels of the input image.
        stem_chs: stem width.
        stem_type: ``"same"`` (TF SAME max pool, the ViT hybrid), ``"fixed"`` (constant pad 1 + unpadded pool,
            BiT), ``""`` (PyTorch pool padding 1) or ``"valid"`` (unpadded pool, the official TransUNet code's
            ``ResNetV2``).
        conv_padding: padding of every convolution, ``"same"`` (the ViT hybrid, timm's ``StdConv2dSame``) or
            ``None`` (symmetric, timm's ``StdConv2d``).
        ws_eps: weight-standardisation epsilon.
        num_groups: GroupNorm groups.
        drop_path_rate: stochastic depth, increasing linearly over all blocks up to this value.
        norm_eps: GroupNorm epsilon of the stem and the block norms (timm: 1e-5; official TransUNet: 1e-6).
        proj_num_groups: GroupNorm groups of the projection shortcuts' norms; ``None``: ``num_groups``;
            ``"channels"``: one group per channel (the official TransUNet code's ``GroupNorm(cout, cout)``).
        proj_norm_eps: GroupNorm epsilon of the projection shortcuts' norms; ``None``: ``norm_eps``.

    Attributes:
        feature_info: ``{"num_chs", "reduction", "module"}`` of the stem map (after its norm, before the pool,
            reduction 2) and of each stage.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 9),
        channels: Sequence[int] = (256, 512, 1024, 2048),
        in_channels: int = 3,
        stem_chs: int = 64,
        stem_type: str = "same",
        conv_padding: str | None = "same",
        ws_eps: float = 1e-8,
        num_groups: int = 32,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        proj_num_groups: int | str | None = None,
        proj_norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        if not layers or len(layers) > len(channels) or any(not isinstance(d, int) or d < 1 for d in layers):
            raise ValueError(f"layers must be 1..{len(channels)} positive block counts, got {layers!r}")
        if stem_type not in _STEM_TYPES:
            raise ValueError(f"stem_type must be one of {_STEM_TYPES}, got {stem_type!r}")
        if conv_padding not in ("same", None):
            raise ValueError(f"conv_padding must be 'same' or None, got {conv_padding!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        conv_layer = partial(StdConv2d, padding=conv_padding, eps=ws_eps)
        norm_layer = partial(GroupNormAct, num_groups=num_groups, eps=norm_eps)
        proj_eps = norm_eps if proj_norm_eps is None else proj_norm_eps
        if proj_num_groups == "channels":
            proj_norm_layer = partial(_ChannelGroupNormAct, eps=proj_eps)
        elif proj_num_groups is None or (isinstance(proj_num_groups, int) and proj_num_groups > 0):
            proj_norm_layer = partial(GroupNormAct, num_groups=proj_num_groups or num_groups, eps=proj_eps)
        else:
            raise ValueError(f"proj_num_groups must be None, a positive int or 'channels', got {proj_num_groups!r}")
        self.stem_type = stem_type

        stem: OrderedDict[str, nn.Module] = OrderedDict()
        stem["conv"] = conv_layer(in_channels, stem_chs, kernel_size=7, stride=2)
        stem["norm"] = norm_layer(stem_chs)
        if stem_type == "fixed":
            stem["pad"] = nn.ConstantPad2d(1, 0.0)
            stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
        elif stem_type == "same":
            stem["pool"] = MaxPool2dSame(kernel_size=3, stride=2)
        elif stem_type == "valid":
            stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
        else:
            stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stem = nn.Sequential(stem)
        self.feature_info = [{"num_chs": stem_chs, "reduction": 2, "module": "stem.norm"}]

        dpr = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        self.stages = nn.Sequential()
        prev_chs, reduction, start = stem_chs, 4, 0
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            self.stages.add_module(
                str(i),
                ResNetStage(
                    prev_chs,
                    out_chs,
                    stride,
                    depth,
                    conv_layer,
                    norm_layer,
                    dpr[start : start + depth],
                    proj_norm_layer,
                ),
            )
            prev_chs, reduction, start = out_chs, reduction * stride, start + depth
            self.feature_info.append({"num_chs": out_chs, "reduction": reduction, "module": f"stages.{i}"})
        self.num_features = prev_chs
        self.norm = nn.Identity()  # pre-activation models normalise here; post-activation ones need nothing
        self._init_weights()

    def _init_weights(self) -> None:
        init_kaiming(self, norm_types=(nn.GroupNorm,))  # timm's ResNetV2 initialisation

    @property
    def reduction(self) -> int:
        """Reduction of the last map."""
        return self.feature_info[-1]["reduction"]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Size ``(H', W')`` of the last map for an input of size ``img_size`` (``ceil(H / r), ceil(W / r)``)."""
        if self.stem_type == "valid":  # stem ceil(n / 2), unpadded pool floor((n - 1) / 2), stages ceil(n / 2)
            stages = len(self.stages) - 1
            return tuple(-(-((math.ceil(n / 2) - 1) // 2) // 2**stages) for n in img_size)
        return math.ceil(img_size[0] / self.reduction), math.ceil(img_size[1] / self.reduction)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem map (normed, before the pool) and every stage output, as listed in ``feature_info``.

        Args:
            x: images ``(B, in_channels, H, W)``.

        Returns:
            Maps ``(B, C_i, ceil(H / r_i), ceil(W / r_i))``.
        """
        x = self.stem.norm(self.stem.conv(x))
        features = [x]
        for name, layer in self.stem.named_children():
            if name not in ("conv", "norm"):
                x = layer(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        features[-1] = self.norm(features[-1])
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map ``(B, num_features, ceil(H / r), ceil(W / r))``."""
        return self.norm(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


# ---------------------------------------------------------------------------------------------------------------
# Embedding layers (called by VisionTransformer like PatchEmbed)
# ---------------------------------------------------------------------------------------------------------------


def _check_size(module: nn.Module, h: int, w: int) -> None:
    if module.strict_img_size and module.img_size is not None and (h, w) != module.img_size:
        raise ValueError(
            f"input size {(h, w)} does not match img_size {module.img_size}; build the model with "
            "dynamic_img_size=True for other sizes"
        )


class HybridEmbed(nn.Module):
    """CNN feature map -> tokens: ``backbone`` -> last map ``(B, C_f, H_f, W_f)`` -> ``proj`` (a conv with kernel =
    stride = ``patch_size``, usually 1) -> ``(B, N, embed_dim)`` (timm's ``HybridEmbed``).

    The backbone may return a map or a list of maps (the last is tokenised). Its last map's channels and
    reduction come from ``backbone.feature_info[-1]`` (or ``num_features``); its size for an input size comes
    from ``backbone.dynamic_feat_size`` when it has one, otherwise ``ceil(H / reduction)`` (checked at forward).

    Args:
        backbone: the CNN, built for ``in_channels`` inputs.
        img_size: input size the position table is built for; ``None`` derives nothing (any size).
        patch_size: patch size on the feature map (total reduction = backbone reduction x patch size).
        in_channels: input channels (must match the backbone's first conv).
        embed_dim: token dimension.
        bias: bias of ``proj``.
        strict_img_size: inputs must be exactly ``img_size``.
        dynamic_img_pad: pad the *feature map* right / bottom to a multiple of ``patch_size``.
        proj: project with ``proj``; ``False`` requires ``backbone`` channels == ``embed_dim``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int | tuple[int, int] = 1,
        in_channels: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        proj: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        backbone_in = getattr(backbone, "in_channels", in_channels)
        if backbone_in != in_channels:
            raise ValueError(f"in_channels ({in_channels}) differs from the backbone's in_channels ({backbone_in})")
        self.backbone = backbone
        self.in_channels = in_channels
        self.patch_size = to_2tuple(patch_size, "patch_size")
        info = getattr(backbone, "feature_info", None)
        if info:
            self.feature_dim = int(info[-1]["num_chs"])
            self.feature_ratio = to_2tuple(info[-1]["reduction"], "reduction")
        elif hasattr(backbone, "num_features") and hasattr(backbone, "reduction"):
            self.feature_dim = int(backbone.num_features)
            self.feature_ratio = to_2tuple(backbone.reduction, "reduction")
        else:
            raise ValueError("backbone must publish feature_info (num_chs / reduction of its last map)")
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        if img_size is None:
            self.img_size = self.feature_size = self.grid_size = self.num_patches = None
        else:
            self.img_size = to_2tuple(img_size, "img_size")
            self.feature_size = self._backbone_size(self.img_size)
            self.grid_size = self.dynamic_feat_size(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            if self.num_patches == 0:
                raise ValueError(f"img_size {self.img_size} gives an empty token grid")
            if not dynamic_img_pad and any(f % p for f, p in zip(self.feature_size, self.patch_size)):
                raise ValueError(
                    f"feature map {self.feature_size} of img_size {self.img_size} is not divisible by patch_size "
                    f"{self.patch_size} (use dynamic_img_pad=True)"
                )
        if proj:
            self.proj = nn.Conv2d(self.feature_dim, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)
        else:
            if self.feature_dim != embed_dim or self.patch_size != (1, 1):
                raise ValueError(
                    f"proj=False needs backbone channels == embed_dim and patch_size 1, got {self.feature_dim} vs "
                    f"{embed_dim}, patch_size {self.patch_size}"
                )
            self.proj = nn.Identity()
        self.keep_features = False  # set by HybridVisionTransformer.forward_hybrid
        self.last_features: list[torch.Tensor] | None = None

    def _backbone_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        if hasattr(self.backbone, "dynamic_feat_size"):
            return tuple(self.backbone.dynamic_feat_size(img_size))
        return math.ceil(img_size[0] / self.feature_ratio[0]), math.ceil(img_size[1] / self.feature_ratio[1])

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Total reduction of the token grid: backbone reduction x patch size."""
        ratio = (self.feature_ratio[0] * self.patch_size[0], self.feature_ratio[1] * self.patch_size[1])
        return max(ratio) if as_scalar else ratio

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(H', W')`` for an input of size ``img_size``."""
        (fh, fw), (ph, pw) = self._backbone_size(img_size), self.patch_size
        if self.dynamic_img_pad:
            return math.ceil(fh / ph), math.ceil(fw / pw)
        return fh // ph, fw // pw

    def _backbone_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self.backbone, "forward_intermediates"):
            out = self.backbone.forward_intermediates(x)
        else:
            out = self.backbone(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(self, x.shape[-2], x.shape[-1])
        if self.keep_features:
            maps = self._backbone_maps(x)
            self.last_features = maps
            x = maps[-1]
        else:
            x = self.backbone(x)
            if isinstance(x, (list, tuple)):
                x = x[-1]
        _, _, h, w = x.shape  # (B, C_f, H_f, W_f)
        ph, pw = self.patch_size
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        x = self.proj(x)  # (B, embed_dim, H', W')
        return x.flatten(2).transpose(1, 2)  # (B, N, embed_dim)


class ConvStemEmbed(_PatchGrid):
    """Convolutional stem of Xiao et al. (2021) in place of the patchify convolution.

    ``len(stem_channels)`` blocks of 3x3 / 2 conv (no bias) -> norm -> act (:class:`~maskworks.layers.conv.
    ConvNormAct`, children ``0 / 1 / 2``), then ``proj``, a 1x1 conv to ``embed_dim``. The product of the strides,
    ``2 ** len(stem_channels)``, must equal ``patch_size``. Inputs must be multiples of ``patch_size`` (or
    ``dynamic_img_pad``), so the token grid is ``(H / p, W / p)`` exactly as with the patchify stem.

    Args:
        img_size: input size the position table is built for; ``None`` for any size.
        patch_size: total stride, a power of two.
        in_channels: input channels.
        embed_dim: token dimension.
        bias: bias of ``proj``.
        strict_img_size: inputs must be exactly ``img_size``.
        dynamic_img_pad: pad the input right / bottom to a multiple of ``patch_size``.
        stem_channels: output channels of the 3x3 convolutions; default ``embed_dim / 2^(n-1-i)``
            (``48, 96, 192, 384`` for ViT-S/16).
        norm_layer: norm class (BatchNorm2d in the paper).
        act_layer: activation class (ReLU in the paper).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int | tuple[int, int] = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        stem_channels: Sequence[int] | None = None,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size, "patch_size")
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or p < 2 or p & (p - 1):
            raise ValueError(f"patch_size must be a square power of two >= 2 for a conv stem, got {patch_size!r}")
        n = p.bit_length() - 1
        if stem_channels is None:
            stem_channels = [max(embed_dim // 2 ** (n - 1 - i), 1) for i in range(n)]
        stem_channels = tuple(int(c) for c in stem_channels)
        if len(stem_channels) != n:
            raise ValueError(
                f"stem_channels must list {n} widths (one 3x3 / 2 conv per halving of patch_size {p}), "
                f"got {stem_channels!r}"
            )
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.stem_channels = stem_channels
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self._set_img_size(img_size)

        layers, prev = [], in_channels
        for c in stem_channels:
            layers.append(ConvNormAct(prev, c, 3, stride=2, padding=1, norm_layer=norm_layer, act_layer=act_layer))
            prev = c
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(prev, embed_dim, kernel_size=1, bias=bias)
        self._init_weights()

    def _init_weights(self) -> None:
        # stem convs: He init (biases and norms left at their defaults); proj: torchvision's conv_last init,
        # N(0, sqrt(2 / embed_dim))
        init_kaiming(self.stem, norm_types=(), zero_bias=False)
        nn.init.normal_(self.proj.weight, std=math.sqrt(2.0 / self.proj.out_channels))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        _check_size(self, h, w)
        ph, pw = self.patch_size
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        elif h % ph or w % pw:
            raise ValueError(
                f"input size {(h, w)} must be divisible by patch_size {self.patch_size} (or use dynamic_img_pad=True)"
            )
        x = self.proj(self.stem(x))  # (B, embed_dim, H / p, W / p)
        return x.flatten(2).transpose(1, 2)  # (B, N, embed_dim)


# ---------------------------------------------------------------------------------------------------------------
# Hybrid ViT model
# ---------------------------------------------------------------------------------------------------------------


class HybridVisionTransformer(VisionTransformer):
    """A :class:`~maskworks.backbones.vit.VisionTransformer` whose tokens come from a CNN (:class:`HybridEmbed`).

    Keys, outputs and ``forward_intermediates`` are those of the ViT; this class only adds access to the CNN maps
    for U-shaped decoders.

    Args:
        backbone: the tokenizer CNN (e.g. :class:`ResNetV2`, or any backbone with ``feature_info``).
        patch_size: patch size on the CNN's last map (1: every feature pixel is a token).
        proj: 1x1-project the CNN map to ``embed_dim`` (``patch_embed.proj``).
        **kwargs: :class:`~maskworks.backbones.vit.VisionTransformer` arguments (``img_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``num_classes``, ``in_channels``, ``dynamic_img_size``, ...).

    Attributes:
        cnn_feature_info: ``{"num_chs", "reduction", "module"}`` of the CNN maps finer than the token grid,
            the maps :meth:`forward_cnn_features` returns (R50: 64 @ 1/2, 256 @ 1/4, 512 @ 1/8).
    """

    def __init__(self, backbone: nn.Module, patch_size: int | tuple[int, int] = 1, proj: bool = True, **kwargs):
        if "embed_layer" in kwargs:
            raise TypeError("HybridVisionTransformer builds its own embed_layer (HybridEmbed); do not pass one")
        super().__init__(
            patch_size=patch_size, embed_layer=partial(HybridEmbed, backbone=backbone, proj=proj), **kwargs
        )
        token_reduction = self.patch_embed.feat_ratio()
        self.cnn_feature_info = [
            {**info, "module": f"patch_embed.backbone.{info['module']}"}
            for info in getattr(backbone, "feature_info", [])
            if info["reduction"] < token_reduction
        ]

    def _split_cnn_maps(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return maps[: len(self.cnn_feature_info)]

    def forward_cnn_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tokenizer's maps finer than the token grid (skips for a U-shaped decoder), fine to coarse.

        Args:
            x: images ``(B, C, H, W)``.

        Returns:
            Maps ``(B, C_i, ceil(H / r_i), ceil(W / r_i))`` as in ``cnn_feature_info`` (R50 hybrid: ``64 @ 1/2``,
            ``256 @ 1/4``, ``512 @ 1/8``). Only the CNN runs.
        """
        _check_size(self.patch_embed, x.shape[-2], x.shape[-1])
        return self._split_cnn_maps(self.patch_embed._backbone_maps(x))

    def forward_hybrid(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """CNN skips and ViT block maps from a single forward pass (TransUNet's encoder).

        Args:
            x: images ``(B, C, H, W)``.
            indices: blocks to return, as in :meth:`forward_intermediates`.
            norm: apply the final norm to the block maps.

        Returns:
            ``(cnn_maps, vit_maps)``: the maps of :meth:`forward_cnn_features` and the NCHW block maps
            ``(B, embed_dim, H / 16, W / 16)`` of :meth:`forward_intermediates`.
        """
        embed = self.patch_embed
        embed.keep_features, embed.last_features = True, None
        try:
            vit_maps = self.forward_intermediates(x, indices=indices, norm=norm, intermediates_only=True)
            cnn_maps = self._split_cnn_maps(embed.last_features)
        finally:
            embed.keep_features, embed.last_features = False, None
        return cnn_maps, vit_maps


# ---------------------------------------------------------------------------------------------------------------
# Registered variants
# ---------------------------------------------------------------------------------------------------------------


def _r50_hybrid(
    img_size: int,
    in_channels: int,
    num_classes: int,
    padding_same: bool,
    ws_eps: float = 1e-8,
    backbone_kwargs: dict | None = None,
    **kwargs,
):
    options = {
        "stem_type": "same" if padding_same else "",
        "conv_padding": "same" if padding_same else None,
        "ws_eps": ws_eps,
        **(backbone_kwargs or {}),
    }
    backbone = ResNetV2(layers=(3, 4, 9), in_channels=in_channels, **options)
    arch = {"img_size": img_size, "embed_dim": 768, "depth": 12, "num_heads": 12}
    return HybridVisionTransformer(
        backbone=backbone, in_channels=in_channels, num_classes=num_classes, **{**arch, **kwargs}
    )


@register_model(kind="backbone")
def vit_base_r50_s16_224(
    in_channels: int = 3, num_classes: int = 0, padding_same: bool = True, **kwargs
) -> HybridVisionTransformer:
    """R50 + ViT-B/16 hybrid at 224 px (timm ``vit_base_r50_s16_224``; 97.9 M parameters without a head).

    ``num_classes`` defaults to 0, as timm's (its only weights, ``orig_in21k``, have no head).
    ``padding_same=False`` builds the symmetric-padding variant (timm ``padding_same=False``). ``ws_eps`` is the
    weight-standardisation epsilon (timm's 1e-8; the official TransUNet code uses 1e-5) and ``backbone_kwargs``
    further :class:`ResNetV2` arguments (e.g. ``norm_eps``, ``stem_type``).
    """
    return _r50_hybrid(kwargs.pop("img_size", 224), in_channels, num_classes, padding_same, **kwargs)


@register_model(kind="backbone")
def vit_base_r50_s16_384(
    in_channels: int = 3, num_classes: int = 1000, padding_same: bool = True, **kwargs
) -> HybridVisionTransformer:
    """R50 + ViT-B/16 hybrid at 384 px (timm ``vit_base_r50_s16_384``, formerly ``vit_base_resnet50_384``)."""
    return _r50_hybrid(kwargs.pop("img_size", 384), in_channels, num_classes, padding_same, **kwargs)


@register_model(kind="backbone")
def vit_test_r50_s16(
    in_channels: int = 3, num_classes: int = 1000, backbone_kwargs: dict | None = None, **kwargs
) -> HybridVisionTransformer:
    """Tiny hybrid for tests: 64 px; a 2-stage ResNetV2 (stem 32, stages 128 / 256, one block each, stride 8),
    ``patch_size`` 2 on its map (stride 16, 4 x 4 tokens), 64-d, 2 blocks, 2 heads. ``backbone_kwargs``: further
    :class:`ResNetV2` arguments."""
    backbone = ResNetV2(
        layers=(1, 1), channels=(128, 256), in_channels=in_channels, stem_chs=32, **(backbone_kwargs or {})
    )
    arch = {"img_size": 64, "patch_size": 2, "embed_dim": 64, "depth": 2, "num_heads": 2}
    return HybridVisionTransformer(
        backbone=backbone, in_channels=in_channels, num_classes=num_classes, **{**arch, **kwargs}
    )


def _convstem_vit(
    stem_channels: Sequence[int] | None,
    norm_layer: LayerFactory,
    act_layer: LayerFactory,
    arch: dict,
    **kwargs,
) -> VisionTransformer:
    embed = partial(ConvStemEmbed, stem_channels=stem_channels, norm_layer=norm_layer, act_layer=act_layer)
    return VisionTransformer(embed_layer=embed, **{**arch, **kwargs})


@register_model(kind="backbone")
def vit_small_convstem_patch16_224(
    in_channels: int = 3,
    num_classes: int = 1000,
    stem_channels: Sequence[int] = (48, 96, 192, 384),
    stem_norm_layer: LayerFactory = nn.BatchNorm2d,
    stem_act_layer: LayerFactory = nn.ReLU,
    **kwargs,
) -> VisionTransformer:
    """ViT-S/16 with the early-convolution stem (Xiao et al. 2021, ViT_C-4GF): four 3x3 / 2 conv-BN-ReLU
    (48 / 96 / 192 / 384), a 1x1 conv to 384-d, and 11 blocks (one fewer than ViT-S, as in the paper), 6 heads."""
    arch = {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 11, "num_heads": 6}
    return _convstem_vit(
        stem_channels, stem_norm_layer, stem_act_layer, arch, in_channels=in_channels, num_classes=num_classes, **kwargs
    )


@register_model(kind="backbone")
def vit_test_convstem_patch16(
    in_channels: int = 3,
    num_classes: int = 1000,
    stem_channels: Sequence[int] = (8, 16, 32, 64),
    stem_norm_layer: LayerFactory = nn.BatchNorm2d,
    stem_act_layer: LayerFactory = nn.ReLU,
    **kwargs,
) -> VisionTransformer:
    """Tiny conv-stem ViT for tests: 64 px, stem 8 / 16 / 32 / 64, 4 x 4 tokens, 64-d, 2 blocks, 2 heads."""
    arch = {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}
    return _convstem_vit(
        stem_channels, stem_norm_layer, stem_act_layer, arch, in_channels=in_channels, num_classes=num_classes, **kwargs
    )
