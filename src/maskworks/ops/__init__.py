"""Box and mask operations for instance segmentation: IoU variants and the NMS family.

Hard NMS runs torchvision's compiled kernel; the variants (Soft-NMS, Fast NMS, Matrix NMS, mask-IoU NMS) are written
from their papers' definitions and checked on hand-built cases. ``roi_align`` / ``roi_pool`` are pure-PyTorch
references equal to torchvision's compiled kernels (the models call torchvision's). :mod:`maskworks.ops.grouping`
groups pixels into instances bottom-up (embeddings, centres + offsets) and resolves overlapping masks.
:mod:`maskworks.ops.points` samples maps at real-valued points and picks PointRend's uncertain points.
:mod:`maskworks.ops.polygons` converts between masks, COCO polygons and fixed-size contours (rasterisation,
Douglas-Peucker simplification, equidistant resampling).
"""

from maskworks.ops.boxes import box_area, box_iou, generalized_box_iou
from maskworks.ops.grouping import (
    center_targets,
    cluster_embeddings,
    group_by_centers,
    occlusion_order,
    resolve_overlaps,
)
from maskworks.ops.nms import batched_nms, fast_nms, mask_iou, mask_nms, matrix_nms, soft_nms
from maskworks.ops.points import (
    get_uncertain_point_coords_on_grid,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from maskworks.ops.polygons import (
    contour_to_mask,
    mask_to_contour,
    polygons_to_mask,
    resample_polygon,
    simplify_polygon,
)
from maskworks.ops.roi import fpn_level, roi_align, roi_pool

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "center_targets",
    "cluster_embeddings",
    "contour_to_mask",
    "fast_nms",
    "fpn_level",
    "generalized_box_iou",
    "get_uncertain_point_coords_on_grid",
    "get_uncertain_point_coords_with_randomness",
    "group_by_centers",
    "mask_iou",
    "mask_nms",
    "mask_to_contour",
    "matrix_nms",
    "occlusion_order",
    "point_sample",
    "polygons_to_mask",
    "resample_polygon",
    "resolve_overlaps",
    "roi_align",
    "roi_pool",
    "simplify_polygon",
    "soft_nms",
]
