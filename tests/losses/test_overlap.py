"""Overlap losses: hand values, identities, smp / MONAI parity (values and gradients), ignore, absent classes."""

from __future__ import annotations

import math

import monai
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from maskworks.losses.overlap import (
    DiceLoss,
    FocalTverskyLoss,
    GeneralizedDiceLoss,
    JaccardLoss,
    TverskyLoss,
    dice_loss,
    focal_tversky_loss,
    generalized_dice_loss,
    jaccard_loss,
    log_cosh_dice_loss,
    tversky_loss,
)

ALL = [dice_loss, jaccard_loss, tversky_loss, focal_tversky_loss, log_cosh_dice_loss, generalized_dice_loss]


def _data(k=3, seed=0, dtype=torch.float64, ignore=True, size=(2, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size[0], k, *size[1:], generator=g, dtype=dtype)
    t = torch.randint(0, max(k, 2), size, generator=g)
    t[:, 0, : max(k, 2)] = torch.arange(max(k, 2))  # every class present in every image
    if ignore:
        t[0, 2:4, 1:5] = 255
    return x, t


def _grads(fn_a, fn_b, x):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = fn_a(x1), fn_b(x2)
    a.sum().backward()
    b.sum().backward()
    return a, b, x1.grad, x2.grad


# ------------------------------------------------------------------------------------------------------ hand values
def test_hand_values_binary():
    x = torch.zeros(1, 1, 1, 4, dtype=torch.float64)  # p = 0.5 everywhere
    t = torch.tensor([[[1, 0, 1, 1]]])  # TP = 1.5, sum p = 2, sum g = 3, FP = 0.5, FN = 1.5
    assert dice_loss(x, t, "binary").item() == pytest.approx(1 - 3 / 5, abs=1e-15)
    assert dice_loss(x, t, "binary", squared=True).item() == pytest.approx(1 - 3 / 4, abs=1e-15)
    assert dice_loss(x, t, "binary", smooth=1.0).item() == pytest.approx(1 - 4 / 6, abs=1e-15)
    assert dice_loss(x, t, "binary", log_loss=True).item() == pytest.approx(-math.log(3 / 5), abs=1e-15)
    assert jaccard_loss(x, t, "binary").item() == pytest.approx(1 - 1.5 / 3.5, abs=1e-15)
    assert tversky_loss(x, t, "binary").item() == pytest.approx(1 - 1.5 / 2.7, abs=1e-15)
    assert focal_tversky_loss(x, t, "binary").item() == pytest.approx((1 - 1.5 / 2.7) ** 0.75, abs=1e-15)
    assert log_cosh_dice_loss(x, t, "binary").item() == pytest.approx(math.log(math.cosh(0.4)), abs=1e-15)


def test_hand_value_generalized_dice():
    x = torch.zeros(1, 2, 1, 4, dtype=torch.float64)  # p = 0.5 for both classes
    t = torch.tensor([[[0, 1, 1, 1]]])
    # class 0: G=1, TP=.5, P=2, w=1 ; class 1: G=3, TP=1.5, P=2, w=1/9 -> 1 - (2*(.5+1.5/9)) / (3 + 5/9) = 0.625
    assert generalized_dice_loss(x, t, smooth=0.0).item() == pytest.approx(0.625, abs=1e-15)
    # 'simple': w = 1, 1/3 -> 1 - 2*(.5+.5) / (3 + 5/3)
    assert generalized_dice_loss(x, t, weight_type="simple", smooth=0.0).item() == pytest.approx(1 - 2 / (14 / 3))


def test_hand_value_multiclass_weighted_mean():
    x = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    t = torch.tensor([[[0, 1, 1, 1]]])
    # class 0: 2*.5/(2+1) = 1/3 -> 2/3 ; class 1: 2*1.5/(2+3) = 3/5 -> 2/5
    torch.testing.assert_close(dice_loss(x, t, reduction="none"), torch.tensor([2 / 3, 2 / 5], dtype=torch.float64))
    w = [1.0, 3.0]
    assert dice_loss(x, t, weight=w).item() == pytest.approx((2 / 3 + 3 * 2 / 5) / 4, abs=1e-15)
    assert dice_loss(x, t, include_background=False).item() == pytest.approx(2 / 5, abs=1e-15)
    assert dice_loss(x, t, classes=[0]).item() == pytest.approx(2 / 3, abs=1e-15)


# ------------------------------------------------------------------------------------------------------ identities
@pytest.mark.parametrize("per_image", [False, True])
def test_tversky_half_half_is_dice(per_image):
    x, t = _data(seed=1)
    kw = dict(per_image=per_image, reduction="none")
    torch.testing.assert_close(tversky_loss(x, t, alpha=0.5, beta=0.5, **kw), dice_loss(x, t, **kw))
    # smoothing: Tversky smooth s == Dice smooth 2 s
    torch.testing.assert_close(
        tversky_loss(x, t, alpha=0.5, beta=0.5, smooth=0.5, **kw), dice_loss(x, t, smooth=1.0, **kw)
    )
    torch.testing.assert_close(tversky_loss(x, t, alpha=1.0, beta=1.0, **kw), jaccard_loss(x, t, **kw))
    torch.testing.assert_close(focal_tversky_loss(x, t, gamma=1.0, **kw), tversky_loss(x, t, **kw))


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("mode", ["binary", "multiclass", "multilabel"])
def test_perfect_prediction_is_zero(fn, mode):
    g = torch.Generator().manual_seed(2)
    if mode == "multiclass":
        t = torch.randint(0, 3, (2, 5, 5), generator=g)
        x = 40.0 * F.one_hot(t, 3).movedim(-1, 1).double()
    else:
        t = torch.randint(0, 2, (2, 3 if mode == "multilabel" else 1, 5, 5), generator=g)
        x = 40.0 * (2.0 * t.double() - 1.0)
    assert fn(x, t, mode).item() == pytest.approx(0.0, abs=1e-12)
    assert fn(x, t, mode, per_image=True).item() == pytest.approx(0.0, abs=1e-12)


def test_all_wrong_is_one():
    t = torch.randint(0, 3, (2, 5, 5))
    x = 40.0 * F.one_hot((t + 1) % 3, 3).movedim(-1, 1).double()
    assert dice_loss(x, t).item() == pytest.approx(1.0, abs=1e-12)
    assert jaccard_loss(x, t).item() == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------------ smp parity
@pytest.mark.parametrize("mode", ["binary", "multiclass", "multilabel"])
@pytest.mark.parametrize("opts", [{}, {"smooth": 0.5}, {"log_loss": True}, {"classes": [0, 2]}, {"weights": True}])
@pytest.mark.parametrize("kind", ["dice", "jaccard", "tversky"])
def test_smp_parity(kind, mode, opts):
    if mode == "binary" and ("classes" in opts or "weights" in opts):
        pytest.skip("smp has no classes / class_weights in binary mode")
    k = {"binary": 1, "multiclass": 4, "multilabel": 3}[mode]
    x, t = _data(k=k, seed=3)
    if mode == "multilabel":
        g = torch.Generator().manual_seed(4)
        t = torch.randint(0, 2, x.shape, generator=g)
        t[:, :, 0, 0], t[:, :, 0, 1] = 0, 1
        t[0, 1, 2:4] = 255
    smp_kw = {kk: v for kk, v in opts.items() if kk != "weights"}
    our_kw = dict(smp_kw)
    if "weights" in opts:
        smp_kw["class_weights"] = our_kw["weight"] = [0.5, 2.0, 1.0, 3.0][:k]
    if kind == "dice" and "smooth" in opts:
        our_kw["smooth"] = 2 * opts["smooth"]  # smp computes Dice as Tversky(0.5, 0.5): its smooth is halved
    if "smooth" in opts:
        our_kw["mask_absent"] = True  # smp masks absent classes whatever the smoothing
    if kind == "tversky":
        smp_kw.update(alpha=0.3, beta=0.7)
    ref_cls = {"dice": smp.losses.DiceLoss, "jaccard": smp.losses.JaccardLoss, "tversky": smp.losses.TverskyLoss}
    ours_fn = {"dice": dice_loss, "jaccard": jaccard_loss, "tversky": tversky_loss}[kind]
    ref = ref_cls[kind](mode, ignore_index=255, **smp_kw)
    a, b, ga, gb = _grads(lambda z: ours_fn(z, t, mode, **our_kw), lambda z: ref(z, t), x)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-10)


