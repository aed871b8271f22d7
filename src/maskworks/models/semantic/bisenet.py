"""BiSeNet V1 and V2, two-branch real-time segmentation networks.

* :class:`BiSeNetV1` (``bisenetv1``): Yu et al., "BiSeNet: Bilateral Segmentation Network for Real-time
  Semantic Segmentation", ECCV 2018. A shallow, wide *spatial path* (three strided convs, 1/8) keeps the
  detail; a *context path* on a pretrained backbone (ResNet-18) gives the receptive field: a global-context
  vector (global average pooling -> 1x1 conv) plus attention refinement modules (ARM) on the 1/32 and 1/16
  maps, **summed** top-down with upsampling. A feature fusion module (FFM: concat -> 1x1 conv -> channel
  attention, ``x + x * att``) merges the two paths. Two auxiliary heads on the context-path outputs give the
  paper's auxiliary losses.
* :class:`BiSeNetV2` (``bisenetv2``): Yu et al., "BiSeNet V2: Bilateral Network with Guided Aggregation for
  Real-time Semantic Segmentation", IJCV 2021. A detail branch (64/64/128 channels, 1/8) and a light semantic
  branch (stem block, gather-and-expand layers, context embedding block, 1/32), fused by the bilateral
  guided aggregation layer (BGA); four booster heads on the semantic stages during training.

Module names and state-dict keys follow CoinCheung/BiSeNet (``cp``/``sp``/``ffm``/``conv_out*`` for V1,
``detail``/``segment``/``bga``/``head``/``aux*`` for V2; conv-BN-ReLU blocks have children ``conv``, ``bn``,
``relu``), so its checkpoints load: V2 as-is, V1 through :func:`convert_coincheung_bisenetv1` (the backbone
lives in ``encoder`` here so that :func:`maskworks.convert.load_weights` puts an ImageNet ResNet there).

Differences from the seed material (see the technique notes, Q10): the V1 context path sums instead of
concatenating and has the auxiliary heads; BatchNorm after global pooling is
:class:`~maskworks.layers.PooledBatchNorm2d` (batch size 1 trains); every bilinear resize states
``align_corners``; any input size works: each upsampling goes to the exact size of the map it is fused with,
and the logits are resized to the input size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.convert._common import strip_wrapper_prefixes
from maskworks.layers import PooledBatchNorm2d
from maskworks.layers.conv import ConvBNReLU
from maskworks.models._utils import (
    check_positive_int,
    check_positive_ints,
    init_kaiming,
    load_encoder_weights,
    resize_bilinear,
)
from maskworks.registry import model_entry, register_model

__all__ = [
    "BiSeNetV1",
    "BiSeNetV2",
    "ConvBNReLU",
    "SpatialPath",
    "AttentionRefinementModule",
    "ContextPath",
    "FeatureFusionModule",
    "BiSeNetOutput",
    "DetailBranch",
    "StemBlock",
    "GELayer",
    "CEBlock",
    "SegmentBranch",
    "BGALayer",
    "SegmentHead",
    "convert_coincheung_bisenetv1",
    "convert_coincheung_bisenetv2",
]


# =========================================================================== BiSeNet V1
class SpatialPath(nn.Module):
    """7x7 s2 -> 3x3 s2 -> 3x3 s2 conv-BN-ReLU (1/8, ``ceil(H / 8)``), then a 1x1 projection.

    Args:
        in_channels: input image channels.
        channels: output channels of the four convs (three strided, one 1x1).
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 64, 64, 128)) -> None:
        super().__init__()
        c1, c2, c3, c_out = channels
        self.conv1 = ConvBNReLU(in_channels, c1, 7, stride=2)
        self.conv2 = ConvBNReLU(c1, c2, 3, stride=2)
        self.conv3 = ConvBNReLU(c2, c3, 3, stride=2)
        self.conv_out = ConvBNReLU(c3, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv3(self.conv2(self.conv1(x))))


