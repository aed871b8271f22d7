"""DeepLabv3 and DeepLabv3+.

* DeepLabv3: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017.
* DeepLabv3+: Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
  Segmentation", ECCV 2018.

A backbone whose last stages trade stride for dilation (output stride 16 or 8) feeds an
:class:`~maskworks.layers.aspp.ASPP`: parallel 1x1, atrous 3x3 and image-pooling branches that see
context at several scales without losing resolution. DeepLabv3 classifies the ASPP map and
resizes the logits to the input; DeepLabv3+ adds a light decoder that upsamples the ASPP map to
stride 4 and fuses it with a 48-channel projection of the stride-4 backbone map, which recovers
object boundaries.

Layouts and keys:

* :class:`DeepLabV3` (``deeplabv3``) has the keys of segmentation_models_pytorch 0.6's
  ``DeepLabV3`` (``encoder``, ``decoder.aspp`` / ``decoder.conv`` / ``decoder.bn``,
  ``segmentation_head.0``); the ``decoder.0/1/2`` keys of older smp releases load too. Its defaults (ResNet-50,
  output stride 8, rates 12/24/36, logits resized bilinearly with ``align_corners=False``, no
  input padding) reproduce torchvision's ``deeplabv3_resnet50`` exactly, whose checkpoints
  convert with :func:`maskworks.convert.deeplab.convert_torchvision_deeplabv3` (its
  ``aux_classifier`` FCN head is kept with ``aux=True``).
* :class:`DeepLabV3Plus` (``deeplabv3plus``) has the layout and keys of smp 0.6's
  ``DeepLabV3Plus`` (``decoder.aspp`` = ASPP + separable conv + BN + ReLU, ``decoder.block1`` =
  the 48-channel low-level projection, ``decoder.block2`` = separable 3x3 fusion conv,
  ``segmentation_head.0``), with smp's defaults (output stride 16, separable ASPP, 256
  channels, bilinear ``align_corners=True`` upsampling), so an smp checkpoint loads as-is and
  gives the same logits.

``deeplabv3plus_mobilenet_v3_large`` is ``DeepLabV3Plus(encoder="mobilenet_v3_large")`` registered as a preset: output
stride 16, separable ASPP and decoder (smp's separable conv: depthwise then pointwise, one BatchNorm and ReLU after
both; DeepLab's TensorFlow code, ``split_separable_conv2d``, has a BatchNorm and ReLU after the depthwise conv too).

``atrous_rates=None`` picks the paper's rates for the output stride: (6, 12, 18) at 16 and
(12, 24, 36) at 8. smp instead defaults to ``decoder_atrous_rates=(12, 24, 36)`` at any output stride;
pass ``atrous_rates=(12, 24, 36)`` to reproduce an smp DeepLabV3+ at output stride 16:
``create_model("deeplabv3plus", encoder="resnet34", atrous_rates=(12, 24, 36))``. A state dict carries
no rates, so an smp checkpoint loads into either model and only the logits differ;
``load_weights(model, path, source="smp")`` logs a warning when the model's rates are not smp's
default (``model.atrous_rates`` holds the rates in use).

Dilated stages: with output stride 16 / 8, a ResNet's ``layer4`` (and ``layer3``) replace their
stride by dilation. torchvision and timm keep the *previous* rate in the first 3x3 conv of such a
stage; smp's ``make_dilated`` gives every 3x3 conv of the stage the stage's rate. The two give
different outputs from the same weights, so ``uniform_dilation`` picks one: ``False`` (torchvision,
the default of :class:`DeepLabV3`) or ``True`` (smp, the default of :class:`DeepLabV3Plus`).
"""

from __future__ import annotations

import inspect
import os
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.aspp import ASPP, SeparableConv2d
from maskworks.layers.conv import ConvNormAct
from maskworks.models._utils import (
    build_encoder,
    check_positive_int,
    crop_to,
    init_like_smp,
    load_encoder_weights,
    pad_to_multiple,
)
from maskworks.registry import model_entry, register_model

__all__ = [
    "DeepLabV3",
    "DeepLabV3Plus",
    "DeepLabV3Decoder",
    "DeepLabV3PlusDecoder",
    "FCNHead",
    "default_atrous_rates",
    "deeplabv3plus_mobilenet_v3_large",
]

# The DeepLabv3 paper's ASPP rates: (6, 12, 18) at output stride 16, doubled at 8; halved at 32 (an encoder that
# cannot be dilated, e.g. Swin), which keeps the same field of view in pixels.
_PAPER_RATES = {16: (6, 12, 18), 8: (12, 24, 36), 32: (3, 6, 9)}
# Older smp releases built DeepLabV3Decoder as an nn.Sequential; their checkpoints use these prefixes.
_LEGACY_DECODER_KEYS = (("0.", "aspp."), ("1.", "conv."), ("2.", "bn."))


