"""Concrete cases of MONAI's own tests, run through the installed MONAI and maskworks on the same inputs.

Sources (Project-MONAI/MONAI): ``tests/inferers/test_sliding_window_inference.py`` (``TEST_CASES``, the
``_windows`` buffer cases, ``test_sigma``, ``test_cval``, ``test_strict_shape_validation``,
``test_default_device``), ``tests/losses/test_dice_loss.py`` (``TEST_CASES`` with sigmoid / softmax activations,
``TestDiceLossIgnoreIndex``) and ``tests/losses/test_focal_loss.py`` (``TEST_CASES``, ``test_foreground``,
``test_bin_seg_2d``, ``test_multi_class_seg_2d``, the gamma = 0 consistency checks).

Not ported: MONAI cases whose option has no counterpart here (``other_act`` activations, ``soft_label`` /
probability inputs - our losses take logits -, per-class ``weight`` on sigmoid focal, multi-output predictors,
``buffer_steps``). Intentional differences, asserted below and documented in the modules: sliding-window
inference supports 2-D and 3-D images only and runs under ``no_grad``; MONAI's softmax focal mean is ours / K.
Tolerances: values to 1e-5 relative (MONAI's own ``rtol``), sliding-window sums to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.losses import DiceLoss as MonaiDice
from monai.losses import FocalLoss as MonaiFocal

from maskworks.inference import SlidingWindow, sliding_window
from maskworks.losses.focal import focal_loss
from maskworks.losses.overlap import dice_loss, jaccard_loss

# =============================================================================================== sliding window

# (image shape, roi size, sw batch size, overlap, mode) from TEST_CASES (the CUDA duplicate runs on the CPU here)
SW_CASES = [
    ((1, 3, 16, 15, 7), (4, -1, 7), 3, 0.25, "constant"),
    ((2, 3, 16, 15, 7), (4, -1, 7), 3, 0.25, "constant"),
    ((3, 3, 16, 15, 7), (4, -1, 7), 3, 0.25, "constant"),
    ((1, 3, 16, 15, 7), (4, 10, 7), 3, 0.25, "constant"),
    ((1, 3, 16, 15, 7), (20, 22, 23), 10, 0.25, "constant"),
    ((2, 3, 15, 7), (2, 6), 1000, 0.25, "constant"),
    ((1, 3, 16, 7), (80, 50), 7, 0.25, "constant"),
    ((1, 3, 16, 15, 7), (20, 22, 23), 10, 0.5, "constant"),
    ((1, 3, 16, 7), (80, 50), 7, 0.5, "gaussian"),
    ((1, 3, 16, 15, 7), (4, 10, 7), 3, 0.25, "gaussian"),
    ((3, 3, 16, 15, 7), (4, 10, 7), 3, 0.25, "gaussian"),
    ((1, 3, 16, 15, 7), (4, 1, 7), 3, 0.25, "constant"),
    ((5, 3, 16, 15, 7), (4, 1, 7), 3, 0.25, "constant"),
]


def plus_one(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@pytest.mark.parametrize("shape,roi,sw_batch,overlap,mode", SW_CASES)
def test_sliding_window_default_cases(shape, roi, sw_batch, overlap, mode):
    n = int(np.prod(shape))
    x = torch.arange(n, dtype=torch.float).reshape(shape) if mode == "constant" else torch.ones(shape)
    expected = x + 1
    ref = sliding_window_inference(x, roi, sw_batch, plus_one, overlap, mode=mode)
    ours = sliding_window(plus_one, x, roi, overlap, mode, sw_batch, padding_mode="constant")
    also = SlidingWindow(roi, overlap, mode, sw_batch, padding_mode="constant")(plus_one, x)
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(also, ours, rtol=0, atol=0)
    if mode == "constant":
        assert torch.equal(ours, expected)  # integer-valued sums with constant weights are exact


@pytest.mark.parametrize(
    "shape,roi",
    [((2, 3, 16), (4,)), ((2, 3, 16, 15, 7, 9), 4)],  # TEST_CASES' 1-D and 4-D entries
    ids=["1d", "4d"],
)
def test_sliding_window_1d_and_4d_are_monai_only(shape, roi):
    """Intentional difference: sliding_window supports 2-D and 3-D images and says so."""
    x = torch.arange(int(np.prod(shape)), dtype=torch.float).reshape(shape)
    torch.testing.assert_close(sliding_window_inference(x, roi, 3, plus_one, 0.25), x + 1)
    with pytest.raises(ValueError, match=r"supports 2-D images \(B, C, H, W\) and 3-D volumes \(B, C, D, H, W\)"):
        sliding_window(plus_one, x, roi, 0.25, "constant", 3)


# the _windows list of test_buffers (the quick ones): image shape, roi, overlap, sw batch size
BUFFER_WINDOWS = [
    ((2, 3, 10, 11), (7, 10), 0.8, 5),
    ((2, 3, 10, 11), (15, 12), 0, 2),
    ((2, 3, 10, 11), (10, 11), 0, 3),
    ((2, 3, 511, 237), (96, 80), 0.4, 5),
    ((2, 3, 512, 245), (96, 80), 0, 5),
    ((2, 3, 512, 245), (512, 80), 0.125, 5),
    ((2, 3, 10, 11, 12), (7, 8, 10), 0.2, 2),
]


@pytest.mark.parametrize("shape,roi,overlap,sw_batch", BUFFER_WINDOWS)
def test_sliding_window_buffer_cases_times_two(shape, roi, overlap, sw_batch):
    dtype = [torch.float, torch.double][roi[0] % 2]  # as MONAI: the input dtype follows the roi
    mode = ["constant", "gaussian"][shape[1] % 2]
    x = torch.randint(0, 255, shape, generator=torch.Generator().manual_seed(0)).to(dtype)

    def mult_two(patch: torch.Tensor) -> torch.Tensor:
        return 2.0 * patch

    ref = sliding_window_inference(x, roi, sw_batch, mult_two, overlap, mode=mode)
    ours = sliding_window(mult_two, x, roi, overlap, mode, sw_batch, padding_mode="constant")
    assert ours.dtype == x.dtype
    assert float((x - 0.5 * ours).abs().max()) < 1e-3  # MONAI's own criterion
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-4)


class _CountingPredictor:
    """MONAI's test_sigma predictor: adds 2 on its first call, 3 on the second, ..."""

    def __init__(self) -> None:
        self.add = 1

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        self.add += 1
        return data + self.add