class AttentionRefinementModule(nn.Module):
    """3x3 conv-BN-ReLU, then channel attention ``sigmoid(BN(conv1x1(GAP(x))))`` multiplied in."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, 3)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = PooledBatchNorm2d(out_ch)  # on a 1x1 map: trains at batch size 1
        self.sigmoid_atten = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = feat.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        atten = self.sigmoid_atten(self.bn_atten(self.conv_atten(atten)))
        return feat * atten


class ContextPath(nn.Module):
    """Global context + ARMs on the 1/32 and 1/16 backbone maps, summed top-down (the backbone is outside).

    ``x32 = ARM32(c5) + conv_avg(GAP(c5))`` (broadcast), upsampled (nearest) to 1/16 and refined by a 3x3
    conv-BN-ReLU; ``x16 = ARM16(c4) + x32``, upsampled to 1/8 and refined likewise.

    Args:
        in_ch16: channels of the 1/16 backbone map.
        in_ch32: channels of the 1/32 backbone map.
        channels: channels of the context features.
    """

    def __init__(self, in_ch16: int, in_ch32: int, channels: int = 128) -> None:
        super().__init__()
        self.arm16 = AttentionRefinementModule(in_ch16, channels)
        self.arm32 = AttentionRefinementModule(in_ch32, channels)
        self.conv_head32 = ConvBNReLU(channels, channels, 3)
        self.conv_head16 = ConvBNReLU(channels, channels, 3)
        self.conv_avg = ConvBNReLU(in_ch32, channels, 1, norm_layer=PooledBatchNorm2d)

    def forward(
        self, feat16: torch.Tensor, feat32: torch.Tensor, size8: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context features at 1/8 (``size8``, for the FFM) and at 1/16 (the size of ``feat16``).

        Args:
            feat16: backbone map at 1/16.
            feat32: backbone map at 1/32.
            size8: ``(H, W)`` of the spatial-path output.

        Returns:
            ``(B, channels, *size8)`` and ``(B, channels, *feat16.shape[-2:])``.
        """
        avg = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1), broadcast in the sum
        feat32_sum = self.arm32(feat32) + avg
        feat32_up = F.interpolate(feat32_sum, size=feat16.shape[-2:], mode="nearest")
        feat32_up = self.conv_head32(feat32_up)
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = F.interpolate(feat16_sum, size=tuple(size8), mode="nearest")
        feat16_up = self.conv_head16(feat16_up)
        return feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """Concat -> 1x1 conv-BN-ReLU -> ``x + x * sigmoid(conv1x1(ReLU(conv1x1(GAP(x)))))`` (reduction 4)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, 1)
        self.conv1 = nn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch // 4, out_ch, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))  # (B, C_sp + C_cp, H, W) -> (B, out_ch, H, W)
        atten = feat.mean(dim=(2, 3), keepdim=True)  # (B, out_ch, 1, 1)
        atten = self.sigmoid(self.conv2(self.relu(self.conv1(atten))))
        return feat + feat * atten


class BiSeNetOutput(nn.Module):
    """Segmentation head: 3x3 conv-BN-ReLU -> 1x1 conv (no bias) to the classes."""

    def __init__(self, in_ch: int, mid_ch: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch, 3)
        self.conv_out = nn.Conv2d(mid_ch, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


@register_model(name="bisenetv1")
class BiSeNetV1(nn.Module):
    """BiSeNet (V1): spatial path + context path on a registered backbone, fused by the FFM.

    With the defaults (ResNet-18, 19 classes, auxiliary heads) it has 13,392,384 parameters (13,242,240 without
    the auxiliary heads, 11,176,512 of them in the ResNet-18), the count of CoinCheung's ResNet-18 BiSeNetV1
    with bilinear heads; its outputs match that network's after :func:`convert_coincheung_bisenetv1`.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``) whose ``feature_info`` has maps at
            reductions 16 and 32, e.g. ``"resnet18"``; its deepest map at each of them feeds the context path.
        num_classes: output channels (logits).
        in_channels: input image channels.
        aux: build the two auxiliary heads (on the 1/8 and 1/16 context features) and return their logits
            in training as ``{"out": logits, "aux": [aux16, aux32]}``.
        spatial_channels: channels of the spatial path's three strided convs and its 1x1 output conv.
        context_channels: channels of the context path (ARMs, global context, refinement convs).
        fusion_channels: output channels of the FFM.
        head_channels: hidden channels of the main head.
        aux_channels: hidden channels of the auxiliary heads.
        align_corners: ``align_corners`` of the final bilinear resizes (mmseg: False; CoinCheung: True).
        encoder_weights: ``\"imagenet\"`` / a published tag (``maskworks models --pretrained``), or a path of a local checkpoint for the backbone (torchvision / timm / maskworks ResNet
            keys), or ``None`` for random init.
    """

    def __init__(
        self,
        encoder: str = "resnet18",
        num_classes: int = 19,
        in_channels: int = 3,
        aux: bool = True,
        spatial_channels: Sequence[int] = (64, 64, 64, 128),
        context_channels: int = 128,
        fusion_channels: int = 256,
        head_channels: int = 256,
        aux_channels: int = 64,
        align_corners: bool = False,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        spatial_channels = check_positive_ints("spatial_channels", spatial_channels, 4, allow_bool=True)
        for name, value in (("context_channels", context_channels), ("head_channels", head_channels)):
            check_positive_int(name, value)
        check_positive_int("aux_channels", aux_channels)
        if check_positive_int("fusion_channels", fusion_channels) < 4:
            raise ValueError(f"fusion_channels must be >= 4 (attention reduction 4), got {fusion_channels!r}")
        entry = model_entry(encoder)
        if entry.kind != "backbone":
            raise ValueError(f"encoder must be a registered backbone, got {encoder!r} (kind={entry.kind!r})")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.aux = bool(aux)
        self.align_corners = bool(align_corners)

        self.encoder = entry.fn(in_channels=in_channels)
        load_encoder_weights(self.encoder, encoder, encoder_weights)
        reductions = [info["reduction"] for info in self.encoder.feature_info]
        if 16 not in reductions or 32 not in reductions:
            raise ValueError(f"encoder {encoder!r} must give maps at reductions 16 and 32, got {reductions}")
        # the last map at each reduction (the deepest one)
        self._index16 = len(reductions) - 1 - reductions[::-1].index(16)
        self._index32 = len(reductions) - 1 - reductions[::-1].index(32)
        chs = [info["num_chs"] for info in self.encoder.feature_info]

        self.cp = ContextPath(chs[self._index16], chs[self._index32], context_channels)
        self.sp = SpatialPath(in_channels, spatial_channels)
        self.ffm = FeatureFusionModule(spatial_channels[-1] + context_channels, fusion_channels)
        self.conv_out = BiSeNetOutput(fusion_channels, head_channels, num_classes)
        if self.aux:
            self.conv_out16 = BiSeNetOutput(context_channels, aux_channels, num_classes)
            self.conv_out32 = BiSeNetOutput(context_channels, aux_channels, num_classes)
        init_kaiming([m for name, m in self.named_children() if name != "encoder"])

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits ``(B, num_classes, H, W)``; in training with ``aux``, ``{"out": logits, "aux": [2 logits]}``."""
        size = x.shape[-2:]
        feat_sp = self.sp(x)  # (B, C_sp, ceil(H / 8), ceil(W / 8))
        features = self.encoder.forward_intermediates(x)
        feat_cp8, feat_cp16 = self.cp(features[self._index16], features[self._index32], feat_sp.shape[-2:])
        out = resize_bilinear(self.conv_out(self.ffm(feat_sp, feat_cp8)), size, self.align_corners)
        if not (self.training and self.aux):
            return out
        aux = [
            resize_bilinear(self.conv_out16(feat_cp8), size, self.align_corners),
            resize_bilinear(self.conv_out32(feat_cp16), size, self.align_corners),
        ]
        return {"out": out, "aux": aux}


