"""timm Swin Transformer V1 checkpoints -> maskworks :class:`~maskworks.backbones.swin.SwinTransformer` keys.

The keys are the same; the classifier (``head.*``) is dropped, as are the buffers that timm keeps out of its state
dict but older checkpoints may carry (``relative_position_index``, ``attn_mask``), and the patch-embedding
convolution (``patch_embed.proj.weight``) is adapted when the target takes another number of input channels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_timm_swin", "is_swin_state_dict"]

_FIRST_CONV = "patch_embed.proj.weight"
_BUFFERS = ("relative_position_index", "attn_mask")


def is_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a timm / maskworks Swin V1 state dict (``patch_embed.proj.weight`` and
    ``layers.0.blocks.0.attn.relative_position_bias_table``)."""
    return _FIRST_CONV in state_dict and "layers.0.blocks.0.attn.relative_position_bias_table" in state_dict


def convert_timm_swin(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm ``swin_*`` state dict -> backbone keys.

    Args:
        state_dict: the timm state dict.
        in_channels: input channels of the target backbone; ``patch_embed.proj.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (``head.*`` and stale buffers).
    """
    dropped = [k for k in state_dict if k.startswith("head.") or k.rsplit(".", 1)[-1] in _BUFFERS]
    out = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped
