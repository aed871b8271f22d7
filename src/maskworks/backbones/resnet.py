"""ResNet backbones (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

State-dict keys equal torchvision's ``resnet*`` keys (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample.0/1``) without the ``fc`` classifier, which timm's ResNet shares, so both load
without renaming (see :mod:`maskworks.convert.resnet`). ``output_stride`` 16 / 8 replaces the
stride of ``layer4`` / ``layer3`` + ``layer4`` by dilation, as torchvision's
``replace_stride_with_dilation`` and timm's ``output_stride`` do (the first block of a dilated
stage keeps the previous dilation in its first 3x3 conv). ``dcn_stages`` replaces the 3x3 ``conv2`` of every block
of the chosen stages by a modulated deformable convolution (DCNv2, Zhu et al., CVPR 2019;
:class:`~maskworks.layers.DeformConv2d`) with the same stride, dilation and groups, as mmdet's
``dcn=dict(type="DCNv2")`` with ``stage_with_dcn``: its keys are ``conv2.weight`` plus ``conv2.conv_offset.weight`` /
``.bias``, so mmdet DCNv2 ResNet checkpoints load (without their ``backbone.`` prefix), and without the option
nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from maskworks.layers.deform_conv import DeformConv2d
from maskworks.registry import register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101"]

NormLayer = Callable[[int], nn.Module]


def _conv3x3(
    in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, groups: int = 1, deform: bool = False
) -> nn.Conv2d | DeformConv2d:
    conv = DeformConv2d if deform else nn.Conv2d
    return conv(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut; ResNet-18/34.

    ``deform=True`` makes the second (unstrided) 3x3 conv, ``conv2``, a DCNv2 :class:`~maskworks.layers.DeformConv2d`
    (mmdet has no DCN BasicBlock; this follows the Bottleneck's choice of ``conv2``).
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        first_dilation: int = 1,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        deform: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock supports groups=1, base_width=64 only, got groups={groups}, base_width={base_width}"
            )
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation=first_dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation, deform=deform)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(x + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided, ResNet v1.5) -> 1x1 expand, with a shortcut; ResNet-50/101.

    ``deform=True`` makes the 3x3 ``conv2`` a DCNv2 :class:`~maskworks.layers.DeformConv2d`, as mmdet's DCN ResNet.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        first_dilation: int = 1,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        deform: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, dilation=first_dilation, groups=groups, deform=deform)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


class ResNet(nn.Module):
    """ResNet feature extractor (no classifier) returning the stem and the four stage outputs.

    Args:
        block: residual block class, :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.
        in_channels: channels of the input image; ``conv1`` is built with this many.
        output_stride: total reduction of the last map, 32, 16 (``layer4`` dilated) or 8
            (``layer3`` and ``layer4`` dilated).
        norm_layer: normalisation class called with a channel count.
        groups: groups of the 3x3 convolutions in bottleneck blocks (ResNeXt).
        width_per_group: bottleneck width per group (64 for ResNet, 4 for ResNeXt-32x4d).
        zero_init_residual: zero the last norm of every block, so each starts as identity.
        dcn_stages: stages whose blocks get a DCNv2 ``conv2``, numbered as in the papers: 2..5 are
            ``layer1``..``layer4`` (mmdet's ``stage_with_dcn=(False, True, True, True)`` is ``(3, 4, 5)``). The
            offset predictors start at zero (modulation 0.5), as in mmdet.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        in_channels: int = 3,
        output_stride: int = 32,
        norm_layer: NormLayer = nn.BatchNorm2d,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        dcn_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give the block count of 4 stages, got {layers!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        dcn_stages = tuple(dcn_stages)
        if not all(isinstance(s, int) and not isinstance(s, bool) and 2 <= s <= 5 for s in dcn_stages):
            raise ValueError(
                f"dcn_stages must hold stage numbers among 2, 3, 4, 5 (layer1..layer4), got {dcn_stages!r}"
            )
        self.dcn_stages = tuple(sorted(set(dcn_stages)))
        self.in_channels = in_channels
        self.output_stride = output_stride
        self._norm_layer = norm_layer
        self._groups = groups
        self._base_width = width_per_group
        self._inplanes = 64
        self._dilation = 1

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.feature_info = [{"num_chs": 64, "reduction": 2, "module": "relu"}]
        reduction = 4
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            dilate = stride > 1 and reduction >= output_stride
            name = f"layer{i + 1}"
            deform = i + 2 in self.dcn_stages
            self.add_module(name, self._make_layer(block, planes, num_blocks, stride, dilate, deform))
            reduction = reduction if dilate else reduction * stride
            self.feature_info.append({"num_chs": planes * block.expansion, "reduction": reduction, "module": name})

        self._init_weights(zero_init_residual)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        num_blocks: int,
        stride: int,
        dilate: bool,
        deform: bool = False,
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._inplanes, planes * block.expansion, stride),
                self._norm_layer(planes * block.expansion),
            )
        kw = {"groups": self._groups, "base_width": self._base_width, "norm_layer": self._norm_layer, "deform": deform}
        blocks = [
            block(
                self._inplanes,
                planes,
                stride,
                downsample,
                first_dilation=previous_dilation,
                dilation=self._dilation,
                **kw,
            )
        ]
        self._inplanes = planes * block.expansion
        blocks += [
            block(self._inplanes, planes, first_dilation=self._dilation, dilation=self._dilation, **kw)
            for _ in range(1, num_blocks)
        ]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation; DCN offset predictors zero afterwards, as mmdet's ResNet does
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DeformConv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, DeformConv2d):
                m.init_offset()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Input channels followed by the channels of the five maps (smp's ``encoder.out_channels``)."""
        return (self.in_channels, *(info["num_chs"] for info in self.feature_info))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem output (after ``relu``) and the outputs of ``layer1``..``layer4``.

        Args:
            x: images ``(B, in_channels, H, W)``.

        Returns:
            Five maps ``(B, C_i, H / r_i, W / r_i)`` with ``C_i, r_i`` as in ``feature_info``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, C, H / output_stride, W / output_stride)``."""
        return self.forward_intermediates(x)[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x)


@register_model(kind="backbone")
def resnet18(in_channels: int = 3, output_stride: int = 32, **kwargs) -> ResNet:
    """ResNet-18 backbone (BasicBlock, [2, 2, 2, 2])."""
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels=in_channels, output_stride=output_stride, **kwargs)


@register_model(kind="backbone")
def resnet34(in_channels: int = 3, output_stride: int = 32, **kwargs) -> ResNet:
    """ResNet-34 backbone (BasicBlock, [3, 4, 6, 3])."""
    return ResNet(BasicBlock, (3, 4, 6, 3), in_channels=in_channels, output_stride=output_stride, **kwargs)


@register_model(kind="backbone")
def resnet50(in_channels: int = 3, output_stride: int = 32, **kwargs) -> ResNet:
    """ResNet-50 backbone (Bottleneck, [3, 4, 6, 3])."""
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels=in_channels, output_stride=output_stride, **kwargs)


@register_model(kind="backbone")
def resnet101(in_channels: int = 3, output_stride: int = 32, **kwargs) -> ResNet:
    """ResNet-101 backbone (Bottleneck, [3, 4, 23, 3])."""
    return ResNet(Bottleneck, (3, 4, 23, 3), in_channels=in_channels, output_stride=output_stride, **kwargs)
