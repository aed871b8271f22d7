"""segmentation_models_pytorch checkpoints -> maskworks keys.

maskworks' :class:`~maskworks.models.semantic.UNet` uses smp's module names on purpose
(``encoder.*`` with torchvision ResNet keys, ``decoder.blocks.{i}.conv{1,2}.{0,1}``,
``segmentation_head.0``), so the keys pass through unchanged. smp's optional auxiliary
``classification_head.*`` has no counterpart and is dropped and reported. smp's timm encoders (``"tu-convnext_tiny"``,
``"tu-swin_tiny_patch4_window7_224"``, ...) hold timm's ``features_only`` model at ``encoder.model`` with its stage
names flattened (``stages_0``, ``layers_0``, ``stem_0``): they become our backbone's keys (``encoder.stages.0``...),
which are timm's.

What a state dict cannot say: smp's ``DeepLabV3`` / ``DeepLabV3Plus`` build their ASPP with
``decoder_atrous_rates=(12, 24, 36)`` and dilate every conv of a dilated stage (``make_dilated``); the
weights are the same at any rate, so :func:`smp_deeplab_mismatches` compares the target model's
settings with smp's defaults and :func:`maskworks.convert.load_weights` warns about each difference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = ["SMP_DEFAULT_ATROUS_RATES", "convert_smp", "smp_deeplab_kind", "smp_deeplab_mismatches"]

# smp's DeepLabV3 and DeepLabV3Plus default ``decoder_atrous_rates`` (at any output stride)
SMP_DEFAULT_ATROUS_RATES = (12, 24, 36)


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
    from maskworks.convert.segformer import convert_smp_mit  # smp "mit_b*" encoders: our MiT keys

    state_dict = convert_smp_mit(state_dict)
    dropped = [k for k in state_dict if k.startswith("classification_head.")]
    out = {}
    for key, value in state_dict.items():
        if key.startswith("classification_head."):
            continue
        if key.startswith(_TIMM_UNIVERSAL):  # smp "tu-*" encoder: timm features_only keys with flattened names
            key = "encoder." + _FLAT_STAGE.sub(r"\1.\2.", key[len(_TIMM_UNIVERSAL) :])
        out[key] = value
    return out, dropped


_TIMM_UNIVERSAL = "encoder.model."
_FLAT_STAGE = re.compile(r"^(stem|stages|layers)_(\d+)\.")


def smp_deeplab_kind(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``"DeepLabV3Plus"`` / ``"DeepLabV3"`` for an smp DeepLab state dict (by its decoder keys), else ``None``."""
    if "decoder.block1.0.weight" in state_dict and "decoder.aspp.0.project.0.weight" in state_dict:
        return "DeepLabV3Plus"
    if "decoder.aspp.project.0.weight" in state_dict or "decoder.0.project.0.weight" in state_dict:  # 0.6 / older
        return "DeepLabV3"
    return None


def smp_deeplab_mismatches(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Settings of ``model`` (a maskworks DeepLab) that differ from the smp defaults an smp DeepLab checkpoint
    was presumably made with; each entry is one sentence naming both values and the argument to change.

    The state dict carries no rates or dilation style, so the check assumes the checkpoint used smp's defaults.
    """
    kind = smp_deeplab_kind(state_dict)
    rates = getattr(model, "atrous_rates", None)
    if kind is None or rates is None:
        return []
    name = (getattr(model, "maskworks_config", None) or {}).get("name", type(model).__name__.lower())
    found = []
    if tuple(rates) != SMP_DEFAULT_ATROUS_RATES:
        found.append(
            f"the smp {kind} checkpoint is loaded into a model with ASPP rates {tuple(rates)}, but smp builds {kind} "
            f"with decoder_atrous_rates={SMP_DEFAULT_ATROUS_RATES} by default; the weights carry no rates, so this "
            f"check assumes the checkpoint used smp's default: build the model with "
            f"atrous_rates={SMP_DEFAULT_ATROUS_RATES} (e.g. create_model({name!r}, "
            f"atrous_rates={SMP_DEFAULT_ATROUS_RATES})) to compute the same function as smp"
        )
    if getattr(model, "uniform_dilation", None) is False:
        found.append(
            f"the smp {kind} checkpoint is loaded into a model with uniform_dilation=False (torchvision's dilation), "
            "but smp dilates every conv of a dilated stage; build the model with uniform_dilation=True to compute "
            "the same function as smp"
        )
    return found
