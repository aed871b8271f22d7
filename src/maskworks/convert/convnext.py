"""timm, torchvision and Hugging Face ConvNeXt V1 / V2 checkpoints -> maskworks
:class:`~maskworks.backbones.convnext.ConvNeXt` keys.

timm (:func:`convert_timm_convnext`): the keys are the same; the classifier (``head.*``: its norm and fc) is dropped
and the first convolution (``stem.0.weight``) is adapted when the target takes another number of input channels.

torchvision ``convnext_*`` (:func:`convert_torchvision_convnext`) and HF ``ConvNext*`` / ``ConvNextV2*``
(:func:`convert_hf_convnext`) are renamed (tables in the functions' docstrings); the weights compute the same blocks
(every LayerNorm with eps 1e-6), only the layer scale and GRN parameters are reshaped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from maskworks.convert._common import unwrap_state_dict
from maskworks.convert.resnet import adapt_input_conv

__all__ = [
    "convert_hf_convnext",
    "convert_timm_convnext",
    "convert_torchvision_convnext",
    "is_convnext_state_dict",
    "is_hf_convnext_state_dict",
    "is_torchvision_convnext_state_dict",
]

StateDict = dict[str, torch.Tensor]

_FIRST_CONV = "stem.0.weight"
_MLP_WEIGHT = re.compile(r"^stages\.\d+\.blocks\.\d+\.mlp\.fc[12]\.weight$")


def is_convnext_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a timm / maskworks ConvNeXt state dict (keys ``stem.0.weight``, ``stages.0.blocks.0.conv_dw...``)."""
    return _FIRST_CONV in state_dict and any(k.startswith("stages.0.blocks.0.conv_dw.") for k in state_dict)


def _finish(out: StateDict, in_channels: int | None, model: nn.Module | None) -> StateDict:
    """Adapt the stem to ``in_channels`` and, for a ``model`` built with ``conv_mlp=True`` (1x1-conv MLPs), the
    linear MLP weights ``(O, I)`` to ``(O, I, 1, 1)`` (and back for a linear target)."""
    if model is not None:
        in_channels = getattr(model, "in_channels", in_channels)
        own = model.state_dict()
        for key, value in out.items():
            if _MLP_WEIGHT.match(key) and key in own and own[key].ndim != value.ndim:
                out[key] = value.reshape(own[key].shape)
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out


