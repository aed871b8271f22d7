"""Semantic segmentation models: logits ``(B, K, H, W)`` at input resolution."""

from maskworks.models.semantic.unet import UNet, UNetVanilla, valid_input_size, valid_output_size

__all__ = ["UNet", "UNetVanilla", "valid_input_size", "valid_output_size"]
