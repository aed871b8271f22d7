"""SegFormer (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021): a Mix Transformer encoder (:mod:`maskworks.backbones.mit`) and the All-MLP decoder.

Decoder (:class:`SegFormerHead`, Hugging Face ``SegformerDecodeHead``): each of the four stage maps goes through a
linear layer to the decoder width (``linear_c.{i}``, 256 for B0 / B1, 768 for B2 - B5), is upsampled bilinearly
(``align_corners=False``) to the size of the stride-4 map, and the four are concatenated coarsest first
(``[c4, c3, c2, c1]``, the order of NVlabs and HF), fused by a 1x1 conv + BatchNorm + ReLU (``linear_fuse.conv /
bn``), dropout 0.1, and classified by a 1x1 conv (``classifier``). The logits at stride 4 are upsampled bilinearly
(``align_corners=False``) to the input size.

Keys: ``encoder.*`` (the MiT backbone), ``decode_head.linear_c.{i}.weight / bias`` (``Linear``: HF's
``decode_head.linear_c.{i}.proj``), ``decode_head.linear_fuse.conv.weight`` (HF ``linear_fuse``),
``decode_head.linear_fuse.bn.*`` (HF ``batch_norm``), ``decode_head.classifier.*``. Hugging Face
``SegformerForSemanticSegmentation`` checkpoints (``nvidia/segformer-b*-finetuned-*``) load with
:func:`maskworks.load_weights` (:func:`maskworks.convert.segformer.convert_hf_segformer`) and give HF's logits
upsampled to the input size; ``nvidia/mit-b*`` (``SegformerForImageClassification``) load into the encoder.

Any input size, without padding: the encoder's convolutions round as HF's do (see :mod:`maskworks.backbones.mit`),
so the logits equal HF's at every size HF accepts.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.backbones.mit import MIT_CONFIGS
from maskworks.layers.conv import ConvBNReLU
from maskworks.models._utils import build_encoder, check_positive_int, check_positive_ints
from maskworks.registry import register_model

__all__ = ["SegFormer", "SegFormerHead", "SEGFORMER_DECODER_CHANNELS"]

# variant -> decoder width (NVlabs / HF ``decoder_hidden_size``)
SEGFORMER_DECODER_CHANNELS = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}


class SegFormerHead(nn.Module):
    """The All-MLP decoder.

    Args:
        in_channels: channels of the four encoder maps, finest first.
        num_classes: output channels.
        channels: decoder width.
        dropout: dropout probability before the classifier (``nn.Dropout``, as HF).

    Returns (forward): logits ``(B, num_classes, h_1, w_1)`` at the size of the first (stride-4) map.
    """

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(c, channels) for c in in_channels)
        self.linear_fuse = ConvBNReLU(len(in_channels) * channels, channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        outs = []
        for x, linear in zip(features, self.linear_c):
            # the per-token linear layer on (B, HW, C) tokens; the result is viewed back as a (B, C', H, W) map
            # without a copy (channels-last strides), which the upsampling reads faster than a 1x1 conv's output
            b, _, h, w = x.shape
            x = linear(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outs.append(x)
        x = self.linear_fuse(torch.cat(outs[::-1], dim=1))  # coarsest first, as NVlabs / HF
        return self.classifier(self.dropout(x))


class SegFormer(nn.Module):
    """SegFormer: a MiT (or other 4-stage) encoder and the All-MLP decoder; HF-compatible weights.

    Args:
        encoder: a registered backbone with four maps of strides 4, 8, 16, 32 (``mit_b0`` .. ``mit_b5``).
        num_classes: output channels (logits).
        in_channels: input image channels.
        encoder_weights: published encoder weights (a tag of ``maskworks models --pretrained``), a local
            checkpoint path (e.g. HF ``nvidia/mit-b0``'s ``model.safetensors``), or ``None`` for random init.
        decoder_channels: decoder width; ``None``: 256 for ``mit_b0`` / ``mit_b1``, 768 otherwise.
        drop_path_rate: stochastic depth of the encoder's last block (0.1 in the paper's training).
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        encoder: str = "mit_b0",
        num_classes: int = 150,
        in_channels: int = 3,
        encoder_weights: str | os.PathLike | None = None,
        decoder_channels: int | None = None,
        drop_path_rate: float = 0.1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        if decoder_channels is None:
            decoder_channels = 256 if encoder in ("mit_b0", "mit_b1") else 768
        check_positive_int("decoder_channels", decoder_channels)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder = build_encoder(encoder, in_channels, encoder_weights, drop_path_rate=drop_path_rate)
        info = self.encoder.feature_info
        if len(info) < 4:
            raise ValueError(f"encoder {encoder!r} must give at least 4 maps, got {len(info)}")
        self._feature_indices = tuple(range(len(info) - 4, len(info)))
        enc_channels = check_positive_ints("encoder channels", [info[i]["num_chs"] for i in self._feature_indices], 4)
        self.decode_head = SegFormerHead(enc_channels, num_classes, decoder_channels, dropout)
        # HF's decode-head initialisation: normal(0, 0.02) linear / conv weights, zero biases, BN 1 / 0
        for m in self.decode_head.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size."""
        maps = self.encoder.forward_intermediates(x)
        out = self.decode_head([maps[i] for i in self._feature_indices])  # (B, K, ceil(H / 4), ceil(W / 4))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _make_variant(variant: str):
    encoder = f"mit_{variant}"
    dims, depths = MIT_CONFIGS[encoder]

    def fn(
        num_classes: int = 150,
        in_channels: int = 3,
        encoder_weights: str | os.PathLike | None = None,
        decoder_channels: int | None = None,
        drop_path_rate: float = 0.1,
        dropout: float = 0.1,
    ) -> SegFormer:
        return SegFormer(encoder, num_classes, in_channels, encoder_weights, decoder_channels, drop_path_rate, dropout)

    fn.__name__ = fn.__qualname__ = f"segformer_{variant}"
    fn.__doc__ = (
        f"SegFormer-{variant.upper()}: ``{encoder}`` encoder (dims {'-'.join(map(str, dims))}, depths "
        f"{'-'.join(map(str, depths))}) and a {SEGFORMER_DECODER_CHANNELS[variant]}-wide All-MLP decoder "
        "(arguments as :class:`SegFormer`)."
    )
    return fn


segformer_b0 = register_model(_make_variant("b0"))
segformer_b1 = register_model(_make_variant("b1"))
segformer_b2 = register_model(_make_variant("b2"))
segformer_b3 = register_model(_make_variant("b3"))
segformer_b4 = register_model(_make_variant("b4"))
segformer_b5 = register_model(_make_variant("b5"))
