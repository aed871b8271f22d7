"""Model-agnostic building blocks shared by backbones and models."""

from maskworks.layers.aspp import ASPP, SeparableConv2d
from maskworks.layers.atrous import (
    GriddingReport,
    check_gridding,
    effective_kernel_size,
    hdc_max_distance,
    receptive_field,
    receptive_field_mask,
)
from maskworks.layers.conv import ConvBNReLU, ConvNormAct, create_act
from maskworks.layers.deform_attn import MultiScaleDeformableAttention, multi_scale_deformable_attention
from maskworks.layers.deform_conv import DeformConv2d
from maskworks.layers.efficient_attention import (
    LinearAttention,
    PerformerAttention,
    PooledKVAttention,
    WindowAttention2d,
)
from maskworks.layers.fpn import FeaturePyramid
from maskworks.layers.norm import GlobalResponseNorm, LayerNorm2d, PooledBatchNorm2d
from maskworks.layers.ppm import PSPModule
from maskworks.layers.rel_pos import RelPosAttention, decomposed_rel_pos_bias, get_rel_pos
from maskworks.layers.vit_layers import (
    Attention,
    Block,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    capture_attention,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    resample_abs_pos_embed,
    resample_patch_embed,
)
from maskworks.layers.window import (
    PatchMerging,
    RelativePositionBias,
    WindowAttention,
    pad_to_window,
    relative_position_index,
    resize_relative_position_bias_table,
    shifted_window_attention,
    shifted_window_mask,
    window_and_shift_for_size,
    window_partition,
    window_reverse,
)

__all__ = [
    "RelPosAttention",
    "decomposed_rel_pos_bias",
    "get_rel_pos",
    "ASPP",
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "LinearAttention",
    "Mlp",
    "PatchEmbed",
    "PerformerAttention",
    "PooledKVAttention",
    "WindowAttention2d",
    "capture_attention",
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "resample_abs_pos_embed",
    "resample_patch_embed",
    "ConvBNReLU",
    "ConvNormAct",
    "DeformConv2d",
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attention",
    "FeaturePyramid",
    "GlobalResponseNorm",
    "LayerNorm2d",
    "GriddingReport",
    "PSPModule",
    "PooledBatchNorm2d",
    "SeparableConv2d",
    "check_gridding",
    "create_act",
    "effective_kernel_size",
    "hdc_max_distance",
    "receptive_field",
    "receptive_field_mask",
    "PatchMerging",
    "RelativePositionBias",
    "WindowAttention",
    "pad_to_window",
    "relative_position_index",
    "resize_relative_position_bias_table",
    "shifted_window_attention",
    "shifted_window_mask",
    "window_and_shift_for_size",
    "window_partition",
    "window_reverse",
]