def default_atrous_rates(output_stride: int) -> tuple[int, int, int]:
    """The paper's ASPP rates for ``output_stride``: (6, 12, 18) at 16, (12, 24, 36) at 8; (3, 6, 9) at 32 (an
    undilated hierarchical encoder: the same field of view in pixels as 16 with (6, 12, 18))."""
    if output_stride not in _PAPER_RATES:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    return _PAPER_RATES[output_stride]


# --------------------------------------------------------------------------- heads
class DeepLabV3Decoder(nn.Module):
    """ASPP, then 3x3 conv, BN, ReLU (smp's ``DeepLabV3Decoder``; torchvision's ``DeepLabHead``
    without its classifier conv).

    Args:
        in_channels: channels of the backbone's last map.
        out_channels: channels of the ASPP and of the output.
        atrous_rates: ASPP rates.
        aspp_separable: depthwise-separable ASPP branches.
        aspp_dropout: dropout after the ASPP projection.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        atrous_rates: Sequence[int] = (12, 24, 36),
        aspp_separable: bool = False,
        aspp_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, out_channels, atrous_rates, separable=aspp_separable, dropout=aspp_dropout)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.register_load_state_dict_pre_hook(_rename_legacy_decoder_keys)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps (last = deepest) -> ``(B, out_channels, h, w)`` at the last map's size."""
        return self.relu(self.bn(self.conv(self.aspp(features[-1]))))


def _rename_legacy_decoder_keys(module, state_dict, prefix, *args) -> None:
    # older smp releases stored DeepLabV3Decoder as nn.Sequential(ASPP, conv, bn, relu): decoder.0/1/2.*
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for old, new in _LEGACY_DECODER_KEYS:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                break


class DeepLabV3PlusDecoder(nn.Module):
    """smp's ``DeepLabV3PlusDecoder``: ASPP on the deepest map, upsampled to the stride-4 map and
    fused with its 48-channel projection by a separable 3x3 conv.

    Args:
        encoder_channels: channels of the backbone maps, highest resolution first.
        low_level_index: index (into the maps) of the stride-4 map that ``block1`` projects.
        out_channels: channels of the ASPP and of the output.
        atrous_rates: ASPP rates.
        aspp_separable: depthwise-separable ASPP branches.
        aspp_dropout: dropout after the ASPP projection.
        low_level_channels: channels of the low-level projection (48 in the paper).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        low_level_index: int,
        out_channels: int = 256,
        atrous_rates: Sequence[int] = (12, 24, 36),
        aspp_separable: bool = True,
        aspp_dropout: float = 0.5,
        low_level_channels: int = 48,
    ) -> None:
        super().__init__()
        self.low_level_index = low_level_index
        self.aspp = nn.Sequential(
            ASPP(encoder_channels[-1], out_channels, atrous_rates, separable=aspp_separable, dropout=aspp_dropout),
            SeparableConv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.block1 = ConvNormAct(encoder_channels[low_level_index], low_level_channels, 1, bias=False)
        self.block2 = nn.Sequential(
            SeparableConv2d(low_level_channels + out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps -> ``(B, out_channels, h4, w4)`` at the size of the stride-4 map."""
        low = features[self.low_level_index]
        x = self.aspp(features[-1])  # (B, C, H / os, W / os)
        # smp's nn.Upsample(scale_factor=os / 4, align_corners=True); equal when sizes divide exactly
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)  # (B, C, H / 4, W / 4)
        x = torch.cat([x, self.block1(low)], dim=1)  # (B, C + 48, H / 4, W / 4)
        return self.block2(x)


