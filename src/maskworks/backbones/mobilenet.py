"""MobileNetV2 and MobileNetV3 backbones.

* MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
* MobileNetV3: Howard et al., "Searching for MobileNetV3", ICCV 2019 (large and small).

State-dict keys equal the ``features.*`` keys of torchvision's ``mobilenet_v2`` / ``mobilenet_v3_large`` /
``mobilenet_v3_small`` (the classifier is dropped): ``features`` is an ``nn.Sequential`` of the stem
``features.0.{0,1}``, the inverted-residual blocks (V2: ``features.i.conv.{j}``; V3: ``features.i.block.{j}``
with the squeeze-excitation ``fc1`` / ``fc2``) and the final 1x1 conv. smp's ``mobilenet_v2`` encoder is a
torchvision ``MobileNetV2`` without classifier, so its keys are the same (see :mod:`maskworks.convert.mobilenet`).

The five maps of ``forward_intermediates`` are the outputs of the last block at each reduction 2, 4, 8, 16, 32,
i.e. of the block before each stride-2 block and of the final 1x1 conv: ``features`` indices
``1, 3, 6, 13, 18`` for V2 (smp's ``_out_indexes``, channels 16, 24, 32, 96, 1280), ``1, 3, 6, 12, 16`` for V3-large
(16, 24, 40, 112, 960) and ``0, 1, 3, 8, 12`` for V3-small (16, 16, 24, 48, 576), as timm's ``features_only``
MobileNetV3 does. (torchvision's LR-ASPP / DeepLabV3 builders tap ``features[4]``, the first block at stride 8,
for their "low" map; they take the same final map.)

``output_stride`` 16 / 8 turns the later stride-2 depthwise convolutions into stride 1 and multiplies the dilation
of that depthwise conv and of every depthwise conv after it by 2 (padding grows with it). For MobileNetV3 at
output stride 16 this is exactly torchvision's ``dilated=True`` configuration (``_mobilenet_v3_conf``), for
MobileNetV2 it is what smp's ``make_dilated`` does to its ``mobilenet_v2`` encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn

from maskworks.layers.conv import ConvNormAct
from maskworks.registry import register_model

__all__ = [
    "MobileNetV2",
    "MobileNetV3",
    "InvertedResidual",
    "InvertedResidualV3",
    "SqueezeExcitation",
    "make_divisible",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
]

NormLayer = Callable[[int], nn.Module]

# MobileNetV2 (Table 2 of the paper): expansion t, channels c, repeats n, stride of the first block s.
MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# MobileNetV3 (Tables 1 and 2): input, kernel, expanded, output channels, squeeze-excitation, activation, stride.
# "RE" = ReLU, "HS" = hard-swish. `_TAIL` marks the last stage, whose channels `reduced_tail` halves.
_V3Row = tuple[int, int, int, int, bool, str, int]
MOBILENET_V3_LARGE_SETTING: tuple[_V3Row, ...] = (
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)
MOBILENET_V3_SMALL_SETTING: tuple[_V3Row, ...] = (
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never below 90% of ``value`` (TensorFlow's rule).

    Args:
        value: the unrounded channel count (e.g. ``channels * width_mult``).
        divisor: the multiple to round to.
        min_value: the smallest result; ``divisor`` when ``None``.

    Returns:
        The rounded channel count.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6) -> depthwise 3x3 (ReLU6) -> linear 1x1 project, residual if shapes match.

    Children of ``conv`` (torchvision's names): ``0`` expand ``ConvNormAct`` (absent when ``expand_ratio == 1``),
    then the depthwise ``ConvNormAct``, the projection ``Conv2d`` and its norm.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the depthwise conv, 1 or 2.
        expand_ratio: hidden channels = ``round(in_ch * expand_ratio)``.
        dilation: dilation of the depthwise conv (padding follows).
        norm_layer: normalisation class called with a channel count.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        expand_ratio: float,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_ch, hidden, 1, norm_layer=norm_layer, act_layer=nn.ReLU6))
        layers += [
            ConvNormAct(
                hidden,
                hidden,
                3,
                stride=stride,
                dilation=dilation,
                groups=hidden,
                norm_layer=norm_layer,
                act_layer=nn.ReLU6,
            ),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            norm_layer(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation: global average -> 1x1 ``fc1`` -> ReLU -> 1x1 ``fc2`` -> hard-sigmoid gate.

    Names ``fc1`` / ``fc2`` are torchvision's (``torchvision.ops.SqueezeExcitation``); no norm layer, so batch
    size 1 trains fine.

    Args:
        channels: input (and output) channels.
        squeeze_channels: channels of the bottleneck.
        act_layer: activation after ``fc1``.
        gate_layer: activation producing the per-channel scale.
    """

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        gate_layer: Callable[..., nn.Module] = nn.Hardsigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = act_layer()
        self.scale_activation = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)  # (B, C, 1, 1)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return x * scale


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: 1x1 expand -> depthwise kxk -> optional squeeze-excitation -> linear 1x1 project.

    Children of ``block`` (torchvision's names): expand ``ConvNormAct`` (absent when ``expanded_ch == in_ch``),
    depthwise ``ConvNormAct``, :class:`SqueezeExcitation` (when ``use_se``), projection ``ConvNormAct`` (no act).

    Args:
        in_ch: input channels.
        kernel_size: depthwise kernel size.
        expanded_ch: hidden channels.
        out_ch: output channels.
        use_se: insert squeeze-excitation with ``make_divisible(expanded_ch // 4)`` channels.
        act_layer: activation class (``nn.ReLU`` or ``nn.Hardswish``).
        stride: stride of the depthwise conv, 1 or 2.
        dilation: dilation of the depthwise conv (padding follows).
        norm_layer: normalisation class called with a channel count.
    """

    def __init__(
        self,
        in_ch: int,
        kernel_size: int,
        expanded_ch: int,
        out_ch: int,
        use_se: bool,
        act_layer: Callable[..., nn.Module],
        stride: int,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expanded_ch != in_ch:
            layers.append(ConvNormAct(in_ch, expanded_ch, 1, norm_layer=norm_layer, act_layer=act_layer))
        layers.append(
            ConvNormAct(
                expanded_ch,
                expanded_ch,
                kernel_size,
                stride=stride,
                dilation=dilation,
                groups=expanded_ch,
                norm_layer=norm_layer,
                act_layer=act_layer,
            )
        )
        if use_se:
            layers.append(SqueezeExcitation(expanded_ch, make_divisible(expanded_ch // 4, 8)))
        layers.append(ConvNormAct(expanded_ch, out_ch, 1, norm_layer=norm_layer, act_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


class _StrideTracker:
    """Turns nominal strides into (stride, dilation) pairs so that the total reduction stays <= output_stride."""

    def __init__(self, output_stride: int) -> None:
        self.output_stride = output_stride
        self.reduction = 1
        self.dilation = 1

    def __call__(self, stride: int) -> tuple[int, int]:
        if stride > 1 and self.reduction * stride > self.output_stride:
            self.dilation *= stride
            return 1, self.dilation
        self.reduction *= stride
        return stride, self.dilation


class _MobileNet(nn.Module):
    """Shared contract of the MobileNet backbones: ``features`` plus the five tapped maps."""

    features: nn.Sequential
    feature_info: list[dict]

    def _check_args(self, in_channels: int, output_stride: int, width_mult: float) -> None:
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        self.in_channels = in_channels
        self.output_stride = output_stride

    def _finish(self, layers: list[nn.Module], nominal_strides: list[int], reductions: list[int]) -> None:
        """Store ``features`` and ``feature_info``; tap the block before each nominal stride-2 block and the last."""
        self.features = nn.Sequential(*layers)
        taps = [i - 1 for i, s in enumerate(nominal_strides) if s > 1 and i > 0] + [len(layers) - 1]
        if len(taps) != 5:
            raise ValueError(f"the configuration must have 4 stride-2 blocks after the stem, got {len(taps) - 1}")
        self._taps = tuple(taps)
        self.feature_info = [
            {"num_chs": layers[i].out_channels, "reduction": reductions[i], "module": f"features.{i}"} for i in taps
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Input channels followed by the channels of the five maps (smp's ``encoder.out_channels``)."""
        return (self.in_channels, *(info["num_chs"] for info in self.feature_info))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the last block at each reduction (see ``feature_info``).

        Args:
            x: images ``(B, in_channels, H, W)``.

        Returns:
            Five maps ``(B, C_i, ceil(H / r_i), ceil(W / r_i))`` with ``C_i, r_i`` as in ``feature_info``.
        """
        features = []
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self._taps:
                features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, C, H / output_stride, W / output_stride)``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x)


def _conv_out(layer: nn.Module) -> nn.Module:
    layer.out_channels = layer[0].out_channels
    return layer


class MobileNetV2(_MobileNet):
    """MobileNetV2 feature extractor (no classifier) with torchvision's ``features`` layout.

    Args:
        in_channels: channels of the input image; the stem conv ``features.0.0`` is built with this many.
        output_stride: total reduction of the last map, 32, 16 or 8 (later strides replaced by dilation).
        width_mult: channel multiplier of every layer (the last conv is never narrower than 1280).
        round_nearest: channel counts are rounded to a multiple of this.
        inverted_residual_setting: ``(t, c, n, s)`` rows: expansion, channels, repeats, first stride; needs four
            stride-2 stages so that there are five maps.
        norm_layer: normalisation class called with a channel count.
    """

    def __init__(
        self,
        in_channels: int = 3,
        output_stride: int = 32,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        inverted_residual_setting: Sequence[Sequence[int]] = MOBILENET_V2_SETTING,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self._check_args(in_channels, output_stride, width_mult)
        if not inverted_residual_setting or any(len(row) != 4 for row in inverted_residual_setting):
            raise ValueError(f"inverted_residual_setting must be (t, c, n, s) rows, got {inverted_residual_setting!r}")
        tracker = _StrideTracker(output_stride)
        ch = make_divisible(32 * width_mult, round_nearest)
        stride, _ = tracker(2)
        layers: list[nn.Module] = [
            _conv_out(ConvNormAct(in_channels, ch, 3, stride=stride, norm_layer=norm_layer, act_layer=nn.ReLU6))
        ]
        nominal, reductions = [2], [tracker.reduction]
        for t, c, n, s in inverted_residual_setting:
            out_ch = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                block_stride = s if i == 0 else 1
                stride, dilation = tracker(block_stride)
                layers.append(InvertedResidual(ch, out_ch, stride, t, dilation=dilation, norm_layer=norm_layer))
                nominal.append(block_stride)
                reductions.append(tracker.reduction)
                ch = out_ch
        last_ch = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        layers.append(_conv_out(ConvNormAct(ch, last_ch, 1, norm_layer=norm_layer, act_layer=nn.ReLU6)))
        nominal.append(1)
        reductions.append(tracker.reduction)
        self._finish(layers, nominal, reductions)


class MobileNetV3(_MobileNet):
    """MobileNetV3 feature extractor (no classifier) with torchvision's ``features`` layout.

    Args:
        setting: rows ``(in, kernel, expanded, out, use_se, "RE" | "HS", stride)`` at width 1
            (:data:`MOBILENET_V3_LARGE_SETTING`, :data:`MOBILENET_V3_SMALL_SETTING`).
        in_channels: channels of the input image; the stem conv ``features.0.0`` is built with this many.
        output_stride: total reduction of the last map, 32, 16 (torchvision's ``dilated=True``) or 8.
        width_mult: channel multiplier, channels rounded to multiples of 8.
        reduced_tail: halve the channels of the last stage (torchvision's ``reduced_tail``).
        norm_layer: normalisation class; torchvision's ``BatchNorm2d(eps=0.001, momentum=0.01)`` by default.
    """

    def __init__(
        self,
        setting: Sequence[_V3Row],
        in_channels: int = 3,
        output_stride: int = 32,
        width_mult: float = 1.0,
        reduced_tail: bool = False,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        self._check_args(in_channels, output_stride, width_mult)
        if not setting or any(len(row) != 7 for row in setting):
            raise ValueError(f"setting must be rows of 7 values (in, k, exp, out, se, act, stride), got {setting!r}")
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        tail_start = max(i for i, row in enumerate(setting) if row[6] > 1)  # the last stage

        def adjust(channels: int) -> int:
            return make_divisible(channels * width_mult, 8)

        tracker = _StrideTracker(output_stride)
        stride, _ = tracker(2)
        first_ch = adjust(setting[0][0])
        layers: list[nn.Module] = [
            _conv_out(
                ConvNormAct(in_channels, first_ch, 3, stride=stride, norm_layer=norm_layer, act_layer=nn.Hardswish)
            )
        ]
        nominal, reductions = [2], [tracker.reduction]
        for i, (in_ch, kernel, exp_ch, out_ch, use_se, act, block_stride) in enumerate(setting):
            if act not in ("RE", "HS"):
                raise ValueError(f"activation must be 'RE' or 'HS', got {act!r} in row {i}")
            divider = 2 if reduced_tail else 1
            # torchvision halves the output of the first tail block and everything of the later ones
            in_ch, exp_ch = (in_ch // divider, exp_ch // divider) if i > tail_start else (in_ch, exp_ch)
            out_ch = out_ch // divider if i >= tail_start else out_ch
            stride, dilation = tracker(block_stride)
            act_layer = nn.Hardswish if act == "HS" else nn.ReLU
            layers.append(
                InvertedResidualV3(
                    adjust(in_ch),
                    kernel,
                    adjust(exp_ch),
                    adjust(out_ch),
                    use_se,
                    act_layer,
                    stride,
                    dilation=dilation,
                    norm_layer=norm_layer,
                )
            )
            nominal.append(block_stride)
            reductions.append(tracker.reduction)
        last_in = layers[-1].out_channels
        layers.append(_conv_out(ConvNormAct(last_in, 6 * last_in, 1, norm_layer=norm_layer, act_layer=nn.Hardswish)))
        nominal.append(1)
        reductions.append(tracker.reduction)
        self._finish(layers, nominal, reductions)


@register_model(kind="backbone")
def mobilenet_v2(in_channels: int = 3, output_stride: int = 32, **kwargs) -> MobileNetV2:
    """MobileNetV2 backbone; maps of 16, 24, 32, 96, 1280 channels at width 1."""
    return MobileNetV2(in_channels=in_channels, output_stride=output_stride, **kwargs)


@register_model(kind="backbone")
def mobilenet_v3_large(in_channels: int = 3, output_stride: int = 32, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large backbone; maps of 16, 24, 40, 112, 960 channels at width 1."""
    return MobileNetV3(MOBILENET_V3_LARGE_SETTING, in_channels=in_channels, output_stride=output_stride, **kwargs)


@register_model(kind="backbone")
def mobilenet_v3_small(in_channels: int = 3, output_stride: int = 32, **kwargs) -> MobileNetV3:
    """MobileNetV3-Small backbone; maps of 16, 16, 24, 48, 576 channels at width 1."""
    return MobileNetV3(MOBILENET_V3_SMALL_SETTING, in_channels=in_channels, output_stride=output_stride, **kwargs)
