"""Concrete cases of smp's ``tests/test_losses.py``, run through segmentation_models_pytorch and maskworks.

smp's cases feed probabilities (``from_logits=False``) with exact 0 / 1 values; maskworks losses take logits, so
each case is fed to both libraries as logits ``+-30`` (``sigmoid(30) = 1 - 9e-14``): smp with
``from_logits=True``, ours as is. The two must agree to 1e-10 in float64 and both must reproduce smp's expected
value to its own tolerance (1e-5). The score-function cases (``soft_jaccard_score`` / ``soft_dice_score`` /
``soft_tversky_score``) are compared with ``1 - loss(reduction="none")``.

Intentional differences, asserted exactly (see :mod:`maskworks.losses.overlap` and :mod:`maskworks.losses.soft`):

* smp masks absent classes for every ``smooth`` and then averages over all ``K`` classes; our default masks them
  only when ``smooth == 0`` and our mean skips masked classes. smp's value is
  ``ours(mask_absent=True, reduction="none").mean()`` for every ``smooth``.
* smp's Dice smoothing ``s`` is our ``2 s`` (smp computes Dice as a Tversky score with ``alpha = beta = 0.5``).
* smp's ``SoftCrossEntropyLoss`` / ``SoftBCEWithLogitsLoss`` average over all pixels, ignored ones included as
  zeros; ours average over the counted pixels (as ``F.cross_entropy``), so smp = ours * counted / total.
  smp's ``smooth_factor`` for BCE moves ``sf`` of the mass to the other class: our ``smoothing = 2 sf``.
"""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import segmentation_models_pytorch.losses._functional as smp_f
import torch

from maskworks.losses.focal import focal_loss
from maskworks.losses.overlap import dice_loss, jaccard_loss, tversky_loss
from maskworks.losses.soft import soft_cross_entropy

BIG = 30.0


def as_logits(probs) -> torch.Tensor:
    """0 / 1 probabilities as float64 logits -30 / +30."""
    return BIG * (2 * torch.as_tensor(probs, dtype=torch.float64) - 1)


# ------------------------------------------------------------------------------------------------ focal


