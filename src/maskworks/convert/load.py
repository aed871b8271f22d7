"""Read a checkpoint file, convert it from its source format and load it into a model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from maskworks.checkpoint import CheckpointError, read_safetensors, torch_load_weights_only
from maskworks.convert._common import strip_prefixes
from maskworks.convert.convnext import (
    convert_hf_convnext,
    convert_timm_convnext,
    convert_torchvision_convnext,
    is_convnext_state_dict,
    is_hf_convnext_state_dict,
    is_torchvision_convnext_state_dict,
)
from maskworks.convert.deeplab import convert_torchvision_deeplabv3, is_torchvision_deeplab_state_dict
from maskworks.convert.deit import convert_hf_deit, convert_timm_deit, is_hf_deit_state_dict
from maskworks.convert.detection import convert_torchvision_detection, is_torchvision_detection_state_dict
from maskworks.convert.lraspp import convert_torchvision_lraspp, is_torchvision_lraspp_state_dict
from maskworks.convert.mae import convert_hf_vitmae, is_hf_vitmae_state_dict
from maskworks.convert.mask2former import convert_hf_mask2former, is_hf_mask2former_state_dict
from maskworks.convert.mobilenet import convert_torchvision_mobilenet, is_mobilenet_state_dict
from maskworks.convert.monai_transformers import convert_monai, is_monai_state_dict
from maskworks.convert.resnet import convert_timm_resnet, convert_torchvision_resnet, is_resnet_state_dict
from maskworks.convert.sam import (
    convert_hf_sam,
    convert_segment_anything,
    is_hf_sam_state_dict,
    is_segment_anything_state_dict,
)
from maskworks.convert.sam2 import convert_hf_sam2, is_hf_sam2_state_dict
from maskworks.convert.segformer import (
    convert_hf_segformer,
    convert_mit,
    is_hf_segformer_state_dict,
    is_mit_state_dict,
    is_nvlabs_mit_state_dict,
)
from maskworks.convert.smp import convert_smp, smp_deeplab_mismatches
from maskworks.convert.swin import (
    convert_hf_swin,
    convert_timm_swin,
    convert_torchvision_swin,
    is_hf_swin_state_dict,
    is_swin_state_dict,
    is_torchvision_swin_state_dict,
)
from maskworks.convert.transunet import convert_transunet_official, is_transunet_official_state_dict
from maskworks.convert.upernet import convert_hf_upernet, is_hf_upernet_state_dict
from maskworks.convert.vit import is_timm_vit_state_dict
from maskworks.convert.vit_hf_tv import (
    convert_hf_vit,
    convert_torchvision_vit,
    is_hf_vit_state_dict,
    is_torchvision_vit_state_dict,
)

__all__ = [
    "CONVERTERS",
    "DEFAULT_MIN_FRACTION",
    "LoadResult",
    "convert_hf",
    "convert_timm",
    "convert_torchvision",
    "load_weights",
    "read_state_dict",
]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Converter = Callable[..., tuple[StateDict, list[str]]]


def _as_is(state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None) -> tuple[StateDict, list[str]]:
    """maskworks' own keys: nothing to convert."""
    return dict(state_dict), []


