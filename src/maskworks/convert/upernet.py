"""Hugging Face ``UperNetForSemanticSegmentation`` checkpoints -> maskworks :class:`~maskworks.models.semantic.UPerNet`.

HF keys (``openmmlab/upernet-swin-*``, ``openmmlab/upernet-convnext-*``):

* ``backbone.*``: an HF ``SwinBackbone`` (``backbone.swin.*`` in transformers 5, ``backbone.embeddings.*`` /
  ``backbone.encoder.*`` in the hub files) or ``ConvNextBackbone``, plus ``backbone.hidden_states_norms.stageN``.
  The prefix is stripped and the keys converted by :func:`~maskworks.convert.swin.convert_hf_swin` or
  :func:`~maskworks.convert.convnext.convert_hf_convnext` (``hidden_states_norms.stageN`` -> ``stage_norms.{N-1}``),
  then put under ``encoder.``. The final ``backbone.swin.layernorm`` is dropped: transformers 5's ``SwinBackbone``
  wraps a ``SwinModel`` whose final norm its forward never uses (the hub files have none, nor has our encoder).
* ``decode_head.*`` / ``auxiliary_head.*``: the mmseg layout under HF names; ``batch_norm`` -> ``bn`` and
  ``classifier`` -> ``conv_seg`` give our (= mmseg's) names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from maskworks.convert.convnext import convert_hf_convnext, is_hf_convnext_state_dict
from maskworks.convert.swin import convert_hf_swin, is_hf_swin_state_dict

__all__ = ["convert_hf_upernet", "is_hf_upernet_state_dict"]

StateDict = dict[str, torch.Tensor]

_HEADS = ("decode_head.", "auxiliary_head.")
_HEAD_RENAMES = ((".batch_norm.", ".bn."), (".classifier.", ".conv_seg."))


def is_hf_upernet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``UperNetForSemanticSegmentation`` state dict (``decode_head.classifier.weight`` and
    ``backbone.*`` keys; mmseg's and our own files name the classifier ``conv_seg``)."""
    return "decode_head.classifier.weight" in state_dict and any(k.startswith("backbone.") for k in state_dict)


def convert_hf_upernet(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[StateDict, list[str]]:
    """HF ``UperNetForSemanticSegmentation`` state dict -> maskworks ``UPerNet`` keys.

    Args:
        state_dict: the HF state dict (Swin or ConvNeXt backbone).
        in_channels: input channels of the target; the backbone converter adapts the patch embedding when it
            differs.
        model: the target ``UPerNet``, optional; its ``encoder`` is passed to the ConvNeXt converter (1x1-conv MLPs
            of ``conv_mlp`` backbones).

    Returns:
        The converted state dict and the dropped keys (HF names): keys outside ``backbone`` / the two heads,
        those the backbone converter drops, and the backbone's unused final norm (``backbone.swin.layernorm.*``).

    Raises:
        ValueError: a ``backbone`` that is neither an HF Swin (V1 / V2) nor an HF ConvNeXt (V1 / V2).
    """
    backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        if not key.startswith(_HEADS):
            dropped.append(key)
            continue
        for old, new in _HEAD_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    if backbone:
        if is_hf_swin_state_dict(backbone):
            enc, enc_dropped = convert_hf_swin(backbone, in_channels=in_channels)
        elif is_hf_convnext_state_dict(backbone):
            encoder = getattr(model, "encoder", None)
            enc, enc_dropped = convert_hf_convnext(backbone, in_channels=in_channels, model=encoder)
        else:
            raise ValueError(
                "the backbone of this HF UperNet checkpoint is neither Swin nor ConvNeXt (e.g. "
                f"{next(iter(backbone))!r}); only those two are supported"
            )
        dropped.extend("backbone." + k for k in enc_dropped)
        for key, value in enc.items():
            if key.startswith("norm."):  # SwinModel's final norm (transformers 5's SwinBackbone): never used
                suffix = "layernorm." + key[len("norm.") :]
                dropped.append(next(("backbone." + k for k in backbone if k.endswith(suffix)), "backbone." + key))
                continue
            out["encoder." + key] = value
    return out, dropped
