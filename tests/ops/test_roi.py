"""Reference RoIAlign / RoIPool equal torchvision's compiled kernels: random boxes, boxes partly outside the map,
sub-pixel boxes, aligned True / False, adaptive and fixed sampling, a spatial scale, list-of-boxes input."""

from __future__ import annotations

import pytest
import torch
import torchvision

from maskworks.ops.roi import roi_align, roi_pool


def _rois(seed: int, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 80 - 12  # some start outside the 64x64 image (scale 0.5: 32x32 map)
    wh = torch.rand(n, 2, generator=g) * 50
    wh[:5] = torch.rand(5, 2, generator=g) * 0.8  # sub-pixel boxes
    batch = torch.randint(0, 2, (n, 1), generator=g).float()
    return torch.cat([batch, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_equals_torchvision(aligned, sampling_ratio):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rois = _rois(1).double()
    kw = {"output_size": (7, 5), "spatial_scale": 0.5, "sampling_ratio": sampling_ratio, "aligned": aligned}
    expected = torchvision.ops.roi_align(x, rois, **kw)
    torch.testing.assert_close(roi_align(x, rois, **kw), expected, atol=1e-5, rtol=0)


def test_roi_align_list_input_and_border_samples_are_dropped_not_clamped():
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    boxes = [torch.tensor([[-6.0, -6.0, 6.0, 6.0], [10.0, 10.0, 22.0, 19.0]])]
    expected = torchvision.ops.roi_align(x, boxes, 4, aligned=True)
    torch.testing.assert_close(roi_align(x, boxes, 4, aligned=True), expected, atol=1e-5, rtol=0)


def test_roi_pool_equals_torchvision():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rois = _rois(4).double()
    for size in (7, (3, 5)):
        expected = torchvision.ops.roi_pool(x, rois, size, spatial_scale=0.5)
        torch.testing.assert_close(roi_pool(x, rois, size, spatial_scale=0.5), expected, atol=1e-6, rtol=0)


def test_fpn_level_equals_torchvision_level_mapper():
    from torchvision.ops.poolers import LevelMapper

    from maskworks.ops.roi import fpn_level

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(200, 2, generator=g) * 500
    boxes = [torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 600 + 1], dim=1)]
    boxes.append(torch.tensor([[0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 112.0, 112.0], [0.0, 0.0, 8.0, 8.0]]))
    expected = LevelMapper(2, 5)(boxes)
    assert torch.equal(fpn_level(boxes), expected)
    assert fpn_level(boxes[1]).tolist() == [2, 1, 0]  # P4, P3, and P2 (clamped) as indices from P2
