"""timm, torchvision and Hugging Face Swin Transformer V1 / V2 checkpoints -> maskworks
:class:`~maskworks.backbones.swin.SwinTransformer` / :class:`~maskworks.backbones.swin_v2.SwinTransformerV2` keys.

timm (:func:`convert_timm_swin`): the keys are the same; the classifier (``head.*``) is dropped, as are the buffers
that timm keeps out of its state dict but older checkpoints may carry (``relative_position_index``,
``relative_coords_table``, ``k_bias``, ``attn_mask``), and the patch-embedding convolution
(``patch_embed.proj.weight``) is adapted when the target takes another number of input channels. A V2 checkpoint in
the original layout (patch merging at the end of a stage, so stage 0 has one) has its ``layers.N.downsample`` moved
to ``layers.N+1.downsample``, as timm's checkpoint filter does.

torchvision ``swin_*`` / ``swin_v2_*`` (:func:`convert_torchvision_swin`) and HF ``Swin*`` / ``Swinv2*``
(:func:`convert_hf_swin`) are renamed; their tables are in the functions' docstrings. All three compute the same
blocks and the same patch-merging channel order, so no weight is permuted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from maskworks.convert._common import unwrap_state_dict
from maskworks.convert.resnet import adapt_input_conv

__all__ = [
    "convert_hf_swin",
    "convert_timm_swin",
    "convert_torchvision_swin",
    "is_hf_swin_state_dict",
    "is_swin_state_dict",
    "is_torchvision_swin_state_dict",
]

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


# ---------------------------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------------------------

_TV_STEM = {
    "features.0.0.weight": "patch_embed.proj.weight",
    "features.0.0.bias": "patch_embed.proj.bias",
    "features.0.2.weight": "patch_embed.norm.weight",
    "features.0.2.bias": "patch_embed.norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_TV_FEATURE = re.compile(r"^features\.(\d+)\.(.+)$")
_TV_BLOCK = re.compile(r"^(\d+)\.(.+)$")
_TV_BLOCK_PARTS = {  # torchvision block sub-key prefix -> ours
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "mlp.0.": "mlp.fc1.",
    "mlp.3.": "mlp.fc2.",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",  # V1; V2 splits it into q_bias / v_bias
    "attn.proj.": "attn.proj.",
    "attn.relative_position_bias_table": "attn.relative_position_bias_table",
    "attn.logit_scale": "attn.logit_scale",
    "attn.cpb_mlp.": "attn.cpb_mlp.",
}


def is_torchvision_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a torchvision ``swin_t/s/b`` / ``swin_v2_t/s/b`` state dict (``features.0.0.weight`` patch
    embedding and ``features.1.0.attn.qkv.weight``)."""
    keys = unwrap_state_dict(state_dict)
    return "features.0.0.weight" in keys and "features.1.0.attn.qkv.weight" in keys


