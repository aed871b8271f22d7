"""HF transformers and torchvision Vision Transformer checkpoints -> :class:`maskworks.backbones.vit.VisionTransformer`
keys (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

All three implementations compute the same pre-norm ViT (LayerNorm eps 1e-6 in the released configs, exact
GELU, class token with its own position row, final LayerNorm, linear head on the class token); only names and
the packing of the attention projections differ.

HF ``ViTModel`` / ``ViTForImageClassification`` (optional ``vit.`` prefix). Hub checkpoints use the names of
transformers < 5; transformers 5 renamed the modules in memory. Both layouts convert:

==========================================================  ==========================================
HF (checkpoint layout / transformers >= 5 layout)           maskworks
==========================================================  ==========================================
``embeddings.cls_token``                                    ``cls_token``
``embeddings.position_embeddings``                          ``pos_embed``
``embeddings.patch_embeddings.projection``                  ``patch_embed.proj``
``encoder.layer.{i}.attention.attention.{query,key,value}``  ``blocks.{i}.attn.qkv`` (concatenated q, k, v)
/ ``layers.{i}.attention.{q,k,v}_proj``
``encoder.layer.{i}.attention.output.dense``                ``blocks.{i}.attn.proj``
/ ``layers.{i}.attention.o_proj``
``...layernorm_before`` / ``...layernorm_after``            ``blocks.{i}.norm1`` / ``blocks.{i}.norm2``
``encoder.layer.{i}.intermediate.dense`` / ``...mlp.fc1``   ``blocks.{i}.mlp.fc1``
``encoder.layer.{i}.output.dense`` / ``...mlp.fc2``         ``blocks.{i}.mlp.fc2``
``layernorm``                                               ``norm``
``classifier``                                              ``head``
``pooler.dense``, ``embeddings.mask_token``, ``decoder.*``  dropped and reported (``decoder.*``: SimMIM's
                                                            ``ViTForMaskedImageModeling``)
==========================================================  ==========================================

HF's ``ViTForImageClassification`` classifies ``layernorm(hidden)[:, 0]``, i.e. our ``global_pool="token"`` with
``norm``; its ``last_hidden_state`` equals our ``forward_features``. Build the target with the HF config's
``qkv_bias`` and ``layer_norm_eps`` (the released models use ``True`` and 1e-12 for ``google/vit-*``).

torchvision ``vit_b_16`` ... ``vit_h_14`` and ``VisionTransformer(...)``:

==============================================================  ======================================
torchvision                                                     maskworks
==============================================================  ======================================
``class_token``                                                 ``cls_token``
``conv_proj``                                                   ``patch_embed.proj``
``conv_proj.conv_bn_relu_{i}.{0,1}`` / ``conv_proj.conv_last``  ``patch_embed.stem.{i}.{0,1}`` /
(``conv_stem_configs``, early convolutions)                     ``patch_embed.proj`` (:class:`~maskworks.
                                                                backbones.vit_hybrid.ConvStemEmbed`)
``encoder.pos_embedding``                                       ``pos_embed``
``encoder.layers.encoder_layer_{i}.ln_1`` / ``ln_2``            ``blocks.{i}.norm1`` / ``norm2``
``...self_attention.in_proj_weight`` / ``in_proj_bias``          ``blocks.{i}.attn.qkv.weight`` / ``bias``
``...self_attention.out_proj``                                  ``blocks.{i}.attn.proj``
``...mlp.0`` / ``mlp.3`` (``mlp.linear_1`` / ``linear_2`` before  ``blocks.{i}.mlp.fc1`` / ``fc2``
torchvision 0.13)
``encoder.ln``                                                  ``norm``
``heads.head``                                                  ``head``
==============================================================  ======================================

``nn.MultiheadAttention`` packs ``in_proj_weight`` as ``[W_q; W_k; W_v]`` with heads contiguous inside each,
the layout of timm's ``qkv``, so it is copied unchanged. A ``heads.pre_logits`` layer (``representation_size``)
has no counterpart: it and ``heads.head`` are dropped and reported, with a warning.

With a target ``model`` both converters also resample the position table / patch kernel to its grid and patch
size, adapt the first convolution to its input channels and drop a head it cannot take
(:func:`maskworks.convert.vit.convert_timm_vit`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from maskworks.convert._common import unwrap_state_dict
from maskworks.convert.resnet import adapt_input_conv
from maskworks.convert.vit import convert_timm_vit

__all__ = ["convert_hf_vit", "convert_torchvision_vit", "is_hf_vit_state_dict", "is_torchvision_vit_state_dict"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_CONV_STEM_FIRST = "patch_embed.stem.0.0.weight"
_PATCH_KERNEL = "patch_embed.proj.weight"


def _strip_hf_prefix(key: str) -> str:
    return key[len("vit.") :] if key.startswith("vit.") else key


# ---------------------------------------------------------------------------------------------------------------
# HF transformers
# ---------------------------------------------------------------------------------------------------------------

_HF_QKV = re.compile(
    r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
)
_HF_BLOCK = [  # (pattern on the un-prefixed key, replacement)
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\."), r"blocks.\1.norm1."),
    (re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\."), r"blocks.\1.norm2."),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^layers\.(\d+)\.mlp\.(fc1|fc2)\."), r"blocks.\1.mlp.\2."),
]
_HF_FIXED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_DROPPED_PREFIXES = ("pooler.", "embeddings.mask_token", "decoder.")
_QKV_INDEX = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def is_hf_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``ViTModel`` / ``ViTForImageClassification`` state dict (either key layout, with or
    without the ``vit.`` prefix). ``ViTMAEForPreTraining`` checkpoints (an MAE decoder, ``decoder.decoder_embed``)
    are not: :mod:`maskworks.convert.mae` converts those."""
    keys = {_strip_hf_prefix(k) for k in unwrap_state_dict(state_dict)}
    has_embed = "embeddings.patch_embeddings.projection.weight" in keys
    has_layer = "encoder.layer.0.attention.attention.query.weight" in keys or "layers.0.attention.q_proj.weight" in keys
    is_mae = any(k.startswith("decoder.decoder_embed.") for k in keys)
    return has_embed and has_layer and not is_mae


