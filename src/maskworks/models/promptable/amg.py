"""Automatic mask generation with Segment Anything (Kirillov et al., "Segment Anything", ICCV 2023).

:class:`SamAutomaticMaskGenerator` segments a whole image without prompts from the user: it prompts a SAM predictor
with a regular grid of single foreground points, keeps the masks the model itself rates well, and removes duplicates.
The pipeline follows the paper's fully automatic stage of the data engine (Sec. 4 and Appendix B, "Automatic Mask
Generation Details") and the reference implementation's defaults and output records:

1. **Crops.** The whole image is crop 0 (layer 0). With ``crop_n_layers = L > 0``, layer ``i`` adds a
   ``2**i x 2**i`` grid of overlapping crops (:func:`generate_crop_boxes`); each crop is embedded on its own, so small
   objects are seen at a higher resolution.
2. **Point prompts.** Each crop is prompted with a grid of ``n x n`` points at the centres of an ``n x n``
   partition of the crop (:func:`build_point_grid`); layer ``i`` uses ``points_per_side / downscale**i`` per side
   (:func:`build_all_layer_point_grids`). ``points_per_batch`` points go through ``predict_torch`` at once, each
   with ``multimask_output=True`` (three masks per point).
3. **Filtering.** A mask is kept when its predicted IoU exceeds ``pred_iou_thresh`` and its stability score
   (:func:`calculate_stability_score`: the IoU between the masks thresholded at ``t + offset`` and ``t - offset``)
   reaches ``stability_score_thresh``; masks whose box touches an inner crop edge (within 20 px, and not at the
   image border) are dropped, as the object probably continues outside the crop (:func:`is_box_near_crop_edge`).
4. **Deduplication.** Box NMS inside each crop (scores: predicted IoU, ``box_nms_thresh``) and, with several crops,
   box NMS across crops preferring masks from smaller crops (scores ``1 / crop area``, ``crop_nms_thresh``).
5. **Post-processing** (``min_mask_region_area > 0``): holes and islands smaller than the area are removed
   (:func:`remove_small_regions`, 8-connected components with :func:`scipy.ndimage.label`), then box NMS runs again
   preferring masks that did not change.

Masks are stored as uncompressed column-major run-length encodings (RLE, the COCO layout) between the steps
(:func:`mask_to_rle_pytorch`, :func:`rle_to_mask`, :func:`area_from_rle`, :func:`coco_encode_rle`): a grid of
thousands of prompts holds at most one batch of full-resolution masks at once.

Boxes are ``(x_min, y_min, x_max, y_max)`` with *inclusive* pixel indices (:func:`batched_mask_to_box`), and the
records' ``bbox`` is ``[x_min, y_min, x_max - x_min, y_max - y_min]``, as in the reference implementation (a mask of
one pixel has ``bbox`` width and height 0), so the records are interchangeable with the reference's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from maskworks.models._utils import check_positive_int

__all__ = [
    "SamAutomaticMaskGenerator",
    "area_from_rle",
    "batched_mask_to_box",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle_pytorch",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]

log = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
REGION_MODES = ("holes", "islands")


# ----------------------------------------------------------------------------------------------------------------------
# option checks
# ----------------------------------------------------------------------------------------------------------------------


def _check_number(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> float:
    """``float(value)`` if it is a real number in ``[low, high]`` (``[low, high)`` with ``high_open``), else
    ``ValueError`` naming ``name`` and the value."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and low <= v and (v < high if high_open else v <= high)
    if not ok:
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_non_negative_int(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_crop_box(crop_box: Sequence[int]) -> tuple[int, int, int, int]:
    box = tuple(int(c) for c in crop_box)
    if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"crop_box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {crop_box!r}")
    return box  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# point grids and crops
