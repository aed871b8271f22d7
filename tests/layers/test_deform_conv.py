"""DCNv2 DeformConv2d: plain-conv invariants, hand-computed bilinear sampling, modulation, gradients, mmcv layout,
and the ResNet ``dcn_stages`` option."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks import create_model
from maskworks.layers import DeformConv2d
from maskworks.models._utils import build_encoder


def _bilinear_zero(img: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``img (C, H, W)`` sampled at real pixel coordinates ``y, x (...)`` -> ``(C, ...)``; zero outside the image."""
    h, w = img.shape[-2:]
    y0, x0 = torch.floor(y), torch.floor(x)
    out = img.new_zeros((img.shape[0], *y.shape))
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            value = img[:, yy.clamp(0, h - 1).long(), xx.clamp(0, w - 1).long()]  # (C, ...)
            out = out + value * (wy * wx * inside)
    return out


def _reference(x, weight, bias, offset, mask, stride, padding, dilation):
    """Deformable convolution by hand: bilinear samples per (offset group, tap), then a grouped matmul."""
    b_sz, c, _, _ = x.shape
    o, cg, kh, kw = weight.shape
    k = kh * kw
    groups = c // cg
    h_out, w_out = offset.shape[-2:]
    offset_groups = offset.shape[1] // (2 * k)
    cpg = c // offset_groups
    oy = torch.arange(h_out, dtype=x.dtype)[:, None] * stride[0] - padding[0]  # (H_out, 1)
    ox = torch.arange(w_out, dtype=x.dtype)[None, :] * stride[1] - padding[1]  # (1, W_out)
    cols = x.new_zeros(b_sz, c, k, h_out, w_out)
    for b in range(b_sz):
        for g in range(offset_groups):
            for i in range(kh):
                for j in range(kw):
                    t = i * kw + j
                    dy = offset[b, g * 2 * k + 2 * t]  # (H_out, W_out)
                    dx = offset[b, g * 2 * k + 2 * t + 1]
                    v = _bilinear_zero(
                        x[b, g * cpg : (g + 1) * cpg], oy + i * dilation[0] + dy, ox + j * dilation[1] + dx
                    )
                    if mask is not None:
                        v = v * mask[b, g * k + t]
                    cols[b, g * cpg : (g + 1) * cpg, t] = v
    og = o // groups
    out = []
    for gr in range(groups):
        col = cols[:, gr * cg : (gr + 1) * cg].reshape(b_sz, cg * k, h_out * w_out)  # (B, Cg * K, N)
        out.append(torch.einsum("ok,bkn->bon", weight[gr * og : (gr + 1) * og].reshape(og, cg * k), col))
    out = torch.cat(out, 1).reshape(b_sz, o, h_out, w_out)
    return out if bias is None else out + bias[:, None, None]


def _layer(**kw) -> DeformConv2d:
    torch.manual_seed(0)
    return DeformConv2d(**kw)


CASES = [  # in, out, kernel, stride, padding, dilation, groups, offset_groups
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1, groups=2),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), groups=2, offset_groups=2),
]


def _zero_offset_unit_mask(layer: DeformConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = layer.output_size(*x.shape[-2:])
    taps = layer.offset_groups * layer.num_taps
    return x.new_zeros(x.shape[0], 2 * taps, h, w), x.new_ones(x.shape[0], taps, h, w)


# --------------------------------------------------------------------------- plain-conv invariants
@pytest.mark.parametrize("kw", CASES)
def test_zero_offset_unit_mask_equals_conv(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 4, 9, 8)
    offset, mask = _zero_offset_unit_mask(layer, x)
    ref = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, offset, mask), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x, offset), ref, atol=1e-5, rtol=1e-5)  # mask=None: no modulation


@pytest.mark.parametrize("kw", CASES)
def test_fresh_layer_is_half_conv_plus_bias(kw):
    # init rule: conv_offset zero -> offsets 0, modulation sigmoid(0) = 0.5, so out = 0.5 * conv(x, W) + b
    layer = _layer(**kw)
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    x = torch.randn(2, 4, 9, 8)
    conv = F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 0.5 * conv + layer.bias[:, None, None], atol=1e-5, rtol=1e-5)


def test_fresh_unmodulated_layer_is_conv():
    layer = _layer(in_channels=4, out_channels=6, kernel_size=3, padding=1, modulated=False)
    assert layer.conv_offset.out_channels == 2 * 9
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1), atol=1e-5, rtol=1e-5)


def test_init_like_conv2d():
    layer = _layer(in_channels=8, out_channels=16, kernel_size=3, groups=2)
    bound = 1 / (4 * 9) ** 0.5  # nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in / groups * kh * kw
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
    assert layer.bias.abs().max() <= bound
    assert _layer(in_channels=8, out_channels=16, kernel_size=3, bias=False).bias is None