def convert_hf_vit(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None, in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """HF ``ViTModel`` / ``ViTForImageClassification`` state dict -> maskworks ViT keys.

    Args:
        state_dict: the HF state dict (hub layout or transformers >= 5 layout; ``vit.`` prefix optional).
        model: the target; when given, position table and patch kernel are resampled to it and a head it cannot
            take is dropped (see :func:`maskworks.convert.vit.convert_timm_vit`).
        in_channels: input channels of the target when no ``model`` is given (the patch kernel is adapted).

    Returns:
        The converted state dict and the dropped keys (``pooler.*``, ``mask_token``, ``decoder.*``, and
        with a ``model`` an incompatible ``head``), in the checkpoint's naming.

    Raises:
        ValueError: a key that is not part of a ViT, or a q / k / v projection without its siblings.
    """
    if not is_hf_vit_state_dict(state_dict):
        raise ValueError("state_dict is not an HF ViTModel / ViTForImageClassification state dict")
    converted: StateDict = {}
    dropped: list[str] = []
    qkv: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    for raw_key, value in unwrap_state_dict(state_dict).items():
        key = _strip_hf_prefix(raw_key)
        if key.startswith(_HF_DROPPED_PREFIXES):
            dropped.append(raw_key)
            continue
        if key in _HF_FIXED:
            converted[_HF_FIXED[key]] = value
            continue
        m = _HF_QKV.match(key)
        if m:
            block, name, short, kind = m.groups()
            qkv.setdefault((int(block), kind), [None, None, None])[_QKV_INDEX[name or short]] = value
            continue
        for pattern, repl in _HF_BLOCK:
            new_key, n = pattern.subn(repl, key)
            if n:
                converted[new_key] = value
                break
        else:
            raise ValueError(f"unexpected key {raw_key!r} in an HF ViT state dict")
    for (block, kind), parts in sorted(qkv.items()):
        if any(p is None for p in parts):
            raise ValueError(f"block {block}: the query / key / value {kind}s must all be present")
        converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # (3 * D, D) or (3 * D,)
    if dropped:
        log.info("convert_hf_vit dropped %d keys: %s", len(dropped), dropped)
    return _finish(converted, dropped, model, in_channels)


# ---------------------------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------------------------

_TV_LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_TV_LAYER_PARTS = {
    "ln_1.": "norm1.",
    "ln_2.": "norm2.",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.": "attn.proj.",
    "mlp.0.": "mlp.fc1.",
    "mlp.3.": "mlp.fc2.",
    "mlp.linear_1.": "mlp.fc1.",  # torchvision < 0.13 (MLPBlock version 1)
    "mlp.linear_2.": "mlp.fc2.",
}
_TV_CONV_STEM = re.compile(r"^conv_proj\.conv_bn_relu_(\d+)\.(.+)$")
_TV_FIXED = {
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "conv_proj.conv_last.weight": "patch_embed.proj.weight",
    "conv_proj.conv_last.bias": "patch_embed.proj.bias",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}


def is_torchvision_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a torchvision ``VisionTransformer`` state dict (``class_token`` and ``encoder.pos_embedding``)."""
    keys = unwrap_state_dict(state_dict)
    return "class_token" in keys and "encoder.pos_embedding" in keys


def convert_torchvision_vit(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None, in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """torchvision ``vit_*`` / ``VisionTransformer`` state dict (also with ``conv_stem_configs``) -> maskworks keys.

    Args:
        state_dict: the torchvision state dict.
        model: the target; when given, position table and patch kernel are resampled to it and a head it cannot
            take is dropped (see :func:`maskworks.convert.vit.convert_timm_vit`).
        in_channels: input channels of the target when no ``model`` is given (the first conv is adapted).

    Returns:
        The converted state dict and the dropped keys (``heads.*`` when there is a ``pre_logits`` layer, and
        with a ``model`` an incompatible ``head``), in the checkpoint's naming.

    Raises:
        ValueError: a key that is not part of a torchvision ViT.
    """
    if not is_torchvision_vit_state_dict(state_dict):
        raise ValueError("state_dict is not a torchvision VisionTransformer state dict")
    source = unwrap_state_dict(state_dict)
    drop_heads = any(k.startswith("heads.pre_logits.") for k in source)
    if drop_heads:
        log.warning(
            "torchvision ViT with representation_size (heads.pre_logits): no maskworks counterpart, "
            "its classifier (heads.*) is dropped"
        )
    converted: StateDict = {}
    dropped: list[str] = []
    for key, value in source.items():
        if drop_heads and key.startswith("heads."):
            dropped.append(key)
            continue
        if key in _TV_FIXED:
            converted[_TV_FIXED[key]] = value
            continue
        m = _TV_LAYER.match(key)
        if m:
            block, rest = m.groups()
            for old, new in _TV_LAYER_PARTS.items():
                if rest.startswith(old):
                    converted[f"blocks.{block}.{new}{rest[len(old) :]}"] = value
                    break
            else:
                raise ValueError(f"unexpected key {key!r} in a torchvision ViT encoder layer")
            continue
        m = _TV_CONV_STEM.match(key)
        if m:
            converted[f"patch_embed.stem.{m.group(1)}.{m.group(2)}"] = value
            continue
        raise ValueError(f"unexpected key {key!r} in a torchvision ViT state dict")
    return _finish(converted, dropped, model, in_channels)


# ---------------------------------------------------------------------------------------------------------------
# Shared tail: target-dependent adaptation
# ---------------------------------------------------------------------------------------------------------------


def _finish(
    converted: StateDict, dropped: list[str], model: torch.nn.Module | None, in_channels: int | None
) -> tuple[StateDict, list[str]]:
    """Resample / drop against ``model`` (timm-layout keys from here on) and adapt the first convolution."""
    if model is not None:
        converted, more = convert_timm_vit(converted, model)
        dropped = dropped + more
        in_channels = getattr(model, "in_channels", in_channels)
    if in_channels is not None:
        first = _CONV_STEM_FIRST if _CONV_STEM_FIRST in converted else _PATCH_KERNEL
        if first in converted and converted[first].ndim == 4:
            converted[first] = adapt_input_conv(converted[first], in_channels)
    return converted, dropped