def convert_torchvision_swin(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision ``swin_t/s/b`` (V1) or ``swin_v2_t/s/b`` (V2) state dict -> backbone keys.

    ==============================================================  ================================================
    torchvision                                                     maskworks
    ==============================================================  ================================================
    ``features.0.0`` / ``features.0.2`` (conv, LayerNorm)           ``patch_embed.proj`` / ``patch_embed.norm``
    ``features.{2s+1}.{b}.norm1 / norm2 / attn.proj``               ``layers.{s}.blocks.{b}.norm1 / norm2 / attn.proj``
    ``features.{2s+1}.{b}.mlp.0`` / ``mlp.3``                       ``layers.{s}.blocks.{b}.mlp.fc1`` / ``mlp.fc2``
    ``...attn.qkv.weight``, ``relative_position_bias_table`` (V1),  the same names
    ``logit_scale``, ``cpb_mlp.{0,2}`` (V2)
    ``...attn.qkv.bias`` (V2: ``[q; k; v]``)                        V1: ``attn.qkv.bias``; V2: ``attn.q_bias`` and
                                                                    ``attn.v_bias`` (torchvision zeroes the key third
                                                                    in its forward; ours is a zero buffer)
    ``features.{2s}.reduction / norm`` (patch merging, s = 1..3)    ``layers.{s}.downsample.reduction / norm``
    ``norm``                                                        ``norm``
    ``head``, ``...relative_position_index``,                       dropped and reported
    ``...relative_coords_table``
    ==============================================================  ================================================

    torchvision's ``PatchMerging`` / ``PatchMergingV2`` concatenate ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    x[1::2, 1::2]``, the channel order of ours (and timm's), and place the norm as ours (V1: before the reduction
    over ``4 C``; V2: after it over ``2 C``), so the merging weights are copied unchanged.

    Args:
        state_dict: the torchvision state dict.
        in_channels: input channels of the target backbone; ``patch_embed.proj.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys.

    Raises:
        ValueError: not a torchvision Swin state dict, or a key that is not part of one.
    """
    if not is_torchvision_swin_state_dict(state_dict):
        raise ValueError("state_dict is not a torchvision SwinTransformer state dict (features.0.0.weight ...)")
    source = unwrap_state_dict(state_dict)
    v2 = any(k.endswith("attn.logit_scale") for k in source)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in source.items():
        if key.startswith("head.") or key.rsplit(".", 1)[-1] in _BUFFERS:
            dropped.append(key)
            continue
        if key in _TV_STEM:
            out[_TV_STEM[key]] = value
            continue
        m = _TV_FEATURE.match(key)
        if m is None or m.group(1) == "0":
            raise ValueError(f"unexpected key {key!r} in a torchvision Swin state dict")
        index, rest = int(m.group(1)), m.group(2)
        if index % 2 == 0:  # patch merging before stage index // 2
            if not rest.startswith(("reduction.", "norm.")):
                raise ValueError(f"unexpected key {key!r} in a torchvision Swin patch merging")
            out[f"layers.{index // 2}.downsample.{rest}"] = value
            continue
        b = _TV_BLOCK.match(rest)
        part = next((p for p in _TV_BLOCK_PARTS if b and b.group(2).startswith(p)), None)
        if part is None:
            raise ValueError(f"unexpected key {key!r} in a torchvision Swin block")
        prefix = f"layers.{index // 2}.blocks.{b.group(1)}."
        if v2 and part == "attn.qkv.bias":
            q, _, v = value.chunk(3)
            out[prefix + "attn.q_bias"], out[prefix + "attn.v_bias"] = q, v
            continue
        out[prefix + _TV_BLOCK_PARTS[part] + b.group(2)[len(part) :]] = value
    return _adapt(out, in_channels), dropped


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------------------------

_HF_PREFIXES = ("swin.", "swinv2.")
_HF_FIXED = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.norm.weight": "patch_embed.norm.weight",
    "embeddings.norm.bias": "patch_embed.norm.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DROPPED = ("classifier.", "pooler.", "embeddings.mask_token", "decoder.")
_HF_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_HF_DOWNSAMPLE = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.((?:reduction|norm)\.(?:weight|bias))$")
_HF_STAGE_NORM = re.compile(r"^hidden_states_norms\.stage(\d+)\.(weight|bias)$")
_HF_QKV = re.compile(r"^attention\.(?:self\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_HF_BLOCK_PARTS = {  # HF block sub-key prefix (hub layout and transformers >= 5 layout) -> ours
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "attention.output.dense.": "attn.proj.",
    "attention.o_proj.": "attn.proj.",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.logit_scale": "attn.logit_scale",
    "attention.self.continuous_position_bias_mlp.": "attn.cpb_mlp.",
}
_QKV_INDEX = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def _strip_hf_prefix(key: str) -> str:
    for prefix in _HF_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_hf_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an HF ``SwinModel`` / ``SwinForImageClassification`` / ``SwinBackbone`` or ``Swinv2Model`` /
    ``Swinv2ForImageClassification`` / ``Swinv2Backbone`` state dict (either key layout, ``swin.`` / ``swinv2.``
    prefix optional)."""
    keys = {_strip_hf_prefix(k) for k in unwrap_state_dict(state_dict)}
    return "embeddings.patch_embeddings.projection.weight" in keys and any(
        k.startswith("encoder.layers.0.blocks.0.") for k in keys
    )


