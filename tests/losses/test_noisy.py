"""Noisy-label losses: SCE, GCE (+ truncated), bootstrapping, confidence-weighted CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskworks.losses.noisy import (
    BootstrappedCrossEntropyLoss,
    ConfidenceWeightedCrossEntropyLoss,
    GeneralizedCrossEntropyLoss,
    SymmetricCrossEntropyLoss,
    bootstrapped_cross_entropy,
    confidence_weighted_cross_entropy,
    generalized_cross_entropy,
    symmetric_cross_entropy,
)


def _data(b=2, k=3, h=4, w=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, h, w, generator=g, dtype=dtype), torch.randint(0, k, (b, h, w), generator=g)


P_LOGITS = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # p = [0.25, 0.75]
LABEL1 = torch.ones(1, 1, 1, dtype=torch.long)


def test_sce_identities_and_hand_values():
    x, y = _data()
    y[0, 0] = 255
    ce = F.cross_entropy(x, y, ignore_index=255)
    assert torch.allclose(symmetric_cross_entropy(x, y, alpha=1.0, beta=0.0), ce, atol=1e-6)
    assert torch.allclose(symmetric_cross_entropy(x, y, alpha=0.3, beta=0.0), 0.3 * ce, atol=1e-6)
    # alpha * -log(0.75) + beta * 4 * (1 - 0.75)
    assert symmetric_cross_entropy(P_LOGITS, LABEL1, 0.1, 1.0).item() == pytest.approx(0.1 * -math.log(0.75) + 1.0)
    # the official code clamps the one-hot at 1e-4: -sum p log clamp(q) == log_zero = log(1e-4)
    p = torch.softmax(x, 1)
    q = F.one_hot(torch.where(y == 255, 0, y), 3).movedim(-1, 1).float().clamp(min=1e-4)
    rce = -(p * q.log()).sum(1)[y != 255].mean()
    assert torch.allclose(symmetric_cross_entropy(x, y, 0.0, 1.0, log_zero=math.log(1e-4)), rce, atol=1e-5)


def test_gce_limits_and_truncation():
    x, y = _data(dtype=torch.float64)
    y[1, 1] = 255
    ce = F.cross_entropy(x, y, ignore_index=255)
    assert torch.allclose(generalized_cross_entropy(x, y, q=1e-7), ce, atol=1e-5)
    p_y = torch.softmax(x, 1).gather(1, torch.where(y == 255, 0, y)[:, None])[:, 0]
    assert torch.allclose(generalized_cross_entropy(x, y, q=1.0), (1 - p_y)[y != 255].mean())
    q, k = 0.7, 0.5
    assert generalized_cross_entropy(P_LOGITS, LABEL1, q).item() == pytest.approx((1 - 0.75**q) / q)
    # p_y = 0.25 <= k: constant L_q(k), no gradient
    z = P_LOGITS.clone().requires_grad_(True)
    loss = generalized_cross_entropy(z, torch.zeros_like(LABEL1), q, truncated=True, k=k)
    loss.backward()
    assert loss.item() == pytest.approx((1 - k**q) / q) and torch.all(z.grad == 0)
    assert generalized_cross_entropy(P_LOGITS, LABEL1, q, truncated=True, k=k).item() == pytest.approx(
        (1 - 0.75**q) / q
    )


def test_gce_gradient_finite_when_p_tiny():
    z = torch.tensor([0.0, -200.0]).view(1, 2, 1, 1).requires_grad_(True)
    generalized_cross_entropy(z, LABEL1, 0.7).backward()
    assert torch.isfinite(z.grad).all()


def test_bootstrap_identities_and_hand_values():
    x, y = _data()
    y[0, 2] = 255
    ce = F.cross_entropy(x, y, ignore_index=255)
    for kind in ("soft", "hard"):
        assert torch.allclose(bootstrapped_cross_entropy(x, y, beta=1.0, kind=kind), ce, atol=1e-6)
    beta = 0.9
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = beta * -math.log(0.75) + (1 - beta) * entropy
    assert bootstrapped_cross_entropy(P_LOGITS, LABEL1, beta, "soft").item() == pytest.approx(expected)
    label0 = torch.zeros_like(LABEL1)
    expected = beta * -math.log(0.25) + (1 - beta) * -math.log(0.75)  # hard: argmax is class 1
    assert bootstrapped_cross_entropy(P_LOGITS, label0, beta, "hard").item() == pytest.approx(expected)
    assert (
        BootstrappedCrossEntropyLoss(kind="soft").beta == 0.95 and BootstrappedCrossEntropyLoss(kind="hard").beta == 0.8
    )


def test_bootstrap_detach_is_fixed_target_ce():
    x, y = _data(dtype=torch.float64)
    beta = 0.8
    z = x.clone().requires_grad_(True)
    bootstrapped_cross_entropy(z, y, beta, "soft", detach=True).backward()
    z2 = x.clone().requires_grad_(True)
    t = beta * F.one_hot(y, 3).movedim(-1, 1) + (1 - beta) * torch.softmax(x, 1)
    F.cross_entropy(z2, t).backward()
    assert torch.allclose(z.grad, z2.grad)


def test_confidence_weighted():
    x, y = _data()
    y[1, 0] = 255
    ce = F.cross_entropy(x, y, ignore_index=255, reduction="none")
    ones = torch.ones(y.shape)
    assert torch.allclose(confidence_weighted_cross_entropy(x, y, ones), ce[y != 255].mean(), atol=1e-6)
    c = torch.rand(y.shape)
    valid = (y != 255).float()
    expected = (ce * c * valid).sum() / (c * valid).sum()
    assert torch.allclose(confidence_weighted_cross_entropy(x, y, c), expected, atol=1e-6)
    m = torch.softmax(x, 1).max(1).values
    expected = (ce * m * valid).sum() / (m * valid).sum()
    assert torch.allclose(ConfidenceWeightedCrossEntropyLoss()(x, y), expected, atol=1e-6)
    with pytest.raises(ValueError):
        confidence_weighted_cross_entropy(x, y, -ones)


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, y: symmetric_cross_entropy(z, y, 0.5, 1.0),
        lambda z, y: generalized_cross_entropy(z, y, 0.7),
        lambda z, y: generalized_cross_entropy(z, y, 0.7, truncated=True, k=0.2),
        lambda z, y: bootstrapped_cross_entropy(z, y, kind="soft"),
        lambda z, y: bootstrapped_cross_entropy(z, y, kind="hard"),
        lambda z, y: confidence_weighted_cross_entropy(
            z, y, torch.linspace(0.1, 1, 9, dtype=torch.float64).view(y.shape)
        ),
    ],
)
def test_ignore_zero_gradient_and_gradcheck(fn):
    x, y = _data(b=1, k=3, h=3, w=3, dtype=torch.float64)
    y[0, 1] = 255
    z = x.clone().requires_grad_(True)
    fn(z, y).backward()
    assert torch.all(z.grad[0, :, 1] == 0) and z.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda t: fn(t, y), (x.clone().requires_grad_(),))


def test_options_validated():
    with pytest.raises(ValueError):
        SymmetricCrossEntropyLoss(log_zero=0.0)
    with pytest.raises(ValueError):
        SymmetricCrossEntropyLoss(alpha=-1.0)
    with pytest.raises(ValueError):
        GeneralizedCrossEntropyLoss(q=0.0)
    with pytest.raises(ValueError):
        GeneralizedCrossEntropyLoss(k=1.0)
    with pytest.raises(ValueError):
        BootstrappedCrossEntropyLoss(kind="medium")
    with pytest.raises(ValueError):
        BootstrappedCrossEntropyLoss(beta=1.5)
    with pytest.raises(ValueError):
        ConfidenceWeightedCrossEntropyLoss(reduction="avg")
