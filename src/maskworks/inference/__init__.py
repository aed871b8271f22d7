"""Inference tools: sliding window / overlap-tile, memory-bounded large images, test-time augmentation, dense CRF
refinement, uncertainty, and Conv-BatchNorm fusion for faster inference.

The TTA transform classes (``HFlip``, ``Rot90``, ``Scale`` ...) live in :mod:`maskworks.inference.tta`.
"""

from maskworks.inference.crf import MeanFieldCRF, dense_crf, mean_field_crf
from maskworks.inference.fuse import FusionReport, fuse_conv_bn, prepare_for_inference
from maskworks.inference.large import LargeImagePrediction, predict_large_image
from maskworks.inference.sliding import SlidingWindow, importance_map, plan_windows, sliding_window
from maskworks.inference.tta import TTA_PRESETS, TTAWrapper, get_tta_transforms, iter_tta, tta
from maskworks.inference.uncertainty import (
    TemperatureScaling,
    ensemble,
    entropy_map,
    mc_dropout,
    mc_dropout_mode,
    mutual_information,
    tta_uncertainty,
)

__all__ = [
    "FusionReport",
    "LargeImagePrediction",
    "MeanFieldCRF",
    "SlidingWindow",
    "TTAWrapper",
    "TTA_PRESETS",
    "TemperatureScaling",
    "dense_crf",
    "ensemble",
    "entropy_map",
    "fuse_conv_bn",
    "get_tta_transforms",
    "importance_map",
    "iter_tta",
    "mc_dropout",
    "mc_dropout_mode",
    "mean_field_crf",
    "mutual_information",
    "plan_windows",
    "predict_large_image",
    "prepare_for_inference",
    "sliding_window",
    "tta",
    "tta_uncertainty",
]