# ----------------------------------------------------------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
    """The centres of an ``n x n`` partition of the unit square, as normalised ``(x, y)`` points.

    Args:
        n_per_side: points along each side, ``n >= 1``.

    Returns:
        ``(n * n, 2)`` float64 array of ``(x, y)`` in ``(0, 1)``: ``x`` and ``y`` take the values ``(k + 1/2) / n``;
        rows run over ``y`` (slow) and ``x`` (fast), i.e. row-major order over the image.
    """
    n = check_positive_int("n_per_side", n_per_side)
    half_step = 1.0 / (2 * n)
    centres = np.linspace(half_step, 1.0 - half_step, n)  # (n,)
    ys, xs = np.meshgrid(centres, centres, indexing="ij")  # (n, n) each
    return np.stack([xs, ys], axis=-1).reshape(n * n, 2)  # (n * n, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """Point grids for the whole image and each crop layer.

    Args:
        n_per_side: points per side of the layer-0 (whole image) grid.
        n_layers: number of crop layers after layer 0.
        scale_per_layer: layer ``i`` has ``int(n_per_side / scale_per_layer**i)`` points per side.

    Returns:
        ``n_layers + 1`` grids from :func:`build_point_grid`, layer 0 first.

    Raises:
        ValueError: an argument is out of range, or the last layer would have no point.
    """
    n_per_side = check_positive_int("n_per_side", n_per_side)
    n_layers = _check_non_negative_int("n_layers", n_layers)
    scale_per_layer = check_positive_int("scale_per_layer", scale_per_layer)
    sizes = [int(n_per_side / scale_per_layer**i) for i in range(n_layers + 1)]
    if sizes[-1] < 1:
        raise ValueError(
            f"n_per_side / scale_per_layer**n_layers must be >= 1, got {n_per_side} / {scale_per_layer}**{n_layers}"
        )
    return [build_point_grid(n) for n in sizes]


def generate_crop_boxes(
    im_size: Sequence[int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of every layer: the whole image, then ``2**i x 2**i`` overlapping crops in layer ``i``.

    In layer ``i`` (``k = 2**i`` crops per side) neighbouring crops overlap by
    ``o = int(overlap_ratio * min(H, W) * 2 / k)`` pixels, each crop is ``ceil((L + (k - 1) o) / k)`` pixels long
    along a side of length ``L``, crop ``j`` starts at ``j (len - o)``, and the last crop is clipped to the image.

    Args:
        im_size: image ``(H, W)``.
        n_layers: number of crop layers after the whole image.
        overlap_ratio: overlap of the first layer's crops as a fraction of the image's short side, in ``[0, 1)``.

    Returns:
        ``(boxes, layer_idxs)``: ``boxes`` as ``[x0, y0, x1, y1]`` lists (``x1``, ``y1`` exclusive), the whole image
        first, then each layer's crops column by column (x outer, y inner); ``layer_idxs[j]`` is box ``j``'s layer.
    """
    if len(im_size) != 2:
        raise ValueError(f"im_size must be (H, W), got {im_size!r}")
    im_h, im_w = (check_positive_int("im_size", int(s)) for s in im_size)
    n_layers = _check_non_negative_int("n_layers", n_layers)
    overlap_ratio = _check_number("overlap_ratio", overlap_ratio, 0.0, 1.0, high_open=True)
    short_side = min(im_h, im_w)

    boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        # ceil((L + (k - 1) o) / k) in integer arithmetic
        crop_w = -(-(im_w + (per_side - 1) * overlap) // per_side)
        crop_h = -(-(im_h + (per_side - 1) * overlap) // per_side)
        for i in range(per_side):
            x0 = (crop_w - overlap) * i
            for j in range(per_side):
                y0 = (crop_h - overlap) * j
                boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
                layer_idxs.append(layer)
    return boxes, layer_idxs


# ----------------------------------------------------------------------------------------------------------------------
# mask scores and boxes
# ----------------------------------------------------------------------------------------------------------------------


def _count_above(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Exact count of ``values > threshold`` over the last two dims, without an int64 copy of the whole tensor."""
    above = values > threshold  # (..., H, W) bool
    # a row holds at most W ones: int16 is exact while W fits, and halves the cast's memory against int32
    row_dtype = torch.int16 if values.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    return above.sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int64)  # (...,)


def calculate_stability_score(
    mask_logits: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """Stability of masks under a shift of the binarisation threshold.

    The score is the IoU between the masks ``logits > t + offset`` and ``logits > t - offset``. The first is a subset
    of the second (for ``offset >= 0``), so the IoU is the ratio of their pixel counts; counts are integers, so the
    score is the correctly rounded float32 ratio of the exact counts. A mask empty at ``t - offset`` has score 0.

    Args:
        mask_logits: ``(..., H, W)`` mask logits.
        mask_threshold: the binarisation threshold ``t`` (0.0 for SAM).
        threshold_offset: the shift ``offset >= 0``.

    Returns:
        ``(...)`` float32 scores in ``[0, 1]``.
    """
    if mask_logits.ndim < 2:
        raise ValueError(f"mask_logits must be (..., H, W), got shape {tuple(mask_logits.shape)}")
    threshold_offset = _check_number("threshold_offset", threshold_offset, 0.0, math.inf)
    intersections = _count_above(mask_logits, mask_threshold + threshold_offset)
    unions = _count_above(mask_logits, mask_threshold - threshold_offset)
    scores = intersections.float() / unions.clamp(min=1).float()
    return scores


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around binary masks, ``(x_min, y_min, x_max, y_max)`` with inclusive pixel indices.

    Args:
        masks: ``(..., H, W)`` masks (non-zero is foreground).

    Returns:
        ``(..., 4)`` int64 boxes; an empty mask gives ``[0, 0, 0, 0]``.
    """
    if masks.ndim < 2:
        raise ValueError(f"masks must be (..., H, W), got shape {tuple(masks.shape)}")
    *lead, h, w = masks.shape
    if masks.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.long, device=masks.device)
    masks = masks.reshape(-1, h, w).bool()  # (N, H, W)
    rows = masks.any(dim=-1)  # (N, H): rows holding foreground
    cols = masks.any(dim=-2)  # (N, W)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y_min = torch.where(rows, ys, h).amin(-1)
    y_max = torch.where(rows, ys, -1).amax(-1)
    x_min = torch.where(cols, xs, w).amin(-1)
    x_max = torch.where(cols, xs, -1).amax(-1)
    boxes = torch.stack([x_min, y_min, x_max, y_max], dim=-1)  # (N, 4)
    boxes = torch.where(rows.any(-1, keepdim=True), boxes, 0)  # empty masks -> [0, 0, 0, 0]
    return boxes.reshape(*lead, 4)  # (..., 4)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """Whether boxes come within ``atol`` pixels of an edge of their crop that is not an edge of the image.

    A mask cut by an inner crop edge probably continues outside the crop, so it is incomplete.

    Args:
        boxes: ``(N, 4)`` ``(x_min, y_min, x_max, y_max)`` boxes in the crop's frame.
        crop_box: the crop ``[x0, y0, x1, y1]`` in the image.
        orig_box: the image box ``[0, 0, W, H]``.
        atol: distance in pixels counted as near (inclusive).

    Returns:
        ``(N,)`` bool.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()  # (N, 4) in the image frame
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=-1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Boxes ``(..., 4)`` in a crop's frame moved to the image frame (shifted by the crop's top-left corner)."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Points ``(..., 2)`` ``(x, y)`` in a crop's frame moved to the image frame."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    return points + torch.tensor([x0, y0], device=points.device)


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Masks ``(..., h, w)`` of a crop placed in zero masks ``(..., orig_h, orig_w)`` of the whole image."""
    x0, y0, x1, y1 = _check_crop_box(crop_box)
    if masks.shape[-2:] != (y1 - y0, x1 - x0):
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but crop_box {list(crop_box)} is {(y1 - y0, x1 - x0)}")
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return F.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


# ----------------------------------------------------------------------------------------------------------------------
# run-length encoding
# ----------------------------------------------------------------------------------------------------------------------


def mask_to_rle_pytorch(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Uncompressed COCO run-length encodings of binary masks.

    The pixels are read column by column (Fortran order, as COCO), and ``counts`` alternates runs of background and
    foreground, starting with background (a leading 0 when the first pixel is foreground).

    Args:
        masks: ``(B, H, W)`` binary masks (any device).

    Returns:
        ``B`` dicts ``{"size": [H, W], "counts": [int, ...]}``.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {tuple(masks.shape)}")
    b, h, w = masks.shape
    if h * w == 0:
        return [{"size": [h, w], "counts": []} for _ in range(b)]
    flat = masks.bool().transpose(1, 2).reshape(b, w * h)  # (B, W * H), column-major pixels
    mask_idx, pos = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)  # a new run starts at pos + 1
    run_starts = (pos + 1).cpu().split(torch.bincount(mask_idx, minlength=b).tolist())
    first = flat[:, 0].tolist()
    out = []
    for i in range(b):
        edges = torch.cat([torch.zeros(1, dtype=torch.long), run_starts[i], torch.full((1,), h * w)])
        counts = edges.diff().tolist()
        out.append({"size": [h, w], "counts": [0, *counts] if first[i] else counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Binary mask ``(H, W)`` (C-contiguous bool) from an uncompressed RLE of :func:`mask_to_rle_pytorch`."""
    h, w = (int(s) for s in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"rle counts must be non-negative and sum to H * W = {h * w}, got sum {counts.sum()}")
    values = np.arange(len(counts)) % 2 == 1  # background, foreground, background, ...
    flat = np.repeat(values, counts)  # (W * H,) column-major
    return np.ascontiguousarray(flat.reshape(w, h).T)  # (H, W)


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixel count of an uncompressed RLE (the sum of its odd runs)."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Compressed COCO RLE (``counts`` as a ``str``, JSON-serialisable) of an uncompressed RLE; needs pycocotools."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# ----------------------------------------------------------------------------------------------------------------------
# post-processing
# ----------------------------------------------------------------------------------------------------------------------


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str = "holes") -> tuple[np.ndarray, bool]:
    """Fill small holes in a mask, or remove its small islands.

    Regions are 8-connected components (:func:`scipy.ndimage.label` with a 3 x 3 structure). ``"holes"`` fills
    every background component smaller than ``area_thresh`` pixels (the outer background included, when it is that
    small); ``"islands"`` removes every foreground component smaller than ``area_thresh``, keeping the largest one
    when all are small.

    Args:
        mask: ``(H, W)`` binary mask.
        area_thresh: regions with fewer pixels are small.
        mode: ``"holes"`` or ``"islands"``.

    Returns:
        ``(new_mask, changed)``: the bool mask and whether it differs from ``mask``.
    """
    from scipy import ndimage

    if mode not in REGION_MODES:
        raise ValueError(f"mode must be one of {REGION_MODES}, got {mode!r}")
    area_thresh = _check_number("area_thresh", area_thresh, 0.0, math.inf)
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    fill_holes = mode == "holes"
    labels, n = ndimage.label(~mask if fill_holes else mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,): component k + 1 has sizes[k] pixels
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if fill_holes:
        return mask | np.concatenate([[False], small])[labels], True
    keep = ~small
    if not keep.any():
        if n == 1:  # a single island, kept as it is
            return mask, False
        keep[np.argmax(sizes)] = True
    return np.concatenate([[False], keep])[labels], True