class FCNHead(nn.Sequential):
    """torchvision's ``FCNHead`` (the DeepLabv3 auxiliary classifier): 3x3 conv to ``C / 4`` channels
    (no bias), BN, ReLU, Dropout, 1x1 conv to the classes.

    Args:
        in_channels: channels of the input map (1024 for ResNet-50's ``layer3``).
        num_classes: output channels.
        dropout: dropout probability before the classifier conv.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(inter, num_classes, 1),
        )


# --------------------------------------------------------------------------- shared model code
def _make_dilation_uniform(encoder: nn.Module) -> None:
    """Give every k > 1 conv of each ``feature_info`` stage the stage's largest rate (smp's ``make_dilated``).

    Only the dilation and padding change (no parameters), so checkpoints load the same either way.
    """
    for info in encoder.feature_info:
        stage = encoder.get_submodule(info["module"])
        # odd kernels only: ConvNeXt's 2x2 downsample convs keep timm's dilation (as smp's "tu-" encoders do)
        convs = [
            m
            for m in stage.modules()
            if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and all(k % 2 for k in m.kernel_size)
        ]
        rate = max((m.dilation[0] for m in convs), default=1)
        if rate == 1:
            continue
        for conv in convs:
            assert conv.stride == (1, 1), "a dilated stage has no strided conv"
            conv.dilation = (rate, rate)
            conv.padding = tuple(rate * (k - 1) // 2 for k in conv.kernel_size)


class _DeepLab(nn.Module, metaclass=ABCMeta):
    """Construction (checks, encoder, head, auxiliary head, smp initialisation) and forward shared by the two
    DeepLabs; the arguments are those of :class:`DeepLabV3` / :class:`DeepLabV3Plus`.

    Subclasses build their decoder in :meth:`_build_decoder` (where DeepLabv3+ also sets ``_pad_multiple``,
    1: no padding) and set ``_align_corners`` (of the final upsampling).
    """

    _pad_multiple: int = 1
    _align_corners: bool = False
    _default_output_stride: int = 16

    def __init__(
        self,
        encoder: str,
        num_classes: int,
        in_channels: int,
        output_stride: int,
        atrous_rates: Sequence[int] | None,
        aux: bool,
        decoder_channels: int,
        aspp_separable: bool,
        aspp_dropout: float,
        uniform_dilation: bool,
        encoder_weights: str | os.PathLike | None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("decoder_channels", decoder_channels)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder = self._build_encoder(encoder, in_channels, output_stride, uniform_dilation, encoder_weights)
        output_stride = self.output_stride = self.encoder.feature_info[-1]["reduction"]
        rates = default_atrous_rates(output_stride) if atrous_rates is None else tuple(atrous_rates)
        # not in the state dict: load_weights(source="smp") compares them with smp's defaults
        self.atrous_rates = rates
        self.uniform_dilation = bool(uniform_dilation)
        self.decoder = self._build_decoder(
            encoder, output_stride, rates, decoder_channels, aspp_separable, aspp_dropout
        )
        self.segmentation_head = nn.Sequential(nn.Conv2d(decoder_channels, num_classes, 1))
        self._build_aux(aux, num_classes)
        init_like_smp(self.decoder, self.segmentation_head)

    @abstractmethod
    def _build_decoder(
        self,
        encoder: str,
        output_stride: int,
        rates: tuple[int, ...],
        decoder_channels: int,
        aspp_separable: bool,
        aspp_dropout: float,
    ) -> nn.Module:
        """The decoder (ASPP and what follows it) of this DeepLab variant."""

    def _build_encoder(
        self,
        encoder: str,
        in_channels: int,
        output_stride: int | None,
        uniform_dilation: bool,
        encoder_weights: str | os.PathLike | None,
    ) -> nn.Module:
        if output_stride is not None and output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16, 32 or None, got {output_stride!r}")
        entry = model_entry(encoder)
        if entry.kind != "backbone":
            raise ValueError(f"encoder must be a registered backbone, got {encoder!r} (kind={entry.kind!r})")
        params = inspect.signature(entry.fn).parameters
        takes = "output_stride" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        enc = None
        if takes:
            try:
                enc = build_encoder(encoder, in_channels, output_stride=output_stride or self._default_output_stride)
            except TypeError as err:  # **kwargs that end in a constructor without output_stride (Swin)
                if "output_stride" not in str(err):
                    raise
        if enc is None:  # an encoder that cannot be dilated runs at its own stride
            enc = build_encoder(encoder, in_channels)
            native = enc.feature_info[-1]["reduction"]
            if output_stride not in (None, native):
                raise ValueError(
                    f"encoder {encoder!r} cannot be dilated (its maps end at stride {native}); pass "
                    f"output_stride=None (or {native}) to use it at its own stride, or choose a dilatable encoder "
                    "(ResNet, MobileNet, ConvNeXt)"
                )
        elif enc.feature_info[-1]["reduction"] != (output_stride or self._default_output_stride):
            raise ValueError(
                f"encoder {encoder!r} reached reduction {enc.feature_info[-1]['reduction']}, "
                f"not the requested output_stride {output_stride or self._default_output_stride}"
            )
        if uniform_dilation:
            _make_dilation_uniform(enc)
        load_encoder_weights(enc, encoder, encoder_weights)
        return enc

    def _build_aux(self, aux: bool, num_classes: int) -> None:
        # FCN head on the second-deepest map (ResNet: layer3, 1024 channels for ResNet-50)
        self.aux_classifier = FCNHead(self.encoder.feature_info[-2]["num_chs"], num_classes) if aux else None
        if aux:
            init_like_smp(self.aux_classifier, nn.Identity())

    def _upsample(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=self._align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size.

        In training with ``aux=True``: ``{"out": logits, "aux": [aux_logits]}``, both at input size.
        """
        x, size = pad_to_multiple(x, self._pad_multiple)
        features = self.encoder.forward_intermediates(x)
        logits = self.segmentation_head(self.decoder(features))  # (B, K, h, w)
        out = crop_to(self._upsample(logits, x.shape[-2:]), size)  # (B, K, H, W)
        if self.training and self.aux_classifier is not None:
            aux = self.aux_classifier(features[-2])  # (B, K, H / os, W / os)
            return {"out": out, "aux": [crop_to(self._upsample(aux, x.shape[-2:]), size)]}
        return out


