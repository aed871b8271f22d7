"""Concrete cases of torchmetrics' own Jaccard / mean-IoU tests, run through torchmetrics and ConfusionMatrix.

Sources (Lightning-AI/torchmetrics): ``tests/unittests/classification/test_jaccard.py`` (``test_corner_case``,
``test_jaccard_index_zero_division``, and the ``ignore_index`` / ``absent_score`` tables kept in that file's
history), ``tests/unittests/segmentation/test_mean_iou.py`` (absent class, perfect prediction) and the
docstring examples of ``multiclass_jaccard_index``. Each case is computed by the installed torchmetrics and by
:class:`maskworks.metrics.ConfusionMatrix` on the same input. The means agree to 1e-6; the intentional
differences documented in :mod:`maskworks.metrics.confusion` are asserted as such: undefined per-class values are
``NaN`` (torchmetrics: ``zero_division``), an in-range ``ignore_index`` is left out of every mean (torchmetrics'
F1 / recall macro keep it once it is predicted), ``mean_acc`` skips false-positive-only classes, and the
statistics are pooled over the dataset (torchmetrics' ``MeanIoU`` averages per image).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    binary_jaccard_index,
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_jaccard_index,
    multiclass_recall,
)
from torchmetrics.segmentation import MeanIoU

from maskworks.metrics import ConfusionMatrix

ABSENT = None  # the old tables' ``absent_score`` marker: ours reports NaN, torchmetrics now zero_division (0.0)


def ours(pred, target, k: int, ignore_index=None) -> dict:
    cm = ConfusionMatrix(k, ignore_index=ignore_index)
    cm.update(torch.as_tensor(pred), torch.as_tensor(target))
    return cm.compute()


def assert_matches_torchmetrics(pred, target, k: int, ignore_index=None) -> dict:
    """Macro / weighted Jaccard and micro accuracy agree; per-class values agree where ours is defined."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    out = ours(pred, target, k, ignore_index)
    per_class = multiclass_jaccard_index(pred, target, k, average="none", ignore_index=ignore_index)
    for c, (a, b) in enumerate(zip(out["iou"], per_class.tolist())):
        if math.isnan(a):  # intentional difference (1): undefined or ignored class, torchmetrics' zero_division
            assert b == 0.0, (c, b)
        else:
            assert a == pytest.approx(b, abs=1e-6), (c, a, b)
    macro = multiclass_jaccard_index(pred, target, k, average="macro", ignore_index=ignore_index)
    assert out["miou"] == pytest.approx(float(macro), abs=1e-6)
    if out["num_pixels"]:
        weighted = multiclass_jaccard_index(pred, target, k, average="weighted", ignore_index=ignore_index)
        assert out["fwiou"] == pytest.approx(float(weighted), abs=1e-6)
        micro_acc = multiclass_accuracy(pred, target, k, average="micro", ignore_index=ignore_index)
        assert out["pixel_acc"] == pytest.approx(float(micro_acc), abs=1e-6)
    return out


def assert_per_class(values: list[float], expected: list) -> None:
    for v, e in zip(values, expected, strict=True):
        if e is ABSENT:
            assert math.isnan(v)
        else:
            assert v == pytest.approx(e, abs=1e-6)


# ------------------------------------------------------------------------- test_jaccard.py::test_corner_case


def test_corner_case_class_absent_from_target_and_prediction():
    out = assert_matches_torchmetrics([0, 1, 0, 1], [0, 1, 0, 0], 3)
    assert_per_class(out["iou"], [2 / 3, 0.5, ABSENT])  # torchmetrics: [2/3, 0.5, 0.0]
    assert out["miou"] == pytest.approx(0.5833333)


def test_corner_case_ten_classes_two_present():
    out = assert_matches_torchmetrics([0, 1], [0, 1], 10)
    assert out["miou"] == 1.0
    assert_per_class(out["iou"], [1.0, 1.0] + [ABSENT] * 8)  # torchmetrics: [1, 1, 0, ..., 0]


# ------------------------------------------------------------------ test_jaccard.py::test_jaccard_index_zero_division


@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_all_background_binary_foreground_is_undefined(zero_division):
    """confmat [[4, 0], [0, 0]]: torchmetrics returns the chosen zero_division, we report NaN for class 1."""
    pred = target = torch.zeros(4, dtype=torch.long)
    ref = binary_jaccard_index(pred, target, zero_division=zero_division)
    assert float(ref) == zero_division
    out = ours(pred, target, 2)
    assert out["iou"][0] == 1.0 and math.isnan(out["iou"][1])
    assert out["miou"] == 1.0  # the undefined class stays out of the mean


