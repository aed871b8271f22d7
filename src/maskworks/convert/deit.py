"""DeiT checkpoints (Touvron et al., ICML 2021) -> :mod:`maskworks.backbones.deit` keys.

Two sources:

* **timm / official DeiT release** (``facebookresearch/deit`` ``.pth`` files hold ``{"model": state_dict}``):
  the names are ours already (``cls_token``, ``dist_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.{i}.attn.qkv``, ``norm``, ``head``, ``head_dist``). :func:`convert_timm_deit` unwraps, strips
  ``module.`` / ``_orig_mod.``, maps DeiT-III ``gamma_{1,2}`` to ``ls{1,2}.gamma`` and, given a target model,
  resamples ``pos_embed`` / the patch kernel (:func:`maskworks.backbones.vit.checkpoint_filter_fn`), drops heads
  the target cannot take, and drops the distillation token (and its ``pos_embed`` row) for a plain ViT target.
* **HF transformers** ``DeiTForImageClassificationWithTeacher`` / ``DeiTForImageClassification`` / ``DeiTModel``:
  :func:`convert_hf_deit` renames the keys and fuses the separate query / key / value projections into ``qkv``.
  Both layouts of ``transformers/models/deit/modeling_deit.py`` are read: the hub checkpoints (transformers 4:
  ``deit.encoder.layer.{i}.attention.attention.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``) and transformers 5 modules (``deit.layers.{i}.attention.{q,k,v}_proj``,
  ``attention.o_proj``, ``mlp.fc1``, ``mlp.fc2``).

HF DeiT configs default to ``layer_norm_eps=1e-12`` while ours is ``1e-6``; build the target with
:func:`deit_kwargs_from_hf_config` (it passes the config's eps) for exact parity.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from maskworks.backbones.vit import VisionTransformer, checkpoint_filter_fn
from maskworks.convert.resnet import adapt_input_conv
from maskworks.convert.vit import convert_timm_vit

__all__ = ["convert_hf_deit", "convert_timm_deit", "deit_kwargs_from_hf_config", "is_hf_deit_state_dict"]

log = logging.getLogger(__name__)

_PATCH_KERNEL = "patch_embed.proj.weight"
_HYBRID_STEM_CONV = "patch_embed.backbone.stem.conv.weight"  # R50+ViT (timm's HybridEmbed over a ResNetV2)

# HF name (after the "deit." prefix) -> ours, for the non-layer keys
_HF_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_HEADS = {"cls_classifier": "head", "distillation_classifier": "head_dist", "classifier": "head"}

# per-layer HF suffix -> ours; q / k / v are fused separately. Both transformers 4 and 5 layouts.
_HF_LAYER = {
    "attention.output.dense": "attn.proj",  # v4
    "attention.o_proj": "attn.proj",  # v5
    "intermediate.dense": "mlp.fc1",  # v4
    "output.dense": "mlp.fc2",  # v4 (after attention.output.dense has been matched)
    "mlp.fc1": "mlp.fc1",  # v5
    "mlp.fc2": "mlp.fc2",  # v5
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_QKV = {
    "attention.attention.query": 0,  # v4
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,  # v5
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_deit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF DeiT state dict (``[deit.]embeddings.distillation_token`` present)."""
    return any(k in state_dict for k in ("deit.embeddings.distillation_token", "embeddings.distillation_token"))


def convert_hf_deit(
    state_dict: Mapping[str, torch.Tensor],
    model: VisionTransformer | None = None,
    in_channels: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF transformers DeiT state dict -> :class:`~maskworks.backbones.deit.VisionTransformerDistilled` keys.

    Mapping (``i`` = layer; transformers 5 names in brackets):

    * ``deit.embeddings.cls_token`` / ``distillation_token`` / ``position_embeddings`` -> ``cls_token`` /
      ``dist_token`` / ``pos_embed``; ``patch_embeddings.projection`` -> ``patch_embed.proj``;
    * ``deit.encoder.layer.{i}.attention.attention.{query,key,value}`` (``deit.layers.{i}.attention.{q,k,v}_proj``)
      -> ``blocks.{i}.attn.qkv``, concatenated ``[q; k; v]`` along the output dimension;
    * ``attention.output.dense`` (``attention.o_proj``) -> ``attn.proj``; ``intermediate.dense`` / ``output.dense``
      (``mlp.fc1`` / ``mlp.fc2``) -> ``mlp.fc1`` / ``mlp.fc2``; ``layernorm_before`` / ``layernorm_after`` ->
      ``norm1`` / ``norm2``; ``deit.layernorm`` -> ``norm``;
    * ``cls_classifier`` -> ``head``, ``distillation_classifier`` -> ``head_dist``, ``classifier`` (the
      non-distilled ``DeiTForImageClassification``) -> ``head``;
    * dropped: ``embeddings.mask_token``, ``pooler.*``, the masked-image-modelling ``decoder.*``, anything else
      unknown.

    Args:
        state_dict: the HF state dict (with or without the ``deit.`` prefix).
        model: optional target; ``pos_embed`` / the patch kernel are then resampled to its grid / patch size.
        in_channels: input channels of the target; the patch kernel is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key[len("deit.") :] if key.startswith("deit.") else key
        if name in _HF_EMBED:
            out[_HF_EMBED[name]] = value
            continue
        head, _, param = name.rpartition(".")
        if head in _HF_HEADS and param in ("weight", "bias"):
            out[f"{_HF_HEADS[head]}.{param}"] = value
            continue
        match = _LAYER_RE.match(name)
        if match is None:
            dropped.append(key)
            continue
        layer, module, param = int(match.group(1)), match.group(2), match.group(3)
        if module in _HF_QKV:
            qkv.setdefault((layer, param), {})[_HF_QKV[module]] = value
        elif module in _HF_LAYER:
            out[f"blocks.{layer}.{_HF_LAYER[module]}.{param}"] = value
        else:
            dropped.append(key)
    for (layer, param), parts in sorted(qkv.items()):
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"layer {layer}: incomplete query/key/value {param}s in the HF checkpoint")
        out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)  # (3 * D, ...)
    if dropped:
        log.info("convert_hf_deit dropped %d keys: %s", len(dropped), dropped[:8])
    if model is not None:
        out = checkpoint_filter_fn(out, model)
        in_channels = model.patch_embed.proj.in_channels
    if in_channels is not None and _PATCH_KERNEL in out:
        out[_PATCH_KERNEL] = adapt_input_conv(out[_PATCH_KERNEL], in_channels)
    return out, dropped