# --------------------------------------------------------------------------- models
@register_model(name="deeplabv3")
class DeepLabV3(_DeepLab):
    """DeepLabv3: dilated backbone, ASPP, 3x3 conv, 1x1 classifier, bilinear resize to the input.

    With the defaults and ``encoder="resnet50"`` / ``"resnet101"`` this is torchvision's
    ``deeplabv3_resnet50`` / ``_resnet101`` (same parameters and outputs; convert with
    :func:`maskworks.convert.deeplab.convert_torchvision_deeplabv3`); the keys are smp's
    ``DeepLabV3``. The head works on any map size and the logits are resized to the input size,
    so, as in torchvision, no input padding is needed (and none is done).

    Args:
        encoder: registered backbone (``kind="backbone"``); one that takes ``output_stride`` is dilated to it,
            one that cannot be dilated (Swin) runs at its own stride.
        num_classes: output channels (logits).
        in_channels: input image channels.
        output_stride: 8 or 16; ``None`` (default): 8 (torchvision's default) for a dilatable encoder, the
            encoder's own stride (32) for one that cannot be dilated.
        atrous_rates: ASPP rates; ``None`` for the paper's (12, 24, 36) at 8, (6, 12, 18) at 16 (smp's
            ``decoder_atrous_rates`` default is (12, 24, 36) at any output stride).
        aux: add torchvision's FCN auxiliary head on the second-deepest map; its logits are
            returned in training only, as ``{"out": ..., "aux": [...]}``.
        decoder_channels: channels of the ASPP and the 3x3 conv.
        aspp_separable: depthwise-separable ASPP branches.
        aspp_dropout: dropout after the ASPP projection.
        uniform_dilation: every 3x3 conv of a dilated stage at the stage's rate (smp) instead of
            the first one at the previous rate (torchvision, timm).
        encoder_weights: published encoder weights (``"imagenet"`` or a tag of ``maskworks models --pretrained``), a
            local checkpoint path, or ``None`` for random init.
    """

    _default_output_stride = 8  # torchvision's

    def __init__(
        self,
        encoder: str = "resnet50",
        num_classes: int = 1,
        in_channels: int = 3,
        output_stride: int | None = None,
        atrous_rates: Sequence[int] | None = None,
        aux: bool = False,
        decoder_channels: int = 256,
        aspp_separable: bool = False,
        aspp_dropout: float = 0.5,
        uniform_dilation: bool = False,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            encoder,
            num_classes,
            in_channels,
            output_stride,
            atrous_rates,
            aux,
            decoder_channels,
            aspp_separable,
            aspp_dropout,
            uniform_dilation,
            encoder_weights,
        )

    def _build_decoder(self, encoder, output_stride, rates, decoder_channels, aspp_separable, aspp_dropout):
        return DeepLabV3Decoder(
            self.encoder.feature_info[-1]["num_chs"], decoder_channels, rates, aspp_separable, aspp_dropout
        )


