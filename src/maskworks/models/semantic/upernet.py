"""UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018), the decoder of the Swin /
ConvNeXt segmentation results (mmseg's ``UPerHead`` + auxiliary ``FCNHead``, HF ``UperNetForSemanticSegmentation``).

A registered backbone gives four maps (strides 4, 8, 16, 32; a ResNet's stride-2 stem map is skipped). The
decode head (:class:`UPerHead`) runs a pyramid pooling module (pool scales 1, 2, 3, 6: adaptive average pooling,
1x1 conv-BN-ReLU, bilinear upsampling) on the last map, concatenates it with the map and fuses them with a 3x3
``bottleneck``; the other maps get 1x1 ``lateral_convs``; a top-down pathway adds each level's bilinearly upsampled
coarser level; 3x3 ``fpn_convs`` smooth the three finer levels; all four are upsampled to stride 4, concatenated and
fused by a 3x3 ``fpn_bottleneck``; dropout 0.1 and a 1x1 ``conv_seg`` give the logits at stride 4, upsampled
bilinearly (``align_corners=False``, as mmseg's and HF's UPerNet) to the input size.

``aux=True`` (the default, as the paper and mmseg train it) adds an auxiliary :class:`FCNHead` on the third map
(3x3 conv-BN-ReLU to ``aux_channels``, dropout, 1x1 ``conv_seg``); in training the model then returns
``{"out": logits, "aux": [aux_logits]}`` (the aux loss weight 0.4 is the default ``aux_weight`` of the losses); in
eval only the logits.

Module and key names are mmseg's (``decode_head.psp_modules.{i}.1.conv / bn``, ``decode_head.bottleneck``,
``lateral_convs.{i}``, ``fpn_convs.{i}``, ``fpn_bottleneck``, ``conv_seg``; ``auxiliary_head.convs.0``,
``auxiliary_head.conv_seg``), with the backbone under ``encoder.``. Hugging Face checkpoints
(``openmmlab/upernet-swin-*`` / ``upernet-convnext-*``) load through
:func:`maskworks.convert.upernet.convert_hf_upernet` and give HF's logits.

With ``encoder_out_norms=True`` (default) the backbone is built with ``out_norms=True`` where it takes that
argument (Swin V1 / V2, ConvNeXt): one LayerNorm per stage map (``encoder.stage_norms``), as mmseg's ``norm0..3``
and HF's ``hidden_states_norms``. Backbones without it (ResNet) feed their maps unnormalised.

Swin encoders are built with ``window_padding="mmseg"`` (pad each map to the window, then shift; windows never
clipped), the order of the official Swin segmentation code, mmseg and HF's ``SwinBackbone`` that the published
UPerNet checkpoints were trained with; timm's order differs on maps that are not multiples of the window.

Any input size: the input is zero-padded at the bottom / right to a multiple of the encoder's total stride (32) and
the logits are cropped back; at sizes divisible by 32 nothing is padded, and there the logits equal HF's for Swin
and ConvNeXt encoders.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.conv import ConvBNReLU
from maskworks.layers.norm import PooledBatchNorm2d
from maskworks.models._utils import build_dense_encoder, check_positive_int, crop_to, init_conv_norm, pad_to_multiple
from maskworks.registry import register_model

__all__ = ["UPerNet", "UPerHead", "FCNHead", "UPERNET_ALIASES"]

# alias -> encoder; HF openmmlab/upernet-swin-base / -large (mmseg's ..._window12_512x512_..._pretrain_384x384_22K)
# use the window-12 Swin pretrained at 384; tiny / small the window-7 one pretrained at 224.
UPERNET_ALIASES: dict[str, str] = {
    "upernet_swin_tiny": "swin_tiny_patch4_window7_224",
    "upernet_swin_small": "swin_small_patch4_window7_224",
    "upernet_swin_base": "swin_base_patch4_window12_384",
    "upernet_swin_large": "swin_large_patch4_window12_384",
    "upernet_convnext_tiny": "convnext_tiny",
    "upernet_convnext_small": "convnext_small",
    "upernet_convnext_base": "convnext_base",
    "upernet_convnext_large": "convnext_large",
    "upernet_convnext_xlarge": "convnext_xlarge",
    "upernet_resnet50": "resnet50",
    "upernet_resnet101": "resnet101",
}


def _conv_module(in_ch: int, out_ch: int, kernel_size: int, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> ConvBNReLU:
    """mmseg's ``ConvModule``: conv (no bias) -> BN -> ReLU, children ``conv`` / ``bn`` / ``relu``."""
    return ConvBNReLU(in_ch, out_ch, kernel_size, norm_layer=norm_layer)


