"""Soft-target CE, label smoothing conventions and boundary label smoothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskworks.losses.soft import SoftCrossEntropyLoss, boundary_label_smoothing, soft_cross_entropy


def _data(b=2, k=4, h=5, w=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, h, w, generator=g, dtype=dtype), torch.randint(0, k, (b, h, w), generator=g)


def test_hand_value():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # p = [0.25, 0.75]
    target = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_one_hot_targets_equal_cross_entropy_with_ignore():
    x, y = _data()
    y[0, 0, :3] = 255
    one_hot = F.one_hot(torch.where(y == 255, 0, y), 4).movedim(-1, 1).float() * (y != 255)[:, None]
    ref = F.cross_entropy(x, y, ignore_index=255)
    assert torch.allclose(soft_cross_entropy(x, one_hot), ref, atol=1e-6)
    assert torch.allclose(soft_cross_entropy(x, y), ref, atol=1e-6)
    assert torch.allclose(
        soft_cross_entropy(x, y, reduction="sum"), F.cross_entropy(x, y, ignore_index=255, reduction="sum"), atol=1e-5
    )


def test_label_smoothing_matches_pytorch_and_seed_convention():
    x, y = _data()
    y[1, 2] = 255
    eps = 0.1
    ref = F.cross_entropy(x, y, ignore_index=255, label_smoothing=eps)
    assert torch.allclose(soft_cross_entropy(x, y, smoothing=eps), ref, atol=1e-6)
    # seed convention: 1 - eps on the class, eps / (K - 1) elsewhere == PyTorch with eps * K / (K - 1)
    k = 4
    valid = y != 255
    t = torch.full_like(x, eps / (k - 1))
    t.scatter_(1, torch.where(valid, y, 0)[:, None], 1 - eps)
    seed = -(t * F.log_softmax(x, 1)).sum(1)[valid].mean()
    assert torch.allclose(soft_cross_entropy(x, y, smoothing=eps * k / (k - 1)), seed, atol=1e-6)


def test_class_weights_match_pytorch_probability_targets():
    x, y = _data()
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    p = torch.softmax(torch.randn_like(x), 1)
    assert torch.allclose(soft_cross_entropy(x, p, weight=w), F.cross_entropy(x, p, weight=w), atol=1e-6)


def test_binary_single_channel():
    x = torch.randn(2, 1, 4, 4)
    t = torch.rand(2, 1, 4, 4)
    assert torch.allclose(soft_cross_entropy(x, t), F.binary_cross_entropy_with_logits(x, t), atol=1e-6)
    y = torch.randint(0, 2, (2, 4, 4))
    ref = F.binary_cross_entropy_with_logits(x[:, 0], y.float())
    assert torch.allclose(soft_cross_entropy(x, y), ref, atol=1e-6)


def test_takes_logits_not_probabilities():
    """Seed defect: the loss was applied to probabilities. Logits are shift invariant; probabilities are not."""
    x, y = _data()
    assert torch.allclose(soft_cross_entropy(x + 5.0, y), soft_cross_entropy(x, y), atol=1e-5)
    assert not torch.allclose(soft_cross_entropy(torch.softmax(x, 1), y), soft_cross_entropy(x, y), atol=1e-3)


def test_ignore_gets_zero_gradient_and_gradcheck():
    x, y = _data(b=1, k=3, h=3, w=3, dtype=torch.float64)
    y[0, 1] = 255
    x.requires_grad_(True)
    soft_cross_entropy(x, y, smoothing=0.1).backward()
    assert torch.all(x.grad[0, :, 1] == 0) and x.grad.abs().sum() > 0
    t = torch.softmax(torch.randn(1, 3, 3, 3, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda z: soft_cross_entropy(z, t, smoothing=0.2), (x.detach().requires_grad_(),))


def test_module_options_and_aux():
    with pytest.raises(ValueError):
        SoftCrossEntropyLoss(smoothing=1.0)
    with pytest.raises(ValueError):
        SoftCrossEntropyLoss(reduction="avg")
    x, y = _data()
    a = torch.randn_like(x)
    loss = SoftCrossEntropyLoss(smoothing=0.1, aux_weight=0.5)({"out": x, "aux": [a]}, y)
    expected = soft_cross_entropy(x, y, 0.1) + 0.5 * soft_cross_entropy(a, y, 0.1)
    assert torch.allclose(loss, expected)
    assert SoftCrossEntropyLoss(reduction="none")(x, y).shape == y.shape


def test_boundary_label_smoothing():
    y = torch.zeros(1, 7, 7, dtype=torch.long)
    y[0, :, 4:] = 1
    y[0, 0, 0] = 255
    t = boundary_label_smoothing(y, num_classes=3, radius=1, epsilon=0.2)
    assert t.shape == (1, 3, 7, 7)
    assert torch.all(t[0, :, 0, 0] == 0)  # ignored pixel: all-zero row
    sums = t.sum(1)[0]
    assert torch.allclose(sums[y[0] != 255], torch.ones(()))
    # far from the edge: one-hot
    assert torch.equal(t[0, :, 3, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(t[0, :, 3, 6], torch.tensor([0.0, 1.0, 0.0]))
    # on either side of the edge: smoothing shared between classes 0 and 1 only (class 2 absent)
    assert torch.allclose(t[0, :, 3, 3], torch.tensor([0.9, 0.1, 0.0]))
    assert torch.allclose(t[0, :, 3, 4], torch.tensor([0.1, 0.9, 0.0]))
    # the ignored pixel does not create a boundary around it
    assert torch.equal(t[0, :, 1, 1], torch.tensor([1.0, 0.0, 0.0]))


def test_boundary_label_smoothing_all_classes_present_equals_label_smoothing():
    y = torch.tensor([[[0, 1], [2, 0]]])
    x = torch.randn(1, 3, 2, 2)
    t = boundary_label_smoothing(y, 3, radius=1, epsilon=0.3)
    ref = F.cross_entropy(x, y, label_smoothing=0.3)
    assert torch.allclose(soft_cross_entropy(x, t), ref, atol=1e-6)
    with pytest.raises(ValueError):
        boundary_label_smoothing(y, 3, radius=0)
