"""Box and mask operations for instance segmentation: IoU variants and the NMS family.

Hard NMS runs torchvision's compiled kernel; the variants (Soft-NMS, Fast NMS, Matrix NMS, mask-IoU NMS) are written
from their papers' definitions and checked on hand-built cases. ``roi_align`` / ``roi_pool`` are pure-PyTorch
references equal to torchvision's compiled kernels (the models call torchvision's).
"""

from maskworks.ops.boxes import box_area, box_iou, generalized_box_iou
from maskworks.ops.nms import batched_nms, fast_nms, mask_iou, mask_nms, matrix_nms, soft_nms
from maskworks.ops.roi import fpn_level, roi_align, roi_pool

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "fast_nms",
    "fpn_level",
    "generalized_box_iou",
    "mask_iou",
    "mask_nms",
    "matrix_nms",
    "roi_align",
    "roi_pool",
    "soft_nms",
]
