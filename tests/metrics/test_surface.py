"""SurfaceDistance: hand-computed HD / HD95 / ASSD, MONAI parity in 2-D and 3-D, ignore and empty masks, streaming."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from maskworks.metrics.surface import SurfaceDistance

IGNORE = 255
SQRT2 = math.sqrt(2.0)


def _square(shape, rows, cols, value=1, dtype=torch.long):
    x = torch.zeros(shape, dtype=dtype)
    x[..., rows[0] : rows[1], cols[0] : cols[1]] = value
    return x


def _single(pred, target, k=2, **kwargs):
    sd = SurfaceDistance(k, **kwargs)
    sd.update(pred, target)
    return sd


def _blob_pair(rng, shape, k, sigma=2.5):
    """Smooth random label maps (B, *spatial): a target and a perturbed prediction with a few stray pixels."""
    preds, targets = [], []
    for _ in range(shape[0]):
        scores = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape[1:]), sigma) for _ in range(k)])
        noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape[1:]), sigma) for _ in range(k)])
        t = scores.argmax(0)
        p = (scores + 0.5 * noise).argmax(0)
        stray = rng.random(shape[1:]) < 0.003
        p[stray] = rng.integers(0, k, int(stray.sum()))
        preds.append(p)
        targets.append(t)
    return np.stack(preds), np.stack(targets)


def _one_hot(labels: np.ndarray, k: int) -> torch.Tensor:
    """(B, K, *spatial) float one-hot; ignored pixels get an all-zero vector (MONAI's sentinel ignore)."""
    x = torch.as_tensor(labels, dtype=torch.long)
    valid = x != IGNORE
    oh = torch.nn.functional.one_hot(torch.where(valid, x, 0), k).movedim(-1, 1).float()
    return oh * valid.unsqueeze(1)


# ---------------------------------------------------------------------------------------------- hand-computed
def test_squares_offset_by_three_pixels():
    target = _square((1, 32, 32), (10, 20), (10, 20))
    pred = _square((1, 32, 32), (10, 20), (13, 23))
    r = _single(pred, target, class_names=["bg", "fg"]).compute()
    # pred -> target: top/bottom rows 0 x7, 1, 2, 3 each; left column (col 13) min(3, r-10, 19-r) = 1,2,3,3,3,3,2,1;
    # right column (col 22) 3 x8. Sum 54 over 36 edge pixels; target -> pred is the mirror image.
    assert math.isnan(r["hd"][0]) and r["hd"][1] == 3.0
    assert r["hd95"][1] == 3.0  # 14 of the 36 sorted distances are 3, so the 95th percentile is 3
    assert r["assd"][1] == pytest.approx(108 / 72)
    assert (r["mhd"], r["mhd95"], r["massd"]) == (3.0, 3.0, pytest.approx(1.5))
    assert r["num_images"] == 1 and r["num_finite"] == [0, 1] and r["class_names"] == ["bg", "fg"]


def test_far_outlier_pixel_moves_hd_but_not_hd95():
    target = _square((1, 64, 100), (4, 44), (4, 44))  # 40 x 40 square, 156 edge pixels
    pred = target.clone()
    pred[0, 20, 90] = 1  # one stray pixel 47 columns right of the square's edge (col 43)
    r = _single(pred, target).compute()
    assert r["hd"][1] == pytest.approx(47.0)
    assert r["hd95"][1] == 0.0  # 156 zeros and one 47 in pred -> target; all zeros in target -> pred
    assert r["assd"][1] == pytest.approx(47 / (157 + 156))


def test_assd_pools_the_two_directions_like_monai():
    target = _square((1, 11, 11), (4, 7), (4, 7))  # 3 x 3 square: 8 edge pixels around an eroded centre
    pred = _square((1, 11, 11), (5, 6), (5, 6))  # its centre pixel
    r = _single(pred, target).compute()
    # pred -> target: [1]; target -> pred: 4 x 1 and 4 x sqrt(2)
    assert r["hd"][1] == pytest.approx(SQRT2)
    assert r["hd95"][1] == pytest.approx(SQRT2)
    pooled = (1 + 4 + 4 * SQRT2) / 9
    mean_of_means = (1 + (4 + 4 * SQRT2) / 8) / 2
    assert r["assd"][1] == pytest.approx(pooled)
    assert abs(pooled - mean_of_means) > 0.01  # the two conventions really differ here


def test_spacing_scales_each_axis():
    square_t = _square((1, 32, 32), (10, 20), (10, 20))
    square_p = _square((1, 32, 32), (10, 20), (13, 23))  # shifted along W (axis 1)
    assert _single(square_p, square_t, spacing=(2.0, 1.0)).compute()["hd"][1] == pytest.approx(3.0)
    assert _single(square_p, square_t, spacing=0.5).compute()["hd"][1] == pytest.approx(1.5)
    assert _single(square_p, square_t, spacing=(0.5, 0.5)).compute()["assd"][1] == pytest.approx(0.75)
    # a wide bar shifted by 3 rows along H (axis 0): 3 rows x 2 units = 6, the columns are far away
    bar_t = _square((1, 40, 50), (10, 20), (10, 40))
    bar_p = _square((1, 40, 50), (13, 23), (10, 40))
    assert _single(bar_p, bar_t).compute()["hd"][1] == pytest.approx(3.0)
    assert _single(bar_p, bar_t, spacing=(2.0, 1.0)).compute()["hd"][1] == pytest.approx(6.0)
    # spacing given to update() overrides the constructor's
    sd = SurfaceDistance(2, spacing=(1.0, 1.0))
    sd.update(bar_p, bar_t, spacing=[2, 1])
    assert sd.values["hd"][0, 1] == pytest.approx(6.0)


def test_3d_shift_along_depth():
    target = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    target[0, 2:8, 2:10, 2:10] = 1
    pred = torch.roll(target, 2, dims=1)
    assert _single(pred, target).compute()["hd"][1] == pytest.approx(2.0)
    assert _single(pred, target, spacing=(3.0, 1.0, 1.0)).compute()["hd"][1] == pytest.approx(6.0)


# ---------------------------------------------------------------------------------------------- MONAI parity
def _monai_tables(pred, target, k, include_background, spacing):
    metrics = pytest.importorskip("monai.metrics")
    kw = {} if spacing is None else {"spacing": spacing}
    common = {"include_background": include_background, "reduction": "none", "ignore_index": IGNORE}
    refs = {
        "hd": metrics.HausdorffDistanceMetric(**common),
        "hd95": metrics.HausdorffDistanceMetric(percentile=95, **common),
        "assd": metrics.SurfaceDistanceMetric(symmetric=True, **common),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks
        return {name: m(_one_hot(pred, k), _one_hot(target, k), **kw).double().numpy() for name, m in refs.items()}


@pytest.mark.parametrize(
    ("shape", "k", "include_background", "spacing"),
    [
        ((3, 48, 48), 4, False, None),
        ((3, 48, 48), 4, True, (2.0, 0.5)),
        ((2, 14, 18, 18), 3, False, (1.5, 1.0, 0.7)),
        ((2, 14, 18, 18), 3, True, None),
    ],
    ids=["2d", "2d-bg-spacing", "3d-spacing", "3d-bg"],
)
def test_parity_with_monai(shape, k, include_background, spacing):
    rng = np.random.default_rng(sum(shape) + k)
    pred, target = _blob_pair(rng, shape, k)
    target[0, : shape[1] // 4] = IGNORE  # an ignored band (MONAI: ignore_index on all-zero one-hot pixels)
    pred[0, : shape[1] // 4] = rng.integers(0, k, pred[0, : shape[1] // 4].shape)
    pred[1][pred[1] == k - 1] = 0  # class k-1 never predicted in image 1 -> inf
    target[-1][target[-1] == 1] = 0  # class 1 absent from the target of the last image -> inf
    sd = SurfaceDistance(k, include_background=include_background, spacing=spacing)
    sd.update(pred, target)
    ours = sd.values
    ref = _monai_tables(pred, target, k, include_background, spacing)
    cols = slice(0 if include_background else 1, None)
    assert np.isinf(ours["hd"][:, cols]).any()
    for name in ("hd", "assd"):
        np.testing.assert_allclose(ours[name][:, cols], ref[name], rtol=1e-5, atol=1e-4, err_msg=name)
    # MONAI's percentile HD turns "exactly one mask empty" into NaN (quantile of infinities); ours reports inf
    ref95 = np.where(np.isinf(ref["hd"]), np.inf, ref["hd95"])
    np.testing.assert_allclose(ours["hd95"][:, cols], ref95, rtol=1e-5, atol=1e-4, err_msg="hd95")
    assert np.isnan(ref["hd95"][np.isinf(ref["hd"])]).all()
    # per-class means: MONAI's mean over images (mean_batch) of the finite values
    r = sd.compute()
    for name in ("hd", "hd95", "assd"):
        vals = np.where(np.isfinite(ref[name]), ref[name], np.nan)
        expected = [np.nanmean(col) if np.isfinite(col).any() else math.nan for col in vals.T]
        np.testing.assert_allclose(r[name][cols], expected, rtol=1e-5, atol=1e-4, err_msg=name)


# ---------------------------------------------------------------------------------------------- ignore / empty
def test_ignored_pixels_belong_to_no_class():
    target = _square((1, 30, 30), (5, 25), (5, 25))
    target[:, :, 15:] = IGNORE  # right half of the image ignored, cutting the square
    cut = _square((1, 30, 30), (5, 25), (5, 15))
    full = _square((1, 30, 30), (5, 25), (5, 25))
    # the prediction in the ignored half never matters, whatever it is
    noisy = full.clone()
    noisy[:, :, 15:] = torch.randint(0, 3, (1, 30, 15), generator=torch.Generator().manual_seed(0))
    results = [_single(p, target, k=3, include_background=True).values for p in (cut, full, noisy)]
    for other in results[1:]:  # background included: band pixels predicted as 1 or 2 are not background misses
        for name in ("hd", "hd95", "assd"):
            np.testing.assert_array_equal(other[name], results[0][name])
    assert results[0]["hd"][0, 1] == 0.0 and results[0]["hd"][0, 0] == 0.0  # the cut edges coincide
    assert np.isnan(results[0]["hd"][0, 2])  # class 2 only ever predicted inside the band: absent from both


def test_all_ignored_image_is_nan_and_counted():
    target = torch.full((2, 16, 16), IGNORE, dtype=torch.uint8)
    target[1, 4:8, 4:8] = 1
    target[1][target[1] == IGNORE] = 0
    pred = torch.full((2, 16, 16), 7, dtype=torch.uint8)  # out-of-range labels are fine where ignored
    pred[1] = target[1]
    sd = _single(pred, target, k=3)
    v = sd.values
    assert np.isnan(v["hd"][0]).all() and np.isnan(v["assd"][0]).all()
    r = sd.compute()
    assert r["num_images"] == 2
    assert r["num_both_empty"] == [0, 1, 2]  # class 0 not evaluated; class 2 absent from both images
    assert r["hd"][1] == 0.0 and math.isnan(r["hd"][2]) and r["mhd"] == 0.0


def test_empty_prediction_or_target_is_inf_and_left_out_of_means():
    target = _square((3, 20, 20), (4, 10), (4, 10))
    pred = target.clone()
    pred[0] = 0  # image 0: object missed
    pred[1, 4:10, 12:18] = 1  # image 1: a second blob 2 px right of the first
    target[2] = 0  # image 2: hallucinated object
    sd = _single(pred, target)
    v = sd.values
    assert np.isinf(v["hd"][[0, 2], 1]).all() and np.isinf(v["hd95"][[0, 2], 1]).all()
    assert np.isinf(v["assd"][[0, 2], 1]).all() and np.isnan(v["hd"][:, 0]).all()
    r = sd.compute(per_image=True)
    assert r["num_pred_empty"] == [0, 1] and r["num_target_empty"] == [0, 1]
    assert r["num_finite"] == [0, 1] and r["num_both_empty"] == [0, 0]
    assert r["hd"][1] == pytest.approx(v["hd"][1, 1]) and r["hd"][1] == 8.0  # far column of the extra blob
    assert math.isinf(r["per_image"]["hd"][0][1]) and len(r["per_image"]["assd"]) == 3
    text = json.dumps(r)  # NaN / Infinity are written, not rejected
    assert "Infinity" in text and "NaN" in text
    # nothing finite at all -> NaN means, no warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r0 = _single(torch.zeros(1, 8, 8, dtype=torch.long), _square((1, 8, 8), (2, 5), (2, 5))).compute()
    assert math.isnan(r0["hd"][1]) and math.isnan(r0["mhd"]) and r0["num_pred_empty"] == [0, 1]


def test_ignore_index_inside_class_range():
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]]])
    sd = _single(target.clone(), target, k=3, include_background=True, ignore_index=0)
    r = sd.compute()
    assert math.isnan(r["hd"][0]) and r["num_both_empty"] == [1, 0, 0]
    assert r["hd"][1:] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------- inputs / streaming