# ----------------------------------------------------------------------------------------------------------------------
# the generator
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _MaskRecords:
    """Masks of one image (or crop, or batch) as RLEs with their per-mask data, all in the image frame."""

    rles: list[dict[str, Any]]
    boxes: torch.Tensor  # (N, 4) int64 XYXY, inclusive
    iou_preds: torch.Tensor  # (N,)
    points: torch.Tensor  # (N, 2) float64 (x, y)
    stability_score: torch.Tensor  # (N,)
    crop_boxes: torch.Tensor  # (N, 4) int64 XYXY, exclusive

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, keep: torch.Tensor) -> _MaskRecords:
        """The records at ``keep`` (an index tensor, in its order, or a bool mask)."""
        keep = keep.cpu()
        if keep.dtype == torch.bool:
            keep = keep.nonzero().flatten()
        idx = keep.tolist()
        return _MaskRecords(
            rles=[self.rles[i] for i in idx],
            boxes=self.boxes[keep],
            iou_preds=self.iou_preds[keep],
            points=self.points[keep],
            stability_score=self.stability_score[keep],
            crop_boxes=self.crop_boxes[keep],
        )

    @staticmethod
    def cat(parts: Sequence[_MaskRecords]) -> _MaskRecords:
        if not parts:
            return _MaskRecords.empty()
        return _MaskRecords(
            rles=[r for p in parts for r in p.rles],
            boxes=torch.cat([p.boxes for p in parts]),
            iou_preds=torch.cat([p.iou_preds for p in parts]),
            points=torch.cat([p.points for p in parts]),
            stability_score=torch.cat([p.stability_score for p in parts]),
            crop_boxes=torch.cat([p.crop_boxes for p in parts]),
        )

    @staticmethod
    def empty() -> _MaskRecords:
        return _MaskRecords(
            rles=[],
            boxes=torch.zeros(0, 4, dtype=torch.long),
            iou_preds=torch.zeros(0),
            points=torch.zeros(0, 2, dtype=torch.float64),
            stability_score=torch.zeros(0),
            crop_boxes=torch.zeros(0, 4, dtype=torch.long),
        )


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by box NMS (one category), by decreasing score."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    categories = torch.zeros(len(boxes), dtype=torch.long)
    return batched_nms(boxes.float(), scores.float(), categories, iou_threshold=iou_threshold)


