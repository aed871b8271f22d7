"""FPN for semantic segmentation (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017;
the segmentation branch of Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019).

A registered backbone gives maps at strides 4, 8, 16, 32; a top-down pyramid merges them, every level
is brought to stride 4 by conv-GroupNorm-ReLU blocks with x2 upsampling, the levels are summed (or
concatenated), and a 1x1 head plus x4 bilinear upsampling gives the logits. Layout, module names and
initialisation are those of ``segmentation_models_pytorch.FPN``, so its state dicts load unchanged
and give the same logits.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from maskworks.layers.fpn import FPNDecoder
from maskworks.models._utils import build_encoder, check_positive_int, crop_to, init_like_smp, pad_to_multiple
from maskworks.registry import register_model

__all__ = ["FPN"]


@register_model(name="fpn")
class FPN(nn.Module):
    """FPN with a registered backbone as encoder; the layout and keys of ``smp.FPN``.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``) with at least four maps whose
            last four strides double from level to level (4, 8, 16, 32 for ResNet).
        num_classes: output channels (logits).
        in_channels: input image channels.
        decoder_pyramid_channels: channels of the top-down pyramid.
        decoder_segmentation_channels: channels of the segmentation blocks (multiple of 32, GroupNorm).
        decoder_merge_policy: ``"add"`` or ``"cat"`` the four levels.
        decoder_dropout: ``Dropout2d`` probability after merging.
        decoder_interpolation: upsampling mode of the top-down pathway (``"nearest"`` as the paper and smp).
        encoder_weights: published encoder weights (``"imagenet"`` or a tag of ``maskworks models --pretrained``), a
            local checkpoint path, or ``None`` for random init.
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        num_classes: int = 1,
        in_channels: int = 3,
        decoder_pyramid_channels: int = 256,
        decoder_segmentation_channels: int = 128,
        decoder_merge_policy: str = "add",
        decoder_dropout: float = 0.2,
        decoder_interpolation: str = "nearest",
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes, allow_bool=True)
        check_positive_int("decoder_pyramid_channels", decoder_pyramid_channels, allow_bool=True)
        check_positive_int("decoder_segmentation_channels", decoder_segmentation_channels, allow_bool=True)
        if decoder_segmentation_channels % 32:
            raise ValueError(
                f"decoder_segmentation_channels must be a multiple of 32 (GroupNorm groups), "
                f"got {decoder_segmentation_channels!r}"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder = build_encoder(encoder, in_channels, encoder_weights)
        info = self.encoder.feature_info
        strides = [i["reduction"] for i in info[-4:]]
        if len(info) < 4 or any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(
                f"encoder {encoder!r} must give at least 4 maps with doubling strides (4, 8, 16, 32), got {strides}"
            )
        self.decoder = FPNDecoder(
            [i["num_chs"] for i in info],
            pyramid_channels=decoder_pyramid_channels,
            segmentation_channels=decoder_segmentation_channels,
            dropout=decoder_dropout,
            merge_policy=decoder_merge_policy,
            interpolation_mode=decoder_interpolation,
        )
        # smp's SegmentationHead(kernel_size=1, upsampling=4): conv, bilinear upsampling (no parameters)
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(self.decoder.out_channels, num_classes, kernel_size=1),
            nn.Upsample(scale_factor=strides[0], mode="bilinear", align_corners=True),
        )
        self._pad_multiple = strides[-1]
        init_like_smp(self.decoder, self.segmentation_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size."""
        x, size = pad_to_multiple(x, self._pad_multiple)
        features = self.encoder.forward_intermediates(x)
        x = self.decoder(features)  # (B, C_dec, H_pad / 4, W_pad / 4)
        return crop_to(self.segmentation_head(x), size)
