"""Memory format and compilation helpers shared by training and inference.

``channels_last`` (NHWC) is the layout oneDNN (CPU) and cuDNN (GPU, tensor cores) run convolutions fastest in.
It pays only for convolutional networks: a plain ViT has a single convolution, its patch projection, whose
output is immediately flattened into tokens, so converting it only adds copies. The rule
(:func:`prefers_channels_last`): a model is converted when it holds at least one ``nn.Conv2d`` that is not a
patch projection, i.e. one whose kernel differs from its stride or whose kernel is ``1 x 1`` — every CNN,
U-Net, DeepLab, SegFormer (overlapping patch embeddings, 1x1 decoder convs) and hybrid ViT qualifies; a
ViT with a linear or token head does not.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["prefers_channels_last", "to_channels_last", "images_to"]


def _is_patch_projection(conv: nn.Conv2d) -> bool:
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    return k == s and k != (1, 1)


def prefers_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` has a ``Conv2d`` other than a patch projection (kernel == stride > 1); see the module
    docstring."""
    return any(isinstance(m, nn.Conv2d) and not _is_patch_projection(m) for m in model.modules())


def to_channels_last(model: nn.Module) -> bool:
    """Convert ``model``'s 4-D parameters and buffers to ``torch.channels_last`` in place when
    :func:`prefers_channels_last`; returns whether it did. Values and ``state_dict`` keys are unchanged."""
    if not prefers_channels_last(model):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def images_to(
    images: torch.Tensor, device: torch.device, channels_last: bool = False, non_blocking: bool = False
) -> torch.Tensor:
    """``images`` on ``device``, in ``channels_last`` layout when asked and the batch is 4-D (N, C, H, W)."""
    if channels_last and images.ndim == 4:
        return images.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
    return images.to(device, non_blocking=non_blocking)
