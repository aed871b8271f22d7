"""Atrous arithmetic, the HDC gridding check, and ASPP (shapes, torchvision / smp equivalence, batch size 1)."""

import pytest
import torch
import torch.nn as nn
from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPP as SmpASPP
from torchvision.models.segmentation.deeplabv3 import ASPP as TvASPP

from maskworks.layers import PooledBatchNorm2d
from maskworks.layers.aspp import ASPP
from maskworks.layers.atrous import (
    GriddingReport,
    check_gridding,
    effective_kernel_size,
    hdc_max_distance,
    receptive_field,
    receptive_field_mask,
)
from maskworks.testing import randomize_norms


# --------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize(
    "k, r, side", [(3, 1, 3), (3, 2, 5), (3, 4, 9), (3, 6, 13), (3, 12, 25), (3, 18, 37), (5, 2, 9)]
)
def test_effective_kernel_size(k, r, side):
    assert effective_kernel_size(k, r) == side == (k - 1) * r + 1


def test_receptive_field():
    assert receptive_field(3, (1, 2, 4)) == 15
    assert receptive_field((3, 3, 3), (1, 2, 4)) == 15
    assert receptive_field((3, 3), 1) == 5
    assert receptive_field(3, (1, 1, 1), strides=(2, 2, 1)) == 1 + 2 + 4 + 8  # jumps 1, 2, 4
    assert receptive_field((7, 3), (1, 1), strides=(2, 1)) == 1 + 6 + 2 * 2


def test_receptive_field_matches_autograd_on_a_stack():
    # three stacked 3x3 convs with rates 1, 2, 4: the centre output depends on exactly a 15 x 15 window
    convs = [nn.Conv2d(1, 1, 3, padding=r, dilation=r, bias=False) for r in (1, 2, 4)]
    for c in convs:
        nn.init.constant_(c.weight, 1.0)
    x = torch.zeros(1, 1, 31, 31, requires_grad=True)
    nn.Sequential(*convs)(x)[0, 0, 15, 15].backward()
    rows, cols = (x.grad[0, 0] != 0).nonzero(as_tuple=True)
    assert int(rows.max() - rows.min()) + 1 == int(cols.max() - cols.min()) + 1 == receptive_field(3, (1, 2, 4))
    assert (x.grad[0, 0, 8:23, 8:23] != 0).all()  # (1, 2, 4) does not grid: the window is dense


@pytest.mark.parametrize(
    "rates, m2", [((1, 2, 4), 2), ((1, 2, 5), 2), ((2, 4, 8), 4), ((1, 2, 9), 5), ((6, 12, 18), 12)]
)
def test_hdc_max_distance(rates, m2):
    assert hdc_max_distance(rates) == m2


@pytest.mark.parametrize("rates", [(1, 2, 4), (1, 2, 5), (1, 2, 3)])
def test_check_gridding_passes(rates):
    report = check_gridding(rates)
    assert isinstance(report, GriddingReport)
    assert report.ok and report.common_factor == 1 and report.m2 <= 3


@pytest.mark.parametrize("rates", [(2, 4, 8), (1, 2, 9), (6, 12, 18)])
def test_check_gridding_flags(rates):
    report = check_gridding(rates)
    assert not report.ok
    assert report.common_factor > 1 or report.m2 > 3


def test_check_gridding_message_for_aspp_rates():
    report = check_gridding((6, 12, 18))
    assert (report.ok, report.m2, report.common_factor) == (False, 12, 6)
    msg = report.message
    assert "stacking" in msg and "grids" in msg
    assert "factor 6" in msg and "M_2 = 12 > 3" in msg
    assert "PARALLEL" in msg and "ASPP" in msg


def test_check_gridding_single_layer():
    assert check_gridding((1,)).ok
    assert not check_gridding((2,)).ok


@pytest.mark.parametrize(
    "call",
    [
        lambda: effective_kernel_size(4, 2),  # even kernel
        lambda: effective_kernel_size(3, 0),
        lambda: effective_kernel_size(3, True),
        lambda: receptive_field((3, 3), (1, 2, 4)),  # length mismatch
        lambda: receptive_field(3, (1, -2)),
        lambda: hdc_max_distance((2,)),
        lambda: check_gridding(()),
        lambda: check_gridding((1, 2), kernel_size=2),
        lambda: receptive_field_mask(3, 0),
    ],
)
def test_invalid_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_non_sequence_arguments():
    with pytest.raises(TypeError):
        receptive_field(3, 2)
    with pytest.raises(TypeError):
        check_gridding("124")