def test_uint8_int16_numpy_and_scores_give_the_same_values():
    rng = np.random.default_rng(3)
    pred, target = _blob_pair(rng, (2, 32, 32), 3)
    target[:, :4] = IGNORE
    ref = _single(torch.as_tensor(pred), torch.as_tensor(target), k=3).values
    variants = [
        (pred.astype(np.uint8), target.astype(np.uint8)),
        (torch.as_tensor(pred, dtype=torch.int16), torch.as_tensor(target, dtype=torch.int16)),
        (np.eye(3, dtype=np.float32)[pred].transpose(0, 3, 1, 2), target.astype(np.uint8)),  # one-hot scores
    ]
    for p, t in variants:
        got = _single(p, t, k=3).values
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name])


def test_batch_equals_streaming_merge_and_reset():
    rng = np.random.default_rng(4)
    pred, target = _blob_pair(rng, (4, 24, 24), 3)
    whole = _single(pred, target, k=3)
    stream = SurfaceDistance(3)
    for i in range(4):
        stream.update(pred[i : i + 1], target[i : i + 1])
    assert json.dumps(stream.compute(per_image=True)) == json.dumps(whole.compute(per_image=True))
    a, b = _single(pred[:1], target[:1], k=3), _single(pred[1:], target[1:], k=3)
    assert json.dumps(a.merge(b).compute(per_image=True)) == json.dumps(whole.compute(per_image=True))
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(SurfaceDistance(3, percentile=90))
    whole.reset()
    r = whole.compute()
    assert r["num_images"] == 0 and all(math.isnan(x) for x in r["hd"]) and math.isnan(r["massd"])
    assert whole.values["hd"].shape == (0, 3)
    whole.update(pred, target)
    assert json.dumps(whole.compute()) == json.dumps(stream.compute())


