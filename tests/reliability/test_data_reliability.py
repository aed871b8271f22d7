"""Dataset reliability: each test builds a broken or unusual dataset in tmp_path and checks what the API does.

Every dataset problem is a ``DatasetError`` whose message names the file and what was expected.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Subset

from maskworks.data import (
    ISBI2012,
    CamVid,
    DatasetError,
    FolderDataset,
    SyntheticShapes,
    read_class_file,
    read_image,
    read_mask,
    validate_dataset,
)

H, W = 6, 8


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Keep the validation cache inside the test's folder."""
    monkeypatch.setenv("MASKWORKS_HOME", str(tmp_path / "home"))


def _labels(k: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (H, W)).astype(np.uint8)


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3)).astype(np.uint8)


def _make(root: Path, names=("a", "b", "c"), k: int = 3) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(_rgb(i)).save(root / "images" / f"{name}.png")
        Image.fromarray(_labels(k, i)).save(root / "masks" / f"{name}.png")
    return root


def _png_bytes(width: int, height: int, depth: int = 8, color_type: int = 0, data: bytes = b"") -> bytes:
    """A PNG file declaring any size (the pixel data may be missing)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _first_line(e: pytest.ExceptionInfo) -> str:
    return str(e.value).splitlines()[0]


# ------------------------------------------------------------------------------- 1. bit depth by type, not by image


def test_16bit_images_are_scaled_by_the_type_range_not_per_image(tmp_path):
    _make(tmp_path, names=("a", "b"))
    low = np.full((H, W), 250, np.uint16)  # no pixel above 255
    high = low.copy()
    high[0, 0] = 65535
    Image.fromarray(low).save(tmp_path / "images" / "a.png")
    Image.fromarray(high).save(tmp_path / "images" / "b.png")
    with Image.open(tmp_path / "images" / "a.png") as img:
        assert img.mode == "I;16"
    a, b = read_image(tmp_path / "images" / "a.png"), read_image(tmp_path / "images" / "b.png")
    assert a.dtype == np.uint8 and a.shape == (H, W, 1)
    assert a[1, 1, 0] == b[1, 1, 0] == 1  # 250 / 257, in both images
    assert b[0, 0, 0] == 255
    ds = FolderDataset(tmp_path, num_classes=3, in_channels=1)
    raw_a, raw_b = ds.load_raw(0)["image"], ds.load_raw(1)["image"]
    assert raw_a[0, 1, 1] == raw_b[0, 1, 1] == 1


def test_32bit_integer_image_beyond_16_bits_is_a_dataset_error(tmp_path):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.array([[0, 250], [70000, 3]], np.int32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    with pytest.raises(DatasetError) as e:
        read_image(path)
    assert "deep.tif" in _first_line(e) and "0..65535" in _first_line(e)
    ok = tmp_path / "ok.tif"
    Image.fromarray(np.array([[0, 250], [65535, 514]], np.int32)).save(ok)
    assert read_image(ok)[..., 0].tolist() == [[0, 1], [255, 2]]


def test_float_image_is_read_as_0_to_1_and_other_ranges_are_a_dataset_error(tmp_path):
    ok = tmp_path / "unit.tif"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.2]], np.float32)).save(ok)
    assert read_image(ok)[..., 0].tolist() == [[0, 128], [255, 51]]
    bad = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0.0, 2.0], [1.0, 0.2]], np.float32)).save(bad)
    with pytest.raises(DatasetError) as e:
        read_image(bad)
    assert "wide.tif" in _first_line(e) and "expected 0..1" in _first_line(e)
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(nan)
    with pytest.raises(DatasetError, match=r"nan\.tif.*NaN"):
        read_image(nan)


# ---------------------------------------------------------------------------- 2. channels decided from every image


def test_mixed_channel_counts_use_three_channels_with_a_warning(tmp_path, caplog):
    _make(tmp_path)
    Image.fromarray(_rgb(0)[..., 0]).save(tmp_path / "images" / "a.png")  # first in sorted order, grayscale
    with caplog.at_level(logging.WARNING, logger="maskworks.data"):
        ds = FolderDataset(tmp_path, num_classes=3)
    assert ds.in_channels == 3 and len(ds.mean) == 3
    assert "1 grayscale and 2 colour" in caplog.text and "in_channels=3" in caplog.text
    gray = ds.load_raw(0)["image"]
    assert gray.shape == (3, H, W) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert ds[1]["image"].shape == (3, H, W)
    forced = FolderDataset(tmp_path, num_classes=3, in_channels=1)
    assert forced.in_channels == 1 and {forced[i]["image"].shape[0] for i in range(3)} == {1}
    with pytest.raises(DatasetError, match="in_channels must be 1"):
        FolderDataset(tmp_path, num_classes=3, in_channels=2)


def test_all_grayscale_images_stay_one_channel(tmp_path):
    _make(tmp_path, names=("a", "b"))
    for i, name in enumerate("ab"):
        Image.fromarray(_rgb(i)[..., 0]).save(tmp_path / "images" / f"{name}.png")
    assert FolderDataset(tmp_path, num_classes=3).in_channels == 1


def test_unreadable_image_headers_are_listed_at_construction(tmp_path):
    _make(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"")
    (tmp_path / "images" / "c.png").write_text("not an image")
    with pytest.raises(DatasetError) as e:
        FolderDataset(tmp_path, num_classes=3)
    assert _first_line(e).startswith("2 of 3 image(s)")
    assert "b.png" in str(e.value) and "c.png" in str(e.value)


# ------------------------------------------------------------------------------------------ 3. class file entries


def test_duplicate_class_colour_is_a_dataset_error(tmp_path):
    _make(tmp_path)
    (tmp_path / "classes.txt").write_text("background 0 0 0\ncar 255 0 0\ntruck 255,0,0\n")
    with pytest.raises(DatasetError) as e:
        FolderDataset(tmp_path)
    line = _first_line(e)
    assert "classes.txt" in line and "'car'" in line and "'truck'" in line and "(255, 0, 0)" in line
    path = tmp_path / "classes.json"
    path.write_text('[{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [1, 2, 3]}]')
    with pytest.raises(DatasetError, match=r"classes\.json.*'a' and 'b'.*\(1, 2, 3\)"):
        read_class_file(path)


def test_duplicate_class_name_is_a_dataset_error(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("road\ncar\nroad\n")
    with pytest.raises(DatasetError) as e:
        read_class_file(path)
    assert "classes.txt" in _first_line(e) and "'road' appears twice" in _first_line(e)


def test_class_colour_that_is_also_the_void_colour_is_a_dataset_error(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("sky 0 0 0\nroad 128 64 128\nvoid 0 0 0\n")
    with pytest.raises(DatasetError, match=r"classes\.txt.*\(0, 0, 0\).*'sky'.*void"):
        read_class_file(path)


def test_class_file_that_is_not_text_is_a_dataset_error(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DatasetError, match=r"classes\.txt"):
        read_class_file(path)


# ------------------------------------------------------------------------------------ 4. inferring num_classes


def test_stray_label_is_named_in_a_warning_when_num_classes_is_inferred(tmp_path, caplog):
    _make(tmp_path)
    stray = _labels(3, 2)
    stray[0, 0] = 17
    Image.fromarray(stray).save(tmp_path / "masks" / "c.png")
    with caplog.at_level(logging.WARNING, logger="maskworks.data"):
        ds = FolderDataset(tmp_path)
    assert ds.num_classes == 18
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "labels found: 0..2, 17" in text and "17 in 1 mask(s) (e.g. c.png)" in text
    assert "3..16 never occur" in text and "data.num_classes=K" in text and "classes.txt" in text
    # with the fix the warning suggests, the stray mask is reported by validation
    fixed = FolderDataset(tmp_path, num_classes=3)
    with pytest.raises(DatasetError) as e:
        validate_dataset(fixed, progress=False)
    assert "c.png" in str(e.value) and "[17]" in str(e.value)


def test_contiguous_labels_are_still_inferred_and_listed(tmp_path, caplog):
    _make(tmp_path)
    with caplog.at_level(logging.WARNING, logger="maskworks.data"):
        ds = FolderDataset(tmp_path)
    assert ds.num_classes == 3
    assert "inferred 3" in caplog.text and "labels found: 0..2" in caplog.text
    assert "not contiguous" not in caplog.text


def test_inference_reports_every_unreadable_mask(tmp_path):
    _make(tmp_path)
    _truncate(tmp_path / "masks" / "a.png")
    _truncate(tmp_path / "masks" / "c.png")
    with pytest.raises(DatasetError) as e:
        FolderDataset(tmp_path)
    assert "cannot infer num_classes: 2 of 3 masks" in _first_line(e)
    assert "a.png" in str(e.value) and "c.png" in str(e.value)


# ------------------------------------------------------------------------------------------- 5. validate_dataset


def test_validate_dataset_lists_every_bad_file_in_one_error(tmp_path):
    _make(tmp_path, names=("a", "b", "c", "d", "e"))
    _truncate(tmp_path / "images" / "b.png")  # a one-epoch run that never reads b would not notice
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(tmp_path / "masks" / "c.png")
    bad = _labels()
    bad[0, 0] = 9
    Image.fromarray(bad).save(tmp_path / "masks" / "d.png")
    ds = FolderDataset(tmp_path, num_classes=3)  # headers are fine: construction succeeds
    with pytest.raises(DatasetError) as e:
        validate_dataset(ds, progress=False)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("3 problem(s) in 5 samples")
    assert len(lines) == 4
    assert "b.png" in lines[1] and "truncated" in lines[1]
    assert "c.png" in lines[2] and "same size" in lines[2]
    assert "d.png" in lines[3] and "[9]" in lines[3]


def test_validate_dataset_shows_ten_problems_and_counts_the_rest(tmp_path):
    names = [f"s{i:02d}" for i in range(13)]
    _make(tmp_path, names=names)
    for name in names[:12]:
        (tmp_path / "masks" / f"{name}.png").write_bytes(b"broken")
    with pytest.raises(DatasetError) as e:
        validate_dataset(FolderDataset(tmp_path, num_classes=3), progress=False)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("12 problem(s) in 13 samples") and lines[-1] == "  ... and 2 more"
    assert len(lines) == 12 and all("mask file" in line and ".png" in line for line in lines[1:11])


def _count_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_validate_dataset_cache_rereads_no_unchanged_file(tmp_path, monkeypatch):
    root = _make(tmp_path / "data")
    ds = FolderDataset(root, num_classes=3)
    opened = _count_opens(monkeypatch)
    validate_dataset(ds, progress=True)
    assert len(opened) == 6  # 3 images + 3 masks
    cache_files = list((tmp_path / "home" / "validated").glob("*.json"))
    assert len(cache_files) == 1
    opened.clear()
    validate_dataset(ds, progress=False)
    assert opened == []
    # a changed file is read again, and only its pair
    Image.fromarray(_labels(3, 7)).save(root / "masks" / "b.png")
    validate_dataset(ds, progress=False)
    assert sorted(Path(p).name for p in opened) == ["b.png", "b.png"]
    # a different label table is a different validation
    opened.clear()
    validate_dataset(FolderDataset(root, num_classes=4, in_channels=3), progress=False)
    assert len(opened) == 6
    opened.clear()
    validate_dataset(ds, progress=False, cache=False)
    assert len(opened) == 6


def test_validate_dataset_never_caches_bad_files(tmp_path, monkeypatch):
    root = _make(tmp_path / "data")
    _truncate(root / "images" / "a.png")
    ds = FolderDataset(root, num_classes=3)
    with pytest.raises(DatasetError, match=r"a\.png"):
        validate_dataset(ds, progress=False)
    opened = _count_opens(monkeypatch)
    for _ in range(2):
        opened.clear()
        with pytest.raises(DatasetError, match=r"a\.png"):
            validate_dataset(ds, progress=False)
        assert [Path(p).name for p in opened] == ["a.png"]  # the good pairs were remembered, the bad one is not


def test_validate_dataset_on_subsets_wrappers_and_datasets_without_files(tmp_path):
    root = _make(tmp_path / "data")
    _truncate(root / "images" / "b.png")
    ds = FolderDataset(root, num_classes=3)
    validate_dataset(Subset(ds, [0, 2]), progress=False)  # the bad sample is not in the subset
    with pytest.raises(DatasetError, match=r"1 problem\(s\) in 1 samples of Subset.*\n.*b\.png"):
        validate_dataset(Subset(Subset(ds, [2, 1]), [1]), progress=False)
    with pytest.raises(DatasetError, match=r"b\.png"):
        validate_dataset(ConcatDataset([SyntheticShapes(num_samples=2, image_size=16), ds]), progress=False)
    assert validate_dataset(SyntheticShapes(num_samples=2, image_size=16), progress=False) is None
    assert validate_dataset(Subset(SyntheticShapes(num_samples=4, image_size=16), [1, 3]), progress=False) is None


def test_paired_dataset_validate_delegates(tmp_path):
    root = _make(tmp_path / "data")
    (root / "masks" / "c.png").write_text("no png")
    with pytest.raises(DatasetError, match=r"1 problem\(s\).*\n.*mask file .*c\.png"):
        FolderDataset(root, num_classes=3).validate()


# --------------------------------------------------------------------------------------------- 6. ISBI and CamVid


def _isbi(root: Path, slices) -> Path:
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir(parents=True)
    for s in slices:
        Image.fromarray(_rgb(s)[..., 0]).save(root / "image" / f"{s}.png")
        Image.fromarray(np.where(_labels(2, s) > 0, 255, 0).astype(np.uint8)).save(root / "label" / f"{s}.png")
    return root


def test_isbi_split_all_uses_every_slice_found(tmp_path):
    root = _isbi(tmp_path / "isbi", range(20, 30))
    full = ISBI2012(root, split="all")
    assert len(full) == 10 and full[0]["meta"]["file"].endswith("20.png")
    train, val = ISBI2012(root, split="train"), ISBI2012(root, split="val")
    assert (len(train), len(val)) == (8, 2) and val.val_slices == (28, 29)
    assert len(ISBI2012(root, split="val", val_slices=[21, 22, 23])) == 3


def test_isbi_missing_val_slices_name_the_slices_that_exist(tmp_path):
    root = _isbi(tmp_path / "isbi", range(20, 30))
    with pytest.raises(DatasetError) as e:
        ISBI2012(root, split="train", val_slices=(16, 17, 18, 19))
    line = _first_line(e)
    assert "val_slices [16, 17, 18, 19] not found" in line and "image" in line and "20..29" in line
    with pytest.raises(DatasetError, match=r"'train' is empty.*20\.\.29"):
        ISBI2012(root, split="train", val_slices=range(20, 30))
    with pytest.raises(DatasetError, match="split must be one of"):
        ISBI2012(root, split="test")


def test_isbi_validation_finds_a_truncated_label(tmp_path):
    root = _isbi(tmp_path / "isbi", range(3))
    _truncate(root / "label" / "1.png")
    with pytest.raises(DatasetError, match=r"1 problem\(s\) in 3 samples of ISBI2012.*\n.*label.1\.png"):
        validate_dataset(ISBI2012(root, split="all"), progress=False)


def test_camvid_unknown_split_and_bad_labels_are_dataset_errors(tmp_path):
    for sub in ("train", "trainannot"):
        (tmp_path / sub).mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "train" / "x.png")
    labels = _labels(12)
    labels[0, 0] = 11  # void -> 255 is fine
    labels[1, 1] = 12
    Image.fromarray(labels).save(tmp_path / "trainannot" / "x.png")
    with pytest.raises(DatasetError, match="split must be one of"):
        CamVid(tmp_path, split="training")
    ds = CamVid(tmp_path, split="train")
    with pytest.raises(DatasetError, match=r"trainannot.x\.png.*\[12\]"):
        validate_dataset(ds, progress=False)


# ------------------------------------------------------------------------- 7. every dataset problem is DatasetError


def test_mean_std_of_the_wrong_length_is_a_dataset_error(tmp_path):
    _make(tmp_path)
    with pytest.raises(DatasetError, match=r"mean has 1 value.*3 channel"):
        FolderDataset(tmp_path, num_classes=3, mean=[0.5], std=[0.2, 0.2, 0.2])
    with pytest.raises(DatasetError, match=r"std=\[0\.2, 0\.0, 0\.2\]"):
        FolderDataset(tmp_path, num_classes=3, std=[0.2, 0.0, 0.2])
    ds = FolderDataset(tmp_path, num_classes=3, mean=[0.1, 0.2, 0.3])  # std alone takes the default
    assert ds.mean == (0.1, 0.2, 0.3) and len(ds.std) == 3


def test_empty_folders_and_bad_num_classes_are_dataset_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"no images found in .*images"):
        FolderDataset(tmp_path)
    _make(tmp_path)
    with pytest.raises(DatasetError, match="num_classes must be in 1..255"):
        FolderDataset(tmp_path, num_classes=0)
    (tmp_path / "notafolder").write_text("x")
    with pytest.raises(DatasetError, match="notafolder.*is not a folder"):
        FolderDataset(tmp_path, images_dir="notafolder")


def test_zero_size_image_is_a_dataset_error(tmp_path):
    _make(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(_png_bytes(0, 5))
    with pytest.raises(DatasetError) as e:
        FolderDataset(tmp_path, num_classes=3)
    assert "b.png" in str(e.value)
    with pytest.raises(DatasetError, match=r"b\.png"):
        read_image(tmp_path / "images" / "b.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns above 89 Mpx and raises above 179 Mpx
def test_huge_declared_dimensions_are_a_dataset_error(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(side, side))
    for reader in (read_image, read_mask):
        with pytest.raises(DatasetError) as e:
            reader(path)
        assert "bomb.png is too large" in _first_line(e) and "MAX_IMAGE_PIXELS" in _first_line(e)


def test_odd_image_modes_are_read_or_refused_by_name(tmp_path):
    def save(name: str, img: Image.Image) -> Path:
        path = tmp_path / name
        img.save(path)
        return path

    rgb = Image.fromarray(_rgb())
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    cases = {
        save("cmyk.jpg", rgb.convert("CMYK")): 3,
        save("cmyk.tif", rgb.convert("CMYK")): 3,
        save("rgba.png", rgb.convert("RGBA")): 3,
        save("la.png", rgb.convert("LA")): 1,
        save("p.png", palette): 3,
        save("bits.png", rgb.convert("1")): 1,
        save("ycbcr.tif", rgb.convert("YCbCr")): 3,
        save("i16.png", Image.fromarray(np.full((H, W), 1000, np.uint16))): 1,
        save("lab.tif", Image.new("LAB", (W, H))): 3,
    }
    for path, channels in cases.items():
        arr = read_image(path)
        assert arr.shape == (H, W, channels) and arr.dtype == np.uint8, path
        assert read_image(path, channels=3).shape == (H, W, 3)
    assert set(np.unique(read_image(tmp_path / "bits.png")).tolist()) <= {0, 255}
    assert np.unique(read_image(tmp_path / "i16.png")).tolist() == [4]  # 1000 / 257


def test_odd_mask_modes_are_read_or_refused_by_name(tmp_path):
    two_bit = tmp_path / "two_bit.png"  # labels 0..3 stored at 2 bits per pixel; Pillow stretches them to 0..255
    two_bit.write_bytes(_png_bytes(4, 1, depth=2, data=b"\x00" + bytes([0b00011011])))
    assert read_mask(two_bit).tolist() == [[0, 1, 2, 3]]
    four_bit = tmp_path / "four_bit.png"
    four_bit.write_bytes(_png_bytes(2, 1, depth=4, data=b"\x00" + bytes([0x5F])))
    assert read_mask(four_bit).tolist() == [[5, 15]]
    for name, img in (
        ("float.tif", Image.fromarray(np.zeros((H, W), np.float32))),
        ("cmyk.tif", Image.new("CMYK", (W, H))),
        ("ycbcr.tif", Image.new("YCbCr", (W, H))),
    ):
        img.save(tmp_path / name)
        with pytest.raises(DatasetError) as e:
            read_mask(tmp_path / name)
        assert name in _first_line(e) and "expected an index mask" in _first_line(e)


def test_class_presence_names_the_sample_with_labels_out_of_range():
    from maskworks.data import image_class_presence

    mask = torch.tensor([[0, 1], [5, 255]])
    with pytest.raises(DatasetError, match=r"mask of /x/odd\.png holds labels \[5\] outside 0\.\.2"):
        image_class_presence([{"mask": mask, "meta": {"file": "/x/odd.png"}}], num_classes=3)
    with pytest.raises(DatasetError, match=r"no masks given"):
        image_class_presence([], num_classes=3)
