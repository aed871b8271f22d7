"""ConvNeXt backbones: V1 (Liu et al., "A ConvNet for the 2020s", CVPR 2022) and V2 (Woo et al., "ConvNeXt V2:
Co-designing and Scaling ConvNets with Masked Autoencoders", CVPR 2023).

A 4x4 stride-4 "patchify" stem (conv + LayerNorm), then four stages; each stage but the first starts with a
LayerNorm + 2x2 stride-2 conv downsample. A block is a 7x7 depthwise conv, LayerNorm, an inverted-bottleneck MLP
(``dim -> 4 dim -> dim``, GELU) and a residual connection; V1 scales the branch by a learnt per-channel ``gamma``
(layer scale), V2 drops layer scale and puts Global Response Normalization after the MLP's activation.

State-dict keys equal timm's ``convnext_*`` / ``convnextv2_*`` keys (``stem.0/1``, ``stages.N.downsample.0/1``,
``stages.N.blocks.M.conv_dw / norm / mlp.fc1 / mlp.grn / mlp.fc2 / gamma``) without the classifier ``head.*``, so a
timm checkpoint loads directly. The small V2 models (``atto`` .. ``nano``) use 1x1 convolutions for the MLP and
channels-first norms, as timm builds them (their ``fc1`` / ``fc2`` weights are ``(O, I, 1, 1)``).

Input size: like timm, the backbone itself pads nothing; a map whose side is not a multiple of 32 is floored at each
strided conv (``H // 4``, then ``// 2`` per stage). Task models pad their input to the last map's reduction first
(see :func:`maskworks.models._utils.pad_to_multiple`), so they see exact ``H / r`` maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.norm import GlobalResponseNorm, LayerNorm2d
from maskworks.layers.vit_layers import DropPath
from maskworks.registry import register_model

__all__ = [
    "ConvNeXt",
    "ConvNeXtBlock",
    "ConvNeXtStage",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
    "convnext_xlarge",
    "convnextv2_atto",
    "convnextv2_femto",
    "convnextv2_pico",
    "convnextv2_nano",
    "convnextv2_tiny",
    "convnextv2_base",
    "convnextv2_large",
    "convnextv2_huge",
]

_EPS = 1e-6  # every LayerNorm of ConvNeXt


class ConvNeXtMlp(nn.Module):
    """``fc1 -> GELU -> (GRN) -> fc2``; linear layers on ``(N, H, W, C)`` or 1x1 convs on ``(N, C, H, W)``."""

    def __init__(self, dim: int, hidden: int, use_grn: bool, conv_mlp: bool) -> None:
        super().__init__()
        if conv_mlp:
            self.fc1 = nn.Conv2d(dim, hidden, 1)
            self.fc2 = nn.Conv2d(hidden, dim, 1)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden, eps=_EPS, channels_last=not conv_mlp) if use_grn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        if self.grn is not None:
            x = self.grn(x)
        return self.fc2(x)


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(gamma * mlp(norm(conv_dw(x))))``.

    Args:
        dim: channels.
        kernel_size: depthwise kernel size (7).
        mlp_ratio: hidden width of the MLP over ``dim``.
        ls_init_value: initial layer-scale value; ``None``: no layer scale (V2).
        use_grn: Global Response Normalization in the MLP (V2).
        conv_mlp: 1x1 convs and a channels-first norm instead of linear layers on channels-last maps.
        drop_path: stochastic-depth probability of the residual branch.
        dilation: dilation of the depthwise conv (a stage past the output stride).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        use_grn: bool = False,
        conv_mlp: bool = False,
        drop_path: float = 0.0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv_mlp = conv_mlp
        pad = dilation * (kernel_size - 1) // 2
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=pad, dilation=dilation, groups=dim)
        self.norm = LayerNorm2d(dim, eps=_EPS) if conv_mlp else nn.LayerNorm(dim, eps=_EPS)
        self.mlp = ConvNeXtMlp(dim, int(mlp_ratio * dim), use_grn, conv_mlp)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)  # MLP on (N, H, W, C)
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


class _Conv2dSame(nn.Conv2d):
    """A stride-1 conv with TensorFlow's "same" padding for an even kernel: the extra pixel goes bottom / right
    (timm's ``Conv2dSame``), so a dilated stage keeps its input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.dilation[0] * (self.kernel_size[0] - 1)
        return super().forward(F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2)))


