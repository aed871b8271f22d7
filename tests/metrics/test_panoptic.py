"""PanopticQuality: hand-computed cases, torchmetrics parity (tensor form), panopticapi parity (COCO form with crowd
and void), streaming / batching, reset and input validation."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

import maskworks.metrics.panoptic as panoptic_module
from maskworks.metrics.panoptic import PanopticQuality

tm_detection = pytest.importorskip("torchmetrics.detection")


def _row(*runs):
    """A (1, W) map from ``(value, length)`` runs."""
    return np.concatenate([np.full(n, v, dtype=np.int64) for v, n in runs])[None]


def _pairs(cat_runs, inst_runs=None):
    """A (1, 1, W, 2) tensor-form batch from category runs and (optional) instance runs."""
    cat = _row(*cat_runs)
    inst = _row(*inst_runs) if inst_runs is not None else np.zeros_like(cat)
    assert cat.shape == inst.shape
    return torch.from_numpy(np.stack([cat, inst], -1)[None])


def _seg(sid, cat, **kw):
    return {"id": sid, "category_id": cat, **kw}


# ---------------------------------------------------------------------------------------------- hand-computed
def test_perfect_prediction_both_forms():
    things, stuffs = {1, 3}, {7}
    x = _pairs([(7, 3), (1, 4), (3, 2), (1, 3)], [(9, 3), (1, 4), (1, 2), (2, 3)])
    m = PanopticQuality(things, stuffs)
    m.update(x, x.clone())
    r = m.compute()
    assert (r["pq"], r["sq"], r["rq"]) == (1.0, 1.0, 1.0)
    assert r["per_class"]["tp"] == [2, 1, 1] and r["fp"] == 0 and r["fn"] == 0
    assert (r["n"], r["n_things"], r["n_stuff"]) == (3, 2, 1)

    ids = _row((0, 2), (5, 3), (16777215, 4))
    segs = [_seg(5, 7, isthing=0), _seg(16777215, 1, isthing=1, score=0.9)]
    m = PanopticQuality(things, stuffs)
    m.update_segments(ids.astype(np.int32), segs, ids.astype(np.uint32), [dict(s) for s in segs])
    r = m.compute()
    assert (r["pq"], r["sq"], r["rq"], r["n"]) == (1.0, 1.0, 1.0, 2)
    assert math.isnan(r["per_class"]["pq"][1])  # category 3 absent from both


def test_seed_hand_example_and_void_semantics_of_the_two_forms():
    # one thing category; W = 16
    # gt:   A (cat 1) on 0..4, B (cat 1) on 5..9, void on 10..15
    # pred: a (cat 1) on 0..3, void on 4..7, c (cat 1) on 8..10, void on 11..15
    gt = _row((1, 5), (2, 5), (0, 6))
    pred = _row((11, 4), (0, 4), (12, 3), (0, 5))
    m = PanopticQuality(things={1}, stuffs=set())
    m.update_segments(pred, [_seg(11, 1), _seg(12, 1)], gt, [_seg(1, 1), _seg(2, 1)])
    r = m.compute()
    # panopticapi: IoU(a, A) = 4 / (4 + 5 - 4) = 0.8 (pred void is not removed from the union);
    # IoU(c, B) = 2 / (3 + 5 - 2 - 1) = 0.4 -> c is a FP (1/3 on void <= 0.5), B a FN
    assert r["per_class"]["tp"] == [1] and r["per_class"]["fp"] == [1] and r["per_class"]["fn"] == [1]
    assert r["sq"] == pytest.approx(0.8) and r["rq"] == pytest.approx(0.5) and r["pq"] == pytest.approx(0.4)

    # tensor form (torchmetrics): predicted void is symmetric "don't care": IoU(a, A) = 4 / (4 + 5 - 4 - 1) = 1,
    # IoU(c, B) = 2 / (3 + 5 - 2 - 1 - 3) = 1 -> two perfect matches
    to_pairs = {0: 0, 1: 1, 2: 1, 11: 1, 12: 1}
    tg = torch.from_numpy(np.stack([np.vectorize(to_pairs.get)(gt), gt], -1)[None])
    tp = torch.from_numpy(np.stack([np.vectorize(to_pairs.get)(pred), pred], -1)[None])
    m = PanopticQuality(things={1}, stuffs=set(), void_label=0)
    m.update(tp, tg)
    r = m.compute()
    assert r["per_class"]["tp"] == [2] and r["fp"] == 0 and r["fn"] == 0 and r["pq"] == pytest.approx(1.0)
    ref = tm_detection.PanopticQuality(things={1}, stuffs={5}, allow_unknown_preds_category=True)
    ref.update(tp, tg)
    assert float(ref.compute()) == pytest.approx(r["pq"], abs=1e-12)


@pytest.mark.parametrize("form", ["tensor", "coco"])
def test_iou_exactly_half_is_not_matched(form):
    # gt thing on 0..3 (4 px), stuff 2 on 4..7; pred thing on 0..k-1, stuff 2 elsewhere
    def run(k):
        m = PanopticQuality(things={1}, stuffs={2})
        if form == "tensor":
            m.update(_pairs([(1, k), (2, 8 - k)], [(3, 8)]), _pairs([(1, 4), (2, 4)], [(1, 8)]))
        else:
            m.update_segments(
                _row((10, k), (20, 8 - k)), [_seg(10, 1), _seg(20, 2)], _row((1, 4), (2, 4)), [_seg(1, 1), _seg(2, 2)]
            )
        return m.compute()

    r = run(2)  # IoU = 2 / 4 = 0.5 exactly
    assert (r["per_class"]["tp"][0], r["per_class"]["fp"][0], r["per_class"]["fn"][0]) == (0, 1, 1)
    assert r["per_class"]["pq"][0] == 0.0 and r["per_class"]["sq"][0] == 0.0  # tp = 0 -> SQ 0 (panopticapi)
    assert r["per_class"]["pq"][1] == pytest.approx(4 / 6)  # stuff: IoU 4 / 6 matched
    assert r["pq"] == pytest.approx((0 + 4 / 6) / 2)
    r = run(3)  # IoU = 3 / 4
    assert r["per_class"]["tp"][0] == 1 and r["per_class"]["pq"][0] == pytest.approx(0.75)


@pytest.mark.parametrize("form", ["tensor", "coco"])
def test_predicted_segment_mostly_on_void_is_not_a_false_positive(form):
    # gt:   stuff 2 on 0..9, void on 10..15
    # pred: stuff on 0..5 and 8, thing 7 on 6..7 (no void: FP), thing 8 on 9..12 (1 px stuff + 3 px void: ignored),
    #       void / unlisted on 13..15
    m = PanopticQuality(things={1}, stuffs={2}, void_label=0)
    if form == "tensor":
        gt = _pairs([(2, 10), (0, 6)])
        pred = _pairs([(2, 6), (1, 2), (2, 1), (1, 4), (0, 3)], [(0, 6), (7, 2), (0, 1), (8, 4), (0, 3)])
        m.update(pred, gt)
    else:
        m.update_segments(
            _row((20, 6), (7, 2), (20, 1), (8, 4), (0, 3)),
            [_seg(20, 2), _seg(7, 1), _seg(8, 1)],
            _row((2, 10), (0, 6)),
            [_seg(2, 2)],
        )
    r = m.compute()
    assert r["per_class"]["fp"] == [1, 0] and r["per_class"]["fn"] == [0, 0]
    assert r["per_class"]["pq"][1] == pytest.approx(7 / 10)  # stuff: 7 / (7 + 10 - 7)
    # a segment with exactly half of it on void is still a FP (the rule is "> 0.5")
    m = PanopticQuality(things={1}, stuffs={2})
    m.update_segments(_row((2, 4), (9, 4), (0, 2)), [_seg(2, 2), _seg(9, 1)], _row((2, 6), (0, 4)), [_seg(2, 2)])
    assert m.compute()["per_class"]["fp"] == [1, 0]


def test_crowd_regions():
    things, stuffs = {1, 3}, {2}
    # gt:   crowd person (cat 1) on 0..5, person on 6..9, stuff 2 on 10..15, void 16..17, car crowd on 18..19
    gt = _row((100, 6), (101, 4), (200, 6), (0, 2), (300, 2))
    gt_segs = [_seg(100, 1, iscrowd=1), _seg(101, 1, iscrowd=0), _seg(200, 2), _seg(300, 3, iscrowd=1)]
    # pred: person on 0..3 (all crowd: ignored); car on 4..5 (other category's crowd: FP); person on 6..9 (TP);
    #       person on 10..11 + 16 + 18 -> 1 void + 0 own-crowd of 4 px: FP;
    #       stuff 2 on 12..15 + 17 + 19: IoU = 4 / (6 + 6 - 4 - 1) = 4/7 -> TP
    pred = _row((1, 4), (2, 2), (3, 4), (4, 2), (5, 4), (4, 1), (5, 1), (4, 1), (5, 1))
    pred_segs = [_seg(1, 1), _seg(2, 3), _seg(3, 1), _seg(4, 1), _seg(5, 2)]
    m = PanopticQuality(things, stuffs)
    m.update_segments(pred, pred_segs, gt, gt_segs)
    r = m.compute()
    pc = r["per_class"]  # order: things 1, 3, then stuff 2
    assert r["categories"] == [1, 3, 2]
    assert pc["tp"] == [1, 0, 1] and pc["fp"] == [1, 1, 0] and pc["fn"] == [0, 0, 0]  # crowd never a FN
    assert pc["pq"][2] == pytest.approx(4 / 7)
    # crowd + void together: person segment with 2 px on crowd, 1 on void, 2 on stuff -> 3/5 ignored
    gt = _row((100, 2), (0, 1), (200, 2))
    m = PanopticQuality(things, stuffs)
    m.update_segments(_row((9, 5)), [_seg(9, 1)], gt, [_seg(100, 1, iscrowd=True), _seg(200, 2)])
    r = m.compute()
    assert r["per_class"]["fp"] == [0, 0, 0] and r["per_class"]["fn"] == [0, 0, 1]
    # several crowd segments of one category all count (panopticapi keeps only the last one listed)
    gt = _row((100, 2), (101, 2), (200, 1))
    m = PanopticQuality(things, stuffs)
    m.update_segments(_row((9, 5)), [_seg(9, 1)], gt, [_seg(100, 1, iscrowd=1), _seg(101, 1, iscrowd=1), _seg(200, 2)])
    assert m.compute()["per_class"]["fp"] == [0, 0, 0]


def test_absent_category_excluded_from_means_and_nan_per_class():
    m = PanopticQuality(things={1, 3}, stuffs={2, 4}, class_names={1: "person", 2: "sky", 3: "car", 4: "road"})
    gt = _pairs([(1, 4), (2, 4)], [(1, 8)])
    pred = _pairs([(1, 3), (2, 5)], [(1, 8)])
    m.update(pred, gt)
    r = m.compute()
    assert r["categories"] == [1, 3, 2, 4] and r["class_names"] == ["person", "car", "sky", "road"]
    assert r["n"] == 2 and r["n_things"] == 1 and r["n_stuff"] == 1
    pc = r["per_class"]
    assert math.isnan(pc["pq"][1]) and math.isnan(pc["sq"][1]) and math.isnan(pc["rq"][1])
    assert math.isnan(pc["pq"][3])
    assert pc["pq"][0] == pytest.approx(3 / 4) and pc["pq"][2] == pytest.approx(4 / 5)
    assert r["pq"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert r["pq_things"] == pytest.approx(3 / 4) and r["pq_stuff"] == pytest.approx(4 / 5)
    json.loads(json.dumps(r))  # plain Python values
    # a category predicted only (FP only) does count, with PQ 0
    m.update(_pairs([(3, 8)], [(1, 8)]), _pairs([(2, 8)]))
    r = m.compute()
    assert r["n_things"] == 2 and r["per_class"]["pq"][1] == 0.0 and r["per_class"]["sq"][1] == 0.0


def test_empty_prediction():
    things, stuffs = {1}, {2}
    gt = _row((1, 3), (2, 3), (0, 2))
    m = PanopticQuality(things, stuffs)
    m.update_segments(np.zeros_like(gt), [], gt, [_seg(1, 1), _seg(2, 2)])
    r = m.compute()
    assert r["per_class"]["fn"] == [1, 1] and r["tp"] == 0 and r["fp"] == 0
    assert (r["pq"], r["sq"], r["rq"], r["n"]) == (0.0, 0.0, 0.0, 2)
    # torchmetrics semantics: ground truth predicted void is not a false negative, so an all-void prediction
    # counts nothing at all and every mean is NaN (as torchmetrics' own result)
    tgt = _pairs([(1, 3), (2, 3), (0, 2)], [(1, 8)])
    empty = _pairs([(0, 8)])
    m = PanopticQuality(things, stuffs, void_label=0)
    m.update(empty, tgt)
    r = m.compute()
    assert r["n"] == 0 and math.isnan(r["pq"]) and r["fn"] == 0
    ref = tm_detection.PanopticQuality(things=things, stuffs=stuffs, allow_unknown_preds_category=True)
    ref.update(empty, tgt)
    assert math.isnan(float(ref.compute()))
    # nothing updated at all
    r = PanopticQuality(things, stuffs).compute()
    assert math.isnan(r["pq"]) and math.isnan(r["pq_things"]) and r["n"] == 0 and r["num_images"] == 0
    assert all(math.isnan(v) for v in r["per_class"]["pq"])


# ---------------------------------------------------------------------------------------------- torchmetrics parity
def _random_pairs(gen, b, h, w, things, stuffs, unknown, n_blobs=8, noise=0.03):
    """Random (category, instance) target and a perturbed prediction built from rectangles."""
    things, stuffs = sorted(things), sorted(stuffs)
    cats = things + stuffs
    tgt = torch.zeros(b, h, w, 2, dtype=torch.int64)
    pred = torch.zeros(b, h, w, 2, dtype=torch.int64)

    def ri(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    for i in range(b):
        tgt[i, ..., 0] = stuffs[ri(0, len(stuffs))] if stuffs else unknown
        tgt[i, ..., 1] = ri(0, 50)  # stuff instance ids are ignored
        pred[i] = tgt[i]
        for k in range(n_blobs):
            y, x, hh, ww = ri(0, h - 2), ri(0, w - 2), ri(2, h // 2), ri(2, w // 2)
            c = cats[ri(0, len(cats))] if ri(0, 6) else unknown
            inst = k + 1
            tgt[i, y : y + hh, x : x + ww, 0], tgt[i, y : y + hh, x : x + ww, 1] = c, inst
            if ri(0, 5) == 0:
                continue  # missed in the prediction
            dy, dx, dh, dw = ri(-2, 3), ri(-2, 3), ri(-2, 3), ri(-2, 3)
            py, px = max(0, y + dy), max(0, x + dx)
            pc = c if ri(0, 5) else cats[ri(0, len(cats))]
            if pc == unknown:
                pc = cats[0]
            pred[i, py : py + max(1, hh + dh), px : px + max(1, ww + dw), 0] = pc
            pred[i, py : py + max(1, hh + dh), px : px + max(1, ww + dw), 1] = 100 + inst
        noisy = torch.rand(h, w, generator=gen) < noise
        pred[i, ..., 0][noisy] = torch.tensor(cats)[torch.randint(0, len(cats), (int(noisy.sum()),), generator=gen)]
        pred[i, ..., 1][noisy] = torch.randint(0, 3, (int(noisy.sum()),), generator=gen)
    return pred, tgt


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_torchmetrics_on_random_maps(seed):
    gen = torch.Generator().manual_seed(seed)
    things, stuffs = {1, 4, 9}, {2, 5}
    ref = tm_detection.PanopticQuality(things=things, stuffs=stuffs, return_sq_and_rq=True)
    ref_pc = tm_detection.PanopticQuality(things=things, stuffs=stuffs, return_sq_and_rq=True, return_per_class=True)
    m = PanopticQuality(things, stuffs)
    for _ in range(2):
        pred, tgt = _random_pairs(gen, 3, 24, 24, things, stuffs, unknown=77)
        ref.update(pred, tgt)
        ref_pc.update(pred, tgt)
        m.update(pred.to(torch.int32), tgt.numpy())  # int32 tensor / numpy inputs
    r = m.compute()
    pq, sq, rq = ref.compute().tolist()
    assert r["pq"] == pytest.approx(pq, abs=1e-6)
    assert r["sq"] == pytest.approx(sq, abs=1e-6)
    assert r["rq"] == pytest.approx(rq, abs=1e-6)
    assert r["per_class"]["tp"] == ref.true_positives.tolist()
    assert r["per_class"]["fp"] == ref.false_positives.tolist()
    assert r["per_class"]["fn"] == ref.false_negatives.tolist()
    assert r["tp"] > 0 and r["fp"] > 0 and r["fn"] > 0  # the cases exercise all three
    per = ref_pc.compute().reshape(-1, 3)  # (C, 3) in 1.9.0: columns pq, sq, rq
    for j, key in enumerate(["pq", "sq", "rq"]):
        ours = torch.tensor(r["per_class"][key], dtype=torch.float64)
        assert torch.allclose(torch.nan_to_num(ours, nan=0.0), per[:, j].double(), atol=1e-6)


@pytest.mark.parametrize("seed", [10, 11])
def test_matches_torchmetrics_with_void_predictions(seed):
    gen = torch.Generator().manual_seed(seed)
    things, stuffs = {1, 3}, {6}
    pred, tgt = _random_pairs(gen, 3, 20, 20, things, stuffs, unknown=0)
    holes = torch.rand(pred.shape[:-1], generator=gen) < 0.15
    pred[..., 0][holes] = 42  # unknown predicted category -> void
    ref = tm_detection.PanopticQuality(things=things, stuffs=stuffs, allow_unknown_preds_category=True)
    ref.update(pred, tgt)
    m = PanopticQuality(things, stuffs, allow_unknown_pred=True)
    m.update(pred, tgt)
    assert m.compute()["pq"] == pytest.approx(float(ref.compute()), abs=1e-6)
    assert m.tp.tolist() == ref.true_positives.tolist() and m.fn.tolist() == ref.false_negatives.tolist()
    assert m.fp.tolist() == ref.false_positives.tolist()


def test_many_segments_and_spread_instance_ids_match_torchmetrics(monkeypatch):
    # per-pixel random instances: hundreds of segments per image
    gen = torch.Generator().manual_seed(5)
    things, stuffs = {1, 2}, {3}
    tgt = torch.stack(
        [torch.randint(1, 4, (2, 16, 16), generator=gen), torch.randint(0, 300, (2, 16, 16), generator=gen)], -1
    )
    pred = tgt.clone()
    flip = torch.rand(2, 16, 16, generator=gen) < 0.3
    pred[..., 1][flip] = torch.randint(0, 300, (int(flip.sum()),), generator=gen)
    ref = tm_detection.PanopticQuality(things=things, stuffs=stuffs)
    ref.update(pred, tgt)
    dense = PanopticQuality(things, stuffs)
    dense.update(pred, tgt)
    assert dense.compute()["pq"] == pytest.approx(float(ref.compute()), abs=1e-6)
    # the same through the sparse (torch.unique) pair histogram used when (G + 1)(P + 1) is large
    monkeypatch.setattr(panoptic_module, "_DENSE_LIMIT", 0)
    sparse = PanopticQuality(things, stuffs)
    sparse.update(pred, tgt)
    assert sparse.tp.tolist() == dense.tp.tolist() == ref.true_positives.tolist()
    assert sparse.fp.tolist() == dense.fp.tolist() and sparse.fn.tolist() == dense.fn.tolist()
    assert sparse.compute()["pq"] == pytest.approx(dense.compute()["pq"], abs=1e-12)
    # instance ids spread over the whole int64 range give the same result as compact ones
    big = torch.tensor([-(2**62), 2**62, 5, 2**61 + 1])
    m2 = PanopticQuality(things, stuffs)
    m2.update(
        torch.stack([pred[..., 0], big[pred[..., 1] % 4]], -1), torch.stack([tgt[..., 0], big[tgt[..., 1] % 4]], -1)
    )
    m3 = PanopticQuality(things, stuffs)
    m3.update(torch.stack([pred[..., 0], pred[..., 1] % 4], -1), torch.stack([tgt[..., 0], tgt[..., 1] % 4], -1))
    assert m2.compute() == m3.compute()


# ---------------------------------------------------------------------------------------------- panopticapi parity
def _ref_pq_single(pan_gt, gt_segments, pan_pred, pred_segments, categories, pq_stat):
    """Dict-based transcription of panopticapi ``pq_compute_single_core`` for one image (arrays in memory)."""
    offset, void = 256 * 256 * 256, 0
    gt_segms = {el["id"]: dict(el) for el in gt_segments}
    pred_segms = {el["id"]: dict(el) for el in pred_segments}
    labels, labels_cnt = np.unique(pan_gt, return_counts=True)
    for label, cnt in zip(labels, labels_cnt):  # the JSON 'area' of the ground truth
        if label in gt_segms:
            gt_segms[label]["area"] = cnt
    pred_labels_set = set(el["id"] for el in pred_segments)
    labels, labels_cnt = np.unique(pan_pred, return_counts=True)
    for label, label_cnt in zip(labels, labels_cnt):
        if label not in pred_segms:
            assert label == void
            continue
        pred_segms[label]["area"] = label_cnt
        pred_labels_set.remove(label)
        assert pred_segms[label]["category_id"] in categories
    assert not pred_labels_set
    pan_gt_pred = pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64)
    gt_pred_map = {}
    labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
    for label, intersection in zip(labels, labels_cnt):
        gt_pred_map[(int(label // offset), int(label % offset))] = intersection
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["iscrowd"] == 1:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (
            pred_segms[pred_label]["area"]
            + gt_segms[gt_label]["area"]
            - intersection
            - gt_pred_map.get((void, pred_label), 0)
        )
        iou = intersection / union
        if iou > 0.5:
            pq_stat[gt_segms[gt_label]["category_id"]]["tp"] += 1
            pq_stat[gt_segms[gt_label]["category_id"]]["iou"] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd_labels_dict = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info["iscrowd"] == 1:
            crowd_labels_dict[gt_info["category_id"]] = gt_label
            continue
        pq_stat[gt_info["category_id"]]["fn"] += 1
    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((void, pred_label), 0)
        if pred_info["category_id"] in crowd_labels_dict:
            intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
        if intersection / pred_info["area"] > 0.5:
            continue
        pq_stat[pred_info["category_id"]]["fp"] += 1


def _ref_pq_average(pq_stat, categories, isthing):
    """panopticapi ``PQStat.pq_average``."""
    pq, sq, rq, n = 0, 0, 0, 0
    per_class = {}
    for label, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        s = pq_stat[label]
        iou, tp, fp, fn = s["iou"], s["tp"], s["fp"], s["fn"]
        if tp + fp + fn == 0:
            per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
        sq_class = iou / tp if tp != 0 else 0
        rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
        per_class[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
        pq, sq, rq = pq + pq_class, sq + sq_class, rq + rq_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _random_coco(rng, h, w, things, stuffs):
    """Random COCO-style gt / pred id maps with void, sparse ids, and at most one crowd segment per category."""
    things, stuffs = sorted(things), sorted(stuffs)
    cats = things + stuffs
    ids = iter(rng.choice(np.arange(1, 256**3), size=200, replace=False).tolist())
    gt = np.zeros((h, w), np.int64)
    pred = np.zeros((h, w), np.int64)
    gt_cat, pred_cat, crowd = {}, {}, {}
    for s in stuffs:  # stuff bands
        if rng.random() < 0.8:
            y0, y1 = sorted(rng.integers(0, h, 2))
            sid = next(ids)
            gt[y0 : y1 + 1] = sid
            gt_cat[sid] = s
            pid = next(ids)
            jy = int(rng.integers(-3, 4))
            pred[max(0, y0 + jy) : y1 + 1 + jy] = pid
            pred_cat[pid] = s if rng.random() < 0.85 else int(rng.choice(cats))
    crowded = set()
    for _ in range(int(rng.integers(3, 9))):
        y, x = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        hh, ww = int(rng.integers(2, h // 2)), int(rng.integers(2, w // 2))
        kind = rng.random()
        if kind < 0.12:  # ground-truth void region
            gt[y : y + hh, x : x + ww] = 0
            continue
        c = int(rng.choice(things)) if things and rng.random() < 0.8 else int(rng.choice(cats))
        sid = next(ids)
        gt[y : y + hh, x : x + ww] = sid
        gt_cat[sid] = c
        if c in things and c not in crowded and rng.random() < 0.25:
            crowded.add(c)
            crowd[sid] = 1
        if rng.random() < 0.2:
            continue  # missed
        pid = next(ids)
        dy, dx, dh, dw = (int(v) for v in rng.integers(-2, 3, 4))
        pred[max(0, y + dy) : y + dy + max(1, hh + dh), max(0, x + dx) : x + dx + max(1, ww + dw)] = pid
        pred_cat[pid] = c if rng.random() < 0.85 else int(rng.choice(cats))
    for _ in range(int(rng.integers(0, 3))):  # predicted void holes and false-positive blobs
        y, x = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        if rng.random() < 0.5:
            pred[y : y + 4, x : x + 4] = 0
        else:
            pid = next(ids)
            pred[y : y + 3, x : x + 5] = pid
            pred_cat[pid] = int(rng.choice(cats))
    gt_segments = [
        {"id": int(i), "category_id": gt_cat[i], "iscrowd": crowd.get(i, 0), "isthing": int(gt_cat[i] in things)}
        for i in np.unique(gt)
        if i != 0
    ]
    pred_segments = [
        {"id": int(i), "category_id": pred_cat[i], "score": 0.5, "isthing": pred_cat[i] in things}
        for i in np.unique(pred)
        if i != 0
    ]
    return pred, pred_segments, gt, gt_segments


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_panopticapi_reference_with_crowd_and_void(seed):
    rng = np.random.default_rng(seed)
    things, stuffs = {1, 3, 8}, {10, 11}
    categories = {c: {"isthing": int(c in things)} for c in things | stuffs}
    pq_stat = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    m = PanopticQuality(things, stuffs)
    n_crowd = 0
    for _ in range(8):
        pred, pred_segments, gt, gt_segments = _random_coco(rng, 24, 28, things, stuffs)
        n_crowd += sum(s["iscrowd"] for s in gt_segments)
        _ref_pq_single(gt.astype(np.uint32), gt_segments, pred.astype(np.uint32), pred_segments, categories, pq_stat)
        m.update_segments(pred.astype(np.int32), pred_segments, gt.astype(np.uint32), gt_segments)
    assert n_crowd > 0
    r = m.compute()
    for suffix, isthing in (("", None), ("_things", True), ("_stuff", False)):
        ref, per_class = _ref_pq_average(pq_stat, categories, isthing)
        if isthing is None:
            all_per_class = per_class
        for key in ("pq", "sq", "rq"):
            assert r[key + suffix] == pytest.approx(ref[key], abs=1e-9)
        assert r["n" + suffix] == ref["n"]
    for j, c in enumerate(r["categories"]):
        for key in ("tp", "fp", "fn"):
            assert r["per_class"][key][j] == pq_stat[c][key]
        if pq_stat[c]["tp"] + pq_stat[c]["fp"] + pq_stat[c]["fn"]:
            assert r["per_class"]["pq"][j] == pytest.approx(all_per_class[c]["pq"], abs=1e-12)
            assert r["per_class"]["sq"][j] == pytest.approx(all_per_class[c]["sq"], abs=1e-12)
    assert r["tp"] > 0 and r["fp"] > 0 and r["fn"] > 0


def test_coco_form_without_void_or_crowd_equals_tensor_form():
    # the two forms differ only in void / crowd handling (and the tensor form has one segment per stuff category)
    rng = np.random.default_rng(7)
    things, stuffs = {1, 3}, {10, 11}
    for _ in range(3):
        pred, pred_segments, gt, gt_segments = _random_coco(rng, 20, 20, things, stuffs)
        maps = []
        for ids, segs in ((pred, pred_segments), (gt, gt_segments)):
            cat = {s["id"]: s["category_id"] for s in segs}
            cat[0] = 10  # no void: it becomes stuff 10
            c = np.vectorize(cat.get)(ids)
            inst = np.where(np.isin(c, list(stuffs)), 0, ids)
            seg_id = np.where(inst > 0, inst, c)  # one COCO segment per stuff category; thing ids are > 11
            assert not np.isin(inst[inst > 0], list(stuffs)).any()
            coco = [{"id": int(i), "category_id": int(c[seg_id == i][0])} for i in np.unique(seg_id)]
            maps.append((seg_id, coco, torch.from_numpy(np.stack([c, inst], -1)[None])))
        (p_ids, p_segs, p_pairs), (g_ids, g_segs, g_pairs) = maps
        a, b = PanopticQuality(things, stuffs), PanopticQuality(things, stuffs)
        a.update_segments(p_ids, p_segs, g_ids, g_segs)
        b.update(p_pairs, g_pairs)
        ra, rb = a.compute(), b.compute()
        assert ra["per_class"]["tp"] == rb["per_class"]["tp"] and ra["per_class"]["fp"] == rb["per_class"]["fp"]
        assert ra["per_class"]["fn"] == rb["per_class"]["fn"] and ra["tp"] > 0
        assert ra["pq"] == pytest.approx(rb["pq"], abs=1e-12)


# ---------------------------------------------------------------------------------------------- streaming
def test_batch_vs_streaming_vs_merge():
    gen = torch.Generator().manual_seed(3)
    things, stuffs = {1, 2}, {5}
    pred, tgt = _random_pairs(gen, 4, 16, 16, things, stuffs, unknown=9)
    whole = PanopticQuality(things, stuffs)
    whole.update(pred, tgt)
    stream = PanopticQuality(things, stuffs)
    for i in range(4):
        stream.update(pred[i : i + 1], tgt[i : i + 1])
    left, right = PanopticQuality(things, stuffs), PanopticQuality(things, stuffs)
    left.update(pred[:1], tgt[:1])
    right.update(pred[1:], tgt[1:])
    merged = left.merge(right)
    rw, rs, rm = whole.compute(), stream.compute(), merged.compute()
    assert rw["per_class"]["tp"] == rs["per_class"]["tp"] == rm["per_class"]["tp"]
    assert rw["pq"] == pytest.approx(rs["pq"], abs=1e-12) and rw["pq"] == pytest.approx(rm["pq"], abs=1e-12)
    assert rw["num_images"] == rs["num_images"] == rm["num_images"] == 4

    rng = np.random.default_rng(4)
    cases = [_random_coco(rng, 16, 16, {1, 2}, {5}) for _ in range(3)]
    batched = PanopticQuality(things, stuffs)
    batched.update_segments(
        np.stack([c[0] for c in cases]), [c[1] for c in cases], np.stack([c[2] for c in cases]), [c[3] for c in cases]
    )
    single = PanopticQuality(things, stuffs)
    for c in cases:
        single.update_segments(*c)
    assert batched.compute() == single.compute()


def test_reset():
    gen = torch.Generator().manual_seed(8)
    pred, tgt = _random_pairs(gen, 2, 12, 12, {1}, {2}, unknown=0)
    m = PanopticQuality({1}, {2})
    m.update(pred, tgt)
    first = m.compute()
    assert first["n"] > 0
    m.reset()
    r = m.compute()
    assert math.isnan(r["pq"]) and r["tp"] == r["fp"] == r["fn"] == r["num_images"] == 0
    m.update(pred, tgt)
    assert m.compute() == first


# ---------------------------------------------------------------------------------------------- validation
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="disjoint"):
        PanopticQuality({1, 2}, {2})
    with pytest.raises(ValueError, match="non-empty"):
        PanopticQuality(set(), [])
    with pytest.raises(ValueError, match="things must hold int"):
        PanopticQuality({1.5}, {2})
    with pytest.raises(ValueError, match="collection"):
        PanopticQuality(3, {2})
    with pytest.raises(ValueError, match="void_label"):
        PanopticQuality({1}, {2}, void_label=2)
    with pytest.raises(ValueError, match="expected 2"):
        PanopticQuality({1}, {2}, class_names=["a"])
    with pytest.raises(ValueError, match=r"lacks names for category ids \[2\]"):
        PanopticQuality({1}, {2}, class_names={1: "a"})
    with pytest.raises(ValueError, match="things=\\[1\\], stuffs=\\[3\\]"):
        PanopticQuality({1}, {2}).merge(PanopticQuality({1}, {3}))


def test_bad_tensor_inputs():
    m = PanopticQuality({1}, {2})
    x = _pairs([(1, 2), (2, 2)])
    with pytest.raises(ValueError, match="shapes differ"):
        m.update(x, x[:, :, :3])
    with pytest.raises(ValueError, match=r"\(B, \*spatial, 2\)"):
        m.update(x[..., :1], x[..., :1])
    with pytest.raises(ValueError, match=r"\(B, \*spatial, 2\)"):
        m.update(x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match=r"category ids outside .*\[7\].*allow_unknown_pred"):
        m.update(_pairs([(1, 2), (7, 2)]), x)
    with pytest.raises(TypeError, match="integer"):
        m.update(x.float(), x)
    assert m.num_images == 0 and m.tp.sum() == 0  # failed updates leave no trace
    m.update(x, _pairs([(1, 2), (7, 2)]))  # unknown target category: void, accepted
    PanopticQuality({1}, {2}, void_label=255).update(_pairs([(1, 2), (255, 2)]), x)


def test_bad_segment_inputs():
    m = PanopticQuality({1}, {2})
    gt = _row((1, 2), (2, 2))
    gs = [_seg(1, 1), _seg(2, 2)]
    with pytest.raises(ValueError, match=r"gt_map holds segment ids not listed in gt_segments: \[2\]"):
        m.update_segments(gt, gs, gt, gs[:1])
    with pytest.raises(ValueError, match=r"pred_map holds segment ids not listed"):
        m.update_segments(gt, gs[:1], gt, gs)
    with pytest.raises(ValueError, match=r"lists segment ids absent from pred_map: \[5\]"):
        m.update_segments(gt, gs + [_seg(5, 1)], gt, gs)
    with pytest.raises(ValueError, match="duplicate segment id 1"):
        m.update_segments(gt, gs + [_seg(1, 1)], gt, gs)
    with pytest.raises(ValueError, match="positive int"):
        m.update_segments(gt, gs + [_seg(0, 1)], gt, gs)
    with pytest.raises(ValueError, match=r"category_id 4, not in things.*allow_unknown_pred"):
        m.update_segments(gt, [_seg(1, 4), _seg(2, 2)], gt, gs)
    with pytest.raises(ValueError, match="gt_segments: segment 2 has category_id 4"):
        m.update_segments(gt, gs, gt, [_seg(1, 1), _seg(2, 4)])
    with pytest.raises(ValueError, match="isthing=True, but category 2 is a stuff category"):
        m.update_segments(gt, [_seg(1, 1), _seg(2, 2, isthing=True)], gt, gs)
    with pytest.raises(ValueError, match="'id' and 'category_id'"):
        m.update_segments(gt, [{"id": 1}], gt, gs)
    with pytest.raises(ValueError, match="negative"):
        m.update_segments(-gt, gs, gt, gs)
    with pytest.raises(ValueError, match="shapes differ"):
        m.update_segments(gt, gs, gt[:, :3], gs)
    with pytest.raises(ValueError, match="list of 2 such lists"):
        m.update_segments(np.stack([gt, gt]), [gs], np.stack([gt, gt]), [gs, gs])
    with pytest.raises(TypeError, match="integer"):
        m.update_segments(gt.astype(np.float32), gs, gt, gs)
    assert m.num_images == 0 and m.tp.sum() == 0
    # allow_unknown_pred turns unknown predicted segments into void
    m = PanopticQuality({1}, {2}, allow_unknown_pred=True)
    m.update_segments(gt, [_seg(1, 4), _seg(2, 2)], gt, gs)
    assert m.compute()["per_class"]["fn"] == [1, 0]
    # a ground-truth segment listed but absent from the map (e.g. cropped away) is skipped
    m = PanopticQuality({1}, {2})
    m.update_segments(gt, gs, gt, gs + [_seg(9, 1)])
    assert m.compute()["pq"] == 1.0
