"""Task models composed from backbones and heads; importing this package registers them all."""

from maskworks.models import semantic

__all__ = ["semantic"]
