"""Polygons and contours of binary masks: rasterisation, Douglas-Peucker simplification, equidistant resampling.

Coordinates are COCO pixel-edge coordinates ``(x, y)``: pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)``, so its
centre is at ``(c + 0.5, r + 0.5)``, the convention of :func:`maskworks.data.coco.mask_to_polygons` (which extracts
the boundaries) and of ``pycocotools`` (which rasterises them here). A *ring* is an ``(N, 2)`` closed polygon given
without a repeated end point: vertex ``N - 1`` connects back to vertex 0.

* :func:`polygons_to_mask` / :func:`contour_to_mask`: COCO flat polygons / one ring -> bool ``(H, W)``.
* :func:`simplify_polygon`: Douglas-Peucker on a ring (used by ``mask_to_polygons``).
* :func:`resample_polygon`: ``N`` points equally spaced along a ring's perimeter.
* :func:`mask_to_contour`: the largest outer boundary of a mask as a fixed number of points, the contour
  representation of Deep Snake (:class:`maskworks.models.instance.ContourHead`).

Orientation: the signed (shoelace) area ``A = 1/2 sum_i (x_i y_{i+1} - x_{i+1} y_i)`` of a ring in these
y-down coordinates is positive when the ring runs clockwise on screen. :func:`mask_to_contour` returns that
orientation, as :func:`~maskworks.models.instance.box_to_initial_contour` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["contour_to_mask", "mask_to_contour", "polygons_to_mask", "resample_polygon", "simplify_polygon"]


def _check_size(height: Any, width: Any) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _ring_array(points: Any, name: str = "points") -> np.ndarray:
    """``points`` (tensor, array or nested list) as a finite float64 ``(N, 2)`` array, ``N >= 1``."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    try:
        ring = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an (N, 2) array of (x, y) numbers, got {type(points).__name__}") from e
    if ring.ndim != 2 or ring.shape[1] != 2 or ring.shape[0] < 1:
        raise ValueError(f"{name} must be an (N, 2) array of (x, y) points with N >= 1, got shape {ring.shape}")
    if not np.isfinite(ring).all():
        raise ValueError(f"{name} holds non-finite coordinates; expected finite (x, y) numbers")
    return ring


def _like(ring: np.ndarray, points: Any) -> Any:
    """``ring`` returned as the kind of ``points``: a tensor (its float dtype, float32 for integers, its device) or
    a float64 numpy array."""
    if isinstance(points, torch.Tensor):
        dtype = points.dtype if points.is_floating_point() else torch.float32
        return torch.from_numpy(np.ascontiguousarray(ring)).to(device=points.device, dtype=dtype)
    return ring


# --------------------------------------------------------------------------------------------------- rasterise
def polygons_to_mask(polygons: Sequence[Any], height: int, width: int) -> torch.Tensor:
    """Rasterise COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` (pixel-edge coordinates) to a bool ``(H, W)`` mask.

    The polygons are unioned, as the polygons of one COCO annotation (``pycocotools.mask.frPyObjects`` + ``merge``
    + ``decode``): a pixel is set when the polygon covers its centre, up to pycocotools' edge rule. This is the
    inverse of :func:`maskworks.data.coco.mask_to_polygons`: for a mask without holes and ``tolerance <= 0.25``
    the pixels come back exactly. An empty list gives an empty mask.

    Args:
        polygons: flat coordinate lists (lists, arrays or tensors), each an even number >= 6 of finite numbers.
        height, width: the mask size.
    """
    from maskworks.data.coco import _decode_all

    _check_size(height, width)
    if isinstance(polygons, (torch.Tensor, np.ndarray)) or not isinstance(polygons, Sequence):
        raise ValueError(f"polygons must be a list of flat [x1, y1, x2, y2, ...] lists, got {type(polygons).__name__}")
    if any(isinstance(v, (int, float, np.integer, np.floating)) for v in polygons):
        raise ValueError(
            "polygons must be a list of flat [x1, y1, x2, y2, ...] lists, got a list of numbers; wrap a single polygon "
            "in a list: [polygon]"
        )
    flat = []
    for j, poly in enumerate(polygons):
        if isinstance(poly, torch.Tensor):
            poly = poly.detach().cpu().numpy()
        try:
            p = np.asarray(poly, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"polygons[{j}] is not a flat list of numbers; expected [x1, y1, x2, y2, ...]") from e
        if p.ndim != 1 or len(p) < 6 or len(p) % 2:
            raise ValueError(
                f"polygons[{j}] has shape {p.shape}; expected a flat list of an even number >= 6 of coordinates "
                f"(at least 3 points x, y)"
            )
        if not np.isfinite(p).all():
            raise ValueError(f"polygons[{j}] holds non-finite coordinates; expected finite numbers")
        flat.append([float(v) for v in p])
    if not flat:
        return torch.zeros(height, width, dtype=torch.bool)
    return torch.from_numpy(_decode_all([flat], height, width)[0])


