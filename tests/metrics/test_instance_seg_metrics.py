"""Aggregated Jaccard index and IoU-threshold instance matching: hand-computed values and a brute-force reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from maskworks.metrics.instance_seg import (
    DSB_THRESHOLDS,
    AggregatedJaccardIndex,
    InstanceMatching,
    aggregated_jaccard_index,
    match_instances,
    pairwise_instance_iou,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two ground-truth instances both best matched by one prediction (IoU 0.5 each) and a prediction on background.
SHARED_TARGET = np.array([[1, 1, 1, 2, 2, 2, 0, 0]])
SHARED_PRED = np.array([[5, 5, 5, 5, 5, 5, 7, 7]])

# 4x4: target = left / right halves; prediction 1 = three left columns, prediction 2 = the last column.
TARGET = np.repeat([[1, 1, 2, 2]], 4, axis=0)
PRED = np.repeat([[1, 1, 1, 2]], 4, axis=0)


def test_pairwise_iou_hand_values():
    iou, gt_ids, pred_ids = pairwise_instance_iou(PRED, TARGET)
    np.testing.assert_allclose(iou, [[8 / 12, 0.0], [4 / 16, 4 / 8]])
    assert gt_ids.tolist() == [1, 2] and pred_ids.tolist() == [1, 2]


def test_aji_hand_values():
    # Kumar: both GT pick prediction 5 -> C = 3 + 3, U = 6 + 6, plus the unused prediction 7 (2 px)
    assert aggregated_jaccard_index(SHARED_PRED, SHARED_TARGET) == pytest.approx(6 / 14)
    # AJI+: one pair (C 3, U 6), the unpaired GT (3 px) and prediction 7 (2 px) join the union
    assert aggregated_jaccard_index(SHARED_PRED, SHARED_TARGET, one_to_one=True) == pytest.approx(3 / 11)
    # GT 1 -> pred 1 (8 / 12), GT 2 -> pred 2 (IoU 0.5 beats 0.25; 4 / 8)
    assert aggregated_jaccard_index(PRED, TARGET) == pytest.approx(12 / 20)
    assert aggregated_jaccard_index(PRED, TARGET, one_to_one=True) == pytest.approx(12 / 20)
    # ignoring the third column makes both predictions exact
    ignore = np.zeros((4, 4), dtype=bool)
    ignore[:, 2] = True
    assert aggregated_jaccard_index(PRED, TARGET, ignore=ignore) == 1.0
    # a GT overlapping nothing adds its area to the union only
    target = np.array([[1, 1, 0, 2, 2, 2]])
    pred = np.array([[3, 0, 0, 0, 0, 0]])
    assert aggregated_jaccard_index(pred, target) == pytest.approx(1 / (2 + 3))


def test_matching_hand_values():
    m = match_instances(PRED, TARGET, thresholds=(0.5, 0.75))
    assert m["tp"] == [2, 0] and m["fp"] == [0, 2] and m["fn"] == [0, 2]
    assert m["precision"] == [1.0, 0.0] and m["recall"] == [1.0, 0.0] and m["f1"] == [1.0, 0.0]
    assert m["accuracy"] == [1.0, 0.0] and m["ap"] == 0.5
    assert m["mean_matched_iou"][0] == pytest.approx((8 / 12 + 0.5) / 2) and math.isnan(m["mean_matched_iou"][1])
    # IoU >= t: two candidate pairs share prediction 5 at t = 0.5; one-to-one keeps one of them
    s = match_instances(SHARED_PRED, SHARED_TARGET, thresholds=(0.5, 0.55))
    assert s["tp"] == [1, 0] and s["fp"] == [1, 2] and s["fn"] == [1, 2]
    assert s["accuracy"] == pytest.approx([1 / 3, 0.0]) and s["f1"] == pytest.approx([0.5, 0.0])
    assert s["n_true"] == 2 and s["n_pred"] == 2


def test_most_matches_beat_greedy_at_low_thresholds():
    # g1 = [0, 10), g2 = [10, 16); p1 = [4, 14) overlaps both, p2 = [0, 4) lies in g1
    target = np.array([[1] * 10 + [2] * 6])
    pred = np.array([[2] * 4 + [1] * 10 + [0] * 2])
    iou, _, _ = pairwise_instance_iou(pred, target)
    np.testing.assert_allclose(iou, [[6 / 14, 4 / 10], [4 / 12, 0.0]])
    # greedy by IoU would take (g1, p1) and stop at one match; the optimum pairs (g1, p2) and (g2, p1)
    m = match_instances(pred, target, thresholds=0.3)
    assert m["tp"] == [2] and m["mean_matched_iou"][0] == pytest.approx((0.4 + 1 / 3) / 2)
    assert aggregated_jaccard_index(pred, target) == pytest.approx((6 + 4) / (14 + 12 + 4))
    assert aggregated_jaccard_index(pred, target, one_to_one=True) == pytest.approx((4 + 4) / (10 + 12))


def test_empty_maps_and_input_forms():
    empty = np.zeros((3, 3), dtype=np.int64)
    one = empty.copy()
    one[1, 1] = 4
    assert math.isnan(aggregated_jaccard_index(empty, empty))
    assert aggregated_jaccard_index(empty, one) == 0.0 and aggregated_jaccard_index(one, empty) == 0.0
    missed = match_instances(empty, one, thresholds=0.5)
    assert math.isnan(missed["precision"][0]) and missed["recall"] == [0.0] and missed["accuracy"] == [0.0]
    nothing = match_instances(empty, empty, thresholds=0.5)
    assert math.isnan(nothing["accuracy"][0]) and math.isnan(nothing["ap"])

    # ids need not be consecutive; torch and numpy, any integer dtype, give the same numbers
    relabelled = torch.from_numpy(np.where(PRED > 0, PRED * 100 + 7, 0)).to(torch.int32)
    assert aggregated_jaccard_index(relabelled, torch.from_numpy(TARGET)) == aggregated_jaccard_index(PRED, TARGET)
    assert match_instances(relabelled, TARGET)["ap"] == match_instances(PRED, TARGET)["ap"]

    with pytest.raises(ValueError, match="same shape"):
        aggregated_jaccard_index(PRED, TARGET[:2])
    with pytest.raises(TypeError, match="integer"):
        aggregated_jaccard_index(PRED.astype(np.float32), TARGET)
    with pytest.raises(ValueError, match=">= 0"):
        aggregated_jaccard_index(-PRED, TARGET)
    with pytest.raises(ValueError, match="thresholds"):
        match_instances(PRED, TARGET, thresholds=(0.0,))


def test_streaming_pooling_per_image_means_and_merge():
    aji = AggregatedJaccardIndex()
    aji.update([PRED, SHARED_PRED], [TARGET, SHARED_TARGET])
    out = aji.compute()
    assert out["aji"] == pytest.approx((12 / 20 + 6 / 14) / 2)
    assert out["aji_pooled"] == pytest.approx((12 + 6) / (20 + 14)) and out["num_images"] == 2

    thresholds = (0.5, 0.75)
    m = InstanceMatching(thresholds)
    m.update(PRED, TARGET)
    other = InstanceMatching(thresholds)
    other.update(SHARED_PRED, SHARED_TARGET)
    res = m.merge(other).compute()
    # pooled: TP (2 + 1, 0), FP (0 + 1, 2 + 2), FN (0 + 1, 2 + 2)
    assert res["tp"] == [3, 0] and res["fp"] == [1, 4] and res["fn"] == [1, 4]
    assert res["accuracy"] == pytest.approx([3 / 5, 0.0]) and res["ap"] == pytest.approx(0.3)
    assert res["ap_50"] == pytest.approx(0.6) and res["ap_75"] == 0.0
    assert res["ap_per_image"] == pytest.approx((0.5 + (1 / 3 + 0.0) / 2) / 2)
    assert res["n_true"] == 4 and res["n_pred"] == 4 and res["num_images"] == 2

    # a (B, H, W) tensor batch equals the images one by one; reset forgets them
    batch = InstanceMatching(thresholds)
    batch.update(torch.from_numpy(np.stack([PRED, PRED])), torch.from_numpy(np.stack([TARGET, TARGET])))
    assert batch.compute()["tp"] == [4, 0]
    batch.reset()
    assert batch.compute()["num_images"] == 0 and math.isnan(batch.compute()["ap"])
    with pytest.raises(ValueError, match="merge"):
        m.merge(InstanceMatching())
    with pytest.raises(ValueError, match="one prediction per target"):
        batch.update([PRED], [TARGET, TARGET])


# ---------------------------------------------------------------------------------------------- reference
def _reference(pred: np.ndarray, target: np.ndarray, thresholds: tuple[float, ...]) -> tuple[float, float, list[int]]:
    """Dense brute force: Kumar's AJI by explicit loops over masks; AJI+ and the largest one-to-one matching at each
    threshold by trying every assignment (tiny instance counts only)."""
    g_ids = [i for i in np.unique(target) if i]
    p_ids = [i for i in np.unique(pred) if i]
    inter = np.zeros((len(g_ids), len(p_ids)), dtype=np.int64)
    union = np.zeros_like(inter)
    for (i, g), (j, p) in itertools.product(enumerate(g_ids), enumerate(p_ids)):
        inter[i, j], union[i, j] = np.sum((target == g) & (pred == p)), np.sum((target == g) | (pred == p))
    iou = inter / np.maximum(union, 1)
    c = u = 0
    used = set()
    for i, g in enumerate(g_ids):
        if p_ids and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            c, u = c + inter[i, j], u + union[i, j]
            used.add(j)
        else:
            u += np.sum(target == g)
    u += sum(np.sum(pred == p) for j, p in enumerate(p_ids) if j not in used)
    n_g, n_p = len(g_ids), len(p_ids)
    if n_g <= n_p:
        assignments = [list(zip(range(n_g), perm)) for perm in itertools.permutations(range(n_p), n_g)]
    else:
        assignments = [list(zip(perm, range(n_p))) for perm in itertools.permutations(range(n_g), n_p)]
    tps = [max(sum(int(iou[i, j] >= t) for i, j in pairs) for pairs in assignments) for t in thresholds]
    # AJI+: the assignment of largest summed IoU, pairs without overlap dropped
    best = [(i, j) for i, j in max(assignments, key=lambda pairs: sum(iou[i, j] for i, j in pairs)) if iou[i, j] > 0]
    c_plus = sum(inter[i, j] for i, j in best)
    u_plus = sum(union[i, j] for i, j in best) + sum(
        np.sum(target == g) for i, g in enumerate(g_ids) if i not in {a for a, _ in best}
    )
    u_plus += sum(np.sum(pred == p) for j, p in enumerate(p_ids) if j not in {b for _, b in best})
    nan = math.nan
    return (c / u if u else nan), (c_plus / u_plus if u_plus else nan), tps


def _random_map(rng: np.random.Generator, n: int) -> np.ndarray:
    m = np.zeros((12, 12), dtype=np.int64)
    for k in range(1, n + 1):
        y, x = rng.integers(0, 9, 2)
        h, w = rng.integers(2, 8, 2)
        m[y : y + h, x : x + w] = rng.integers(1, 50) if k > 1 else 1
    return m


def test_against_brute_force_reference():
    rng = np.random.default_rng(0)
    thresholds = (0.1, 0.2, 0.3, 0.5, 0.7)  # low thresholds: candidate pairs share instances, Hungarian decides
    for _ in range(40):
        target, pred = _random_map(rng, int(rng.integers(0, 5))), _random_map(rng, int(rng.integers(0, 5)))
        aji_ref, aji_plus_ref, tp_ref = _reference(pred, target, thresholds)
        aji = aggregated_jaccard_index(pred, target)
        aji_plus = aggregated_jaccard_index(pred, target, one_to_one=True)
        assert aji == pytest.approx(aji_ref, nan_ok=True) and aji_plus == pytest.approx(aji_plus_ref, nan_ok=True)
        assert match_instances(pred, target, thresholds)["tp"] == tp_ref


def test_default_thresholds():
    assert DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    m = match_instances(PRED, TARGET)
    assert m["thresholds"] == list(DSB_THRESHOLDS)
    # pair IoUs 2/3 and 1/2: both match at 0.5, one (2/3) up to 0.65, none from 0.7
    assert m["tp"] == [2, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert m["ap"] == pytest.approx((1.0 + 3 * (1 / 3)) / 10)
