"""Hugging Face, NVlabs and smp SegFormer / MiT checkpoints -> maskworks
:class:`~maskworks.backbones.mit.MixTransformer` / :class:`~maskworks.models.semantic.segformer.SegFormer` keys.

Hugging Face (:func:`convert_hf_segformer`): ``SegformerModel`` (no prefix), ``SegformerForImageClassification``
(``segformer.`` prefix, ``classifier.*`` dropped) and ``SegformerForSemanticSegmentation`` (``segformer.`` +
``decode_head.*``), each in the hub key layout (``encoder.block.{s}.{b}.attention.self.query``: the files of
``nvidia/mit-b*`` and ``nvidia/segformer-b*-finetuned-*``) or in the one transformers 5 builds in memory
(``stages.{s}.blocks.{b}.attention.q_proj``; transformers 5 renames the hub keys on load).

===================================================================  ==============================================
HF hub layout / transformers 5 layout                                maskworks
===================================================================  ==============================================
``encoder.patch_embeddings.{s}.proj / layer_norm``                   ``stages.{s}.patch_embed.proj / norm``
``stages.{s}.patch_embeddings.proj / layer_norm``
``encoder.block.{s}.{b}.layer_norm_1 / layer_norm_2``                ``stages.{s}.blocks.{b}.norm1 / norm2``
``stages.{s}.blocks.{b}.layernorm_before / layernorm_after``
``...attention.self.query / key / value``                            ``...attn.q / k / v``
``...attention.q_proj / k_proj / v_proj``
``...attention.self.sr / layer_norm``                                ``...attn.sr / norm``
``...attention.sequence_reduction.sequence_reduction / layer_norm``
``...attention.output.dense`` / ``...attention.o_proj``              ``...attn.proj``
``...mlp.dense1 / dense2`` / ``...mlp.fc1 / fc2``                    ``...mlp.fc1 / fc2``
``...mlp.dwconv.dwconv``                                             ``...mlp.dwconv``
``encoder.layer_norm.{s}`` / ``stages.{s}.layer_norm``               ``stages.{s}.norm``
``decode_head.linear_c.{i}.proj`` / ``linear_projections.{i}.proj``  ``decode_head.linear_c.{i}``
``decode_head.linear_fuse`` / ``decode_head.batch_norm``             ``decode_head.linear_fuse.conv / bn``
``decode_head.classifier``                                           ``decode_head.classifier``
``classifier`` (ImageNet head)                                       dropped
===================================================================  ==============================================

A whole segmentation checkpoint converts to model keys (encoder under ``encoder.``); an encoder-only one to bare
backbone keys, which :func:`maskworks.load_weights` routes into ``model.encoder``.

NVlabs / smp (:func:`convert_nvlabs_mit`, :func:`convert_smp_mit`): the original MiT layout
(``patch_embed{s+1}.proj / norm``, ``block{s+1}.{b}.norm1 / attn.q / attn.kv / attn.sr / attn.norm / attn.proj /
norm2 / mlp.fc1 / mlp.dwconv.dwconv / mlp.fc2``, ``norm{s+1}``, ImageNet ``head``), which smp's ``mit_b*``
encoders keep under ``encoder.``; the fused ``attn.kv`` is split (keys first). smp's ``Segformer`` decoder
(``decoder.mlp_stage.{j}.linear``: coarsest first; ``decoder.fuse_stage.0 / 1``; ``segmentation_head.0``) maps to
ours; smp upsamples its logits with ``align_corners=True`` (ours and HF: ``False``), so only the stride-4 logits
agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from maskworks.convert._common import unwrap_state_dict
from maskworks.convert.resnet import adapt_input_conv

__all__ = [
    "convert_hf_segformer",
    "convert_nvlabs_mit",
    "convert_smp_mit",
    "is_hf_segformer_state_dict",
    "is_mit_state_dict",
    "is_nvlabs_mit_state_dict",
]

_FIRST_CONV = "stages.0.patch_embed.proj.weight"

# HF block sub-keys (both layouts) -> ours
_HF_BLOCK_PARTS = (
    ("layer_norm_1.", "norm1."),
    ("layer_norm_2.", "norm2."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.self.query.", "attn.q."),
    ("attention.self.key.", "attn.k."),
    ("attention.self.value.", "attn.v."),
    ("attention.self.sr.", "attn.sr."),
    ("attention.self.layer_norm.", "attn.norm."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.q_proj.", "attn.q."),
    ("attention.k_proj.", "attn.k."),
    ("attention.v_proj.", "attn.v."),
    ("attention.o_proj.", "attn.proj."),
    ("attention.sequence_reduction.sequence_reduction.", "attn.sr."),
    ("attention.sequence_reduction.layer_norm.", "attn.norm."),
    ("mlp.dense1.", "mlp.fc1."),
    ("mlp.dense2.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("mlp.dwconv.dwconv.", "mlp.dwconv."),
)
_HF_ENCODER = (
    (re.compile(r"^encoder\.patch_embeddings\.(\d+)\.proj\.(.+)$"), r"stages.\1.patch_embed.proj.\2"),
    (re.compile(r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.(.+)$"), r"stages.\1.patch_embed.norm.\2"),
    (re.compile(r"^stages\.(\d+)\.patch_embeddings\.proj\.(.+)$"), r"stages.\1.patch_embed.proj.\2"),
    (re.compile(r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.(.+)$"), r"stages.\1.patch_embed.norm.\2"),
    (re.compile(r"^encoder\.layer_norm\.(\d+)\.(.+)$"), r"stages.\1.norm.\2"),
    (re.compile(r"^stages\.(\d+)\.layer_norm\.(.+)$"), r"stages.\1.norm.\2"),
)
_HF_BLOCK = re.compile(r"^(?:encoder\.block\.(\d+)\.(\d+)|stages\.(\d+)\.blocks\.(\d+))\.(.+)$")
_HF_HEAD = re.compile(r"^decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.(.+)$")
_HF_HEAD_FIXED = {
    "decode_head.linear_fuse.weight": "decode_head.linear_fuse.conv.weight",
    "decode_head.classifier.weight": "decode_head.classifier.weight",
    "decode_head.classifier.bias": "decode_head.classifier.bias",
}
_HF_MARKERS = (
    "encoder.patch_embeddings.0.proj.weight",
    "stages.0.patch_embeddings.proj.weight",
)


def _strip_segformer(key: str) -> str:
    return key[len("segformer.") :] if key.startswith("segformer.") else key


def is_hf_segformer_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a Hugging Face ``SegformerModel`` / ``SegformerForImageClassification`` /
    ``SegformerForSemanticSegmentation`` state dict, hub or transformers-5 layout."""
    keys = {_strip_segformer(k) for k in unwrap_state_dict(state_dict)}
    return any(m in keys for m in _HF_MARKERS)


