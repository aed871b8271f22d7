"""Knowledge distillation.

* :mod:`~maskworks.methods.distillation.deit`: DeiT's distillation through a distillation token
  (:class:`DistillationLoss`, soft / hard terms, soft-target cross-entropy) for classification.
* :mod:`~maskworks.methods.distillation.segmentation`: distillation losses for dense prediction on
  ``(B, C, H, W)`` logits or feature maps: pixel-wise KD (:class:`PixelKD`), channel-wise KD
  (:class:`ChannelWiseKD`), pair-wise affinity KD (:class:`PairwiseKD`), feature KD with 1x1 adapters
  (:class:`FeatureKD`), attention transfer (:class:`AttentionTransfer`) and the
  :func:`distillation_loss` factory.

All public names of both modules are importable from ``maskworks.methods.distillation``.
"""

from __future__ import annotations

from maskworks.methods.distillation.deit import (
    DistillationLoss,
    SoftTargetCrossEntropy,
    hard_distillation_loss,
    soft_distillation_loss,
    soft_target_cross_entropy,
    split_student_outputs,
)
from maskworks.methods.distillation.segmentation import (
    AttentionTransfer,
    ChannelWiseKD,
    FeatureKD,
    PairwiseKD,
    PixelKD,
    distillation_loss,
)
from maskworks.methods.distillation.task import DistillationTask

__all__ = [
    # DeiT (classification)
    "DistillationLoss",
    "SoftTargetCrossEntropy",
    "soft_target_cross_entropy",
    "soft_distillation_loss",
    "hard_distillation_loss",
    "split_student_outputs",
    # segmentation / dense prediction
    "PixelKD",
    "ChannelWiseKD",
    "PairwiseKD",
    "FeatureKD",
    "AttentionTransfer",
    "distillation_loss",
    "DistillationTask",
]