@register_model(name="deeplabv3plus")
class DeepLabV3Plus(_DeepLab):
    """DeepLabv3+: DeepLabv3's ASPP plus a decoder that fuses the stride-4 backbone map.

    Layout, keys and defaults of smp 0.6's ``DeepLabV3Plus`` (except ``atrous_rates``, see the
    module docstring). The input is padded to a multiple of the output stride and the logits are
    cropped back, so any size works.

    Args:
        encoder: registered backbone (``kind="backbone"``) with a stride-4 map; one that takes ``output_stride``
            (ResNet, MobileNet, ConvNeXt) is dilated to it, one that cannot be dilated (Swin) runs at its own
            stride (ASPP on its stride-32 map, rates (3, 6, 9) by default).
        num_classes: output channels (logits).
        in_channels: input image channels.
        output_stride: 16 or 8; ``None`` (default): 16 (smp's default) for a dilatable encoder, the encoder's
            own stride (32) for one that cannot be dilated.
        atrous_rates: ASPP rates; ``None`` for the paper's (6, 12, 18) at 16, (12, 24, 36) at 8.
            smp's default (its ``decoder_atrous_rates``) is (12, 24, 36) at any output stride: pass
            ``atrous_rates=(12, 24, 36)`` to compute what an smp checkpoint computes in smp.
        aux: add an FCN auxiliary head on the second-deepest map; its logits are returned in
            training only, as ``{"out": ..., "aux": [...]}``.
        decoder_channels: channels of the ASPP and the decoder.
        aspp_separable: depthwise-separable ASPP branches (smp's default; the paper's Xception
            variant).
        aspp_dropout: dropout after the ASPP projection.
        uniform_dilation: every 3x3 conv of a dilated stage at the stage's rate (smp, default) instead
            of the first one at the previous rate (torchvision, timm).
        encoder_weights: published encoder weights (``"imagenet"`` or a tag of ``maskworks models --pretrained``), a
            local checkpoint path, or ``None`` for random init.
    """

    _align_corners = True  # smp's decoder.up and segmentation head upsampling

    def __init__(
        self,
        encoder: str = "resnet50",
        num_classes: int = 1,
        in_channels: int = 3,
        output_stride: int | None = None,
        atrous_rates: Sequence[int] | None = None,
        aux: bool = False,
        decoder_channels: int = 256,
        aspp_separable: bool = True,
        aspp_dropout: float = 0.5,
        uniform_dilation: bool = True,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            encoder,
            num_classes,
            in_channels,
            output_stride,
            atrous_rates,
            aux,
            decoder_channels,
            aspp_separable,
            aspp_dropout,
            uniform_dilation,
            encoder_weights,
        )

    def _build_decoder(self, encoder, output_stride, rates, decoder_channels, aspp_separable, aspp_dropout):
        reductions = [info["reduction"] for info in self.encoder.feature_info]
        if 4 not in reductions:
            raise ValueError(f"encoder {encoder!r} has no stride-4 map for the decoder (reductions {reductions})")
        self._pad_multiple = max(reductions)
        return DeepLabV3PlusDecoder(
            [info["num_chs"] for info in self.encoder.feature_info],
            reductions.index(4),
            decoder_channels,
            rates,
            aspp_separable,
            aspp_dropout,
        )


@register_model(name="deeplabv3plus_mobilenet_v3_large")
def deeplabv3plus_mobilenet_v3_large(
    num_classes: int = 1,
    in_channels: int = 3,
    output_stride: int = 16,
    atrous_rates: Sequence[int] | None = None,
    aux: bool = False,
    decoder_channels: int = 256,
    aspp_separable: bool = True,
    aspp_dropout: float = 0.5,
    uniform_dilation: bool = True,
    encoder_weights: str | os.PathLike | None = None,
) -> DeepLabV3Plus:
    """DeepLabv3+ for the edge: MobileNetV3-Large dilated to output stride 16 (its last stage at dilation 2, as
    torchvision's ``dilated=True``), depthwise-separable ASPP (rates 6 / 12 / 18 on the 960-channel map) and
    separable decoder convs, the stride-4 low-level map being ``features.3`` (24 channels).

    ``create_model("deeplabv3plus", encoder="mobilenet_v3_large")`` with these defaults; 4,708,353 parameters with one
    class (``aspp_separable=False``: 10,580,673, the three atrous branches then being full 3x3 convs,
    ``3 * 960 * (8 * 256 - 9)`` more). Separable = smp's ``SeparableConv2d`` (depthwise 3x3, pointwise 1x1, then
    BatchNorm and ReLU), as everywhere in :class:`DeepLabV3Plus`. Arguments as :class:`DeepLabV3Plus`;
    ``encoder_weights="imagenet"`` starts the encoder from torchvision's ImageNet weights.
    """
    return DeepLabV3Plus(
        "mobilenet_v3_large",
        num_classes=num_classes,
        in_channels=in_channels,
        output_stride=output_stride,
        atrous_rates=atrous_rates,
        aux=aux,
        decoder_channels=decoder_channels,
        aspp_separable=aspp_separable,
        aspp_dropout=aspp_dropout,
        uniform_dilation=uniform_dilation,
        encoder_weights=encoder_weights,
    )
