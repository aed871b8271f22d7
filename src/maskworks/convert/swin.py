"""timm Swin Transformer V1 / V2 checkpoints -> maskworks :class:`~maskworks.backbones.swin.SwinTransformer` /
:class:`~maskworks.backbones.swin_v2.SwinTransformerV2` keys.

The keys are the same; the classifier (``head.*``) is dropped, as are the buffers that timm keeps out of its state
dict but older checkpoints may carry (``relative_position_index``, ``relative_coords_table``, ``k_bias``,
``attn_mask``), and the patch-embedding convolution (``patch_embed.proj.weight``) is adapted when the target takes
another number of input channels. A V2 checkpoint in the original layout (patch merging at the end of a stage, so
stage 0 has one) has its ``layers.N.downsample`` moved to ``layers.N+1.downsample``, as timm's checkpoint filter does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_timm_swin", "is_swin_state_dict"]

_FIRST_CONV = "patch_embed.proj.weight"
_BUFFERS = ("relative_position_index", "relative_coords_table", "k_bias", "attn_mask")
_V1_BIAS = "layers.0.blocks.0.attn.relative_position_bias_table"
_V2_BIAS = "layers.0.blocks.0.attn.cpb_mlp.0.weight"
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def is_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a timm / maskworks Swin V1 or V2 state dict (``patch_embed.proj.weight`` and
    ``layers.0.blocks.0.attn.relative_position_bias_table`` (V1) or ``layers.0.blocks.0.attn.cpb_mlp.0.weight``
    (V2))."""
    return _FIRST_CONV in state_dict and (_V1_BIAS in state_dict or _V2_BIAS in state_dict)


def convert_timm_swin(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm ``swin_*`` / ``swinv2_*`` state dict -> backbone keys.

    Args:
        state_dict: the timm state dict.
        in_channels: input channels of the target backbone; ``patch_embed.proj.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (``head.*`` and stale buffers).
    """
    dropped = [k for k in state_dict if k.startswith("head.") or k.rsplit(".", 1)[-1] in _BUFFERS]
    out = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    if _V2_BIAS in out and "layers.0.downsample.reduction.weight" in out:  # original V2 layout
        out = {_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k): v for k, v in out.items()}
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped
