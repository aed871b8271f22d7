"""LR-ASPP (Howard et al., "Searching for MobileNetV3", ICCV 2019, Section 6.1.2): Lite Reduced Atrous Spatial
Pyramid Pooling on a MobileNetV3 whose last stage is dilated (output stride 16).

The head (:class:`LRASPPHead`) works on two backbone maps: ``high``, the final 1x1 conv's map at stride 16 (960
channels for MobileNetV3-Large), and ``low``, a map at stride 8 (40 channels). ``cbr`` (1x1 conv, BatchNorm, ReLU
to ``inter_channels``, 128) is multiplied by ``scale``, a squeeze-excitation-like gate (global average pool, 1x1
conv, sigmoid); the product is upsampled bilinearly to the ``low`` map's size and classified by ``high_classifier``
(1x1 conv); ``low_classifier`` (1x1 conv) classifies the ``low`` map and the two logit maps are added. The sum is
upsampled bilinearly (``align_corners=False``) to the input size. There is no auxiliary head: in training the
model returns the logits tensor too.

Parity with torchvision's ``lraspp_mobilenet_v3_large`` (same parameters, same logits, any input size; 3,221,538
parameters with 21 classes):

* The backbone is maskworks' :class:`~maskworks.backbones.mobilenet.MobileNetV3` at ``output_stride=16``: its last
  stage (``features.13..15``) has stride 1 and dilation 2 in the depthwise convs, exactly torchvision's
  ``mobilenet_v3_large(dilated=True)``; the modules and ``features.*`` keys are torchvision's.
* ``low`` is torchvision's tap, not the backbone's ``forward_intermediates`` map at stride 8: torchvision takes
  ``features[4]`` (its ``stage_indices[-4]``, the *first* block of the stride-8 stage, the strided one; 40 channels),
  where the backbone's ``feature_info`` taps the *last* block of that stage (``features.6``, also 40 channels). The
  model runs ``encoder.features`` block by block and keeps block :attr:`LRASPP.low_index`'s output. Blocks after
  the final 1x1 conv do not exist, so ``high`` is the output of ``encoder.features``.
* Keys: torchvision's ``backbone.{i}.*`` (an ``IntermediateLayerGetter`` over ``features``) are ``encoder.features.{i}.*``
  here, ``classifier.*`` (``cbr.0/1``, ``scale.1``, ``low_classifier``, ``high_classifier``) are the same;
  :func:`maskworks.convert.lraspp.convert_torchvision_lraspp` renames them, and ``load_weights(model, path)``
  detects a torchvision LR-ASPP checkpoint. torchvision's ``COCO_WITH_VOC_LABELS_V1`` weights are the ``coco_voc``
  row of the weights table: ``create_model("lraspp_mobilenet_v3_large", pretrained=True)``.

No input padding is needed (the head works on any map size; the backbone's maps are ``ceil(H / r)``), and none is
done, as in torchvision.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.conv import ConvNormAct
from maskworks.models._utils import build_encoder, check_positive_int
from maskworks.registry import register_model

__all__ = ["LRASPP", "LRASPPHead", "lraspp_mobilenet_v3_large"]


class LRASPPHead(nn.Module):
    """torchvision's ``LRASPPHead``: gated 1x1 projection of the high map, upsampled, plus a 1x1 classifier of the low
    map.

    Args:
        low_channels: channels of the stride-8 map.
        high_channels: channels of the stride-16 map.
        num_classes: output channels.
        inter_channels: channels of ``cbr`` and ``scale``.
    """

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128) -> None:
        super().__init__()
        self.cbr = ConvNormAct(high_channels, inter_channels, 1, bias=False)
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``low (B, C_low, h8, w8)``, ``high (B, C_high, h16, w16)`` -> logits ``(B, K, h8, w8)``."""
        x = self.cbr(high) * self.scale(high)  # (B, inter, h16, w16) * (B, inter, 1, 1)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)  # (B, inter, h8, w8)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(nn.Module):
    """LR-ASPP on a MobileNet backbone (see the module docstring for the parity with torchvision).

    Args:
        encoder: a registered MobileNet backbone (``mobilenet_v3_large``, ``mobilenet_v3_small``; anything with a
            ``features`` sequence and ``feature_info``), built at ``output_stride``.
        num_classes: output channels (logits).
        in_channels: input image channels.
        output_stride: reduction of the ``high`` map: 16 (torchvision's ``dilated=True``), 8 or 32.
        inter_channels: channels of the head's ``cbr`` / ``scale`` branches (torchvision: 128).
        encoder_weights: published encoder weights (``"imagenet"`` or a tag of ``maskworks models --pretrained``), a
            local checkpoint path, or ``None`` for random init.
    """

    def __init__(
        self,
        encoder: str = "mobilenet_v3_large",
        num_classes: int = 21,
        in_channels: int = 3,
        output_stride: int = 16,
        inter_channels: int = 128,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("inter_channels", inter_channels)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.output_stride = output_stride
        self.encoder = build_encoder(encoder, in_channels, encoder_weights, output_stride=output_stride)
        features = getattr(self.encoder, "features", None)
        info = getattr(self.encoder, "feature_info", None)
        if not isinstance(features, nn.Sequential) or not info:
            raise ValueError(f"LR-ASPP needs a MobileNet encoder (a `features` sequence), got {encoder!r}")
        # torchvision's low tap: the first block of the stride-8 stage, i.e. the block after the last stride-4 one
        self.low_index = int(info[1]["module"].rsplit(".", 1)[1]) + 1
        low_channels = features[self.low_index].out_channels
        self.classifier = LRASPPHead(low_channels, info[-1]["num_chs"], num_classes, inter_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size (training too)."""
        size = x.shape[-2:]
        low = x
        for i, block in enumerate(self.encoder.features):
            x = block(x)
            if i == self.low_index:
                low = x  # (B, 40, ceil(H / 8), ceil(W / 8))
        logits = self.classifier(low, x)  # high: (B, 960, ceil(H / 16), ceil(W / 16))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)


@register_model(name="lraspp_mobilenet_v3_large")
def lraspp_mobilenet_v3_large(
    num_classes: int = 21,
    in_channels: int = 3,
    output_stride: int = 16,
    inter_channels: int = 128,
    encoder_weights: str | os.PathLike | None = None,
) -> LRASPP:
    """LR-ASPP with a MobileNetV3-Large backbone dilated to output stride 16: torchvision's
    ``lraspp_mobilenet_v3_large`` (``num_classes=21`` as torchvision's default; ``pretrained=True`` loads its COCO
    weights with the 20 Pascal VOC classes + background). Arguments as :class:`LRASPP`."""
    return LRASPP(
        "mobilenet_v3_large",
        num_classes=num_classes,
        in_channels=in_channels,
        output_stride=output_stride,
        inter_channels=inter_channels,
        encoder_weights=encoder_weights,
    )
