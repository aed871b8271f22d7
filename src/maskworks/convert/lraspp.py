"""torchvision LR-ASPP checkpoints -> :class:`maskworks.models.semantic.lraspp.LRASPP` keys.

torchvision's ``lraspp_mobilenet_v3_large`` is ``backbone`` (an ``IntermediateLayerGetter`` over the dilated
MobileNetV3's ``features``: children ``0`` .. ``16``) and ``classifier`` (``LRASPPHead``: ``cbr.0`` conv, ``cbr.1``
BN, ``scale.1`` conv, ``low_classifier``, ``high_classifier``). maskworks' LR-ASPP holds the whole MobileNetV3 as
``encoder`` (torchvision's ``features.*`` keys) and the same head as ``classifier``, so the mapping is a renaming:

==========================  ====================================
torchvision                  maskworks
==========================  ====================================
``backbone.{i}.*``           ``encoder.features.{i}.*``
``classifier.*``             ``classifier.*``
==========================  ====================================
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_torchvision_lraspp", "is_torchvision_lraspp_state_dict"]

_FIRST_CONV = "encoder.features.0.0.weight"


def is_torchvision_lraspp_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a torchvision ``lraspp_*`` state dict (``backbone.*`` and an ``LRASPPHead`` at ``classifier``)."""
    return (
        "classifier.cbr.0.weight" in state_dict
        and "classifier.scale.1.weight" in state_dict
        and any(k.startswith("backbone.") for k in state_dict)
    )


def convert_torchvision_lraspp(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision ``lraspp_mobilenet_v3_large`` state dict -> maskworks ``lraspp_mobilenet_v3_large`` keys.

    Args:
        state_dict: the torchvision state dict.
        in_channels: input channels of the target model; the stem conv is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (any key outside ``backbone.*`` / ``classifier.*``).
    """
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            out["encoder.features." + key[len("backbone.") :]] = value
        elif key.startswith("classifier."):
            out[key] = value
        else:
            dropped.append(key)
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped
