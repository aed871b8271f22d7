"""Promptable segmentation: Segment Anything (SAM) and SAM 2 in image mode, the shared predictor and the automatic
mask generator."""

from maskworks.models.promptable.amg import SamAutomaticMaskGenerator
from maskworks.models.promptable.decoder import MaskDecoder, PositionEmbeddingRandom, PromptEncoder, TwoWayTransformer
from maskworks.models.promptable.hiera import FpnNeck, Hiera, Sam2ImageEncoder
from maskworks.models.promptable.image_encoder import ImageEncoderViT
from maskworks.models.promptable.predictor import SamPredictor
from maskworks.models.promptable.sam import PromptableModel, Sam, build_sam, sam_vit_base, sam_vit_huge, sam_vit_large
from maskworks.models.promptable.sam2 import (
    Sam2,
    Sam2MaskDecoder,
    Sam2PromptEncoder,
    Sam2Transform,
    build_sam2,
    sam2_hiera_base_plus,
    sam2_hiera_large,
    sam2_hiera_small,
    sam2_hiera_tiny,
)
from maskworks.models.promptable.transforms import ResizeLongestSide

__all__ = [
    "FpnNeck",
    "Hiera",
    "Sam2",
    "Sam2ImageEncoder",
    "Sam2MaskDecoder",
    "Sam2PromptEncoder",
    "Sam2Transform",
    "build_sam2",
    "sam2_hiera_base_plus",
    "sam2_hiera_large",
    "sam2_hiera_small",
    "sam2_hiera_tiny",
    "ImageEncoderViT",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptableModel",
    "PromptEncoder",
    "ResizeLongestSide",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "TwoWayTransformer",
    "build_sam",
    "sam_vit_base",
    "sam_vit_huge",
    "sam_vit_large",
]
