"""Sliding-window inference: exact invariants, receptive-field equality, MONAI parity and input checks.

Tolerances: a pointwise ``x + 1`` predictor comes back bit for bit with constant blending of integer-valued
images (every sum and quotient is exact in float32) and within float32 rounding (1e-6) with Gaussian weights;
convolutional models tiled with an overlap-tile margin at least their receptive-field radius match the
whole-image prediction on the mirror-padded image within 1e-5; parity with
``monai.inferers.sliding_window_inference`` is within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from maskworks.inference.sliding import SlidingWindow, importance_map, plan_windows, sliding_window


class PlusOne(nn.Module):
    """A pointwise predictor: the image plus one, its channels taken as classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def conv_net(ndim: int, channels: int = 3, classes: int = 4, depth: int = 3, padding: int = 1, seed: int = 0):
    """``depth`` 3x3 (x3) convolutions with tanh: receptive-field radius ``depth``."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [conv(channels if i == 0 else 6, classes if i == depth - 1 else 6, 3, padding=padding), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).eval()


def mirror_pad(x: torch.Tensor, m: int) -> torch.Tensor:
    """Reflection padding by ``m`` on every spatial side."""
    return F.pad(x, [m] * (2 * (x.ndim - 2)), mode="reflect")


def integer_image(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, shape, generator=g).float()


# ------------------------------------------------------------------------------------------- planning, weights


@pytest.mark.parametrize("window", [(16, 16), (7, 9), (33, 20), (8, 12, 10)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.25])
def test_importance_map_equals_monai(window, blend, sigma_scale):
    ours = importance_map(window, blend, sigma_scale)
    ref = compute_importance_map(window, mode=blend, sigma_scale=sigma_scale)
    assert torch.equal(ours, ref)
    assert ours.min() >= 1e-3


@pytest.mark.parametrize(
    "size,window,overlap",
    [((50, 67), (16, 16), 0.25), ((50, 67), (20, 33), 0.5), ((64, 64), (64, 64), 0.5), ((31, 100), (8, 30), 0.75)],
)
@pytest.mark.parametrize("extra", [0.0, 0.7])  # float rounding of the stride, e.g. int(30 * 0.3)
def test_plan_windows_matches_monai_and_covers(size, window, overlap, extra):
    overlap = extra if extra else overlap
    corners = plan_windows(size, window, overlap)
    ref = dense_patch_slices(size, window, _get_scan_interval(size, window, 2, (overlap,) * 2))
    assert corners == [tuple(s.start for s in sl) for sl in ref]
    covered = torch.zeros(size, dtype=torch.int64)
    for c in corners:
        covered[tuple(slice(s, s + w) for s, w in zip(c, window))] += 1
    assert covered.min() >= 1
    assert max(c[0] for c in corners) + window[0] == size[0]  # the last window is snapped to the border


def test_plan_windows_centres_small_images():
    assert plan_windows((10, 40), (16, 16), 0.25) == [(-3, s) for s in (0, 12, 24)]
    assert plan_windows((5,), 8, 0.5) == [(-1,)]


# ---------------------------------------------------------------------------------------------- exact invariants


CASES_2D = [((37, 53), (16, 16)), ((37, 53), (13, 20)), ((10, 7), (16, 16)), ((48, 48), (16, 16)), ((5, 40), (8, 9))]


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("size,window", CASES_2D)
def test_plus_one_comes_back_2d(overlap, size, window):
    x = integer_image(2, 3, *size)
    for blend, batch_size in [("constant", 1), ("constant", 5), ("gaussian", 3)]:
        out = sliding_window(PlusOne(), x, window, overlap, blend, batch_size)
        assert out.shape == x.shape
        if blend == "constant":
            assert torch.equal(out, x + 1)
        else:
            torch.testing.assert_close(out, x + 1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("size,window", [((9, 14, 11), (6, 8, 8)), ((5, 6, 7), (8, 8, 8)), ((12, 12, 12), (5, 7, 6))])
def test_plus_one_comes_back_3d(overlap, size, window):
    x = integer_image(1, 2, *size)
    assert torch.equal(sliding_window(PlusOne(), x, window, overlap, "constant", 4), x + 1)
    torch.testing.assert_close(sliding_window(PlusOne(), x, window, overlap, "gaussian", 2), x + 1)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "constant"])
@pytest.mark.parametrize("size", [(37, 53), (6, 9)])
def test_plus_one_overlap_tile(padding_mode, size):
    x = integer_image(1, 3, *size)
    for overlap, margin in [(0.0, 4), (0.5, (2, 7))]:
        out = sliding_window(PlusOne(), x, 16, overlap, "constant", 3, margin=margin, padding_mode=padding_mode)
        assert torch.equal(out, x + 1)
    x3 = integer_image(1, 1, 7, 9, 8)
    assert torch.equal(sliding_window(PlusOne(), x3, 4, 0.0, "constant", margin=2), x3 + 1)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_activation_is_applied_per_window_before_blending(activation):
    x = torch.randn(1, 4, 30, 41)
    out = sliding_window(PlusOne(), x, 12, 0.5, "gaussian", activation=activation)
    ref = (x + 1).softmax(1) if activation == "softmax" else (x + 1).sigmoid()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_batch_of_images_and_batch_size_do_not_change_the_result():
    net = conv_net(2)
    x = torch.randn(3, 3, 40, 45)
    whole = sliding_window(net, x, 16, 0.5, "gaussian", 1)
    for bs in (2, 7, 64):
        torch.testing.assert_close(sliding_window(net, x, 16, 0.5, "gaussian", bs), whole, rtol=1e-5, atol=1e-6)
    single = torch.cat([sliding_window(net, x[i : i + 1], 16, 0.5, "gaussian", 3) for i in range(3)])
    torch.testing.assert_close(single, whole, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- receptive field


@pytest.mark.parametrize("ndim,size,window", [(2, (45, 61), (16, 20)), (2, (11, 9), (16, 16)), (3, (13, 15, 11), 8)])
@pytest.mark.parametrize("overlap,blend", [(0.0, "constant"), (0.5, "gaussian")])
def test_overlap_tile_equals_whole_image(ndim, size, window, overlap, blend):
    """Margin >= receptive-field radius (3): tiled == whole-image prediction on the mirror-padded image."""
    net = conv_net(ndim)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        whole = net(mirror_pad(x, 3))[(slice(None), slice(None), *[slice(3, -3)] * ndim)]
    out = sliding_window(net, x, window, overlap, blend, 3, margin=3)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    # the interior does not depend on the image border, so it equals plain whole-image inference
    with torch.no_grad():
        plain = net(x)
    inner = (slice(None), slice(None), *[slice(3, -3)] * ndim)
    if min(size) > 6:
        torch.testing.assert_close(out[inner], plain[inner], rtol=1e-5, atol=1e-5)


def test_overlap_tile_with_valid_convolutions():
    """The U-Net paper's setting: a network without padding returns only the centre of each tile."""
    net = conv_net(2, padding=0)
    x = torch.randn(1, 3, 50, 37)
    with torch.no_grad():
        whole = net(mirror_pad(x, 3))
    assert whole.shape[2:] == x.shape[2:]
    out = sliding_window(net, x, (20, 12), 0.0, "constant", 4, margin=3)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)