def test_focal_loss_with_logits_good_below_bad():
    good, bad = torch.tensor([10.0, -10.0, 10.0]), torch.tensor([-1.0, 2.0, 0.0])
    target = torch.tensor([1, 0, 1])
    ref_good, ref_bad = smp_f.focal_loss_with_logits(good, target), smp_f.focal_loss_with_logits(bad, target)
    ours_good = focal_loss(good.view(1, 1, 3), target.view(1, 3), "binary", alpha=0.25)
    ours_bad = focal_loss(bad.view(1, 1, 3), target.view(1, 3), "binary", alpha=0.25)
    assert ref_good < ref_bad and ours_good < ours_bad
    torch.testing.assert_close(ours_good, ref_good, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(ours_bad, ref_bad, rtol=1e-6, atol=1e-8)


def test_softmax_focal_loss_with_logits_good_below_bad():
    good = torch.tensor([[0, 10, 0], [10, 0, 0], [0, 0, 10]]).float()
    bad = torch.tensor([[0, -10, 0], [0, 10, 0], [0, 0, 10]]).float()
    target = torch.tensor([1, 0, 2])
    ref_good = smp_f.softmax_focal_loss_with_logits(good, target)
    ref_bad = smp_f.softmax_focal_loss_with_logits(bad, target)
    # rows are samples: (N, K) logits as one (1, K, N) "image"
    ours_good, ours_bad = focal_loss(good.t()[None], target[None]), focal_loss(bad.t()[None], target[None])
    assert ref_good < ref_bad and ours_good < ours_bad
    torch.testing.assert_close(ours_good, ref_good, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(ours_bad, ref_bad, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------ score functions


def _binary_score(fn, y_pred, y_true, **kw) -> torch.Tensor:
    x = as_logits(y_pred).view(1, 1, -1)
    t = torch.tensor(y_true).view(1, -1)
    return 1 - fn(x, t, "binary", reduction="none", mask_absent=False, eps=1e-5, **kw)[0]


SCORE_CASES = [
    ([1, 1, 1, 1], [1, 1, 1, 1]),
    ([0, 1, 1, 0], [0, 1, 1, 0]),
    ([1, 1, 1, 1], [1, 1, 0, 0]),
]


@pytest.mark.parametrize("case,expected", list(zip(SCORE_CASES, [1.0, 1.0, 0.5])))
def test_soft_jaccard_score(case, expected):
    y_true, y_pred = case
    ref = smp_f.soft_jaccard_score(torch.sigmoid(as_logits(y_pred)), torch.tensor(y_true).double(), eps=1e-5)
    ours = _binary_score(jaccard_loss, y_pred, y_true)
    assert float(ref) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "y_true,y_pred,expected",
    [
        ([[1, 1, 0, 0], [0, 0, 1, 1]], [[1, 1, 0, 0], [0, 0, 1, 1]], 1.0),
        ([[1, 1, 0, 0], [0, 0, 1, 1]], [[0, 0, 1, 0], [0, 1, 0, 0]], 0.0),
        ([[1, 1, 0, 0], [0, 0, 0, 1]], [[1, 1, 0, 0], [0, 0, 0, 0]], 0.5),
    ],
)
def test_soft_jaccard_score_per_row(y_true, y_pred, expected):
    """smp's ``dims=[1]``: one score per row, then the mean; for us the rows are the channels of multilabel mode."""
    x, t = as_logits(y_pred), torch.tensor(y_true)
    ref = smp_f.soft_jaccard_score(torch.sigmoid(x), t.double(), dims=[1], eps=1e-5).mean()
    ours = 1 - jaccard_loss(x[None], t[None], "multilabel", eps=1e-5)
    assert float(ref) == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case,expected", list(zip(SCORE_CASES, [1.0, 1.0, 2 / 3])))
@pytest.mark.parametrize("kind", ["dice", "tversky"])
def test_soft_dice_and_tversky_score(case, expected, kind):
    y_true, y_pred = case
    p, t = torch.sigmoid(as_logits(y_pred)), torch.tensor(y_true).double()
    if kind == "dice":
        ref = smp_f.soft_dice_score(p, t, eps=1e-5)
        ours = _binary_score(dice_loss, y_pred, y_true)
    else:
        ref = smp_f.soft_tversky_score(p, t, alpha=0.5, beta=0.5, eps=1e-5)
        ours = _binary_score(tversky_loss, y_pred, y_true, alpha=0.5, beta=0.5)
    assert float(ref) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ binary losses

# (y_pred, y_true, expected loss): the ideal and worst cases of test_dice_loss_binary / test_tversky_loss_binary /
# test_binary_jaccard_loss ("worst" with an all-0 target is 0: the absent class is masked, smooth == 0)
BINARY_CASES = [
    ([1.0, 1.0, 1.0], [1, 1, 1], 0.0),
    ([1.0, 0.0, 1.0], [1, 0, 1], 0.0),
    ([0.0, 0.0, 0.0], [0, 0, 0], 0.0),
    ([1.0, 1.0, 1.0], [0, 0, 0], 0.0),
    ([1.0, 0.0, 1.0], [0, 1, 0], 1.0),
    ([0.0, 0.0, 0.0], [1, 1, 1], 1.0),
]


@pytest.mark.parametrize("y_pred,y_true,expected", BINARY_CASES)
@pytest.mark.parametrize("kind", ["dice", "tversky", "jaccard"])
def test_binary_losses(kind, y_pred, y_true, expected):
    x = as_logits(y_pred).view(1, 1, 1, -1)
    t = torch.tensor(y_true).view(1, 1, 1, -1)
    if kind == "dice":
        ref = smp.losses.DiceLoss("binary")(x, t)
        ours = dice_loss(x, t, "binary")
    elif kind == "tversky":  # alpha = beta = 0.5 equals Dice
        ref = smp.losses.TverskyLoss("binary", alpha=0.5, beta=0.5)(x, t)
        ours = tversky_loss(x, t, "binary", alpha=0.5, beta=0.5)
    else:
        ref = smp.losses.JaccardLoss("binary")(x, t)
        ours = jaccard_loss(x, t, "binary")
    assert float(ref) == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "y_pred,y_true,expected",
    [
        ([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], [0, 0, 1, 1], 0.0),
        ([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], [1, 1, 0, 0], 1.0),
        ([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], [1, 1, 0, 0], 1 - 1 / 3),
    ],
)
def test_multiclass_jaccard_loss(y_pred, y_true, expected):
    x = BIG * torch.tensor([y_pred], dtype=torch.float64)  # softmax of +-30 gaps: one-hot to 1e-26
    t = torch.tensor([y_true])
    ref = smp.losses.JaccardLoss("multiclass")(x, t)
    assert float(ref) == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(jaccard_loss(x, t), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "y_pred,y_true,expected",
    [
        ([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], [[1, 1, 0, 0], [0, 0, 1, 1]], 0.0),
        ([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], [[0, 0, 1, 1], [1, 1, 0, 0]], 1.0),
        ([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]], [[1, 1, 0, 0], [1, 1, 0, 0]], 1 - 1 / 3),
    ],
)
def test_multilabel_jaccard_loss(y_pred, y_true, expected):
    x, t = as_logits([y_pred]), torch.tensor([y_true])
    ref = smp.losses.JaccardLoss("multilabel")(x, t)
    assert float(ref) == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(jaccard_loss(x, t, "multilabel"), ref, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ soft CE / BCE


def test_soft_ce_loss_mean_over_counted_pixels():
    """test_soft_ce_loss: smp divides by all 4 rows (the ignored one as 0), we by the 3 counted rows."""
    x = torch.tensor([[+9, -9, -9, -9], [-9, +9, -9, -9], [-9, -9, +9, -9], [-9, -9, -9, +9]]).double()
    y = torch.tensor([0, 1, -100, 3])
    ref = smp.losses.SoftCrossEntropyLoss(smooth_factor=0.1, ignore_index=-100)(x, y)
    ours = soft_cross_entropy(x, y, smoothing=0.1, ignore_index=-100)
    torch.testing.assert_close(ours * 3 / 4, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(x, y, ignore_index=-100, label_smoothing=0.1))


def test_soft_bce_loss_mean_over_counted_pixels():
    """test_soft_bce_loss: smp's smooth_factor 0.1 is our smoothing 0.2; mean over 5 vs 4 counted pixels."""
    x = torch.tensor([-9, 9, 1, 9, -9]).double()
    y = torch.tensor([0, 1, -100, 1, 0])
    ref = smp.losses.SoftBCEWithLogitsLoss(smooth_factor=0.1, ignore_index=-100)(x, y.double())
    ours = soft_cross_entropy(x.view(1, 1, 5), y.view(1, 5), smoothing=0.2, ignore_index=-100)
    torch.testing.assert_close(ours * 4 / 5, ref, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ absent classes


def _absent_class_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 6, 6), generator=g)  # class 3 absent from the target
    t[0, :2] = 255
    return x, t


