"""Soft-mask (matting) metrics: SAD, MSE, gradient error, soft IoU."""

import math

import numpy as np
import pytest
import torch

from maskworks.metrics import SoftMaskMetrics
from maskworks.metrics.soft import gaussian_gradient


def test_sad_mse_soft_iou_by_hand():
    pred = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    gt = torch.tensor([[1.0, 1.0], [0.0, 0.75]])
    m = SoftMaskMetrics(scale=1.0)
    m.update(pred, gt)
    out = m.compute()
    assert out["sad"] == pytest.approx(0.5 + 0.5)
    assert out["mse"] == pytest.approx((0.25 + 0.25) / 4)
    assert out["soft_iou"] == pytest.approx((0.5 + 1.0 + 0.25) / (1.0 + 1.0 + 0.75))
    assert out["num_images"] == 1


def test_soft_iou_equals_hard_iou_on_binary_masks_and_uint8_mattes():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 16, 16, generator=g) > 0.5
    t = torch.rand(3, 16, 16, generator=g) > 0.4
    m = SoftMaskMetrics()
    m.update(p.float(), t.float())
    hard = [float((p[i] & t[i]).sum() / (p[i] | t[i]).sum()) for i in range(3)]
    assert m.compute()["soft_iou"] == pytest.approx(np.mean(hard))
    m8 = SoftMaskMetrics()
    m8.update((p * 255).to(torch.uint8).numpy(), (t * 255).to(torch.uint8).numpy())
    assert m8.compute()["soft_iou"] == pytest.approx(np.mean(hard))
    assert m8.compute()["sad"] == pytest.approx(m.compute()["sad"])


def test_gradient_error_sees_a_shifted_edge_and_is_zero_on_equal_maps():
    a = torch.zeros(1, 32, 32)
    a[:, :, 10:] = 1.0
    b = torch.zeros(1, 32, 32)
    b[:, :, 14:] = 1.0  # same mean gradient magnitude, edge elsewhere
    m = SoftMaskMetrics()
    m.update(a, a)
    assert m.compute()["grad"] == pytest.approx(0.0, abs=1e-12)
    m.reset()
    m.update(a, b)
    assert m.compute()["grad"] > 0
    gx, gy = gaussian_gradient(torch.arange(32.0, dtype=torch.float64).repeat(32, 1)[None])
    interior = gx[0, 8:-8, 8:-8]
    assert torch.allclose(interior, interior[0, 0].expand_as(interior)) and gy.abs().max() < 1e-9


def test_region_restricts_the_evaluation_and_empty_regions_are_skipped():
    pred = torch.tensor([[[0.0, 1.0, 0.5]]])
    gt = torch.tensor([[[1.0, 1.0, 0.5]]])
    region = torch.tensor([[[False, True, True]]])
    m = SoftMaskMetrics(scale=1.0)
    m.update(pred, gt, region)
    assert m.compute()["sad"] == 0.0 and m.compute()["soft_iou"] == 1.0
    m.update(pred, gt, torch.zeros_like(region))
    assert m.compute()["num_skipped"] == 1 and m.compute()["num_images"] == 1
    empty = SoftMaskMetrics()
    assert math.isnan(empty.compute()["sad"])


def test_bad_inputs():
    m = SoftMaskMetrics()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="region"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, 3, 3, dtype=torch.bool))
