"""OHEM and top-k cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskworks.losses.ohem import OhemCrossEntropyLoss, TopKCrossEntropyLoss, ohem_cross_entropy, topk_cross_entropy


def _data(b=2, k=3, h=4, w=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, h, w, generator=g, dtype=dtype), torch.randint(0, k, (b, h, w), generator=g)


def _probs_logits(p_y):
    """Two-class logits whose probability of class 0 is ``p_y`` per pixel (label 0 everywhere)."""
    p = torch.tensor(p_y, dtype=torch.float64)
    logits = torch.stack([torch.log(p), torch.log1p(-p)]).view(1, 2, 1, -1)
    return logits, torch.zeros(1, 1, len(p_y), dtype=torch.long)


def test_keep_all_equals_cross_entropy():
    x, y = _data()
    y[0, 0] = 255
    ref = F.cross_entropy(x, y, ignore_index=255)
    assert torch.allclose(ohem_cross_entropy(x, y, thresh=1.0, min_kept=0), ref, atol=1e-6)
    assert torch.allclose(ohem_cross_entropy(x, y, thresh=0.01, min_kept=10_000), ref, atol=1e-6)
    w = torch.tensor([0.5, 2.0, 1.0])
    ref_w = F.cross_entropy(x, y, weight=w, ignore_index=255)
    assert torch.allclose(OhemCrossEntropyLoss(1.0, 0, weight=w)(x, y), ref_w, atol=1e-6)


def test_threshold_and_min_kept_hand_values():
    logits, y = _probs_logits([0.9, 0.5, 0.2, 0.65])
    # thresh 0.6: keep p in {0.5, 0.2}
    expected = -(math.log(0.5) + math.log(0.2)) / 2
    assert ohem_cross_entropy(logits, y, thresh=0.6, min_kept=1).item() == pytest.approx(expected)
    # min_kept 3 raises the threshold to the 3rd smallest probability (0.65)
    expected = -(math.log(0.5) + math.log(0.2) + math.log(0.65)) / 3
    assert ohem_cross_entropy(logits, y, thresh=0.6, min_kept=3).item() == pytest.approx(expected)
    none = ohem_cross_entropy(logits, y, thresh=0.6, min_kept=1, reduction="none")
    assert none[0, 0, 0] == 0 and none[0, 0, 3] == 0


def test_topk_hand_values_and_identity():
    logits, y = _probs_logits([0.9, 0.5, 0.2, 0.65])
    assert topk_cross_entropy(logits, y, k=50).item() == pytest.approx(-(math.log(0.5) + math.log(0.2)) / 2)
    assert topk_cross_entropy(logits, y, k=10).item() == pytest.approx(-math.log(0.2))  # ceil(0.4) = 1 pixel
    x, y = _data()
    y[1, :, 2] = 255
    assert torch.allclose(topk_cross_entropy(x, y, k=100), F.cross_entropy(x, y, ignore_index=255), atol=1e-6)


def test_ignore_zero_gradient_and_gradcheck():
    x, y = _data(b=1, k=3, h=3, w=3, dtype=torch.float64)
    y[0, 0] = 255
    for fn in (lambda z: ohem_cross_entropy(z, y, 0.7, 2), lambda z: topk_cross_entropy(z, y, 50)):
        z = x.clone().requires_grad_(True)
        fn(z).backward()
        assert torch.all(z.grad[0, :, 0] == 0) and z.grad.abs().sum() > 0
        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))


def test_binary_single_channel():
    x = torch.randn(2, 1, 4, 4)
    y = torch.randint(0, 2, (2, 4, 4))
    ref = F.binary_cross_entropy_with_logits(x[:, 0], y.float())
    assert torch.allclose(ohem_cross_entropy(x, y, 1.0, 0), ref, atol=1e-6)


def test_options_validated():
    with pytest.raises(ValueError):
        OhemCrossEntropyLoss(thresh=0.0)
    with pytest.raises(ValueError):
        OhemCrossEntropyLoss(min_kept=-1)
    with pytest.raises(ValueError):
        TopKCrossEntropyLoss(k=0)
    with pytest.raises(ValueError):
        TopKCrossEntropyLoss(k=101)
