"""SAM checkpoints -> maskworks :class:`~maskworks.models.promptable.Sam`.

Two layouts load: the official ``segment_anything`` one (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
``sam_vit_h_4b8939.pth``) and Hugging Face's ``SamModel`` (``facebook/sam-vit-base`` ...).

==============================================================  ==============================================
official ``segment_anything``                                   maskworks
==============================================================  ==============================================
``*.mlp.lin1`` / ``*.mlp.lin2`` (encoder and decoder blocks)    ``*.mlp.fc1`` / ``*.mlp.fc2``
everything else                                                 the same name
==============================================================  ==============================================

==================================================================  ==========================================
HF ``SamModel``                                                     maskworks
==================================================================  ==========================================
``vision_encoder.patch_embed.projection``                           ``image_encoder.patch_embed.proj``
``vision_encoder.pos_embed``                                        ``image_encoder.pos_embed``
``vision_encoder.layers.{i}.layer_norm1`` / ``layer_norm2``         ``image_encoder.blocks.{i}.norm1`` / ``norm2``
``vision_encoder.layers.{i}.attn.*`` / ``mlp.lin1`` / ``lin2``      ``image_encoder.blocks.{i}.attn.*`` / ``mlp.fc1``
                                                                    / ``fc2``
``vision_encoder.neck.conv1`` / ``layer_norm1`` / ``conv2`` /       ``image_encoder.neck.0`` / ``1`` / ``2`` / ``3``
``layer_norm2``
``shared_image_embedding.positional_embedding``                     ``prompt_encoder.pe_layer.positional_encoding_
                                                                    gaussian_matrix``
``prompt_encoder.shared_embedding.positional_embedding``            skipped (a tied copy of the same tensor)
``prompt_encoder.point_embed.{i}``                                  ``prompt_encoder.point_embeddings.{i}``
``prompt_encoder.mask_embed.conv1`` / ``layer_norm1`` / ``conv2``   ``prompt_encoder.mask_downscaling.0`` / ``1`` /
/ ``layer_norm2`` / ``conv3``                                       ``3`` / ``4`` / ``6``
``mask_decoder.transformer.layers.{l}.layer_norm{n}``               ``mask_decoder.transformer.layers.{l}.norm{n}``
``mask_decoder.transformer.layer_norm_final_attn``                  ``mask_decoder.transformer.norm_final_attn``
``mask_decoder.upscale_conv1`` / ``upscale_layer_norm`` /           ``mask_decoder.output_upscaling.0`` / ``1`` /
``upscale_conv2``                                                   ``3``
``...mlps.{i}.proj_in`` / ``layers.{j}`` / ``proj_out`` (and the    ``...mlps.{i}.layers.0`` / ``layers.{j + 1}`` /
IoU head)                                                           ``layers.{n - 1}``
==================================================================  ==========================================

HF keeps the Gaussian matrix as a parameter (256 more parameters than the official model, where it is a buffer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = [
    "convert_hf_sam",
    "convert_segment_anything",
    "is_hf_sam_state_dict",
    "is_segment_anything_state_dict",
]

StateDict = dict[str, torch.Tensor]


def is_segment_anything_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """The official ``segment_anything`` layout (or ours, which differs only in the MLP names)."""
    return "image_encoder.patch_embed.proj.weight" in state_dict and "mask_decoder.iou_token.weight" in state_dict


def is_hf_sam_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A Hugging Face ``SamModel`` state dict."""
    return "vision_encoder.patch_embed.projection.weight" in state_dict and "mask_decoder.iou_token.weight" in (
        state_dict
    )


def convert_segment_anything(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """An official ``segment_anything`` state dict -> maskworks keys (``mlp.lin1/2`` -> ``mlp.fc1/2``)."""
    out = {re.sub(r"\.mlp\.lin([12])\.", r".mlp.fc\1.", k): v for k, v in state_dict.items()}
    return out, []


_HF_RULES: list[tuple[str, str]] = [
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^vision_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"\.mlp\.lin([12])\.", r".mlp.fc\1."),
]

_HF_MLP = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\."
)


def convert_hf_sam(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[StateDict, list[str]]:
    """A Hugging Face ``SamModel`` state dict -> maskworks keys (nothing is dropped: the prompt encoder's tied copy
    of the Gaussian matrix is skipped unless it is the only one)."""
    # depth of each HF MLP: proj_in + hidden layers + proj_out
    hidden: dict[str, int] = {}
    for key in state_dict:
        m = _HF_MLP.match(key)
        if m and m.group(3) is not None:
            hidden[m.group(1)] = max(hidden.get(m.group(1), 0), int(m.group(3)) + 1)
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("prompt_encoder.shared_embedding."):
            if "shared_image_embedding.positional_embedding" in state_dict:
                continue
            key = "shared_image_embedding.positional_embedding"
        m = _HF_MLP.match(key)
        if m:
            mlp, part = m.group(1), m.group(2)
            if part == "proj_in":
                index = 0
            elif part == "proj_out":
                index = hidden.get(mlp, 0) + 1
            else:
                index = int(m.group(3)) + 1
            out[f"{mlp}.layers.{index}." + key[m.end() :]] = value
            continue
        for pattern, repl in _HF_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out, []
