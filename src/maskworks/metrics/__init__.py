"""Streaming segmentation metrics."""

from maskworks.metrics.boundary import BoundaryF1, BoundaryIoU
from maskworks.metrics.calibration import Calibration
from maskworks.metrics.coco import MaskAP
from maskworks.metrics.confusion import ConfusionMatrix
from maskworks.metrics.instance_seg import (
    AggregatedJaccardIndex,
    InstanceMatching,
    aggregated_jaccard_index,
    match_instances,
)
from maskworks.metrics.panoptic import PanopticQuality
from maskworks.metrics.soft import SoftMaskMetrics
from maskworks.metrics.surface import SurfaceDistance

__all__ = [
    "AggregatedJaccardIndex",
    "InstanceMatching",
    "aggregated_jaccard_index",
    "match_instances",
    "BoundaryF1",
    "BoundaryIoU",
    "Calibration",
    "ConfusionMatrix",
    "MaskAP",
    "PanopticQuality",
    "SoftMaskMetrics",
    "SurfaceDistance",
]