def is_mit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a bare maskworks MiT backbone state dict (``stages.0.patch_embed.proj.weight`` and
    ``stages.0.blocks.0.attn.q.weight``)."""
    return _FIRST_CONV in state_dict and "stages.0.blocks.0.attn.q.weight" in state_dict


def is_nvlabs_mit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a bare MiT in the NVlabs layout (``patch_embed1.proj.weight``, ``block1.0.attn.kv.weight``), as in
    the original ``mit_b*.pth`` ImageNet release and smp's encoder weights."""
    keys = unwrap_state_dict(state_dict)
    return "patch_embed1.proj.weight" in keys and "block1.0.attn.kv.weight" in keys


def _hf_key(key: str) -> str | None:
    """Our key for an HF key (``segformer.`` already stripped), or ``None`` for a key to drop."""
    for pattern, repl in _HF_ENCODER:
        if pattern.match(key):
            return pattern.sub(repl, key)
    m = _HF_BLOCK.match(key)
    if m:
        stage = m.group(1) if m.group(1) is not None else m.group(3)
        block = m.group(2) if m.group(2) is not None else m.group(4)
        rest = m.group(5)
        for theirs, ours in _HF_BLOCK_PARTS:
            if rest.startswith(theirs):
                return f"stages.{stage}.blocks.{block}.{ours}{rest[len(theirs) :]}"
        raise ValueError(f"unexpected Hugging Face Segformer block key {key!r}")
    m = _HF_HEAD.match(key)
    if m:
        return f"decode_head.linear_c.{m.group(1)}.{m.group(2)}"
    if key in _HF_HEAD_FIXED:
        return _HF_HEAD_FIXED[key]
    if key.startswith("decode_head.batch_norm."):
        return "decode_head.linear_fuse.bn." + key[len("decode_head.batch_norm.") :]
    if key.startswith("classifier."):
        return None
    raise ValueError(f"unexpected Hugging Face Segformer key {key!r}")


