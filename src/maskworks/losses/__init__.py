"""Segmentation losses: logits in, ``ignore_index=255`` honoured."""

from maskworks.losses.cross_entropy import CrossEntropyLoss, cross_entropy, split_outputs

__all__ = ["CrossEntropyLoss", "cross_entropy", "split_outputs"]
