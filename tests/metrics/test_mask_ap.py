"""MaskAP: parity with pycocotools' COCOeval run by hand and with torchmetrics, edge cases and input validation."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from maskworks.metrics.coco import MaskAP  # noqa: E402

# in the order of COCOeval.stats
STAT_KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
STAT_KEYS += ["mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _nan_to_minus_one(values):
    return [-1.0 if math.isnan(v) else v for v in values]


def _hand_case():
    """Three images of different sizes, classes 1 and 2, a crowd target, false positives, a miss and an image
    without targets. Returns (per-image dicts of numpy arrays): preds, targets."""
    h1, w1 = 20, 24
    t1 = dict(
        masks=np.stack([_rect(h1, w1, 2, 8, 2, 10), _rect(h1, w1, 10, 18, 12, 22), _rect(h1, w1, 12, 20, 0, 8)]),
        labels=np.array([1, 2, 1]),
        iscrowd=np.array([0, 0, 1]),
    )
    p1 = dict(
        masks=np.stack(
            [
                _rect(h1, w1, 2, 8, 3, 10),  # class 1, IoU 42/48
                _rect(h1, w1, 11, 18, 12, 20),  # class 2, IoU 56/80
                _rect(h1, w1, 13, 18, 1, 6),  # inside the crowd region: ignored
                _rect(h1, w1, 0, 3, 18, 24),  # class 1 false positive with the top score
            ]
        ),
        labels=np.array([1, 2, 1, 1]),
        scores=np.array([0.9, 0.8, 0.7, 0.95], dtype=np.float32),
    )
    h2, w2 = 16, 16
    t2 = dict(
        masks=np.stack([_rect(h2, w2, 4, 12, 4, 12), _rect(h2, w2, 0, 4, 0, 4)]).astype(np.uint8),
        labels=np.array([2, 1]),
    )
    p2 = dict(
        masks=np.stack([_rect(h2, w2, 5, 12, 4, 12), _rect(h2, w2, 0, 3, 12, 16)]),  # class 1 target missed
        labels=np.array([2, 2]),
        scores=np.array([0.6, 0.3], dtype=np.float32),
    )
    h3, w3 = 12, 10
    t3 = dict(masks=np.zeros((0, h3, w3), dtype=bool), labels=np.zeros(0, dtype=np.int64))  # no targets
    p3 = dict(masks=_rect(h3, w3, 2, 6, 2, 6)[None], labels=np.array([1]), scores=np.array([0.5], dtype=np.float32))
    return [p1, p2, p3], [t1, t2, t3]


def _to_torch(items):
    return [{k: torch.from_numpy(np.asarray(v)) for k, v in d.items()} for d in items]


def _encode(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _reference_cocoeval(preds, targets, iou_type: str, cat_ids=None) -> np.ndarray:
    """COCOeval.stats from COCO objects built directly (dataset dict + createIndex, loadRes)."""
    images, anns, dets = [], [], []
    for img_id, (p, t) in enumerate(zip(preds, targets), start=7):  # ids need not start at 1
        h, w = t["masks"].shape[1:]
        images.append({"id": img_id, "height": h, "width": w})
        crowd = t.get("iscrowd", np.zeros(len(t["labels"]), dtype=int))
        for m, label, c in zip(t["masks"], t["labels"], crowd):
            rle = _encode(m)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(c),
                }
            )
        for m, label, s in zip(p["masks"], p["labels"], p["scores"]):
            det = {"image_id": img_id, "category_id": int(label), "score": float(s)}
            rle = _encode(m)
            if iou_type == "segm":
                det["segmentation"] = rle
            else:
                det["bbox"] = mask_utils.toBbox(rle).tolist()
            dets.append(det)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    gt.createIndex()
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, iouType=iou_type)
    if cat_ids is not None:
        ev.params.catIds = cat_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


# ---------------------------------------------------------------------------------------------- pycocotools parity
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_hand_made_case_matches_cocoeval(iou_type, capsys):
    preds, targets = _hand_case()
    metric = MaskAP(iou_type=iou_type)
    metric.update(_to_torch(preds[:2]), _to_torch(targets[:2]))  # two batches; the second has numpy arrays
    metric.update(preds[2:], targets[2:])
    r = metric.compute()
    assert capsys.readouterr().out == ""  # COCOeval's progress prints are suppressed

    stats = _reference_cocoeval(preds, targets, iou_type)
    capsys.readouterr()
    assert _nan_to_minus_one([r[k] for k in STAT_KEYS]) == stats.tolist()  # identical, not just close
    assert 0 < r["map"] < 1 and math.isnan(r["map_large"])  # non-trivial values; no large objects
    assert r["classes"] == [1, 2]
    for i, c in enumerate([1, 2]):
        per_class = _reference_cocoeval(preds, targets, iou_type, cat_ids=[c])
        assert r["map_per_class"][i] == per_class[0]
        assert r["mar_100_per_class"][i] == per_class[8]
    json.dumps(r)  # plain Python types


def test_both_iou_types_prefix_keys_and_given_boxes_match_mask_boxes():
    preds, targets = _hand_case()
    both = MaskAP(iou_type=("bbox", "segm"))
    both.update(preds, targets)
    r = both.compute()
    segm, bbox = MaskAP("segm"), MaskAP("bbox")
    segm.update(preds, targets)
    # explicit xyxy boxes equal to the tight continuous-coordinate boxes of the masks give the same bbox result
    with_boxes = []
    for d in preds:
        rles = [_encode(m) for m in d["masks"]]
        xywh = np.array([mask_utils.toBbox(rle) for rle in rles]).reshape(-1, 4)
        with_boxes.append({**d, "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)})
    bbox.update(with_boxes, targets)
    rs, rb = segm.compute(), bbox.compute()
    assert "map" not in r and r["classes"] == [1, 2]
    for k in [*STAT_KEYS, "map_per_class", "mar_100_per_class"]:
        assert _nan_to_minus_one(np.atleast_1d(r[f"segm_{k}"])) == _nan_to_minus_one(np.atleast_1d(rs[k]))
        assert _nan_to_minus_one(np.atleast_1d(r[f"bbox_{k}"])) == _nan_to_minus_one(np.atleast_1d(rb[k]))


def test_perfect_prediction_gives_map_one():
    preds, targets = _hand_case()
    perfect = []
    for t in targets:
        keep = t.get("iscrowd", np.zeros(len(t["labels"]))) == 0
        n = int(keep.sum())
        perfect.append({"masks": t["masks"][keep], "labels": t["labels"][keep], "scores": np.linspace(0.9, 0.5, n)})
    metric = MaskAP()
    metric.update(perfect, targets)
    r = metric.compute()
    # pycocotools' precision is tp / (tp + fp + eps): 1.0 up to rounding
    assert [r[k] for k in ("map", "map_50", "map_75", "mar_1", "mar_100")] == pytest.approx([1.0] * 5, abs=1e-12)
    assert r["map_per_class"] == pytest.approx([1.0, 1.0], abs=1e-12)


# ---------------------------------------------------------------------------------------------- torchmetrics parity
def _ellipse(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(3, h / 2.5), rng.uniform(3, w / 2.5)
    yy, xx = np.mgrid[:h, :w]
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if not m.any():
        m[int(min(cy, h - 1)), int(min(cx, w - 1))] = True
    return m


def _random_blobs(seed: int = 0, num_images: int = 6, num_classes: int = 3):
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(num_images):
        h, w = [(64, 64), (80, 96), (120, 100)][i % 3]
        n = int(rng.integers(1, 5))
        gt = [_ellipse(rng, h, w) for _ in range(n)]
        labels = rng.integers(0, num_classes, n)
        crowd = np.zeros(n, dtype=np.int64)
        if i == 1:
            crowd[0] = 1
        pm, pl = [], []
        for m, lab in zip(gt, labels):
            if rng.random() < 0.8:  # a shifted copy, sometimes with the wrong class
                pm.append(np.roll(m, tuple(rng.integers(-4, 5, 2)), axis=(0, 1)))
                pl.append(lab if rng.random() < 0.85 else (lab + 1) % num_classes)
        for _ in range(int(rng.integers(0, 3)) if pm else int(rng.integers(1, 3))):  # false positives
            pm.append(_ellipse(rng, h, w))
            pl.append(int(rng.integers(0, num_classes)))
        targets.append(
            {
                "masks": torch.from_numpy(np.stack(gt)),
                "labels": torch.from_numpy(labels),
                "iscrowd": torch.from_numpy(crowd),
            }
        )
        preds.append(
            {
                "masks": torch.from_numpy(np.stack(pm)),
                "labels": torch.tensor(pl, dtype=torch.int64),
                "scores": torch.from_numpy(rng.uniform(0.05, 1, len(pm)).astype(np.float32)),
            }
        )
    return preds, targets


def test_matches_torchmetrics_segm_on_random_blobs():
    detection = pytest.importorskip("torchmetrics.detection")
    # torchmetrics drops images without any target / prediction mask from its COCO sets in segm mode, so every
    # image here has at least one of each (our class keeps such images, as COCO does).
    preds, targets = _random_blobs()
    try:
        tm = detection.MeanAveragePrecision(iou_type="segm", backend="pycocotools", class_metrics=True)
        tm.update(preds, targets)
        expected = tm.compute()
    except (ImportError, ModuleNotFoundError, RuntimeError) as err:  # pragma: no cover - depends on the install
        pytest.skip(f"torchmetrics MeanAveragePrecision(iou_type='segm') unusable here: {err}")
    metric = MaskAP()
    metric.update(preds[:3], targets[:3])
    metric.update(preds[3:], targets[3:])
    r = metric.compute()
    assert 0 < r["map"] < 1
    assert r["classes"] == expected["classes"].tolist()
    for k in [*STAT_KEYS, "map_per_class", "mar_100_per_class"]:
        ours = torch.tensor(_nan_to_minus_one(np.atleast_1d(r[k]).tolist()), dtype=torch.float32)
        torch.testing.assert_close(ours, expected[k].reshape(-1).float(), atol=1e-6, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------- edge cases
def _empty_pred(h: int, w: int, with_masks: bool = True) -> dict:
    d = {"labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    if with_masks:
        d["masks"] = torch.zeros(0, h, w, dtype=torch.bool)
    return d


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_no_predictions_gives_zero_ap(iou_type):
    _, targets = _hand_case()
    metric = MaskAP(iou_type=iou_type)
    metric.update([_empty_pred(20, 24), _empty_pred(16, 16, with_masks=False), _empty_pred(12, 10)], _to_torch(targets))
    r = metric.compute()
    assert r["map"] == 0.0 and r["map_50"] == 0.0 and r["mar_100"] == 0.0
    assert r["map_per_class"] == [0.0, 0.0] and r["classes"] == [1, 2]
    assert math.isnan(r["map_large"])  # no target in that area range


def test_no_targets_gives_nan():
    preds, targets = _hand_case()
    no_targets = [{"masks": t["masks"][:0], "labels": t["labels"][:0]} for t in targets]
    metric = MaskAP()
    metric.update(preds, no_targets)
    r = metric.compute()
    assert all(math.isnan(r[k]) for k in STAT_KEYS)
    assert r["classes"] == [1, 2] and all(math.isnan(v) for v in r["map_per_class"])


def test_nothing_updated_and_reset():
    metric = MaskAP(iou_type=["segm", "bbox"])
    r = metric.compute()
    assert all(math.isnan(r[f"{t}_{k}"]) for t in ("segm", "bbox") for k in STAT_KEYS)
    assert r["classes"] == [] and r["segm_map_per_class"] == []
    preds, targets = _hand_case()
    metric.update(preds, targets)
    assert len(metric) == 3 and not math.isnan(metric.compute()["segm_map"])
    metric.reset()
    assert len(metric) == 0 and math.isnan(metric.compute()["bbox_map"])
    # images but no instance anywhere; an empty float mask array is accepted
    empty_target = {"masks": torch.zeros(0, 4, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    metric.update([_empty_pred(4, 4)], [empty_target])
    assert math.isnan(metric.compute()["segm_map"])


def test_masks_are_stored_run_length_encoded():
    preds, targets = _hand_case()
    metric = MaskAP()
    metric.update(preds, targets)
    img = metric._images[0]
    assert all(isinstance(r, dict) and isinstance(r["counts"], bytes) for r in img.gt_rles + img.dt_rles)
    assert (img.height, img.width) == (20, 24) and img.gt_area == [48.0, 80.0, 64.0]


def test_given_area_max_dets_and_class_names():
    preds, targets = _hand_case()
    targets[1]["area"] = np.array([64.0, 2000.0])  # the missed class-1 target now counts as "medium"
    metric = MaskAP(class_names={1: "cat", 2: "dog"}, max_dets=(1, 2))
    metric.update(preds, targets)
    r = metric.compute()
    assert r["class_names"] == ["cat", "dog"] and "mar_2_per_class" in r and "mar_100" not in r
    assert r["mar_medium"] == 0.0 and r["mar_1"] <= r["mar_2"]
    with pytest.raises(ValueError, match="class_names"):
        MaskAP(class_names=["bg", "cat"]).update(preds, targets)  # label 2 has no name


def test_verbose_logs_summary(caplog):
    preds, targets = _hand_case()
    metric = MaskAP(verbose=True)
    metric.update(preds, targets)
    with caplog.at_level(logging.INFO, logger="maskworks.metrics.coco"):
        metric.compute()
    out = caplog.text
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out


# ---------------------------------------------------------------------------------------------- validation
def _one_image(**overrides):
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[0, :4, :4] = m[1, 4:, 4:] = True
    pred = {"masks": m, "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.8])}
    target = {"masks": m.clone(), "labels": torch.tensor([0, 1])}
    for key, value in overrides.items():
        side, name = key.split("__")
        (pred if side == "pred" else target)[name] = value
    return [pred], [target]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"pred__masks": torch.zeros(3, 8, 8, dtype=torch.bool)},
            r"preds\[0\]\['masks'\] must have shape \(N, H, W\) with N=2",
        ),
        ({"target__masks": torch.zeros(8, 8, dtype=torch.bool)}, r"targets\[0\]\['masks'\] must have shape"),
        ({"pred__scores": torch.tensor([0.9])}, r"preds\[0\]\['scores'\] must have shape \(2,\)"),
        ({"target__labels": torch.tensor([[0, 1]])}, r"targets\[0\]\['labels'\] must have shape \(N,\)"),
        ({"target__iscrowd": torch.tensor([0])}, r"'iscrowd'\] must have shape \(2,\)"),
        ({"pred__masks": torch.zeros(2, 8, 9, dtype=torch.bool)}, r"same image size"),
        ({"pred__boxes": torch.zeros(2, 3)}, r"preds\[0\]\['boxes'\] must have shape \(N, 4\)"),
    ],
)
def test_bad_shapes_raise_value_error(overrides, match):
    metric = MaskAP(iou_type=("segm", "bbox"))
    preds, targets = _one_image(**overrides)
    with pytest.raises(ValueError, match=match):
        metric.update(preds, targets)
    assert len(metric) == 0  # nothing from a rejected batch is kept


def test_other_input_errors():
    metric = MaskAP()
    preds, targets = _one_image()
    with pytest.raises(ValueError, match="one dict per image"):
        metric.update(preds, targets + targets)
    with pytest.raises(ValueError, match="has no 'scores'"):
        metric.update([{k: v for k, v in preds[0].items() if k != "scores"}], targets)
    with pytest.raises(TypeError, match="threshold soft masks"):
        metric.update(*_one_image(pred__masks=torch.rand(2, 8, 8)))
    with pytest.raises(TypeError, match="integer class ids"):
        metric.update(*_one_image(pred__labels=torch.tensor([0.0, 1.0])))
    with pytest.raises(TypeError, match="list of dicts"):
        metric.update(preds[0], targets[0])
    with pytest.raises(ValueError, match="iou_type"):
        MaskAP(iou_type="mask")
    with pytest.raises(ValueError, match="max_dets"):
        MaskAP(max_dets=(10, 1))


def test_module_imports_without_pycocotools(monkeypatch):
    for name in ("pycocotools", "pycocotools.mask", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import pycocotools...` raise ImportError
    spec = importlib.util.find_spec("maskworks.metrics.coco")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a fresh copy of the module imports fine
    with pytest.raises(ImportError, match=r'pip install "maskworks\[coco\]"'):
        module.MaskAP()
