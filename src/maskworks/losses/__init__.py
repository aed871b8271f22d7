"""Segmentation losses: logits in, ``ignore_index=255`` honoured, compound specs like ``"ce+0.5*dice"``.

Functions live in :mod:`maskworks.losses.functional`; the modules here validate their options in
``__init__``. :func:`build_loss` turns a spec string into a (deep-supervised) module.
"""

from maskworks.losses import functional
from maskworks.losses.boundary import BoundaryLoss, BoundaryWeightedCrossEntropyLoss, ClDiceLoss, HausdorffDTLoss
from maskworks.losses.compound import LOSS_NAMES, CompoundLoss, DeepSupervisionLoss, build_loss, parse_loss_spec
from maskworks.losses.cross_entropy import CrossEntropyLoss, cross_entropy, split_outputs
from maskworks.losses.discriminative import DiscriminativeLoss, discriminative_loss
from maskworks.losses.focal import FocalLoss
from maskworks.losses.lovasz import LovaszHingeLoss, LovaszSoftmaxLoss
from maskworks.losses.noisy import (
    BootstrappedCrossEntropyLoss,
    ConfidenceWeightedCrossEntropyLoss,
    GeneralizedCrossEntropyLoss,
    SymmetricCrossEntropyLoss,
)
from maskworks.losses.ohem import OhemCrossEntropyLoss, TopKCrossEntropyLoss
from maskworks.losses.overlap import DiceLoss, FocalTverskyLoss, GeneralizedDiceLoss, JaccardLoss, TverskyLoss
from maskworks.losses.soft import SoftCrossEntropyLoss
from maskworks.losses.weights import class_pixel_counts, class_weights

__all__ = [
    "LOSS_NAMES",
    "BootstrappedCrossEntropyLoss",
    "BoundaryLoss",
    "BoundaryWeightedCrossEntropyLoss",
    "ClDiceLoss",
    "CompoundLoss",
    "ConfidenceWeightedCrossEntropyLoss",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceLoss",
    "DiscriminativeLoss",
    "FocalLoss",
    "FocalTverskyLoss",
    "GeneralizedCrossEntropyLoss",
    "GeneralizedDiceLoss",
    "HausdorffDTLoss",
    "JaccardLoss",
    "LovaszHingeLoss",
    "LovaszSoftmaxLoss",
    "OhemCrossEntropyLoss",
    "SoftCrossEntropyLoss",
    "SymmetricCrossEntropyLoss",
    "TopKCrossEntropyLoss",
    "TverskyLoss",
    "build_loss",
    "class_pixel_counts",
    "class_weights",
    "cross_entropy",
    "discriminative_loss",
    "functional",
    "parse_loss_spec",
    "split_outputs",
]
