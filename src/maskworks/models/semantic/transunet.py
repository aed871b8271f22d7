"""TransUNet (Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation", 2021),
as the official code (Beckschen/TransUNet, ``networks/vit_seg_modeling.py``) builds it.

Encoder: the R50 + ViT-B/16 hybrid (:mod:`maskworks.backbones.vit_hybrid`, ``vit_base_r50_s16_224``: a ResNet-50 v2
cut after its third stage with layers ``(3, 4, 9)`` as in the official ``R50-ViT-B_16`` config, 1x1 patches on its
stride-16 map, 12 ViT-B blocks), without a class token: the position table has one row per patch, as the official
``Embeddings``. The last block's tokens go through the final LayerNorm (the official ``encoder_norm``).

Decoder, the cascaded upsampler (CUP, official ``DecoderCup``): ``conv_more`` (3x3 conv ``embed_dim`` -> 512, BN,
ReLU) on the token map at 1/16, then four :class:`DecoderBlock` (channels ``256, 128, 64, 16``), each a bilinear x2
upsampling with ``align_corners=True`` (the official ``nn.UpsamplingBilinear2d``), the concatenation of a CNN skip,
and two 3x3 conv-BN-ReLU; ``segmentation_head`` is a 3x3 conv to the classes at full resolution.

``n_skip`` is the official option: the first ``n_skip`` decoder blocks (at 1/8, 1/4, 1/2) concatenate the hybrid's
CNN maps at those resolutions (R50: stage 2, 512 channels; stage 1, 256; the stem before its pool, 64), the others
none; the last block (full resolution) never has one (the official config lists a 16-channel fourth skip that
``n_skip <= 3`` always zeroes). ``n_skip=0`` uses no skip; a plain ViT encoder (``encoder="vit_base_patch16_224"``,
the paper's ViT-only ablation) has no CNN maps and requires ``n_skip=0``.

Any input size: the input is zero-padded bottom / right to a multiple of 16 and the logits cropped back; the
position table is resampled to the token grid (the ViT's ``dynamic_img_size``, bicubic). The official code only
accepts square inputs at the size it was built for.

Official checkpoints: ``official_cnn=True`` builds the ResNet as the official code does, so that the official
ImageNet-21k ``R50+ViT-B_16.npz`` weights as their ``load_from`` loads them, and their trained models (converted by
:func:`maskworks.convert.transunet.convert_transunet_official`), compute the same function. Its ResNet differs
from timm's hybrid (our default) in: weight-standardisation eps 1e-5 (timm 1e-8), GroupNorm eps 1e-6 (timm 1e-5),
one GroupNorm group per channel with eps 1e-5 on the projection shortcuts (timm: 32 groups), symmetric PyTorch
padding (timm: TF "SAME") and an unpadded 3x3 / 2 stem max pool, after which the 1/4 map is one pixel short and is
zero-padded bottom / right to 1/4 before it is concatenated (official ``ResNetV2.forward``). ``ws_eps`` alone sets
the weight-standardisation eps.

Parameter names: the encoder under ``encoder.`` (timm's ``vit_base_r50_s16_224`` keys without ``cls_token``),
``decoder.conv_more.{0: conv, 1: bn}``, ``decoder.blocks.{i}.conv{1,2}.{0: conv, 1: bn}`` (the official names) and
``segmentation_head`` (official ``segmentation_head.0``). With 9 classes at 224 the model has 105,277,081
parameters, as the official one.

Dropout as the official config: 0.1 after the position embedding and in the MLPs, none on the attention.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.models._utils import (
    build_encoder,
    check_positive_int,
    check_positive_ints,
    crop_to,
    pad_to_multiple,
)
from maskworks.registry import register_model

__all__ = ["TransUNet", "DecoderCup", "DecoderBlock", "OFFICIAL_CNN"]

# ResNetV2 options that reproduce the official TransUNet code's ResNet (see the module docstring)
OFFICIAL_CNN: dict = {
    "conv_padding": None,
    "stem_type": "valid",
    "ws_eps": 1e-5,
    "norm_eps": 1e-6,
    "proj_num_groups": "channels",
    "proj_norm_eps": 1e-5,
}


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The official ``Conv2dReLU``: 3x3 conv (no bias), BatchNorm, ReLU; children ``0 / 1 / 2``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _fit_skip(skip: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Zero-pad a skip map bottom / right to ``size`` (the official code pads its short 1/4 map the same way)."""
    dh, dw = size[0] - skip.shape[-2], size[1] - skip.shape[-1]
    if dh < 0 or dw < 0:
        raise ValueError(f"skip map {tuple(skip.shape[-2:])} is larger than the decoder map {tuple(size)}")
    return F.pad(skip, (0, dw, 0, dh)) if dh or dw else skip


