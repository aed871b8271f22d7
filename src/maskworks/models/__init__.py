"""Task models composed from backbones and heads; importing this package registers them all."""

from maskworks.models import instance, mae, panoptic, promptable, semantic, universal, volumetric
from maskworks.models.mae import MaskedAutoencoderViT

__all__ = ["MaskedAutoencoderViT", "instance", "mae", "panoptic", "promptable", "semantic", "universal", "volumetric"]
