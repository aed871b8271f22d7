"""Official TransUNet checkpoints (Beckschen/TransUNet, ``networks/vit_seg_modeling.VisionTransformer``) -> maskworks
:class:`~maskworks.models.semantic.transunet.TransUNet`.

Official keys (``R50-ViT-B_16``; the ViT-only ``ViT-B_16`` lacks the ``hybrid_model`` keys):

* ``transformer.embeddings.hybrid_model.root.{conv,gn}`` -> ``encoder.patch_embed.backbone.stem.{conv,norm}``;
  ``...hybrid_model.body.block{b}.unit{u}.{conv1,conv2,conv3,gn1,gn2,gn3,downsample,gn_proj}`` ->
  ``...backbone.stages.{b-1}.blocks.{u-1}.{conv1,conv2,conv3,norm1,norm2,norm3,downsample.conv,downsample.norm}``.
* ``transformer.embeddings.patch_embeddings`` -> ``encoder.patch_embed.proj``;
  ``transformer.embeddings.position_embeddings`` (patch rows only, no class token) -> ``encoder.pos_embed``.
* ``transformer.encoder.layer.{i}.{attention_norm, ffn_norm, ffn.fc1, ffn.fc2, attn.out}`` ->
  ``encoder.blocks.{i}.{norm1, norm2, mlp.fc1, mlp.fc2, attn.proj}``; the separate ``attn.query / key / value``
  weights and biases are concatenated (in that order) into ``encoder.blocks.{i}.attn.qkv``.
* ``transformer.encoder.encoder_norm`` -> ``encoder.norm``.
* ``decoder.*`` (``conv_more.{0,1}``, ``blocks.{i}.conv{1,2}.{0,1}``) keep their names; ``segmentation_head.0`` ->
  ``segmentation_head``.

The official model must be rebuilt with ``official_cnn=True`` (weight standardisation eps 1e-5, GroupNorm eps 1e-6,
per-channel GroupNorm on the projection shortcuts, symmetric padding, unpadded stem max pool) to compute the same
function as the official code; :func:`convert_transunet_official` only renames.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert._common import unwrap_state_dict

__all__ = ["convert_transunet_official", "is_transunet_official_state_dict"]

StateDict = dict[str, torch.Tensor]

_EMB = "transformer.embeddings."
_RESNET = _EMB + "hybrid_model."
_LAYER = re.compile(r"transformer\.encoder\.layer\.(\d+)\.(.+)")
_UNIT = re.compile(r"body\.block(\d+)\.unit(\d+)\.(\w+)\.(weight|bias)")
_UNIT_RENAMES = {
    "conv1": "conv1",
    "conv2": "conv2",
    "conv3": "conv3",
    "gn1": "norm1",
    "gn2": "norm2",
    "gn3": "norm3",
    "downsample": "downsample.conv",
    "gn_proj": "downsample.norm",
}
_BLOCK_RENAMES = {
    "attention_norm": "norm1",
    "ffn_norm": "norm2",
    "ffn.fc1": "mlp.fc1",
    "ffn.fc2": "mlp.fc2",
    "attn.out": "attn.proj",
}


def is_transunet_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict of the official TransUNet ``VisionTransformer`` (segmentation) module."""
    return "transformer.embeddings.position_embeddings" in state_dict and "decoder.conv_more.0.weight" in state_dict


def _resnet_key(rest: str) -> str:
    root = {
        "root.conv.weight": "stem.conv.weight",
        "root.gn.weight": "stem.norm.weight",
        "root.gn.bias": "stem.norm.bias",
    }
    if rest in root:
        return "encoder.patch_embed.backbone." + root[rest]
    m = _UNIT.fullmatch(rest)
    if m is None or m.group(3) not in _UNIT_RENAMES:
        raise KeyError(f"unknown official TransUNet ResNet key {_RESNET + rest!r}")
    block, unit, name, param = m.groups()
    return f"encoder.patch_embed.backbone.stages.{int(block) - 1}.blocks.{int(unit) - 1}.{_UNIT_RENAMES[name]}.{param}"


def convert_transunet_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename an official TransUNet state dict (``net.state_dict()`` of ``vit_seg_modeling.VisionTransformer``,
    optionally wrapped in ``module.`` / ``state_dict``) to :class:`~maskworks.models.semantic.transunet.TransUNet`'s
    keys (see the module docstring). Every official key is used; an unknown key raises ``KeyError``.

    Args:
        state_dict: the official module's state dict.

    Returns:
        Our state dict (``load_state_dict(strict=True)`` into a ``TransUNet`` of the same configuration).
    """
    sd = unwrap_state_dict(state_dict)
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(_RESNET):
            out[_resnet_key(key[len(_RESNET) :])] = value
        elif key.startswith(_EMB + "patch_embeddings."):
            out["encoder.patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key == _EMB + "position_embeddings":
            out["encoder.pos_embed"] = value
        elif key.startswith("transformer.encoder.encoder_norm."):
            out["encoder.norm." + key.rsplit(".", 1)[1]] = value
        elif (m := _LAYER.fullmatch(key)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            module, param = rest.rsplit(".", 1)
            if module in ("attn.query", "attn.key", "attn.value"):
                qkv.setdefault(i, {})[f"{module[5:]}.{param}"] = value
            elif module in _BLOCK_RENAMES:
                out[f"encoder.blocks.{i}.{_BLOCK_RENAMES[module]}.{param}"] = value
            else:
                raise KeyError(f"unknown official TransUNet transformer key {key!r}")
        elif key.startswith("decoder."):
            out[key] = value
        elif key.startswith("segmentation_head.0."):
            out["segmentation_head." + key.rsplit(".", 1)[1]] = value
        else:
            raise KeyError(f"unknown official TransUNet key {key!r}")
    for i, parts in sorted(qkv.items()):
        for param in ("weight", "bias"):
            names = [f"{p}.{param}" for p in ("query", "key", "value")]
            missing = [n for n in names if n not in parts]
            if missing:
                raise KeyError(f"transformer.encoder.layer.{i}: missing attn.{missing} for the fused qkv projection")
            out[f"encoder.blocks.{i}.attn.qkv.{param}"] = torch.cat([parts[n] for n in names], dim=0)
    return out
