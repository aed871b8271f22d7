"""Every loss as a function of ``(logits, target, ...)``; the modules in :mod:`maskworks.losses` wrap these."""

from maskworks.losses.boundary import (
    boundary_loss,
    boundary_weight_map,
    boundary_weighted_cross_entropy,
    cldice_loss,
    hausdorff_dt_loss,
    signed_distance_map,
    soft_skeleton,
)
from maskworks.losses.cross_entropy import cross_entropy
from maskworks.losses.focal import focal_loss
from maskworks.losses.lovasz import lovasz_grad, lovasz_hinge, lovasz_softmax
from maskworks.losses.noisy import (
    bootstrapped_cross_entropy,
    confidence_weighted_cross_entropy,
    generalized_cross_entropy,
    symmetric_cross_entropy,
)
from maskworks.losses.ohem import ohem_cross_entropy, topk_cross_entropy
from maskworks.losses.overlap import (
    dice_loss,
    focal_tversky_loss,
    generalized_dice_loss,
    jaccard_loss,
    log_cosh_dice_loss,
    tversky_loss,
)
from maskworks.losses.soft import boundary_label_smoothing, soft_cross_entropy

__all__ = [
    "boundary_label_smoothing",
    "boundary_loss",
    "boundary_weight_map",
    "boundary_weighted_cross_entropy",
    "bootstrapped_cross_entropy",
    "cldice_loss",
    "confidence_weighted_cross_entropy",
    "cross_entropy",
    "dice_loss",
    "focal_loss",
    "focal_tversky_loss",
    "generalized_cross_entropy",
    "generalized_dice_loss",
    "hausdorff_dt_loss",
    "jaccard_loss",
    "log_cosh_dice_loss",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_softmax",
    "ohem_cross_entropy",
    "signed_distance_map",
    "soft_cross_entropy",
    "soft_skeleton",
    "symmetric_cross_entropy",
    "topk_cross_entropy",
    "tversky_loss",
]