SIGMA_CONSTANT = [3.0, 3.0, 3.3333, 3.6667, 4.3333, 4.5, 5.0]
SIGMA_GAUSSIAN = [3.0, 3.0, 3.3271623, 3.6728377, 4.3271623, 4.513757, 5.0]


@pytest.mark.parametrize("mode,rows", [("constant", SIGMA_CONSTANT), ("gaussian", SIGMA_GAUSSIAN)])
def test_sigma_with_a_stateful_predictor(mode, rows):
    """Same windows, same order, same batches of 10: the per-call offsets blend to MONAI's rows exactly."""
    x = torch.ones(1, 1, 7, 7)
    kw = dict(overlap=0.5, padding_mode="constant", cval=-1, mode=mode, sigma_scale=1.0)
    ref = sliding_window_inference(x, (3, 3), 10, _CountingPredictor(), **kw)
    ours = sliding_window(
        _CountingPredictor(), x, (3, 3), 0.5, mode, 10, sigma_scale=1.0, padding_mode="constant", cval=-1
    )
    expected = torch.tensor(rows)[:, None].expand(7, 7)
    np.testing.assert_allclose(ref[0, 0].numpy(), expected.numpy(), rtol=1e-4)
    np.testing.assert_allclose(ours[0, 0].numpy(), expected.numpy(), rtol=1e-4)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    inferer = SlidingWindowInferer((3, 3), 10, overlap=0.5, mode=mode, sigma_scale=[1.0, 1.0])
    ours_cls = SlidingWindow((3, 3), 0.5, mode, 10, sigma_scale=[1.0, 1.0], padding_mode="constant")
    torch.testing.assert_close(ours_cls(_CountingPredictor(), x), inferer(x, _CountingPredictor()))