def test_some_foreground_binary_one_third():
    """confmat [[2, 1], [1, 1]]: foreground IoU 1/3."""
    target = torch.tensor([0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0, 1])
    assert float(binary_jaccard_index(pred, target)) == pytest.approx(1 / 3)
    out = assert_matches_torchmetrics(pred, target, 2)
    assert out["iou"][1] == pytest.approx(1 / 3)
    assert out["num_pixels"] == 5


# ------------------------------------------------------- test_jaccard.py history: the ignore_index table

IGNORE_PRED, IGNORE_TARGET = [0, 1, 1, 2, 2], [0, 1, 2, 2, 2]


@pytest.mark.parametrize(
    "ignore_index,expected",
    [
        (None, [1, 1 / 2, 2 / 3]),
        (-1, [1, 1 / 2, 2 / 3]),  # an index outside 0..K-1 has no effect
        (255, [1, 1 / 2, 2 / 3]),
        (0, [ABSENT, 1 / 2, 2 / 3]),  # ignoring a valid index drops only that index from the result
        (1, [1, ABSENT, 2 / 3]),
        (2, [1, 1, ABSENT]),
    ],
)
def test_ignore_index_table(ignore_index, expected):
    out = assert_matches_torchmetrics(IGNORE_PRED, IGNORE_TARGET, 3, ignore_index)
    assert_per_class(out["iou"], expected)


def test_ignore_index_table_macro_mean():
    out = assert_matches_torchmetrics(IGNORE_PRED, IGNORE_TARGET, 3, 0)
    assert out["miou"] == pytest.approx(7 / 12)  # the ignored index does not contribute to the mean


# ------------------------------------------------------- test_jaccard.py history: the absent_score table


@pytest.mark.parametrize(
    "pred,target,ignore_index,k,expected",
    [
        ([0], [0], None, 2, [1.0, ABSENT]),  # class 0 correct everywhere, class 1 absent
        ([0, 0], [0, 0], None, 2, [1.0, ABSENT]),
        ([1], [1], None, 2, [ABSENT, 1.0]),
        ([1, 1], [1, 1], None, 2, [ABSENT, 1.0]),
        ([1], [1], 0, 2, [ABSENT, 1.0]),  # the ignored class gets no score
        ([0, 2], [0, 2], None, 3, [1.0, ABSENT, 1.0]),
        ([2, 0], [2, 0], None, 3, [1.0, ABSENT, 1.0]),
        ([0, 1], [0, 1], None, 3, [1.0, 1.0, ABSENT]),
        ([1, 0], [1, 0], None, 3, [1.0, 1.0, ABSENT]),
        ([0, 1], [0, 0], None, 3, [0.5, 0.0, ABSENT]),  # class 1 only predicted: 0, not absent
        ([0, 0], [0, 1], None, 3, [0.5, 0.0, ABSENT]),  # class 1 never predicted: 0, not absent
        ([0, 2], [0, 2], 0, 3, [ABSENT, ABSENT, 1.0]),
    ],
)
def test_absent_class_table(pred, target, ignore_index, k, expected):
    out = assert_matches_torchmetrics(pred, target, k, ignore_index)
    assert_per_class(out["iou"], expected)


def test_single_class_is_refused_by_torchmetrics_and_scored_by_us():
    """From the same table: ``([0], [0], K=1) -> [1.0]``; torchmetrics now requires num_classes > 1."""
    with pytest.raises(ValueError, match="larger than 1"):
        multiclass_jaccard_index(torch.tensor([0]), torch.tensor([0]), 1)
    assert ours([0], [0], 1)["iou"] == [1.0]


# ------------------------------------------------------- multiclass_jaccard_index docstring examples


def test_docstring_example_labels_and_probabilities():
    target = torch.tensor([2, 1, 0, 0])
    out = assert_matches_torchmetrics(torch.tensor([2, 1, 0, 1]), target, 3)
    assert out["miou"] == pytest.approx(0.6667, abs=1e-4)
    probs = torch.tensor([[0.16, 0.26, 0.58], [0.22, 0.61, 0.17], [0.71, 0.09, 0.20], [0.05, 0.82, 0.13]])
    ref = multiclass_jaccard_index(probs, target, num_classes=3)
    cm = ConfusionMatrix(3)
    cm.update(probs, target)  # float scores (N, K) against (N,): argmax over dim 1
    assert cm.compute()["miou"] == pytest.approx(float(ref), abs=1e-6) == pytest.approx(0.6667, abs=1e-4)


# ------------------------------------------------------- test_mean_iou.py


def test_mean_iou_absent_class():
    target = torch.tensor([[0, 1], [1, 0]])
    pred = target.clone()
    m = MeanIoU(num_classes=3, per_class=True, input_format="index")
    m.update(pred, target)
    assert m.compute().tolist() == [1.0, 1.0, -1.0]  # torchmetrics marks the absent class with -1
    mean = MeanIoU(num_classes=3, per_class=False, input_format="index")
    mean.update(pred, target)
    out = ours(pred, target, 3)
    assert_per_class(out["iou"], [1.0, 1.0, ABSENT])  # we mark it NaN
    assert out["miou"] == float(mean.compute()) == 1.0


def test_mean_iou_perfect_prediction():
    target = torch.tensor([[0, 1], [1, 0], [2, 2]])
    m = MeanIoU(num_classes=3, per_class=True, input_format="index")
    m.update(target.clone(), target)
    out = ours(target.clone(), target, 3)
    assert m.compute().tolist() == out["iou"] == [1.0, 1.0, 1.0]


def test_mean_iou_averages_per_image_while_we_pool():
    """Intentional difference (4): the same two images, pooled (ours, MulticlassJaccardIndex) vs per image."""
    target = torch.tensor([[[0, 0], [0, 1]], [[1, 1], [1, 1]]])
    pred = torch.tensor([[[0, 0], [1, 1]], [[1, 1], [1, 1]]])
    out = assert_matches_torchmetrics(pred, target, 2)
    per_image = np.array([ours(pred[i], target[i], 2)["iou"] for i in range(2)])
    per_class = MeanIoU(num_classes=2, per_class=True, input_format="index")
    per_class.update(pred, target)
    overall = MeanIoU(num_classes=2, per_class=False, input_format="index")
    overall.update(pred, target)
    np.testing.assert_allclose(per_class.compute().numpy(), np.nanmean(per_image, axis=0), atol=1e-6)
    assert float(overall.compute()) == pytest.approx(float(np.nanmean(per_image)), abs=1e-6)
    assert out["iou"] == pytest.approx([2 / 3, 5 / 6]) and out["miou"] == pytest.approx(0.75)
    assert float(overall.compute()) == pytest.approx(13 / 18)  # 0.722: not the pooled 0.75


# ------------------------------------------------------- the documented F1 / recall differences


def test_in_range_ignore_index_f1_and_recall_macro_keep_a_predicted_ignored_class():
    """Intentional difference (2): the reported case; torchmetrics' Jaccard leaves class 0 out, its F1 does not."""
    pred = torch.tensor([[0, 1, 2, 0, 1, 2]])
    target = torch.tensor([[0, 1, 2, 1, 1, 2]])
    out = assert_matches_torchmetrics(pred, target, 3, 0)
    assert out["miou"] == pytest.approx(5 / 6)
    f1 = multiclass_f1_score(pred, target, 3, average="macro", ignore_index=0)
    assert float(f1) == pytest.approx((0.0 + 0.8 + 1.0) / 3)  # class 0 (predicted once) averaged in as 0
    assert out["mdice"] == pytest.approx((0.8 + 1.0) / 2)
    recall = multiclass_recall(pred, target, 3, average="macro", ignore_index=0)
    assert float(recall) == pytest.approx((0.0 + 2 / 3 + 1.0) / 3)
    assert out["mean_acc"] == pytest.approx((2 / 3 + 1.0) / 2)
    per_class_f1 = multiclass_f1_score(pred, target, 3, average="none", ignore_index=0)
    assert out["dice"][1:] == pytest.approx(per_class_f1[1:].tolist())  # the kept classes agree exactly


def test_false_positive_only_class_in_dice_and_recall_means():
    """Dice (F1) macro counts an only-predicted class as 0 on both sides; mean_acc skips it (difference 3)."""
    pred = torch.tensor([0, 1, 1, 2])
    target = torch.tensor([0, 0, 1, 1])
    out = assert_matches_torchmetrics(pred, target, 3)
    assert out["mdice"] == pytest.approx(float(multiclass_f1_score(pred, target, 3, average="macro")))
    assert math.isnan(out["recall"][2])  # no target pixel
    assert out["mean_acc"] == pytest.approx(0.5)
    assert float(multiclass_recall(pred, target, 3, average="macro")) == pytest.approx(1 / 3)
