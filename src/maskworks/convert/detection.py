"""torchvision detection checkpoints (Mask R-CNN / Faster R-CNN with FPN) -> :mod:`maskworks.models.instance` keys.

maskworks' Mask R-CNN models are built from torchvision's detection modules with the same attribute names
(``backbone.body``, ``backbone.fpn``, ``rpn``, ``roi_heads.box_*``, ``roi_heads.mask_*``) and our ResNet /
MobileNetV3 bodies have torchvision's keys, so a torchvision state dict mostly passes through. The converter
handles what can still differ:

* the older torchvision layouts (checkpoints saved before the FPN and mask head used ``Conv2dNormActivation``):
  ``backbone.fpn.{inner,layer}_blocks.{i}.{weight,bias}`` -> ``...{i}.0.{weight,bias}`` and
  ``roi_heads.mask_head.mask_fcn{i}.{weight,bias}`` -> ``roi_heads.mask_head.{i-1}.0.{weight,bias}``, the renames
  torchvision's own ``_load_from_state_dict`` hooks make;
* another input channel count: the stem convolution (the first 4-D ``backbone.body.*`` weight) is adapted as for
  the bare backbones (:func:`maskworks.convert.resnet.adapt_input_conv`);
* another class count (fine-tuning a COCO checkpoint on K classes, the usual head replacement): when the target
  model has another ``num_classes``, the class-specific predictor tensors (``roi_heads.box_predictor.*``,
  ``roi_heads.mask_predictor.mask_fcn_logits.*``) are dropped and reported, the rest loads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from maskworks.convert.resnet import adapt_input_conv

__all__ = [
    "convert_torchvision_detection",
    "is_torchvision_detection_state_dict",
    "is_torchvision_mask_rcnn_state_dict",
]

_MASK_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits.weight"
_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"
_CLASS_SPECIFIC = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
_OLD_FPN = re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$")
_OLD_MASK_HEAD = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")


def is_torchvision_detection_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a torchvision R-CNN with FPN (Faster / Mask R-CNN): ``backbone.fpn.*``, ``rpn.head.*`` and
    ``roi_heads.*`` keys (maskworks' Mask R-CNN state dicts are the same layout)."""
    return (
        any(k.startswith("backbone.fpn.") for k in state_dict)
        and any(k.startswith("rpn.head.") for k in state_dict)
        and any(k.startswith("roi_heads.") for k in state_dict)
    )


def is_torchvision_mask_rcnn_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a torchvision Mask R-CNN with FPN (``roi_heads.mask_predictor.mask_fcn_logits.weight`` plus the
    detection keys of :func:`is_torchvision_detection_state_dict`)."""
    return _MASK_LOGITS in state_dict and is_torchvision_detection_state_dict(state_dict)


def _rename(key: str) -> str:
    if m := _OLD_FPN.match(key):
        return f"{m.group(1)}.0.{m.group(2)}"
    if m := _OLD_MASK_HEAD.match(key):
        return f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
    return key


def convert_torchvision_detection(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A torchvision ``maskrcnn_*`` / ``fasterrcnn_*_fpn`` state dict -> maskworks Mask R-CNN keys.

    Args:
        state_dict: the torchvision state dict (current or pre-``Conv2dNormActivation`` key layout).
        in_channels: input channels of the target; the stem conv is adapted when it differs.
        model: the target; when its ``num_classes`` differs from the checkpoint's, the class-specific predictor
            tensors are dropped (fine-tuning on another label set).

    Returns:
        The converted state dict and the dropped keys.
    """
    out = {_rename(k): v for k, v in state_dict.items()}
    dropped: list[str] = []
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and _CLS_SCORE in out and out[_CLS_SCORE].shape[0] != num_classes:
        dropped = [k for k in out if k.startswith(_CLASS_SPECIFIC)]
        out = {k: v for k, v in out.items() if k not in dropped}
    if in_channels is not None:
        stem = next((k for k, v in out.items() if k.startswith("backbone.body.") and v.ndim == 4), None)
        if stem is not None and out[stem].shape[1] != in_channels:
            out[stem] = adapt_input_conv(out[stem], in_channels)
    return out, dropped
