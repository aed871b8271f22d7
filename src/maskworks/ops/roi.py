"""Reference pure-PyTorch RoIPool (Fast R-CNN) and RoIAlign (Mask R-CNN), equal to torchvision's compiled kernels.

These exist to show, op by op, what the two poolings do (Q14): the models call torchvision's kernels.

RoIAlign (He et al., ICCV 2017) never quantises: a box ``(x1, y1, x2, y2)`` is scaled by ``spatial_scale`` and,
with ``aligned=True``, shifted by half a pixel (pixel ``i`` covers ``[i, i + 1)``, its centre is ``i + 0.5``);
without it the box is at least 1x1. Each of the ``output_size`` bins averages ``g_h x g_w`` bilinear samples at
regular positions (``g = sampling_ratio``, or ``ceil(box size / output size)`` when ``sampling_ratio <= 0``).
A sample more than one pixel outside the map (``y < -1``, ``y > H``, ``x < -1`` or ``x > W``) counts as 0 (it is not
clamped: torchvision's pure-Python fallback clamps and differs there); one within that pixel is clamped to the edge.

RoIPool (Girshick, ICCV 2015) rounds the scaled box to whole pixels (a box is at least 1x1 and includes its end
pixel), splits it into bins with floor / ceil edges, and takes each bin's maximum (0 for an empty bin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["fpn_level", "roi_align", "roi_pool"]


def _as_rois(boxes: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``(K, 5)`` rows ``(batch index, x1, y1, x2, y2)`` from that tensor or from a list of per-image ``(N_i, 4)``."""
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be (K, 5) rows (batch index, x1, y1, x2, y2), got {tuple(boxes.shape)}")
        return boxes
    rows = [
        torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1) for i, b in enumerate(boxes)
    ]
    return torch.cat(rows) if rows else torch.empty(0, 5)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _bilinear(feature: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(C, len(y), len(x))`` of ``feature (C, H, W)`` on the grid ``y x x``, torchvision's rule:
    0 for a coordinate more than one pixel outside, clamped to the edge within it."""
    _, h, w = feature.shape
    out_y = (y < -1.0) | (y > h)
    out_x = (x < -1.0) | (x > w)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y0, x0 = y.floor().long(), x.floor().long()
    top_y, top_x = y0 >= h - 1, x0 >= w - 1
    y0, x0 = torch.where(top_y, h - 1, y0), torch.where(top_x, w - 1, x0)
    y1, x1 = torch.where(top_y, h - 1, y0 + 1), torch.where(top_x, w - 1, x0 + 1)
    ly = torch.where(top_y, torch.zeros_like(y), y - y0)
    lx = torch.where(top_x, torch.zeros_like(x), x - x0)
    hy, hx = 1 - ly, 1 - lx
    value = (
        feature[:, y0][:, :, x0] * (hy[:, None] * hx[None, :])
        + feature[:, y0][:, :, x1] * (hy[:, None] * lx[None, :])
        + feature[:, y1][:, :, x0] * (ly[:, None] * hx[None, :])
        + feature[:, y1][:, :, x1] * (ly[:, None] * lx[None, :])
    )
    valid = ~(out_y[:, None] | out_x[None, :])
    return value * valid


def roi_align(
    input: torch.Tensor,
    boxes: torch.Tensor | Sequence[torch.Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign of ``input (N, C, H, W)`` over ``boxes`` (``(K, 5)`` or a list of per-image ``(N_i, 4)`` xyxy in
    input-image coordinates): ``(K, C, out_h, out_w)``, the arguments and values of ``torchvision.ops.roi_align``."""
    rois = _as_rois(boxes).to(input.dtype)
    out_h, out_w = _pair(output_size)
    offset = 0.5 if aligned else 0.0
    out = input.new_zeros(rois.shape[0], input.shape[1], out_h, out_w)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_x, y2 * spatial_scale - offset - start_y
        if not aligned:  # legacy: boxes are at least 1x1
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        if grid_h == 0 or grid_w == 0:
            continue  # an empty box with adaptive sampling: no samples, zeros
        # sample positions of every bin: bin p, sample i -> start + p * bin + (i + 0.5) * bin / grid
        ys = start_y + (torch.arange(out_h)[:, None] * bin_h + (torch.arange(grid_h)[None, :] + 0.5) * bin_h / grid_h)
        xs = start_x + (torch.arange(out_w)[:, None] * bin_w + (torch.arange(grid_w)[None, :] + 0.5) * bin_w / grid_w)
        ys, xs = ys.to(input.dtype).flatten(), xs.to(input.dtype).flatten()
        samples = _bilinear(input[int(b)], ys, xs)  # (C, out_h * grid_h, out_w * grid_w)
        samples = samples.reshape(input.shape[1], out_h, grid_h, out_w, grid_w)
        out[k] = samples.sum(dim=(2, 4)) / count
    return out


def roi_pool(
    input: torch.Tensor,
    boxes: torch.Tensor | Sequence[torch.Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
) -> torch.Tensor:
    """RoIPool of ``input (N, C, H, W)`` over ``boxes`` (as :func:`roi_align`): ``(K, C, out_h, out_w)``, the
    arguments and values of ``torchvision.ops.roi_pool``."""
    rois = _as_rois(boxes).to(input.dtype)
    out_h, out_w = _pair(output_size)
    _, c, h, w = input.shape
    out = input.new_zeros(rois.shape[0], c, out_h, out_w)

    def rnd(v: float) -> int:  # C's round(): halves away from zero
        return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)

    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sx, sy = rnd(x1 * spatial_scale), rnd(y1 * spatial_scale)
        ex, ey = rnd(x2 * spatial_scale), rnd(y2 * spatial_scale)
        roi_w, roi_h = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        for ph in range(out_h):
            hs = min(max(math.floor(ph * bin_h) + sy, 0), h)
            he = min(max(math.ceil((ph + 1) * bin_h) + sy, 0), h)
            for pw in range(out_w):
                ws = min(max(math.floor(pw * bin_w) + sx, 0), w)
                we = min(max(math.ceil((pw + 1) * bin_w) + sx, 0), w)
                if he > hs and we > ws:
                    out[k, :, ph, pw] = input[int(b), :, hs:he, ws:we].amax(dim=(1, 2))
    return out


def fpn_level(
    boxes: torch.Tensor | Sequence[torch.Tensor],
    k_min: int = 2,
    k_max: int = 5,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The FPN level each box is pooled from (Lin et al., CVPR 2017, eq. 1): ``k = floor(k0 + log2(sqrt(wh) /
    224))`` clamped to ``[k_min, k_max]``, returned as an index from ``k_min`` (what ``MultiScaleRoIAlign`` uses):
    a 224x224 box reads P4, one half its side P3.

    Args:
        boxes: ``(K, 4)`` xyxy boxes, or a list of per-image ``(N_i, 4)``.
        k_min, k_max: the lowest and highest pyramid levels (P2..P5 by default).
        canonical_scale, canonical_level: ``224`` and ``k0 = 4``, the ImageNet pre-training size and its level.
        eps: added before the floor so that exact powers of two land on their level despite rounding.
    """
    from maskworks.ops.boxes import box_area

    flat = boxes if isinstance(boxes, torch.Tensor) else torch.cat(list(boxes))
    side = box_area(flat).sqrt()
    level = torch.floor(canonical_level + torch.log2(side / canonical_scale) + eps)
    return level.clamp(min=k_min, max=k_max).to(torch.int64) - k_min
