"""CamVid and ISBI-2012 on the real files in ../shared/data (a few samples each)."""

from __future__ import annotations

import pytest
import torch

from maskworks.data import ISBI2012, CamVid, DatasetError

pytestmark = pytest.mark.realdata


def test_camvid_samples(camvid_root):
    train, val = CamVid(camvid_root, split="train"), CamVid(camvid_root, split="val")
    assert (len(train), len(val)) == (367, 101)
    assert train.num_classes == 11 and len(train.class_names) == len(train.palette) == 11
    assert train.class_names[0] == "Sky" and train.palette[4] == (60, 40, 222)
    seen = set()
    for ds, i in ((train, 0), (val, 5)):
        s = ds[i]
        assert s["image"].shape == (3, 360, 480) and s["image"].dtype == torch.float32
        assert s["mask"].shape == (360, 480) and s["mask"].dtype == torch.int64
        values = set(s["mask"].unique().tolist())
        assert values <= set(range(11)) | {255}
        seen |= values
        assert s["meta"]["file"].endswith(".png") and s["meta"]["orig_size"] == (360, 480)
    assert 255 in seen, "void (label 11) should map to 255"


def test_camvid_missing_test_split_names_the_folder(camvid_root):
    with pytest.raises(DatasetError, match=r"'test' not found.*testannot"):
        CamVid(camvid_root, split="test")
    with pytest.raises(ValueError, match="split"):
        CamVid(camvid_root, split="training")


def test_camvid_root_relative_to_cwd(camvid_root, monkeypatch):
    monkeypatch.chdir(camvid_root.parent)
    assert len(CamVid("camvid", split="val")) == 101


def test_isbi_samples_and_splits(isbi_root):
    train, val, full = (ISBI2012(isbi_root, split=s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(full)) == (16, 4, 20)
    assert val.class_names == ["cell", "membrane"] and val.in_channels == 1
    assert [s for s in (val[i]["meta"]["file"] for i in range(len(val))) if s.endswith("/16.png")]
    s = val[0]
    assert s["image"].shape == (1, 512, 512) and s["image"].dtype == torch.float32
    assert set(s["mask"].unique().tolist()) <= {0, 1}
    membrane = s["mask"].float().mean().item()
    assert 0.1 < membrane < 0.35, membrane
    val.validate()


def test_isbi_bad_val_slices(isbi_root):
    with pytest.raises(DatasetError, match=r"val_slices \[42\]"):
        ISBI2012(isbi_root, val_slices=(42,))
