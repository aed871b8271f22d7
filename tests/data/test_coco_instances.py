"""CocoInstances on a tiny hand-written COCO file: decoding (polygon, uncompressed and compressed RLE), labels,
crowd flags, empty images, errors, transforms, the results writer (AP = 1 on the ground truth) and mask_to_polygons."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks.data import build_transforms
from maskworks.data.coco import CocoInstances, coco_layout, coco_results, mask_to_polygons, write_coco_results
from maskworks.data.io import DatasetError, finalize_instances, masks_to_boxes, raw_sample

mask_utils = pytest.importorskip("pycocotools.mask")

# image id -> (file name, height, width); listed in the JSON out of id order on purpose
IMAGES = {9: ("sub/b.png", 8, 8), 5: ("a.png", 10, 12), 11: ("c.png", 6, 6)}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE written by hand: column-major runs, starting with a (possibly empty) run of zeros."""
    flat = mask.T.reshape(-1).astype(int).tolist()
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _box(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[rows, cols] = True
    return m


# The expected masks, by annotation id.
EXPECTED = {
    1: _box(10, 12, slice(3, 6), slice(2, 7)),  # polygon (2,3)-(7,6) in pixel-edge coordinates: rows 3-5, cols 2-6
    2: _box(10, 12, slice(0, 2), slice(8, 12)),  # uncompressed RLE
    3: _box(10, 12, slice(7, 10), slice(0, 4)),  # crowd, uncompressed RLE
    4: _box(8, 8, slice(1, 7), slice(1, 7)),  # compressed RLE
    5: _box(8, 8, slice(3, 5), slice(3, 5)),  # polygon on top of annotation 4 (smaller: painted over it)
}


def _annotations() -> list[dict]:
    compressed = mask_utils.encode(np.asfortranarray(EXPECTED[4].astype(np.uint8)))
    segs = {
        1: [[2, 3, 7, 3, 7, 6, 2, 6]],
        2: _uncompressed_rle(EXPECTED[2]),
        3: _uncompressed_rle(EXPECTED[3]),
        4: {"size": [8, 8], "counts": compressed["counts"].decode("ascii")},
        5: [[3.0, 3.0, 5.0, 3.0, 5.0, 5.0, 3.0, 5.0]],
    }
    meta = {1: (5, 3, 0), 2: (5, 7, 0), 3: (5, 3, 1), 4: (9, 7, 0), 5: (9, 3, 0)}  # image, category, iscrowd
    anns = []
    for ann_id, (image_id, cat, crowd) in meta.items():
        rle = mask_utils.encode(np.asfortranarray(EXPECTED[ann_id].astype(np.uint8)))
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat,
                "iscrowd": crowd,
                "segmentation": segs[ann_id],
                "area": float(EXPECTED[ann_id].sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            }
        )
    return anns


def _coco_dict() -> dict:
    return {
        "info": {"description": "maskworks test"},
        "images": [{"id": k, "file_name": f, "height": h, "width": w} for k, (f, h, w) in IMAGES.items()],
        "annotations": _annotations(),
        "categories": [{"id": 7, "name": "dog", "supercategory": "animal"}, {"id": 3, "name": "cat"}],
    }


def _write(root: Path, data: dict | str, name: str = "ann.json") -> Path:
    path = root / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for file_name, h, w in IMAGES.values():
        (tmp_path / file_name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / file_name)
    _write(tmp_path, _coco_dict())
    return tmp_path


def _dataset(root: Path, **kwargs) -> CocoInstances:
    return CocoInstances(root, annotation_file=root / "ann.json", **kwargs)


def test_decoding_labels_and_crowd(coco_root):
    ds = _dataset(coco_root)
    assert len(ds) == 3 and ds.image_ids == [5, 9, 11]
    assert ds.num_classes == 3 and ds.class_names == ["background", "cat", "dog"]
    assert ds.category_ids == [None, 3, 7] and ds.label_to_category(1) == 3 and ds.label_to_category(2) == 7
    assert ds.in_channels == 3 and len(ds.palette) == 3 and len(ds.mean) == len(ds.std) == 3
    with pytest.raises(ValueError, match="background"):
        ds.label_to_category(0)

    s = ds[0]  # image 5: polygon (cat), uncompressed RLE (dog), crowd (cat)
    inst = s["instances"]
    assert s["image"].shape == (3, 10, 12) and s["meta"]["image_id"] == 5 and s["meta"]["orig_size"] == (10, 12)
    assert s["meta"]["file"].endswith("a.png") and s["meta"]["index"] == 0
    assert inst["masks"].dtype == torch.bool and inst["masks"].shape == (3, 10, 12)
    assert inst["labels"].dtype == torch.int64 and inst["labels"].tolist() == [1, 2, 1]
    assert inst["iscrowd"].dtype == torch.int64 and inst["iscrowd"].tolist() == [0, 0, 1]
    assert inst["boxes"].dtype == torch.float32
    for k, ann_id in enumerate((1, 2, 3)):
        assert np.array_equal(inst["masks"][k].numpy(), EXPECTED[ann_id]), ann_id
    # hand-checked: the polygon rectangle (2,3)-(7,6) covers rows 3..5 and columns 2..6, box [2, 3, 7, 6]
    assert inst["boxes"].tolist() == [[2, 3, 7, 6], [8, 0, 12, 2], [0, 7, 4, 10]]
    expected_mask = np.zeros((10, 12), dtype=np.int64)
    expected_mask[EXPECTED[3]] = 255  # crowd region = ignore
    expected_mask[EXPECTED[1]] = 1
    expected_mask[EXPECTED[2]] = 2
    assert np.array_equal(s["mask"].numpy(), expected_mask)

    s = ds[-2]  # image 9 (subfolder file name): compressed RLE (dog) with a smaller polygon (cat) on it
    assert s["meta"]["image_id"] == 9 and s["meta"]["index"] == 1
    assert np.array_equal(s["instances"]["masks"][0].numpy(), EXPECTED[4])
    assert np.array_equal(s["instances"]["masks"][1].numpy(), EXPECTED[5])
    semantic = np.where(EXPECTED[5], 1, np.where(EXPECTED[4], 2, 0))  # the smaller instance stays on top
    assert np.array_equal(s["mask"].numpy(), semantic)

    s = ds[2]  # image 11: no annotation
    assert s["instances"]["boxes"].shape == (0, 4) and s["instances"]["labels"].shape == (0,)
    assert s["instances"]["masks"].shape == (0, 6, 6) and s["instances"]["iscrowd"].shape == (0,)
    assert (s["mask"] == 0).all()


def test_skip_empty_and_min_area(coco_root):
    ds = _dataset(coco_root, skip_empty=True)
    assert ds.image_ids == [5, 9] and len(ds) == 2
    (coco_root / "c.png").unlink()  # an image left out by skip_empty need not exist
    assert len(_dataset(coco_root, skip_empty=True)) == 2
    ds = _dataset(coco_root, skip_empty=True, min_area=5)  # drops annotation 5 (4 pixels)
    assert [a["id"] for a in ds.annotations(1)] == [4]
    assert ds[1]["instances"]["labels"].tolist() == [2]