def convert_timm_convnext(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """timm ``convnext*`` / ``convnextv2*`` state dict -> backbone keys.

    Args:
        state_dict: the timm state dict (full model or ``features_only``).
        in_channels: input channels of the target backbone; ``stem.0.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (the ``head.*`` classifier).
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    dropped = [k for k in state_dict if k.startswith("head.")]
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped


# ---------------------------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------------------------

_TV_FIXED = {
    "features.0.0.weight": "stem.0.weight",
    "features.0.0.bias": "stem.0.bias",
    "features.0.1.weight": "stem.1.weight",
    "features.0.1.bias": "stem.1.bias",
}
_TV_BLOCK = re.compile(r"^features\.(\d*[13579])\.(\d+)\.(layer_scale|block\.[0235]\.(?:weight|bias))$")
_TV_DOWNSAMPLE = re.compile(r"^features\.(\d*[2468])\.([01])\.(weight|bias)$")
_TV_BLOCK_PARTS = {"block.0.": "conv_dw.", "block.2.": "norm.", "block.3.": "mlp.fc1.", "block.5.": "mlp.fc2."}


def is_torchvision_convnext_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a torchvision ``convnext_tiny/small/base/large`` state dict (``features.0.0.weight`` stem and
    ``features.1.0.layer_scale``)."""
    keys = unwrap_state_dict(state_dict)
    return "features.0.0.weight" in keys and "features.1.0.layer_scale" in keys


def convert_torchvision_convnext(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[StateDict, list[str]]:
    """torchvision ``convnext_tiny/small/base/large`` state dict -> backbone keys.

    ==========================================================  ======================================================
    torchvision                                                 maskworks
    ==========================================================  ======================================================
    ``features.0.0`` / ``features.0.1`` (conv, LayerNorm2d)     ``stem.0`` / ``stem.1``
    ``features.{2s+1}.{b}.block.0 / 2 / 3 / 5``                 ``stages.{s}.blocks.{b}.conv_dw / norm / mlp.fc1 /
                                                                ``mlp.fc2``
    ``features.{2s+1}.{b}.layer_scale`` ``(C, 1, 1)``           ``stages.{s}.blocks.{b}.gamma`` ``(C,)``
    ``features.{2s}.0`` / ``features.{2s}.1`` (s = 1..3)        ``stages.{s}.downsample.0`` / ``downsample.1``
    ``classifier.*`` (LayerNorm2d, Linear)                      dropped and reported (ours has no final norm)
    ==========================================================  ======================================================

    Args:
        state_dict: the torchvision state dict.
        in_channels: input channels of the target backbone; ``stem.0.weight`` is adapted when it differs.
        model: the target, optional: its ``in_channels``, and 1x1-conv MLP weights when built with ``conv_mlp``.

    Returns:
        The converted state dict and the dropped keys.

    Raises:
        ValueError: not a torchvision ConvNeXt state dict, or a key that is not part of one.
    """
    if not is_torchvision_convnext_state_dict(state_dict):
        raise ValueError("state_dict is not a torchvision ConvNeXt state dict (features.1.0.layer_scale ...)")
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in unwrap_state_dict(state_dict).items():
        if key.startswith("classifier."):
            dropped.append(key)
        elif key in _TV_FIXED:
            out[_TV_FIXED[key]] = value
        elif m := _TV_BLOCK.match(key):
            prefix, rest = f"stages.{int(m.group(1)) // 2}.blocks.{m.group(2)}.", m.group(3)
            if rest == "layer_scale":
                out[prefix + "gamma"] = value.reshape(-1)
            else:
                out[prefix + _TV_BLOCK_PARTS[rest[:8]] + rest[8:]] = value
        elif m := _TV_DOWNSAMPLE.match(key):
            out[f"stages.{int(m.group(1)) // 2}.downsample.{m.group(2)}.{m.group(3)}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in a torchvision ConvNeXt state dict")
    return _finish(out, in_channels, model), dropped


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------------------------

_HF_PREFIXES = ("convnext.", "convnextv2.")
_HF_FIXED = {
    "embeddings.patch_embeddings.weight": "stem.0.weight",
    "embeddings.patch_embeddings.bias": "stem.0.bias",
    "embeddings.layernorm.weight": "stem.1.weight",
    "embeddings.layernorm.bias": "stem.1.bias",
}
_HF_DROPPED = ("classifier.", "layernorm.", "pooler.")
_HF_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$")
_HF_DOWNSAMPLE = re.compile(r"^encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(weight|bias)$")
_HF_STAGE_NORM = re.compile(r"^hidden_states_norms\.stage(\d+)\.(weight|bias)$")
_HF_BLOCK_PARTS = {
    "dwconv.": "conv_dw.",
    "layernorm.": "norm.",
    "pwconv1.": "mlp.fc1.",
    "pwconv2.": "mlp.fc2.",
    "grn.": "mlp.grn.",
    "layer_scale_parameter": "gamma",
}


def _strip_hf_prefix(key: str) -> str:
    for prefix in _HF_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_hf_convnext_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``ConvNextModel`` / ``ConvNextForImageClassification`` / ``ConvNextBackbone`` or the
    ``ConvNextV2*`` counterparts (``convnext.`` / ``convnextv2.`` prefix optional)."""
    keys = {_strip_hf_prefix(k) for k in unwrap_state_dict(state_dict)}
    return "embeddings.patch_embeddings.weight" in keys and "encoder.stages.0.layers.0.dwconv.weight" in keys


def convert_hf_convnext(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[StateDict, list[str]]:
    """HF ConvNeXt V1 / V2 state dict -> backbone keys.

    ==============================================================  ==================================================
    HF (``convnext.`` / ``convnextv2.`` prefix optional)            maskworks
    ==============================================================  ==================================================
    ``embeddings.patch_embeddings`` / ``embeddings.layernorm``      ``stem.0`` / ``stem.1``
    ``encoder.stages.{s}.downsampling_layer.{0,1}``                 ``stages.{s}.downsample.{0,1}``
    ``encoder.stages.{s}.layers.{b}.dwconv / layernorm /            ``stages.{s}.blocks.{b}.conv_dw / norm / mlp.fc1 /
    pwconv1 / pwconv2``                                             mlp.fc2``
    ``...layer_scale_parameter`` (V1)                               ``...gamma``
    ``...grn.weight`` / ``grn.bias`` ``(1, 1, 1, C)`` (V2)          ``...mlp.grn.weight`` / ``mlp.grn.bias`` ``(C,)``
    ``hidden_states_norms.stage{n}`` (``*Backbone``)                ``stage_norms.{n-1}`` (``out_norms=True``)
    ``layernorm`` (final norm of ``*Model``), ``classifier``        dropped and reported (ours has no final norm)
    ==============================================================  ==================================================

    HF's MLPs are linear layers; for a target built with ``conv_mlp=True`` (our ``convnextv2_atto`` .. ``nano``, as
    timm builds them) pass ``model`` and their weights are reshaped to ``(O, I, 1, 1)``.

    Args:
        state_dict: the HF state dict.
        in_channels: input channels of the target backbone; ``stem.0.weight`` is adapted when it differs.
        model: the target, optional: its ``in_channels``, and 1x1-conv MLP weights when built with ``conv_mlp``.

    Returns:
        The converted state dict and the dropped keys (in the checkpoint's naming).

    Raises:
        ValueError: not an HF ConvNeXt state dict, or a key that is not part of one.
    """
    if not is_hf_convnext_state_dict(state_dict):
        raise ValueError("state_dict is not an HF ConvNext / ConvNextV2 state dict (embeddings.patch_embeddings ...)")
    out: StateDict = {}
    dropped: list[str] = []
    for raw_key, value in unwrap_state_dict(state_dict).items():
        key = _strip_hf_prefix(raw_key)
        if key.startswith(_HF_DROPPED):
            dropped.append(raw_key)
        elif key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
        elif m := _HF_DOWNSAMPLE.match(key):
            out[f"stages.{m.group(1)}.downsample.{m.group(2)}.{m.group(3)}"] = value
        elif (m := _HF_STAGE_NORM.match(key)) and int(m.group(1)) >= 1:
            out[f"stage_norms.{int(m.group(1)) - 1}.{m.group(2)}"] = value
        elif m := _HF_BLOCK.match(key):
            prefix, rest = f"stages.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            part = next((p for p in _HF_BLOCK_PARTS if rest.startswith(p)), None)
            if part is None:
                raise ValueError(f"unexpected key {raw_key!r} in an HF ConvNeXt block")
            if part in ("grn.", "layer_scale_parameter"):
                value = value.reshape(-1)
            out[prefix + _HF_BLOCK_PARTS[part] + rest[len(part) :]] = value
        else:
            raise ValueError(f"unexpected key {raw_key!r} in an HF ConvNeXt state dict")
    return _finish(out, in_channels, model), dropped
