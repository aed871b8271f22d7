"""Volumes: NIfTI round trip, MSD layout, resampling, normalisation, folds, synthetic volumes, 3D augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskworks.data import (
    NiftiFolder,
    RandomAffine3D,
    RandomElastic3D,
    RandomMirror,
    RandomPatch,
    SyntheticVolumes,
    VolumeInfo,
    kfold_splits,
    normalize_volume,
    read_nifti,
    resample_image,
    resample_label,
    write_nifti,
)
from maskworks.data.io import DatasetError

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, shifted affine (RAS+ millimetres), as a scanner writes it."""
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.7, 2.5])
    affine[:3, 3] = [-100.0, 20.5, 33.0]
    return affine


def test_nifti_round_trip_keeps_affine_spacing_and_axis_order(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)  # (i, j, k)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, _oblique_affine()), str(path))
    array, info = read_nifti(path)
    assert array.shape == (7, 6, 5)  # (D, H, W) = (k, j, i)
    assert np.array_equal(array, data.transpose(2, 1, 0))
    assert info.spacing == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_allclose(info.affine, _oblique_affine(), atol=1e-6)
    label = (array > 0).astype(np.int64)
    out = write_nifti(tmp_path / "pred" / "ct.nii.gz", label, info)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, _oblique_affine(), atol=1e-6)  # overlays the input in world coordinates
    assert back.header.get_zooms()[:3] == pytest.approx((0.8, 0.7, 2.5))
    assert np.array_equal(np.asanyarray(back.dataobj), label.transpose(2, 1, 0))
    assert np.asanyarray(back.dataobj).dtype == np.int16
    assert not list((tmp_path / "pred").glob(".part-*"))
    with pytest.raises(ValueError, match="differs from the reference"):
        write_nifti(tmp_path / "bad.nii.gz", label[:-1], info)


def test_four_d_files_become_channels_and_bad_files_are_named(tmp_path):
    data = np.zeros((4, 5, 6, 2), np.float32)
    data[..., 1] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "mr.nii.gz"))
    array, info = read_nifti(tmp_path / "mr.nii.gz")
    assert array.shape == (2, 6, 5, 4) and array[1].min() == 1 and info.shape == (6, 5, 4)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DatasetError, match="broken.nii.gz"):
        read_nifti(tmp_path / "broken.nii.gz")
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        read_nifti(tmp_path / "missing.nii")


def _msd(root, n=5, channels=2, shape=(6, 8, 10)):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        for c in range(channels):
            img = rng.normal(size=shape).astype(np.float32) + 10 * c
            nib.save(
                nib.Nifti1Image(img, np.diag([1.0, 1.0, 3.0, 1.0])),
                str(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz"),
            )
        lab = np.zeros(shape, np.uint8)
        lab[1:3, 2:5, 1:4] = 1 + i % 2
        nib.save(nib.Nifti1Image(lab, np.diag([1.0, 1.0, 3.0, 1.0])), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2},
                                                   "channel_names": {"0": "CT", "1": "PET"}}))  # fmt: skip


def test_msd_folder_layout_folds_and_samples(tmp_path):
    _msd(tmp_path)
    train = NiftiFolder(tmp_path, split="train", fold=0)
    val = NiftiFolder(tmp_path, split="val", fold=0)
    assert len(train) == 4 and len(val) == 1 and train.in_channels == 2 and train.num_classes == 3
    assert train.class_names == ["background", "liver", "tumour"]
    assert {train.case_id(i) for i in range(4)} | {val.case_id(0)} == {f"case_{i:03d}" for i in range(5)}
    sample = val[0]
    assert sample["image"].shape == (2, 10, 8, 6) and sample["mask"].shape == (10, 8, 6)
    assert sample["image"][1].mean().abs() < 1e-5  # z-scored per channel
    assert sample["meta"]["spacing"] == pytest.approx((3.0, 1.0, 1.0))
    resampled = NiftiFolder(tmp_path, split="all", target_spacing=(1.5, 1.0, 1.0))[0]
    assert resampled["image"].shape == (2, 20, 8, 6) and resampled["mask"].shape == (20, 8, 6)
    assert set(resampled["mask"].unique().tolist()) <= {0, 1, 2}
    (tmp_path / "imagesTr" / "case_004_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_004.*lacks channel"):
        NiftiFolder(tmp_path)


def test_kfold_splits_match_scikit_learn_as_nnunet_calls_it():
    sklearn = pytest.importorskip("sklearn.model_selection")
    cases = [f"case_{i:03d}" for i in (7, 3, 11, 0, 5, 9, 1, 2, 8, 4, 6, 10, 12)]
    ours = kfold_splits(cases, 5, seed=12345)
    keys = np.sort(np.array(cases))
    for fold, (tr, va) in enumerate(sklearn.KFold(n_splits=5, shuffle=True, random_state=12345).split(keys)):
        assert ours[fold]["train"] == list(keys[tr]) and ours[fold]["val"] == list(keys[va])
    assert sorted(c for f in ours for c in f["val"]) == sorted(cases)  # every case validated exactly once