def test_cval_pads_windows_larger_than_the_image():
    x = torch.ones(1, 1, 3, 3)

    def compute(data: torch.Tensor) -> torch.Tensor:
        return data + data.sum()  # the padded 5x5 tile sums to 9 - 16 = -7

    kw = dict(overlap=0.5, padding_mode="constant", cval=-1, mode="constant", sigma_scale=1.0)
    ref = sliding_window_inference(x, (5, 5), 10, compute, **kw)
    ours = sliding_window(compute, x, (5, 5), 0.5, "constant", 10, padding_mode="constant", cval=-1)
    torch.testing.assert_close(ref, torch.full_like(x, -6.0))
    torch.testing.assert_close(ours, ref)


def test_strict_shape_validation():
    roi = (16, 16, 16)
    for shape in [(1, 16, 16, 16), (16, 16, 16)]:
        x = torch.randn(shape)
        with pytest.raises(ValueError, match="dimensions"):
            sliding_window_inference(x, roi, 4, lambda d: d)
        with pytest.raises(ValueError, match=r"window has 3 values|supports 2-D images"):
            sliding_window(lambda d: d, x, roi)


def test_default_device_and_no_grad():
    """Outputs stay on the input's device; ours runs under no_grad (inference only), MONAI keeps the graph."""
    x = torch.ones(1, 3, 16, 15, 7, requires_grad=True)
    ref = sliding_window_inference(x, (4, 10, 7), 10, plus_one)
    ours = sliding_window(plus_one, x, (4, 10, 7), 0.25, "gaussian", 10)
    assert ref.requires_grad and not ours.requires_grad
    assert ours.device == x.device
    torch.testing.assert_close(ours, ref.detach())
    torch.testing.assert_close(ours, torch.full_like(ours, 2.0))


# ============================================================================================================ Dice


def _binary_2x2(batch: int):
    x = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]]]]).repeat(batch, 1, 1, 1)
    return x


DICE_SIGMOID_CASES = [
    # (MONAI kwargs, input, target, expected)
    (
        {"sigmoid": True, "smooth_nr": 1e-6, "smooth_dr": 1e-6},
        _binary_2x2(1),
        torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]]),
        0.307576,
    ),
    (
        {"sigmoid": True, "smooth_nr": 1e-4, "smooth_dr": 1e-4},
        _binary_2x2(2),
        torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [1.0, 0.0]]]]),
        0.416657,
    ),
    ({"sigmoid": True, "squared_pred": True}, _binary_2x2(1), torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]]), 0.178337),
    ({"sigmoid": True, "jaccard": True}, _binary_2x2(1), torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]]), 0.470451),
]


@pytest.mark.parametrize("kwargs,x,target,expected", DICE_SIGMOID_CASES)
def test_dice_sigmoid_cases(kwargs, x, target, expected):
    ref = MonaiDice(include_background=True, **kwargs)(x, target)
    smooth = kwargs.get("smooth_nr", 1e-5)
    if kwargs.get("jaccard"):  # MONAI's Jaccard is (2 TP + s) / (2 U + s): our smoothing s / 2
        ours = jaccard_loss(x, target.long(), "binary", per_image=True, smooth=smooth / 2, mask_absent=False)
    else:
        squared = kwargs.get("squared_pred", False)
        ours = dice_loss(x, target.long(), "binary", per_image=True, smooth=smooth, squared=squared, mask_absent=False)
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)


X_2x2x3 = torch.tensor([[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
T_2x1x3 = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]]])


