"""CocoPanoptic and write_coco_panoptic: the COCO panoptic layout written and read back losslessly (PQ exactly 1),
labels and crowd regions, layouts and overrides, one-line errors naming the file, transforms keep segments aligned."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks.data import (
    CocoPanoptic,
    DatasetError,
    build_transforms,
    id_to_rgb,
    instances_to_panoptic,
    read_id_png,
    rgb_to_id,
    save_id_png,
    write_coco_panoptic,
)
from maskworks.metrics import PanopticQuality

CATEGORIES = [
    {"id": 17, "name": "sky", "isthing": 0},
    {"id": 21, "name": "grass", "isthing": 0, "supercategory": "plant"},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 1, "name": "person", "isthing": 1},
]
# contiguous labels follow the sorted category ids: person 0, car 1, sky 2, grass 3
NAMES, ISTHING, CATEGORY_IDS = ["person", "car", "sky", "grass"], [True, True, False, False], [1, 3, 17, 21]
SKY, GRASS, CAR1, CAR2, CROWD, PERSON = 17_000, 21_000, 3 * 65536 + 1, 70_001, 1 * 65536 + 255, 300


def _items():
    rng = np.random.default_rng(0)
    a = np.zeros((12, 16), dtype=np.int64)
    a[:5] = SKY
    a[5:, 1:] = GRASS  # column 0 below the sky is void
    a[6:9, 2:6] = CAR1
    a[7:11, 9:14] = CAR2
    a[0:2, 12:16] = CROWD  # a crowd of persons in the sky
    b = np.full((8, 10), GRASS, dtype=np.int64)
    b[2:5, 3:6] = PERSON
    return [
        {
            "file_name": "a.png",
            "image_id": 5,
            "panoptic_seg": a,
            "image": rng.integers(0, 255, (12, 16, 3), dtype=np.uint8),
            "segments_info": [
                {"id": SKY, "category_id": 17},
                {"id": GRASS, "category_id": 21},
                {"id": CAR1, "category_id": 3},
                {"id": CAR2, "category_id": 3},
                {"id": CROWD, "category_id": 1, "iscrowd": 1},
            ],
        },
        {
            "file_name": "sub/b.png",
            "image_id": 2,
            "panoptic_seg": b,
            "image": rng.integers(0, 255, (8, 10, 3), dtype=np.uint8),
            "segments_info": [{"id": PERSON, "category_id": 1}, {"id": GRASS, "category_id": 21}],
        },
    ]


@pytest.fixture
def root(tmp_path):
    write_coco_panoptic(tmp_path / "coco", _items(), CATEGORIES)
    return tmp_path / "coco"


def test_rgb_id_conversions_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 256**3 - 1, 1234567]], dtype=np.int64)
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[1, 1].tolist() == [0, 0, 1] and rgb[0, 3].tolist() == [0, 1, 0]
    assert np.array_equal(rgb_to_id(rgb), ids)
    assert np.array_equal(id_to_rgb(torch.from_numpy(ids)), rgb)
    for bad in (np.array([[-1]]), np.array([[256**3]])):
        with pytest.raises(ValueError, match="fit an RGB PNG"):
            id_to_rgb(bad)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        rgb_to_id(np.zeros((2, 2)))


def test_write_then_read_is_lossless_and_scores_pq_one(root):
    items = _items()
    ds = CocoPanoptic(root, split="val")
    assert ds.class_names == NAMES and ds.isthing == ISTHING and ds.category_ids == CATEGORY_IDS
    assert ds.thing_classes == [0, 1] and ds.num_classes == 4 and len(ds) == 2
    assert ds.image_ids == [2, 5]  # sorted image ids
    assert ds.categories[3] == {"id": 21, "name": "grass", "isthing": 0, "supercategory": "plant"}
    pq = PanopticQuality(things=[0, 1], stuffs=[2, 3])
    for i, item in zip((1, 0), items):
        raw = ds.load_raw(i)
        assert np.array_equal(raw["image"].permute(1, 2, 0).numpy(), item["image"])  # the image, losslessly
        sample = ds[i]
        inst = sample["instances"]
        # the map comes back exactly: every pixel of segment j carries the written id of segment j
        written_ids = [s["id"] for s in item["segments_info"]]
        back = torch.zeros(item["panoptic_seg"].shape, dtype=torch.int64)
        for j, sid in enumerate(written_ids):
            back[inst["masks"][j]] = sid
        assert np.array_equal(back.numpy(), item["panoptic_seg"])
        assert np.array_equal(read_id_png(sample["meta"]["png"]), item["panoptic_seg"])
        labels = [CATEGORY_IDS.index(s["category_id"]) for s in item["segments_info"]]
        assert inst["labels"].tolist() == labels
        assert inst["iscrowd"].tolist() == [s.get("iscrowd", 0) for s in item["segments_info"]]
        assert inst["isthing"].tolist() == [ISTHING[c] for c in labels]
        for j in range(len(labels)):  # tight xyxy boxes
            ys, xs = np.nonzero(item["panoptic_seg"] == written_ids[j])
            assert inst["boxes"][j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        # semantic: labels everywhere a segment is (crowd pixels keep their class), 255 on void
        lut = {0: 255, **{s["id"]: c for s, c in zip(item["segments_info"], labels)}}
        expected = np.vectorize(lut.get)(item["panoptic_seg"])
        assert np.array_equal(sample["mask"].numpy(), expected)
        meta = sample["meta"]
        assert meta["image_id"] == item["image_id"] and meta["file"].endswith(item["file_name"])
        assert meta["class_names"] == NAMES and meta["isthing"] == ISTHING and meta["category_ids"] == CATEGORY_IDS
        # the written maps and segments as predictions against what was read: PQ exactly 1
        pred = [{"id": s["id"], "category_id": CATEGORY_IDS.index(s["category_id"])} for s in item["segments_info"]]
        gt_map, gt_segments = instances_to_panoptic(inst, sample["mask"], ISTHING)
        pq.update_segments(torch.from_numpy(item["panoptic_seg"]), pred, gt_map, gt_segments)
    r = pq.compute()
    assert r["pq"] == r["sq"] == r["rq"] == 1.0 and r["pq_things"] == r["pq_stuff"] == 1.0
    assert r["tp"] == 6 and r["fp"] == r["fn"] == 0  # the crowd is neither matched nor missed


def test_json_segments_carry_area_and_coco_boxes(root):
    data = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    assert {c["id"]: c["isthing"] for c in data["categories"]} == {17: 0, 21: 0, 3: 1, 1: 1}
    ann = next(a for a in data["annotations"] if a["image_id"] == 5)
    assert ann["file_name"] == "a.png"
    car = next(s for s in ann["segments_info"] if s["id"] == CAR1)
    assert car == {"id": CAR1, "category_id": 3, "iscrowd": 0, "area": 12, "bbox": [2, 6, 4, 3]}
    assert next(s for s in ann["segments_info"] if s["id"] == CROWD)["iscrowd"] == 1
    b = next(a for a in data["annotations"] if a["image_id"] == 2)
    assert b["file_name"] == "sub/b.png" and (root / "annotations" / "panoptic_val2017" / "sub" / "b.png").is_file()
    assert data["images"][1] == {"id": 2, "file_name": "sub/b.png", "height": 8, "width": 10}


def test_layouts_and_explicit_files(root, tmp_path):
    assert CocoPanoptic(root, split="val2017").image_ids == [2, 5]
    other = tmp_path / "elsewhere"
    shutil.copytree(root / "val2017", other / "pics")
    shutil.copytree(root / "annotations" / "panoptic_val2017", other / "pngs")
    shutil.copy(root / "annotations" / "panoptic_val2017.json", other / "pan.json")
    ds = CocoPanoptic(other, ann_file="pan.json", png_dir="pngs", image_dir="pics")
    assert len(ds) == 2 and ds.png_dir == other / "pngs"
    assert torch.equal(ds[0]["mask"], CocoPanoptic(root, split="val")[0]["mask"])
    shutil.move(str(root / "val2017"), str(root / "images" / "val2017"))  # root/images/<split>/ is found too
    assert len(CocoPanoptic(root, split="val")) == 2
    with pytest.raises(DatasetError, match=r"no annotation file .*panoptic_train\.json or .*panoptic_train2017\.json"):
        CocoPanoptic(root, split="train")
    shutil.rmtree(root / "annotations" / "panoptic_val2017")
    with pytest.raises(DatasetError, match="no PNG folder .*panoptic_val2017"):
        CocoPanoptic(root, split="val")


def _edit_json(root, edit):
    path = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][0]["segments_info"][0].update(category_id=99), "unknown category_id 99"),
        (lambda d: d["categories"][0].pop("isthing"), "'isthing': 0 or 1"),
        (lambda d: d["annotations"][0]["segments_info"].append({"id": SKY, "category_id": 17}), "appears twice"),
        (lambda d: d["annotations"][0].update(image_id=77), "unknown image_id"),
        (lambda d: d.pop("categories"), r"missing key\(s\) \['categories'\]"),
        (lambda d: d["annotations"][0]["segments_info"][0].update(iscrowd=2), "iscrowd=2"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "has two annotations"),
    ],
)
def test_bad_annotation_files_name_the_file(root, edit, message):
    path = _edit_json(root, edit)
    with pytest.raises(DatasetError, match=message) as err:
        CocoPanoptic(root, split="val")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_files_and_unlisted_ids_name_the_file(root):
    png = root / "annotations" / "panoptic_val2017" / "a.png"
    ids = read_id_png(png)
    ids[0, 0] = 4242  # an id segments_info does not list
    save_id_png(ids, png)
    ds = CocoPanoptic(root, split="val")
    with pytest.raises(DatasetError, match=r"a\.png holds segment id\(s\) \[4242\] that segments_info of image_id 5"):
        ds[1]
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(png)
    with pytest.raises(DatasetError, match="has image mode 'L'; expected an RGB PNG"):
        ds[1]
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(png)
    with pytest.raises(DatasetError, match=r"a\.png is 5x5 \(HxW\) but its image .* is 12x16"):
        ds[1]
    png.unlink()
    with pytest.raises(DatasetError, match=r"panoptic PNG file .*a\.png does not exist .*listed in"):
        CocoPanoptic(root, split="val")
    (root / "annotations" / "panoptic_val2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        CocoPanoptic(root, split="val")


def test_writer_refuses_inconsistent_items(tmp_path):
    item = _items()[1]
    for edit, message in (
        (lambda it: it["segments_info"].pop(), "not in its segments_info"),
        (lambda it: it["segments_info"].append({"id": 9, "category_id": 17}), "listed but have no pixel"),
        (lambda it: it["segments_info"][0].update(category_id=2), "not in categories"),
    ):
        bad = {**item, "segments_info": [dict(s) for s in item["segments_info"]]}
        edit(bad)
        with pytest.raises(ValueError, match=message):
            write_coco_panoptic(tmp_path, [bad], CATEGORIES)


def test_transforms_keep_segments_isthing_and_crowd_aligned(root):
    ds = CocoPanoptic(root, split="val", transform=build_transforms(train=True, crop_size=6, scale_range=None))
    counts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        s = ds[1]
        inst = s["instances"]
        n = len(inst["labels"])
        counts.add(n)
        assert inst["masks"].shape == (n, 6, 6) and inst["masks"].flatten(1).any(1).all()
        assert inst["isthing"].tolist() == [ISTHING[c] for c in inst["labels"].tolist()]
        crowd = inst["iscrowd"].bool()
        assert (inst["labels"][crowd] == 0).all()  # only the person crowd is a crowd
        covered = inst["masks"].any(0)
        assert ((s["mask"] == 255) == ~covered).all()  # void is exactly what no segment covers
    assert len(counts) > 1  # crops drop segments


def test_cli_reads_coco_panoptic(root):
    from maskworks.cli import builders
    from maskworks.cli.config import apply_overrides, check_config, load_config

    cfg = check_config(apply_overrides(load_config(None), ["data.name=coco_panoptic", f"data.root={root}"]))
    ds = builders.build_split(cfg["data"], "val")
    assert isinstance(ds, CocoPanoptic) and len(ds) == 2
    assert builders.task_kwargs("panoptic", ds) == {"class_names": NAMES, "isthing": ISTHING,
                                                    "category_ids": CATEGORY_IDS}  # fmt: skip
    assert builders.default_data_root("coco_panoptic").name == "coco"
