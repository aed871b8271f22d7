"""torchvision DeepLabv3 checkpoints -> :class:`maskworks.models.semantic.deeplab.DeepLabV3` keys.

torchvision's ``deeplabv3_resnet50`` / ``deeplabv3_resnet101`` are ``backbone`` (a ResNet with
``layer3`` / ``layer4`` dilated, output stride 8, ``fc`` removed), ``classifier`` (``DeepLabHead``:
``0`` ASPP, ``1`` 3x3 conv, ``2`` BN, ``3`` ReLU, ``4`` 1x1 classifier conv) and optionally
``aux_classifier`` (``FCNHead`` on ``layer3``). maskworks' DeepLabV3 uses smp's layout, so the
mapping is a pure renaming:

===========================  =================================
torchvision                   maskworks (= smp 0.6 DeepLabV3)
===========================  =================================
``backbone.*``                ``encoder.*``
``classifier.0.*`` (ASPP)     ``decoder.aspp.*``
``classifier.1.*``            ``decoder.conv.*``
``classifier.2.*``            ``decoder.bn.*``
``classifier.4.*``            ``segmentation_head.0.*``
``aux_classifier.*``          ``aux_classifier.*`` (or dropped)
===========================  =================================

The ASPP's inner keys (``convs.0..4``, ``project.0..3``) are the same in both libraries.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_torchvision_deeplabv3", "is_torchvision_deeplab_state_dict"]

# torchvision prefix -> maskworks prefix; first match wins
_RENAMES = (
    ("backbone.", "encoder."),
    ("classifier.0.", "decoder.aspp."),
    ("classifier.1.", "decoder.conv."),
    ("classifier.2.", "decoder.bn."),
    ("classifier.4.", "segmentation_head.0."),
)
_AUX = "aux_classifier."
_FIRST_CONV = "encoder.conv1.weight"


def is_torchvision_deeplab_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a torchvision ``deeplabv3_*`` state dict (``backbone.*`` and an ASPP at ``classifier.0.convs``)."""
    return any(k.startswith("backbone.") for k in state_dict) and any(
        k.startswith("classifier.0.convs.") for k in state_dict
    )


def convert_torchvision_deeplabv3(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, aux: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision ``deeplabv3_resnet50`` / ``deeplabv3_resnet101`` state dict -> maskworks ``deeplabv3`` keys.

    The target is ``create_model("deeplabv3", encoder="resnet50" or "resnet101", output_stride=8,
    aux=...)``, the defaults of which match torchvision (rates 12/24/36, first block of a
    dilated stage at the previous rate).

    Args:
        state_dict: the torchvision state dict.
        in_channels: input channels of the target model; the first conv is adapted when it differs.
        aux: the target has an auxiliary head (``aux=True``): keep ``aux_classifier.*``;
            otherwise those keys are dropped and reported.

    Returns:
        The converted state dict and the dropped keys (the auxiliary head when ``aux`` is false,
        and any key outside the layout above).
    """
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(_AUX):
            new = key if aux else None
        else:
            new = next((dst + key[len(src) :] for src, dst in _RENAMES if key.startswith(src)), None)
        if new is None or new.startswith("encoder.fc."):
            dropped.append(key)
        else:
            out[new] = value
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped
