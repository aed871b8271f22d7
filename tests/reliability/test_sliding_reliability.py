"""Sliding-window inference: MONAI's ``-1`` window entries (the whole axis) and clear errors for unsupported shapes.

MONAI parity is within 1e-5 (both blend the same windows; float32 rounding of the Gaussian sums differs).
"""

from __future__ import annotations

import re

import pytest
import torch
from monai.inferers import sliding_window_inference

from maskworks.inference import SlidingWindow, plan_windows, sliding_window
from maskworks.inference.sliding import resolve_window


def plus_one(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def conv_model(ndim: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(conv(2, 3, 3, padding=1), torch.nn.Tanh(), conv(3, 3, 3, padding=1)).eval()


# ------------------------------------------------------------------------------------------------- -1 windows


@pytest.mark.parametrize(
    "window,size,expected",
    [
        ((16, -1), (37, 53), (16, 53)),
        ((-1, 8), (37, 53), (37, 8)),
        (-1, (37, 53), (37, 53)),
        ((4, -1, 7), (16, 15, 7), (4, 15, 7)),
        ((0, 5), (9, 9), (9, 5)),  # MONAI's rule is "non-positive", not only -1
        ((64, -1), (10, 12), (64, 12)),  # a window larger than the image stays as it is
    ],
)
def test_resolve_window_uses_the_image_size_for_non_positive_entries(window, size, expected):
    from monai.utils import fall_back_tuple

    assert resolve_window(window, size) == expected == fall_back_tuple(window, size)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize(
    "shape,window,overlap",
    [
        ((1, 2, 37, 53), (16, -1), 0.25),
        ((2, 2, 20, 30), (-1, 7), 0.5),
        ((1, 2, 12, 9), -1, 0.25),
        ((1, 2, 16, 15, 7), (4, -1, 7), 0.25),
    ],
)
def test_minus_one_window_matches_monai(shape, window, overlap, blend):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model = conv_model(len(shape) - 2)
    ours = sliding_window(model, x, window, overlap, blend, batch_size=3, padding_mode="constant")
    ref = sliding_window_inference(x, window, 3, model, overlap, mode=blend)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.shape == (shape[0], 3, *shape[2:])


def test_minus_one_plans_one_window_along_that_axis():
    corners = plan_windows((37, 53), (16, -1), 0.25)
    assert {c[1] for c in corners} == {0} and len(corners) == 3
    assert plan_windows((37, 53), -1) == [(0, 0)]


def test_minus_one_window_of_a_pointwise_model_is_exact():
    x = torch.randint(0, 9, (2, 3, 21, 17)).float()
    for window in [(8, -1), (-1, 5), -1, [-1, -1]]:
        assert torch.equal(sliding_window(plus_one, x, window, 0.5, "constant"), x + 1)
    assert torch.equal(SlidingWindow((8, -1), blend="constant")(plus_one, x), x + 1)


def test_sliding_window_class_resolves_minus_one_against_each_image():
    sw = SlidingWindow((-1, 6), overlap=0.0, blend="constant")
    seen: list[tuple[int, ...]] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape[2:]))
        return t

    for h in (5, 11):
        sw(record, torch.zeros(1, 1, h, 12))
    assert set(seen) == {(5, 6), (11, 6)}


def test_window_type_errors_are_still_reported():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(TypeError, match=r"window must be an int or one per axis \(positive, or -1"):
        sliding_window(plus_one, x, (4, 2.5))
    with pytest.raises(TypeError, match="window must be an int"):
        SlidingWindow((4, None))
    with pytest.raises(ValueError, match="window has 3 values"):
        sliding_window(plus_one, x, (4, -1, 4))


# ------------------------------------------------------------------------------------------ unsupported shapes


@pytest.mark.parametrize(
    "shape,extra",
    [
        ((2, 3, 16), r"1-D signals \(B, C, L\) are not supported; one \(C, H, W\) image needs its batch axis"),
        ((2, 3, 16, 15, 7, 9), r"i\.e\. 4 spatial dimensions, which are not supported"),
        ((16, 16), r"image\[None, None\]"),
        ((2, 3, 4, 4, 4, 4, 4), r"5 spatial dimensions"),
    ],
)
def test_unsupported_dimensionalities_name_the_supported_layouts_and_the_shape(shape, extra):
    x = torch.zeros(shape)
    with pytest.raises(ValueError) as info:
        sliding_window(plus_one, x, 4)
    message = str(info.value)
    assert "2-D images (B, C, H, W) and 3-D volumes (B, C, D, H, W)" in message
    assert f"{len(shape)}-dimensional tensor of shape {shape}" in message
    assert "\n" not in message
    assert re.search(extra, message), message
    if len(shape) != 3:  # a batched input is never told to add a batch dimension with image[None]
        assert "image[None])" not in message