# --------------------------------------------------------------------------- hand-computed bilinear sampling
def test_reference_is_conv_at_zero_offset():
    layer = _layer(**CASES[-1])
    x = torch.randn(1, 4, 7, 6)
    offset, _ = _zero_offset_unit_mask(layer, x)
    ref = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    out = _reference(x, layer.weight.detach(), layer.bias.detach(), offset, None, layer.stride, layer.padding, (1, 1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", CASES[:3])
def test_constant_fractional_shift(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 4, 9, 8)
    offset, mask = _zero_offset_unit_mask(layer, x)
    offset[:, 0::2], offset[:, 1::2] = 0.3, -1.7  # (dy, dx) of every tap
    mask = torch.rand_like(mask)
    with torch.no_grad():
        out = layer(x, offset, mask)
    ref = _reference(
        x, layer.weight.detach(), layer.bias.detach(), offset, mask, layer.stride, layer.padding, layer.dilation
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    # independently: a constant shift is a plain conv of the zero-padded image resampled by grid_sample
    h, w = x.shape[-2:]
    ph, pw = layer.padding
    ys = torch.arange(-ph, h + ph, dtype=x.dtype) + 0.3
    xs = torch.arange(-pw, w + pw, dtype=x.dtype) - 1.7
    gy, gx = torch.meshgrid(2 * ys / (h - 1) - 1, 2 * xs / (w - 1) - 1, indexing="ij")
    grid = torch.stack((gx, gy), -1).expand(x.shape[0], -1, -1, -1)  # (B, H + 2ph, W + 2pw, 2) as (x, y)
    shifted = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    with torch.no_grad():
        ones = torch.ones_like(mask)
        plain = F.conv2d(shifted, layer.weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)
        torch.testing.assert_close(layer(x, offset, ones), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [CASES[1], CASES[2], CASES[4]])
def test_random_offset_field(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 4, 9, 8)
    offset, mask = _zero_offset_unit_mask(layer, x)
    offset = 2.5 * torch.randn_like(offset)  # many samples land partly or wholly outside the image
    mask = torch.rand_like(mask)
    with torch.no_grad():
        out = layer(x, offset, mask)
    ref = _reference(
        x, layer.weight.detach(), layer.bias.detach(), offset, mask, layer.stride, layer.padding, layer.dilation
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- modulation
@pytest.mark.parametrize("stride", [1, 2])
def test_centre_only_mask_is_1x1_conv(stride):
    layer = _layer(in_channels=4, out_channels=6, kernel_size=3, stride=stride, padding=1)
    x = torch.randn(2, 4, 9, 8)
    offset, mask = _zero_offset_unit_mask(layer, x)
    mask.zero_()
    mask[:, 4] = 1  # the centre tap (1, 1) of the 3x3 kernel
    ref = F.conv2d(x, layer.weight[:, :, 1:2, 1:2], layer.bias, stride=stride)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, offset, mask), ref, atol=1e-5, rtol=1e-5)


def test_modulation_scales_each_tap():
    layer = _layer(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=False)
    x = torch.randn(1, 4, 7, 7)
    offset, mask = _zero_offset_unit_mask(layer, x)
    offset = torch.randn_like(offset)
    mask = torch.rand_like(mask)
    with torch.no_grad():
        per_tap = []
        for t in range(9):  # the output is the sum over taps of (mask_t * sample_t) @ W_t
            only = torch.zeros_like(mask)
            only[:, t] = mask[:, t]
            per_tap.append(layer(x, offset, only))
            torch.testing.assert_close(layer(x, offset, 3 * only), 3 * per_tap[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x, offset, mask), sum(per_tap), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- gradients
def test_gradcheck_float64():
    layer = _layer(in_channels=2, out_channels=2, kernel_size=3, padding=1, groups=1).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    # integer part in -2..1, fractional part in [0.1, 0.9]: away from the kinks of bilinear interpolation
    offset = torch.randint(-2, 2, (1, 18, 4, 4)).double() + 0.1 + 0.8 * torch.rand(1, 18, 4, 4, dtype=torch.float64)
    offset.requires_grad_()
    mask = torch.rand(1, 9, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b, offset, mask):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x, offset, mask), strict=False)

    assert torch.autograd.gradcheck(fn, (x, w, b, offset, mask), eps=1e-6, atol=1e-5)


def test_gradcheck_predicted_offsets():
    layer = _layer(in_channels=2, out_channels=2, kernel_size=3, padding=1).double()
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    nn.init.normal_(layer.conv_offset.bias, std=0.3)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    ow = layer.conv_offset.weight.detach().clone().requires_grad_()

    def fn(x, ow):
        return torch.func.functional_call(layer, {"conv_offset.weight": ow}, (x,), strict=False)

    assert torch.autograd.gradcheck(fn, (x, ow), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- mmcv ModulatedDeformConv2dPack layout
def test_mmcv_parameter_names_and_offset_layout():
    layer = _layer(in_channels=4, out_channels=6, kernel_size=3, padding=1, offset_groups=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "weight": (6, 4, 3, 3),
        "bias": (6,),
        "conv_offset.weight": (2 * 3 * 9, 4, 3, 3),
        "conv_offset.bias": (2 * 3 * 9,),
    }
    nn.init.normal_(layer.conv_offset.weight, std=0.2)
    nn.init.normal_(layer.conv_offset.bias, std=0.5)
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        o1, o2, m = torch.chunk(layer.conv_offset(x), 3, dim=1)  # mmcv's split of the prediction
        torch.testing.assert_close(layer(x), layer(x, torch.cat((o1, o2), 1), torch.sigmoid(m)))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "offset_shape, mask_shape, match",
    [
        ((2, 17, 7, 6), (2, 9, 7, 6), "offset must have shape"),  # channels
        ((2, 18, 6, 6), (2, 9, 7, 6), "offset must have shape"),  # spatial size
        ((1, 18, 7, 6), (2, 9, 7, 6), "offset must have shape"),  # batch
        ((2, 36, 7, 6), (2, 18, 7, 6), "offset must have shape"),  # two offset groups on a one-group layer
        ((2, 18, 7, 6), (2, 18, 7, 6), "mask must have shape"),
        ((2, 18, 7, 6), (2, 9, 4, 3), "mask must have shape"),
    ],
)
def test_shape_errors(offset_shape, mask_shape, match):
    layer = _layer(in_channels=4, out_channels=6, kernel_size=3, padding=1)
    x = torch.randn(2, 4, 7, 6)
    with pytest.raises(ValueError, match=match):
        layer(x, torch.zeros(offset_shape), torch.ones(mask_shape))


def test_input_and_constructor_errors():
    layer = _layer(in_channels=4, out_channels=6, kernel_size=3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, H, W\)"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="mask was given without offset"):
        layer(torch.randn(1, 4, 8, 8), mask=torch.ones(1, 9, 6, 6))
    with pytest.raises(ValueError, match="groups must divide"):
        DeformConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="offset_groups must divide in_channels"):
        DeformConv2d(4, 6, 3, offset_groups=3)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        DeformConv2d(4, 6, 0)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        DeformConv2d(4, 6, 3, padding=-1)