def test_gaussian_overlap_reduces_seams():
    net = conv_net(2)
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        ref = net(x)

    def err(overlap, blend):
        return (sliding_window(net, x, 24, overlap, blend) - ref)[..., 3:-3, 3:-3].abs().mean().item()

    assert err(0.5, "gaussian") < 0.2 * err(0.0, "gaussian")
    assert err(0.5, "gaussian") < err(0.5, "constant")


# ----------------------------------------------------------------------------------------------- MONAI parity


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize(
    "ndim,size,window",
    [(2, (50, 67), (16, 16)), (2, (50, 67), (20, 33)), (2, (30, 20), (40, 24)), (3, (12, 17, 14), (8, 8, 6))],
)
def test_parity_with_monai(blend, overlap, ndim, size, window):
    net = conv_net(ndim, seed=1)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = sliding_window_inference(x, window, 3, net, overlap=overlap, mode=blend)
    out = sliding_window(net, x, window, overlap, blend, 3, padding_mode="constant")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_parity_with_monai_reflect_padding_and_sigma():
    net = conv_net(2, seed=2)
    x = torch.randn(1, 3, 20, 26)
    with torch.no_grad():
        ref = sliding_window_inference(
            x, (32, 30), 2, net, overlap=0.5, mode="gaussian", sigma_scale=(0.2, 0.1), padding_mode="reflect"
        )
    out = sliding_window(net, x, (32, 30), 0.5, "gaussian", 2, sigma_scale=(0.2, 0.1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- models and devices


class FlipTTA(nn.Module):
    """A test-time augmentation wrapper: mean of the model and its horizontally mirrored prediction."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(-1)).flip(-1)) / 2


def test_any_callable_dict_outputs_and_tta_wrapper():
    net = conv_net(2)
    x = torch.randn(1, 3, 33, 40)
    ref = sliding_window(net, x, 16, 0.25)
    torch.testing.assert_close(sliding_window(lambda t: net(t), x, 16, 0.25), ref)
    torch.testing.assert_close(sliding_window(lambda t: {"out": net(t), "aux": [net(t)]}, x, 16, 0.25), ref)
    # TTA inside each window; the window grid along W (starts 0, 12, 24 of 40) is symmetric, so this equals
    # the mean of the tiled prediction and the mirrored tiled prediction of the mirrored image
    tta = sliding_window(FlipTTA(net), x, 16, 0.25)
    mirrored = sliding_window(net, x.flip(-1), 16, 0.25).flip(-1)
    assert not torch.allclose(tta, ref)
    torch.testing.assert_close(tta, (ref + mirrored) / 2, rtol=1e-5, atol=1e-5)


def test_training_model_runs_in_eval_mode_and_is_restored():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4))
    net.train()
    x = torch.randn(1, 3, 20, 30)
    out = sliding_window(net, x, 8, 0.25)
    assert net.training and net[1].training
    net.eval()
    torch.testing.assert_close(out, sliding_window(net, x, 8, 0.25))


def test_devices_dtype_and_progress(capsys):
    x = torch.randn(1, 2, 20, 23, dtype=torch.float64)
    out = sliding_window(PlusOne(), x, 8, 0.5, device="cpu", output_device=torch.device("cpu"), progress=True)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    torch.testing.assert_close(out, x + 1)
    assert "sliding window" in capsys.readouterr().err
    assert not out.requires_grad


def test_sliding_window_class():
    x = torch.randn(2, 3, 25, 31)
    net = conv_net(2)
    sw = SlidingWindow((12, 16), 0.5, "constant", 2, margin=1, activation="softmax")
    torch.testing.assert_close(
        sw(net, x), sliding_window(net, x, (12, 16), 0.5, "constant", 2, margin=1, activation="softmax")
    )
    assert "window=(12, 16)" in repr(sw)
    assert SlidingWindow(8)(PlusOne(), x).shape == x.shape


# -------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"overlap": 1.0}, ValueError, r"overlap must be a fraction in \[0, 1\), got 1.0"),
        ({"overlap": -0.1}, ValueError, "overlap"),
        ({"window": (16, True)}, TypeError, "window must be an int"),
        ({"window": (16, 16, 16)}, ValueError, "window has 3 values .* 2 spatial dimensions"),
        ({"window": 16.5}, TypeError, "window must be an int"),
        ({"blend": "pyramid"}, ValueError, "blend must be one of"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"padding_mode": "circular"}, ValueError, "padding_mode must be one of"),
        ({"margin": -1}, ValueError, "margin must be a non-negative int"),
        ({"sigma_scale": 0}, ValueError, "sigma_scale must be a positive number"),
        ({"channels_last": 1}, TypeError, "channels_last must be True or False"),
    ],
)
def test_bad_options(kwargs, error, match):
    x = torch.randn(1, 3, 20, 20)
    args = {"window": 8, **kwargs}
    with pytest.raises(error, match=match):
        sliding_window(PlusOne(), x, **args)
    if "window has" not in match:  # the class cannot know the image's dimensions before it is called
        with pytest.raises(error, match=match):
            SlidingWindow(**args)
    else:
        with pytest.raises(error, match=match):
            SlidingWindow(**args)(PlusOne(), x)


def test_bad_images_and_models():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*of shape \(3, 20, 20\).*image\[None\]"):
        sliding_window(PlusOne(), torch.randn(3, 20, 20), 8)
    with pytest.raises(TypeError, match="float tensor"):
        sliding_window(PlusOne(), torch.zeros(1, 3, 20, 20, dtype=torch.uint8), 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        sliding_window(PlusOne(), [[1.0]], 8)
    x = torch.randn(1, 3, 20, 20)
    with pytest.raises(ValueError, match=r"model returned shape \(2, 3, 4, 4\) .* expected \(N, K, \*\(8, 8\)\)"):
        sliding_window(lambda t: t[..., ::2, ::2], x, 8, batch_size=2)
    with pytest.raises(TypeError, match="expected logits tensor"):
        sliding_window(lambda t: [t], x, 8)
    # a window larger than the image is fine
    assert sliding_window(PlusOne(), x, (64, 50)).shape == x.shape


def test_windows_touch_every_pixel_with_positive_weight():
    """Pixels at the image border, seen only by window borders, keep their value (the Gaussian floor)."""
    x = torch.zeros(1, 1, 40, 40)
    x[..., 0, 0] = x[..., -1, -1] = 5.0
    out = sliding_window(PlusOne(), x, 16, 0.25, "gaussian")
    assert out[0, 0, 0, 0] == pytest.approx(6.0) and out[0, 0, -1, -1] == pytest.approx(6.0)
    assert out.shape == x.shape


@pytest.mark.parametrize("ndim", [2, 3])
def test_channels_last_layout_reaches_the_model_and_changes_no_value(ndim):
    net = conv_net(ndim)
    layouts = []

    def model(x):
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        layouts.append(x.is_contiguous(memory_format=fmt) and not x.is_contiguous())
        return net(x)

    size = (37, 41) if ndim == 2 else (13, 17, 11)
    x = torch.randn(2, 3, *size)
    fast = sliding_window(model, x, 8, 0.5, batch_size=3)
    assert layouts and all(layouts)
    layouts.clear()
    plain = sliding_window(model, x, 8, 0.5, batch_size=3, channels_last=False)
    assert not any(layouts)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
