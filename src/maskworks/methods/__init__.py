"""Training methods beyond plain supervision: knowledge distillation (DeiT), noisy labels (co-teaching)."""

from maskworks.methods.distillation import DistillationLoss, SoftTargetCrossEntropy
from maskworks.methods.noisy_labels import CoTeaching, coteaching_forget_rate, small_loss_selection

__all__ = [
    "CoTeaching",
    "DistillationLoss",
    "SoftTargetCrossEntropy",
    "coteaching_forget_rate",
    "small_loss_selection",
]