# --------------------------------------------------------------------------- the receptive field of one atrous conv
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_autograd_receptive_field_probe(k, r):
    conv = nn.Conv2d(1, 1, k, padding=r * (k - 1) // 2, dilation=r, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    side = 41
    x = torch.zeros(1, 1, side, side, requires_grad=True)
    out = conv(x)
    assert out.shape == x.shape
    out[0, 0, side // 2, side // 2].backward()
    grad = x.grad[0, 0]
    rows, cols = (grad != 0).nonzero(as_tuple=True)
    width = effective_kernel_size(k, r)
    assert int(rows.max() - rows.min()) + 1 == int(cols.max() - cols.min()) + 1 == width == k + (k - 1) * (r - 1)
    assert int((grad != 0).sum()) == k * k
    assert set(torch.diff(rows.unique()).tolist()) <= {r} and set(torch.diff(cols.unique()).tolist()) <= {r}
    top, left = int(rows.min()), int(cols.min())
    torch.testing.assert_close(grad[top : top + width, left : left + width], receptive_field_mask(k, r))


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_dilated_conv_parameter_count_independent_of_rate(r):
    conv = nn.Conv2d(16, 32, 3, padding=r, dilation=r, bias=False)
    assert sum(p.numel() for p in conv.parameters()) == 9 * 16 * 32


def test_receptive_field_mask_values():
    mask = receptive_field_mask(3, 2)
    assert mask.shape == (5, 5) and int(mask.sum()) == 9
    assert mask[0, 0] == mask[2, 4] == mask[4, 4] == 1 and mask[1, 1] == mask[0, 1] == 0
    assert torch.equal(receptive_field_mask(3, 1), torch.ones(3, 3))


# --------------------------------------------------------------------------- ASPP
@pytest.mark.parametrize("size", [(1, 1), (7, 9), (13, 13), (2, 31)])
@pytest.mark.parametrize("separable", [False, True])
def test_aspp_keeps_spatial_size(size, separable):
    aspp = ASPP(32, 16, atrous_rates=(6, 12, 18), separable=separable).eval()
    with torch.no_grad():
        assert aspp(torch.randn(2, 32, *size)).shape == (2, 16, *size)


def test_aspp_matches_torchvision():
    ref = randomize_norms(TvASPP(2048, [12, 24, 36]))
    ours = ASPP(2048, 256, atrous_rates=(12, 24, 36), separable=False).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 2048, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    assert isinstance(ours.convs[4][2], PooledBatchNorm2d)


@pytest.mark.parametrize("separable", [False, True])
def test_aspp_matches_smp(separable):
    ref = randomize_norms(SmpASPP(64, 32, (6, 12, 18), separable=separable, dropout=0.5))
    ours = ASPP(64, 32, atrous_rates=(6, 12, 18), separable=separable).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 64, 13, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_aspp_parameter_count():
    # the seed's ASPP(2048) with 6/12/18: 1x1 + three 3x3 + pooling branches + 1280 -> 256 projection
    aspp = ASPP(2048, 256, atrous_rates=(6, 12, 18))
    assert sum(p.numel() for p in aspp.parameters()) == 15_535_104


def test_aspp_trains_at_batch_size_one():
    aspp = ASPP(8, 8, atrous_rates=(1, 2, 3)).train()
    out = aspp(torch.randn(1, 8, 5, 6))
    out.mean().backward()
    assert out.shape == (1, 8, 5, 6)
    assert aspp.convs[4][1].weight.grad is not None


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"atrous_rates": (6, 0, 18)}, ValueError),
        ({"atrous_rates": ()}, ValueError),
        ({"atrous_rates": 6}, TypeError),
        ({"dropout": 1.0}, ValueError),
        ({"out_channels": 0}, ValueError),
    ],
)
def test_aspp_invalid_arguments(kwargs, exc):
    with pytest.raises(exc):
        ASPP(8, **kwargs)
