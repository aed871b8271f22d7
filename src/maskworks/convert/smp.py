"""segmentation_models_pytorch checkpoints -> maskworks keys.

maskworks' :class:`~maskworks.models.semantic.UNet` uses smp's module names on purpose
(``encoder.*`` with torchvision ResNet keys, ``decoder.blocks.{i}.conv{1,2}.{0,1}``,
``segmentation_head.0``), so the keys pass through unchanged. smp's optional auxiliary
``classification_head.*`` has no counterpart and is dropped and reported.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["convert_smp"]


def convert_smp(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """smp model state dict -> maskworks keys.

    Args:
        state_dict: the smp state dict (e.g. of ``smp.Unet("resnet34")``).
        in_channels: unused (smp adapts its first conv itself); kept for the common converter signature.

    Returns:
        The converted state dict and the dropped keys (``classification_head.*``).
    """
    dropped = [k for k in state_dict if k.startswith("classification_head.")]
    return {k: v for k, v in state_dict.items() if not k.startswith("classification_head.")}, dropped