def _init_mmseg(convs: nn.Module, classifier: nn.Conv2d) -> None:
    """mmseg's initialisation: Kaiming-normal convs (``fan_out``, ReLU gain), BN 1 / 0; the classifier ``N(0, 0.01)``,
    zero bias."""
    init_conv_norm(convs, partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu"))
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


class UPerHead(nn.Module):
    """mmseg's ``UPerHead``: PPM on the last map + FPN over all four, fused at the resolution of the first.

    Args:
        in_channels: channels of the four (or more) input maps, finest first.
        num_classes: output channels.
        channels: width of the head (mmseg ``channels``, HF ``hidden_size``).
        pool_scales: bins of the pyramid pooling module.
        dropout: ``Dropout2d`` probability before ``conv_seg``.

    Returns (forward): logits ``(B, num_classes, h_0, w_0)`` at the resolution of the first map.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        in_channels = tuple(in_channels)
        self.in_channels = in_channels
        self.pool_scales = tuple(pool_scales)
        # PPM: each branch = (AdaptiveAvgPool2d, ConvModule); the 1x1 bin's BN uses running statistics when it sees
        # a single value per channel (batch 1 in training), where nn.BatchNorm2d would raise; same keys as BN.
        self.psp_modules = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(s),
                _conv_module(in_channels[-1], channels, 1, PooledBatchNorm2d if s == 1 else nn.BatchNorm2d),
            )
            for s in self.pool_scales
        )
        self.bottleneck = _conv_module(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(_conv_module(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_module(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = _conv_module(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        _init_mmseg(nn.ModuleList([self.psp_modules, self.bottleneck, self.lateral_convs, self.fpn_convs,
                                   self.fpn_bottleneck]), self.conv_seg)  # fmt: skip

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``bottleneck(cat[x, up(ppm_1(x)), ..., up(ppm_n(x))])`` (mmseg's / HF's channel order)."""
        size = x.shape[-2:]
        outs = [x]
        for branch in self.psp_modules:
            outs.append(F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False))
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(features[len(self.lateral_convs)]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])  # the PPM level has no fpn conv
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg's auxiliary ``FCNHead`` (``num_convs=1``, ``concat_input=False``): 3x3 conv-BN-ReLU, dropout, 1x1.

    Args:
        in_channels: channels of the input map.
        num_classes: output channels.
        channels: width of the conv.
        dropout: ``Dropout2d`` probability before ``conv_seg``.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv_module(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        _init_mmseg(self.convs, self.conv_seg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


@register_model(name="upernet")
class UPerNet(nn.Module):
    """UPerNet with a registered backbone as encoder; mmseg's layout, HF-compatible weights.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``) with at least four maps of stride >= 4; the
            last four are used (Swin / ConvNeXt: all four; ResNet: ``layer1``..``layer4``).
        num_classes: output channels (logits).
        in_channels: input image channels.
        encoder_weights: published encoder weights (``"imagenet"`` or a tag of ``maskworks models --pretrained``),
            a local checkpoint path, or ``None`` for random init.
        channels: width of the decode head (mmseg ``channels``, HF ``hidden_size``).
        pool_scales: bins of the pyramid pooling module.
        aux: add the auxiliary FCN head on the third map, returned in training only.
        aux_channels: width of the auxiliary head's conv.
        dropout: ``Dropout2d`` probability before each classifier.
        encoder_out_norms: build the encoder with one LayerNorm per stage map (``out_norms=True``) where it takes
            that option (Swin, ConvNeXt); ignored for backbones that do not.
    """

    def __init__(
        self,
        encoder: str = "swin_tiny_patch4_window7_224",
        num_classes: int = 150,
        in_channels: int = 3,
        encoder_weights: str | os.PathLike | None = None,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        aux: bool = True,
        aux_channels: int = 256,
        dropout: float = 0.1,
        encoder_out_norms: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("channels", channels)
        check_positive_int("aux_channels", aux_channels)
        pool_scales = tuple(pool_scales)
        if not pool_scales or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pool_scales):
            raise ValueError(f"pool_scales must be a non-empty sequence of positive ints, got {pool_scales!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.aux = bool(aux)
        self.encoder = build_dense_encoder(encoder, in_channels, encoder_weights, bool(encoder_out_norms))
        info = self.encoder.feature_info
        usable = [i for i, f in enumerate(info) if f["reduction"] >= 4]
        if len(usable) < 4:
            raise ValueError(
                f"encoder {encoder!r} must give at least 4 maps of stride >= 4, got strides "
                f"{[f['reduction'] for f in info]}"
            )
        self._feature_indices = tuple(usable[-4:])
        enc_channels = [info[i]["num_chs"] for i in self._feature_indices]
        self._pad_multiple = max(info[i]["reduction"] for i in self._feature_indices)
        self.decode_head = UPerHead(enc_channels, num_classes, channels, pool_scales, dropout)
        self.auxiliary_head = FCNHead(enc_channels[2], num_classes, aux_channels, dropout) if self.aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size.

        In training with ``aux=True``: ``{"out": logits, "aux": [aux_logits]}``, both at input size.
        """
        x, size = pad_to_multiple(x, self._pad_multiple)
        maps = self.encoder.forward_intermediates(x)
        features = [maps[i] for i in self._feature_indices]
        out = self.decode_head(features)  # (B, K, H_pad / 4, W_pad / 4)
        out = crop_to(F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False), size)
        if not (self.aux and self.training):
            return out
        aux = self.auxiliary_head(features[2])  # (B, K, H_pad / 16, W_pad / 16)
        aux = crop_to(F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=False), size)
        return {"out": out, "aux": [aux]}


def _make_alias(name: str, encoder: str):
    def fn(**kwargs) -> UPerNet:
        if "encoder" in kwargs:
            raise TypeError(f"{name} fixes encoder={encoder!r}; use create_model('upernet', encoder=...) for another")
        return UPerNet(encoder=encoder, **kwargs)

    params = [p for p in inspect.signature(UPerNet).parameters.values() if p.name != "encoder"]
    fn.__signature__ = inspect.Signature([p.replace(kind=p.KEYWORD_ONLY) for p in params])
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"UPerNet with the ``{encoder}`` encoder (keyword arguments as :class:`UPerNet`)."
    return fn


for _name, _encoder in UPERNET_ALIASES.items():
    globals()[_name] = register_model(name=_name)(_make_alias(_name, _encoder))
del _name, _encoder