def test_smp_parity_focal_tversky_binary():
    x, t = _data(k=1, seed=5)
    ref = smp.losses.TverskyLoss("binary", alpha=0.3, beta=0.7, gamma=0.75, ignore_index=255)
    a, b, ga, gb = _grads(lambda z: focal_tversky_loss(z, t, "binary", gamma=0.75), lambda z: ref(z, t), x)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-10)


def test_absent_class_convention_vs_smp():
    """smp keeps absent classes (loss 0) in its class mean; we average over present classes only."""
    x, t = _data(k=4, seed=6, ignore=False)
    t[t == 3] = 0  # class 3 absent
    ours = dice_loss(x, t)
    ref = smp.losses.DiceLoss("multiclass")(x, t)
    torch.testing.assert_close(ours * 3 / 4, ref, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------- MONAI parity
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("opts", [{}, {"squared": True}, {"jaccard": True}, {"include_background": False}])
def test_monai_dice_parity(per_image, opts):
    x, t = _data(k=4, seed=7)
    m_kw = {kk: v for kk, v in opts.items() if kk != "squared"}
    if opts.get("squared"):
        m_kw["squared_pred"] = True
    ref = monai.losses.DiceLoss(softmax=True, to_onehot_y=True, batch=not per_image, ignore_index=255, **m_kw)
    fn = jaccard_loss if opts.get("jaccard") else dice_loss
    our_kw = {kk: v for kk, v in opts.items() if kk != "jaccard"}
    smooth = 0.5e-5 if opts.get("jaccard") else 1e-5  # MONAI's Jaccard is (2 TP + s) / (2 U + s)
    a, b, ga, gb = _grads(
        lambda z: fn(z, t, per_image=per_image, smooth=smooth, mask_absent=False, **our_kw),
        lambda z: ref(z, t[:, None]),
        x,
    )
    # MONAI's squared_pred path takes a float32 norm of its float32 one-hot target, hence the looser tolerance
    tol = dict(atol=1e-6, rtol=1e-6) if opts.get("squared") else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(ga, gb, **tol)


def test_monai_dice_weighted_and_multilabel():
    x, t = _data(k=3, seed=8, ignore=False)
    w = [0.2, 1.0, 3.0]
    ref = monai.losses.DiceLoss(softmax=True, to_onehot_y=True, weight=w, reduction="none")(x, t[:, None])
    ours = dice_loss(x, t, per_image=True, smooth=1e-5, mask_absent=False, reduction="none")
    w32 = torch.tensor(w, dtype=torch.float32).double()  # MONAI keeps the weights in float32
    torch.testing.assert_close(ours * w32, ref[:, :, 0, 0], atol=1e-12, rtol=1e-10)
    tl = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(9))
    ref = monai.losses.DiceLoss(sigmoid=True)(x, tl.double())
    torch.testing.assert_close(dice_loss(x, tl, "multilabel", per_image=True, smooth=1e-5, mask_absent=False), ref)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