# =========================================================================== BiSeNet V2
class DetailBranch(nn.Module):
    """Three stages of 3x3 conv-BN-ReLU (2, 3, 3 convs), each starting with stride 2: 1/8, wide and shallow.

    Args:
        in_channels: input image channels.
        channels: output channels of the three stages.
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 64, 128)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.S1 = nn.Sequential(ConvBNReLU(in_channels, c1, 3, stride=2), ConvBNReLU(c1, c1, 3))
        self.S2 = nn.Sequential(ConvBNReLU(c1, c2, 3, stride=2), ConvBNReLU(c2, c2, 3), ConvBNReLU(c2, c2, 3))
        self.S3 = nn.Sequential(ConvBNReLU(c2, c3, 3, stride=2), ConvBNReLU(c3, c3, 3), ConvBNReLU(c3, c3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.S3(self.S2(self.S1(x)))


class StemBlock(nn.Module):
    """Stem of the semantic branch (1/4): 3x3 s2 conv, then [1x1 -> 3x3 s2 conv] and [3x3 s2 max-pool], concat, fuse."""

    def __init__(self, in_channels: int = 3, out_channels: int = 16) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3, stride=2)
        self.left = nn.Sequential(
            ConvBNReLU(out_channels, out_channels // 2, 1), ConvBNReLU(out_channels // 2, out_channels, 3, stride=2)
        )
        self.right = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=False)
        self.fuse = ConvBNReLU(2 * out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        feat = torch.cat([self.left(feat), self.right(feat)], dim=1)  # (B, 2C, H / 4, W / 4)
        return self.fuse(feat)


class GELayer(nn.Module):
    """Gather-and-expand layer: 3x3 conv, depthwise expansion (x ``exp_ratio``), 1x1 projection, residual.

    Stride 1 (``GELayerS1``): ``dwconv`` (3x3 depthwise, BN, ReLU) and an identity shortcut (``in_ch ==
    out_ch``). Stride 2 (``GELayerS2``): ``dwconv1`` (3x3 s2 depthwise, BN) and ``dwconv2`` (3x3 depthwise, BN,
    ReLU), and a depthwise-separable shortcut (3x3 s2 depthwise, BN, 1x1, BN).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        exp_ratio: expansion ratio of the depthwise convs.
        stride: 1 or 2.
    """

    def __init__(self, in_ch: int, out_ch: int, exp_ratio: int = 6, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if stride == 1 and in_ch != out_ch:
            raise ValueError(f"a stride-1 GE layer needs in_ch == out_ch, got {in_ch} and {out_ch}")
        mid = in_ch * exp_ratio
        self.stride = stride
        self.conv1 = ConvBNReLU(in_ch, in_ch, 3)
        if stride == 1:
            self.dwconv = nn.Sequential(
                nn.Conv2d(in_ch, mid, 3, 1, 1, groups=in_ch, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)
            )
        else:
            self.dwconv1 = nn.Sequential(nn.Conv2d(in_ch, mid, 3, 2, 1, groups=in_ch, bias=False), nn.BatchNorm2d(mid))
            self.dwconv2 = nn.Sequential(
                nn.Conv2d(mid, mid, 3, 1, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)
            )
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, in_ch, 3, 2, 1, groups=in_ch, bias=False),
                nn.BatchNorm2d(in_ch),
                nn.Conv2d(in_ch, out_ch, 1, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        self.conv2 = nn.Sequential(nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv1(x)
        if self.stride == 1:
            feat, shortcut = self.dwconv(feat), x
        else:
            feat, shortcut = self.dwconv2(self.dwconv1(feat)), self.shortcut(x)
        return self.relu(self.conv2(feat) + shortcut)


class CEBlock(nn.Module):
    """Context embedding: ``conv_last(x + conv_gap(BN(GAP(x))))``; the 1x1-map norms are pooled BatchNorms."""

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.bn = PooledBatchNorm2d(channels)
        self.conv_gap = ConvBNReLU(channels, channels, 1, norm_layer=PooledBatchNorm2d)
        self.conv_last = ConvBNReLU(channels, channels, 3)  # the paper has a plain conv here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_gap(self.bn(x.mean(dim=(2, 3), keepdim=True)))  # (B, C, 1, 1), broadcast in the sum
        return self.conv_last(feat + x)


class SegmentBranch(nn.Module):
    """Semantic branch: stem (1/4), GE stages at 1/8, 1/16, 1/32 (2, 2, 4 layers), context embedding.

    Args:
        in_channels: input image channels.
        channels: channels of the stem and the three GE stages.
        exp_ratio: expansion ratio of the GE layers.
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64, 128), exp_ratio: int = 6) -> None:
        super().__init__()
        c2, c3, c4, c5 = channels
        self.S1S2 = StemBlock(in_channels, c2)
        self.S3 = nn.Sequential(GELayer(c2, c3, exp_ratio, 2), GELayer(c3, c3, exp_ratio))
        self.S4 = nn.Sequential(GELayer(c3, c4, exp_ratio, 2), GELayer(c4, c4, exp_ratio))
        self.S5_4 = nn.Sequential(GELayer(c4, c5, exp_ratio, 2), *(GELayer(c5, c5, exp_ratio) for _ in range(3)))
        self.S5_5 = CEBlock(c5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The stem, S3, S4, S5_4 outputs (1/4, 1/8, 1/16, 1/32; for the boosters) and the CE output (1/32)."""
        feat2 = self.S1S2(x)
        feat3 = self.S3(feat2)
        feat4 = self.S4(feat3)
        feat5_4 = self.S5_4(feat4)
        return feat2, feat3, feat4, feat5_4, self.S5_5(feat5_4)


class BGALayer(nn.Module):
    """Bilateral guided aggregation of the detail (1/8) and semantic (1/32) features.

    ``left1 = pw(BN(dw(d)))``, ``left2 = avgpool(BN(conv_s2(d)))`` (1/32), ``right1 = BN(conv(s))``,
    ``right2 = pw(BN(dw(s)))``; out ``= conv(left1 * sigmoid(up(right1)) + up(left2 * sigmoid(right2)))``.

    Args:
        channels: channels of both inputs and of the output.
        upsample_mode: interpolation of the two 1/32 -> 1/8 upsamplings: ``"nearest"`` (CoinCheung) or
            ``"bilinear"`` (mmseg, with ``align_corners=False``).
    """

    def __init__(self, channels: int = 128, upsample_mode: str = "nearest") -> None:
        super().__init__()
        if upsample_mode not in ("nearest", "bilinear"):
            raise ValueError(f"upsample_mode must be 'nearest' or 'bilinear', got {upsample_mode!r}")
        c = channels
        self.upsample_mode = upsample_mode
        self.left1 = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1, bias=False)
        )
        self.left2 = nn.Sequential(
            nn.Conv2d(c, c, 3, 2, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=False),
        )
        self.right1 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.right2 = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1, bias=False)
        )
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))

    def _up(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.upsample_mode == "nearest":
            return F.interpolate(x, size=tuple(size), mode="nearest")
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, x_d: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
        size = x_d.shape[-2:]
        left = self.left1(x_d) * torch.sigmoid(self._up(self.right1(x_s), size))
        right = self.left2(x_d) * torch.sigmoid(self.right2(x_s))  # both at the size of x_s
        return self.conv(left + self._up(right, size))


class SegmentHead(nn.Module):
    """3x3 conv-BN-ReLU -> dropout 0.1 -> [booster: x2 nearest upsample, 3x3 conv-BN-ReLU] -> 1x1 conv.

    The booster form (``booster_channels`` given) is CoinCheung's auxiliary head; the logits are resized
    (bilinear, ``align_corners=False``) to the size given to :meth:`forward`.

    Args:
        in_ch: input channels.
        mid_ch: hidden channels.
        num_classes: output channels.
        booster_channels: channels of the extra upsample-conv of a booster head, or ``None`` for none.
    """

    def __init__(self, in_ch: int, mid_ch: int, num_classes: int, booster_channels: int | None = None) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch, 3)
        self.drop = nn.Dropout(0.1)
        if booster_channels is None:
            pre, last_ch = nn.Identity(), mid_ch
        else:
            up = nn.Upsample(scale_factor=2.0, mode="nearest")
            pre, last_ch = nn.Sequential(up, ConvBNReLU(mid_ch, booster_channels, 3)), booster_channels
        self.conv_out = nn.Sequential(pre, nn.Conv2d(last_ch, num_classes, 1, bias=True))

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return resize_bilinear(self.conv_out(self.drop(self.conv(x))), size, align_corners=False)


@register_model(name="bisenetv2")
class BiSeNetV2(nn.Module):
    """BiSeNet V2: detail branch + semantic branch, bilateral guided aggregation, FCN head and boosters.

    With the defaults (19 classes, boosters) it has 5,231,487 parameters: 3,358,627 in the deployed network
    (detail and semantic branches, BGA, head) and 1,872,860 in the four booster heads, the counts of
    CoinCheung's ``BiSeNetV2(19)`` with ``aux_mode="train"`` and ``"eval"``, whose outputs it reproduces.

    Args:
        num_classes: output channels (logits).
        in_channels: input image channels.
        aux: build the four booster heads (on the stem, S3, S4 and S5_4 outputs) and return their logits in
            training as ``{"out": logits, "aux": [aux2, aux3, aux4, aux5_4]}``.
        detail_channels: channels of the detail branch's three stages.
        semantic_channels: channels of the stem and the GE stages; the last one must equal the last detail
            channel count (the BGA works at that width).
        exp_ratio: expansion ratio of the GE layers.
        head_channels: hidden channels of the main head (1024 in both references).
        aux_channels: hidden channels of the booster heads.
        bga_upsample: ``"nearest"`` (CoinCheung) or ``"bilinear"`` (mmseg) upsampling inside the BGA.
    """

    def __init__(
        self,
        num_classes: int = 19,
        in_channels: int = 3,
        aux: bool = True,
        detail_channels: Sequence[int] = (64, 64, 128),
        semantic_channels: Sequence[int] = (16, 32, 64, 128),
        exp_ratio: int = 6,
        head_channels: int = 1024,
        aux_channels: int = 128,
        bga_upsample: str = "nearest",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("exp_ratio", exp_ratio)
        check_positive_int("head_channels", head_channels)
        check_positive_int("aux_channels", aux_channels)
        detail_channels = check_positive_ints("detail_channels", detail_channels, 3, allow_bool=True)
        semantic_channels = check_positive_ints("semantic_channels", semantic_channels, 4, allow_bool=True)
        if detail_channels[-1] != semantic_channels[-1]:
            raise ValueError(
                f"detail_channels[-1] and semantic_channels[-1] must be equal (BGA width), "
                f"got {detail_channels[-1]} and {semantic_channels[-1]}"
            )
        if bga_upsample not in ("nearest", "bilinear"):
            raise ValueError(f"bga_upsample must be 'nearest' or 'bilinear', got {bga_upsample!r}")
        if semantic_channels[0] < 2:
            raise ValueError(f"semantic_channels[0] must be >= 2 (the stem halves it), got {semantic_channels[0]}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.aux = bool(aux)

        self.detail = DetailBranch(in_channels, detail_channels)
        self.segment = SegmentBranch(in_channels, semantic_channels, exp_ratio)
        self.bga = BGALayer(detail_channels[-1], bga_upsample)
        self.head = SegmentHead(detail_channels[-1], head_channels, num_classes)
        if self.aux:
            # CoinCheung's boosters: the extra conv has (reduction of the stage)**2 channels
            c2, c3, c4, c5 = semantic_channels
            self.aux2 = SegmentHead(c2, aux_channels, num_classes, booster_channels=4**2)
            self.aux3 = SegmentHead(c3, aux_channels, num_classes, booster_channels=8**2)
            self.aux4 = SegmentHead(c4, aux_channels, num_classes, booster_channels=16**2)
            self.aux5_4 = SegmentHead(c5, aux_channels, num_classes, booster_channels=32**2)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits ``(B, num_classes, H, W)``; in training with ``aux``, ``{"out": logits, "aux": [4 logits]}``."""
        size = x.shape[-2:]
        feat_d = self.detail(x)  # (B, C, ceil(H / 8), ceil(W / 8))
        feat2, feat3, feat4, feat5_4, feat_s = self.segment(x)
        out = self.head(self.bga(feat_d, feat_s), size)
        if not (self.training and self.aux):
            return out
        aux = [self.aux2(feat2, size), self.aux3(feat3, size), self.aux4(feat4, size), self.aux5_4(feat5_4, size)]
        return {"out": out, "aux": aux}


# =========================================================================== converters
def convert_coincheung_bisenetv1(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """CoinCheung/BiSeNet ``BiSeNetV1`` (bilinear-head version) state dict -> :class:`BiSeNetV1` keys.

    Key mapping: ``cp.resnet.<k>`` -> ``encoder.<k>`` (the ResNet-18 keys are torchvision's, as ours), its
    ``cp.resnet.fc.*`` classifier is dropped; every other key (``cp.arm16``, ``cp.conv_avg``, ``sp``, ``ffm``,
    ``conv_out``, ``conv_out16``, ``conv_out32``) is unchanged. ``module.`` / ``_orig_mod.`` prefixes are
    stripped. The later PixelShuffle heads of CoinCheung's repository (``conv_out`` with ``K * 64`` outputs)
    are another architecture and fail the shape check of :func:`maskworks.convert.load_weights`.

    Args:
        state_dict: the checkpoint's state dict.
        in_channels: unused (the first convs are not adapted); accepted for the converter signature.

    Returns:
        The converted state dict and the dropped keys.
    """
    out, dropped = {}, []
    for key, value in strip_wrapper_prefixes(state_dict).items():
        if key.startswith("cp.resnet.fc."):
            dropped.append(key)
        elif key.startswith("cp.resnet."):
            out["encoder." + key[len("cp.resnet.") :]] = value
        else:
            out[key] = value
    return out, dropped


def convert_coincheung_bisenetv2(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """CoinCheung/BiSeNet ``BiSeNetV2`` state dict -> :class:`BiSeNetV2` keys: identical, wrappers stripped.

    Args:
        state_dict: the checkpoint's state dict.
        in_channels: unused; accepted for the converter signature.

    Returns:
        The state dict (``module.`` / ``_orig_mod.`` prefixes removed) and no dropped keys.
    """
    return strip_wrapper_prefixes(state_dict), []
