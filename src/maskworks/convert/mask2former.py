"""Hugging Face ``Mask2FormerForUniversalSegmentation`` checkpoints -> maskworks :class:`~maskworks.models.universal.Mask2Former`.

=====================================================================================  ===================================
HF (``model.`` prefix)                                                                 maskworks
=====================================================================================  ===================================
``pixel_level_module.encoder.*`` (``SwinBackbone`` / ``ResNetBackbone``)               ``encoder.*`` (converted by
                                                                                       :func:`convert_hf_swin` /
                                                                                       :func:`convert_hf_resnet`)
``pixel_level_module.decoder.input_projections.{i}``                                   ``pixel_decoder.input_proj.{i}``
``pixel_level_module.decoder.level_embed``                                             ``pixel_decoder.level_embed``
``pixel_level_module.decoder.encoder.layers.{l}.self_attn.*``                          ``pixel_decoder.layers.{l}.self_attn.*``
``...layers.{l}.self_attn_layer_norm`` / ``fc1`` / ``fc2`` / ``final_layer_norm``      ``...norm1`` / ``linear1`` /
                                                                                       ``linear2`` / ``norm2``
``pixel_level_module.decoder.adapter_{n}`` / ``layer_{n}``                             ``pixel_decoder.lateral_convs.{n-1}``
                                                                                       / ``output_convs.{n-1}``
``pixel_level_module.decoder.mask_projection``                                         ``pixel_decoder.mask_features``
``transformer_module.queries_features`` / ``queries_embedder`` / ``level_embed``       ``predictor.query_feat`` /
                                                                                       ``query_embed`` / ``level_embed``
``transformer_module.input_projections.{i}``                                           ``predictor.input_proj.{i}``
``transformer_module.decoder.layers.{l}.cross_attn.*`` / ``cross_attn_layer_norm``     ``predictor.layers.{l}.cross_attn.*``
                                                                                       / ``norm1``
``...layers.{l}.self_attn.{q,k,v}_proj`` / ``out_proj`` / ``self_attn_layer_norm``     ``...self_attn.in_proj_*`` (q, k, v
                                                                                       concatenated) / ``out_proj`` /
                                                                                       ``norm2``
``...layers.{l}.fc1`` / ``fc2`` / ``final_layer_norm``                                 ``...linear1`` / ``linear2`` / ``norm3``
``transformer_module.decoder.layernorm``                                               ``predictor.decoder_norm``
``transformer_module.decoder.mask_predictor.mask_embedder.{i}.0``                      ``predictor.mask_embed.layers.{i}``
``class_predictor``                                                                    ``predictor.class_embed``
``criterion.empty_weight``                                                             dropped (a loss buffer)
=====================================================================================  ===================================

transformers 5's ``SwinBackbone`` also holds the final ``layernorm`` of the ``SwinModel`` it wraps, which its forward
never uses: it is dropped and reported (our encoder has none). HF's DETR-style self-attention scales the query after
its bias, ``nn.MultiheadAttention`` inside the attention product: the same function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert.resnet import convert_hf_resnet, is_hf_resnet_state_dict
from maskworks.convert.swin import convert_hf_swin, is_hf_swin_state_dict

__all__ = ["convert_hf_mask2former", "is_hf_mask2former_state_dict"]

StateDict = dict[str, torch.Tensor]

_ENCODER = "pixel_level_module.encoder."
_PIXEL = "pixel_level_module.decoder."
_TRANSFORMER = "transformer_module."
_PIXEL_LAYER_PARTS = {
    "self_attn.": "self_attn.",
    "self_attn_layer_norm.": "norm1.",
    "fc1.": "linear1.",
    "fc2.": "linear2.",
    "final_layer_norm.": "norm2.",
}
_DECODER_LAYER_PARTS = {
    "cross_attn.": "cross_attn.",
    "cross_attn_layer_norm.": "norm1.",
    "self_attn.out_proj.": "self_attn.out_proj.",
    "self_attn_layer_norm.": "norm2.",
    "fc1.": "linear1.",
    "fc2.": "linear2.",
    "final_layer_norm.": "norm3.",
}
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def is_hf_mask2former_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``Mask2FormerForUniversalSegmentation`` state dict (``class_predictor.weight`` and
    ``model.pixel_level_module.*`` keys)."""
    return "class_predictor.weight" in state_dict and any(
        k.startswith("model." + _PIXEL) or k.startswith(_PIXEL) for k in state_dict
    )


def _rename(key: str, parts: Mapping[str, str]) -> str | None:
    part = next((p for p in parts if key.startswith(p)), None)
    return None if part is None else parts[part] + key[len(part) :]


