"""MobileNetV2 / V3 checkpoints of torchvision and smp -> :mod:`maskworks.backbones.mobilenet` keys.

:class:`~maskworks.backbones.mobilenet.MobileNetV2` and :class:`~maskworks.backbones.mobilenet.MobileNetV3` name
their parameters exactly as torchvision's ``features.*`` (``features.0.0`` stem conv, ``features.i.conv.j`` /
``features.i.block.j`` blocks, ``...fc1`` / ``fc2`` squeeze-excitation, last 1x1 conv). The mapping is therefore
the identity on ``features.*``; the classifier (``classifier.*``, V2: ``classifier.1``, V3: ``classifier.0`` /
``classifier.3``) is dropped and reported. smp's ``mobilenet_v2`` encoder is a torchvision ``MobileNetV2`` whose
classifier is deleted, so its state dict has the same ``features.*`` keys and goes through the same function
(an smp *model* checkpoint, ``encoder.features.*``, is the business of :func:`maskworks.convert.smp.convert_smp`).
The stem weight ``features.0.0.weight`` is adapted when the target takes another channel count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_torchvision_mobilenet", "is_mobilenet_state_dict"]

_FIRST_CONV = "features.0.0.weight"


def is_mobilenet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a bare torchvision / smp-encoder / maskworks MobileNetV2 or V3 state dict.

    Recognised by the stem conv ``features.0.0.weight`` and block keys ``features.1.conv.`` (V2) or
    ``features.1.block.`` (V3).
    """
    return _FIRST_CONV in state_dict and any(
        k.startswith(("features.1.conv.", "features.1.block.")) for k in state_dict
    )


def convert_torchvision_mobilenet(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision ``mobilenet_v2`` / ``mobilenet_v3_*`` (or smp ``mobilenet_v2`` encoder) state dict -> backbone keys.

    Args:
        state_dict: the torchvision (or smp encoder) state dict.
        in_channels: input channels of the target backbone; ``features.0.0.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (the ``classifier.*`` head).
    """
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            dropped.append(key)
        else:
            out[key] = value
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped
