"""Fast-SCNN (Poudel et al., "Fast-SCNN: Fast Semantic Segmentation Network", BMVC 2019).

One shared *learning to downsample* module (3x3 conv, two depthwise-separable convs, all stride 2: 1/8) feeds
both a high-resolution skip and a *global feature extractor* (MobileNetV2 inverted residual bottlenecks down
to 1/32, then a pyramid pooling module). The paper's *feature fusion module* upsamples the 1/32 branch to the
1/8 size, applies a depthwise 3x3 conv (dilated by the upsampling factor) and a 1x1 conv, adds the 1x1
projection of the 1/8 branch, and applies ReLU. A classifier of two depthwise-separable convs and a 1x1 conv
gives the logits, resized to the input. 1,138,051 parameters for 19 classes (the paper: 1.11 M).

Module names and keys follow Tramac/Fast-SCNN-pytorch (``learning_to_downsample``,
``global_feature_extractor``, ``feature_fusion``, ``classifier``, ``auxlayer``; conv-BN-ReLU blocks hold
``conv.0/1/2``), so its checkpoints load as-is. Differences from that code: the first 3x3 conv is padded, so
the 1/8 map is exactly ``ceil(H / 8)`` (Tramac and mmseg use no padding there: 1024 -> 511 -> 256 -> 128);
the fusion's depthwise conv is dilated by 4 as in the paper's Table 2 (``fusion_dilation=1`` is Tramac's and
mmseg's undilated conv); the 1/32 branch is resized to the exact size of the 1/8 map (not ``x4``), so any
input size works; ``align_corners`` is an option (Tramac: True; mmseg: False, our default); the 1x1-pooled
BatchNorms of the pyramid pooling module are :class:`~maskworks.layers.PooledBatchNorm2d`.
The seed's Fast-SCNN reused BiSeNet's concatenating fusion module, which cannot fuse maps of different sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers import ConvNormAct, PooledBatchNorm2d
from maskworks.layers.conv import ConvBNReLU as _ConvBNReLU
from maskworks.models._utils import check_positive_int, check_positive_ints, init_kaiming, resize_bilinear
from maskworks.registry import register_model

__all__ = [
    "FastSCNN",
    "ConvBNReLU",
    "DSConv",
    "LinearBottleneck",
    "PyramidPooling",
    "LearningToDownsample",
    "GlobalFeatureExtractor",
    "FeatureFusionModule",
    "Classifier",
]


class ConvBNReLU(_ConvBNReLU):
    """:class:`maskworks.layers.conv.ConvBNReLU` in Tramac's layout (``nested=True``): the
    :class:`~maskworks.layers.ConvNormAct` held as ``conv`` (Tramac's ``_Conv`` / ``_DWConv`` keys ``conv.0/1``).

    Args:
        in_ch, out_ch, kernel_size, stride: as :class:`maskworks.layers.conv.ConvBNReLU`.
        **kwargs: ``dilation``, ``groups`` (``in_ch`` for a depthwise conv), ``norm_layer``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, **kwargs) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride, nested=True, **kwargs)