def convert_hf_swin(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF Swin V1 / V2 state dict -> :class:`~maskworks.backbones.swin.SwinTransformer` /
    :class:`~maskworks.backbones.swin_v2.SwinTransformerV2` keys.

    Hub checkpoints use the names of transformers < 5; transformers 5 renamed the V1 attention and MLP modules in
    memory (``attention.{q,k,v,o}_proj``, ``attention.relative_position_bias.relative_position_bias_table``,
    ``mlp.fc1/fc2``) and prefixes ``SwinBackbone``'s keys with ``swin.``. Both layouts convert:

    ===============================================================  ==============================================
    HF (``swin.`` / ``swinv2.`` prefix optional)                     maskworks
    ===============================================================  ==============================================
    ``embeddings.patch_embeddings.projection`` / ``embeddings.norm``  ``patch_embed.proj`` / ``patch_embed.norm``
    ``encoder.layers.{s}.blocks.{b}.attention.self.{query,key,       ``layers.{s}.blocks.{b}.attn.qkv`` (q, k, v
    value}`` / ``attention.{q,k,v}_proj``                            concatenated); V2: ``attn.qkv.weight`` and the
                                                                     query / value biases as ``attn.q_bias`` /
                                                                     ``attn.v_bias``
    ``...attention.output.dense`` / ``attention.o_proj``             ``...attn.proj``
    ``...attention.self.relative_position_bias_table`` /             ``...attn.relative_position_bias_table``
    ``attention.relative_position_bias.relative_position_bias_table``
    ``...attention.self.logit_scale`` / ``continuous_position_bias_  ``...attn.logit_scale`` / ``attn.cpb_mlp.{0,2}``
    mlp.{0,2}`` (V2)
    ``...layernorm_before`` / ``layernorm_after``                    ``...norm1`` / ``norm2`` (same roles in V1's
                                                                     pre-norm and V2's res-post-norm blocks)
    ``...intermediate.dense`` / ``mlp.fc1``, ``output.dense`` /      ``...mlp.fc1``, ``mlp.fc2``
    ``mlp.fc2``
    ``encoder.layers.{s}.downsample`` (end of stage ``s``)           ``layers.{s+1}.downsample`` (start of the next)
    ``layernorm``                                                    ``norm``
    ``hidden_states_norms.stage{n}`` (``*Backbone``)                 ``stage_norms.{n-1}`` (``out_norms=True``)
    ``classifier``, ``embeddings.mask_token``, ``decoder.*``,         dropped and reported
    ``...relative_position_index`` / ``relative_coords_table``
    ===============================================================  ==============================================

    HF's patch merging concatenates the 2x2 neighbours in the order of ours. ``SwinModel``'s
    ``reshaped_hidden_states`` are taken after each stage's downsampling unless
    ``output_hidden_states_before_downsampling=True`` (which ``SwinBackbone`` uses); our stage maps are the latter.
    ``SwinBackbone`` runs with ``always_partition=True`` (shifted windows kept when a map is no larger than the
    window), which ours does not do: its feature maps equal ours only where every map is larger than the window.

    Args:
        state_dict: the HF state dict (hub layout or transformers >= 5 layout).
        in_channels: input channels of the target backbone; ``patch_embed.proj.weight`` is adapted when it differs.

    Returns:
        The converted state dict and the dropped keys (in the checkpoint's naming).

    Raises:
        ValueError: not an HF Swin state dict, a key that is not part of one (e.g. ``position_embeddings`` of
            ``use_absolute_embeddings=True``, which our backbones do not have), or a q / k / v projection without
            its siblings.
    """
    if not is_hf_swin_state_dict(state_dict):
        raise ValueError(
            "state_dict is not an HF Swin / Swinv2 state dict (embeddings.patch_embeddings.projection ...)"
        )
    source = unwrap_state_dict(state_dict)
    v2 = any("continuous_position_bias_mlp" in k for k in source)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[str, str], list[torch.Tensor | None]] = {}
    for raw_key, value in source.items():
        key = _strip_hf_prefix(raw_key)
        if key.startswith(_HF_DROPPED) or key.rsplit(".", 1)[-1] in _BUFFERS:
            dropped.append(raw_key)
            continue
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
            continue
        m = _HF_DOWNSAMPLE.match(key)
        if m:
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = value
            continue
        m = _HF_STAGE_NORM.match(key)
        if m and int(m.group(1)) >= 1:
            out[f"stage_norms.{int(m.group(1)) - 1}.{m.group(2)}"] = value
            continue
        m = _HF_BLOCK.match(key)
        if m is None:
            raise ValueError(f"unexpected key {raw_key!r} in an HF Swin state dict")
        prefix, rest = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
        q = _HF_QKV.match(rest)
        if q:
            name, kind = q.group(1) or q.group(2), q.group(3)
            if v2 and kind == "bias":  # V2: a query and a value bias (the key has none)
                if _QKV_INDEX[name] == 1:
                    dropped.append(raw_key)
                else:
                    out[prefix + ("attn.q_bias" if _QKV_INDEX[name] == 0 else "attn.v_bias")] = value
                continue
            qkv.setdefault((prefix, kind), [None, None, None])[_QKV_INDEX[name]] = value
            continue
        part = next((p for p in _HF_BLOCK_PARTS if rest.startswith(p)), None)
        if part is None:
            raise ValueError(f"unexpected key {raw_key!r} in an HF Swin block")
        out[prefix + _HF_BLOCK_PARTS[part] + rest[len(part) :]] = value
    for (prefix, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"{prefix.rstrip('.')}: the query / key / value {kind}s must all be present")
        out[f"{prefix}attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # (3 C, C) or (3 C,)
    return _adapt(out, in_channels), dropped


def _adapt(out: dict[str, torch.Tensor], in_channels: int | None) -> dict[str, torch.Tensor]:
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out