def convert_hf_mask2former(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """HF ``Mask2FormerForUniversalSegmentation`` state dict -> maskworks ``Mask2Former`` keys (table in the module
    docstring).

    Returns:
        The converted state dict and the dropped keys (HF names).

    Raises:
        ValueError: a backbone that is neither an HF Swin nor an HF ResNet, or a key outside the layout.
    """
    if not is_hf_mask2former_state_dict(state_dict):
        raise ValueError("not an HF Mask2FormerForUniversalSegmentation state dict (class_predictor.weight ...)")
    out: StateDict = {}
    dropped: list[str] = []
    backbone: StateDict = {}
    qkv: dict[tuple[str, str], list[torch.Tensor | None]] = {}
    for raw_key, value in state_dict.items():
        key = raw_key.removeprefix("model.")
        if key.startswith(_ENCODER):
            backbone[key[len(_ENCODER) :]] = value
            continue
        if key.startswith("class_predictor."):
            out["predictor.class_embed." + key[len("class_predictor.") :]] = value
            continue
        if key.startswith("criterion."):
            dropped.append(raw_key)
            continue
        new = None
        if key.startswith(_PIXEL):
            rest = key[len(_PIXEL) :]
            if rest.startswith("input_projections."):
                new = "pixel_decoder.input_proj." + rest[len("input_projections.") :]
            elif rest == "level_embed":
                new = "pixel_decoder.level_embed"
            elif rest.startswith("mask_projection."):
                new = "pixel_decoder.mask_features." + rest[len("mask_projection.") :]
            elif m := re.fullmatch(r"(adapter|layer)_(\d+)\.(.+)", rest):
                kind = "lateral_convs" if m.group(1) == "adapter" else "output_convs"
                new = f"pixel_decoder.{kind}.{int(m.group(2)) - 1}.{m.group(3)}"
            elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest):
                part = _rename(m.group(2), _PIXEL_LAYER_PARTS)
                new = None if part is None else f"pixel_decoder.layers.{m.group(1)}.{part}"
        elif key.startswith(_TRANSFORMER):
            rest = key[len(_TRANSFORMER) :]
            if rest.startswith("queries_features."):
                new = "predictor.query_feat." + rest[len("queries_features.") :]
            elif rest.startswith("queries_embedder."):
                new = "predictor.query_embed." + rest[len("queries_embedder.") :]
            elif rest.startswith("level_embed."):
                new = "predictor.level_embed." + rest[len("level_embed.") :]
            elif rest.startswith("input_projections."):
                new = "predictor.input_proj." + rest[len("input_projections.") :]
            elif rest.startswith("decoder.layernorm."):
                new = "predictor.decoder_norm." + rest[len("decoder.layernorm.") :]
            elif m := re.fullmatch(r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)", rest):
                new = f"predictor.mask_embed.layers.{m.group(1)}.{m.group(2)}"
            elif m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", rest):
                q = _QKV.fullmatch(m.group(2))
                if q:
                    slot = qkv.setdefault((m.group(1), q.group(2)), [None, None, None])
                    slot["qkv".index(q.group(1))] = value
                    continue
                part = _rename(m.group(2), _DECODER_LAYER_PARTS)
                new = None if part is None else f"predictor.layers.{m.group(1)}.{part}"
        if new is None:
            raise ValueError(f"unexpected key {raw_key!r} in an HF Mask2Former state dict")
        out[new] = value
    for (layer, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"decoder layer {layer}: the self-attention q / k / v {kind}s must all be present")
        out[f"predictor.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(parts, 0)
    if is_hf_swin_state_dict(backbone):
        enc, enc_dropped = convert_hf_swin(backbone, in_channels=in_channels)
        for key in list(enc):
            if key.startswith("norm."):  # SwinModel's final norm, unused by SwinBackbone's forward
                del enc[key]
                suffix = "layernorm." + key[len("norm.") :]
                enc_dropped.append(next((k for k in backbone if k.endswith(suffix)), key))
    elif is_hf_resnet_state_dict(backbone):
        enc, enc_dropped = convert_hf_resnet(backbone, in_channels=in_channels)
    else:
        raise ValueError(
            "the backbone of this HF Mask2Former checkpoint is neither Swin nor ResNet (e.g. "
            f"{next(iter(backbone), None)!r}); only those two are supported"
        )
    dropped.extend("model." + _ENCODER + k for k in enc_dropped)
    out.update({"encoder." + k: v for k, v in enc.items()})
    return out, dropped