class DecoderBlock(nn.Module):
    """One CUP step: bilinear x2 (``align_corners=True``), concatenate the skip (if any), two 3x3 conv-BN-ReLU.

    Args:
        in_channels: channels of the coarser map.
        out_channels: output channels.
        skip_channels: channels of the skip map; 0 for none.
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)  # (B, C_in, 2h, 2w)
        if self.skip_channels:
            if skip is None:
                raise ValueError("this decoder block was built with a skip and got none")
            x = torch.cat([x, _fit_skip(skip, x.shape[-2:])], dim=1)  # (B, C_in + C_skip, 2h, 2w)
        elif skip is not None:
            raise ValueError("this decoder block was built without a skip and got one")
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    """The cascaded upsampler: ``conv_more`` on the token map, then one :class:`DecoderBlock` per channel entry.

    Args:
        in_channels: channels of the token map (``embed_dim``).
        decoder_channels: output channels of the blocks, coarse to fine.
        skip_channels: skip channels per block (0: no skip), as many as ``decoder_channels``.
        head_channels: output channels of ``conv_more``.
    """

    def __init__(
        self,
        in_channels: int,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        skip_channels: Sequence[int] = (512, 256, 64, 0),
        head_channels: int = 512,
    ) -> None:
        super().__init__()
        decoder_channels, skip_channels = tuple(decoder_channels), tuple(skip_channels)
        if len(skip_channels) != len(decoder_channels):
            raise ValueError(f"skip_channels {skip_channels} must have one entry per decoder block {decoder_channels}")
        self.conv_more = conv_bn_relu(in_channels, head_channels)
        ins = (head_channels, *decoder_channels[:-1])
        self.blocks = nn.ModuleList(DecoderBlock(i, o, s) for i, o, s in zip(ins, decoder_channels, skip_channels))

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Token map ``(B, C, h, w)`` and skips (coarse to fine, ``None`` where a block has none) ->
        ``(B, decoder_channels[-1], h * 2^n, w * 2^n)``."""
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