@pytest.mark.parametrize(
    "activation,reduction,expected",
    [
        ("sigmoid", "mean", 0.435050),
        ("sigmoid", "none", [[0.296529, 0.415136], [0.599976, 0.428559]]),
        ("softmax", "mean", 0.383713),
        ("softmax", "sum", 1.534853),
    ],
)
def test_dice_one_hot_target_cases(activation, reduction, expected):
    kw = {activation: True, "smooth_nr": 1e-4, "smooth_dr": 1e-4, "reduction": reduction}
    ref = MonaiDice(include_background=True, to_onehot_y=True, **kw)(X_2x2x3, T_2x1x3)
    labels = T_2x1x3[:, 0].long()
    common = dict(per_image=True, smooth=1e-4, mask_absent=False, reduction=reduction)
    if activation == "sigmoid":  # sigmoid over one-hot channels is our multilabel mode
        ours = dice_loss(X_2x2x3, F.one_hot(labels, 2).movedim(-1, 1), "multilabel", **common)
    else:
        ours = dice_loss(X_2x2x3, labels, "multiclass", **common)
    np.testing.assert_allclose(ref.reshape(np.shape(expected)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)


def test_dice_without_background_perfect_prediction():
    """MONAI feeds one-hot probabilities; the same prediction as logits (softmax of 30 * one-hot) on both sides."""
    onehot = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
    logits = 30.0 * onehot
    ref = MonaiDice(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=0, smooth_dr=0)(logits, target)
    ours = dice_loss(logits, target[:, 0].long(), include_background=False, per_image=True, mask_absent=False)
    assert float(ref) == pytest.approx(0.0, abs=1e-6) and float(ours) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)


def _log_probs_3x2x2() -> torch.Tensor:
    return torch.log(torch.tensor([[[[0.8, 0.1], [0.1, 0.1]], [[0.1, 0.8], [0.1, 0.1]], [[0.1, 0.1], [0.8, 0.8]]]]))


def test_dice_ignore_index_equals_the_crop_without_the_ignored_row():
    x = _log_probs_3x2x2()
    target = torch.tensor([[[0, 1], [2, 2]]])
    ref = MonaiDice(to_onehot_y=True, softmax=True, ignore_index=2)(x, target[:, None])
    ref_crop = MonaiDice(to_onehot_y=True, softmax=True)(x[:, :, :1], target[:, None, :1])
    ours = dice_loss(x, target, ignore_index=2, per_image=True, smooth=1e-5, mask_absent=False)
    ours_crop = dice_loss(x[:, :, :1], target[:, :1], ignore_index=None, per_image=True, smooth=1e-5, mask_absent=False)
    torch.testing.assert_close(ref, ref_crop)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_crop, ref_crop)


def test_dice_ignored_pixels_get_exactly_zero_gradient():
    target = torch.tensor([[[0, 1, 0, 1], [1, 0, 1, 0], [2, 2, 2, 2], [2, 2, 2, 2]]])
    x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    MonaiDice(to_onehot_y=True, softmax=True, ignore_index=2)(x1, target[:, None]).backward()
    dice_loss(x2, target, ignore_index=2, per_image=True, smooth=1e-5, mask_absent=False).backward()
    assert torch.all(x1.grad[:, :, 2:] == 0) and torch.all(x2.grad[:, :, 2:] == 0)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-7)


# =========================================================================================================== Focal

