"""Pascal VOC, Cityscapes, ADE20K and COCO-Stuff readers on tiny fake trees in each official layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks.data import (
    ADE20K,
    Cityscapes,
    CocoStuff,
    DatasetError,
    VOCSegmentation,
    default_palette,
    validate_dataset,
)
from maskworks.data.palette import (
    CITYSCAPES_LABELS,
    COCOSTUFF_LABELS,
    COCOSTUFF_UNUSED,
    VOC_BORDER_COLOR,
    VOC_PALETTE,
)

H, W = 16, 24
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _image(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """An 8-bit label PNG: grayscale, or a palette PNG with the VOC colours (as VOC ships them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")  # keeps the values as palette indices
        img.putpalette([c for color in default_palette(256) for c in color])
    img.save(path)


def _blocks(*values: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A label map of vertical stripes, one per value, left to right (column 0 holds values[0])."""
    out = np.zeros(size, dtype=np.int64)
    for i, chunk in enumerate(np.array_split(np.arange(size[1]), len(values))):
        out[:, chunk] = values[i]
    return out


def _column_of(n: int, k: int, width: int = W) -> int:
    """A column inside stripe k of n stripes."""
    return int(np.array_split(np.arange(width), n)[k][0])


# ----------------------------------------------------------------------------- Pascal VOC
VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039"], ["2007_000063"]


def _voc_tree(tmp_path: Path) -> Path:
    """tmp/VOCdevkit/VOC2012 with 2 train and 1 val images; labels: background, person (15), border (255)."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for k, image_id in enumerate(VOC_TRAIN + VOC_VAL):
        _image(voc / "JPEGImages" / f"{image_id}.jpg", k)
        _label(voc / "SegmentationClass" / f"{image_id}.png", _blocks(0, 15, 255, 12 + k), palette=True)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sets / "trainval.txt").write_text("\n".join(VOC_TRAIN + VOC_VAL) + "\n\n")
    return voc


def test_voc_classes_ids_and_border(tmp_path):
    voc = _voc_tree(tmp_path)
    train = VOCSegmentation(tmp_path / "VOCdevkit", split="train")
    assert len(train) == 2 and train.num_classes == 21 and train.in_channels == 3
    assert train.class_names[0] == "background" and train.class_names[15] == "person"
    assert train.class_names[20] == "tvmonitor" and len(train.palette) == 21
    assert tuple(train.mean) == IMAGENET_MEAN
    s = train[1]
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    mask = s["mask"]
    assert mask.shape == (H, W) and mask.dtype == torch.int64
    assert mask[3, _column_of(4, 0)] == 0 and mask[3, _column_of(4, 1)] == 15
    assert mask[3, _column_of(4, 2)] == 255, "the VOC border (palette index 255) is ignored"
    assert mask[3, _column_of(4, 3)] == 13
    assert s["meta"]["file"].endswith("2007_000039.jpg")
    # every accepted root spelling finds the same VOC2012 folder
    for root in (voc, tmp_path):
        assert VOCSegmentation(root, split="val").root == voc.resolve()
    assert len(VOCSegmentation(voc, split="trainval")) == 3
    validate_dataset(VOCSegmentation(voc, split="trainval"), progress=False)


def test_voc_palette_is_the_bit_interleaved_colour_map(tmp_path):
    assert VOC_PALETTE[:5] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128))
    assert VOC_PALETTE[15] == (192, 128, 128) and VOC_PALETTE[20] == (0, 64, 128)
    assert VOC_BORDER_COLOR == (224, 224, 192)
    # a label PNG saved as RGB colours reads to the same ids (the border colour -> 255)
    voc = _voc_tree(tmp_path)
    label = voc / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"
    expected = VOCSegmentation(voc, split="train")[0]["mask"]
    Image.open(label).convert("RGB").save(label)
    assert torch.equal(VOCSegmentation(voc, split="train")[0]["mask"], expected)