def test_label_resampling_never_invents_values_and_image_resampling_keeps_constants():
    rng = np.random.default_rng(0)
    label = torch.as_tensor(rng.integers(0, 3, size=(5, 9, 9)))
    label[0, 0, 0] = 255
    for mode in ("onehot", "nearest"):
        out = resample_label(label, (3.0, 1.0, 1.0), (1.0, 0.7, 0.7), mode=mode)
        assert out.shape == (15, 13, 13) and out.dtype == torch.long
        assert set(out.unique().tolist()) <= {0, 1, 2, 255}
    same = resample_label(label, shape=label.shape)
    assert torch.equal(same, label)
    # one-hot linear: the interior stays, the volume scales with the grid, corners round off (smooth boundaries)
    block = torch.zeros(4, 8, 8, dtype=torch.long)
    block[1:3, 2:6, 2:6] = 1
    up = resample_label(block, shape=(8, 16, 16))
    assert bool((up[3:5, 5:11, 5:11] == 1).all()) and up[0].sum() == 0 and up[2, 4, 4] == 0
    assert abs(int(up.sum()) - 8 * int(block.sum())) <= 0.1 * 8 * int(block.sum())
    assert torch.equal(
        resample_label(block, shape=(8, 16, 16), mode="nearest")[2:6, 4:12, 4:12], torch.ones(4, 8, 8).long()
    )
    const = torch.full((1, 4, 5, 6), 3.5)
    for order in (0, 1, 3):
        np.testing.assert_allclose(resample_image(const, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), order=order), 3.5, atol=1e-5)


def test_normalisation_schemes():
    x = torch.arange(24.0).reshape(2, 1, 3, 4)
    z = normalize_volume(x, [{"scheme": "zscore"}, {"scheme": "ct", "clip": [2.0, 20.0], "mean": 10.0, "std": 2.0}])
    assert z[0].mean().abs() < 1e-6 and z[0].std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    assert z[1].min() == pytest.approx((12 - 10) / 2) and z[1].max() == pytest.approx((20 - 10) / 2)
    brain = torch.zeros(1, 4, 6, 6)
    brain[0, 1:3, 1:5, 1:5] = torch.arange(32.0).reshape(2, 4, 4) + 1
    masked = normalize_volume(brain, [{"scheme": "zscore", "use_mask": True}])
    inside = brain[0] > 0
    assert masked[0][inside].mean().abs() < 1e-5 and masked[0][~inside].abs().max() == 0
    assert masked[0][inside].std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="unknown normalisation scheme"):
        normalize_volume(x, [{"scheme": "minmax"}, {"scheme": "none"}])


def test_synthetic_volumes_are_deterministic_and_anisotropic():
    ds = SyntheticVolumes(3, size=(12, 30, 30), spacing=(2.5, 1.0, 1.0))
    a, b = ds[1], ds[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(ds[0]["mask"], ds[1]["mask"])
    assert set(a["mask"].unique().tolist()) <= {0, 1, 2} and (a["mask"] > 0).any()
    assert a["meta"]["spacing"] == (2.5, 1.0, 1.0)
    # a blob is round in millimetres, so fewer voxels across along D than along H
    blob = (a["mask"] == 1).nonzero()
    extent = blob.max(0).values - blob.min(0).values + 1
    assert extent[0] * 2.5 == pytest.approx(float(extent[1]), rel=0.7)


def test_patch_sampling_and_spatial_transforms_move_image_and_mask_together():
    torch.manual_seed(0)
    mask = torch.zeros(10, 20, 20, dtype=torch.long)
    mask[4:6, 15:18, 2:4] = 2
    image = mask[None].float() * 10
    sample = {"image": image, "mask": mask, "meta": {"spacing": (2.0, 1.0, 1.0)}}
    hits = sum(int((RandomPatch((4, 8, 8), foreground_prob=1.0)(sample)["mask"] == 2).any()) for _ in range(20))
    assert hits == 20  # foreground oversampling always finds the small structure
    padded = RandomPatch((12, 8, 24))(sample)
    assert padded["image"].shape == (1, 12, 8, 24) and padded["mask"].shape == (12, 8, 24)
    big = torch.zeros(10, 20, 20, dtype=torch.long)
    big[3:7, 6:14, 5:13] = 2
    block = {"image": big[None].float() * 10, "mask": big, "meta": {"spacing": (2.0, 1.0, 1.0)}}
    for t in (RandomMirror(p=1.0), RandomAffine3D(degrees=20, p_rotate=1.0, p_scale=1.0), RandomElastic3D(p=1.0)):
        out = t(block)
        assert out["image"].shape == (1, 10, 20, 20) and out["mask"].dtype == torch.long
        assert set(out["mask"].unique().tolist()) == {0, 2}
        inside = out["mask"] == 2
        assert out["image"][0][inside].mean() > 15 and out["image"][0][~inside].mean() < 5  # labels follow the image
    flipped = RandomMirror(axes=(2,), p=1.0)(sample)
    assert torch.equal(flipped["mask"], mask.flip(2))
    identity = RandomAffine3D(degrees=0.0, scale=(1.0, 1.0), p_rotate=1.0, p_scale=1.0)(sample)
    assert torch.equal(identity["mask"], mask) and torch.allclose(identity["image"], image, atol=1e-4)


def test_volume_info_from_spacing():
    info = VolumeInfo.from_spacing((3.0, 0.5, 0.25), (4, 5, 6))
    assert np.array_equal(np.diag(info.affine), [0.25, 0.5, 3.0, 1.0]) and info.shape == (4, 5, 6)
