"""Promptable segmentation: Segment Anything (SAM), its predictor and its automatic mask generator."""

from maskworks.models.promptable.amg import SamAutomaticMaskGenerator
from maskworks.models.promptable.decoder import MaskDecoder, PositionEmbeddingRandom, PromptEncoder, TwoWayTransformer
from maskworks.models.promptable.image_encoder import ImageEncoderViT
from maskworks.models.promptable.predictor import SamPredictor
from maskworks.models.promptable.sam import Sam, build_sam, sam_vit_base, sam_vit_huge, sam_vit_large
from maskworks.models.promptable.transforms import ResizeLongestSide

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PositionEmbeddingRandom",
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