def test_monai_generalized_dice_parity(per_image, w_type):
    x, t = _data(k=4, seed=10, ignore=False)
    t[1][t[1] == 2] = 0  # class 2 absent from image 1: exercises the infinite-weight replacement
    ref = monai.losses.GeneralizedDiceLoss(softmax=True, to_onehot_y=True, w_type=w_type, batch=not per_image)
    a, b, ga, gb = _grads(
        lambda z: generalized_dice_loss(z, t, weight_type=w_type, per_image=per_image),
        lambda z: ref(z, t[:, None]),
        x,
    )
    # MONAI computes the class weights in float32 (w_func(ground_o.float())), hence rtol 1e-6
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(ga, gb, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("per_image", [False, True])
def test_monai_tversky_parity(per_image):
    x, t = _data(k=4, seed=11)
    ref = monai.losses.TverskyLoss(
        softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7, batch=not per_image, ignore_index=255
    )
    a, b, ga, gb = _grads(
        lambda z: tversky_loss(z, t, per_image=per_image, smooth=1e-5, mask_absent=False),
        lambda z: ref(z, t[:, None]),
        x,
    )
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------ ignore, absent class, gradcheck
@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("mode", ["binary", "multiclass", "multilabel"])
def test_ignored_pixels_zero_gradient_and_no_effect(fn, mode):
    k = {"binary": 1, "multiclass": 3, "multilabel": 2}[mode]
    x, t = _data(k=k, seed=12)
    if mode == "multilabel":
        t = torch.stack([t % 2, (t + 1) % 2], 1).masked_fill((t == 255)[:, None], 255)
        t[1, 0, 4, :3] = 255  # per-element ignore in one channel only
    x.requires_grad_()
    loss = fn(x, t, mode, per_image=True)
    loss.backward()
    ign = (t == 255) if mode == "multilabel" else (t == 255)[:, None].expand_as(x)
    assert torch.isfinite(loss) and torch.all(x.grad[ign] == 0)
    x2 = x.detach().clone()
    x2[ign] = 30.0 * torch.randn(int(ign.sum()), dtype=x.dtype)
    torch.testing.assert_close(fn(x2, t, mode, per_image=True), loss.detach(), atol=1e-14, rtol=0)


@pytest.mark.parametrize("fn", ALL)
def test_regression_absent_class_no_nan(fn):
    """Seed defect: Dice NaN / unstable for a class absent from target and prediction; one_hot crash on 255."""
    t = torch.zeros(2, 4, 4, dtype=torch.long)
    t[:, :2] = 1
    t[0, 3, 3] = 255
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    x[:, 2] = -80.0  # class 2: absent from target and (numerically) from prediction
    x.requires_grad_()
    cases = [{}, {"smooth": 1.0}, {"per_image": True}, {"smooth": 0.0}]
    if fn is not generalized_dice_loss:
        cases.append({"smooth": 0.0, "mask_absent": False})
    for kw in cases:
        loss = fn(x, t, **kw)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    if fn is dice_loss:  # masked (smooth 0): mean over the two present classes only
        both = dice_loss(x, t, classes=[0, 1])
        torch.testing.assert_close(dice_loss(x, t), both)
        assert dice_loss(x, t, reduction="none")[2].item() == 0.0


def test_empty_or_all_ignored_target():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.full((2, 4, 4), 255)
    for fn in ALL:
        loss = fn(x, t)
        (g,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and torch.all(g == 0)


@pytest.mark.parametrize("fn", ALL)
def test_gradcheck(fn):
    x, t = _data(k=3, seed=13, size=(2, 3, 3))
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: fn(z, t, per_image=True, smooth=0.1), (x,))
    assert torch.autograd.gradcheck(lambda z: fn(z, t), (x,))


def test_squared_gradcheck_and_weights():
    x, t = _data(k=3, seed=14, size=(1, 3, 4))
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: dice_loss(z, t, squared=True, weight=[1.0, 2.0, 0.5]), (x,))


