"""Instance segmentation models: torchvision-style detectors returning per-image ``boxes``, ``labels``, ``scores``
and ``masks`` in eval and a loss dict in training (DESIGN.md "Instance output").

The generic constructor ``mask_rcnn(encoder=...)`` lives in (and is reached through) the submodule
:mod:`maskworks.models.instance.mask_rcnn`, or by name with ``create_model("mask_rcnn", encoder=...)``; it is not
re-exported here so that the attribute ``mask_rcnn`` of this package stays the submodule.

:class:`ContourHead` (with :func:`box_to_initial_contour` and :func:`contour_loss`) is a standalone Deep Snake contour
head, not a registered model."""

from maskworks.models.instance.contour import ContourHead, box_to_initial_contour, contour_loss
from maskworks.models.instance.embedding import EmbeddingInstanceUNet, embedding_unet
from maskworks.models.instance.mask_rcnn import (
    AlignedMultiScaleRoIAlign,
    MaskRCNN,
    MultiScaleRoIPool,
    mask_rcnn_mobilenet_v3_large_fpn,
    mask_rcnn_resnet50_fpn,
    mask_rcnn_resnet50_fpn_v2,
)
from maskworks.models.instance.solo import SOLOv2, solov2_resnet50_fpn
from maskworks.models.instance.yolact import YOLACT, yolact_resnet50_fpn

__all__ = [
    "AlignedMultiScaleRoIAlign",
    "ContourHead",
    "EmbeddingInstanceUNet",
    "MaskRCNN",
    "MultiScaleRoIPool",
    "SOLOv2",
    "YOLACT",
    "box_to_initial_contour",
    "contour_loss",
    "embedding_unet",
    "mask_rcnn_mobilenet_v3_large_fpn",
    "mask_rcnn_resnet50_fpn",
    "mask_rcnn_resnet50_fpn_v2",
    "solov2_resnet50_fpn",
    "yolact_resnet50_fpn",
]
