"""Box and mask operations for instance segmentation: IoU variants and the NMS family.

Hard NMS runs torchvision's compiled kernel; the variants (Soft-NMS, Fast NMS, Matrix NMS, mask-IoU NMS) are written
from their papers' definitions and checked on hand-built cases. ``roi_align`` / ``roi_pool`` are pure-PyTorch
references equal to torchvision's compiled kernels (the models call torchvision's). :mod:`maskworks.ops.grouping`
groups pixels into instances bottom-up (embeddings, centres + offsets) and resolves overlapping masks.
"""

from maskworks.ops.boxes import box_area, box_iou, generalized_box_iou
from maskworks.ops.grouping import center_targets, cluster_embeddings, group_by_centers, resolve_overlaps
from maskworks.ops.nms import batched_nms, fast_nms, mask_iou, mask_nms, matrix_nms, soft_nms
from maskworks.ops.roi import fpn_level, roi_align, roi_pool

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "center_targets",
    "cluster_embeddings",
    "fast_nms",
    "fpn_level",
    "generalized_box_iou",
    "group_by_centers",
    "mask_iou",
    "mask_nms",
    "matrix_nms",
    "resolve_overlaps",
    "roi_align",
    "roi_pool",
    "soft_nms",
]