def _xyxy_to_xywh(box: Sequence[Any]) -> list[Any]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


class SamAutomaticMaskGenerator:
    """Segment a whole image with SAM from a grid of point prompts (see the module docstring for the pipeline).

    The defaults are the reference's, chosen for SAM ViT-H.

    Args:
        model: the SAM model; a :class:`~maskworks.models.promptable.predictor.SamPredictor` is built around it.
            May be None when ``predictor`` is given.
        points_per_side: points per side of the layer-0 prompt grid (``points_per_side**2`` prompts); None when
            ``point_grids`` gives the grids.
        points_per_batch: prompts run through the model at once (more is faster and takes more memory).
        pred_iou_thresh: keep masks whose predicted IoU is above this, in ``[0, 1]`` (0 keeps all).
        stability_score_thresh: keep masks whose stability score is at least this, in ``[0, 1]`` (0 keeps all).
        stability_score_offset: the threshold shift of :func:`calculate_stability_score`.
        box_nms_thresh: box IoU above which NMS removes a duplicate inside a crop, in ``[0, 1]``.
        crop_n_layers: crop layers after the whole image (layer ``i`` has ``(2**i)**2`` crops).
        crop_nms_thresh: box IoU above which NMS removes a duplicate across crops, in ``[0, 1]``.
        crop_overlap_ratio: overlap of the first layer's crops as a fraction of the image's short side, in ``[0, 1)``.
        crop_n_points_downscale_factor: layer ``i`` has ``points_per_side / factor**i`` points per side.
        point_grids: explicit normalised ``(N_i, 2)`` ``(x, y)`` grids in ``[0, 1]``, one per layer (at least
            ``crop_n_layers + 1``); exclusive with ``points_per_side``.
        min_mask_region_area: when > 0, holes and islands smaller than this many pixels are removed from the final
            masks (:func:`remove_small_regions`) and NMS runs again.
        output_mode: ``"binary_mask"`` (``(H, W)`` bool arrays), ``"uncompressed_rle"`` or ``"coco_rle"``
            (compressed, needs pycocotools).
        predictor: an already-built predictor (anything with the ``SamPredictor`` interface: ``set_image``,
            ``reset_image``, ``predict_torch``, ``transform.apply_coords``, ``device``, ``model.mask_threshold``);
            used instead of building one from ``model``.

    Raises:
        ValueError: an option is out of range (the message names it), or neither ``model`` nor ``predictor`` is
            given.
    """

    def __init__(
        self,
        model: Any,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        predictor: Any = None,
    ) -> None:
        self.points_per_batch = check_positive_int("points_per_batch", points_per_batch)
        self.pred_iou_thresh = _check_number("pred_iou_thresh", pred_iou_thresh, 0.0, 1.0)
        self.stability_score_thresh = _check_number("stability_score_thresh", stability_score_thresh, 0.0, 1.0)
        self.stability_score_offset = _check_number("stability_score_offset", stability_score_offset, 0.0, math.inf)
        self.box_nms_thresh = _check_number("box_nms_thresh", box_nms_thresh, 0.0, 1.0)
        self.crop_n_layers = _check_non_negative_int("crop_n_layers", crop_n_layers)
        self.crop_nms_thresh = _check_number("crop_nms_thresh", crop_nms_thresh, 0.0, 1.0)
        self.crop_overlap_ratio = _check_number("crop_overlap_ratio", crop_overlap_ratio, 0.0, 1.0, high_open=True)
        self.crop_n_points_downscale_factor = check_positive_int(
            "crop_n_points_downscale_factor", crop_n_points_downscale_factor
        )
        self.min_mask_region_area = _check_number("min_mask_region_area", min_mask_region_area, 0.0, math.inf)
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        self.output_mode = output_mode

        if (points_per_side is None) == (point_grids is None):
            raise ValueError(
                "exactly one of points_per_side and point_grids must be given, got "
                f"points_per_side={points_per_side!r} and point_grids={'None' if point_grids is None else '[...]'}"
            )
        if points_per_side is not None:
            points_per_side = check_positive_int("points_per_side", points_per_side)
            last = int(points_per_side / self.crop_n_points_downscale_factor**self.crop_n_layers)
            if last < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} gives no point in crop layer {self.crop_n_layers} "
                    f"with crop_n_points_downscale_factor={self.crop_n_points_downscale_factor}"
                )
            self.point_grids = build_all_layer_point_grids(
                points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [self._check_grid(g, i) for i, g in enumerate(point_grids)]
            if len(self.point_grids) < self.crop_n_layers + 1:
                raise ValueError(
                    f"point_grids must hold one grid per layer (crop_n_layers + 1 = {self.crop_n_layers + 1}), "
                    f"got {len(self.point_grids)}"
                )
        self.points_per_side = points_per_side

        if output_mode == "coco_rle":
            try:
                import pycocotools.mask  # noqa: F401
            except ImportError as err:
                raise ImportError("output_mode='coco_rle' needs pycocotools (pip install 'maskworks[coco]')") from err

        if predictor is None:
            if model is None:
                raise ValueError("model must be a SAM model when no predictor is given, got None")
            from maskworks.models.promptable.predictor import SamPredictor

            predictor = SamPredictor(model)
        self.predictor = predictor

    @staticmethod
    def _check_grid(grid: np.ndarray, i: int) -> np.ndarray:
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 2 or grid.shape[1] != 2 or not np.isfinite(grid).all() or (grid < 0).any() or (grid > 1).any():
            raise ValueError(
                f"point_grids[{i}] must be an (N, 2) array of normalised (x, y) in [0, 1], got shape {grid.shape}"
            )
        return grid

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks of everything in an image.

        Args:
            image: ``(H, W, 3)`` uint8 RGB image.

        Returns:
            One record per mask, by decreasing preference (predicted IoU inside a crop; smaller crops first across
            crops), with keys

            - ``segmentation``: ``(H, W)`` bool array, or an RLE dict (``output_mode``);
            - ``area``: foreground pixels (int);
            - ``bbox``: ``[x_min, y_min, x_max - x_min, y_max - y_min]`` (inclusive pixel indices, the reference's
              convention);
            - ``predicted_iou``: the model's IoU prediction (float);
            - ``point_coords``: ``[[x, y]]``, the prompt in image pixels;
            - ``stability_score``: float;
            - ``crop_box``: the crop the mask came from, ``[x0, y0, width, height]``.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {image.dtype} of shape {image.shape}")
        records = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            records = self.postprocess_small_regions(
                records, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )

        if self.output_mode == "coco_rle":
            segmentations: list[Any] = [coco_encode_rle(rle) for rle in records.rles]
        elif self.output_mode == "binary_mask":
            segmentations = [rle_to_mask(rle) for rle in records.rles]
        else:
            segmentations = records.rles
        boxes = records.boxes.tolist()
        crop_boxes = records.crop_boxes.tolist()
        points = records.points.tolist()
        iou_preds = records.iou_preds.tolist()
        stability = records.stability_score.tolist()
        return [
            {
                "segmentation": segmentations[i],
                "area": area_from_rle(records.rles[i]),
                "bbox": _xyxy_to_xywh(boxes[i]),
                "predicted_iou": iou_preds[i],
                "point_coords": [points[i]],
                "stability_score": stability[i],
                "crop_box": _xyxy_to_xywh(crop_boxes[i]),
            }
            for i in range(len(records))
        ]

    def _generate_masks(self, image: np.ndarray) -> _MaskRecords:
        orig_size = (image.shape[0], image.shape[1])
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        parts = []
        for k, (crop_box, layer) in enumerate(zip(crop_boxes, layer_idxs)):
            part = self._process_crop(image, crop_box, layer, orig_size)
            log.debug("crop %d/%d %s (layer %d): %d masks", k + 1, len(crop_boxes), crop_box, layer, len(part))
            parts.append(part)
        records = _MaskRecords.cat(parts)

        if len(crop_boxes) > 1:  # duplicates between crops: prefer the mask from the smaller crop
            crop_area = (records.crop_boxes[:, 2] - records.crop_boxes[:, 0]) * (
                records.crop_boxes[:, 3] - records.crop_boxes[:, 1]
            )
            keep = _nms(records.boxes, 1.0 / crop_area.float(), self.crop_nms_thresh)
            records = records.select(keep)
        log.debug("automatic mask generation: %d masks from %d crops", len(records), len(crop_boxes))
        return records

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, orig_size: tuple[int, int]
    ) -> _MaskRecords:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = (crop.shape[0], crop.shape[1])
        self.predictor.set_image(crop)
        points = self.point_grids[layer] * np.array([[crop_size[1], crop_size[0]]])  # (N, 2) (x, y) crop pixels

        parts = []
        for start in range(0, len(points), self.points_per_batch):
            parts.append(
                self._process_batch(points[start : start + self.points_per_batch], crop_size, crop_box, orig_size)
            )
        self.predictor.reset_image()
        records = _MaskRecords.cat(parts)

        # duplicates inside the crop (boxes still in the crop frame; NMS is shift-invariant)
        records = records.select(_nms(records.boxes, records.iou_preds, self.box_nms_thresh))
        records.boxes = uncrop_boxes_xyxy(records.boxes, crop_box)
        records.points = uncrop_points(records.points, crop_box)
        records.crop_boxes = torch.tensor([crop_box], dtype=torch.long).expand(len(records), 4).clone()
        return records

    def _process_batch(
        self, points: np.ndarray, crop_size: tuple[int, int], crop_box: list[int], orig_size: tuple[int, int]
    ) -> _MaskRecords:
        orig_h, orig_w = orig_size
        device = self.predictor.device
        coords = self.predictor.transform.apply_coords(points, crop_size)  # (P, 2) in the model's input frame
        coords = torch.as_tensor(coords, dtype=torch.float, device=device)
        labels = torch.ones(len(points), dtype=torch.int, device=device)
        masks, iou_preds, _ = self.predictor.predict_torch(
            coords[:, None, :],  # (P, 1, 2): one foreground point per prompt
            labels[:, None],  # (P, 1)
            multimask_output=True,
            return_logits=True,
        )
        n_out = masks.shape[1]
        masks = masks.flatten(0, 1)  # (P * C, h, w) logits at the crop's size
        iou_preds = iou_preds.flatten(0, 1)  # (P * C,)
        point_idx = torch.arange(len(points), device=masks.device).repeat_interleave(n_out)  # (P * C,)

        keep = torch.ones(len(masks), dtype=torch.bool, device=masks.device)
        if self.pred_iou_thresh > 0.0:
            keep &= iou_preds > self.pred_iou_thresh
        masks, iou_preds, point_idx = masks[keep], iou_preds[keep], point_idx[keep]

        mask_threshold = float(self.predictor.model.mask_threshold)
        stability = calculate_stability_score(masks, mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            keep = stability >= self.stability_score_thresh
            masks, iou_preds, point_idx, stability = masks[keep], iou_preds[keep], point_idx[keep], stability[keep]

        masks = masks > mask_threshold  # (M, h, w) bool
        boxes = batched_mask_to_box(masks)  # (M, 4) in the crop frame
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if not keep.all():
            masks, boxes, iou_preds, point_idx, stability = (
                t[keep] for t in (masks, boxes, iou_preds, point_idx, stability)
            )

        rles = mask_to_rle_pytorch(uncrop_masks(masks, crop_box, orig_h, orig_w))
        return _MaskRecords(
            rles=rles,
            boxes=boxes.cpu(),
            iou_preds=iou_preds.float().cpu(),
            points=torch.as_tensor(points, dtype=torch.float64)[point_idx.cpu()],
            stability_score=stability.cpu(),
            crop_boxes=torch.zeros(len(rles), 4, dtype=torch.long),  # set per crop
        )

    @staticmethod
    def postprocess_small_regions(records: _MaskRecords, min_area: float, nms_thresh: float) -> _MaskRecords:
        """Remove holes and islands smaller than ``min_area`` from every mask, then rerun box NMS.

        NMS prefers masks that did not change (score 1 against 0), so a cleaned-up copy of a mask loses to an
        untouched duplicate. Changed masks get a new RLE and box; one mask is decoded at a time.

        Args:
            records: the generator's masks.
            min_area: area threshold in pixels of :func:`remove_small_regions`.
            nms_thresh: box IoU threshold of the NMS.

        Returns:
            The kept records.
        """
        if len(records) == 0:
            return records
        rles, boxes, unchanged = list(records.rles), records.boxes.clone(), []
        for i, rle in enumerate(records.rles):  # one full-size mask at a time
            mask, holes_changed = remove_small_regions(rle_to_mask(rle), min_area, mode="holes")
            mask, islands_changed = remove_small_regions(mask, min_area, mode="islands")
            unchanged.append(not (holes_changed or islands_changed))
            if not unchanged[-1]:
                mask_t = torch.from_numpy(mask)[None]  # (1, H, W)
                rles[i] = mask_to_rle_pytorch(mask_t)[0]
                boxes[i] = batched_mask_to_box(mask_t)[0]
        keep = _nms(boxes, torch.tensor(unchanged, dtype=torch.float), nms_thresh)
        return replace(records, rles=rles, boxes=boxes).select(keep)
