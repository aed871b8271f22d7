"""Streaming segmentation metrics."""

from maskworks.metrics.confusion import ConfusionMatrix

__all__ = ["ConfusionMatrix"]