def deit_kwargs_from_hf_config(config: Any) -> dict[str, Any]:
    """Constructor kwargs of :class:`~maskworks.backbones.deit.VisionTransformerDistilled` equivalent to an HF
    ``DeiTConfig``: sizes, heads, MLP ratio, ``qkv_bias``, classes and the LayerNorm eps. Dropout rates are not
    mapped (HF places its hidden dropout differently; both are 0 in the released configs).

    Args:
        config: a ``transformers.DeiTConfig`` (or any object with its attributes).

    Returns:
        Keyword arguments for :class:`~maskworks.backbones.deit.VisionTransformerDistilled`.
    """
    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"only hidden_act='gelu' (exact GELU) is supported, got {config.hidden_act!r}")
    mlp_ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * mlp_ratio) != config.intermediate_size:
        raise ValueError(
            f"intermediate_size {config.intermediate_size} is not reproduced by int(hidden_size * mlp_ratio) "
            f"for hidden_size {config.hidden_size}"
        )
    return {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "in_channels": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": bool(getattr(config, "qkv_bias", True)),
        "num_classes": int(getattr(config, "num_labels", 0) or 0),
        "norm_layer": partial(nn.LayerNorm, eps=config.layer_norm_eps),
    }


def convert_timm_deit(
    state_dict: Mapping[str, torch.Tensor],
    model: VisionTransformer | None = None,
    in_channels: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm / official DeiT state dict -> our keys (the identity, plus the adaptations below).

    * ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and ``module.`` / ``_orig_mod.`` prefixes are removed,
      ``pre_logits.*`` dropped, DeiT-III ``blocks.{i}.gamma_{1,2}`` renamed ``blocks.{i}.ls{1,2}.gamma``.
    * With ``model``: ``pos_embed`` and the patch kernel are resampled to its grid and patch size through the
      core's :func:`~maskworks.backbones.vit.checkpoint_filter_fn` (prefix rows kept); ``head.*`` /
      ``head_dist.*`` that the model cannot take (no such head, other class count) are dropped; a distilled
      checkpoint loaded into a plain ViT loses ``dist_token``, ``head_dist`` and the distillation row of
      ``pos_embed``; the first convolution (the patch kernel, or a hybrid's CNN stem) is adapted to the model's
      input channels.

    Args:
        state_dict: the checkpoint.
        model: optional target model.
        in_channels: input channels of the target when no ``model`` is given.

    Returns:
        The converted state dict and the dropped keys.
    """
    converted, dropped = convert_timm_vit(state_dict)
    converted = {re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k): v for k, v in converted.items()}
    if model is not None:
        if "dist_token" in converted and getattr(model, "dist_token", None) is None:
            dropped.append("dist_token")
            del converted["dist_token"]
            pos = converted.get("pos_embed")
            if pos is not None and not model.no_embed_class:
                converted["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)  # drop the [DIST] row
        converted = checkpoint_filter_fn(converted, model)
        for prefix in ("head.", "head_dist."):
            module = getattr(model, prefix[:-1], None)
            for key in [k for k in converted if k.startswith(prefix)]:
                param = getattr(module, key[len(prefix) :], None) if isinstance(module, nn.Linear) else None
                if param is None or param.shape != converted[key].shape:
                    dropped.append(key)
                    del converted[key]
        in_channels = getattr(model, "in_channels", None) or model.patch_embed.proj.in_channels
    # the convolution that sees the image: a hybrid's CNN stem (its patch kernel takes the CNN's channels)
    first = _HYBRID_STEM_CONV if _HYBRID_STEM_CONV in converted else _PATCH_KERNEL
    if in_channels is not None and first in converted and converted[first].ndim == 4:
        converted[first] = adapt_input_conv(converted[first], in_channels)
    return converted, dropped
