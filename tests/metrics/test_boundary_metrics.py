"""BoundaryF1 / BoundaryIoU: hand-computed values, brute-force and reference parity, edge cases, streaming."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.distance import cdist

from maskworks.metrics.boundary import BoundaryF1, BoundaryIoU, _boundary_band

IGNORE = 255


def _square_pair(shift=(0, 1), size=8, lo=2, hi=5):
    """Target: class-1 square rows/cols lo..hi-1 on background 0; pred: the same square moved by ``shift``."""
    target = torch.zeros(size, size, dtype=torch.long)
    target[lo:hi, lo:hi] = 1
    pred = torch.zeros_like(target)
    dy, dx = shift
    pred[lo + dy : hi + dy, lo + dx : hi + dx] = 1
    return pred, target


def _blobs(gen: torch.Generator, k: int, shape, cell: int = 6) -> torch.Tensor:
    """Random smooth label maps (argmax of upsampled noise): blob-shaped regions of ``k`` classes."""
    b, h, w = shape
    z = torch.randn(b, k, h // cell + 2, w // cell + 2, generator=gen)
    return F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False).argmax(1)


def _blob_pair(gen: torch.Generator, k: int, shape, ignore_frac: float = 0.0):
    target = _blobs(gen, k, shape)
    pred = torch.where(torch.rand(shape, generator=gen) < 0.85, target, _blobs(gen, k, shape))
    pred = torch.roll(pred, shifts=(1, -1), dims=(1, 2))
    if ignore_frac:
        blobs = _blobs(gen, 8, shape, cell=4) == 0  # ignored regions, not just isolated pixels
        noise = torch.rand(shape, generator=gen) < ignore_frac
        target[blobs | noise] = IGNORE
    return pred, target


def _nan_equal(a, b, tol=1e-12):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and bool(np.all((np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= tol)))


# ---------------------------------------------------------------------------------------------- reference code
def _np_boundary(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pixels of mask & valid with a valid in-image 4-neighbour outside the mask (written out with loops)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not (mask[y, x] and valid[y, x]):
                continue
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and valid[yy, xx] and not mask[yy, xx]:
                    out[y, x] = True
    return out


def _brute_force_bf1(pred: np.ndarray, target: np.ndarray, k: int, theta: float):
    """Spec of BoundaryF1 with explicit pairwise distances; returns (bf1, precision, recall, bf1_pooled)."""
    f1_sum, f1_cnt = np.zeros(k), np.zeros(k)
    n_p, m_p, n_t, m_t = (np.zeros(k) for _ in range(4))
    for p, t in zip(pred, target):
        valid = t != IGNORE
        for c in range(k):
            pm, tm = (p == c) & valid, (t == c) & valid
            if not pm.any() and not tm.any():
                continue
            bp = np.argwhere(_np_boundary(pm, valid))
            bt = np.argwhere(_np_boundary(tm, valid))
            if len(bp) and len(bt):
                dist = cdist(bp, bt)
                hp = int((dist.min(1) <= theta + 1e-9).sum())
                ht = int((dist.min(0) <= theta + 1e-9).sum())
            else:
                hp = ht = 0
            n_p[c] += len(bp)
            m_p[c] += hp
            n_t[c] += len(bt)
            m_t[c] += ht
            if not (pm.any() and tm.any()):
                f1 = 0.0
            elif len(bp) == 0 and len(bt) == 0:
                f1 = 1.0
            elif len(bp) == 0 or len(bt) == 0:
                f1 = 0.0
            else:
                prec, rec = hp / len(bp), ht / len(bt)
                f1 = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
            f1_sum[c] += f1
            f1_cnt[c] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        bf1 = f1_sum / f1_cnt
        precision = m_p / n_p
        recall = m_t / n_t
        p0, r0 = np.nan_to_num(precision), np.nan_to_num(recall)
        pooled = np.where(p0 + r0 > 0, 2 * p0 * r0 / (p0 + r0), 0.0)
    pooled[(n_p + n_t) == 0] = np.nan
    return bf1, precision, recall, pooled


def _reference_mask_to_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    """boundary-iou-api ``mask_to_boundary`` with scipy in place of cv2 (3x3 erosion, ``d`` times, zero padded)."""
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    eroded = ndimage.binary_erosion(padded, structure=np.ones((3, 3), bool), iterations=d, border_value=0)
    return mask.astype(bool) & ~eroded[1 : h + 1, 1 : w + 1]


def _reference_biou(pred: np.ndarray, target: np.ndarray, k: int, dilation_ratio: float, to_boundary=None):
    to_boundary = to_boundary or _reference_mask_to_boundary
    inter, union = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for p, t in zip(pred, target):
        valid = t != IGNORE
        for c in range(k):
            bg = to_boundary((t == c).astype(np.uint8), dilation_ratio) & valid
            bp = to_boundary(((p == c) & valid).astype(np.uint8), dilation_ratio) & valid
            inter[c] += int((bg & bp).sum())
            union[c] += int((bg | bp).sum())
    return inter, union


# ---------------------------------------------------------------------------------------------- BoundaryF1
def test_bf1_square_shifted_one_pixel_by_hand():
    # 8x8, class-1 3x3 square at rows/cols 2..4; the prediction is moved one column to the right.
    # class 1: each boundary is the 8-pixel ring; the rings share 4 pixels -> P = R = 4/8 at tolerance 0.
    # class 0: the 12 background pixels 4-adjacent to each square; they share 4 -> P = R = 4/12.
    pred, target = _square_pair(shift=(0, 1))
    exact = BoundaryF1(2, tolerance=0, class_names=["bg", "square"])
    exact.update(pred, target)
    r = exact.compute()
    assert r["bf1"] == pytest.approx([1 / 3, 1 / 2])
    assert r["mbf1"] == pytest.approx(5 / 12)
    assert r["precision"] == pytest.approx([4 / 12, 4 / 8]) and r["recall"] == pytest.approx([4 / 12, 4 / 8])
    assert r["bf1_pooled"] == pytest.approx([1 / 3, 1 / 2])
    assert r["num_images"] == 1 and r["num_evaluated"] == [1, 1]
    assert r["class_names"] == ["bg", "square"]
    json.dumps(r)  # plain Python types

    tolerant = BoundaryF1(2, tolerance=1)  # every boundary pixel has a counterpart at distance 1
    tolerant.update(pred, target)
    assert tolerant.compute()["bf1"] == [1.0, 1.0]


def test_bf1_tolerance_is_a_euclidean_disk():
    # Diagonal shift (1, 1): the corner (5, 5) of the moved ring is sqrt(2) from the nearest target ring pixel.
    pred, target = _square_pair(shift=(1, 1))
    scores = {}
    for tol in (1.0, math.sqrt(2), 1.5):
        m = BoundaryF1(2, tolerance=tol)
        m.update(pred, target)
        scores[tol] = m.compute()["mbf1"]
    assert scores[1.0] < 1.0
    assert scores[math.sqrt(2)] == 1.0 and scores[1.5] == 1.0


def test_bf1_tolerance_frac_uses_the_diagonal():
    pred, target = _square_pair(shift=(0, 1), size=8)
    target = F.pad(target, (0, 32, 0, 22))  # 30 x 40 image: diagonal 50
    pred = F.pad(pred, (0, 32, 0, 22))
    m = BoundaryF1(2)
    assert m.theta(360, 480) == pytest.approx(4.5)  # Csurka et al.'s 0.75 % of the diagonal
    for frac, tol in ((0.02, 1), (0.0, 0), (0.019, 0)):  # 0.019 * 50 = 0.95 px < 1 px
        a, b = BoundaryF1(2, tolerance_frac=frac), BoundaryF1(2, tolerance=tol)
        a.update(pred, target)
        b.update(pred, target)
        assert a.compute() == b.compute()
    assert BoundaryF1(2, tolerance=3, tolerance_frac=0.5).theta(30, 40) == 3  # tolerance wins


@pytest.mark.parametrize("theta", [0, 1, 1.5, 2.5])
def test_bf1_matches_brute_force_with_ignore(theta):
    gen = torch.Generator().manual_seed(int(theta * 10))
    k = 4
    pred, target = _blob_pair(gen, k, (3, 18, 22), ignore_frac=0.05)
    pred[0, :3, :3] = 3  # an extra predicted region (possibly of a class the target lacks)
    m = BoundaryF1(k, tolerance=theta)
    m.update(pred, target)
    r = m.compute()
    bf1, precision, recall, pooled = _brute_force_bf1(pred.numpy(), target.numpy(), k, theta)
    assert _nan_equal(r["bf1"], bf1)
    assert _nan_equal(r["precision"], precision)
    assert _nan_equal(r["recall"], recall)
    assert _nan_equal(r["bf1_pooled"], pooled)


def test_bf1_multiclass_maps_stay_in_unit_interval():
    # Regression test for computing the BF score on a whole label map at once (which gave 4.67 for identical maps).
    gen = torch.Generator().manual_seed(0)
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[0, 3:8, 3:8] = 2
    same = BoundaryF1(3, tolerance=2)
    same.update(target.clone(), target)
    r = same.compute()
    assert r["bf1"][0] == 1.0 and r["bf1"][2] == 1.0 and math.isnan(r["bf1"][1]) and r["mbf1"] == 1.0

    pred, target = _blob_pair(gen, 6, (4, 24, 24))
    for tol in (0, 1, 3):
        m = BoundaryF1(6, tolerance=tol)
        m.update(pred, target)
        r = m.compute()
        for key in ("bf1", "bf1_pooled", "precision", "recall"):
            vals = np.asarray(r[key], dtype=float)
            assert np.all(np.isnan(vals) | ((vals >= 0) & (vals <= 1))), key
        assert 0 <= r["mbf1"] <= 1
        ident = BoundaryF1(6, tolerance=tol)
        ident.update(target, target)
        assert ident.compute()["mbf1"] == 1.0


def test_bf1_absent_and_one_sided_classes():
    pred, target = _square_pair(shift=(0, 0))
    pred[0, 0] = 2  # class 2 only in the prediction -> F1 0 for this image
    m = BoundaryF1(4, tolerance=0)  # class 3 absent from both -> skipped (NaN)
    m.update(pred, target)
    r = m.compute()
    # the stray pixel also makes (0, 1) and (1, 0) predicted background boundary: P = 12/14, R = 1 -> F1 = 12/13
    assert r["bf1"][:3] == pytest.approx([12 / 13, 1.0, 0.0]) and math.isnan(r["bf1"][3])
    assert r["num_evaluated"] == [1, 1, 1, 0]
    assert r["mbf1"] == pytest.approx((12 / 13 + 1.0 + 0.0) / 3)
    assert r["precision"][2] == 0.0 and math.isnan(r["recall"][2]) and r["bf1_pooled"][2] == 0.0
    assert math.isnan(r["precision"][3]) and math.isnan(r["bf1_pooled"][3])

    # a second image without class 2 does not change its per-image mean (it is skipped there)
    m.update(target, target)
    r = m.compute()
    assert r["bf1"][2] == 0.0 and r["num_evaluated"] == [2, 2, 1, 0]
    assert r["bf1"][0] == pytest.approx((12 / 13 + 1) / 2)


def test_bf1_empty_prediction_scores_zero():
    pred, target = _square_pair()
    pred.zero_()  # everything predicted as background: background has no boundary, the target's has one
    m = BoundaryF1(2, tolerance=2)
    m.update(pred, target)
    r = m.compute()
    assert r["bf1"] == [0.0, 0.0] and r["mbf1"] == 0.0
    assert r["recall"] == [0.0, 0.0] and all(math.isnan(v) for v in r["precision"])
    assert r["bf1_pooled"] == [0.0, 0.0]


def test_bf1_ignored_pixels_make_no_boundary_and_no_match():
    # Left half class 1, right half ignored: the edge along the ignored region is no boundary, and whatever is
    # predicted under the ignored pixels does not matter. Class 1 is present in both with no boundary pixel -> 1.
    target = torch.full((6, 8), IGNORE, dtype=torch.long)
    target[:, :4] = 1
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        pred = torch.randint(0, 3, (6, 8), generator=gen)
        pred[:, :4] = 1
        m = BoundaryF1(3, tolerance=0)
        m.update(pred, target)
        r = m.compute()
        assert r["bf1"][1] == 1.0 and math.isnan(r["bf1"][0]) and math.isnan(r["bf1"][2])
        assert r["num_evaluated"] == [0, 1, 0]
        assert all(math.isnan(v) for v in r["precision"] + r["recall"])

    # An ignored column between classes 0 and 1: the prediction's 0|1 edge lies on the ignored column and the
    # target's regions end at it, so no pixel is a boundary on either side and nothing can be matched.
    target = torch.zeros(6, 9, dtype=torch.long)
    target[:, 5:] = 1
    target[:, 4] = IGNORE
    pred = torch.zeros_like(target)
    pred[:, 4:] = 1
    m = BoundaryF1(2, tolerance=3)
    m.update(pred, target)
    r = m.compute()
    assert r["bf1"] == [1.0, 1.0]
    assert all(math.isnan(v) for v in r["precision"] + r["recall"] + r["bf1_pooled"])

    # Without the ignored column the same prediction is one column off: boundaries exist and match within 1 px.
    target[:, 4] = 0
    exact, tolerant = BoundaryF1(2, tolerance=0), BoundaryF1(2, tolerance=1)
    exact.update(pred, target)
    tolerant.update(pred, target)
    assert exact.compute()["bf1"] == [0.0, 0.0] and tolerant.compute()["bf1"] == [1.0, 1.0]


def test_bf1_all_ignored_image():
    m = BoundaryF1(3, class_names=["a", "b", "c"])
    m.update(torch.randint(0, 3, (2, 5, 7)), torch.full((2, 5, 7), IGNORE, dtype=torch.uint8))
    r = m.compute()
    assert r["num_images"] == 2 and r["num_evaluated"] == [0, 0, 0]
    assert all(math.isnan(r[key][c]) for key in ("bf1", "bf1_pooled", "precision", "recall") for c in range(3))
    assert math.isnan(r["mbf1"])
    assert math.isnan(BoundaryF1(2).compute()["mbf1"])  # nothing seen: no error


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, np.uint8, np.int16, np.uint16])
def test_narrow_dtypes_with_many_classes_equal_int64(dtype):
    gen = torch.Generator().manual_seed(1)
    k = 200
    target = _blobs(gen, 12, (2, 20, 24), cell=4) * 16 + 7  # labels up to 183
    pred = torch.where(torch.rand(target.shape, generator=gen) < 0.8, target, torch.randint(0, k, target.shape))
    target[:, :2, :3] = IGNORE
    results = []
    for dt in (torch.int64, dtype):
        if isinstance(dt, torch.dtype):
            p, t = pred.to(dt), target.to(dt)
        else:
            p, t = pred.numpy().astype(dt), target.numpy().astype(dt)
        f1, biou = BoundaryF1(k, tolerance=1), BoundaryIoU(k, dilation_ratio=0.05)
        f1.update(p, t)
        biou.update(p, t)
        results.append((f1.compute(), biou.compute()))
    assert _nan_equal(results[0][0]["bf1"], results[1][0]["bf1"], tol=0)
    assert _nan_equal(results[0][1]["boundary_iou"], results[1][1]["boundary_iou"], tol=0)
    assert results[0][0]["num_evaluated"] == results[1][0]["num_evaluated"]


def test_streaming_batches_equal_one_update_and_reset():
    gen = torch.Generator().manual_seed(5)
    k = 5
    pred, target = _blob_pair(gen, k, (6, 20, 26), ignore_frac=0.05)
    for cls, kw in ((BoundaryF1, {"tolerance": 1.5}), (BoundaryF1, {}), (BoundaryIoU, {"dilation_ratio": 0.05})):
        whole, parts = cls(k, **kw), cls(k, **kw)
        whole.update(pred, target)
        for i in range(6):
            parts.update(pred[i], target[i])  # single (H, W) maps
        a, b = whole.compute(), parts.compute()
        assert a.keys() == b.keys() and a["num_images"] == b["num_images"] == 6
        for key in a:
            assert _nan_equal(a[key], b[key]), (cls.__name__, key)
        parts.reset()
        fresh = parts.compute()
        assert fresh["num_images"] == 0
        parts.update(pred, target)
        again = parts.compute()
        assert all(_nan_equal(again[key], a[key]) for key in a)


@pytest.mark.parametrize("chunk_pixels", [2 * 16 * 16, 16])  # two images at a time; one (and no joint histogram)
def test_many_images_are_processed_in_chunks(monkeypatch, chunk_pixels):
    import maskworks.metrics.boundary as mod

    gen = torch.Generator().manual_seed(8)
    pred, target = _blob_pair(gen, 4, (5, 16, 16), ignore_frac=0.05)
    ref_f1, ref_iou = BoundaryF1(4, tolerance=2), BoundaryIoU(4)
    ref_f1.update(pred, target)
    ref_iou.update(pred, target)
    monkeypatch.setattr(mod, "_CHUNK_PIXELS", chunk_pixels)
    f1, biou = BoundaryF1(4, tolerance=2), BoundaryIoU(4)
    f1.update(pred, target)
    biou.update(pred, target)
    a, b = f1.compute(), ref_f1.compute()
    assert all(_nan_equal(a[key], b[key]) for key in a)
    assert biou.intersection.tolist() == ref_iou.intersection.tolist()
    assert biou.union.tolist() == ref_iou.union.tolist()


def test_non_contiguous_inputs_and_huge_tolerance():
    gen = torch.Generator().manual_seed(6)
    pred, target = _blob_pair(gen, 4, (2, 18, 22), ignore_frac=0.05)
    for cls, kw in ((BoundaryF1, {"tolerance": 1.5}), (BoundaryIoU, {"dilation_ratio": 0.05})):
        a, b = cls(4, **kw), cls(4, **kw)
        a.update(pred.transpose(1, 2).contiguous(), target.transpose(1, 2).contiguous())
        b.update(pred.transpose(1, 2), target.numpy().transpose(0, 2, 1).astype(np.uint8))  # strided views
        assert all(_nan_equal(a.compute()[key], b.compute()[key]) for key in a.compute())
    # any two pixels of an 18 x 22 image are at most sqrt(17^2 + 21^2) ~ 27.0 apart
    far, capped = BoundaryF1(4, tolerance=1e6), BoundaryF1(4, tolerance=math.hypot(17, 21))
    far.update(pred, target)
    capped.update(pred, target)
    assert all(_nan_equal(far.compute()[key], capped.compute()[key]) for key in far.compute())
    assert far.compute()["precision"] == [1.0] * 4  # every class is in both maps, so everything matches


def test_float_scores_equal_argmax_labels():
    gen = torch.Generator().manual_seed(2)
    k = 4
    _, target = _blob_pair(gen, k, (2, 14, 18), ignore_frac=0.05)
    scores = torch.randn(2, k, 14, 18, generator=gen)
    for cls in (BoundaryF1, BoundaryIoU):
        a, b, c = cls(k), cls(k), cls(k)
        a.update(scores, target)
        b.update(scores.argmax(1), target)
        c.update(scores[0], target[0])  # (K, H, W) against (H, W)
        assert a.compute().keys() == b.compute().keys()
        for key in a.compute():
            assert _nan_equal(a.compute()[key], b.compute()[key])
        assert c.compute()["num_images"] == 1


@pytest.mark.parametrize("cls", [BoundaryF1, BoundaryIoU])
def test_invalid_arguments_raise_helpful_errors(cls):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        cls(0)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        cls(True)
    with pytest.raises(ValueError, match="ignore_index must be an int or None"):
        cls(3, ignore_index=2.5)
    with pytest.raises(ValueError, match="class_names has 2 entries, expected num_classes=3"):
        cls(3, class_names=["a", "b"])
    m = cls(3)
    t = torch.zeros(4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="shapes differ"):
        m.update(torch.zeros(4, 6, dtype=torch.long), t)
    with pytest.raises(ValueError, match=r"target must be a label map \(H, W\) or a batch \(B, H, W\)"):
        m.update(torch.zeros(1, 1, 4, 5, dtype=torch.long), torch.zeros(1, 1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target holds values outside 0..2 .*\[3, 7\]"):
        m.update(t, torch.tensor([[0, 3, 7, 1, 255]] * 4))
    with pytest.raises(ValueError, match=r"pred holds labels outside 0..2: \[-1\]"):
        m.update(torch.full((4, 5), -1), t)
    with pytest.raises(ValueError, match="float pred has 2 channels in dim 1, expected num_classes=3"):
        m.update(torch.randn(1, 2, 4, 5), t[None])
    with pytest.raises(TypeError, match="target must hold integer class ids"):
        m.update(t, t.float())
    with pytest.raises(TypeError, match="pred must be a torch.Tensor or numpy.ndarray"):
        m.update(t.tolist(), t)
    # failed updates leave the statistics untouched
    r = m.compute()
    assert r["num_images"] == 0 and math.isnan(r["mbf1" if cls is BoundaryF1 else "mboundary_iou"])


def test_invalid_tolerances_raise():
    for kwargs, name in (
        ({"tolerance": -1}, "tolerance"),
        ({"tolerance": math.nan}, "tolerance"),
        ({"tolerance": "2"}, "tolerance"),
        ({"tolerance_frac": -0.1}, "tolerance_frac"),
        ({"tolerance_frac": math.inf}, "tolerance_frac"),
        ({"tolerance_frac": None}, "tolerance_frac"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            BoundaryF1(3, **kwargs)
    with pytest.raises(ValueError, match="dilation_ratio must be a finite number >= 0"):
        BoundaryIoU(3, dilation_ratio=-0.02)


# ---------------------------------------------------------------------------------------------- BoundaryIoU
def test_biou_square_shifted_by_hand_and_border_counts():
    # 10x10 image: d = max(1, round(0.02 * 14.14)) = 1. Class 1: 4x4 squares (rings of 12) moved by one column
    # share 6 ring pixels -> 6 / 18. Background: the 36-pixel image-border ring counts (zero padding) plus the
    # 20 pixels around each square; they share the border and 10 of the 20 -> 46 / 66.
    target = torch.zeros(10, 10, dtype=torch.long)
    target[3:7, 3:7] = 1
    pred = torch.roll(target, 1, dims=1)
    m = BoundaryIoU(2, class_names=["bg", "square"])
    assert m.band_width(10, 10) == 1
    m.update(pred, target)
    r = m.compute()
    assert r["boundary_iou"] == pytest.approx([46 / 66, 6 / 18])
    assert r["mboundary_iou"] == pytest.approx((46 / 66 + 1 / 3) / 2)
    assert m.intersection.tolist() == [46, 6] and m.union.tolist() == [66, 18]
    assert m.target_band.tolist() == [56, 12] and m.pred_band.tolist() == [56, 12]
    assert r["class_names"] == ["bg", "square"] and r["num_images"] == 1
    json.dumps(r)


def test_biou_band_width_rounds_like_the_reference():
    m = BoundaryIoU(2)
    assert m.band_width(360, 480) == 12  # 0.02 * 600
    assert BoundaryIoU(2, dilation_ratio=0.0).band_width(360, 480) == 1  # at least 1
    assert BoundaryIoU(2, dilation_ratio=0.025).band_width(60, 80) == 2  # round(2.5) = 2 (halves to even)
    assert BoundaryIoU(2, dilation_ratio=0.035).band_width(60, 80) == 4  # round(3.5) = 4


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_repeated_3x3_erosion_equals_one_square_erosion(d):
    gen = np.random.default_rng(d)
    mask = ndimage.binary_opening(gen.random((30, 34)) < 0.6, iterations=1)
    padded = np.pad(mask, 1)
    repeated = ndimage.binary_erosion(padded, np.ones((3, 3), bool), iterations=d, border_value=0)
    square = ndimage.binary_erosion(padded, np.ones((2 * d + 1, 2 * d + 1), bool), border_value=0)
    assert np.array_equal(repeated, square)
    # and the label-map band used by BoundaryIoU equals mask - eroded for every class at once
    labels = torch.from_numpy(mask.astype(np.int64))
    band = _boundary_band(labels[None].to(torch.int16), d)[0].numpy()
    for c in (0, 1):
        m = labels.numpy() == c
        eroded = ndimage.binary_erosion(np.pad(m, 1), np.ones((3, 3), bool), iterations=d, border_value=0)
        assert np.array_equal(band & m, m & ~eroded[1:-1, 1:-1])


@pytest.mark.parametrize(
    "shape,ratio", [((3, 24, 30), 0.02), ((2, 40, 52), 0.05), ((2, 33, 47), 0.1), ((1, 17, 9), 0.3)]
)
def test_biou_matches_reference_mask_to_boundary(shape, ratio):
    gen = torch.Generator().manual_seed(shape[1])
    k = 5
    pred, target = _blob_pair(gen, k, shape, ignore_frac=0.05)
    pred[:, 0, :] = torch.randint(0, k, (shape[0], shape[2]), generator=gen)  # labels under ignored pixels too
    m = BoundaryIoU(k, dilation_ratio=ratio)
    m.update(pred, target)
    inter, union = _reference_biou(pred.numpy(), target.numpy(), k, ratio)
    assert m.intersection.tolist() == inter.tolist() and m.union.tolist() == union.tolist()
    with np.errstate(invalid="ignore"):
        expected = inter / union
    assert _nan_equal(m.compute()["boundary_iou"], expected)


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="needs OpenCV (cv2)")
def test_biou_matches_cv2_reference():
    import cv2

    def cv2_mask_to_boundary(mask, dilation_ratio):  # boundary-iou-api boundary_utils.mask_to_boundary
        h, w = mask.shape
        d = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
        new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(new_mask, np.ones((3, 3), dtype=np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
        return (mask - eroded).astype(bool)

    gen = torch.Generator().manual_seed(11)
    k = 4
    pred, target = _blob_pair(gen, k, (2, 37, 45), ignore_frac=0.05)
    m = BoundaryIoU(k, dilation_ratio=0.06)
    m.update(pred, target)
    inter, union = _reference_biou(pred.numpy(), target.numpy(), k, 0.06, to_boundary=cv2_mask_to_boundary)
    assert m.intersection.tolist() == inter.tolist() and m.union.tolist() == union.tolist()


def test_biou_ignore_absent_classes_and_perfect_prediction():
    gen = torch.Generator().manual_seed(4)
    k = 4
    _, target = _blob_pair(gen, 3, (2, 20, 20), ignore_frac=0.1)  # class 3 never occurs
    target[0, 4:10, 4:10] = 0
    pred = torch.where(target == IGNORE, torch.randint(0, k, target.shape, generator=gen), target)
    m = BoundaryIoU(k)
    m.update(pred, target)  # equal on every counted pixel -> 1, whatever is predicted under the ignored pixels
    r = m.compute()
    assert r["boundary_iou"][:3] == [1.0, 1.0, 1.0] and math.isnan(r["boundary_iou"][3])
    assert r["mboundary_iou"] == 1.0

    only_pred = BoundaryIoU(k)
    p2 = pred.clone()
    p2[0, 5:9, 5:9] = 3  # class 3 predicted, absent from the target -> 0 and counted in the mean
    only_pred.update(p2, target)
    r2 = only_pred.compute()
    assert r2["boundary_iou"][3] == 0.0 and r2["mboundary_iou"] < 1.0

    empty = BoundaryIoU(k)
    empty.update(torch.zeros(2, 20, 20, dtype=torch.long), torch.full((2, 20, 20), IGNORE))
    r3 = empty.compute()
    assert all(math.isnan(v) for v in r3["boundary_iou"]) and math.isnan(r3["mboundary_iou"])
    assert r3["num_images"] == 2


def test_repr_and_device_default():
    f1, biou = BoundaryF1(3, tolerance=2), BoundaryIoU(3)
    assert "tolerance=2.0" in repr(f1) and "dilation_ratio=0.02" in repr(biou)
    assert f1.device.type == "cpu" and biou.intersection.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_are_processed_on_the_gpu_and_match_cpu():
    gen = torch.Generator().manual_seed(9)
    pred, target = _blob_pair(gen, 5, (3, 40, 50), ignore_frac=0.05)
    for cls, kw in ((BoundaryF1, {}), (BoundaryF1, {"tolerance": 2.5}), (BoundaryIoU, {"dilation_ratio": 0.05})):
        cpu, gpu = cls(5, **kw), cls(5, **kw)
        cpu.update(pred, target)
        gpu.update(pred.cuda(), target.cuda().to(torch.uint8))
        assert gpu.device.type == "cuda"
        a, b = cpu.compute(), gpu.compute()
        for key in a:
            assert _nan_equal(a[key], b[key]), (cls.__name__, key)
        fixed = cls(5, device="cpu", **kw)
        fixed.update(pred.cuda(), target.cuda())
        assert fixed.device.type == "cpu" and all(_nan_equal(fixed.compute()[key], a[key]) for key in a)
