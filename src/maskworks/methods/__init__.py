"""Training methods beyond plain supervision: knowledge distillation (DeiT; segmentation KD losses), noisy labels
(co-teaching)."""

from maskworks.methods.distillation import (
    AttentionTransfer,
    ChannelWiseKD,
    DistillationLoss,
    FeatureKD,
    PairwiseKD,
    PixelKD,
    SoftTargetCrossEntropy,
    distillation_loss,
)
from maskworks.methods.noisy_labels import CoTeaching, coteaching_forget_rate, small_loss_selection

__all__ = [
    "AttentionTransfer",
    "ChannelWiseKD",
    "CoTeaching",
    "DistillationLoss",
    "FeatureKD",
    "PairwiseKD",
    "PixelKD",
    "SoftTargetCrossEntropy",
    "coteaching_forget_rate",
    "distillation_loss",
    "small_loss_selection",
]
