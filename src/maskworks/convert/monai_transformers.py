"""MONAI checkpoints of the transformer segmentation networks -> maskworks state dicts: ``monai.networks.nets.UNETR``
-> :class:`~maskworks.models.volumetric.unetr.UNETR` and ``monai.networks.nets.SwinUNETR`` ->
:class:`~maskworks.models.volumetric.swin_unetr.SwinUNETR`.

Shared rules (the convolutional decoders):

* MONAI's ``Convolution`` wrapper level goes: ``*.conv1.conv.weight`` -> ``*.conv1.weight``,
  ``*.transp_conv.conv.weight`` -> ``*.transp_conv.weight``, ``encoder2.blocks.0.0.conv.weight`` ->
  ``encoder2.blocks.0.0.weight``; ``out.conv.conv.*`` -> ``out.*``.
* ``UnetrBasicBlock``'s ``layer`` level goes: ``encoder1.layer.conv1...`` -> ``encoder1.conv1...``.
* Norm parameters and statistics (when ``norm_name`` has any) keep their names.

UNETR (``vit.*``):

* ``vit.patch_embedding.patch_embeddings.{weight,bias}`` -> ``vit.patch_embed.*``; with ``proj_type="perceptron"``
  the linear layer ``patch_embeddings.1`` (input ordered ``(p1 p2 p3 c)``) is reshaped into the same kernel.
* ``vit.patch_embedding.position_embeddings`` -> ``vit.pos_embed``.
* ``vit.blocks.{i}.{mlp.linear1, mlp.linear2, attn.out_proj}`` -> ``vit.blocks.{i}.{mlp.fc1, mlp.fc2, attn.proj}``;
  ``norm1``, ``norm2``, ``attn.qkv`` and ``vit.norm`` keep their names.
* Dropped (returned): ``vit.blocks.{i}.norm_cross_attn.*`` and ``vit.blocks.{i}.cross_attn.*``, which a block
  without cross-attention never uses (MONAI >= 1.4 always creates the norm; older versions also the attention).

SwinUNETR (``swinViT.*``):

* ``swinViT.patch_embed.*`` -> ``swin.patch_embed.*``.
* ``swinViT.layers{k}.0.blocks.{j}.*`` -> ``swin.stages.{k-1}.blocks.{j}.*`` with ``mlp.linear1 / linear2`` ->
  ``mlp.fc1 / fc2``; ``swinViT.layers{k}.0.downsample.*`` -> ``swin.stages.{k-1}.downsample.*``;
  ``swinViT.layers{k}c.0.layer.*`` (SwinUNETR-V2) -> ``swin.stages.{k-1}.res_block.*``.
* Dropped (returned): ``attn.relative_position_index``, a buffer MONAI saves and maskworks recomputes from the
  window.
* The encoder-only checkpoints of MONAI's self-supervised pre-training (``model_swinvit.pt``, read by MONAI's
  ``SwinUNETR.load_from``: ``module.patch_embed.*``, ``module.layers{k}.0.*`` with ``mlp.fc1 / fc2``) convert to the
  ``swin.*`` keys too; their heads (anything else) are dropped and returned. Load them with ``strict=False``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert._common import unwrap_state_dict

__all__ = [
    "convert_monai",
    "convert_monai_swin_unetr",
    "convert_monai_unetr",
    "is_monai_state_dict",
    "is_monai_swin_unetr_state_dict",
    "is_monai_unetr_state_dict",
]

StateDict = dict[str, torch.Tensor]

_UNETR_PATCH = "vit.patch_embedding."
_UNETR_BLOCK = re.compile(r"vit\.blocks\.(\d+)\.(.+)")
_UNETR_BLOCK_RENAMES = {"mlp.linear1": "mlp.fc1", "mlp.linear2": "mlp.fc2", "attn.out_proj": "attn.proj"}
_UNETR_BLOCK_KEEP = ("norm1", "norm2", "attn.qkv")
_UNETR_UNUSED = ("norm_cross_attn.", "cross_attn.")
_DECODER = re.compile(r"(encoder\d+|decoder\d+|out)\..+")
_SWIN_STAGE = re.compile(r"layers(\d)(c?)\.0\.(.+)")
_SWIN_BLOCK_RENAMES = {"mlp.linear1.": "mlp.fc1.", "mlp.linear2.": "mlp.fc2."}


def _flat(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return unwrap_state_dict(state_dict)


def is_monai_unetr_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict of MONAI's ``UNETR`` (wrapped in ``state_dict`` / ``model`` and ``module.`` /
    ``_orig_mod.`` prefixes allowed)."""
    keys = _flat(state_dict)
    return "vit.patch_embedding.position_embeddings" in keys and "decoder5.transp_conv.conv.weight" in keys


def is_monai_swin_unetr_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict of MONAI's ``SwinUNETR``, or of its self-supervised encoder (``model_swinvit.pt``)."""
    keys = _flat(state_dict)
    if "swinViT.patch_embed.proj.weight" in keys:
        return True
    return "patch_embed.proj.weight" in keys and "layers1.0.blocks.0.attn.relative_position_bias_table" in keys


def is_monai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a MONAI ``UNETR``, ``SwinUNETR`` or ``DynUNet`` state dict."""
    from maskworks.convert.dynunet import is_monai_dynunet_state_dict

    return (
        is_monai_unetr_state_dict(state_dict)
        or is_monai_swin_unetr_state_dict(state_dict)
        or is_monai_dynunet_state_dict(state_dict)
    )


def _decoder_key(key: str) -> str:
    """A MONAI decoder key without the ``Convolution`` / ``UnetrBasicBlock`` wrapper levels."""
    if key.startswith("out.conv.conv."):
        return "out." + key[len("out.conv.conv.") :]
    key = re.sub(r"^(encoder\d+)\.layer\.", r"\1.", key)
    return re.sub(r"\.conv\.(weight|bias)$", r".\1", key)


def _perceptron_kernel(weight: torch.Tensor, conv_weight_like: torch.Tensor) -> torch.Tensor:
    """MONAI's perceptron patch embedding ``Linear(p^d c -> C)``, input ``(p1 p2 [p3] c)``, as a conv kernel."""
    spatial_dims = conv_weight_like.ndim - 2
    in_channels = conv_weight_like.shape[1]
    patch_volume = weight.shape[1] // in_channels
    patch = round(patch_volume ** (1.0 / spatial_dims))
    if patch**spatial_dims * in_channels != weight.shape[1]:
        raise ValueError(
            f"perceptron patch embedding of shape {tuple(weight.shape)} does not fit {in_channels} input channels "
            f"and a {spatial_dims}-D cubic patch"
        )
    kernel = weight.reshape(weight.shape[0], *(patch,) * spatial_dims, in_channels)  # (C, p1, p2, [p3,] c)
    return kernel.movedim(-1, 1).contiguous()  # (C, c, p1, p2, [p3])


def convert_monai_unetr(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """Rename a MONAI ``UNETR`` state dict to :class:`~maskworks.models.volumetric.unetr.UNETR`'s keys (see the
    module docstring). Every key is used or returned as dropped; an unknown key raises ``KeyError``.

    Args:
        state_dict: the MONAI module's state dict (optionally wrapped in ``state_dict`` / ``model`` and prefixed
            with ``module.``).
        in_channels: accepted for the common converter signature; the first convolutions are not adapted (a
            different input channel count fails on load with a shape error).

    Returns:
        Our state dict and the dropped keys.
    """
    sd = unwrap_state_dict(state_dict)
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in sd.items():
        if key.startswith(_UNETR_PATCH):
            rest = key[len(_UNETR_PATCH) :]
            if rest == "position_embeddings":
                out["vit.pos_embed"] = value
            elif rest in ("patch_embeddings.weight", "patch_embeddings.bias"):
                out["vit.patch_embed." + rest.rsplit(".", 1)[1]] = value
            elif rest == "patch_embeddings.1.bias":
                out["vit.patch_embed.bias"] = value
            elif rest == "patch_embeddings.1.weight":
                reference = sd.get("encoder1.layer.conv1.conv.weight")
                if reference is None:
                    raise KeyError(
                        "a perceptron patch embedding needs 'encoder1.layer.conv1.conv.weight' for its shape"
                    )
                out["vit.patch_embed.weight"] = _perceptron_kernel(value, reference)
            else:
                raise KeyError(f"unknown MONAI UNETR patch embedding key {key!r}")
        elif (m := _UNETR_BLOCK.fullmatch(key)) is not None:
            i, rest = m.groups()
            module, param = rest.rsplit(".", 1)
            if rest.startswith(_UNETR_UNUSED):
                dropped.append(key)
            elif module in _UNETR_BLOCK_RENAMES:
                out[f"vit.blocks.{i}.{_UNETR_BLOCK_RENAMES[module]}.{param}"] = value
            elif module in _UNETR_BLOCK_KEEP:
                out[key] = value
            else:
                raise KeyError(f"unknown MONAI UNETR transformer key {key!r}")
        elif key.startswith("vit.norm."):
            out[key] = value
        elif _DECODER.fullmatch(key):
            out[_decoder_key(key)] = value
        else:
            raise KeyError(f"unknown MONAI UNETR key {key!r}")
    return out, dropped


def _swin_key(rest: str) -> str | None:
    """A MONAI ``SwinTransformer`` key (without ``swinViT.`` / ``module.``) -> ours under ``swin.``; ``None`` for
    the saved ``relative_position_index`` buffers; ``KeyError`` for an unknown key."""
    if rest.startswith("patch_embed."):
        return "swin." + rest
    m = _SWIN_STAGE.fullmatch(rest)
    if m is None:
        raise KeyError(f"unknown MONAI SwinTransformer key {rest!r}")
    k, conv, tail = int(m.group(1)), m.group(2), m.group(3)
    stage = f"swin.stages.{k - 1}."
    if conv:  # SwinUNETR-V2: UnetrBasicBlock before the stage
        if not tail.startswith("layer."):
            raise KeyError(f"unknown MONAI SwinUNETR-V2 conv block key {rest!r}")
        return stage + "res_block." + _decoder_key("encoder0." + tail)[len("encoder0.") :]
    if tail.endswith("attn.relative_position_index"):
        return None
    for old, new in _SWIN_BLOCK_RENAMES.items():
        tail = tail.replace(old, new)
    if not tail.startswith(("blocks.", "downsample.")):
        raise KeyError(f"unknown MONAI SwinTransformer stage key {rest!r}")
    return stage + tail


def convert_monai_swin_unetr(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """Rename a MONAI ``SwinUNETR`` state dict (or the encoder-only self-supervised ``model_swinvit.pt``) to
    :class:`~maskworks.models.volumetric.swin_unetr.SwinUNETR`'s keys (see the module docstring).

    Args:
        state_dict: the MONAI module's state dict (optionally wrapped in ``state_dict`` / ``model`` and prefixed
            with ``module.``).
        in_channels: accepted for the common converter signature; the first convolutions are not adapted.

    Returns:
        Our state dict and the dropped keys (the ``relative_position_index`` buffers; the heads of a
        self-supervised checkpoint).

    Raises:
        KeyError: an unknown key in a whole-model checkpoint.
    """
    sd = unwrap_state_dict(state_dict)
    out: StateDict = {}
    dropped: list[str] = []
    whole = any(key.startswith("swinViT.") for key in sd)
    for key, value in sd.items():
        if key.startswith("swinViT."):
            new = _swin_key(key[len("swinViT.") :])
        elif whole:
            if not _DECODER.fullmatch(key):
                raise KeyError(f"unknown MONAI SwinUNETR key {key!r}")
            new = _decoder_key(key)
        elif key.startswith(("patch_embed.", "layers")):  # self-supervised encoder checkpoint
            try:
                new = _swin_key(key)
            except KeyError:
                new = None
        else:
            new = None
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


def convert_monai(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """A MONAI ``UNETR``, ``SwinUNETR`` or ``DynUNet`` checkpoint -> maskworks keys (detected by its keys).

    Raises:
        ValueError: none of these layouts.
    """
    from maskworks.convert.dynunet import convert_monai_dynunet, is_monai_dynunet_state_dict

    if is_monai_dynunet_state_dict(state_dict):
        return convert_monai_dynunet(state_dict)
    if is_monai_unetr_state_dict(state_dict):
        return convert_monai_unetr(state_dict, in_channels)
    if is_monai_swin_unetr_state_dict(state_dict):
        return convert_monai_swin_unetr(state_dict, in_channels)
    raise ValueError(
        "not a supported MONAI checkpoint: expected UNETR ('vit.patch_embedding.position_embeddings', "
        "'decoder5.transp_conv.conv.weight'), SwinUNETR ('swinViT.patch_embed.proj.weight') or DynUNet "
        "('input_block.conv1.conv.weight') keys"
    )
