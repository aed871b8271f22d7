"""Mask <-> polygon / contour conversion: rasterisation, Douglas-Peucker, equidistant resampling, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskworks.data.coco import mask_to_polygons
from maskworks.ops import contour_to_mask, mask_to_contour, polygons_to_mask, resample_polygon, simplify_polygon
from maskworks.ops.polygons import _signed_area


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def _disk(h=60, w=70, cy=30.0, cx=33.0, r=17.5) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _u_shape() -> torch.Tensor:
    m = torch.zeros(50, 60, dtype=torch.bool)
    m[8:42, 10:50] = True
    m[8:32, 22:38] = False  # the notch opens upwards: a concave U
    return m


def _cross() -> torch.Tensor:
    m = torch.zeros(40, 40, dtype=torch.bool)
    m[15:25, 5:35] = True
    m[5:35, 15:25] = True
    return m


# --------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["disk", "u_shape", "cross"])
def test_polygons_round_trip_exact_at_tolerance_zero(name):
    mask = {"disk": _disk, "u_shape": _u_shape, "cross": _cross}[name]()
    h, w = mask.shape
    for tolerance in (0.0, 0.25):
        back = polygons_to_mask(mask_to_polygons(mask, tolerance=tolerance), h, w)
        assert back.dtype == torch.bool and back.shape == (h, w)
        assert torch.equal(back, mask), (name, tolerance)
    # several components are unioned; a tensor polygon is accepted
    two = mask.clone()
    two[0:2, 0:3] = True
    polys = [torch.tensor(p) for p in mask_to_polygons(two, tolerance=0)]
    assert len(polys) == 2 and torch.equal(polygons_to_mask(polys, h, w), two)
    assert not polygons_to_mask([], h, w).any()


@pytest.mark.parametrize("name", ["disk", "u_shape"])
@pytest.mark.parametrize("num_points", [64, 128])
def test_mask_contour_mask_round_trip_keeps_iou(name, num_points):
    mask = {"disk": _disk, "u_shape": _u_shape}[name]()
    h, w = mask.shape
    contour = mask_to_contour(mask, num_points)
    assert contour.shape == (num_points, 2) and contour.dtype == torch.float32
    assert _signed_area(contour.double().numpy()) > 0  # clockwise on screen
    ys = contour[:, 1]
    assert ys[0] == ys.min()  # starts at the top-most vertex
    back = contour_to_mask(contour, h, w)
    assert _iou(back, mask) > 0.95, (name, num_points, _iou(back, mask))
    # contour -> polygon (simplified) -> mask
    poly = simplify_polygon(contour, 0.25)
    assert poly.shape[0] <= num_points
    assert _iou(polygons_to_mask([poly.reshape(-1)], h, w), mask) > 0.95


def test_mask_to_contour_takes_the_largest_component_and_refuses_empty():
    mask = _disk(r=10.0)
    mask[0:3, 60:63] = True  # a small second component, found first by contourpy (it is top-most)
    contour = mask_to_contour(mask, 32)
    assert contour[:, 0].min() > 15  # the disk, not the small square
    with pytest.raises(ValueError, match="no set pixel"):
        mask_to_contour(torch.zeros(5, 6, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mask_to_contour(torch.ones(1, 5, 6, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="num_points"):
        mask_to_contour(mask, 2)


# --------------------------------------------------------------------------------------------------- resample
def test_resample_square_by_hand():
    square = torch.tensor([[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]])  # perimeter 16, clockwise on screen
    out = resample_polygon(square, 8)  # spacing 2: corners and edge midpoints, from vertex 0
    expected = [[0, 0], [2, 0], [4, 0], [4, 2], [4, 4], [2, 4], [0, 4], [0, 2]]
    assert out.shape == (8, 2) and out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float32))
    # spacing 16 / 5 = 3.2: points cut corners; the arc length between consecutive points is 3.2
    out5 = resample_polygon(square.numpy(), 5)
    assert isinstance(out5, np.ndarray) and out5.shape == (5, 2)
    np.testing.assert_allclose(out5, [[0, 0], [3.2, 0], [4, 2.4], [2.4, 4], [0, 3.2]], atol=1e-12)
    # a repeated end point and integer input change nothing; the orientation is kept when reversed
    closed = torch.cat([square, square[:1]]).long()
    assert torch.allclose(resample_polygon(closed, 8), out)
    rev = resample_polygon(square.flip(0), 8)
    assert torch.allclose(rev, torch.tensor([[0, 4], [2, 4], [4, 4], [4, 2], [4, 0], [2, 0], [0, 0], [0, 2]]).float())


@pytest.mark.parametrize("num_points", [3, 7, 100, 257])
def test_resample_exact_count_equidistant_and_cyclic_order(num_points):
    ring = mask_to_contour(_u_shape(), 400).double()  # a concave ring
    perim = float((ring.roll(-1, 0) - ring).norm(dim=1).sum())
    out = resample_polygon(ring, num_points)
    assert out.shape == (num_points, 2) and out.dtype == torch.float64
    assert torch.equal(out[0], ring[0])
    # each point's arc-length position along the ring (the nearest point of the nearest edge): k * L / num_points
    a, d = ring, ring.roll(-1, 0) - ring  # edges a_i + t d_i, t in [0, 1]
    seg = d.norm(dim=1)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), seg.cumsum(0)[:-1]])
    t = (((out[:, None] - a[None]) * d[None]).sum(-1) / (seg**2).clamp_min(1e-12)).clamp(0, 1)  # (n, M)
    dist = (a[None] + t[..., None] * d[None] - out[:, None]).norm(dim=-1)
    i = dist.argmin(1)
    assert dist.min(1).values.max() < 1e-9  # every point lies on the ring
    positions = cum[i] + t[torch.arange(num_points), i] * seg[i]
    expected = torch.arange(num_points, dtype=torch.float64) * perim / num_points
    assert torch.allclose(positions, expected, atol=1e-6)


def test_resample_degenerate_and_errors():
    assert torch.equal(resample_polygon(torch.tensor([[2.0, 3.0]] * 3), 4), torch.tensor([[2.0, 3.0]] * 4))
    with pytest.raises(ValueError, match="num_points"):
        resample_polygon(torch.zeros(4, 2), 0)
    with pytest.raises(ValueError, match=r"points must be an \(N, 2\)"):
        resample_polygon(torch.zeros(4, 3), 5)
    with pytest.raises(ValueError, match="non-finite"):
        resample_polygon(torch.tensor([[0.0, float("nan")], [1.0, 1.0], [2.0, 0.0]]), 5)


# --------------------------------------------------------------------------------------------------- simplify
def test_douglas_peucker_drops_collinear_points():
    # a square with extra points on its edges (and a repeated point): only the 4 corners stay, from vertex 0
    ring = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [3, 1], [3, 3], [3, 3], [1.5, 3], [0, 3], [0, 2]], dtype=float)
    out = simplify_polygon(ring, 0.0)
    np.testing.assert_array_equal(out, [[0, 0], [3, 0], [3, 3], [0, 3]])
    # starting mid-edge: the start point stays (the ring is split at vertex 0 and at the farthest vertex)
    out = simplify_polygon(np.roll(ring, -1, axis=0), 0.0)
    np.testing.assert_array_equal(out, [[1, 0], [3, 0], [3, 3], [0, 3], [0, 0]])
    assert simplify_polygon(torch.tensor(ring), 0.0).dtype == torch.float64  # tensor in, tensor out


def test_douglas_peucker_hand_example():
    ring = np.array([[0, 0], [3, -0.4], [6, 0.3], [10, 0], [7, 4], [5, 5.2], [2, 3], [1, 1]], dtype=float)
    # vertex 3 = (10, 0) is the farthest from vertex 0: the ring splits into (0,0)..(10,0) and (10,0)..(0,0).
    # Lower chain, chord y = 0: (3, -0.4) at 0.4 (then (6, 0.3) at 3.7 / |(7, 0.4)| = 0.528 from (3,-0.4)-(10,0)).
    # Upper chain, chord y = 0: (5, 5.2) at 5.2; then (7, 4) at 4.4 / |(5, 5.2)| = 0.610 from (10,0)-(5,5.2),
    # (2, 3) at 4.6 / |(5, 5.2)| = 0.638 from (5,5.2)-(0,0) (and (1, 1) at 0.2 / 7.21 = 0.028), then (1, 1) at
    # 1 / |(2, 3)| = 0.277 from (2,3)-(0,0).
    cases = {
        2.0: [[0, 0], [10, 0], [5, 5.2]],
        0.62: [[0, 0], [10, 0], [5, 5.2], [2, 3]],
        0.5: [[0, 0], [10, 0], [7, 4], [5, 5.2], [2, 3]],
        0.35: [[0, 0], [3, -0.4], [6, 0.3], [10, 0], [7, 4], [5, 5.2], [2, 3]],
        0.25: ring.tolist(),
    }
    for tolerance, expected in cases.items():
        np.testing.assert_array_equal(simplify_polygon(ring, tolerance), expected, err_msg=str(tolerance))
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        simplify_polygon(ring, -1)


def test_mask_to_polygons_uses_simplify_polygon():
    mask = _disk()
    full = np.array(mask_to_polygons(mask, tolerance=0)[0]).reshape(-1, 2)
    for tolerance in (0.25, 1.0):
        expected = [float(v) for v in simplify_polygon(full, tolerance).reshape(-1)]
        assert mask_to_polygons(mask, tolerance=tolerance)[0] == expected


def test_rasterise_errors():
    with pytest.raises(ValueError, match="wrap a single polygon"):
        polygons_to_mask([0, 0, 4, 0, 4, 4], 5, 5)
    with pytest.raises(ValueError, match=r"polygons\[1\].*even number >= 6"):
        polygons_to_mask([[0, 0, 4, 0, 4, 4], [0, 0, 1, 1]], 5, 5)
    with pytest.raises(ValueError, match="height must be a positive int"):
        polygons_to_mask([[0, 0, 4, 0, 4, 4]], 0, 5)
    with pytest.raises(ValueError, match="at least 3"):
        contour_to_mask(torch.zeros(2, 2), 5, 5)
    # a hand square: pixel-edge coordinates [1, 4) x [2, 5) cover pixels rows 2..4, columns 1..3
    m = contour_to_mask(torch.tensor([[1.0, 2.0], [4.0, 2.0], [4.0, 5.0], [1.0, 5.0]]), 7, 6)
    expected = torch.zeros(7, 6, dtype=torch.bool)
    expected[2:5, 1:4] = True
    assert torch.equal(m, expected)
