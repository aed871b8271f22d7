"""ResNet checkpoints of torchvision and timm -> :class:`maskworks.backbones.ResNet` keys.

Both libraries name ResNet parameters exactly as :class:`~maskworks.backbones.ResNet` does
(``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}`` / ``bn*`` / ``downsample.{0,1}``). timm's
extra modules (``act1``, ``global_pool``, ``drop_block``, ``aa``) hold no parameters, so the
only difference is the classifier, ``fc.*``, which a backbone does not have: it is dropped
and reported. A 3-channel ``conv1`` is adapted when the target takes another channel count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

__all__ = [
    "adapt_input_conv",
    "convert_hf_resnet",
    "convert_torchvision_resnet",
    "convert_timm_resnet",
    "is_hf_resnet_state_dict",
    "is_resnet_state_dict",
]

_FIRST_CONV = "conv1.weight"


def is_resnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a bare torchvision / timm / maskworks ResNet state dict (keys ``conv1.weight``, ``layer1.0...``)."""
    return _FIRST_CONV in state_dict and any(k.startswith("layer1.0.") for k in state_dict)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-conv weight ``(O, I, k, k)`` to ``in_channels`` inputs, as timm and smp do.

    One channel sums the pretrained filters over their inputs; more channels repeat them
    cyclically and rescale by ``I / in_channels`` so the activation magnitude is kept.

    Args:
        weight: the pretrained first-conv weight.
        in_channels: wanted input channels.

    Returns:
        The weight ``(O, in_channels, k, k)``.
    """
    src = weight.shape[1]
    if in_channels == src:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)  # (O, 1, k, k)
    repeat = math.ceil(in_channels / src)
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (src / in_channels)  # (O, in_channels, k, k)


def _convert_resnet(
    state_dict: Mapping[str, torch.Tensor], classifier_prefix: str, in_channels: int | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(classifier_prefix):
            dropped.append(key)
        else:
            out[key] = value
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped


def convert_torchvision_resnet(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision ``resnet*`` / ``resnext*`` state dict -> backbone keys.

    Args:
        state_dict: the torchvision state dict.
        in_channels: input channels of the target backbone; ``conv1.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (the ``fc.*`` classifier).
    """
    return _convert_resnet(state_dict, "fc.", in_channels)


def convert_timm_resnet(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm ``resnet*`` state dict (full model or ``features_only``) -> backbone keys.

    Args:
        state_dict: the timm state dict.
        in_channels: input channels of the target backbone; ``conv1.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (timm's classifier, also named ``fc``).
    """
    return _convert_resnet(state_dict, "fc.", in_channels)


_HF_RESNET_LAYER = re.compile(
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))\.(convolution|normalization)\.(.+)"
)
_HF_RESNET_STEM = re.compile(r"embedder\.embedder\.(convolution|normalization)\.(.+)")


def is_hf_resnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``ResNetModel`` / ``ResNetBackbone`` / ``ResNetForImageClassification`` state dict (``resnet.``
    prefix optional): ``embedder.embedder.convolution.weight`` and ``encoder.stages.*`` keys."""
    keys = {k.removeprefix("resnet.") for k in state_dict}
    return "embedder.embedder.convolution.weight" in keys and any(k.startswith("encoder.stages.0.") for k in keys)


def convert_hf_resnet(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF ResNet (``ResNetModel`` / ``ResNetBackbone`` / ``ResNetForImageClassification``, ``resnet.`` prefix
    optional) -> :class:`~maskworks.backbones.ResNet` keys.

    ==========================================================  ==============================================
    HF                                                          maskworks (= torchvision)
    ==========================================================  ==============================================
    ``embedder.embedder.convolution`` / ``normalization``       ``conv1`` / ``bn1``
    ``encoder.stages.{s}.layers.{i}.layer.{j}.convolution``     ``layer{s+1}.{i}.conv{j+1}`` (``normalization``:
                                                                ``bn{j+1}``)
    ``encoder.stages.{s}.layers.{i}.shortcut.convolution`` /    ``layer{s+1}.{i}.downsample.0`` / ``.1``
    ``normalization``
    ``classifier.*``                                            dropped and reported
    ==========================================================  ==============================================

    HF's bottleneck puts the stride on the 3x3 conv (``downsample_in_bottleneck=False``, its default), as
    torchvision's ResNet v1.5 and ours do.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for raw_key, value in state_dict.items():
        key = raw_key.removeprefix("resnet.")
        m = _HF_RESNET_STEM.fullmatch(key)
        if m:
            out[("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)] = value
            continue
        m = _HF_RESNET_LAYER.fullmatch(key)
        if m:
            stage, block, part, j, kind, rest = m.groups()
            prefix = f"layer{int(stage) + 1}.{block}."
            if part == "shortcut":
                out[prefix + ("downsample.0." if kind == "convolution" else "downsample.1.") + rest] = value
            else:
                out[prefix + ("conv" if kind == "convolution" else "bn") + f"{int(j) + 1}." + rest] = value
            continue
        dropped.append(raw_key)
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped
