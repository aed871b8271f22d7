"""Segmentation losses: logits in, ``ignore_index=255`` honoured, compound specs like ``"ce+0.5*dice"``."""

from maskworks.losses.compound import LOSS_NAMES, CompoundLoss, DeepSupervisionLoss, build_loss, parse_loss_spec
from maskworks.losses.cross_entropy import CrossEntropyLoss, cross_entropy, split_outputs
from maskworks.losses.weights import class_pixel_counts, class_weights

__all__ = [
    "LOSS_NAMES",
    "CompoundLoss",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "build_loss",
    "class_pixel_counts",
    "class_weights",
    "cross_entropy",
    "parse_loss_spec",
    "split_outputs",
]
