"""The nnU-Net-style planner: rules worked out by hand, fingerprints of small arrays, JSON round trip, the CLI, and
parity with ``nnunetv2``'s ``ExperimentPlanner`` (skipped without it)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest

from maskworks.models.volumetric.planner import (
    ChannelNormalization,
    ChannelStats,
    Fingerprint,
    Plan,
    compute_fingerprint,
    crop_to_nonzero,
    estimate_feature_map_size,
    iter_msd_cases,
    plan_experiment,
    pool_and_conv_props,
    target_spacing,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CT_STATS = ChannelStats(mean=100.0, std=50.0, median=90.0, min=-1000.0, max=2000.0, percentile_00_5=-50.0,
                        percentile_99_5=300.0)  # fmt: skip


def brain_like() -> Fingerprint:
    return Fingerprint([[1.0, 1.0, 1.0]] * 4, [[138, 169, 138]] * 4, ["T1", "T1ce", "T2", "FLAIR"], [], [9, 1, 1, 1])


def ct_like() -> Fingerprint:
    return Fingerprint([[2.5, 0.8, 0.8]] * 4, [[120, 512, 512]] * 4, ["CT"], [CT_STATS], [99, 1])


# ------------------------------------------------------------------------------------------- target spacing
def test_target_spacing_is_the_median_without_anisotropy():
    spacings = [[1.0, 0.5, 0.5], [2.0, 0.7, 0.7], [3.0, 0.9, 0.9]]
    shapes = [[100, 200, 200]] * 3
    np.testing.assert_allclose(target_spacing(spacings, shapes), [2.0, 0.7, 0.7])


def test_target_spacing_anisotropic_axis_takes_its_10th_percentile():
    spacings = [[10, 1.5, 1.5], [6, 1.5, 1.5], [8, 1.5, 1.5], [5, 1.5, 1.5], [10, 1.5, 1.5]]
    shapes = [[12, 230, 230]] * 5  # 12 * 3 < 230: few slices; median 8 > 3 * 1.5: thick slices
    # sorted z spacings 5, 6, 8, 10, 10: the 10th percentile lies 0.4 of the way from 5 to 6
    np.testing.assert_allclose(target_spacing(spacings, shapes), [5.4, 1.5, 1.5])
    # the same spacings with many slices: not anisotropic in voxels, the median stays
    np.testing.assert_allclose(target_spacing(spacings, [[100, 230, 230]] * 5), [8.0, 1.5, 1.5])
    # a 10th percentile finer than the in-plane spacing is raised to it (+ 1e-5)
    spacings = [[0.5, 1.5, 1.5], [0.5, 1.5, 1.5], [5, 1.5, 1.5], [5, 1.5, 1.5], [5, 1.5, 1.5]]
    np.testing.assert_allclose(target_spacing(spacings, shapes), [1.5 + 1e-5, 1.5, 1.5], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------- topology
def test_pooling_per_axis_and_kernels_for_thick_slices():
    # (2.5, 0.8, 0.8) mm, patch 48 x 224 x 192, worked by hand:
    # stage 1: z is 3.1x coarser -> pool y, x only, kernel 1x3x3; spacing (2.5, 1.6, 1.6), size (48, 112, 96)
    # stages 2-4: all axes within 2x -> pool all, kernels 3x3x3; size (6, 14, 12) after stage 4
    # stage 5: z has 6 < 2 * 4 voxels -> pool y, x; size (6, 7, 6); then no axis has >= 8 voxels
    topo = pool_and_conv_props([2.5, 0.8, 0.8], [48, 224, 192])
    assert topo.strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert topo.kernel_sizes == [[1, 3, 3]] + [[3, 3, 3]] * 5
    assert topo.num_pool_per_axis == [3, 5, 5]
    assert topo.divisor == [8, 32, 32]
    assert topo.patch_size == [48, 224, 192]


def test_pooling_stops_at_the_minimum_feature_map_and_pads_the_patch():
    # 20 x 13: both axes pooled once (10 x 7); then only axis 0 has >= 8 voxels and a lone axis needs >= 12
    topo = pool_and_conv_props([1.0, 1.0], [20, 13])
    assert topo.strides == [[1, 1], [2, 2]]
    assert topo.kernel_sizes == [[3, 3], [3, 3]]
    assert topo.patch_size == [20, 14]  # 13 padded to a multiple of 2
    # 40 x 6: axis 1 never pools (< 8); a lone axis 0 pools while it has >= 12 voxels: 40 -> 20 -> 10
    topo = pool_and_conv_props([1.0, 1.0], [40, 6])
    assert topo.strides == [[1, 1], [2, 1], [2, 1]]
    assert topo.divisor == [4, 1]
    assert topo.patch_size == [40, 6]


def test_kernel_rule_compares_with_the_finest_spacing_of_all_axes():
    # (4, 1, 1) mm, patch 40 x 8 x 200, by hand: stage 1 pools y, x (z is 4x coarser; kernel 1x3x3) -> size
    # (40, 4, 100), spacing (4, 2, 2); y is now too short (4 < 8); stage 2 pools x alone (z is 2x the finest
    # poolable spacing) -> spacing (4, 2, 4); stages 3-5 pool z and x; z keeps kernel 1 because it stays 2x coarser
    # than y, whose spacing (2) is still the finest of all axes although y no longer pools
    topo = pool_and_conv_props([4.0, 1.0, 1.0], [40, 8, 200])
    assert topo.strides == [[1, 1, 1], [1, 2, 2], [1, 1, 2], [2, 1, 2], [2, 1, 2], [2, 1, 2]]
    assert topo.kernel_sizes == [[1, 3, 3]] * 5 + [[3, 3, 3]]
    assert topo.divisor == [8, 2, 32] and topo.patch_size == [40, 8, 224]


def test_feature_map_size_by_hand():
    # 8 x 8, stages (32 @ 8x8, 64 @ 4x4), 2 classes: encoder 2*32*64 + 2*64*16, decoder (2 convs + transposed
    # conv) 3*32*64, output 2*64
    assert estimate_feature_map_size([8, 8], [[1, 1], [2, 2]], [32, 64], 2) == 6144 + 6144 + 128


# ------------------------------------------------------------------------------------------------ plans
def small_fingerprint(cases: int = 100) -> Fingerprint:
    return Fingerprint([[1.0, 1.0, 1.0]] * cases, [[40, 48, 40]] * cases, ["MRI"], [], [90, 10])


def test_small_plan_by_hand():
    plan = plan_experiment(small_fingerprint())
    c3 = plan.configurations["3d_fullres"]
    # the 256^3 start is clipped to the median 40 x 48 x 40; three pools per axis (-> 5 x 6 x 5), divisible by 8
    assert c3.patch_size == [40, 48, 40] and c3.strides == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert c3.filters == [32, 64, 128, 256] and c3.upsample_kernel_size == [[2, 2, 2]] * 3
    # feature maps: stage voxels 76800, 9600, 1200, 150: encoder 2*(32*76800 + 64*9600 + 128*1200 + 256*150) =
    # 6528000, decoder 3*(32*76800 + 64*9600 + 128*1200) = 9676800, output 2*76800
    assert c3.feature_map_size == 6528000 + 9676800 + 153600
    # the budget allows round(560e6 / 16358400 * 2) = 68, but 5% of 100 cases is 5 patches
    assert c3.batch_size == 5
    c2 = plan.configurations["2d"]
    assert c2.patch_size == [48, 40] and c2.axes == [1, 2] and c2.slice_axis == 0
    assert c2.filters == [32, 64, 128, 256]
    # 5% of the dataset's 100 * 76800 voxels in 48 x 40 slices: 200 (the budget would allow 1832)
    assert c2.batch_size == 200
    assert plan.configuration == "3d_fullres" and plan.dimension == "3d" and plan.patch_size == [40, 48, 40]


def test_memory_budget_shrinks_the_axis_largest_relative_to_the_median():
    # budget 1/7 GB: reference 560e6 / 8 / 7 = 1e7 feature-map voxels for batch 2; 40x48x40 needs 16358400.
    # ratios to the median all 1 -> the last axis: 40x48x32 (13086720); then y (48/48 > 40/40 is false, ties go to
    # the last tied axis: ratios 1, 1, 0.8 -> y): 40x40x32 (10905600); then z: 32x40x32 (8724480 < 1e7)
    plan = plan_experiment(small_fingerprint(), gpu_memory_target_gb=1 / 7)
    c3 = plan.configurations["3d_fullres"]
    assert c3.patch_size == [32, 40, 32]
    assert c3.feature_map_size == 8724480
    assert c3.batch_size == 2  # round(1e7 / 8724480 * 2) = 2
    with pytest.raises(ValueError, match="gpu_memory_target_gb"):
        plan_experiment(small_fingerprint(), gpu_memory_target_gb=1e-6)


def test_reference_plans_brain_and_ct():
    # nnU-Net 2.8.1's plans for these fingerprints (see the parity test below)
    brain = plan_experiment(brain_like())
    assert brain.patch_size == [128, 128, 128] and brain.batch_size == 2 and len(brain.strides) == 6
    assert brain.filters == [32, 64, 128, 256, 320, 320]
    assert [n.scheme for n in brain.normalization] == ["zscore"] * 4
    ct = plan_experiment(ct_like())
    assert ct.patch_size == [48, 224, 192] and ct.batch_size == 2
    assert ct.strides[:2] == [[1, 1, 1], [1, 2, 2]] and ct.kernel_size[0] == [1, 3, 3]
    assert ct.spacing == [2.5, 0.8, 0.8]
    assert ct.normalization[0].to_dict() == {"scheme": "ct", "use_mask": False, "clip": [-50.0, 300.0], "mean": 100.0,
                                             "std": 50.0}  # fmt: skip
    assert ct.configurations["2d"].patch_size == [512, 512] and ct.configurations["2d"].filters[-1] == 512


def test_sizes_come_back_in_the_data_axis_order():
    # the coarse axis is H: nnU-Net plans it first; the plan reports D, H, W
    fp = Fingerprint([[0.7, 3.0, 0.7]] * 6, [[300, 60, 280 + i] for i in range(6)], ["T2"])
    plan = plan_experiment(fp, num_classes=3)
    c3 = plan.configurations["3d_fullres"]
    assert plan.transpose_forward == [1, 0, 2]
    assert c3.patch_size == [224, 40, 192]
    assert c3.kernel_size[0] == [3, 1, 3] and c3.strides[1] == [2, 1, 2]
    c2 = plan.configurations["2d"]
    assert c2.axes == [0, 2] and c2.slice_axis == 1 and c2.spacing == [0.7, 0.7]


def test_effectively_2d_data_plans_2d_only():
    fp = Fingerprint([[999.0, 0.5, 0.5]] * 30, [[1, 400 + i, 512 - i] for i in range(30)], ["rgb_to_0_1"] * 3)
    plan = plan_experiment(fp)
    assert list(plan.configurations) == ["2d"] and plan.configuration == "2d" and plan.dimension == "2d"
    assert plan.patch_size == [448, 512] and plan.batch_size == 2  # 5% of 30 slices rounds down to 1 -> minimum 2
    with pytest.raises(ValueError, match="2D"):
        plan_experiment(fp, dimension="3d")
    assert plan_experiment(brain_like(), dimension="2d").configuration == "2d"


def test_normalisation_schemes_and_apply():
    fp = Fingerprint([[1, 1, 1]] * 2, [[20, 20, 20]] * 2, ["CT", "T2"], [CT_STATS, ChannelStats()], [5, 5],
                     median_relative_size_after_cropping=0.5)  # fmt: skip
    ct, mr = plan_experiment(fp).normalization
    assert ct.scheme == "ct" and ct.clip == (-50.0, 300.0) and not ct.use_mask
    assert mr.scheme == "zscore" and mr.use_mask  # cropping left half the image: z-score inside the region
    np.testing.assert_allclose(ct.apply(np.array([-100.0, 100.0, 400.0])), [-3.0, 0.0, 4.0])
    x = np.array([0.0, 1.0, 3.0, 0.0])
    mask = x != 0
    np.testing.assert_allclose(mr.apply(x, mask), [0.0, -1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="CT normalisation"):
        plan_experiment(Fingerprint([[1, 1, 1]], [[20, 20, 20]], ["CT"]))
    with pytest.raises(ValueError, match="scheme"):
        ChannelNormalization("minmax")


def test_plan_is_deterministic_and_round_trips_through_json(tmp_path):
    a, b = plan_experiment(ct_like()), plan_experiment(ct_like())
    assert a.to_dict() == b.to_dict()
    path = a.to_json(tmp_path / "plan.json")
    loaded = Plan.from_json(path)
    assert loaded == a and loaded.to_dict() == a.to_dict()
    d = json.loads(path.read_text())
    assert d["patch_size"] == [48, 224, 192] and d["upsample_kernel_size"] == d["strides"][1:]
    assert a.dynunet_kwargs() == {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size":
                                  a.kernel_size, "strides": a.strides, "upsample_kernel_size": a.strides[1:],
                                  "filters": a.filters}  # fmt: skip
    d["patch_size"] = [64, 64, 64]  # a hand edit of the top-level copy is refused, not silently ignored
    with pytest.raises(ValueError, match="patch_size"):
        Plan.from_dict(d)
    fp = ct_like()
    assert Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp


# ---------------------------------------------------------------------------------------------- fingerprint
def synthetic_cases():
    # case 0: a 4 x 5 x 6 non-zero block inside zeros (two channels), foreground label 1 with value 10 / 1
    img0 = np.zeros((2, 8, 9, 10), np.float32)
    img0[:, 2:6, 2:7, 3:9] = 5.0
    lab0 = np.zeros((8, 9, 10), np.int64)
    lab0[3:5, 3:5, 4:6] = 1  # 8 voxels
    img0[0][lab0 == 1], img0[1][lab0 == 1] = 10.0, 1.0
    lab0[2, 2, 3] = 255  # ignored: neither foreground nor a class
    # case 1: no zeros (nothing cropped), class 2 on 12 voxels with value 20 / 3
    img1 = np.full((2, 6, 6, 6), 7.0, np.float32)
    lab1 = np.zeros((6, 6, 6), np.int64)
    lab1[0:2, 0:2, 0:3] = 2
    img1[0][lab1 == 2], img1[1][lab1 == 2] = 20.0, 3.0
    return [(img0, lab0, (3.0, 1.0, 1.0)), (img1, lab1, (2.0, 0.5, 0.5))]


def test_fingerprint_of_small_arrays_by_hand():
    fp = compute_fingerprint(synthetic_cases(), ["CT", "MRI"], samples_per_case=1000)
    assert fp.spacings == [[3.0, 1.0, 1.0], [2.0, 0.5, 0.5]]
    assert fp.shapes_after_crop == [[4, 5, 6], [6, 6, 6]]
    assert fp.median_relative_size_after_cropping == pytest.approx((120 / 720 + 1.0) / 2)
    # 1000 samples of 10 and 1000 of 20 in channel 0; of 1 and 3 in channel 1
    s0, s1 = fp.intensity_stats
    assert (s0.mean, s0.std, s0.median, s0.min, s0.max) == (15.0, 5.0, 15.0, 10.0, 20.0)
    assert (s0.percentile_00_5, s0.percentile_99_5) == (10.0, 20.0)
    assert (s1.mean, s1.min, s1.max) == (2.0, 1.0, 3.0)
    # classes over the whole volumes, 255 excluded: 720 - 8 - 1 + 216 - 12 background voxels
    assert fp.class_voxel_counts == [915, 8, 12]
    assert fp.class_frequencies == pytest.approx([915 / 935, 8 / 935, 12 / 935])
    with pytest.raises(ValueError, match="channels"):
        compute_fingerprint(synthetic_cases(), ["CT"])
    with pytest.raises(ValueError, match="num_classes"):
        compute_fingerprint(synthetic_cases(), ["CT", "MRI"], num_classes=2)


def test_fingerprint_sampling_is_seeded_and_crop_fills_holes():
    img = np.zeros((1, 7, 7, 7), np.float32)
    img[0, 1:6, 1:6, 1:6] = np.arange(125).reshape(5, 5, 5) + 1.0
    img[0, 3, 3, 3] = 0.0  # an enclosed hole: still inside the region
    lab = (img[0] > 60).astype(np.int64)
    cropped, cropped_lab = crop_to_nonzero(img, lab)
    assert cropped.shape == (1, 5, 5, 5) and cropped_lab.shape == (5, 5, 5)
    runs = [compute_fingerprint([(img, lab, (1, 1, 1))], ["MRI"], samples_per_case=50, seed=s) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0].intensity_stats != runs[2].intensity_stats
    assert runs[0].intensity_stats[0].min > 60


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_plans_an_msd_folder(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    from maskworks.cli.plan import add_parser

    root = tmp_path / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        affine = np.diag([0.75, 0.75, 2.5, 1.0])  # NIfTI (x, y, z) zooms
        for c in range(2):
            data = rng.normal(100, 20, (24, 20, 10)).astype(np.float32)  # (x, y, z)
            nib.save(nib.Nifti1Image(data, affine), root / "imagesTr" / f"case{i}_{c:04d}.nii.gz")
        lab = np.zeros((24, 20, 10), np.uint8)
        lab[5:15, 4:12, 2:6] = 1
        nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT", "1": "T2"}, "labels": {"bg": 0, "x": 1}})
    )

    image, label, spacing = next(iter_msd_cases(root))
    assert image.shape == (2, 10, 20, 24) and label.shape == (10, 20, 24) and spacing == [2.5, 0.75, 0.75]

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "out" / "plan.json"
    args = parser.parse_args(["plan", str(root), "--out", str(out), "--no-progress", "--samples-per-case", "100"])
    assert args.func(args) == 0
    plan = Plan.from_json(out)
    assert plan.num_input_channels == 2 and plan.num_classes == 2 and plan.spacing == [2.5, 0.75, 0.75]
    assert [n.scheme for n in plan.normalization] == ["ct", "zscore"]
    # z is 3.3x coarser: pooled from the second stage on; the whole 10 x 20 x 24 median image fits
    assert plan.patch_size == [10, 20, 24] and plan.strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    assert plan.kernel_size[0] == [1, 3, 3] and plan.batch_size == 2
    text = capsys.readouterr().out
    assert "3d_fullres (selected)" in text and "channel 0 (CT): ct" in text


# ------------------------------------------------------------------------------------------- nnU-Net parity
NN_SCHEMES = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none",
              "RescaleTo01Normalization": "rescale_to_0_1", "RGBTo01Normalization": "rgb_to_0_1"}  # fmt: skip

PARITY_FINGERPRINTS = {
    "brain": (brain_like(), 4, 8.0),
    "ct": (ct_like(), 2, 8.0),
    "anisotropic": (
        Fingerprint(
            [[10, 1.5, 1.5], [6, 1.4, 1.4], [8, 1.6, 1.6], [5, 1.25, 1.25], [10, 1.5, 1.5]],
            [[9, 220, 250], [15, 200, 230], [12, 256, 216], [18, 230, 240], [8, 240, 240]],
            ["MRI"],
            median_relative_size_after_cropping=0.6,
        ),  # fmt: skip
        4,
        8.0,
    ),
    "flat_2d": (
        Fingerprint([[999, 0.5, 0.5]] * 30, [[1, 400 + i, 512 - i] for i in range(30)], ["rgb_to_0_1"] * 3),
        2,
        8.0,
    ),  # fmt: skip
    "coarse_middle_axis": (Fingerprint([[0.7, 3.0, 0.7]] * 6, [[300, 60, 280 + i] for i in range(6)], ["T2"]), 3, 8.0),
    # the patch search must step 128 -> 112 along x here, not 128 -> 96 (the divisor of the next smaller size)
    "thick_cube": (Fingerprint([[2.5, 0.8, 0.8]] * 5, [[128, 128, 128]] * 5, ["CT"], [CT_STATS]), 2, 8.0),
    "small_big_budget": (
        Fingerprint(
            [[1, 0.8, 0.8], [1.2, 0.9, 0.9], [1, 1, 1]], [[36, 50, 35], [40, 44, 38], [33, 48, 36]], ["nonorm"]
        ),
        3,
        24.0,
    ),
}


def nnunet_plans(fp: Fingerprint, num_labels: int, gpu_gb: float, tmp_path, monkeypatch) -> tuple[dict, list[int]]:
    """nnU-Net's 3d_fullres and 2d plans for a fingerprint, without images on disk: its dataset.json and
    dataset_fingerprint.json in temporary nnUNet_raw / nnUNet_preprocessed folders, the image listing stubbed."""
    import torch
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as dep
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    name = "Dataset999_Planner"
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    (raw / name).mkdir(parents=True)
    (pre / name).mkdir(parents=True)
    dataset = {"channel_names": {str(i): m for i, m in enumerate(fp.modalities)},
               "labels": {f"c{i}": i for i in range(num_labels)}, "numTraining": fp.num_cases, "file_ending": ".nii.gz"}  # fmt: skip
    (raw / name / "dataset.json").write_text(json.dumps(dataset))
    stats = {str(i): s.to_dict() for i, s in enumerate(fp.intensity_stats)}
    fingerprint = {"spacings": fp.spacings, "shapes_after_crop": fp.shapes_after_crop,
                   "foreground_intensity_properties_per_channel": stats,
                   "median_relative_size_after_cropping": fp.median_relative_size_after_cropping}  # fmt: skip
    (pre / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    monkeypatch.setattr(dep, "nnUNet_raw", str(raw))
    monkeypatch.setattr(dep, "nnUNet_preprocessed", str(pre))
    monkeypatch.setattr(dep, "get_filenames_of_train_images_and_targets", lambda *a: {})
    planner = dep.ExperimentPlanner(name, gpu_gb)
    # the first part of ExperimentPlanner.plan_experiment (which also plans 3d_lowres, slowly, and writes files)
    forward, _ = planner.determine_transpose()
    spacing = planner.determine_fullres_target_spacing()
    shapes = [compute_new_shape(s, sp, spacing) for sp, s in zip(fp.spacings, fp.shapes_after_crop)]
    median = np.median(shapes, 0)[forward]
    voxels = float(np.prod(median, dtype=np.float64) * fp.num_cases)
    plans, cache = {}, {}
    # networks are built only to count feature-map voxels: on the meta device that needs no memory and little time
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        if median[0] != 1:
            plans["3d_fullres"] = planner.get_plans_for_configuration(spacing[forward], median, "3d", voxels, cache)
        plans["2d"] = planner.get_plans_for_configuration(spacing[forward][1:], median[1:], "2d", voxels, cache)
    return plans, [int(a) for a in forward]


@pytest.mark.parametrize("key", list(PARITY_FINGERPRINTS))
def test_parity_with_nnunetv2_experiment_planner(key, tmp_path, monkeypatch):
    pytest.importorskip("nnunetv2")
    fp, num_labels, gpu_gb = PARITY_FINGERPRINTS[key]
    ref, forward = nnunet_plans(fp, num_labels, gpu_gb, tmp_path, monkeypatch)
    plan = plan_experiment(fp, gpu_gb, num_classes=num_labels)
    assert sorted(plan.configurations) == sorted(ref) and plan.transpose_forward == forward
    for name, r in ref.items():
        ours = plan.configurations[name]
        arch = r["architecture"]["arch_kwargs"]

        def to_planning(v):  # our data axis order -> nnU-Net's planning order (3D only; 2D is already in it)
            return [v[a] for a in forward] if len(v) == 3 else list(v)

        assert to_planning(ours.patch_size) == [int(p) for p in r["patch_size"]], name
        assert ours.batch_size == r["batch_size"], name
        np.testing.assert_allclose(to_planning(ours.spacing), r["spacing"], rtol=1e-12)
        assert [to_planning(s) for s in ours.strides] == [list(s) for s in arch["strides"]], name
        assert [to_planning(k) for k in ours.kernel_size] == [list(k) for k in arch["kernel_sizes"]], name
        assert ours.filters == list(arch["features_per_stage"]), name
        assert [n.scheme for n in plan.normalization] == [NN_SCHEMES[s] for s in r["normalization_schemes"]]
        assert [n.use_mask for n in plan.normalization] == list(r["use_mask_for_norm"])


def test_parity_feature_map_size_and_fingerprint_with_nnunetv2():
    pytest.importorskip("nnunetv2")
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero as nn_crop

    # the memory estimate equals PlainConvUNet.compute_conv_feature_map_size on anisotropic 3D and on 2D topologies
    for spacing, patch, classes in (([3.0, 0.7, 0.7], [20, 96, 80], 3), ([1.0, 1.0], [96, 64], 5)):
        topo = pool_and_conv_props(spacing, patch)
        n = len(topo.strides)
        filters = [min(32 * 2**i, 320) for i in range(n)]
        with torch.device("meta"):
            net = PlainConvUNet(2, n, filters, torch.nn.Conv3d if len(patch) == 3 else torch.nn.Conv2d,
                                topo.kernel_sizes, topo.strides, [2] * n, classes, [2] * (n - 1))  # fmt: skip
        expected = int(net.compute_conv_feature_map_size(topo.patch_size))
        assert estimate_feature_map_size(topo.patch_size, topo.strides, filters, classes) == expected

    # the fingerprint's cropping and foreground sampling equal nnU-Net's (same seed, same draws)
    rng = np.random.default_rng(1)
    cases = []
    for shape, spacing in (((9, 11, 10), (2.0, 1.0, 1.0)), ((8, 12, 13), (2.5, 0.9, 0.9))):
        img = np.zeros((2, *shape), np.float32)
        img[:, 1:-2, 2:-1, 1:-1] = rng.normal(50, 10, (2, shape[0] - 3, shape[1] - 3, shape[2] - 2))
        lab = (rng.random(shape) < 0.3).astype(np.int64) * (img[0] != 0)
        cases.append((img, lab, spacing))
    ours = compute_fingerprint(cases, ["CT", "MRI"], samples_per_case=500)
    samples = [[], []]
    for img, lab, _ in cases:
        data, seg, _ = nn_crop(img.copy(), lab[None].copy())
        assert list(data.shape[1:]) in ours.shapes_after_crop
        drawn, _ = DatasetFingerprintExtractor.collect_foreground_intensities(seg, data, num_samples=500)
        for c in range(2):
            samples[c].append(drawn[c])
    for c in range(2):
        values = np.concatenate(samples[c])
        p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        s = ours.intensity_stats[c]
        # same draws: equal to float32 rounding (nnU-Net sums in float32, we in float64)
        expected = [np.mean(values), np.std(values), median, p005, p995]
        assert [s.mean, s.std, s.median, s.percentile_00_5, s.percentile_99_5] == pytest.approx(expected, rel=1e-6)
        assert (s.min, s.max) == (values.min(), values.max())


def test_parity_pool_and_conv_props_with_nnunetv2():
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    rng = np.random.default_rng(0)
    for _ in range(300):
        dim = int(rng.integers(2, 4))
        spacing = [float(v) for v in rng.choice([0.5, 0.7, 0.8, 1.0, 1.5, 2.5, 3.0, 5.0], dim)]
        patch = [int(v) for v in rng.integers(1, 300, dim)]
        pools, strides, kernels, padded, divisor = get_pool_and_conv_props(spacing, patch, 4, 999999)
        topo = pool_and_conv_props(spacing, patch)
        assert topo.num_pool_per_axis == list(pools), (spacing, patch)
        assert topo.strides == [list(s) for s in strides] and topo.kernel_sizes == [list(k) for k in kernels]
        assert topo.patch_size == [int(p) for p in padded] and topo.divisor == [int(d) for d in divisor]
