"""Universal segmentation: one set-prediction model for semantic, instance and panoptic outputs (Mask2Former)."""

from maskworks.models.universal.criterion import SetCriterion
from maskworks.models.universal.mask2former import (
    MASK2FORMER_TASKS,
    FPNPixelDecoder,
    Mask2Former,
    MaskedAttentionDecoder,
    MSDeformAttnPixelDecoder,
    instance_inference,
    mask2former,
    mask2former_resnet50,
    mask2former_swin_tiny,
    maskformer,
    panoptic_inference,
    semantic_inference,
    sine_position_embedding,
)
from maskworks.models.universal.matcher import HungarianMatcher, assign, pairwise_mask_costs

__all__ = [
    "MASK2FORMER_TASKS",
    "FPNPixelDecoder",
    "HungarianMatcher",
    "MSDeformAttnPixelDecoder",
    "Mask2Former",
    "MaskedAttentionDecoder",
    "SetCriterion",
    "assign",
    "instance_inference",
    "mask2former",
    "mask2former_resnet50",
    "mask2former_swin_tiny",
    "maskformer",
    "pairwise_mask_costs",
    "panoptic_inference",
    "semantic_inference",
    "sine_position_embedding",
]