def convert_torchvision(
    state_dict: Mapping[str, torch.Tensor],
    in_channels: int | None = None,
    aux: bool = True,
    model: nn.Module | None = None,
) -> tuple[StateDict, list[str]]:
    """A torchvision checkpoint -> maskworks keys, by what it holds: a segmentation model (``deeplabv3_*``,
    ``lraspp_mobilenet_v3_large``), an R-CNN detector with FPN (``maskrcnn_*`` / ``fasterrcnn_*_fpn``: old key layouts renamed, stem adapted,
    class-specific predictors dropped when ``model.num_classes`` differs), a Vision Transformer (``vit_*``), or a bare backbone (``swin_*`` / ``swin_v2_*``, ``convnext_*``, ``resnet*`` /
    ``resnext*``, ``mobilenet_v2`` / ``mobilenet_v3_*``) whose classifier is dropped.

    Args:
        state_dict: the torchvision state dict.
        in_channels: input channels of the target; the first conv is adapted when it differs.
        aux: for ``deeplabv3_*``: the target has an auxiliary head (otherwise ``aux_classifier.*`` is dropped).
        model: for ViTs: the target, whose grid and patch size the position table and kernel are resampled to;
            for ConvNeXt: the target (its input channels).

    Returns:
        The converted state dict and the dropped keys.
    """
    if is_torchvision_detection_state_dict(state_dict):
        return convert_torchvision_detection(state_dict, in_channels, model=model)
    if is_torchvision_deeplab_state_dict(state_dict):
        return convert_torchvision_deeplabv3(state_dict, in_channels, aux=aux)
    if is_torchvision_lraspp_state_dict(state_dict):
        return convert_torchvision_lraspp(state_dict, in_channels)
    if is_torchvision_vit_state_dict(state_dict):
        return convert_torchvision_vit(state_dict, model=model, in_channels=in_channels)
    if is_torchvision_swin_state_dict(state_dict):
        return convert_torchvision_swin(state_dict, in_channels)
    if is_torchvision_convnext_state_dict(state_dict):
        return convert_torchvision_convnext(state_dict, in_channels, model=model)
    if is_mobilenet_state_dict(state_dict):
        return convert_torchvision_mobilenet(state_dict, in_channels)
    return convert_torchvision_resnet(state_dict, in_channels)


