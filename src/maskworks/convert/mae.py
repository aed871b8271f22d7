"""HF transformers ``ViTMAEForPreTraining`` checkpoints -> :class:`maskworks.models.mae.MaskedAutoencoderViT` keys
(He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

Both key layouts of HF are read: the one of the hub checkpoints (``facebook/vit-mae-*``, transformers 4) and the
one of transformers 5 models in memory, which renames the layer modules:

=================================================================  ==========================================
HF (legacy | transformers 5)                                       maskworks / official MAE
=================================================================  ==========================================
``vit.embeddings.cls_token``                                       ``cls_token``
``vit.embeddings.position_embeddings``                             ``pos_embed``
``vit.embeddings.patch_embeddings.projection.*``                   ``patch_embed.proj.*``
``vit.encoder.layer.{i}.`` | ``vit.layers.{i}.``                   ``blocks.{i}.``
``decoder.decoder_layers.{i}.``                                    ``decoder_blocks.{i}.``
  ``layernorm_before.*`` / ``layernorm_after.*``                   ``norm1.*`` / ``norm2.*``
  ``attention.attention.{query,key,value}.*`` | ``attention.{q,k,v}_proj.*``   ``attn.qkv.*`` (concatenated q, k, v)
  ``attention.output.dense.*`` | ``attention.o_proj.*``            ``attn.proj.*``
  ``intermediate.dense.*`` | ``mlp.fc1.*``                         ``mlp.fc1.*``
  ``output.dense.*`` | ``mlp.fc2.*``                               ``mlp.fc2.*``
``vit.layernorm.*``                                                ``norm.*``
``decoder.decoder_embed.*``, ``decoder.mask_token``                ``decoder_embed.*``, ``mask_token``
``decoder.decoder_pos_embed``                                      ``decoder_pos_embed``
``decoder.decoder_norm.*``, ``decoder.decoder_pred.*``             ``decoder_norm.*``, ``decoder_pred.*``
=================================================================  ==========================================

A ``ViTMAEModel`` state dict (no ``vit.`` prefix, no decoder) converts to the encoder keys only. HF builds the same
architecture (pre-norm layers, exact GELU, the same sin-cos tables and masking by ``argsort(noise)``), so with the
same ``noise`` both models give the same mask, ``ids_restore``, predictions and loss; set ``norm_eps`` to the
config's ``layer_norm_eps`` (HF's default is 1e-12, MAE's 1e-6).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert._common import WRAPPER_PREFIXES, strip_prefixes
from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_hf_vitmae", "is_hf_vitmae_state_dict"]

_TOP_LEVEL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
# layer-relative module names, legacy and transformers 5 -> ours ("q" / "k" / "v" are fused afterwards)
_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$")
_PATCH_KERNEL = "patch_embed.proj.weight"


def _strip(key: str) -> str:
    return strip_prefixes(key, (*WRAPPER_PREFIXES, "vit."))


def is_hf_vitmae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``ViTMAEForPreTraining`` / ``ViTMAEModel`` state dict (either key layout)."""
    keys = {_strip(k) for k in state_dict}
    return "embeddings.patch_embeddings.projection.weight" in keys and "embeddings.position_embeddings" in keys


def convert_hf_vitmae(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF ``ViTMAEForPreTraining`` (or ``ViTMAEModel``) state dict -> ``MaskedAutoencoderViT`` keys.

    Args:
        state_dict: the HF state dict, legacy (hub) or transformers-5 layout; ``module.`` prefixes are stripped.
        in_channels: input channels of the target; the patch kernel is adapted when it differs.

    Returns:
        The converted state dict and the sorted keys that have no counterpart (dropped).
    """
    if not is_hf_vitmae_state_dict(state_dict):
        raise ValueError(
            "state_dict is not an HF ViTMAE checkpoint: expected 'vit.embeddings.patch_embeddings.projection.weight' "
            f"and 'vit.embeddings.position_embeddings', got keys like {sorted(state_dict)[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block prefix, weight|bias) -> {q, k, v}
    dropped: list[str] = []
    for raw_key, value in state_dict.items():
        key = _strip(raw_key)
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        match = _LAYER_RE.match(key)
        name = _LAYER.get(match.group(2)) if match else None
        if name is None:
            dropped.append(raw_key)
            continue
        index, kind = match.group(1), match.group(3)
        prefix = f"decoder_blocks.{index}" if key.startswith("decoder.") else f"blocks.{index}"
        if name in ("q", "k", "v"):
            qkv.setdefault((prefix, kind), {})[name] = value
        else:
            out[f"{prefix}.{name}.{kind}"] = value
    for (prefix, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{prefix}: attention {kind} has only {sorted(parts)} of query / key / value")
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3 * D, ...)
    if in_channels is not None and _PATCH_KERNEL in out:
        out[_PATCH_KERNEL] = adapt_input_conv(out[_PATCH_KERNEL], in_channels)
    return out, sorted(dropped)
