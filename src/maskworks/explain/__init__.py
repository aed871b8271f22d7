"""Explaining models: attention maps and rollout for Vision Transformers, attention complexity reports."""

from maskworks.explain.attention import (
    attention_maps,
    attention_rollout,
    cls_attention,
    overlay_attention,
    plot_head_attention,
)
from maskworks.explain.complexity import attention_complexity, attention_macs, plot_complexity, vit_macs

__all__ = [
    "attention_complexity",
    "attention_macs",
    "attention_maps",
    "attention_rollout",
    "cls_attention",
    "overlay_attention",
    "plot_complexity",
    "plot_head_attention",
    "vit_macs",
]