def test_voc_train_aug_from_list_file(tmp_path):
    voc = _voc_tree(tmp_path)
    extra = "2008_000002"  # an SBD image: its label only exists in SegmentationClassAug
    _image(voc / "JPEGImages" / f"{extra}.jpg", 7)
    _label(voc / "SegmentationClassAug" / f"{extra}.png", _blocks(0, 3))  # grayscale, as DeepLab ships it
    _label(voc / "SegmentationClassAug" / f"{VOC_TRAIN[0]}.png", _blocks(5, 5))
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train_aug.txt").write_text(f"{VOC_TRAIN[0]}\n{VOC_TRAIN[1]}\n{extra}\n")
    ds = VOCSegmentation(voc, split="train_aug")
    assert [p.stem for p, _ in ds.pairs] == [VOC_TRAIN[0], VOC_TRAIN[1], extra]
    assert [p.parent.name for _, p in ds.pairs] == ["SegmentationClassAug", "SegmentationClass", "SegmentationClassAug"]
    assert set(ds[0]["mask"].unique().tolist()) == {5}
    assert ds[2]["mask"][0, _column_of(2, 1)] == 3
    # deeplab-pytorch's list: its own folder, path pairs
    (sets / "train_aug.txt").unlink()
    aug_list = voc / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    aug_list.parent.mkdir()
    aug_list.write_text(f"/JPEGImages/{extra}.jpg /SegmentationClassAug/{extra}.png\n")
    assert VOCSegmentation(voc, split="train_aug").pairs == [
        (voc.resolve() / "JPEGImages" / f"{extra}.jpg", voc.resolve() / "SegmentationClassAug" / f"{extra}.png")
    ]
    # a listed id whose label is nowhere: the message names the path expected
    (sets / "trainaug.txt").write_text("2008_000002\n2009_000001\n")  # mmsegmentation's name, found first
    _image(voc / "JPEGImages" / "2009_000001.jpg", 8)
    with pytest.raises(
        DatasetError, match=r"trainaug.txt lists 1 file.*SegmentationClassAug/2009_000001.png \(label\)"
    ):
        VOCSegmentation(voc, split="train_aug")


