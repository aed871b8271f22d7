"""Calibration: ECE / MCE parity with torchmetrics, NLL, Brier, ignore pixels, logits guard."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

from maskworks.metrics import Calibration


def _random_probs(n=100_000, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, k, generator=g, dtype=torch.float64), 1)
    target = torch.randint(0, k, (n,), generator=g)
    return probs, target


def test_ece_and_mce_match_torchmetrics():
    probs, target = _random_probs()
    cal = Calibration(5, n_bins=15)
    # as images: (B, K, H, W)
    cal.update(probs.reshape(10, 100, 100, 5).permute(0, 3, 1, 2), target.reshape(10, 100, 100))
    out = cal.compute()
    ref = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")(probs, target)
    ref_max = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="max")(probs, target)
    assert out["ece"] == pytest.approx(float(ref), abs=1e-6)
    assert out["mce"] == pytest.approx(float(ref_max), abs=1e-5)  # one bin's gap; torchmetrics works in float32
    assert out["num_pixels"] == 100_000
    assert sum(out["reliability"]["count"]) == 100_000 and len(out["reliability"]["edges"]) == 16


def test_calibrated_and_confidently_wrong_extremes():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(200_000, 4, generator=g, dtype=torch.float64), 1)
    target = torch.multinomial(probs, 1, generator=g)[:, 0]  # labels drawn from the stated probabilities
    cal = Calibration(4)
    cal.update(probs.T.reshape(4, 200_000, 1), target.reshape(200_000, 1))
    assert cal.compute()["ece"] < 0.01
    wrong = Calibration(3)
    p = torch.tensor([[0.0, 0.0, 1.0]]).repeat(50, 1)
    wrong.update(p.T[:, :, None], torch.zeros(50, 1, dtype=torch.long))
    out = wrong.compute()
    assert out["ece"] == pytest.approx(1.0) and out["mce"] == pytest.approx(1.0)
    assert out["nll"] == pytest.approx(-math.log(1e-12))
    assert out["brier"] == pytest.approx(2.0)


def test_nll_brier_by_hand_and_ignore_pixels():
    # one image, 2 classes, 3 pixels; the third is ignored
    probs = torch.tensor([[[0.8, 0.35, 0.5]], [[0.2, 0.65, 0.5]]], dtype=torch.float64)  # (K=2, H=1, W=3)
    target = torch.tensor([[0, 0, 255]])
    cal = Calibration(2, n_bins=10)
    cal.update(probs, target)
    out = cal.compute()
    assert out["num_pixels"] == 2
    assert out["nll"] == pytest.approx((-math.log(0.8) - math.log(0.35)) / 2)
    # Brier: (0.2^2 + 0.2^2) and (0.65^2 + 0.65^2)
    assert out["brier"] == pytest.approx((0.08 + 0.845) / 2)
    # confidences 0.8 (correct) and 0.65 (wrong): bins 8 and 6
    rel = out["reliability"]
    assert rel["count"][8] == 1 and rel["count"][6] == 1
    assert out["ece"] == pytest.approx((abs(1 - 0.8) + abs(0 - 0.65)) / 2)
    ref = F.nll_loss(torch.log(probs[None]), target[None], ignore_index=255)
    assert out["nll"] == pytest.approx(float(ref))


def test_logits_are_rejected_unless_declared_and_streaming_is_exact():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, :2] = 255
    with pytest.raises(ValueError, match="from_logits"):
        Calibration(3).update(logits, target)
    a = Calibration(3, from_logits=True)
    a.update(logits, target)
    b = Calibration(3)
    for i in range(4):
        b.update(torch.softmax(logits[i : i + 1].double(), 1), target[i : i + 1])
    ra, rb = a.compute(), b.compute()
    for key in ("ece", "mce", "nll", "brier"):
        assert ra[key] == pytest.approx(rb[key], abs=1e-12)
    assert ra["reliability"]["count"] == rb["reliability"]["count"]
    a.reset()
    out = a.compute()
    assert out["num_pixels"] == 0 and math.isnan(out["ece"])


def test_all_ignored_and_bad_inputs():
    cal = Calibration(2)
    cal.update(torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2), 255))
    assert cal.compute()["num_pixels"] == 0 and math.isnan(cal.compute()["nll"])
    with pytest.raises(ValueError, match="num_classes"):
        Calibration(1)
    with pytest.raises(ValueError, match="expected num_classes=2"):
        cal.update(torch.full((1, 3, 2, 2), 1 / 3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..1"):
        cal.update(torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="do not match"):
        cal.update(torch.full((1, 2, 2, 2), 0.5), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cal.update(torch.full((1, 2, 2, 2), 0.5), torch.zeros(1, 2, 2))