class DSConv(nn.Module):
    """Depthwise-separable conv: 3x3 depthwise -> BN -> ReLU -> 1x1 -> BN -> ReLU (``conv.0`` .. ``conv.5``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *ConvNormAct(in_ch, in_ch, 3, stride=stride, groups=in_ch), *ConvNormAct(in_ch, out_ch, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LinearBottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand (x ``t``) -> 3x3 depthwise (stride) -> 1x1 linear projection.

    The identity shortcut is added when the stride is 1 and the channels are kept.
    """

    def __init__(self, in_ch: int, out_ch: int, t: int = 6, stride: int = 2) -> None:
        super().__init__()
        self.use_shortcut = stride == 1 and in_ch == out_ch
        mid = in_ch * t
        self.block = nn.Sequential(
            ConvBNReLU(in_ch, mid, 1),
            ConvBNReLU(mid, mid, 3, stride=stride, groups=mid),
            nn.Conv2d(mid, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_shortcut else out


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to each bin size, 1x1 conv-BN-ReLU to ``in_ch / 4``, upsample,
    concatenate with the input, 1x1 conv-BN-ReLU to ``out_ch``.

    Args:
        in_ch: input channels; each pooled branch has ``in_ch // 4``.
        out_ch: output channels.
        bins: output sizes of the adaptive average pools; one branch each (``conv1``, ``conv2``, ...).
        align_corners: ``align_corners`` of the bilinear upsampling.
    """

    def __init__(self, in_ch: int, out_ch: int, bins: Sequence[int] = (1, 2, 3, 6), align_corners: bool = False):
        super().__init__()
        self.bins = tuple(bins)
        self.align_corners = align_corners
        inter = in_ch // 4
        for i, _ in enumerate(self.bins):
            # pooled to a few values per channel: the 1x1 bin has one at batch size 1
            self.add_module(f"conv{i + 1}", ConvBNReLU(in_ch, inter, 1, norm_layer=PooledBatchNorm2d))
        self.out = ConvBNReLU(in_ch + inter * len(self.bins), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [x]
        for i, b in enumerate(self.bins):
            feat = getattr(self, f"conv{i + 1}")(F.adaptive_avg_pool2d(x, b))  # (B, C / 4, b, b)
            feats.append(F.interpolate(feat, size=size, mode="bilinear", align_corners=self.align_corners))
        return self.out(torch.cat(feats, dim=1))  # (B, C + n_bins * C / 4, H, W) -> (B, out_ch, H, W)


class LearningToDownsample(nn.Module):
    """3x3 s2 conv-BN-ReLU, then two stride-2 :class:`DSConv`: 1/8, exactly ``ceil(H / 8)``.

    Args:
        in_channels: input image channels.
        channels: output channels of the three layers.
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (32, 48, 64)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv = ConvBNReLU(in_channels, c1, 3, stride=2)
        self.dsconv1 = DSConv(c1, c2, stride=2)
        self.dsconv2 = DSConv(c2, c3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dsconv2(self.dsconv1(self.conv(x)))


class GlobalFeatureExtractor(nn.Module):
    """Three groups of inverted residual bottlenecks (strides 2, 2, 1: 1/32) and a pyramid pooling module.

    Args:
        in_ch: input channels (the learning-to-downsample output).
        block_channels: output channels of the three groups.
        out_ch: output channels of the pyramid pooling module.
        t: expansion ratio of the bottlenecks.
        num_blocks: bottlenecks per group.
        bins: pyramid pooling bin sizes.
        align_corners: ``align_corners`` of the pyramid pooling upsampling.
    """

    def __init__(
        self,
        in_ch: int = 64,
        block_channels: Sequence[int] = (64, 96, 128),
        out_ch: int = 128,
        t: int = 6,
        num_blocks: Sequence[int] = (3, 3, 3),
        bins: Sequence[int] = (1, 2, 3, 6),
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        chs = (in_ch, *block_channels)
        for i, (n, stride) in enumerate(zip(num_blocks, (2, 2, 1))):
            blocks = [LinearBottleneck(chs[i], chs[i + 1], t, stride)]
            blocks += [LinearBottleneck(chs[i + 1], chs[i + 1], t, 1) for _ in range(1, n)]
            self.add_module(f"bottleneck{i + 1}", nn.Sequential(*blocks))
        self.ppm = PyramidPooling(chs[-1], out_ch, bins, align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ppm(self.bottleneck3(self.bottleneck2(self.bottleneck1(x))))


class FeatureFusionModule(nn.Module):
    """The paper's additive fusion of the 1/8 (higher) and 1/32 (lower) branches.

    lower: resize to the higher branch's size -> 3x3 depthwise conv (dilation) -BN-ReLU -> 1x1 conv -> BN;
    higher: 1x1 conv -> BN; output ``ReLU(higher + lower)``.

    Args:
        higher_in_ch: channels of the 1/8 branch.
        lower_in_ch: channels of the 1/32 branch (depthwise conv: ``out_ch`` must be a multiple of it).
        out_ch: output channels.
        dilation: dilation of the depthwise conv (the paper: the upsampling factor, 4).
        align_corners: ``align_corners`` of the bilinear upsampling.
    """

    def __init__(
        self, higher_in_ch: int, lower_in_ch: int, out_ch: int, dilation: int = 4, align_corners: bool = False
    ) -> None:
        super().__init__()
        if out_ch % lower_in_ch:
            raise ValueError(
                f"out_ch must be a multiple of lower_in_ch (depthwise conv), got {out_ch} and {lower_in_ch}"
            )
        self.align_corners = align_corners
        self.dwconv = ConvBNReLU(lower_in_ch, out_ch, 3, dilation=dilation, groups=lower_in_ch)
        self.conv_lower_res = nn.Sequential(nn.Conv2d(out_ch, out_ch, 1), nn.BatchNorm2d(out_ch))
        self.conv_higher_res = nn.Sequential(nn.Conv2d(higher_in_ch, out_ch, 1), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, higher: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        lower = F.interpolate(lower, size=higher.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        lower = self.conv_lower_res(self.dwconv(lower))
        return self.relu(self.conv_higher_res(higher) + lower)


class Classifier(nn.Module):
    """Two :class:`DSConv` -> dropout 0.1 -> 1x1 conv to the classes."""

    def __init__(self, in_ch: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dsconv1 = DSConv(in_ch, in_ch)
        self.dsconv2 = DSConv(in_ch, in_ch)
        self.conv = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(in_ch, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.dsconv2(self.dsconv1(x)))


@register_model(name="fast_scnn")
class FastSCNN(nn.Module):
    """Fast-SCNN: learning to downsample -> global feature extractor -> feature fusion -> classifier.

    With the defaults (19 classes, no auxiliary head) it has 1,138,051 parameters (the paper: 1.11 M), the
    count of Tramac's ``FastSCNN(19, aux=False)``; the auxiliary head adds ``64 * 32 * 9 + 2 * 32 + 33 * K``.

    Args:
        num_classes: output channels (logits).
        in_channels: input image channels.
        aux: build the auxiliary head on the 1/8 learning-to-downsample features (3x3 conv-BN-ReLU to 32,
            dropout, 1x1 conv) and return its logits in training as ``{"out": logits, "aux": [aux]}``.
        downsample_channels: channels of the learning-to-downsample layers (the last one feeds both branches).
        block_channels: output channels of the three bottleneck groups.
        num_blocks: bottlenecks per group.
        expand_ratio: expansion ratio of the bottlenecks.
        global_channels: output channels of the global feature extractor (pyramid pooling).
        fusion_channels: output channels of the feature fusion module (and classifier width).
        bins: pyramid pooling bin sizes.
        fusion_dilation: dilation of the fusion module's depthwise conv (paper: 4; Tramac / mmseg: 1).
        dropout: dropout before the classifier's 1x1 conv.
        align_corners: ``align_corners`` of every bilinear resize (mmseg: False; Tramac: True).
    """

    def __init__(
        self,
        num_classes: int = 19,
        in_channels: int = 3,
        aux: bool = False,
        downsample_channels: Sequence[int] = (32, 48, 64),
        block_channels: Sequence[int] = (64, 96, 128),
        num_blocks: Sequence[int] = (3, 3, 3),
        expand_ratio: int = 6,
        global_channels: int = 128,
        fusion_channels: int = 128,
        bins: Sequence[int] = (1, 2, 3, 6),
        fusion_dilation: int = 4,
        dropout: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("expand_ratio", expand_ratio)
        check_positive_int("global_channels", global_channels)
        check_positive_int("fusion_channels", fusion_channels)
        check_positive_int("fusion_dilation", fusion_dilation)
        downsample_channels = check_positive_ints("downsample_channels", downsample_channels, 3)
        block_channels = check_positive_ints("block_channels", block_channels, 3)
        num_blocks = check_positive_ints("num_blocks", num_blocks, 3)
        bins = tuple(bins)
        if not bins or not all(isinstance(b, int) and b > 0 for b in bins):
            raise ValueError(f"bins must be a non-empty sequence of positive ints, got {bins!r}")
        if block_channels[-1] < 4:
            raise ValueError(f"block_channels[-1] must be >= 4 (pyramid pooling uses a quarter), got {block_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.aux = bool(aux)
        self.align_corners = bool(align_corners)

        higher_ch = downsample_channels[-1]
        self.learning_to_downsample = LearningToDownsample(in_channels, downsample_channels)
        self.global_feature_extractor = GlobalFeatureExtractor(
            higher_ch, block_channels, global_channels, expand_ratio, num_blocks, bins, self.align_corners
        )
        self.feature_fusion = FeatureFusionModule(
            higher_ch, global_channels, fusion_channels, fusion_dilation, self.align_corners
        )
        self.classifier = Classifier(fusion_channels, num_classes, dropout)
        if self.aux:
            self.auxlayer = nn.Sequential(
                *ConvNormAct(higher_ch, 32, 3), nn.Dropout(0.1), nn.Conv2d(32, num_classes, 1)
            )
        init_kaiming(self)  # as mmseg's init

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return resize_bilinear(x, size, self.align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits ``(B, num_classes, H, W)``; in training with ``aux``, ``{"out": logits, "aux": [aux]}``."""
        size = x.shape[-2:]
        higher = self.learning_to_downsample(x)  # (B, 64, ceil(H / 8), ceil(W / 8))
        lower = self.global_feature_extractor(higher)  # (B, 128, ceil(H / 32), ceil(W / 32))
        out = self._resize(self.classifier(self.feature_fusion(higher, lower)), size)
        if not (self.training and self.aux):
            return out
        return {"out": out, "aux": [self._resize(self.auxlayer(higher), size)]}
