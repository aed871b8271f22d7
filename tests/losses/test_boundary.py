"""Boundary losses: signed distance maps, Kervadec boundary loss, Hausdorff-DT, clDice, boundary-weighted CE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss as MonaiDice
from monai.losses import HausdorffDTLoss as MonaiHD
from monai.losses import SoftclDiceLoss as MonaiClDice
from monai.losses import SoftDiceclDiceLoss as MonaiDiceClDice

from maskworks.losses.boundary import (
    BoundaryLoss,
    BoundaryWeightedCrossEntropyLoss,
    ClDiceLoss,
    HausdorffDTLoss,
    boundary_loss,
    boundary_weight_map,
    boundary_weighted_cross_entropy,
    cldice_loss,
    hausdorff_dt_loss,
    signed_distance_map,
)


def _data(b=2, k=3, h=12, w=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, h, w, generator=g, dtype=dtype)
    y = torch.zeros(b, h, w, dtype=torch.long)  # blobs, so the maps have real boundaries
    y[:, 2:7, 3:9] = 1
    y[0, 8:11, 1:5] = 2 % k
    y[-1, 6:10, 6:11] = 2 % k
    return x, y


def test_signed_distance_map_hand_values():
    y = torch.tensor([[[0, 0, 1, 1, 1]]])
    phi = signed_distance_map(y, num_classes=3)
    assert phi.shape == (1, 3, 1, 5) and phi.dtype == torch.float32
    assert phi[0, 1, 0].tolist() == [2, 1, 0, -1, -2]
    assert phi[0, 0, 0].tolist() == [-1, 0, 1, 2, 3]
    assert torch.all(phi[0, 2] == 0)  # absent class


def test_signed_distance_map_ignore_makes_no_edges():
    y = torch.tensor([[[0, 1, 1, 255, 1, 1]]])
    phi = signed_distance_map(y, 2)
    # inside class 1 distances go to the class-0 pixel only, not to the ignored pixel (which reads 0)
    assert phi[0, 1, 0].tolist() == [1, 0, -1, 0, -3, -4]


def test_boundary_loss_applies_softmax_once():
    x, y = _data()
    phi = signed_distance_map(y, 3)
    expected = (torch.softmax(x, 1)[:, 1:] * phi[:, 1:]).mean()
    double = (torch.softmax(torch.softmax(x, 1), 1)[:, 1:] * phi[:, 1:]).mean()
    loss = boundary_loss(x, y)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, double, atol=1e-4)
    assert torch.allclose(boundary_loss(x, y, dist_maps=phi), expected, atol=1e-6)
    assert torch.allclose(BoundaryLoss()(x, y, dist_maps=phi), expected, atol=1e-6)
    full = (torch.softmax(x, 1) * phi).mean()
    assert torch.allclose(boundary_loss(x, y, include_background=True), full, atol=1e-6)


def test_boundary_loss_binary_and_minimised_by_ground_truth():
    _, y = _data(k=2)
    x = torch.randn(2, 1, 12, 12)
    phi = signed_distance_map(y, 2)
    expected = (torch.sigmoid(x) * phi[:, 1:]).mean()
    assert torch.allclose(boundary_loss(x, y, mode="binary"), expected, atol=1e-6)
    assert torch.allclose(boundary_loss(x, y, dist_maps=phi, mode="binary"), expected, atol=1e-6)
    gt = (2 * y[:, None].float() - 1) * 20
    assert boundary_loss(gt, y, mode="binary") < boundary_loss(x, y, mode="binary")
    assert boundary_loss(gt, y, mode="binary") < boundary_loss(gt.roll(2, dims=3), y, mode="binary")


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(mode="multiclass", include_background=False), dict(softmax=True, to_onehot_y=True)),
        (
            dict(mode="multiclass", include_background=True),
            dict(softmax=True, to_onehot_y=True, include_background=True),
        ),
        (dict(mode="multiclass", batch=True, alpha=1.5), dict(softmax=True, to_onehot_y=True, batch=True, alpha=1.5)),
        (dict(mode="multiclass", reduction="sum"), dict(softmax=True, to_onehot_y=True, reduction="sum")),
    ],
)
def test_hausdorff_parity_with_monai(ours, theirs):
    x, y = _data(dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    mine = hausdorff_dt_loss(a, y, **ours)
    ref = MonaiHD(**theirs)(b, y[:, None])
    assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6)
    mine.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:single channel prediction")
def test_hausdorff_binary_parity_none_and_perfect_prediction():
    _, y = _data(k=2)
    x = torch.randn(2, 1, 12, 12)
    mine = HausdorffDTLoss(mode="binary", reduction="none")(x, y)
    ref = MonaiHD(sigmoid=True, reduction="none")(x, y[:, None].float())
    assert torch.allclose(mine, ref.view(2, 1), rtol=1e-5, atol=1e-6)
    perfect = (2 * y[:, None].float() - 1) * 40
    assert hausdorff_dt_loss(perfect, y, mode="binary").item() == pytest.approx(0.0, abs=1e-12)


def test_hausdorff_3d_multilabel_parity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 6, 6, generator=g)
    y = (torch.rand(1, 2, 5, 6, 6, generator=g) > 0.6).long()
    mine = hausdorff_dt_loss(x, y, mode="multilabel", include_background=True)
    ref = MonaiHD(sigmoid=True, include_background=True)(x, y.float())
    assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("include_background", [True, False])
def test_cldice_parity_with_monai(include_background):
    x, y = _data(dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    mine = cldice_loss(a, y, iters=3, include_background=include_background)
    ref = MonaiClDice(iter_=3, softmax=True, to_onehot_y=True, include_background=include_background)(b, y[:, None])
    assert torch.allclose(mine, ref, rtol=1e-6, atol=1e-8)
    mine.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_cldice_binary_and_dice_cldice_composition():
    _, y = _data(k=2)
    x = torch.randn(2, 1, 12, 12)
    t = y[:, None].float()
    mine = ClDiceLoss(iters=2, mode="binary", reduction="none")(x, y)
    assert torch.allclose(mine, MonaiClDice(iter_=2, sigmoid=True, reduction="none")(x, t), atol=1e-6)
    combined = MonaiDiceClDice(iter_=2, alpha=0.3, sigmoid=True)(x, t)
    ours = 0.7 * MonaiDice(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(x, t) + 0.3 * cldice_loss(x, y, 2, mode="binary")
    assert torch.allclose(combined, ours, atol=1e-6)


def test_boundary_weight_map_square():
    y = torch.zeros(1, 9, 9, dtype=torch.long)
    y[0, 3:6, 3:6] = 1
    w = boundary_weight_map(y, w0=10.0, sigma=2.0)
    edge = torch.zeros(9, 9, dtype=torch.bool)
    edge[2:7, 2:7] = True
    edge[4, 4] = False  # centre of the square: distance 1 from the inner ring
    edge[2, 2] = edge[2, 6] = edge[6, 2] = edge[6, 6] = False  # outer corners only touch diagonally
    assert torch.allclose(w[0][edge], torch.tensor(11.0))
    assert w[0, 4, 4].item() == pytest.approx(1 + 10 * math.exp(-1 / 8))
    assert w[0, 2, 2].item() == pytest.approx(1 + 10 * math.exp(-1 / 8))  # (2, 3) is on the edge
    # both horizontal (row 2/3) and vertical (column 2/3) edges are found
    assert w[0, 2, 4] == 11 and w[0, 4, 2] == 11
    assert torch.all(boundary_weight_map(torch.zeros(1, 4, 4, dtype=torch.long)) == 1)


def test_boundary_weighted_ce():
    x, y = _data()
    y[0, 0] = 255
    ce = F.cross_entropy(x, y, ignore_index=255)
    assert torch.allclose(boundary_weighted_cross_entropy(x, y, w0=0.0), ce, atol=1e-6)
    wmap = boundary_weight_map(y, 10.0, 3.0)
    per = F.cross_entropy(x, y, ignore_index=255, reduction="none")
    expected = (per * wmap).sum() / (y != 255).sum()
    assert torch.allclose(BoundaryWeightedCrossEntropyLoss(10.0, 3.0)(x, y), expected, atol=1e-5)
    assert torch.allclose(boundary_weighted_cross_entropy(x, y, weight_map=wmap), expected, atol=1e-5)


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, y: boundary_loss(z, y),
        lambda z, y: hausdorff_dt_loss(z, y),
        lambda z, y: cldice_loss(z, y, iters=2),
        lambda z, y: boundary_weighted_cross_entropy(z, y, sigma=2.0),
    ],
)
def test_ignore_zero_gradient_and_gradcheck(fn):
    x, y = _data(b=1, k=3, h=6, w=6, dtype=torch.float64)
    y[0, 0, :] = 255
    y[0, 2:4, 2:4] = 1
    z = x.clone().requires_grad_(True)
    fn(z, y).backward()
    assert torch.all(z.grad[0, :, 0] == 0) and z.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda t: fn(t, y), (x.clone().requires_grad_(),), fast_mode=True)


def test_options_validated():
    with pytest.raises(ValueError):
        BoundaryLoss(mode="multi")
    with pytest.raises(ValueError):
        HausdorffDTLoss(alpha=0)
    with pytest.raises(ValueError):
        ClDiceLoss(iters=-1)
    with pytest.raises(ValueError):
        ClDiceLoss(smooth=0)
    with pytest.raises(ValueError):
        BoundaryWeightedCrossEntropyLoss(sigma=0)
    with pytest.raises(ValueError):
        BoundaryWeightedCrossEntropyLoss(w0=-1)
    x, y = _data()
    with pytest.raises(ValueError):
        boundary_loss(x, y, dist_maps=torch.zeros(2, 2, 12, 12))


def test_distance_field_bounding_box_shortcut_is_exact():
    """The inside distance runs on the object's box when that is exact; compare with full-array transforms."""
    from maskworks.losses.boundary import _nearest_distance
    from maskworks.losses.boundary import euclidean_distance as edt

    rng = np.random.default_rng(0)
    for trial in range(40):
        pos = np.zeros((40, 37), bool)
        y, x = rng.integers(0, 36, 2)
        h, w = rng.integers(1, 12, 2)
        pos[y : y + h, x : x + w] = True
        pos[y + 1 : y + 2, x + 1 : x + 3] = False  # a hole inside the object
        valid = np.ones_like(pos)
        if trial % 3 == 1:  # ignore far from the object (shortcut still applies)
            valid[:, :2] = (pos[:, :2]) | (x < 5)
        if trial % 3 == 2:  # ignore touching the object (falls back to the full array)
            valid[max(y - 1, 0), :] = False
            valid |= pos
        other = valid & ~pos
        got = _nearest_distance(pos, valid)
        if not other.any():
            assert got is None
            continue
        want = np.where(pos, edt(~other), edt(~pos))
        np.testing.assert_array_equal(got, want)


def test_euclidean_distance_matches_scipy():
    from scipy.ndimage import distance_transform_edt

    from maskworks.losses.boundary import euclidean_distance

    rng = np.random.default_rng(1)
    for shape in [(37, 41), (8, 9, 10)]:
        mask = rng.random(shape) > 0.2
        np.testing.assert_allclose(euclidean_distance(mask), distance_transform_edt(mask), rtol=1e-6)