def contour_to_mask(points: Any, height: int, width: int) -> torch.Tensor:
    """Rasterise one ring ``(N, 2)`` of ``(x, y)`` pixel-edge coordinates (``N >= 3``) to a bool ``(H, W)`` mask
    (see :func:`polygons_to_mask`)."""
    ring = _ring_array(points)
    if len(ring) < 3:
        raise ValueError(f"points must hold at least 3 (x, y) points to enclose an area, got {len(ring)}")
    return polygons_to_mask([ring.reshape(-1)], height, width)


# --------------------------------------------------------------------------------------------------- simplify
def _douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on an open polyline ``(M, 2)``: the kept points, end points included."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        a, b = stack.pop()
        if b <= a + 1:
            continue
        seg = points[b] - points[a]
        rel = points[a + 1 : b] - points[a]
        norm = math.hypot(*seg)
        dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm if norm > 0 else np.hypot(rel[:, 0], rel[:, 1])
        j = int(np.argmax(dist))
        if dist[j] > tolerance:
            m = a + 1 + j
            keep[m] = True
            stack += [(a, m), (m, b)]
    return points[keep]


def simplify_polygon(points: Any, tolerance: float) -> Any:
    """Douglas-Peucker simplification of a closed ring ``(N, 2)``.

    Douglas-Peucker on a polyline keeps its end points, finds the interior vertex farthest from the chord between
    them (distance ``|d x (p - a)| / |d|``, ``d = b - a``) and, when that distance exceeds ``tolerance``, keeps it
    and recurses on both halves; otherwise every interior vertex is dropped. A ring is split into two polylines at
    the vertex farthest from vertex 0, so the result starts at the same vertex 0 and keeps the order and the
    orientation. Every dropped vertex lies within ``tolerance`` of the simplified ring. Collinear vertices (and
    repeated ones) are dropped even with ``tolerance=0``.

    Args:
        points: ``(N, 2)`` ring (tensor, array or nested list); a repeated end point (``points[-1] == points[0]``)
            is dropped first.
        tolerance: the largest distance, in the points' units, of a dropped vertex from the simplified ring (>= 0).

    Returns:
        The kept vertices ``(M, 2)``, ``M <= N``, in order (a single point when all points coincide); a tensor for a
        tensor input (same device, float dtype), else a float64 numpy array.
    """
    ring = _ring_array(points)
    if not (isinstance(tolerance, (int, float, np.integer, np.floating)) and not isinstance(tolerance, bool)) or not (
        math.isfinite(tolerance) and tolerance >= 0
    ):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        return _like(ring, points)
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    if far == 0:
        return _like(ring[:1], points)
    first = _douglas_peucker(ring[: far + 1], tolerance)
    second = _douglas_peucker(np.concatenate([ring[far:], ring[:1]]), tolerance)
    return _like(np.concatenate([first, second[1:-1]]), points)