# --------------------------------------------------------------------------- ResNet dcn_stages
def _dcn_keys(model: nn.Module) -> list[str]:
    return sorted(k for k in model.state_dict() if "conv_offset" in k)


def test_resnet50_dcn_stages_keys_and_backward():
    torch.manual_seed(0)
    plain = create_model("resnet50")
    model = create_model("resnet50", dcn_stages=(3, 4, 5))
    expected = {
        f"layer{s}.{i}.conv2.conv_offset.{p}"
        for s, n in ((2, 4), (3, 6), (4, 3))
        for i in range(n)
        for p in ("weight", "bias")
    }
    assert set(_dcn_keys(model)) == expected and _dcn_keys(plain) == []
    assert sorted(k for k in model.state_dict() if "conv_offset" not in k) == sorted(plain.state_dict())
    assert all(isinstance(model.get_submodule(f"layer{s}.0.conv2"), DeformConv2d) for s in (2, 3, 4))
    assert type(model.layer1[0].conv2) is nn.Conv2d
    assert not any(model.state_dict()[k].any() for k in expected)  # offset predictors start at zero (mmdet)

    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(expected) and result.unexpected_keys == []

    x = torch.randn(2, 3, 32, 32)  # batch 2: training-mode BatchNorm on the 1x1 layer4 map
    feats = model(x)
    assert [f.shape for f in feats] == [f.shape for f in plain(x)]
    feats[-1].mean().backward()
    assert model.layer4[0].conv2.conv_offset.weight.grad is not None
    assert model.layer4[0].conv2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, output_stride", [("resnet18", 8), ("resnet50", 16)])
def test_resnet_dcn_with_unit_modulation_equals_plain(name, output_stride):
    # with the plain weights, offsets 0 and modulation sigmoid(40) = 1 the DCN model is the plain one: same stride,
    # padding and dilation in every replaced conv2, dilated stages included
    torch.manual_seed(0)
    plain = create_model(name, output_stride=output_stride).eval()
    model = create_model(name, output_stride=output_stride, dcn_stages=(3, 4, 5)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    for name, m in model.named_modules():
        if isinstance(m, DeformConv2d):
            ref = plain.get_submodule(name)
            assert (m.stride, m.padding, m.dilation, m.groups) == (ref.stride, ref.padding, ref.dilation, ref.groups)
            nn.init.constant_(m.conv_offset.bias[2 * m.num_taps :], 40.0)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        for a, b in zip(model(x), plain(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_resnet_default_unchanged_and_build_encoder():
    torch.manual_seed(0)
    a = create_model("resnet18")
    torch.manual_seed(0)
    b = create_model("resnet18", dcn_stages=())
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    enc = build_encoder("resnet18", 3, None, dcn_stages=(5,))
    assert _dcn_keys(enc) == [
        "layer4.0.conv2.conv_offset.bias",
        "layer4.0.conv2.conv_offset.weight",
        "layer4.1.conv2.conv_offset.bias",
        "layer4.1.conv2.conv_offset.weight",
    ]
    with pytest.raises(ValueError, match="dcn_stages must hold stage numbers among 2, 3, 4, 5"):
        create_model("resnet18", dcn_stages=(1, 3))
