"""FolderDataset: image/mask formats, class files, and a DatasetError naming the file for every bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks.data import DatasetError, FolderDataset, build_transforms, collate_samples

COLORS = [(0, 0, 0), (255, 0, 0), (0, 200, 0)]


def _labels(h: int = 24, w: int = 32, k: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, (h, w)).astype(np.uint8)


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _palette_mask(labels: np.ndarray) -> Image.Image:
    img = Image.fromarray(labels, mode="P")
    img.putpalette([v for c in COLORS for v in c] + [0] * (768 - 3 * len(COLORS)))
    return img


def _make(root: Path, names=("a", "b"), image_ext: str = ".png", k: int = 3) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(_rgb(seed=i)).save(root / "images" / f"{name}{image_ext}")
        Image.fromarray(_labels(k=k, seed=i)).save(root / "masks" / f"{name}.png")
    return root


def test_png_images_with_grayscale_masks_and_inferred_classes(tmp_path, caplog):
    root = _make(tmp_path)
    with caplog.at_level(logging.INFO, logger="maskworks.data"):
        ds = FolderDataset(root)
    assert "inferred 3" in caplog.text
    assert (len(ds), ds.num_classes, ds.in_channels) == (2, 3, 3)
    assert ds.class_names == ["class_0", "class_1", "class_2"] and len(ds.palette) == 3
    s = ds[1]
    assert s["image"].shape == (3, 24, 32) and s["image"].dtype == torch.float32
    assert torch.equal(s["mask"], torch.from_numpy(_labels(seed=1)).long())
    assert s["meta"]["file"].endswith("b.png") and s["meta"]["orig_size"] == (24, 32)
    expected = torch.from_numpy(_rgb(seed=1)).permute(2, 0, 1) / 255 - torch.tensor(ds.mean)[:, None, None]
    torch.testing.assert_close(s["image"], expected / torch.tensor(ds.std)[:, None, None])


def test_jpeg_grayscale_images_and_palette_masks(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    Image.fromarray(_rgb()[..., 0]).save(tmp_path / "images" / "sub" / "x.jpg", quality=95)
    _palette_mask(_labels()).save(tmp_path / "masks" / "sub" / "x.png")
    ds = FolderDataset(tmp_path, num_classes=3)
    assert ds.in_channels == 1 and len(ds.mean) == 1
    s = ds[0]
    assert s["image"].shape == (1, 24, 32)
    assert torch.equal(s["mask"], torch.from_numpy(_labels()).long())


def test_rgba_images_drop_alpha(tmp_path):
    _make(tmp_path)
    rgba = np.concatenate([_rgb(), np.full((24, 32, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "images" / "a.png")
    ds = FolderDataset(tmp_path, num_classes=3)
    assert ds.in_channels == 3 and ds[0]["image"].shape == (3, 24, 32)


def test_rgb_colour_masks_through_class_file_with_void(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    labels = _labels()
    color_mask = np.array(COLORS, np.uint8)[labels]
    color_mask[0, :5] = (255, 255, 255)  # void
    Image.fromarray(_rgb()).save(tmp_path / "images" / "a.png")
    Image.fromarray(color_mask).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.txt").write_text(
        "# name r g b\nbackground 0 0 0\ncar 255,0,0\ntree 0 200 0\nvoid 255 255 255\n"
    )
    ds = FolderDataset(tmp_path)
    assert ds.class_names == ["background", "car", "tree"] and ds.palette == COLORS
    expected = torch.from_numpy(labels).long()
    expected[0, :5] = 255
    assert torch.equal(ds[0]["mask"], expected)


def test_class_json_names_and_mismatched_num_classes(tmp_path):
    _make(tmp_path)
    (tmp_path / "classes.json").write_text('["bg", "a", "b"]')
    assert FolderDataset(tmp_path).class_names == ["bg", "a", "b"]
    with pytest.raises(DatasetError, match="num_classes=4"):
        FolderDataset(tmp_path, num_classes=4)


def test_dataloader_with_crop_transform(tmp_path):
    ds = FolderDataset(_make(tmp_path, names=("a", "b", "c")), transform=build_transforms(train=True, crop_size=16))
    batch = collate_samples([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["mask"].shape == (3, 16, 16)


# ---------------------------------------------------------------- bad inputs: DatasetError naming the file


def test_size_mismatch(tmp_path):
    _make(tmp_path)
    Image.fromarray(_labels(h=24, w=30)).save(tmp_path / "masks" / "b.png")
    ds = FolderDataset(tmp_path, num_classes=3)
    ds[0]
    with pytest.raises(DatasetError, match=r"b\.png.*24x32.*24x30"):
        ds[1]


def test_label_out_of_range_lists_values_but_255_is_fine(tmp_path):
    _make(tmp_path)
    bad, ok = _labels(), _labels(seed=1)
    bad[0, 0], bad[1, 1], bad[2, 2], ok[0, 0] = 7, 255, 9, 255
    Image.fromarray(bad).save(tmp_path / "masks" / "a.png")
    Image.fromarray(ok).save(tmp_path / "masks" / "b.png")
    ds = FolderDataset(tmp_path, num_classes=3)
    assert ds[1]["mask"][0, 0] == 255
    with pytest.raises(DatasetError, match=r"a\.png.*\[7, 9\].*0\.\.2, 255") as info:
        ds[0]
    assert isinstance(info.value, ValueError)


def test_truncated_png(tmp_path):
    _make(tmp_path)
    path = tmp_path / "images" / "b.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = FolderDataset(tmp_path, num_classes=3)
    with pytest.raises(DatasetError, match=r"b\.png"):
        ds[1]


def test_non_image_file_with_image_extension(tmp_path):
    _make(tmp_path)
    (tmp_path / "masks" / "b.png").write_text("not a png")
    ds = FolderDataset(tmp_path, num_classes=3)
    with pytest.raises(DatasetError, match=r"mask file .*b\.png"):
        ds[1]


def test_empty_folder_names_folder_and_extensions(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images found in .*images.*\.png.*\.jpg"):
        FolderDataset(tmp_path)


def test_missing_images_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        FolderDataset(tmp_path / "nowhere")


def test_images_without_mask_are_named(tmp_path):
    _make(tmp_path, names=("a", "b", "c"))
    (tmp_path / "masks" / "b.png").unlink()
    (tmp_path / "masks" / "c.png").unlink()
    with pytest.raises(DatasetError, match=r"2 image\(s\).*b\.png, c\.png"):
        FolderDataset(tmp_path)


def test_rgb_mask_without_class_colours(tmp_path):
    _make(tmp_path)
    Image.fromarray(_rgb()).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png.*class file"):
        FolderDataset(tmp_path, num_classes=3)[0]


def test_unknown_colour_in_colour_mask(tmp_path):
    _make(tmp_path, names=("a",))
    mask = np.array(COLORS, np.uint8)[_labels()]
    mask[3, 3] = (1, 2, 3)
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.txt").write_text("".join(f"c{i} {r} {g} {b}\n" for i, (r, g, b) in enumerate(COLORS)))
    with pytest.raises(DatasetError, match=r"a\.png.*\(1, 2, 3\)"):
        FolderDataset(tmp_path)[0]


def test_validate_lists_every_problem(tmp_path):
    _make(tmp_path, names=("a", "b", "c", "d"))
    Image.fromarray(_labels(h=10)).save(tmp_path / "masks" / "b.png")
    bad = _labels()
    bad[0, 0] = 7
    Image.fromarray(bad).save(tmp_path / "masks" / "c.png")
    (tmp_path / "images" / "d.png").write_bytes((tmp_path / "images" / "d.png").read_bytes()[:100])
    ds = FolderDataset(tmp_path, num_classes=3)
    with pytest.raises(DatasetError) as info:
        ds.validate()
    message = str(info.value)
    assert message.startswith("3 problem(s)")
    assert all(name in message for name in ("b.png", "c.png", "d.png")) and "a.png" not in message
    FolderDataset(_make(tmp_path / "good"), num_classes=3).validate(progress=False)
