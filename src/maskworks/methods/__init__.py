"""Training methods beyond plain supervision (noisy labels, ...)."""

from maskworks.methods.noisy_labels import CoTeaching, coteaching_forget_rate, small_loss_selection

__all__ = ["CoTeaching", "coteaching_forget_rate", "small_loss_selection"]