@register_model(name="transunet")
class TransUNet(nn.Module):
    """TransUNet: hybrid CNN + ViT encoder, cascaded upsampler with CNN skips (official layout and weights).

    Args:
        encoder: a registered ViT backbone: a hybrid (``vit_base_r50_s16_224`` / ``_384``, ``vit_test_r50_s16``;
            CNN skips available) or a plain ViT (``vit_base_patch16_224``...; ``n_skip=0``). Its token grid's
            reduction must be ``2 ** len(decoder_channels)`` (16 for the default four blocks).
        num_classes: output channels (logits); 9 is the official Synapse setting.
        in_channels: input image channels (the official code repeats a grey channel to three; here the first
            convolution takes ``in_channels``).
        encoder_weights: published encoder weights (a tag, see ``maskworks models --pretrained``) or a local
            checkpoint path (timm keys; a class-token row of ``pos_embed`` and ``cls_token`` are dropped, as the
            official ``load_from`` does), or ``None`` for random init.
        n_skip: number of decoder blocks, from the coarsest, that concatenate a CNN skip (0..3 for R50: 1/8, 1/4,
            1/2), the official ``n_skip``.
        decoder_channels: output channels of the decoder blocks, coarse to fine.
        head_channels: output channels of ``conv_more``.
        official_cnn: build the hybrid's ResNet as the official code does (:data:`OFFICIAL_CNN`), to run official
            checkpoints; default ``False`` keeps timm's hybrid (TF SAME padding, eps 1e-8).
        ws_eps: weight-standardisation eps of the hybrid's ResNet; ``None``: 1e-5 with ``official_cnn``, else the
            encoder's (timm's 1e-8).
        dropout: dropout after the position embedding and in the MLPs (official 0.1).
        attn_dropout: dropout on the attention probabilities (official 0).
        drop_path_rate: stochastic depth of the ViT blocks (official: none).
        img_size: input size the position table is built for (``None``: the encoder's, 224 for
            ``vit_base_r50_s16_224``); other sizes resample it. Set it to the official ``--img_size`` to load an
            official checkpoint trained at another size (its ``position_embeddings`` has one row per patch there).
    """

    def __init__(
        self,
        encoder: str = "vit_base_r50_s16_224",
        num_classes: int = 9,
        in_channels: int = 3,
        encoder_weights: str | os.PathLike | None = None,
        n_skip: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        head_channels: int = 512,
        official_cnn: bool = False,
        ws_eps: float | None = None,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        img_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("head_channels", head_channels)
        decoder_channels = tuple(decoder_channels)
        decoder_channels = check_positive_ints("decoder_channels", decoder_channels, len(decoder_channels))
        if not decoder_channels:
            raise ValueError("decoder_channels must not be empty")
        if isinstance(n_skip, bool) or not isinstance(n_skip, int) or n_skip < 0:
            raise ValueError(f"n_skip must be a non-negative int, got {n_skip!r}")
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.n_skip = n_skip

        cnn_options = dict(OFFICIAL_CNN) if official_cnn else {}
        if ws_eps is not None:
            cnn_options["ws_eps"] = float(ws_eps)
        options = {
            "num_classes": 0,
            "global_pool": "",
            "class_token": False,
            "dynamic_img_size": True,
            "pos_drop_rate": dropout,
            "proj_drop_rate": dropout,
            "attn_drop_rate": attn_dropout,
            "drop_path_rate": drop_path_rate,
        }
        if cnn_options:
            options["backbone_kwargs"] = cnn_options
        if img_size is not None:
            options["img_size"] = img_size
        try:
            self.encoder = build_encoder(encoder, in_channels, None, **options)
        except TypeError as err:
            if cnn_options and "backbone_kwargs" in str(err):
                raise ValueError(f"official_cnn / ws_eps need a hybrid (CNN + ViT) encoder, got {encoder!r}") from err
            raise
        if not hasattr(self.encoder, "forward_intermediates") or not hasattr(self.encoder, "blocks"):
            raise ValueError(f"encoder must be a ViT backbone, got {encoder!r}")
        for block in self.encoder.blocks:  # official: dropout in the MLP only, not after the attention projection
            block.attn.proj_drop.p = 0.0
        if encoder_weights is not None and encoder_weights is not False:
            self._load_encoder_weights(encoder, encoder_weights)

        self.hybrid = hasattr(self.encoder, "forward_hybrid")
        reduction = int(self.encoder.feature_info[-1]["reduction"])
        if reduction != 2 ** len(decoder_channels):
            raise ValueError(
                f"{len(decoder_channels)} decoder blocks upsample by {2 ** len(decoder_channels)}, but the encoder's "
                f"tokens are at 1/{reduction}; give log2({reduction}) decoder_channels"
            )
        cnn_info = list(reversed(getattr(self.encoder, "cnn_feature_info", []))) if self.hybrid else []
        if n_skip > min(len(cnn_info), len(decoder_channels) - 1):
            raise ValueError(
                f"n_skip={n_skip} but encoder {encoder!r} has {len(cnn_info)} CNN maps finer than its tokens "
                f"(n_skip must be 0..{min(len(cnn_info), len(decoder_channels) - 1)})"
            )
        skip_channels = [0] * len(decoder_channels)
        for i in range(n_skip):
            if cnn_info[i]["reduction"] != reduction // 2 ** (i + 1):
                raise ValueError(
                    f"CNN map {i} of {encoder!r} is at 1/{cnn_info[i]['reduction']}, decoder block {i} at "
                    f"1/{reduction // 2 ** (i + 1)}"
                )
            skip_channels[i] = int(cnn_info[i]["num_chs"])
        self.skip_channels = tuple(skip_channels)
        self._pad_multiple = reduction
        embed_dim = int(self.encoder.feature_info[-1]["num_chs"])
        self.decoder = DecoderCup(embed_dim, decoder_channels, skip_channels, head_channels)
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)

    def _load_encoder_weights(self, encoder: str, weights: bool | str | os.PathLike) -> None:
        from maskworks.convert import load_weights, read_state_dict

        if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
            path, source = weights, "auto"
        else:
            from maskworks.hub import resolve_weights

            resolved = resolve_weights(encoder, weights)
            path, source = resolved.path, resolved.source
        sd = read_state_dict(path)
        sd.pop("cls_token", None)
        pos = sd.get("pos_embed")
        if pos is not None and pos.shape[1] == self.encoder.pos_embed.shape[1] + 1:  # drop the class-token row
            sd["pos_embed"] = pos[:, 1:]
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        load_weights(self.encoder, sd, source=source)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Padded images ``(B, C, H, W)`` (multiples of 16) -> normed token map ``(B, D, H / 16, W / 16)`` and the
        decoder's skips, coarse to fine (``n_skip`` maps)."""
        if self.hybrid:
            cnn, vit = self.encoder.forward_hybrid(x, indices=[-1], norm=True)
        else:
            cnn, vit = [], self.encoder.forward_intermediates(x, indices=[-1], norm=True)
        skips = list(reversed(cnn))[: self.n_skip]
        return vit[-1], skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size."""
        x, size = pad_to_multiple(x, self._pad_multiple)
        tokens, skips = self.forward_features(x)
        y = self.decoder(tokens, skips)  # (B, decoder_channels[-1], H_pad, W_pad)
        return crop_to(self.segmentation_head(y), size)