def test_percentile_parameter():
    target = _square((1, 64, 100), (4, 44), (4, 44))
    pred = target.clone()
    pred[0, 20, 90] = 1
    assert _single(pred, target, percentile=100).compute()["hd95"][1] == pytest.approx(47.0)
    r = _single(pred, target, percentile=99.5).compute()
    assert r["percentile"] == 99.5 and 0 < r["hd95"][1] < 47  # interpolates towards the outlier


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"num_classes": 1}, "include_background=False"),
        ({"num_classes": 2, "percentile": 0}, "percentile"),
        ({"num_classes": 2, "percentile": 101}, "percentile"),
        ({"num_classes": 2, "percentile": True}, "percentile"),
        ({"num_classes": 2, "spacing": -1.0}, "spacing"),
        ({"num_classes": 2, "spacing": (1.0, 0.0)}, "spacing"),
        ({"num_classes": 2, "spacing": "1"}, "spacing"),
        ({"num_classes": 2, "ignore_index": 2.5}, "ignore_index"),
        ({"num_classes": 2, "class_names": ["a"]}, "class_names"),
        ({"num_classes": 2, "include_background": "no"}, "include_background"),
    ],
)
def test_invalid_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SurfaceDistance(**kwargs)


def test_invalid_update_inputs():
    sd = SurfaceDistance(3, spacing=(1.0, 2.0))
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"batch dimension"):
        sd.update(t[0], t[0])
    with pytest.raises(ValueError, match="shapes differ"):
        sd.update(t[:, :4], t)
    with pytest.raises(ValueError, match=r"target holds values outside 0..2.*\[5\]"):
        sd.update(t, torch.full_like(t, 5))
    with pytest.raises(ValueError, match=r"pred holds labels outside 0..2.*\[-1\]"):
        sd.update(torch.full_like(t, -1), t)
    with pytest.raises(ValueError, match="channels in dim 1, expected num_classes=3"):
        sd.update(torch.rand(2, 2, 8, 8), t)
    with pytest.raises(ValueError, match="3 spatial axes"):
        sd.update(torch.zeros(1, 4, 8, 8, dtype=torch.long), torch.zeros(1, 4, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="spacing"):
        sd.update(t, t, spacing=[1.0, -2.0])
    with pytest.raises(TypeError, match="target must hold integer"):
        sd.update(t, t.float())
    with pytest.raises(TypeError, match="numpy.ndarray"):
        sd.update(t.tolist(), t)
    assert sd.num_images == 0  # failed updates store nothing