def convert_timm(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[StateDict, list[str]]:
    """A timm checkpoint -> maskworks keys: ViT / DeiT (resampled to ``model``'s grid and patch size when given),
    a Swin, a ConvNeXt or a ResNet backbone (classifier dropped); a bare MiT (SegFormer encoder; timm has none) in
    our keys or the NVlabs layout (``mit_b*.pth``) is routed here too."""
    if is_mit_state_dict(state_dict) or is_nvlabs_mit_state_dict(state_dict):
        return convert_mit(state_dict, in_channels)
    if is_swin_state_dict(state_dict):
        return convert_timm_swin(state_dict, in_channels)
    if is_timm_vit_state_dict(state_dict) or "patch_embed.proj.weight" in state_dict:
        return convert_timm_deit(state_dict, model=model, in_channels=in_channels)  # the ViT rules plus DeiT's
    if is_convnext_state_dict(state_dict):
        return convert_timm_convnext(state_dict, in_channels)
    return convert_timm_resnet(state_dict, in_channels)


def convert_hf(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[StateDict, list[str]]:
    """A Hugging Face transformers checkpoint -> maskworks keys: ``DeiT*`` (distillation token), ``ViTMAE*``
    (MAE with its decoder), ``ViTModel`` / ``ViTForImageClassification``, or a Swin / Swin V2 / ConvNeXt / ConvNeXt
    V2 (``*Model``, ``*ForImageClassification``, ``*Backbone``; their classifier dropped); either the hub key layout
    or the one of transformers 5; a whole ``Mask2FormerForUniversalSegmentation`` (Swin / ResNet backbone); a whole
    ``UperNetForSemanticSegmentation`` with a Swin / ConvNeXt backbone; or a
    Segformer (``SegformerModel`` / ``SegformerForImageClassification``: MiT encoder keys;
    ``SegformerForSemanticSegmentation``: a whole ``segformer_b*``).
    ``model``: the target (ViT: resampling; ConvNeXt: 1x1-conv MLPs). A whole ``SamModel`` (Segment Anything) or ``Sam2Model`` / ``Sam2VideoModel``
    (SAM 2 in image mode; the video-memory weights are dropped)."""
    if is_hf_sam_state_dict(state_dict):
        return convert_hf_sam(state_dict, in_channels)
    if is_hf_sam2_state_dict(state_dict):
        return convert_hf_sam2(state_dict, in_channels)
    if is_hf_mask2former_state_dict(state_dict):
        return convert_hf_mask2former(state_dict, in_channels)
    if is_hf_upernet_state_dict(state_dict):
        return convert_hf_upernet(state_dict, in_channels, model=model)
    if is_hf_segformer_state_dict(state_dict):
        return convert_hf_segformer(state_dict, in_channels, model=model)
    if is_hf_swin_state_dict(state_dict):
        return convert_hf_swin(state_dict, in_channels)
    if is_hf_convnext_state_dict(state_dict):
        return convert_hf_convnext(state_dict, in_channels, model=model)
    if is_hf_deit_state_dict(state_dict):
        return convert_hf_deit(state_dict, model=model, in_channels=in_channels)
    if is_hf_vit_state_dict(state_dict):
        return convert_hf_vit(state_dict, model=model, in_channels=in_channels)
    if is_hf_vitmae_state_dict(state_dict):
        return convert_hf_vitmae(state_dict, in_channels=in_channels)
    raise ValueError(
        "not a supported Hugging Face checkpoint: expected ViTModel / ViTForImageClassification, "
        "DeiTForImageClassificationWithTeacher, ViTMAEForPreTraining, Swin / Swinv2, ConvNext / ConvNextV2, "
        "Segformer, Mask2FormerForUniversalSegmentation, UperNetForSemanticSegmentation, SamModel or Sam2Model keys "
        "(e.g. 'vit.embeddings.patch_embeddings.projection.weight')"
    )


def convert_official(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """A checkpoint in the layout of a model's original authors' code: TransUNet (``Beckschen/TransUNet``; build the
    model with ``official_cnn=True`` to compute their function)."""
    if is_transunet_official_state_dict(state_dict):
        return convert_transunet_official(state_dict), []
    raise ValueError(
        "not a supported original-code checkpoint: expected the official TransUNet keys "
        "('transformer.embeddings.hybrid_model.root.conv.weight', 'decoder.conv_more...')"
    )


# source name -> converter(state_dict, in_channels=None) -> (state dict, dropped keys)
CONVERTERS: dict[str, Converter] = {
    "maskworks": _as_is,
    "smp": convert_smp,
    "torchvision": convert_torchvision,
    "timm": convert_timm,
    "hf": convert_hf,
    "official": convert_official,
    "segment_anything": convert_segment_anything,
    "monai": convert_monai,
}
# Sources whose checkpoints may be a bare backbone: those load into `model.encoder` when there is one.
_BACKBONE_SOURCES = ("torchvision", "timm", "hf")


def _is_hier_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A Swin V1 / V2 or ConvNeXt V1 / V2 backbone of any source (timm / maskworks, torchvision or HF)."""
    return (
        is_swin_state_dict(state_dict)
        or is_convnext_state_dict(state_dict)
        or is_torchvision_swin_state_dict(state_dict)
        or is_torchvision_convnext_state_dict(state_dict)
        or is_hf_swin_state_dict(state_dict)
        or is_hf_convnext_state_dict(state_dict)
    )


def _is_mit_backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A bare MiT (SegFormer encoder): ours, NVlabs', or HF ``SegformerModel`` / ``SegformerForImageClassification``
    (an HF ``SegformerForSemanticSegmentation``, with its ``decode_head.*``, is a whole model)."""
    if is_mit_state_dict(state_dict) or is_nvlabs_mit_state_dict(state_dict):
        return True
    return is_hf_segformer_state_dict(state_dict) and not any(k.startswith("decode_head.") for k in state_dict)


def _is_backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return (
        is_resnet_state_dict(state_dict)
        or is_mobilenet_state_dict(state_dict)
        or _is_hier_state_dict(state_dict)
        or _is_mit_backbone_state_dict(state_dict)
    )


_WRAPPER_KEYS = ("state_dict", "model")


class LoadResult(NamedTuple):
    """Keys of the model that got no value, and checkpoint keys that were not used (or dropped)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> StateDict:
    """Read a state dict from a file, or normalise one given in memory.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``, which refuses pickled objects other
    than tensors and containers. A top-level ``state_dict`` / ``model`` entry is unwrapped and
    ``module.`` / ``_orig_mod.`` prefixes are stripped.

    Args:
        path_or_state_dict: a checkpoint path or a mapping of names to tensors.

    Returns:
        A flat ``{name: tensor}`` dict.

    Raises:
        FileNotFoundError: the path does not exist (the message lists the weights files in its folder).
        CheckpointError: (a ``ValueError``) the path is a folder; a ``.safetensors`` file is truncated or not
            safetensors; any other file is corrupt, truncated, not a torch file, or holds arbitrary pickled
            objects; or a value is not a tensor.
    """
    if isinstance(path_or_state_dict, Mapping):
        obj, where = path_or_state_dict, "state dict"
    else:
        path = Path(path_or_state_dict)
        where = str(path)
        if path.suffix == ".safetensors":
            obj = read_safetensors(path)
        else:
            obj = torch_load_weights_only(path, map_location="cpu")
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} does not hold a state dict (got {type(obj).__name__})")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[strip_prefixes(key)] = value
    return state_dict


def _detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    # Swin / ConvNeXt: torchvision and HF by their own keys; timm's (= ours) as timm, which drops `head.*`.
    # A bare ResNet / MobileNet (torchvision, timm or our backbone) is converted as torchvision: the keys are the
    # same and it is routed into `model.encoder`; so is a torchvision DeepLabv3 / LR-ASPP (renamed, not routed);
    # anything else is taken to be in our (= smp) layout.
    if is_transunet_official_state_dict(state_dict):
        return "official"
    if is_monai_state_dict(state_dict):
        return "monai"  # UNETR, SwinUNETR, DynUNet
    if is_hf_sam_state_dict(state_dict) or is_hf_sam2_state_dict(state_dict):
        return "hf"
    if is_segment_anything_state_dict(state_dict):
        return "segment_anything"  # the official SAM layout (ours differs only in the MLP names)
    if is_torchvision_detection_state_dict(state_dict):
        return "torchvision"  # Faster / Mask R-CNN with FPN (maskworks' Mask R-CNN keys are the same)
    if is_hf_upernet_state_dict(state_dict) or is_hf_segformer_state_dict(state_dict):
        return "hf"
    if is_mit_state_dict(state_dict) or is_nvlabs_mit_state_dict(state_dict):
        return "timm"  # a bare MiT in our / the NVlabs layout: routed into model.encoder, ``head.*`` dropped
    if "encoder.patch_embed1.proj.weight" in state_dict and "encoder.block1.0.attn.kv.weight" in state_dict:
        return "smp"  # an smp model with a mit_b* encoder
    if is_torchvision_swin_state_dict(state_dict) or is_torchvision_convnext_state_dict(state_dict):
        return "torchvision"
    if is_hf_swin_state_dict(state_dict) or is_hf_convnext_state_dict(state_dict):
        return "hf"
    if is_swin_state_dict(state_dict) or is_convnext_state_dict(state_dict):
        return "timm"
    if (
        _is_backbone_state_dict(state_dict)
        or is_torchvision_deeplab_state_dict(state_dict)
        or is_torchvision_lraspp_state_dict(state_dict)
    ):
        return "torchvision"
    if is_torchvision_vit_state_dict(state_dict):
        return "torchvision"
    if is_hf_deit_state_dict(state_dict) or is_hf_vit_state_dict(state_dict) or is_hf_vitmae_state_dict(state_dict):
        return "hf"
    return "maskworks"  # our own keys, which are also timm's for ViT / DeiT and smp's for CNN models


# Default of load_weights' coverage check: at least half of the target's tensors must get a value.
DEFAULT_MIN_FRACTION = 0.5


def _examples(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def load_weights(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    source: str = "auto",
    strict: bool | None = None,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> LoadResult:
    """Load a local checkpoint into ``model``, converting it from its source format.

    With ``source="auto"``, maskworks and smp checkpoints load as-is; a torchvision Mask R-CNN / Faster R-CNN (FPN)
    checkpoint (``backbone.fpn.*``, ``rpn.head.*``, ``roi_heads.*``) loads into maskworks' Mask R-CNN models as it
    is (detected as torchvision; old key layouts renamed); a bare torchvision / timm ResNet or
    torchvision MobileNet state dict goes into ``model.encoder`` when the model has one (into the model itself
    otherwise), its classifier (``fc.*`` / ``classifier.*``) dropped and reported as unexpected; so does a Swin V1 /
    V2 or ConvNeXt V1 / V2 backbone checkpoint of timm (``swin_*``, ``swinv2_*``, ``convnext*``: our keys, ``head.*``
    dropped), torchvision (``swin_t/s/b``, ``swin_v2_t/s/b``, ``convnext_tiny`` .. ``large``) or Hugging Face
    (``Swin*``, ``Swinv2*``, ``ConvNext*``, ``ConvNextV2*``: ``*Model``, ``*ForImageClassification`` and
    ``*Backbone``, whose ``hidden_states_norms`` become ``stage_norms`` of a backbone built with ``out_norms=True``;
    the final ``layernorm`` of an HF ConvNeXt, which ours lacks, is dropped and reported), the first convolution
    adapted to the target's input channels; a torchvision
    ``deeplabv3_*`` checkpoint is renamed into a maskworks ``deeplabv3`` (its ``aux_classifier`` kept when the
    model has one), a torchvision ``lraspp_mobilenet_v3_large`` one into ``lraspp_mobilenet_v3_large``;
    torchvision ``vit_*`` and Hugging Face ViT / DeiT / ViTMAE checkpoints are recognised and renamed. timm ViT /
    DeiT keys are ours: pass ``source="timm"`` to also resample the position table and patch kernel of a checkpoint
    made at another resolution or patch size, and drop a head of another class count.

    Coverage: a checkpoint that fills too little of the model is almost always the wrong file or the wrong
    ``source``, and loading it would leave a silently random model. So by default (``strict=None``) at least
    ``min_fraction`` of the *target*'s state-dict tensors (parameters and buffers, BatchNorm's
    ``num_batches_tracked`` counters aside) must get a value, and at least one always. The target is
    ``model.encoder`` when a backbone checkpoint is routed there, the model otherwise, so a backbone-only
    checkpoint passes. ``strict=False`` turns the check off (a partial load on purpose; before this check existed
    ``strict=False`` was the default, so explicit ``strict=False`` calls behave as they did); ``strict=True``
    requires every key to match. When a check fails the model is left unchanged.

    ``source="smp"`` with an smp ``DeepLabV3`` / ``DeepLabV3Plus`` checkpoint: the weights do not say which ASPP
    rates or dilation style they were trained with, so a WARNING is logged when the model's ``atrous_rates``
    differ from smp's default ``(12, 24, 36)`` (build it with ``atrous_rates=(12, 24, 36)``) or it uses
    ``uniform_dilation=False``.

    Args:
        model: the model to fill (its parameters are copied in place).
        path_or_state_dict: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` path, or a state dict.
        source: ``"auto"``, ``"maskworks"``, ``"smp"``, ``"torchvision"``, ``"timm"``, ``"hf"`` (Hugging Face
            transformers ViT / DeiT / ViTMAE / Swin / Swinv2 / ConvNext / ConvNextV2 / SegFormer / UperNet) or
            ``"official"`` (the original authors' code: TransUNet) or ``"segment_anything"`` (the official SAM
            checkpoints; Hugging Face ``SamModel`` state dicts are ``"hf"``).
        strict: ``True``: raise when any key is missing or unexpected. ``None`` (default): raise when fewer than
            ``min_fraction`` of the target's tensors (or none) get a value. ``False``: load whatever matches.
        min_fraction: the least fraction, in ``[0, 1]``, of the target's tensors that must match when
            ``strict=None`` (default :data:`DEFAULT_MIN_FRACTION` = 0.5).

    Returns:
        The model keys that got no value and the checkpoint keys that were not used.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unknown ``source``, ``min_fraction`` outside ``[0, 1]``, a shape mismatch (naming the key and
            both shapes), a file with arbitrary pickled objects, or a failed coverage / strict check; file problems
            (truncated, corrupt, a folder) and failed checks raise :class:`~maskworks.checkpoint.CheckpointError`,
            a ``ValueError`` whose one-line message names the file, how many tensors matched of how many, and
            example unmatched keys.
    """
    if source != "auto" and source not in CONVERTERS:
        raise ValueError(f"unknown source {source!r}; expected 'auto' or one of {sorted(CONVERTERS)}")
    if strict not in (None, True, False):
        raise TypeError(f"strict must be True, False or None, got {strict!r}")
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be a number in [0, 1], got {min_fraction!r}")
    where = "state dict" if isinstance(path_or_state_dict, Mapping) else str(path_or_state_dict)
    state_dict = read_state_dict(path_or_state_dict)
    if source == "auto":
        source = _detect_source(state_dict)

    target, prefix = model, ""
    encoder = getattr(model, "encoder", None)
    if source in _BACKBONE_SOURCES and isinstance(encoder, nn.Module) and _is_backbone_state_dict(state_dict):
        target, prefix = encoder, "encoder."
    kwargs: dict = {"in_channels": getattr(target, "in_channels", None)}
    if source == "torchvision" and is_torchvision_deeplab_state_dict(state_dict):
        kwargs["aux"] = isinstance(getattr(model, "aux_classifier", None), nn.Module)
    if source in ("timm", "hf", "torchvision") and (
        not _is_backbone_state_dict(state_dict) or _is_hier_state_dict(state_dict)
    ):
        kwargs["model"] = target  # ViT family: resample position tables / patch kernels; ConvNeXt: 1x1-conv MLPs
    if source == "hf" and is_hf_vitmae_state_dict(state_dict) and not is_hf_vit_state_dict(state_dict):
        kwargs.pop("model")
    converted, dropped = CONVERTERS[source](state_dict, **kwargs)
    converted = {prefix + k: v for k, v in converted.items()}

    own = model.state_dict()
    for key, value in converted.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    if source == "smp":
        for message in smp_deeplab_mismatches(model, converted):
            log.warning("%s: %s", where, message)

    # BatchNorm's num_batches_tracked counters are not counted: torch fills them in when they are absent
    target_keys = [k for k in own if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    target_name = type(model).__name__ + (f".{prefix[:-1]} ({type(target).__name__})" if prefix else "")

    def problem(missing: list[str], unexpected: list[str]) -> str | None:
        """Why this load must be refused (one line), or None."""
        if strict is False:
            return None
        if strict:
            if not missing and not unexpected:
                return None
            return (
                f"strict loading failed ({source} checkpoint {where} into {target_name}): {len(missing)} model "
                f"tensor(s) got no value, e.g. missing keys {_examples(missing)}; {len(unexpected)} checkpoint "
                f"tensor(s) were not used, e.g. unexpected keys {_examples(unexpected)}"
            )
        absent = set(missing)
        unfilled = [k for k in target_keys if k in absent]
        matched = len(target_keys) - len(unfilled)
        if matched > 0 and matched >= min_fraction * len(target_keys):
            return None
        unused = f"unused checkpoint keys e.g. {_examples(unexpected)}" if unexpected else "no unused checkpoint key"
        return (
            f"{where} fills {'none' if matched == 0 else f'only {matched}'} of the {len(target_keys)} tensors of "
            f"{target_name} ({source} format; at least {min_fraction:.0%} must match): {unused}, model keys without "
            f"a value e.g. {_examples(unfilled)}; check the file and source=, or pass strict=False to load a "
            "partial checkpoint on purpose"
        )

    # Predict the outcome from the key names; load hooks (legacy key layouts) may rename keys, so the real
    # result is checked again after loading, and the previous weights are restored when it fails.
    absent = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    predicted = problem(absent, [*dropped, *(k for k in converted if k not in own)])
    backup = {k: v.detach().clone() for k, v in own.items()} if predicted else None
    result = model.load_state_dict(converted, strict=False)
    missing, unexpected = list(result.missing_keys), [*dropped, *result.unexpected_keys]
    refused = problem(missing, unexpected)
    if refused:
        if backup is not None:
            model.load_state_dict(backup, strict=False)
        raise CheckpointError(refused)
    loaded = len(converted) - len(result.unexpected_keys)
    log.log(
        logging.WARNING if loaded == 0 else logging.INFO,
        "loaded %d tensors (%s format) into %s; %d missing, %d unexpected",
        loaded,
        source,
        type(model).__name__,
        len(missing),
        len(unexpected),
    )
    return LoadResult(missing, unexpected)