def _sbd_tree(tmp_path: Path) -> Path:
    """SBD's benchmark_RELEASE/dataset: cls/*.mat labels (GTcls.Segmentation), img/, train.txt, val.txt."""
    from scipy.io import savemat

    dataset = tmp_path / "benchmark_RELEASE" / "dataset"
    (dataset / "cls").mkdir(parents=True)
    sbd_train, sbd_val = ["2008_000002", VOC_TRAIN[0]], ["2008_000003", VOC_VAL[0]]
    for k, image_id in enumerate(sbd_train + sbd_val):
        _image(dataset / "img" / f"{image_id}.jpg", 20 + k)
        seg = _blocks(0, 7 + k).astype(np.uint8)
        savemat(dataset / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": [7 + k]}})
    (dataset / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (dataset / "val.txt").write_text("\n".join(sbd_val) + "\n")
    return dataset


def test_voc_train_aug_from_sbd_mat_files(tmp_path):
    voc = _voc_tree(tmp_path)
    sbd = _sbd_tree(tmp_path)
    ds = VOCSegmentation(voc, split="train_aug", sbd_root=tmp_path / "benchmark_RELEASE")
    # (VOC train + SBD train + SBD val) - VOC val
    ids = [p.stem for p, _ in ds.pairs]
    assert ids == sorted({*VOC_TRAIN, "2008_000002", "2008_000003"})
    labels = {p.stem: p for _, p in ds.pairs}
    assert labels[VOC_TRAIN[0]].suffix == ".png", "an official VOC label wins over SBD's"
    assert labels["2008_000003"] == sbd.resolve() / "cls" / "2008_000003.mat"
    i = ids.index("2008_000003")
    mask = ds[i]["mask"]
    assert mask[0, _column_of(2, 0)] == 0 and mask[0, _column_of(2, 1)] == 9  # 7 + k with k = 2
    assert ds.pairs[i][0] == sbd.resolve() / "img" / "2008_000003.jpg", "SBD-only images come from img/"
    validate_dataset(ds, progress=False)
    assert VOCSegmentation(voc, split="train_aug", sbd_root=sbd).pairs == ds.pairs  # the dataset folder works too


def test_voc_bad_sbd_mat_is_reported(tmp_path):
    from scipy.io import savemat

    voc = _voc_tree(tmp_path)
    sbd = _sbd_tree(tmp_path)
    savemat(sbd / "cls" / "2008_000002.mat", {"GTinst": {"Segmentation": np.zeros((H, W), np.uint8)}})
    (sbd / "cls" / "2008_000003.mat").write_bytes(b"not a mat file")
    ds = VOCSegmentation(voc, split="train_aug", sbd_root=sbd)
    with pytest.raises(DatasetError) as err:
        validate_dataset(ds, progress=False)
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "2008_000002.mat holds ['GTinst']; expected a GTcls struct" in text
    assert "cannot read SBD label file" in text and "2008_000003.mat" in text


def test_voc_broken_trees(tmp_path):
    with pytest.raises(DatasetError, match=r"Pascal VOC not found at .*VOCdevkit/VOC2012/JPEGImages"):
        VOCSegmentation(tmp_path, split="train")
    voc = _voc_tree(tmp_path)
    with pytest.raises(
        DatasetError,
        match=r"split file .*Segmentation/test.txt not found; split files in .*: "
        r"train, trainval, val",
    ):
        VOCSegmentation(voc, split="test")
    with pytest.raises(DatasetError, match="train_aug.txt.*SegmentationClassAug.*sbd_root"):
        VOCSegmentation(voc, split="train_aug")
    with pytest.raises(DatasetError, match="VOC split must be"):
        VOCSegmentation(voc, split="../train")
    with pytest.raises(DatasetError, match=r"SBD not found at .*benchmark_RELEASE/dataset/cls"):
        VOCSegmentation(voc, split="train_aug", sbd_root=tmp_path / "nowhere")
    (voc / "SegmentationClass" / f"{VOC_TRAIN[1]}.png").unlink()
    with pytest.raises(DatasetError, match=rf"lists 1 file.*SegmentationClass/{VOC_TRAIN[1]}.png \(label\)"):
        VOCSegmentation(voc, split="train")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000063 a b\n")
    with pytest.raises(DatasetError, match=r"val.txt, line 1: '2007_000063 a b'; expected an image id"):
        VOCSegmentation(voc, split="val")


def test_voc_validate_lists_bad_label_and_size_mismatch(tmp_path):
    voc = _voc_tree(tmp_path)
    bad_value = voc / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"
    _label(bad_value, _blocks(0, 21), palette=True)  # 21 is not a VOC class
    _image(voc / "JPEGImages" / f"{VOC_VAL[0]}.jpg", 3, size=(H, W + 2))
    ds = VOCSegmentation(voc, split="trainval")
    with pytest.raises(DatasetError, match=r"label values \[21\] out of range"):
        ds[0]
    with pytest.raises(DatasetError) as err:
        validate_dataset(ds, progress=False)
    text = str(err.value)
    assert "2 problem(s) in 3 samples" in text and str(bad_value) in text
    assert f"{VOC_VAL[0]}.jpg is {H}x{W + 2} (HxW) but its mask" in text and "expected the same size" in text


# ----------------------------------------------------------------------------- Cityscapes
def _cityscapes_tree(tmp_path: Path, label_ids: dict[str, tuple[int, ...]], split: str = "train") -> Path:
    for k, (name, values) in enumerate(label_ids.items()):
        city = name.split("_")[0]
        _image(tmp_path / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", k)
        _label(tmp_path / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", _blocks(*values))
    return tmp_path


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = _cityscapes_tree(
        tmp_path,
        {
            "aachen_000000_000019": (7, 26, 0, 24, 33, 9),  # road, car, unlabeled, person, bicycle, parking
            "bochum_000000_000313": (8, 23, 255, 1, 29, 31),  # sidewalk, sky, 255, ego vehicle, caravan, train
        },
    )
    ds = Cityscapes(root, split="train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.class_names[13] == "car"
    assert ds.palette[0] == (128, 64, 128) and ds.palette[18] == (119, 11, 32)
    cols = [_column_of(6, k) for k in range(6)]
    assert [int(ds[0]["mask"][5, c]) for c in cols] == [0, 13, 255, 11, 18, 255]
    assert [int(ds[1]["mask"][5, c]) for c in cols] == [1, 10, 255, 255, 255, 16]
    assert ds[1]["meta"]["file"].endswith("bochum/bochum_000000_000313_leftImg8bit.png")
    validate_dataset(ds, progress=False)


def test_cityscapes_table_matches_torchvision():
    from torchvision.datasets import Cityscapes as TorchvisionCityscapes

    from maskworks.data.cityscapes import cityscapes_lut

    lut = cityscapes_lut()
    reference = {c.id: c.train_id for c in TorchvisionCityscapes.classes}
    assert {i: int(lut[i]) for i in range(34)} == {i: reference[i] for i in range(34)}
    assert lut[34:255].tolist() == [-1] * 221 and lut[255] == 255
    names = {c.train_id: c.name for c in TorchvisionCityscapes.classes if 0 <= c.train_id < 255}
    colors = {c.train_id: c.color for c in TorchvisionCityscapes.classes if 0 <= c.train_id < 255}
    ds_names = [label[2] for label in sorted((t, i, n) for i, t, n, _ in CITYSCAPES_LABELS if t != 255)]
    assert ds_names == [names[t] for t in range(19)] == Cityscapes.class_names
    assert Cityscapes.palette == [colors[t] for t in range(19)]


def test_cityscapes_train_id_files_and_broken_trees(tmp_path):
    root = _cityscapes_tree(tmp_path, {"aachen_000000_000019": (7, 26)}, split="val")
    train_ids = root / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    _label(train_ids, _blocks(18, 255))
    ds = Cityscapes(root, split="val", label_type="labelTrainIds")
    assert ds.pairs[0][1] == train_ids.resolve()
    assert [int(ds[0]["mask"][0, _column_of(2, k)]) for k in range(2)] == [18, 255]

    with pytest.raises(DatasetError, match=r"missing folder\(s\) .*leftImg8bit/train, .*gtFine/train"):
        Cityscapes(root, split="train")
    with pytest.raises(DatasetError, match="split must be one of train, val, test"):
        Cityscapes(root, split="train_extra")
    with pytest.raises(DatasetError, match="label_type must be one of labelIds, labelTrainIds"):
        Cityscapes(root, split="val", label_type="color")
    _image(root / "leftImg8bit" / "val" / "aachen" / "aachen_000001_000019_leftImg8bit.png", 5)
    with pytest.raises(
        DatasetError,
        match=r"1 of 2 image\(s\).*have no label file: aachen/aachen_000001_000019_"
        r"leftImg8bit.png \(expected .*/gtFine/val/aachen/aachen_000001_000019_gtFine_labelIds.png\)",
    ):
        Cityscapes(root, split="val")
    _label(root / "gtFine" / "val" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png", _blocks(7, 40))
    with pytest.raises(DatasetError) as err:
        validate_dataset(Cityscapes(root, split="val"), progress=False)
    assert "1 problem(s) in 2 samples" in str(err.value)
    assert "aachen_000001_000019_gtFine_labelIds.png: label values [40] out of range" in str(err.value)


# ----------------------------------------------------------------------------- ADE20K
def _ade_tree(tmp_path: Path) -> Path:
    ade = tmp_path / "ADEChallengeData2016"
    for sub, prefix, values in (("training", "ADE_train", (0, 1, 150, 13)), ("validation", "ADE_val", (3, 0))):
        for k in range(2):
            _image(ade / "images" / sub / f"{prefix}_0000000{k + 1}.jpg", k)
            _label(ade / "annotations" / sub / f"{prefix}_0000000{k + 1}.png", _blocks(*values))
    return ade


def test_ade20k_shifts_labels(tmp_path):
    ade = _ade_tree(tmp_path)
    train = ADE20K(tmp_path, split="train")
    assert train.root == ade.resolve() and len(train) == 2
    assert train.num_classes == len(train.class_names) == len(train.palette) == 150
    assert train.class_names[0] == "wall" and train.class_names[12] == "person" and train.class_names[149] == "flag"
    assert train.palette[0] == (120, 120, 120) and train.palette[2] == (6, 230, 230)
    mask = train[0]["mask"]
    assert [int(mask[2, _column_of(4, k)]) for k in range(4)] == [255, 0, 149, 12]
    val = ADE20K(ade, split="val")
    assert len(val) == 2 and val.pairs[0][0].parent.name == "validation"
    assert len(ADE20K(ade, split="validation")) == 2
    validate_dataset(val, progress=False)


def test_ade20k_broken_trees(tmp_path):
    with pytest.raises(DatasetError, match=r"ADE20K not found at .*ADEChallengeData2016/annotations"):
        ADE20K(tmp_path)
    ade = _ade_tree(tmp_path)
    with pytest.raises(DatasetError, match="split must be one of train, val"):
        ADE20K(ade, split="test")
    (ade / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(
        DatasetError,
        match=r"1 of 2 image\(s\).*have no annotation: ADE_train_00000002.jpg "
        r"\(expected .*annotations/training/ADE_train_00000002.png\)",
    ):
        ADE20K(ade)
    _label(ade / "annotations" / "validation" / "ADE_val_00000002.png", _blocks(151, 2))
    with pytest.raises(DatasetError) as err:
        validate_dataset(ADE20K(ade, split="val"), progress=False)
    assert "ADE_val_00000002.png: label values [151] out of range; expected only 0..150, 255" in str(err.value)
    shutil.rmtree(ade / "annotations" / "validation")
    with pytest.raises(DatasetError, match=r"annotation folder .*annotations/validation does not exist"):
        ADE20K(ade, split="val")


# ----------------------------------------------------------------------------- COCO-Stuff
def _coco_tree(tmp_path: Path) -> Path:
    for sub, names in (("train2017", ("000000000009", "000000000025")), ("val2017", ("000000000139",))):
        for k, name in enumerate(names):
            _image(tmp_path / "images" / sub / f"{name}.jpg", k)
            _label(tmp_path / "stuffthingmaps" / sub / f"{name}.png", _blocks(0, 11, 12, 91, 181, 255))
    return tmp_path


def test_cocostuff_compacts_ids(tmp_path):
    root = _coco_tree(tmp_path)
    train = CocoStuff(root, split="train")
    assert len(train) == 2 and train.num_classes == len(train.class_names) == len(train.palette) == 171
    assert train.class_names[11] == "stop sign" and train.class_names[80] == "banner"
    assert train.class_names[170] == "wood" and "street sign" not in train.class_names
    mask = train[1]["mask"]
    # person 0 -> 0, street sign (unused) -> 255, stop sign 12 -> 11, banner 91 -> 80, wood 181 -> 170, 255 -> 255
    assert [int(mask[4, _column_of(6, k)]) for k in range(6)] == [0, 255, 11, 80, 170, 255]
    assert len(CocoStuff(root, split="val2017")) == 1
    validate_dataset(train, progress=False)


def test_cocostuff_table_matches_references():
    from torchvision.models._meta import _COCO_CATEGORIES  # COCO's 91 thing ids, "N/A" where never annotated

    from maskworks.data.cocostuff import cocostuff_lut

    assert len(COCOSTUFF_LABELS) == 182
    not_annotated = {i - 1 for i, name in enumerate(_COCO_CATEGORIES) if name == "N/A"}
    assert set(COCOSTUFF_UNUSED) == not_annotated | {90}  # + hair brush (id 91), past torchvision's list
    assert [COCOSTUFF_LABELS[i] for i in range(80 + 11) if i not in COCOSTUFF_UNUSED] == [
        name for name in _COCO_CATEGORIES[1:] if name != "N/A"
    ]
    lut = cocostuff_lut()
    # entries of mmsegmentation's coco_stuff164k converter table (value -> train id)
    for value, train_id in {10: 10, 12: 11, 26: 24, 30: 26, 66: 60, 69: 61, 71: 62, 83: 73, 91: 80, 181: 170}.items():
        assert lut[value] == train_id
    assert sorted(set(lut[:182].tolist())) == [*range(171), 255]
    assert lut[182:255].tolist() == [-1] * 73


def test_cocostuff_broken_trees(tmp_path):
    with pytest.raises(DatasetError, match=r"missing folder\(s\) .*/images, .*/stuffthingmaps"):
        CocoStuff(tmp_path)
    root = _coco_tree(tmp_path)
    with pytest.raises(DatasetError, match="split must be one of train, val"):
        CocoStuff(root, split="test")
    _image(root / "images" / "val2017" / "000000000285.jpg", 9)
    with pytest.raises(
        DatasetError, match=r"have no annotation: 000000000285.jpg \(expected .*stuffthingmaps/val2017/"
    ):
        CocoStuff(root, split="val")
    _label(root / "stuffthingmaps" / "val2017" / "000000000285.png", _blocks(182, 0))
    with pytest.raises(DatasetError) as err:
        validate_dataset(CocoStuff(root, split="val"), progress=False)
    assert "000000000285.png: label values [182] out of range" in str(err.value)


# ----------------------------------------------------------------------------- CLI
def test_cli_builds_the_standard_layouts(tmp_path):
    from maskworks.cli.builders import build_datasets, build_split, reader_options
    from maskworks.cli.config import DEFAULTS, ConfigError

    voc = _voc_tree(tmp_path / "voc")
    data = {**DEFAULTS["data"], "name": "voc", "root": str(tmp_path / "voc")}
    train, val = build_datasets(data)
    assert isinstance(train, VOCSegmentation) and (len(train), len(val)) == (2, 1)
    assert train.root == val.root == voc.resolve() and train.transform is not None
    train, _ = build_datasets({**data, "train_split": "trainval"})
    assert len(train) == 3
    assert len(build_split(data, "trainval")) == 3
    with pytest.raises(DatasetError, match="train_aug"):
        build_datasets({**data, "train_split": "train_aug"})
    with pytest.raises(ConfigError, match="unknown config key 'data.sbd_rot'.*did you mean sbd_root"):
        reader_options({**data, "sbd_rot": "x"})
    with pytest.raises(ConfigError, match="did you mean voc"):
        build_datasets({**data, "name": "vco"})
    with pytest.raises(ConfigError, match="data.num_classes=20 but data.name=voc has 21 classes"):
        build_datasets({**data, "num_classes": 20})
    with pytest.raises(ConfigError, match="train_split"):
        build_datasets({**DEFAULTS["data"], "name": "synthetic", "train_split": "train_aug"})

    city = _cityscapes_tree(tmp_path / "city", {"aachen_000000_000019": (7, 26)}, split="val")
    _label(city / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", _blocks(3, 4))
    cs = {**DEFAULTS["data"], "name": "cityscapes", "root": str(city), "label_type": "labelTrainIds"}
    ds = build_split(cs, "val")
    assert isinstance(ds, Cityscapes) and ds.label_type == "labelTrainIds" and int(ds[0]["mask"][0, 0]) == 3
    ade = build_split({**DEFAULTS["data"], "name": "ade20k", "root": str(_ade_tree(tmp_path / "ade"))}, "val")
    coco = build_split({**DEFAULTS["data"], "name": "cocostuff", "root": str(_coco_tree(tmp_path / "coco"))}, "val")
    assert (type(ade), len(ade), type(coco), len(coco)) == (ADE20K, 2, CocoStuff, 1)
