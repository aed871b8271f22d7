"""Panoptic segmentation models with separate instance and semantic branches: Panoptic FPN (Kirillov et al., CVPR
2019) and its heuristic fusion :func:`panoptic_fpn_fusion`. Eval outputs follow the panoptic contract: per image a
``panoptic_seg (H, W)`` int32 id map (0 = void) and ``segments_info`` (``id``, ``category_id``, ``isthing``,
``score``)."""

from maskworks.models.panoptic.panoptic_fpn import (
    PanopticFPN,
    PanopticFPNHead,
    ThingBoxPredictor,
    ThingMaskPredictor,
    panoptic_fpn,
    panoptic_fpn_fusion,
    panoptic_fpn_resnet50,
)

__all__ = [
    "PanopticFPN",
    "PanopticFPNHead",
    "ThingBoxPredictor",
    "ThingMaskPredictor",
    "panoptic_fpn",
    "panoptic_fpn_fusion",
    "panoptic_fpn_resnet50",
]