# ---------------------------------------------------------------------------------------------------------- modules
def test_modules_match_functional_and_aux():
    x, t = _data(k=3, seed=15, dtype=torch.float32)
    aux = torch.randn(2, 3, 3, 4)
    pairs = [
        (DiceLoss(squared=True, weight=[1.0, 2.0, 3.0]), lambda z: dice_loss(z, t, squared=True, weight=[1, 2, 3])),
        (JaccardLoss(per_image=True), lambda z: jaccard_loss(z, t, per_image=True)),
        (TverskyLoss(alpha=0.6, beta=0.4), lambda z: tversky_loss(z, t, alpha=0.6, beta=0.4)),
        (FocalTverskyLoss(gamma=2.0), lambda z: focal_tversky_loss(z, t, gamma=2.0)),
        (GeneralizedDiceLoss(weight_type="simple"), lambda z: generalized_dice_loss(z, t, weight_type="simple")),
    ]
    for module, fn in pairs:
        torch.testing.assert_close(module(x, t), fn(x))
        torch.testing.assert_close(module({"out": x, "aux": [aux]}, t), fn(x) + 0.4 * fn(aux))
    assert "weight" in dict(pairs[0][0].named_buffers())
    assert DiceLoss(per_image=True, reduction="none")(x, t).shape == (2, 3)
    with pytest.raises(ValueError):
        DiceLoss(reduction="none")({"out": x, "aux": [aux]}, t)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DiceLoss(mode="softmax"),
        lambda: DiceLoss(smooth=-1.0),
        lambda: DiceLoss(eps=0.0),
        lambda: DiceLoss("binary", classes=[0]),
        lambda: DiceLoss(classes=[]),
        lambda: DiceLoss(weight=[-1.0, 1.0]),
        lambda: DiceLoss(reduction="avg"),
        lambda: DiceLoss(aux_weight=-0.1),
        lambda: TverskyLoss(alpha=-0.1),
        lambda: FocalTverskyLoss(gamma=0.0),
        lambda: GeneralizedDiceLoss(weight_type="cubic"),
    ],
)
def test_invalid_options_raise_in_init(make):
    with pytest.raises(ValueError):
        make()


def test_invalid_inputs_raise():
    x, t = _data(k=3, seed=16)
    with pytest.raises(ValueError):
        dice_loss(x, torch.full_like(t, 5))  # label outside 0..K-1, not ignore_index
    with pytest.raises(ValueError):
        dice_loss(x, t, "binary")  # binary needs one channel
    with pytest.raises(ValueError):
        dice_loss(x[:, :1], t, "binary")  # label 2 in a binary target
    with pytest.raises(ValueError):
        dice_loss(x, t, weight=[1.0, 2.0])  # wrong number of weights
    with pytest.raises(ValueError):
        dice_loss(x, t, classes=[3])
