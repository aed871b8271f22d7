"""ISBI2012Instances: cell-interior components as instances, on a tiny synthetic folder and on the real slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from maskworks.data import ISBI2012, DatasetError, build_transforms
from maskworks.data.io import masks_to_boxes
from maskworks.data.isbi import ISBI2012Instances


def _label_with_blobs() -> np.ndarray:
    """20x20 label (255 = cell interior): A and B touch only at a corner, C is large, D is a 2-pixel speck."""
    label = np.zeros((20, 20), dtype=np.uint8)
    label[1:6, 1:6] = 255  # A: 25 px
    label[6:10, 6:10] = 255  # B: 16 px, diagonal neighbour of A at (5, 5) / (6, 6)
    label[12:19, 2:11] = 255  # C: 63 px
    label[15:17, 15] = 255  # D: 2 px (< min_area)
    return label


@pytest.fixture()
def tiny_isbi(tmp_path):
    for sub in ("image", "label"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    for n in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "image" / f"{n}.png")
        Image.fromarray(_label_with_blobs()).save(tmp_path / "label" / f"{n}.png")
    return tmp_path


def test_three_blobs_are_three_instances(tiny_isbi):
    ds = ISBI2012Instances(tiny_isbi, split="all")
    assert len(ds) == 2 and ds.num_classes == 2 and ds.class_names == ["background", "cell"] and ds.in_channels == 1
    assert ds.mean == ISBI2012.mean and len(ds.palette) == 2
    s = ds[0]
    inst = s["instances"]
    label = _label_with_blobs()
    assert inst["labels"].tolist() == [1, 1, 1] and inst["masks"].shape == (3, 20, 20)
    assert [int(m.sum()) for m in inst["masks"]] == [25, 16, 63]
    assert inst["boxes"].tolist() == [[1, 1, 6, 6], [6, 6, 10, 10], [2, 12, 11, 19]]
    assert "iscrowd" not in inst
    raw = ds.load_raw(0)["instances"]  # boxes from scipy's find_objects = the tight boxes of the masks
    assert torch.equal(
        raw["boxes"].as_subclass(torch.Tensor), masks_to_boxes(raw["masks"].as_subclass(torch.Tensor) == 1)
    )
    mask = s["mask"].numpy()
    assert set(np.unique(mask).tolist()) == {0, 1, 255}
    assert (mask == 255).sum() == 2 and (mask[15:17, 15] == 255).all()  # the speck is ignored
    assert np.array_equal(mask == 1, inst["masks"].any(0).numpy())
    assert np.array_equal(mask == 0, label < 128)
    # 8-connectivity merges A and B; min_area=0 keeps the speck
    assert len(ISBI2012Instances(tiny_isbi, split="all", connectivity=8)[0]["instances"]["labels"]) == 2
    s0 = ISBI2012Instances(tiny_isbi, split="all", min_area=0)[0]
    assert len(s0["instances"]["labels"]) == 4 and not (s0["mask"] == 255).any()
    # splits as ISBI2012: the last fifth (at least one slice) is val
    assert len(ISBI2012Instances(tiny_isbi, split="val")) == 1
    with pytest.raises(DatasetError, match="min_area"):
        ISBI2012Instances(tiny_isbi, min_area=-1)
    with pytest.raises(DatasetError, match="connectivity"):
        ISBI2012Instances(tiny_isbi, connectivity=6)


def test_semantic_isbi_unchanged(tiny_isbi):
    s = ISBI2012(tiny_isbi, split="all")[0]
    assert "instances" not in s
    assert np.array_equal(s["mask"].numpy(), (_label_with_blobs() < 128).astype(np.int64))  # 1 = membrane


def test_transforms_keep_instances_consistent(tiny_isbi):
    ds = ISBI2012Instances(tiny_isbi, split="all", transform=build_transforms(train=True, crop_size=12, rotate=20))
    for seed in range(10):
        torch.manual_seed(seed)
        s = ds[0]
        inst = s["instances"]
        assert torch.equal(inst["boxes"], masks_to_boxes(inst["masks"]))
        assert (s["mask"][inst["masks"].any(0)] == 1).all()


@pytest.mark.realdata
def test_real_slices_instances(isbi_root):
    ds = ISBI2012Instances(isbi_root, split="val")
    assert len(ds) == 4
    counts = []
    for i in (0, 3):
        s = ds[i]
        inst = s["instances"]
        masks = inst["masks"].numpy()
        n = len(masks)
        counts.append(n)
        assert (inst["labels"] == 1).all() and s["image"].shape == (1, 512, 512)
        assert masks.sum(0).max() == 1, "instances must be disjoint"
        for m in masks:
            assert m.sum() >= ds.min_area
            assert ndimage.label(m, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])[1] == 1, "one 4-connected component"
        label = np.asarray(Image.open(ds.pairs[i][1]))
        cells = label >= 128
        comps, k = ndimage.label(cells, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        sizes = np.bincount(comps.ravel())
        big = cells & (sizes[comps] >= ds.min_area)
        assert np.array_equal(masks.any(0), big), "union = cell interior of the components >= min_area"
        mask = s["mask"].numpy()
        assert np.array_equal(mask == 1, big) and np.array_equal(mask == 0, ~cells)
        assert np.array_equal(mask == 255, cells & ~big)
    assert all(60 <= n <= 200 for n in counts), counts  # 86..132 per slice on the 20 shipped slices
