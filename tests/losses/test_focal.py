"""Focal loss: CE identity, hand values, smp / MONAI / torchvision parity, ignore handling, gradcheck."""

from __future__ import annotations

import math

import monai
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from maskworks.losses.focal import FocalLoss, focal_loss


def _data(k=4, seed=0, dtype=torch.float64, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, k, 5, 6, generator=g, dtype=dtype)
    t = torch.randint(0, max(k, 2), (2, 5, 6), generator=g)
    if ignore:
        t[0, 1:3, 2:5] = 255
    return x, t


def test_gamma0_equals_cross_entropy_value_and_grad():
    x, t = _data()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = focal_loss(x1, t, gamma=0.0), F.cross_entropy(x2, t, ignore_index=255)
    torch.testing.assert_close(ours, ref, atol=1e-15, rtol=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-15, rtol=0)
    ce_none = F.cross_entropy(x, t, ignore_index=255, reduction="none")
    torch.testing.assert_close(focal_loss(x, t, gamma=0.0, reduction="none"), ce_none, atol=1e-15, rtol=0)
    torch.testing.assert_close(focal_loss(x, t, gamma=0.0, reduction="sum"), ce_none.sum(), atol=1e-12, rtol=0)


def test_gamma0_binary_equals_bce():
    x, t = _data(k=1, ignore=False)
    ours = focal_loss(x, t, "binary", gamma=0.0)
    torch.testing.assert_close(ours, F.binary_cross_entropy_with_logits(x[:, 0], t.double()), atol=1e-15, rtol=0)


def test_hand_values():
    log2 = math.log(2.0)
    # one pixel, p_t = 0.5: (1 - 0.5)^2 * log 2
    xb, tb = torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.long)
    assert focal_loss(xb, tb, "binary").item() == pytest.approx(0.25 * log2, abs=1e-15)
    assert focal_loss(xb, tb, "binary", alpha=0.25).item() == pytest.approx(0.0625 * log2, abs=1e-15)
    assert focal_loss(xb, 1 - tb, "binary", alpha=0.25).item() == pytest.approx(0.75 * 0.25 * log2, abs=1e-15)
    xm = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    tm = torch.tensor([[[0, 1]]])
    assert focal_loss(xm, tm, alpha=[0.3, 0.7]).item() == pytest.approx(0.5 * (0.3 + 0.7) * 0.25 * log2, abs=1e-15)
    # p_t = e^2 / (e^2 + 2) with three classes
    x3 = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    pt = math.exp(2) / (math.exp(2) + 2)
    expected = -((1 - pt) ** 1.5) * math.log(pt)
    assert focal_loss(x3, torch.zeros(1, 1, 1, dtype=torch.long), gamma=1.5).item() == pytest.approx(expected, 1e-14)


def test_per_class_alpha_manual_formula():
    x, t = _data()
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    valid = t != 255
    safe = torch.where(valid, t, 0)
    pt = x.softmax(1).gather(1, safe[:, None])[:, 0]
    manual = -alpha[safe] * (1 - pt) ** 2 * pt.log()
    torch.testing.assert_close(focal_loss(x, t, alpha=alpha.tolist(), reduction="none"), manual * valid)
    torch.testing.assert_close(focal_loss(x, t, alpha=alpha), (manual * valid).sum() / valid.sum())


def test_smp_and_torchvision_parity_binary():
    x, t = _data(k=1, seed=1, dtype=torch.float32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = focal_loss(x1, t, "binary", alpha=0.25, gamma=2.0)
    ref = smp.losses.FocalLoss("binary", alpha=0.25, gamma=2.0, ignore_index=255)(x2, t)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-7, rtol=1e-5)
    x, t = _data(k=1, seed=2, ignore=False)
    tv = sigmoid_focal_loss(x[:, 0], t.double(), alpha=0.25, gamma=2.0, reduction="none")
    torch.testing.assert_close(focal_loss(x, t, "binary", alpha=0.25, reduction="none")[:, 0], tv)