def test_layouts(coco_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco2017")
    (root / "annotations").mkdir()
    (root / "images" / "val2017").mkdir(parents=True)
    data = _coco_dict()
    data["images"] = [im for im in data["images"] if im["id"] == 11]
    data["annotations"] = []
    _write(root / "annotations", data, "instances_val2017.json")
    Image.open(coco_root / "c.png").save(root / "images" / "val2017" / "c.png")
    assert coco_layout(root, "val") == (root / "images" / "val2017", root / "annotations" / "instances_val2017.json")
    assert len(CocoInstances(root, split="val")) == len(CocoInstances(root, split="val2017")) == 1
    with pytest.raises(DatasetError, match=r"instances_train\.json.*instances_train2017\.json"):
        CocoInstances(root, split="train")


def test_results_of_the_ground_truth_give_ap_1(coco_root, tmp_path):
    from pycocotools.cocoeval import COCOeval

    ds = _dataset(coco_root)
    predictions = []
    for i in range(len(ds)):
        inst = ds[i]["instances"]
        keep = inst["iscrowd"] == 0
        predictions.append(
            {
                "boxes": inst["boxes"][keep],
                "labels": inst["labels"][keep],
                "masks": inst["masks"][keep],
                "scores": torch.ones(int(keep.sum())),
            }
        )
    results = ds.to_coco_results(predictions)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(5, 3), (5, 7), (9, 7), (9, 3)]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert results[0]["bbox"] == [2.0, 3.0, 5.0, 3.0] and results[0]["score"] == 1.0
    # the free function with explicit ids gives the same, and boxes default to the masks' boxes
    no_boxes = [{k: v for k, v in p.items() if k != "boxes"} for p in predictions]
    assert coco_results(no_boxes, ds.image_ids, ds.category_ids) == results
    path = write_coco_results(results, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == results
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ds.coco.loadRes(str(path))
        for iou_type in ("segm", "bbox"):
            ev = COCOeval(ds.coco, detections, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == pytest.approx(1.0, abs=1e-6), iou_type
            assert ev.stats[1] == pytest.approx(1.0, abs=1e-6), iou_type
    with pytest.raises(ValueError, match="label 0"):
        coco_results([{**predictions[0], "labels": torch.zeros(2, dtype=torch.int64)}], [5], ds.category_ids)
    with pytest.raises(ValueError, match="original image size"):
        ds.to_coco_results([{**predictions[0], "masks": predictions[0]["masks"][:, :5]}])


def _broken(coco_root: Path, edit) -> Path:
    data = _coco_dict()
    edit(data)
    return _write(coco_root, data, "broken.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("categories"), r"missing key\(s\) \['categories'\]"),
        (lambda d: d["annotations"][1].update(category_id=99), r"unknown category_id 99"),
        (lambda d: d["annotations"][1].update(image_id=1234), r"unknown image_id 1234"),
        (lambda d: d["annotations"][0].update(segmentation=[[2, 3, 20, 3, 20, 6]]), r"outside the image"),
        (lambda d: d["annotations"][0].update(segmentation=[[2, 3, 7, 3]]), r"has 4 coordinates.*at least 3 points"),
        (lambda d: d["annotations"][3]["segmentation"].update(size=[9, 8]), r"RLE size 9x8 \(HxW\).*8x8"),
        (lambda d: d["annotations"][1]["segmentation"]["counts"].append(3), r"RLE runs summing to 123"),
        (lambda d: d["annotations"].append({**d["annotations"][0]}), r"annotation id 1 appears twice"),
    ],
)
def test_bad_annotation_files_name_the_file(coco_root, edit, message):
    path = _broken(coco_root, edit)
    with pytest.raises(DatasetError, match=message) as info:
        CocoInstances(coco_root, annotation_file=path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_malformed_json_names_file_and_position(coco_root):
    path = _write(coco_root, '{"images": [1, 2,\n  "annotations": }', "bad.json")
    with pytest.raises(DatasetError, match=r"bad\.json is not valid JSON: .* line 2 column \d+"):
        CocoInstances(coco_root, annotation_file=path)
    with pytest.raises(DatasetError, match=r"does not exist"):
        CocoInstances(coco_root, annotation_file=coco_root / "nothing.json")


def test_missing_image_file_and_size_mismatch(coco_root):
    (coco_root / "sub" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"image file .*sub/b\.png does not exist.*ann\.json"):
        _dataset(coco_root)
    Image.new("RGB", (8, 9)).save(coco_root / "sub" / "b.png")  # 9x8 (HxW) instead of 8x8
    ds = _dataset(coco_root)
    with pytest.raises(DatasetError, match=r"b\.png is 9x8 \(HxW\) but .*ann\.json says 8x8 \(image_id 9\)"):
        ds[1]


def test_iscrowd_travels_through_transforms(coco_root):
    ds = _dataset(coco_root, transform=build_transforms(train=True, crop_size=(6, 7), scale_range=(0.7, 1.6)))
    counts = set()
    for seed in range(30):
        torch.manual_seed(seed)
        s = ds[0]
        inst, mask = s["instances"], s["mask"]
        n = len(inst["labels"])
        counts.add(n)
        assert inst["masks"].shape == (n, 6, 7) and inst["boxes"].shape == (n, 4) and inst["iscrowd"].shape == (n,)
        assert torch.equal(inst["boxes"], masks_to_boxes(inst["masks"]))
        assert inst["masks"].flatten(1).any(1).all()
        for k in range(n):  # image 5 has no overlaps: each instance's pixels carry its label, or 255 when crowd
            want = 255 if inst["iscrowd"][k] else int(inst["labels"][k])
            assert (mask[inst["masks"][k]] == want).all(), seed
    assert len(counts) > 1, "the crops should drop instances in some draws"


def test_finalize_filters_iscrowd():
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[2, 3, 3] = True
    sample = raw_sample(
        np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)), {"labels": [1, 2, 3], "masks": masks, "iscrowd": [1, 0, 0]}
    )
    out = finalize_instances(sample["instances"])
    assert out["labels"].tolist() == [1, 3] and out["iscrowd"].tolist() == [1, 0]
    assert "iscrowd" not in finalize_instances({"labels": [1], "masks": sample["instances"]["masks"][:1]})
    with pytest.raises(ValueError, match="iscrowd"):
        finalize_instances({**sample["instances"], "iscrowd": torch.zeros(2)})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_mask_to_polygons_round_trip():
    h, w = 60, 70
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 30) ** 2 + (xx - 33) ** 2 <= 17.5**2
    two = disk.copy()
    two[2:5, 60:66] = True  # a second component
    for tolerance in (0.0, 0.25, 1.0):
        polys = mask_to_polygons(two, tolerance=tolerance)
        assert len(polys) == 2 and all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
        iou = (back & two).sum() / (back | two).sum()
        assert iou > (0.999 if tolerance <= 0.25 else 0.9), (tolerance, iou)
    rect = mask_to_polygons(torch.from_numpy(_box(8, 8, slice(2, 5), slice(1, 6))))
    assert len(rect) == 1 and sorted(zip(rect[0][0::2], rect[0][1::2]))[0] == (1.0, 2.5)  # pixel edges at 1 and 6
    xs, ys = rect[0][0::2], rect[0][1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (1.0, 6.0, 2.0, 5.0)
    assert len(mask_to_polygons(np.pad(np.ones((1, 1), bool), 2))[0]) == 8  # one pixel: a diamond
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []
    ring = disk & ~((yy - 30) ** 2 + (xx - 33) ** 2 <= 6**2)
    assert len(mask_to_polygons(ring)) == 1  # the hole is dropped (COCO polygons cannot hold holes)
