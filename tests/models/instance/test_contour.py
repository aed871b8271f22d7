"""Deep Snake contour head: shapes, zero-init, vertex sampling at a stride, the cyclic contour loss, overfitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from maskworks.models.instance import ContourHead, box_to_initial_contour, contour_loss
from maskworks.models.instance.contour import sample_vertex_features
from maskworks.ops import contour_to_mask, mask_to_contour, resample_polygon
from maskworks.ops.polygons import _signed_area


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_head_shapes_and_zero_init_returns_the_initial_contour():
    torch.manual_seed(0)
    head = ContourHead(48, num_points=32, hidden=16, num_iterations=3)
    features = torch.randn(2, 48, 10, 12)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 20.0], [0.0, 0.0, 40.0, 36.0], [10.0, 10.0, 11.0, 12.0]])
    batch_index = torch.tensor([1, 0, 1])
    outs = head(features, boxes, batch_index)
    assert len(outs) == 3 and all(o.shape == (3, 32, 2) for o in outs)
    init = box_to_initial_contour(boxes, 32)
    for o in outs:
        assert torch.equal(o, init)  # the last layer is zero: every step returns its input
    # the per-image list form gives the same; no instances gives empty outputs
    listed = head(features, [boxes[1:2], boxes[[0, 2]]])
    assert torch.equal(listed[-1], init[[1, 0, 2]])
    assert [o.shape for o in head(features, [boxes[:0], boxes[:0]])] == [(0, 32, 2)] * 3
    # gradients reach the features through the vertex sampling once the offsets are non-zero
    nn.init.normal_(head.snakes[0].pred[-1].weight, std=0.1)
    features.requires_grad_(True)
    head(features, boxes, batch_index)[0].sum().backward()  # step 0 (later steps get a detached contour)
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_head_errors():
    head = ContourHead(8, num_points=16, hidden=8, num_iterations=1, dilations=(1, 2))
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    with pytest.raises(ValueError, match=r"features must be \(B, 8, H, W\)"):
        head(torch.zeros(1, 4, 5, 5), boxes)
    with pytest.raises(ValueError, match="batch_index is required"):
        head(torch.zeros(2, 8, 5, 5), boxes)
    with pytest.raises(ValueError, match=r"batch_index values must be in 0\.\.1"):
        head(torch.zeros(2, 8, 5, 5), boxes, torch.tensor([2]))
    with pytest.raises(ValueError, match="x2 < x1"):
        head(torch.zeros(1, 8, 5, 5), torch.tensor([[5.0, 0.0, 1.0, 8.0]]))
    with pytest.raises(ValueError, match=r"initial must be an \(1, 16, 2\)"):
        head(torch.zeros(1, 8, 5, 5), boxes, initial=torch.zeros(1, 8, 2))
    with pytest.raises(ValueError, match="num_points must be an int >= 3"):
        ContourHead(8, num_points=2)
    with pytest.raises(ValueError, match="stride must be a positive number"):
        ContourHead(8, stride=0)


def test_vertex_sampling_maps_input_pixels_by_the_stride():
    # a map whose cells hold the input-pixel coordinates of their centres: bilinear sampling gives the point back
    stride, hf, wf = 4, 6, 8
    ys, xs = torch.meshgrid((torch.arange(hf) + 0.5) * stride, (torch.arange(wf) + 0.5) * stride, indexing="ij")
    features = torch.stack([xs, ys])[None].repeat(2, 1, 1, 1)
    features[1] *= -1  # image 1 differs
    points = torch.tensor([[[2.0, 2.0], [13.0, 7.5], [29.9, 21.0]], [[5.0, 9.0], [17.25, 3.0], [30.0, 22.0]]])
    out = sample_vertex_features(features, points, torch.tensor([0, 1]), stride)
    assert out.shape == (2, 2, 3)
    assert torch.allclose(out[0], points[0].T, atol=1e-5)
    assert torch.allclose(out[1], -points[1].T, atol=1e-5)


def test_initial_contours():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    ellipse = box_to_initial_contour(boxes, 16)[0]
    assert torch.allclose(ellipse[0], torch.tensor([30.0, 20.0]))  # top middle
    assert torch.allclose(ellipse[4], torch.tensor([50.0, 30.0]), atol=1e-5)  # a quarter turn later: the right
    assert torch.allclose(
        ((ellipse - torch.tensor([30.0, 30.0])) / torch.tensor([20.0, 10.0])).norm(dim=1), torch.ones(16)
    )
    octagon = box_to_initial_contour(boxes, 24, shape="octagon")[0]
    assert torch.allclose(octagon[0], torch.tensor([30.0, 20.0]))
    for ring in (ellipse, octagon):
        assert _signed_area(ring.double().numpy()) > 0  # clockwise on screen, as mask_to_contour
    assert octagon[:, 0].min() >= 10 and octagon[:, 0].max() <= 50 and octagon[:, 1].max() <= 40
    # the octagon with corners cut at a quarter of the width / height, resampled equidistantly from the top middle
    by_hand = [[30, 20], [40, 20], [50, 25], [50, 35], [40, 40], [20, 40], [10, 35], [10, 25], [20, 20]]
    assert torch.allclose(octagon, resample_polygon(torch.tensor(by_hand, dtype=torch.float32), 24), atol=1e-5)
    with pytest.raises(ValueError, match="shape must be 'ellipse' or 'octagon'"):
        box_to_initial_contour(boxes, 8, shape="circle")


def test_contour_loss_aligns_the_start_point():
    torch.manual_seed(0)
    target = torch.rand(3, 20, 2) * 30
    shifted = torch.stack([target[0].roll(3, 0), target[1].roll(-7, 0), target[2]])
    assert contour_loss(shifted, target).item() == 0.0
    assert contour_loss(shifted[0], target[0]).item() == 0.0  # (N, 2) form
    noisy = shifted + 0.3 * torch.randn_like(shifted)
    assert contour_loss(noisy, target).item() > 0
    assert contour_loss(target.flip(1), target).item() > 0  # the orientation is not aligned
    # equals the brute-force min over the cyclic shifts of smooth-L1 means, and its gradient flows
    pred = noisy.clone().requires_grad_(True)
    loss = contour_loss(pred, target, beta=0.5)
    brute = torch.stack(
        [
            torch.stack(
                [nn.functional.smooth_l1_loss(noisy[r], target[r].roll(-s, 0), beta=0.5) for s in range(20)]
            ).min()
            for r in range(3)
        ]
    ).mean()
    assert torch.allclose(loss, brute, atol=1e-6)
    loss.backward()
    assert pred.grad.abs().sum() > 0
    empty = torch.zeros(0, 20, 2, requires_grad=True)
    assert contour_loss(empty, torch.zeros(0, 20, 2)).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        contour_loss(target, target[:, :10])


def test_contour_head_overfits_a_circle():
    # tiny tensors: one thread is as fast, and far faster than two when the cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _overfit_circle()
    finally:
        torch.set_num_threads(threads)


def _overfit_circle():
    torch.manual_seed(0)
    h = w = 64
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disk = (yy - 30) ** 2 + (xx - 34) ** 2 <= 14**2  # tight box in pixel edges: x 20..49, y 16..45
    n = 64
    target = mask_to_contour(disk, n)
    image = torch.stack([disk.float(), xx / w, yy / h])[None]  # the image and its coordinate channels
    # two loose, shifted boxes of the same disk: the initial ellipses are far from it
    boxes = torch.tensor([[10.0, 8.0, 52.0, 44.0], [22.0, 14.0, 60.0, 56.0]])
    backbone = nn.Sequential(  # a tiny feature net trained jointly, stride 2
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 48, 3, stride=2, padding=1), nn.ReLU()
    )
    head = ContourHead(48, num_points=n, hidden=32, num_iterations=2, dilations=(1, 1, 2, 2), stride=2)
    initial = [_iou(contour_to_mask(c, h, w), disk) for c in box_to_initial_contour(boxes, n)]
    assert max(initial) < 0.7, initial
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    targets = target[None].expand(2, -1, -1)
    for _ in range(150):  # IoU > 0.97 after 100 steps (seeds 0-2)
        outs = head(backbone(image), boxes)
        loss = sum(contour_loss(o, targets) for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = head(backbone(image), boxes)[-1]
    ious = [_iou(contour_to_mask(c, h, w), disk) for c in final]
    assert min(ious) > 0.9, (ious, float(loss))
