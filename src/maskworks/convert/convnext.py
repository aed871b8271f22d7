"""timm ConvNeXt V1 / V2 checkpoints -> maskworks :class:`~maskworks.backbones.convnext.ConvNeXt` keys.

The keys are the same; the classifier (``head.*``: its norm and fc) is dropped and the first convolution
(``stem.0.weight``) is adapted when the target takes another number of input channels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_timm_convnext", "is_convnext_state_dict"]

_FIRST_CONV = "stem.0.weight"


def is_convnext_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a timm / maskworks ConvNeXt state dict (keys ``stem.0.weight``, ``stages.0.blocks.0.conv_dw...``)."""
    return _FIRST_CONV in state_dict and any(k.startswith("stages.0.blocks.0.conv_dw.") for k in state_dict)


def convert_timm_convnext(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm ``convnext*`` / ``convnextv2*`` state dict -> backbone keys.

    Args:
        state_dict: the timm state dict (full model or ``features_only``).
        in_channels: input channels of the target backbone; ``stem.0.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (the ``head.*`` classifier).
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    dropped = [k for k in state_dict if k.startswith("head.")]
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped
