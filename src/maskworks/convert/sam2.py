"""Hugging Face ``Sam2Model`` checkpoints -> maskworks :class:`~maskworks.models.promptable.sam2.Sam2` (SAM 2, Ravi
et al., "SAM 2: Segment Anything in Images and Videos", 2024, image mode).

Key mapping (HF -> maskworks):

* ``vision_encoder.backbone.*`` -> ``image_encoder.trunk.*``: ``patch_embed.projection`` -> ``patch_embed.proj``;
  in ``blocks.{i}``: ``layer_norm1`` / ``layer_norm2`` -> ``norm1`` / ``norm2``, ``mlp.proj_in`` / ``mlp.proj_out``
  -> ``mlp.fc1`` / ``mlp.fc2`` (``attn.qkv``, ``attn.proj``, ``proj``, ``pos_embed``, ``pos_embed_window`` keep
  their names).
* ``vision_encoder.neck.convs.{i}`` -> ``image_encoder.neck.convs.{i}``; ``no_memory_embedding`` -> ``no_mem_embed``.
* ``prompt_encoder.shared_embedding.positional_embedding`` ->
  ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``; ``prompt_encoder.point_embed.weight`` ``(4, C)``
  -> ``prompt_encoder.point_embeddings.{0..3}.weight`` ``(1, C)`` each; ``prompt_encoder.mask_embed.conv1 /
  layer_norm1 / conv2 / layer_norm2 / conv3`` -> ``prompt_encoder.mask_downscaling.0 / 1 / 3 / 4 / 6``.
* ``mask_decoder.transformer``: ``layers.{l}.layer_norm{k}`` -> ``layers.{l}.norm{k}``, ``layers.{l}.mlp.proj_in /
  proj_out`` -> ``mlp.fc1 / fc2``, ``o_proj`` -> ``out_proj`` in every attention, ``layer_norm_final_attn`` ->
  ``norm_final_attn``.
* ``mask_decoder.upscale_conv1 / upscale_layer_norm / upscale_conv2`` -> ``mask_decoder.output_upscaling.0 / 1 / 3``.
* HF's ``Sam2FeedForward`` of ``n`` linear layers (``output_hypernetworks_mlps.{i}``, ``iou_prediction_head``,
  ``pred_obj_score_head``): ``proj_in`` / ``layers.{j}`` / ``proj_out`` -> ``layers.0`` / ``layers.{j + 1}`` /
  ``layers.{n - 1}``.
* The other ``prompt_encoder.*`` / ``mask_decoder.*`` keys (``not_a_point_embed``, ``no_mask_embed``, ``iou_token``,
  ``mask_tokens``, ``obj_score_token``, ``conv_s0``, ``conv_s1``, attention ``q_proj`` / ``k_proj`` / ``v_proj``)
  keep their names.

Dropped (and returned as ``dropped``):

* ``shared_image_embedding.positional_embedding``: HF keeps a second copy of the prompt encoder's random Fourier
  matrix for the dense image encoding; the official model, and ours, use one matrix for both (HF's conversion writes
  the same tensor into both). It is used only when the prompt encoder's copy is absent.
* The video-mode (memory) weights of ``Sam2VideoModel`` state dicts, which HF's ``Sam2Model`` also ignores on load:
  ``memory_attention.*``, ``memory_encoder.*``, ``memory_temporal_positional_encoding``, ``mask_downsample.*``,
  ``object_pointer_proj.*``, ``temporal_positional_encoding_projection_layer.*``, ``no_memory_positional_encoding``,
  ``no_object_pointer``, ``occlusion_spatial_embedding_parameter``, and any other key outside the image model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert._common import strip_wrapper_prefixes
from maskworks.convert.resnet import adapt_input_conv

__all__ = ["convert_hf_sam2", "is_hf_sam2_state_dict"]

StateDict = dict[str, torch.Tensor]

_BACKBONE = "vision_encoder.backbone."
_NECK = "vision_encoder.neck."
_PE = "prompt_encoder.shared_embedding.positional_embedding"
_SHARED_PE = "shared_image_embedding.positional_embedding"
_BLOCK_PARTS = {
    "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.",
    "mlp.proj_in.": "mlp.fc1.",
    "mlp.proj_out.": "mlp.fc2.",
}
_MASK_EMBED = {"conv1.": "0.", "layer_norm1.": "1.", "conv2.": "3.", "layer_norm2.": "4.", "conv3.": "6."}
_UPSCALE = {"upscale_conv1.": "output_upscaling.0.", "upscale_layer_norm.": "output_upscaling.1.",
            "upscale_conv2.": "output_upscaling.3."}  # fmt: skip
_TWO_WAY_PARTS = {"mlp.proj_in.": "mlp.fc1.", "mlp.proj_out.": "mlp.fc2.", "o_proj.": "out_proj."}
_LAYER_NORM = re.compile(r"\.layer_norm(\d)\.")
# an HF ``Sam2FeedForward`` with ``n`` linear layers: proj_in, layers.0 .. layers.{n - 3}, proj_out
_FEED_FORWARD = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head))\."
)


def is_hf_sam2_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``Sam2Model`` (or ``Sam2VideoModel``) state dict: a Hiera backbone's ``pos_embed_window`` under
    ``vision_encoder.backbone`` and the SAM 2 mask decoder's ``conv_s0``."""
    keys = strip_wrapper_prefixes(state_dict).keys()
    return _BACKBONE + "pos_embed_window" in keys and "mask_decoder.conv_s0.weight" in keys


def _feed_forward_depths(keys: list[str]) -> dict[str, int]:
    """Number of linear layers of every HF ``Sam2FeedForward`` of the mask decoder, by key prefix."""
    hidden: dict[str, int] = {}
    for key in keys:
        m = _FEED_FORWARD.match(key)
        if m:
            rest = key[m.end() :]
            count = hidden.setdefault(m.group(1), 0)
            if rest.startswith("layers."):
                hidden[m.group(1)] = max(count, int(rest.split(".")[1]) + 1)
    return {prefix: n + 2 for prefix, n in hidden.items()}


def _convert_mask_decoder(key: str, depths: Mapping[str, int]) -> str:
    m = _FEED_FORWARD.match(key)
    if m:
        prefix, rest = m.group(1), key[m.end() :]
        if rest.startswith("proj_in."):
            return f"{prefix}.layers.0.{rest[len('proj_in.') :]}"
        if rest.startswith("proj_out."):
            return f"{prefix}.layers.{depths[prefix] - 1}.{rest[len('proj_out.') :]}"
        if rest.startswith("layers."):
            _, j, tail = rest.split(".", 2)
            return f"{prefix}.layers.{int(j) + 1}.{tail}"
        return key
    for old, new in _UPSCALE.items():
        if key.startswith("mask_decoder." + old):
            return "mask_decoder." + new + key[len("mask_decoder." + old) :]
    if key.startswith("mask_decoder.transformer."):
        key = key.replace("transformer.layer_norm_final_attn.", "transformer.norm_final_attn.")
        key = _LAYER_NORM.sub(r".norm\1.", key)
        for old, new in _TWO_WAY_PARTS.items():
            key = key.replace("." + old, "." + new)
    return key


def convert_hf_sam2(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """Convert an HF ``Sam2Model`` state dict to :class:`~maskworks.models.promptable.sam2.Sam2` keys.

    Args:
        state_dict: the HF state dict (``module.`` / ``_orig_mod.`` prefixes are stripped).
        in_channels: input channels of the target; the patch-embedding conv is adapted when it differs from 3
            (:func:`~maskworks.convert.resnet.adapt_input_conv`), ``None`` keeps it.

    Returns:
        The converted state dict and the HF keys that were dropped (see the module docstring).
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    depths = _feed_forward_depths(list(state_dict))
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE):
            rest = key[len(_BACKBONE) :]
            rest = rest.replace("patch_embed.projection.", "patch_embed.proj.")
            if rest.startswith("blocks."):
                _, i, tail = rest.split(".", 2)
                for old, new in _BLOCK_PARTS.items():
                    if tail.startswith(old):
                        tail = new + tail[len(old) :]
                        break
                rest = f"blocks.{i}.{tail}"
            if rest == "patch_embed.proj.weight" and in_channels is not None:
                value = adapt_input_conv(value, in_channels)
            out["image_encoder.trunk." + rest] = value
        elif key.startswith(_NECK):
            out["image_encoder.neck." + key[len(_NECK) :]] = value
        elif key == "no_memory_embedding":
            out["no_mem_embed"] = value
        elif key == _PE:
            out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
        elif key == _SHARED_PE:
            if _PE not in state_dict:
                out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
            else:
                dropped.append(key)
        elif key == "prompt_encoder.point_embed.weight":
            for i in range(value.shape[0]):
                out[f"prompt_encoder.point_embeddings.{i}.weight"] = value[i : i + 1].clone()
        elif key.startswith("prompt_encoder.mask_embed."):
            rest = key[len("prompt_encoder.mask_embed.") :]
            for old, new in _MASK_EMBED.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out["prompt_encoder.mask_downscaling." + rest] = value
        elif key.startswith("prompt_encoder."):
            out[key] = value
        elif key.startswith("mask_decoder."):
            out[_convert_mask_decoder(key, depths)] = value
        else:  # memory attention / encoder, object pointers and the other video-mode weights
            dropped.append(key)
    return out, dropped