def convert_hf_segformer(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face ``Segformer*`` state dict -> maskworks keys (table in the module docstring).

    Args:
        state_dict: the HF state dict (hub or transformers-5 layout, with or without the ``segformer.`` prefix).
        in_channels: input channels of the target; the first patch-embedding conv is adapted when it differs.
        model: unused (accepted for the common converter signature).

    Returns:
        The converted state dict (``encoder.*`` + ``decode_head.*`` for a ``SegformerForSemanticSegmentation``,
        bare backbone keys otherwise) and the dropped keys (the ImageNet ``classifier.*``).

    Raises:
        ValueError: not an HF Segformer state dict, or a key that is not part of one.
    """
    del model
    if not is_hf_segformer_state_dict(state_dict):
        raise ValueError(
            "state_dict is not a Hugging Face Segformer state dict (segformer.encoder.patch_embeddings...)"
        )
    source = unwrap_state_dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in source.items():
        ours = _hf_key(_strip_segformer(key))
        if ours is None:
            dropped.append(key)
        else:
            out[ours] = value
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    if any(k.startswith("decode_head.") for k in out):  # a whole segmentation model: the encoder goes under encoder.
        out = {(k if k.startswith("decode_head.") else f"encoder.{k}"): v for k, v in out.items()}
    return out, dropped


# ---------------------------------------------------------------------------------------------------------------
# NVlabs / smp layout
# ---------------------------------------------------------------------------------------------------------------

_NV_PATCH = re.compile(r"^patch_embed(\d)\.(proj|norm)\.(.+)$")
_NV_BLOCK = re.compile(r"^block(\d)\.(\d+)\.(.+)$")
_NV_NORM = re.compile(r"^norm(\d)\.(.+)$")
_NV_BLOCK_PARTS = {"mlp.dwconv.dwconv.": "mlp.dwconv."}


def _nvlabs_mit(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        m = _NV_PATCH.match(key)
        if m:
            out[f"stages.{int(m.group(1)) - 1}.patch_embed.{m.group(2)}.{m.group(3)}"] = value
            continue
        m = _NV_NORM.match(key)
        if m:
            out[f"stages.{int(m.group(1)) - 1}.norm.{m.group(2)}"] = value
            continue
        m = _NV_BLOCK.match(key)
        if m:
            prefix, rest = f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.kv."):
                k, v = value.chunk(2, dim=0)  # reshape(B, N, 2, heads, d): keys are the first half
                suffix = rest[len("attn.kv.") :]
                out[f"{prefix}attn.k.{suffix}"], out[f"{prefix}attn.v.{suffix}"] = k, v
                continue
            for theirs, ours in _NV_BLOCK_PARTS.items():
                if rest.startswith(theirs):
                    rest = ours + rest[len(theirs) :]
            out[prefix + rest] = value
            continue
        dropped.append(key)  # head.* (ImageNet classifier) and anything else
    return out, dropped


def convert_nvlabs_mit(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A bare MiT in the NVlabs layout (``mit_b*.pth``, smp's encoder weights) -> backbone keys; ``head.*``
    dropped, ``attn.kv`` split into ``attn.k`` / ``attn.v``, the first conv adapted to ``in_channels``."""
    del model
    out, dropped = _nvlabs_mit(unwrap_state_dict(state_dict))
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped


def convert_mit(
    state_dict: Mapping[str, torch.Tensor], in_channels: int | None = None, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A bare MiT backbone in our keys or the NVlabs layout -> backbone keys (first conv adapted)."""
    if is_nvlabs_mit_state_dict(state_dict):
        return convert_nvlabs_mit(state_dict, in_channels)
    out = dict(unwrap_state_dict(state_dict))
    dropped = [k for k in out if k.startswith("head.")]
    for k in dropped:
        del out[k]
    if in_channels is not None and _FIRST_CONV in out:
        out[_FIRST_CONV] = adapt_input_conv(out[_FIRST_CONV], in_channels)
    return out, dropped


_SMP_MLP = re.compile(r"^decoder\.mlp_stage\.(\d+)\.linear\.(.+)$")


def convert_smp_mit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the MiT parts of an smp checkpoint (``smp.Unet("mit_b*")``, ``smp.Segformer(...)``...) to ours.

    ``encoder.<NVlabs MiT keys>`` -> ``encoder.<our MiT keys>`` (``attn.kv`` split); for an smp ``Segformer``
    also ``decoder.mlp_stage.{j}.linear`` -> ``decode_head.linear_c.{3-j}``, ``decoder.fuse_stage.0`` ->
    ``decode_head.linear_fuse.conv``, ``decoder.fuse_stage.1`` -> ``decode_head.linear_fuse.bn``,
    ``segmentation_head.0`` -> ``decode_head.classifier``. Other keys (another decoder's) pass through unchanged,
    so this is a no-op on checkpoints without a MiT encoder.
    """
    enc = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if not is_nvlabs_mit_state_dict(enc):
        return dict(state_dict)
    converted, _ = _nvlabs_mit(enc)
    out = {f"encoder.{k}": v for k, v in converted.items()}
    segformer = any(k.startswith("decoder.mlp_stage.") for k in state_dict)
    n = sum(1 for k in state_dict if _SMP_MLP.match(k) and k.endswith(".weight"))
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            continue
        if segformer:
            m = _SMP_MLP.match(key)
            if m:
                out[f"decode_head.linear_c.{n - 1 - int(m.group(1))}.{m.group(2)}"] = value
                continue
            if key.startswith("decoder.fuse_stage.0."):
                out["decode_head.linear_fuse.conv." + key[len("decoder.fuse_stage.0.") :]] = value
                continue
            if key.startswith("decoder.fuse_stage.1."):
                out["decode_head.linear_fuse.bn." + key[len("decoder.fuse_stage.1.") :]] = value
                continue
            if key.startswith("segmentation_head.0."):
                out["decode_head.classifier." + key[len("segmentation_head.0.") :]] = value
                continue
        out[key] = value
    return out
