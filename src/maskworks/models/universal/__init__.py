"""Universal segmentation: one set-prediction model for semantic, instance and panoptic outputs (Mask2Former)."""

from maskworks.models.universal.criterion import SetCriterion
from maskworks.models.universal.matcher import HungarianMatcher, assign, pairwise_mask_costs

__all__ = ["HungarianMatcher", "SetCriterion", "assign", "pairwise_mask_costs"]
