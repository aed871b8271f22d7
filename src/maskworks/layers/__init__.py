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
from maskworks.layers.conv import ConvNormAct, create_act
from maskworks.layers.fpn import FeaturePyramid
from maskworks.layers.norm import PooledBatchNorm2d
from maskworks.layers.ppm import PSPModule

__all__ = [
    "ASPP",
    "ConvNormAct",
    "FeaturePyramid",
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
]
