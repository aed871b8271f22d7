"""Model-agnostic building blocks shared by backbones and models."""

from maskworks.layers.conv import ConvNormAct, create_act

__all__ = ["ConvNormAct", "create_act"]
