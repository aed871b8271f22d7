"""MONAI ``DynUNet`` checkpoints -> maskworks :class:`~maskworks.models.volumetric.dynunet.DynUNet`.

MONAI wraps every convolution in a ``Convolution`` sequential (``conv1.conv.weight``) and its 1x1 heads twice
(``output_block.conv.conv.weight``); its recursive ``skip_layers.*`` entries are the same tensors seen again
through the skip-layer modules. The conversion drops the wrappers and the duplicates:

* ``<block>.conv{1,2,3}.conv.*`` -> ``<block>.conv{1,2,3}.*``; norms keep their names.
* ``upsamples.{j}.transp_conv.conv.*`` -> ``upsamples.{j}.transp_conv.*``.
* ``output_block.conv.conv.*`` -> ``output_block.*``; ``deep_supervision_heads.{i}.conv.conv.*`` ->
  ``deep_supervision_heads.{i}.*``.
* ``skip_layers.*`` dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert._common import unwrap_state_dict

__all__ = ["convert_monai_dynunet", "is_monai_dynunet_state_dict"]

_WRAPPED = re.compile(r"(conv\d|transp_conv)\.conv\.(weight|bias)$")
_HEAD = re.compile(r"^(output_block|deep_supervision_heads\.\d+)\.conv\.conv\.(weight|bias)$")


def is_monai_dynunet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are MONAI ``DynUNet``'s (``input_block.conv1.conv.weight`` and ``output_block.conv.conv``)."""
    keys = set(unwrap_state_dict(state_dict))
    return "input_block.conv1.conv.weight" in keys and "output_block.conv.conv.weight" in keys


def convert_monai_dynunet(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MONAI ``DynUNet`` state dict -> ours (see the module docstring); returns ``(state_dict, dropped keys)``."""
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in unwrap_state_dict(state_dict).items():
        if key.startswith("skip_layers."):
            dropped.append(key)
            continue
        new = _HEAD.sub(r"\1.\2", key)
        new = _WRAPPED.sub(r"\1.\2", new)
        out[new] = value
    return out, dropped