@pytest.mark.parametrize("smooth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["dice", "jaccard", "tversky"])
def test_smp_masks_absent_classes_for_every_smooth(kind, smooth):
    """The documented relation: smp == ours(mask_absent=True, reduction="none").mean(), whatever smooth."""
    x, t = _absent_class_batch()
    if kind == "dice":
        ref = smp.losses.DiceLoss("multiclass", smooth=smooth, ignore_index=255)(x, t)
        fn, kw = dice_loss, {"smooth": 2 * smooth}
    elif kind == "jaccard":
        ref = smp.losses.JaccardLoss("multiclass", smooth=smooth, ignore_index=255)(x, t)
        fn, kw = jaccard_loss, {"smooth": smooth}
    else:
        ref = smp.losses.TverskyLoss("multiclass", smooth=smooth, alpha=0.3, beta=0.7, ignore_index=255)(x, t)
        fn, kw = tversky_loss, {"smooth": smooth, "alpha": 0.3, "beta": 0.7}
    per_class = fn(x, t, mask_absent=True, reduction="none", **kw)
    assert float(per_class[3]) == 0.0  # the absent class is masked ...
    torch.testing.assert_close(per_class.mean(), ref, atol=1e-12, rtol=1e-10)  # ... and still counted in smp's mean
    kept_mean = fn(x, t, mask_absent=True, **kw)
    torch.testing.assert_close(kept_mean * 3 / 4, ref, atol=1e-12, rtol=1e-10)
    default = fn(x, t, **kw)
    if smooth == 0:  # our default masks exactly when smooth == 0
        torch.testing.assert_close(default, kept_mean, atol=0, rtol=0)
    else:  # ... and keeps the absent class (its loss penalises predicting it): an intentional difference
        kept = fn(x, t, mask_absent=False, reduction="none", **kw)
        assert float(kept[3]) > 0.5
        torch.testing.assert_close(default, kept.mean(), atol=1e-12, rtol=1e-10)
        assert abs(float(default) - float(ref)) > 1e-3


def test_every_class_present_agrees_with_smp_without_options():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.arange(75).view(3, 5, 5).remainder(3)[:2]
    for smooth in (0.0, 1.0):
        ref = smp.losses.JaccardLoss("multiclass", smooth=smooth)(x, t)
        torch.testing.assert_close(jaccard_loss(x, t, smooth=smooth), ref, atol=1e-12, rtol=1e-10)
