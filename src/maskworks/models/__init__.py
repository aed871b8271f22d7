"""Task models composed from backbones and heads; importing this package registers them all."""

from maskworks.models import mae, semantic
from maskworks.models.mae import MaskedAutoencoderViT

__all__ = ["MaskedAutoencoderViT", "mae", "semantic"]