def test_smp_parity_multilabel():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g)
    t = torch.randint(0, 2, (2, 3, 4, 5), generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = focal_loss(x1, t, "multilabel", alpha=0.4, gamma=1.5)
    ref = smp.losses.FocalLoss("multilabel", alpha=0.4, gamma=1.5)(x2, t)  # mean of per-class means
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, [0.1, 0.5, 0.2, 0.9]])
def test_monai_parity_multiclass(alpha):
    """MONAI's softmax focal loss per channel (reduction='none') summed over channels is our per-pixel loss."""
    x, t = _data(seed=4, dtype=torch.float32)  # MONAI computes in float32
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = focal_loss(x1, t, gamma=2.0, alpha=alpha, reduction="none")
    ref_fn = monai.losses.FocalLoss(
        to_onehot_y=True, use_softmax=True, gamma=2.0, alpha=alpha, reduction="none", ignore_index=255
    )
    ref = ref_fn(x2, t[:, None]).sum(1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


def test_monai_parity_binary():
    x, t = _data(k=1, seed=5, ignore=False, dtype=torch.float32)
    ours = focal_loss(x, t, "binary", gamma=2.0, alpha=0.3, reduction="none")
    ref = monai.losses.FocalLoss(gamma=2.0, alpha=0.3, reduction="none")(x, t[:, None].float())
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["multiclass", "binary"])
def test_ignored_pixels_zero_gradient_no_crash(mode):
    k = 3 if mode == "multiclass" else 1
    x, t = _data(k=k, seed=6)
    x.requires_grad_()
    loss = focal_loss(x, t, mode, gamma=2.0, alpha=[0.2, 0.3, 0.5] if k == 3 else 0.25)
    loss.backward()
    ign = (t == 255)[:, None].expand_as(x)
    assert torch.all(x.grad[ign] == 0) and torch.isfinite(loss)
    x2 = x.detach().clone()
    x2[ign] = 50.0
    torch.testing.assert_close(focal_loss(x2, t, mode, alpha=[0.2, 0.3, 0.5] if k == 3 else 0.25), loss.detach())


def test_gradcheck():
    x, t = _data(k=3, seed=7)
    x = x[:, :, :3, :3].contiguous().requires_grad_()
    t = t[:, :3, :3]
    assert torch.autograd.gradcheck(lambda z: focal_loss(z, t, alpha=[0.2, 0.5, 0.3], gamma=2.0), (x,))
    assert torch.autograd.gradcheck(lambda z: focal_loss(z, t, gamma=0.5), (x,))
    xb = x[:, :1].detach().clone().requires_grad_()
    tb = (t % 2).masked_fill(t == 255, 255)
    assert torch.autograd.gradcheck(lambda z: focal_loss(z, tb, "binary", alpha=0.25, gamma=1.5), (xb,))


def test_perfect_prediction_and_extreme_logits_are_finite():
    t = torch.randint(0, 3, (2, 4, 4))
    x = (40.0 * F.one_hot(t, 3).movedim(-1, 1).double()).requires_grad_()
    loss = focal_loss(x, t, gamma=0.5)
    loss.backward()
    assert loss.item() < 1e-15 and torch.isfinite(x.grad).all()
    xb = (100.0 * (2 * (t > 0).double() - 1))[:, None].requires_grad_()
    lb = focal_loss(xb, (t > 0).long(), "binary", gamma=0.5)
    lb.backward()
    assert lb.item() < 1e-15 and torch.isfinite(xb.grad).all()


def test_module_validation_and_aux():
    with pytest.raises(ValueError):
        FocalLoss(alpha=0.25)  # scalar alpha in multiclass only rescales: rejected
    with pytest.raises(ValueError):
        FocalLoss("binary", alpha=1.5)
    with pytest.raises(ValueError):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError):
        FocalLoss(mode="softmax")
    with pytest.raises(ValueError):
        FocalLoss(reduction="avg")
    x, t = _data(k=3, seed=8, dtype=torch.float32)
    m = FocalLoss(alpha=[1.0, 2.0, 3.0])
    assert m.alpha.dtype == torch.float32 and "alpha" in dict(m.named_buffers())
    aux = torch.randn(2, 3, 3, 3)
    expected = focal_loss(x, t, alpha=[1.0, 2.0, 3.0]) + 0.4 * focal_loss(aux, t, alpha=[1.0, 2.0, 3.0])
    torch.testing.assert_close(m({"out": x, "aux": [aux]}, t), expected)
    with pytest.raises(ValueError):
        focal_loss(x, t, alpha=[1.0, 2.0])  # wrong length
    with pytest.raises(ValueError):
        focal_loss(x, torch.full_like(t, 7))  # label out of range and not ignore_index