class ConvNeXtStage(nn.Module):
    """Optional ``LayerNorm2d + 2x2 stride-2 conv`` downsample, then ``depth`` blocks.

    A stage past the output stride (``stride=1``, ``dilation=(first, rest)`` with ``rest > 1``) keeps its
    resolution as in timm: the downsample becomes a 2x2 stride-1 conv with "same" padding (dilated by ``first``)
    and every block's depthwise conv is dilated by ``rest``; the weights are those of the undilated model.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        depth: int,
        drop_path_rates: Sequence[float],
        dilation: tuple[int, int] = (1, 1),
        **block_kwargs,
    ) -> None:
        super().__init__()
        first, rest = dilation
        if stride > 1 or in_chs != out_chs or first != rest:
            if rest > 1:  # dilated: 2x2 kernel at stride 1, "same" padding
                conv = _Conv2dSame(in_chs, out_chs, kernel_size=2, stride=1, dilation=first)
            else:
                conv = nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride)
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=_EPS), conv)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(ConvNeXtBlock(out_chs, drop_path=p, dilation=rest, **block_kwargs) for p in drop_path_rates)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor (no classifier) returning the outputs of the four stages.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        in_channels: channels of the input image.
        ls_init_value: layer-scale initial value (V1: ``1e-6``); ``None`` disables layer scale (V2).
        use_grn: Global Response Normalization in every MLP (V2).
        conv_mlp: MLP as 1x1 convs with channels-first norms (timm's small V2 models).
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all blocks.
        kernel_size: depthwise kernel size.
        mlp_ratio: MLP hidden width over the block width.
        out_norms: add one channels-first LayerNorm per stage map (``stage_norms``), applied by
            :meth:`forward_intermediates`; dense heads such as UPerNet use them (mmseg, HF ``ConvNextBackbone``'s
            ``hidden_states_norms``). Off by default, as in timm.
        output_stride: 32, or 16 / 8 for dense prediction (DeepLab): the stages past it keep their resolution
            and dilate their convs instead, as timm's ``output_stride`` does.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_channels: int = 3,
        ls_init_value: float | None = 1e-6,
        use_grn: bool = False,
        conv_mlp: bool = False,
        drop_path_rate: float = 0.0,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        out_norms: bool = False,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims must give 4 stages, got depths={depths!r}, dims={dims!r}")
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.in_channels = in_channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], _EPS))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).split(depths)  # linear over all blocks
        block_kwargs = {
            "kernel_size": kernel_size,
            "mlp_ratio": mlp_ratio,
            "ls_init_value": ls_init_value,
            "use_grn": use_grn,
            "conv_mlp": conv_mlp,
        }
        stages, prev, reduction, dilation = [], dims[0], 4, 1
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stride = 1 if i == 0 else 2
            if reduction >= output_stride and stride > 1:  # past the output stride: dilate instead (timm's rule)
                dilation, stride = dilation * stride, 1
            reduction *= stride
            first_dilation = 1 if dilation in (1, 2) else 2
            stages.append(
                ConvNeXtStage(
                    prev, dim, stride, depth, rates[i].tolist(), dilation=(first_dilation, dilation), **block_kwargs
                )
            )
            self.feature_info.append({"num_chs": dim, "reduction": reduction, "module": f"stages.{i}"})
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.stage_norms = nn.ModuleList(LayerNorm2d(d, eps=_EPS) for d in dims) if out_norms else None
        self._init_weights()

    def _init_weights(self) -> None:
        # the papers' (and timm's) initialisation: truncated normal std 0.02, zero biases
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Input channels followed by the channels of the four maps."""
        return (self.in_channels, *(info["num_chs"] for info in self.feature_info))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of ``stages.0`` .. ``stages.3``.

        Args:
            x: images ``(B, in_channels, H, W)``.

        Returns:
            Four maps ``(B, C_i, H // r_i, W // r_i)`` (floored per strided conv) with ``C_i, r_i`` as in
            ``feature_info`` (reductions 4, 8, 16, 32); after ``stage_norms`` when built with ``out_norms=True``.
        """
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features.append(x if self.stage_norms is None else self.stage_norms[i](x))
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, dims[-1], H // 32, W // 32)`` (no stage norm)."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x)


def _v1(depths: Sequence[int], dims: Sequence[int], in_channels: int, drop_path_rate: float, **kwargs) -> ConvNeXt:
    return ConvNeXt(depths, dims, in_channels=in_channels, drop_path_rate=drop_path_rate, **kwargs)


def _v2(
    depths: Sequence[int],
    dims: Sequence[int],
    in_channels: int,
    drop_path_rate: float,
    conv_mlp: bool = False,
    **kwargs,
) -> ConvNeXt:
    kwargs.setdefault("ls_init_value", None)
    return ConvNeXt(
        depths, dims, in_channels=in_channels, use_grn=True, conv_mlp=conv_mlp, drop_path_rate=drop_path_rate, **kwargs
    )


@register_model(kind="backbone")
def convnext_tiny(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt-T backbone (depths 3-3-9-3, dims 96-768)."""
    return _v1((3, 3, 9, 3), (96, 192, 384, 768), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnext_small(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt-S backbone (depths 3-3-27-3, dims 96-768)."""
    return _v1((3, 3, 27, 3), (96, 192, 384, 768), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnext_base(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt-B backbone (depths 3-3-27-3, dims 128-1024)."""
    return _v1((3, 3, 27, 3), (128, 256, 512, 1024), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnext_large(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt-L backbone (depths 3-3-27-3, dims 192-1536)."""
    return _v1((3, 3, 27, 3), (192, 384, 768, 1536), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnext_xlarge(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt-XL backbone (depths 3-3-27-3, dims 256-2048)."""
    return _v1((3, 3, 27, 3), (256, 512, 1024, 2048), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnextv2_atto(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-Atto backbone (depths 2-2-6-2, dims 40-320, 1x1-conv MLP)."""
    return _v2((2, 2, 6, 2), (40, 80, 160, 320), in_channels, drop_path_rate, conv_mlp=True, **kwargs)


@register_model(kind="backbone")
def convnextv2_femto(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-Femto backbone (depths 2-2-6-2, dims 48-384, 1x1-conv MLP)."""
    return _v2((2, 2, 6, 2), (48, 96, 192, 384), in_channels, drop_path_rate, conv_mlp=True, **kwargs)


@register_model(kind="backbone")
def convnextv2_pico(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-Pico backbone (depths 2-2-6-2, dims 64-512, 1x1-conv MLP)."""
    return _v2((2, 2, 6, 2), (64, 128, 256, 512), in_channels, drop_path_rate, conv_mlp=True, **kwargs)


@register_model(kind="backbone")
def convnextv2_nano(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-Nano backbone (depths 2-2-8-2, dims 80-640, 1x1-conv MLP)."""
    return _v2((2, 2, 8, 2), (80, 160, 320, 640), in_channels, drop_path_rate, conv_mlp=True, **kwargs)


@register_model(kind="backbone")
def convnextv2_tiny(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-T backbone (depths 3-3-9-3, dims 96-768)."""
    return _v2((3, 3, 9, 3), (96, 192, 384, 768), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnextv2_base(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-B backbone (depths 3-3-27-3, dims 128-1024)."""
    return _v2((3, 3, 27, 3), (128, 256, 512, 1024), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnextv2_large(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-L backbone (depths 3-3-27-3, dims 192-1536)."""
    return _v2((3, 3, 27, 3), (192, 384, 768, 1536), in_channels, drop_path_rate, **kwargs)


@register_model(kind="backbone")
def convnextv2_huge(in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt V2-H backbone (depths 3-3-27-3, dims 352-2816)."""
    return _v2((3, 3, 27, 3), (352, 704, 1408, 2816), in_channels, drop_path_rate, **kwargs)
