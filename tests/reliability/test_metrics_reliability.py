"""Metrics on hostile inputs: non-finite scores are rejected, an ignore_index inside 0..K-1 excludes its class.

The reference values for the in-range ``ignore_index`` come from torchmetrics (``MulticlassJaccardIndex``,
``MulticlassAccuracy``) computed in the same test on the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from maskworks.metrics import BoundaryF1, BoundaryIoU, Calibration, ConfusionMatrix, SoftMaskMetrics, SurfaceDistance
from maskworks.metrics.coco import MaskAP

BAD_VALUES = [math.nan, math.inf, -math.inf]


def _scores_with(value: float, shape=(2, 3, 6, 6), where=(0, 1, 2, 3)) -> torch.Tensor:
    torch.manual_seed(0)
    scores = torch.randn(shape)
    scores[where] = value
    return scores


# ------------------------------------------------------------------------------------- non-finite scores rejected


@pytest.mark.parametrize("value", BAD_VALUES)
def test_confusion_matrix_rejects_non_finite_scores(value):
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"pred holds non-finite scores \(\d+ NaN and \d+ inf of 216 values"):
        cm.update(_scores_with(value), target)
    assert int(cm.matrix.sum()) == 0  # nothing was counted


def test_all_nan_logits_are_not_a_perfect_score_of_class_zero():
    """The original symptom: NaN logits became class 0 everywhere and scored mIoU 1.0 against an all-0 target."""
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match="non-finite"):
        cm.update(torch.full((1, 4, 5, 5), math.nan), torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):  # one image (K, H, W) against (H, W) as well
        cm.update(torch.full((4, 5, 5), math.nan), torch.zeros(5, 5, dtype=torch.long))
    assert math.isnan(cm.compute()["miou"])


def test_non_finite_scores_are_rejected_even_under_ignored_pixels():
    target = torch.full((1, 6, 6), 255)
    target[0, 0, 0] = 1
    scores = _scores_with(math.nan, shape=(1, 3, 6, 6), where=(0, 0, 5, 5))  # NaN only where the target is 255
    with pytest.raises(ValueError, match="non-finite"):
        ConfusionMatrix(3).update(scores, target)


def test_finite_scores_in_every_float_dtype_still_work():
    target = torch.randint(0, 3, (2, 6, 6))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        scores = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).to(dtype) * 5
        cm = ConfusionMatrix(3)
        cm.update(scores, target)
        assert cm.compute()["miou"] == 1.0
    big = torch.full((1, 3, 2, 2), torch.finfo(torch.float32).max)  # large but finite
    ConfusionMatrix(3).update(big, torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("make", [lambda: BoundaryF1(3, tolerance=1), lambda: BoundaryIoU(3)], ids=["bf1", "biou"])
def test_boundary_metrics_reject_non_finite_scores(make, value):
    metric = make()
    with pytest.raises(ValueError, match="pred holds non-finite scores"):
        metric.update(_scores_with(value), torch.zeros(2, 6, 6, dtype=torch.long))
    assert metric.num_images == 0


@pytest.mark.parametrize("value", BAD_VALUES)
def test_surface_distance_rejects_non_finite_scores(value):
    sd = SurfaceDistance(3)
    with pytest.raises(ValueError, match="pred holds non-finite scores"):
        sd.update(_scores_with(value), torch.zeros(2, 6, 6, dtype=torch.long))
    assert sd.compute()["num_images"] == 0


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("from_logits", [False, True])
def test_calibration_rejects_non_finite_inputs(value, from_logits):
    probs = torch.full((1, 2, 3, 3), 0.5)
    inputs = probs.clone() if not from_logits else torch.zeros_like(probs)
    inputs[0, 0, 1, 1] = value
    cal = Calibration(2, from_logits=from_logits)
    what = "logits" if from_logits else "probabilities"
    with pytest.raises(ValueError, match=f"probs holds non-finite {what}"):
        cal.update(inputs, torch.zeros(1, 3, 3, dtype=torch.long))
    assert cal.compute()["num_pixels"] == 0


def test_calibration_rejected_nan_before_the_fix_passed_the_distribution_check():
    """NaN compares False with every bound, so the 'sums to one' check alone accepted it."""
    p = torch.tensor([[[[math.nan]], [[math.nan]]]])
    with pytest.raises(ValueError, match="non-finite"):
        Calibration(2).update(p, torch.zeros(1, 1, 1, dtype=torch.long))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("which", ["pred", "target"])
def test_soft_mask_metrics_reject_non_finite_maps(value, which):
    good = torch.full((1, 4, 4), 0.5)
    bad = good.clone()
    bad[0, 2, 2] = value
    m = SoftMaskMetrics()
    args = (bad, good) if which == "pred" else (good, bad)
    with pytest.raises(ValueError, match=f"{which} holds non-finite values"):
        m.update(*args)
    assert m.compute()["num_images"] == 0


@pytest.mark.parametrize("value", BAD_VALUES)
def test_mask_ap_rejects_non_finite_scores_and_boxes(value):
    pytest.importorskip("pycocotools")
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2:6, 2:6] = True
    target = [{"masks": mask, "labels": torch.tensor([1])}]
    m = MaskAP()
    with pytest.raises(ValueError, match=r"preds\[0\]\['scores'\] holds non-finite"):
        m.update([{"masks": mask, "scores": torch.tensor([value]), "labels": torch.tensor([1])}], target)
    boxes = torch.tensor([[2.0, 2.0, value, 6.0]])
    m = MaskAP(iou_type="bbox")
    with pytest.raises(ValueError, match="boxes'\\] holds non-finite"):
        m.update(
            [{"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}],
            [{"boxes": torch.tensor([[2.0, 2.0, 6.0, 6.0]]), "labels": torch.tensor([1])}],
        )
    assert len(m) == 0


def test_integer_predictions_are_not_checked_for_finiteness():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 1, 2]], dtype=np.uint8), np.array([[0, 1, 2]], dtype=np.int16))
    assert cm.compute()["miou"] == 1.0


# ------------------------------------------------------------------------------------- ignore_index inside 0..K-1


def test_in_range_ignore_index_excludes_the_class_like_torchmetrics():
    """The reported case: ignore_index=0 used to leave class 0 in the means with IoU 0 (mIoU 0.556, not 0.833)."""
    pred = torch.tensor([[0, 1, 2, 0, 1, 2]])
    target = torch.tensor([[0, 1, 2, 1, 1, 2]])
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(pred, target)
    out = cm.compute()
    assert math.isnan(out["iou"][0]) and math.isnan(out["dice"][0])
    assert math.isnan(out["precision"][0]) and math.isnan(out["recall"][0])
    assert out["iou"][1:] == pytest.approx([2 / 3, 1.0])
    ref = MulticlassJaccardIndex(3, ignore_index=0, average="macro")(pred, target)
    assert out["miou"] == pytest.approx(float(ref)) == pytest.approx(5 / 6)
    weighted = MulticlassJaccardIndex(3, ignore_index=0, average="weighted")(pred, target)
    assert out["fwiou"] == pytest.approx(float(weighted))
    assert out["mdice"] == pytest.approx((0.8 + 1.0) / 2)
    assert out["num_pixels"] == 5


def test_valid_pixels_predicted_as_the_ignored_class_are_misses_of_their_true_class():
    """torchmetrics keeps such pixels: the prediction is a false negative of the true class (not dropped)."""
    pred = torch.tensor([0, 0, 1, 2])
    target = torch.tensor([1, 1, 1, 2])
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(pred, target)
    out = cm.compute()
    tm_none = MulticlassJaccardIndex(3, ignore_index=0, average="none")(pred, target)
    assert out["iou"][1:] == pytest.approx(tm_none[1:].tolist())  # class 1: 1 / (3 + 1 - 1)
    assert out["iou"][1] == pytest.approx(1 / 3)
    assert float(tm_none[0]) == 0.0 and math.isnan(out["iou"][0])  # documented: NaN, torchmetrics reports 0
    assert out["miou"] == pytest.approx(float(MulticlassJaccardIndex(3, ignore_index=0)(pred, target)))
    micro_acc = MulticlassAccuracy(3, ignore_index=0, average="micro")(pred, target)
    assert out["pixel_acc"] == pytest.approx(float(micro_acc)) == pytest.approx(0.5)
    assert out["recall"][1] == pytest.approx(1 / 3) and out["mean_acc"] == pytest.approx((1 / 3 + 1) / 2)


def test_in_range_ignore_index_for_every_class_and_merge_state_dict():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randint(0, 4, (3, 9, 9), generator=g), torch.randint(0, 4, (3, 9, 9), generator=g)
    for c in range(4):
        cm = ConfusionMatrix(4, ignore_index=c)
        cm.update(pred, target)
        out = cm.compute()
        ref = MulticlassJaccardIndex(4, ignore_index=c, average="macro")(pred, target)
        assert out["miou"] == pytest.approx(float(ref), abs=1e-6)
        assert math.isnan(out["iou"][c]) and sum(math.isnan(v) for v in out["iou"]) == 1
        restored = ConfusionMatrix(4, ignore_index=c)
        restored.load_state_dict(cm.state_dict())
        assert restored.compute()["miou"] == out["miou"]


def test_out_of_range_ignore_index_is_unchanged():
    pred = torch.tensor([[0, 1, 2, 0]])
    target = torch.tensor([[0, 1, 255, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    out = cm.compute()
    assert out["iou"][:2] == pytest.approx([0.5, 0.5])
    assert math.isnan(out["iou"][2])  # only predicted under an ignored pixel: absent from both
    assert out["miou"] == pytest.approx(0.5) and out["num_pixels"] == 3


def test_boundary_metrics_exclude_an_in_range_ignore_class():
    """Class 0 never occurs in the target, only in the prediction: with ignore_index=0 it no longer scores 0."""
    target = torch.ones(1, 12, 12, dtype=torch.long)
    target[0, :, 6:] = 2
    pred = target.clone()
    pred[0, 3:5, 2:4] = 0  # a hole predicted as the (ignored) background class inside class 1
    for make, key, mean_key in [
        (lambda **kw: BoundaryF1(3, tolerance=0, **kw), "bf1", "mbf1"),
        (lambda **kw: BoundaryIoU(3, **kw), "boundary_iou", "mboundary_iou"),
    ]:
        plain, ignoring = make(), make(ignore_index=0)
        plain.update(pred, target)
        ignoring.update(pred, target)
        before, out = plain.compute(), ignoring.compute()
        assert before[key][0] == 0.0  # the old behaviour: a false-positive-only class dragging the mean down
        assert math.isnan(out[key][0])
        assert out[key][1:] == pytest.approx(before[key][1:])  # the hole still costs class 1
        assert out[key][1] < 1.0
        assert out[mean_key] == pytest.approx(np.mean(out[key][1:]))
        assert out[mean_key] > before[mean_key]


def test_surface_distance_leaves_an_in_range_ignore_class_out():
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, 2:8, 2:8] = 1
    pred = target.clone()
    pred[0, 4, 4] = 0
    sd = SurfaceDistance(2, include_background=True, ignore_index=0)
    sd.update(pred, target)
    out = sd.compute()
    assert math.isnan(out["hd"][0]) and out["mhd"] == pytest.approx(out["hd"][1])
    assert out["num_target_empty"][0] == 1  # the pixel predicted as the ignored class only shows up here