# --------------------------------------------------------------------------------------------------- resample
def _resample_rings(rings: torch.Tensor, num_points: int) -> torch.Tensor:
    """Batched :func:`resample_polygon`: ``(R, M, 2)`` float rings -> ``(R, num_points, 2)``."""
    r, m = rings.shape[:2]
    nxt = torch.roll(rings, -1, dims=1)
    seg = (nxt - rings).norm(dim=-1)  # (R, M): length of the edge from vertex i to vertex i + 1 (cyclic)
    cum = torch.cat([seg.new_zeros(r, 1), seg.cumsum(1)], 1)  # (R, M + 1): arc length at each vertex
    perimeter = cum[:, -1:]
    t = torch.arange(num_points, dtype=rings.dtype, device=rings.device) / num_points * perimeter  # (R, n)
    # edge j with cum[j] <= t < cum[j + 1]; zero-length edges are never chosen since t < cum[M] = perimeter
    j = (torch.searchsorted(cum.contiguous(), t.contiguous(), right=True) - 1).clamp(0, m - 1)
    start = cum.gather(1, j)
    frac = ((t - start) / seg.gather(1, j).clamp_min(torch.finfo(rings.dtype).tiny)).clamp(0, 1)
    idx = j[..., None].expand(-1, -1, 2)
    a, b = rings.gather(1, idx), nxt.gather(1, idx)
    return a + frac[..., None] * (b - a)


def resample_polygon(points: Any, num_points: int) -> Any:
    """``num_points`` points equally spaced along the perimeter of a closed ring ``(N, 2)``.

    With arc length ``s_i`` at vertex ``i`` (``s_0 = 0``, perimeter ``L`` including the closing edge), point ``k``
    is the point at arc length ``t_k = k L / num_points`` on the ring, linearly interpolated on the edge that holds
    it: point 0 is vertex 0, and the points follow the ring's order and orientation. Consecutive points are
    ``L / num_points`` apart along the ring (not along the chord: a corner between two points shortens the chord).
    A ring of zero perimeter gives ``num_points`` copies of its point.

    Args:
        points: ``(N, 2)`` ring, ``N >= 1`` (tensor, array or nested list); a repeated end point is dropped first.
        num_points: the number of points returned (>= 1).

    Returns:
        ``(num_points, 2)``: a tensor for a tensor input (same device, its float dtype, float32 for integers), else a
        float64 numpy array.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 1:
        raise ValueError(f"num_points must be a positive int, got {num_points!r}")
    ring = _ring_array(points)
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    out = _resample_rings(torch.from_numpy(ring)[None], int(num_points))[0].numpy()
    return _like(out, points)


# --------------------------------------------------------------------------------------------------- contours
def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area: positive for a clockwise ring on screen (y pointing down)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def mask_to_contour(mask: Any, num_points: int) -> torch.Tensor:
    """The largest outer boundary of a binary mask as ``num_points`` ``(x, y)`` points, float32 ``(num_points, 2)``.

    The boundary is :func:`maskworks.data.coco.mask_to_polygons` (``tolerance=0``: the level-0.5 iso-line in pixel-
    edge coordinates, one ring per 4-connected component, holes dropped); the ring with the largest area is kept,
    oriented clockwise on screen (positive shoelace area, see the module docstring), rotated to start at its top-most
    vertex (the left-most among ties) and resampled equidistantly (:func:`resample_polygon`).
    :func:`contour_to_mask` rasterises it back.

    Args:
        mask: ``(H, W)`` bool (array or tensor; non-zero = set).
        num_points: the number of contour points (>= 3).

    Raises:
        ValueError: an empty mask (it has no boundary), a mask that is not 2-D, ``num_points < 3``.
    """
    from maskworks.data.coco import mask_to_polygons

    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 3:
        raise ValueError(f"num_points must be an int >= 3, got {num_points!r}")
    shape = tuple(mask.shape) if hasattr(mask, "shape") else np.shape(mask)
    if len(shape) != 2:
        raise ValueError(f"mask must be an (H, W) mask, got shape {shape}")
    polygons = mask_to_polygons(mask, tolerance=0.0)
    if not polygons:
        raise ValueError(f"mask has no set pixel ({shape[0]}x{shape[1]} HxW, all zero); expected a non-empty mask")
    rings = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    areas = [_signed_area(r) for r in rings]
    k = int(np.argmax(np.abs(areas)))
    ring = rings[k] if areas[k] > 0 else rings[k][::-1]
    top = int(np.lexsort((ring[:, 0], ring[:, 1]))[0])  # smallest y, then smallest x
    ring = np.roll(ring, -top, axis=0)
    return torch.from_numpy(resample_polygon(ring, int(num_points))).float()
