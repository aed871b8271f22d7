"""timm Vision Transformer checkpoints -> :class:`maskworks.backbones.vit.VisionTransformer` keys.

:class:`~maskworks.backbones.vit.VisionTransformer` names its parameters exactly as timm's
``vision_transformer.VisionTransformer`` (``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj.*``,
``norm_pre.*``, ``blocks.{i}.{norm1,attn.qkv,attn.q_norm,attn.k_norm,attn.proj,ls1.gamma,norm2,mlp.fc1,
mlp.fc2,ls2.gamma}.*``, ``norm.*``, ``fc_norm.*``, ``head.*``), so the key mapping is the identity. What
differs between a checkpoint and a target model is handled here:

* DataParallel / DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes are stripped, and a
  ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper is unwrapped;
* with a target model: position table and patch kernel are resampled to its grid and patch size
  (:func:`~maskworks.backbones.vit.checkpoint_filter_fn`), the patch kernel is adapted to its input channels,
  and a classifier it cannot take (no head, or another class count) is dropped and reported;
* ``pre_logits.*`` (a layer of early timm ViTs, unused by current ones) is dropped and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn as nn

from maskworks.backbones.vit import VisionTransformer, checkpoint_filter_fn
from maskworks.convert._common import unwrap_state_dict
from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_timm_vit", "is_timm_vit_state_dict"]

log = logging.getLogger(__name__)

_PATCH_KERNEL = "patch_embed.proj.weight"


def is_timm_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a timm-layout ViT state dict (``patch_embed.proj.weight`` and ``blocks.0.attn.qkv.weight``)."""
    keys = unwrap_state_dict(state_dict)
    return _PATCH_KERNEL in keys and "blocks.0.attn.qkv.weight" in keys


def convert_timm_vit(
    state_dict: Mapping[str, torch.Tensor], model: VisionTransformer | None = None, in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm ``vit_*`` state dict -> :class:`~maskworks.backbones.vit.VisionTransformer` keys.

    Args:
        state_dict: the timm state dict (optionally wrapped or prefixed, see the module docstring).
        model: the target; when given, ``pos_embed`` / the patch kernel are resampled to its grid and patch size,
            the patch kernel is adapted to its ``in_channels`` and an incompatible head is dropped.
        in_channels: input channels of the target when no ``model`` is given (the patch kernel is adapted).

    Returns:
        The converted state dict and the dropped keys.
    """
    converted = unwrap_state_dict(state_dict)
    dropped = sorted(k for k in converted if k.startswith("pre_logits."))
    for key in dropped:
        del converted[key]
    if model is not None:
        converted = checkpoint_filter_fn(converted, model)
        in_channels = model.patch_embed.proj.in_channels
        head = model.get_classifier()
        for key in [k for k in converted if k.startswith("head.")]:
            param = getattr(head, key[len("head.") :], None) if isinstance(head, nn.Linear) else None
            if param is None or param.shape != converted[key].shape:
                dropped.append(key)
                del converted[key]
        if any(k.startswith("head.") for k in dropped):
            log.info("dropped the checkpoint classifier: the target head does not take it")
    if in_channels is not None and _PATCH_KERNEL in converted and converted[_PATCH_KERNEL].ndim == 4:
        converted[_PATCH_KERNEL] = adapt_input_conv(converted[_PATCH_KERNEL], in_channels)
    return converted, dropped