FOCAL_X = torch.tensor([[[[1.0, 1.0], [0.5, 0.0]], [[1.0, 1.0], [0.5, 0.0]], [[1.0, 1.0], [0.5, 0.0]]]])
FOCAL_T = torch.tensor([[[[0, 1], [2, 0]]]])
FOCAL_ONEHOT = F.one_hot(FOCAL_T[:, 0], 3).movedim(-1, 1)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({}, 0.34959),
        ({"include_background": False}, 0.36498),
        ({"alpha": 0.8}, 0.08423),
        (
            {"reduction": "none"},
            [
                [[0.02266, 0.70187], [0.37741, 0.17329]],
                [[0.70187, 0.02266], [0.37741, 0.17329]],
                [[0.70187, 0.70187], [0.06757, 0.17329]],
            ],
        ),
    ],
)
def test_focal_sigmoid_cases_are_our_multilabel_mode(kwargs, expected):
    ref = MonaiFocal(to_onehot_y=True, **kwargs)(FOCAL_X, FOCAL_T)
    ref_onehot = MonaiFocal(to_onehot_y=False, **kwargs)(FOCAL_X, FOCAL_ONEHOT)
    first = 0 if kwargs.get("include_background", True) else 1
    ours = focal_loss(
        FOCAL_X[:, first:],
        FOCAL_ONEHOT[:, first:],
        "multilabel",
        alpha=kwargs.get("alpha"),
        reduction=kwargs.get("reduction", "mean"),
    )
    np.testing.assert_allclose(ref.numpy().squeeze(), np.squeeze(expected), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref_onehot, ref)
    torch.testing.assert_close(ours, ref.reshape(ours.shape), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("alpha,expected", [(None, 0.16276), (0.8, 0.08138)])
def test_focal_softmax_cases_mean_over_classes_too(alpha, expected):
    """Intentional difference: MONAI's softmax focal mean also divides by K; alpha weighs channel 0 by 1 - alpha."""
    ref = MonaiFocal(to_onehot_y=True, use_softmax=True, alpha=alpha)(FOCAL_X, FOCAL_T)
    ours_alpha = None if alpha is None else [1 - alpha, alpha, alpha]
    ours = focal_loss(FOCAL_X, FOCAL_T[:, 0], alpha=ours_alpha)
    np.testing.assert_allclose(float(ref), expected, atol=1e-4, rtol=1e-4)
    assert float(ours) / 3 == pytest.approx(float(ref), rel=1e-5)


def test_focal_foreground():
    background, foreground = torch.ones(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)
    target = torch.cat((background, foreground), dim=1)
    x = torch.cat((background, foreground), dim=1)
    target[:, 0, 2, 2], target[:, 1, 2, 2] = 0, 1
    fgbg = MonaiFocal(to_onehot_y=False, include_background=True)(x, target)
    fg = MonaiFocal(to_onehot_y=False, include_background=False)(x, target)
    assert float(fgbg) == pytest.approx(0.1116, abs=1e-3) and float(fg) == pytest.approx(0.1733, abs=1e-3)
    torch.testing.assert_close(focal_loss(x, target.long(), "multilabel"), fgbg)
    torch.testing.assert_close(focal_loss(x[:, 1:], target[:, 1:].long(), "multilabel"), fg)


@pytest.mark.parametrize(
    "target",
    [
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],  # test_bin_seg_2d
        [[0, 0, 0, 0]] * 4,  # test_empty_class_2d
        [[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]],  # test_multi_class_seg_2d (6 classes)
    ],
    ids=["bin_seg_2d", "empty_class_2d", "multi_class_seg_2d"],
)
@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_focal_very_good_prediction_is_near_zero(target, use_softmax, alpha):
    t = torch.tensor(target)[None]
    k = 6 if int(t.max()) > 1 else 2
    onehot = F.one_hot(t, k).movedim(-1, 1)
    x = 1000 * onehot.float() - 500.0
    ref = MonaiFocal(to_onehot_y=True, use_softmax=use_softmax, alpha=alpha)(x, t[:, None])
    if use_softmax:
        ours = focal_loss(x, t, alpha=None if alpha is None else [1 - alpha] + [alpha] * (k - 1))
    else:
        ours = focal_loss(x, onehot, "multilabel", alpha=alpha)
    assert float(ref) == pytest.approx(0.0, abs=1e-3) and float(ours) == pytest.approx(0.0, abs=1e-3)


def test_focal_gamma_zero_is_binary_cross_entropy():
    """The consistency checks of test_focal_loss.py, on one small random batch instead of 100 large ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 10, 8, 4, generator=g)
    labels = torch.randint(0, 2, (8, 10, 8, 4), generator=g)
    bce = F.binary_cross_entropy_with_logits(x, labels.float())
    ref = MonaiFocal(to_onehot_y=False, gamma=0.0, reduction="mean", weight=1.0)(x, labels.float())
    torch.testing.assert_close(ref, bce, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(focal_loss(x, labels, "multilabel", gamma=0.0), bce, atol=1e-6, rtol=1e-5)
    classes = torch.randint(0, 10, (8, 8, 4), generator=g)
    onehot = F.one_hot(classes, 10).movedim(-1, 1)
    ref = MonaiFocal(to_onehot_y=True, gamma=0.0)(x, classes[:, None])
    torch.testing.assert_close(focal_loss(x, onehot, "multilabel", gamma=0.0), ref, atol=1e-6, rtol=1e-5)
    assert float(MonaiFocal(to_onehot_y=True, gamma=0.1)(x, classes[:, None])) != pytest.approx(float(ref), abs=1e-3)
