"""PSPNet (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017).

A registered backbone, cut after ``encoder_depth`` stages, gives one map; the pyramid pooling module
(:class:`~maskworks.layers.ppm.PSPModule`, bins 1, 2, 3, 6) adds global and sub-region context to it, a
1x1 conv fuses the result, and a 3x3 head plus bilinear upsampling gives the logits. Layout, module
names and initialisation are those of ``segmentation_models_pytorch.PSPNet``, so its state dicts load
unchanged and give the same logits.

Like smp, the encoder keeps its stages deeper than ``encoder_depth`` (e.g. ``layer3`` / ``layer4`` of
a ResNet at the default depth 3): smp's ResNet encoder does not delete them, so its checkpoints hold
them and parameter counts include them. They are never run here, and their parameters are frozen
(``requires_grad=False``) so optimisers and DDP ignore them.

``aux=True`` adds the paper's deep supervision: an FCN head (3x3 conv-BN-ReLU, dropout 0.1, 1x1 conv,
as mmseg's auxiliary ``FCNHead``) on the encoder map one stage before the one the pyramid uses; in
training the model then returns ``{"out": logits, "aux": [aux_logits]}`` (the paper weights the aux
loss by 0.4, the default ``aux_weight`` of the losses).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.conv import ConvNormAct
from maskworks.layers.ppm import PSPDecoder
from maskworks.models._utils import build_encoder, check_positive_int, crop_to, init_like_smp, pad_to_multiple
from maskworks.registry import register_model

__all__ = ["PSPNet", "run_resnet_stages"]

# attributes a backbone needs for a truncated run (torchvision / timm / maskworks ResNet layout)
_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _is_resnet_like(encoder: nn.Module) -> bool:
    return all(hasattr(encoder, name) for name in _RESNET_PARTS)


def run_resnet_stages(encoder: nn.Module, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The first ``depth`` maps of a ResNet-like backbone, running only the stages they need.

    Args:
        encoder: a module with ``conv1``, ``bn1``, ``relu``, ``maxpool`` and ``layer1``..``layer4``.
        x: images ``(B, C, H, W)``.
        depth: number of maps, 1 (stem, stride 2) to 5 (``layer4``).

    Returns:
        ``depth`` maps: the stem output (after ``relu``) and the outputs of ``layer1``..``layer{depth-1}``.
    """
    x = encoder.relu(encoder.bn1(encoder.conv1(x)))
    features = [x]
    if depth > 1:
        x = encoder.maxpool(x)
        for i in range(1, depth):
            x = getattr(encoder, f"layer{i}")(x)
            features.append(x)
    return features


@register_model(name="pspnet")
class PSPNet(nn.Module):
    """PSPNet with a registered backbone as encoder; the layout and keys of ``smp.PSPNet``.

    The logits are upsampled by the stride of the used map (8 at ``encoder_depth=3``, smp's default
    ``upsampling=8``), so they always come at input resolution.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``). ``encoder_depth`` below the
            number of its maps needs a ResNet-like backbone (``conv1``/``bn1``/``relu``/``maxpool``/
            ``layer1``..``layer4``).
        num_classes: output channels (logits).
        in_channels: input image channels.
        encoder_depth: number of encoder maps computed (1..5 for ResNet); the pyramid uses the last.
        psp_out_channels: channels after the pyramid's fusing 1x1 conv.
        psp_use_batchnorm: BatchNorm in the decoder (without it the convs get a bias).
        psp_dropout: ``Dropout2d`` probability after the decoder.
        aux: add an auxiliary FCN head on the previous encoder map, returned in training only.
        encoder_weights: published encoder weights (``"imagenet"`` or a tag of ``maskworks models --pretrained``), a
            local checkpoint path, or ``None`` for random init.
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        num_classes: int = 1,
        in_channels: int = 3,
        encoder_depth: int = 3,
        psp_out_channels: int = 512,
        psp_use_batchnorm: bool = True,
        psp_dropout: float = 0.2,
        aux: bool = False,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes, allow_bool=True)
        check_positive_int("psp_out_channels", psp_out_channels, allow_bool=True)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder = build_encoder(encoder, in_channels, encoder_weights)
        info = self.encoder.feature_info
        if not isinstance(encoder_depth, int) or not 1 <= encoder_depth <= len(info):
            raise ValueError(f"encoder_depth must be an int in [1, {len(info)}] for {encoder!r}, got {encoder_depth!r}")
        self._truncated = encoder_depth < len(info)
        if self._truncated:
            if not _is_resnet_like(self.encoder) or len(info) != 5:
                raise ValueError(
                    f"encoder_depth={encoder_depth} < {len(info)} needs a ResNet-like encoder "
                    f"(conv1/bn1/relu/maxpool/layer1..layer4); {encoder!r} supports encoder_depth={len(info)} only"
                )
            for i in range(encoder_depth, 5):  # stages never run (kept for smp key compatibility)
                getattr(self.encoder, f"layer{i}").requires_grad_(False)
        if aux and encoder_depth < 2:
            raise ValueError(f"aux=True needs encoder_depth >= 2 (a map before the last), got {encoder_depth!r}")
        self.encoder_depth = encoder_depth
        self.aux = aux
        enc_channels = [i["num_chs"] for i in info[:encoder_depth]]
        stride = info[encoder_depth - 1]["reduction"]

        self.decoder = PSPDecoder(
            enc_channels, batch_norm=psp_use_batchnorm, out_channels=psp_out_channels, dropout=psp_dropout
        )
        # smp's SegmentationHead(kernel_size=3, upsampling=8): conv, bilinear upsampling (no parameters)
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(psp_out_channels, num_classes, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=stride, mode="bilinear", align_corners=True),
        )
        self._pad_multiple = stride
        init_like_smp(self.decoder, self.segmentation_head)
        if aux:
            aux_in = enc_channels[-2]
            aux_mid = max(aux_in // 4, 1)  # mmseg: 1024 -> 256
            self.aux_head = nn.Sequential(
                ConvNormAct(aux_in, aux_mid, 3), nn.Dropout2d(0.1), nn.Conv2d(aux_mid, num_classes, kernel_size=1)
            )
            init_like_smp(self.aux_head[:1], self.aux_head[2:])

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._truncated:
            return run_resnet_stages(self.encoder, x, self.encoder_depth)
        return self.encoder.forward_intermediates(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size.

        In training with ``aux=True``: ``{"out": logits, "aux": [aux_logits]}``, both at input size.
        """
        x, size = pad_to_multiple(x, self._pad_multiple)
        features = self._encode(x)
        out = self.segmentation_head(self.decoder(features))  # (B, K, H_pad, W_pad)
        out = crop_to(out, size)
        if not (self.aux and self.training):
            return out
        aux = self.aux_head(features[-2])  # (B, K, H_pad / s, W_pad / s)
        aux = F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return {"out": out, "aux": [crop_to(aux, size)]}
