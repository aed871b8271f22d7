"""Lovász-Softmax / Lovász hinge: hand values, the 1 - IoU identity, Berman reference and smp parity, seed defects."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from maskworks.losses.lovasz import LovaszHingeLoss, LovaszSoftmaxLoss, lovasz_grad, lovasz_hinge, lovasz_softmax


# ------------------------------------------------------------------ Berman's reference, transcribed (1-D per class)
def _ref_grad(gt_sorted):
    p = len(gt_sorted)
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if p > 1:
        jaccard[1:p] = jaccard[1:p] - jaccard[0:-1]
    return jaccard


def _ref_softmax_flat(probas, labels, classes="present"):
    if probas.numel() == 0:
        return probas.sum() * 0.0
    losses = []
    for c in list(range(probas.size(1))) if classes in ("all", "present") else classes:
        fg = (labels == c).to(probas.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, _ref_grad(fg[perm])))
    return sum(losses) / len(losses) if losses else probas.sum() * 0.0


def _ref_flatten(probas, labels, ignore):
    k = probas.size(1)
    probas = probas.movedim(1, -1).reshape(-1, k)
    labels = labels.reshape(-1)
    valid = labels != ignore
    return probas[valid], labels[valid]


def ref_lovasz_softmax(probas, labels, classes="present", per_image=False, ignore=255):
    if per_image:
        vals = [_ref_softmax_flat(*_ref_flatten(p[None], lab[None], ignore), classes) for p, lab in zip(probas, labels)]
        return sum(vals) / len(vals)
    return _ref_softmax_flat(*_ref_flatten(probas, labels, ignore), classes)


def ref_lovasz_hinge(logits, labels, per_image=True, ignore=255):
    def flat(lg, lb):
        lg, lb = lg.reshape(-1), lb.reshape(-1)
        v = lb != ignore
        lg, lb = lg[v], lb[v].to(lg.dtype)
        errors = 1.0 - lg * (2.0 * lb - 1.0)
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        return torch.dot(F.relu(errors_sorted), _ref_grad(lb[perm]))

    if per_image:
        vals = [flat(lg, lb) for lg, lb in zip(logits, labels)]
        return sum(vals) / len(vals)
    return flat(logits, labels)


def _seed_lovasz_softmax(probas, labels):
    """The seed's version: sorts a (B, H, W) error map along its last axis only (defect 3.4.1)."""
    losses = []
    for c in range(probas.shape[1]):
        fg = (labels == c).to(probas.dtype)
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        fg_sorted = fg.flatten()[perm]
        losses.append((errors_sorted * _ref_grad(fg_sorted)).sum())
    return sum(losses) / len(losses)


def _hard_logits(pred, k, scale=60.0):
    return scale * F.one_hot(pred, k).movedim(-1, 1).double()


# ------------------------------------------------------------------------------------------------------- hand values
def test_lovasz_grad_hand():
    g = lovasz_grad(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([0.5, 1 / 6, 1 / 3, 0.0], dtype=torch.float64))


def test_lovasz_softmax_hand_two_by_two():
    target = torch.tensor([[[0, 1], [1, 1]]])
    pred = torch.tensor([[[0, 0], [1, 1]]])
    # class 0: I=1, U=2 -> 1/2 ; class 1: I=2, U=3 -> 1/3 ; mean 5/12
    loss = lovasz_softmax(_hard_logits(pred, 2), target)
    assert loss.item() == pytest.approx(5 / 12, abs=1e-12)


def test_lovasz_hinge_hand():
    logits = torch.tensor([[[[2.0, -1.0, 0.5]]]], dtype=torch.float64)
    target = torch.tensor([[[1, 0, 0]]])
    # errors 1 - x*s = [-1, 0, 1.5]; sorted gt [0, 0, 1] -> grad [1/2, 1/6, 1/3]; loss = 1.5 * 1/2
    assert lovasz_hinge(logits, target).item() == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("per_image", [False, True])
def test_hard_prediction_equals_one_minus_iou(per_image):
    g = torch.Generator().manual_seed(0)
    b, k = 3, 4
    target = torch.randint(0, k, (b, 5, 6), generator=g)
    target[:, :, 0] = 3  # class 3 present everywhere; class ids in pred may be absent from the target
    pred = torch.randint(0, k, (b, 5, 6), generator=g)
    target[0, 0, 1:3] = 255
    valid = target != 255

    def miou_loss(t, p, v):
        losses = []
        for c in range(k):
            gt_c, pr_c = (t == c) & v, (p == c) & v
            if gt_c.sum() == 0:
                continue
            inter, union = (gt_c & pr_c).sum().item(), (gt_c | pr_c).sum().item()
            losses.append(1.0 - inter / union)
        return sum(losses) / len(losses)

    expected = (
        sum(miou_loss(target[i], pred[i], valid[i]) for i in range(b)) / b
        if per_image
        else miou_loss(target, pred, valid)
    )
    loss = lovasz_softmax(_hard_logits(pred, k), target, per_image=per_image)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_perfect_prediction_is_zero():
    target = torch.randint(0, 3, (2, 6, 6))
    assert lovasz_softmax(_hard_logits(target, 3), target).item() == pytest.approx(0.0, abs=1e-12)
    tb = torch.randint(0, 2, (2, 6, 6))
    logits = (20.0 * (2 * tb - 1)).double()[:, None]
    assert lovasz_hinge(logits, tb).item() == 0.0


# ----------------------------------------------------------------------------------------- reference and smp parity
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [1, 3]])
def test_softmax_matches_berman_reference(per_image, classes):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64)
    t = torch.randint(0, 3, (3, 5, 7), generator=g)  # class 3 absent: exercises 'present' vs 'all'
    t[1, 2:4] = 255
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = lovasz_softmax(x1, t, classes=classes, per_image=per_image)
    ref = ref_lovasz_softmax(x2.softmax(1), t, classes=classes, per_image=per_image)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_image", [False, True])
def test_hinge_matches_berman_reference(per_image):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 6, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 2, (3, 6, 5), generator=g)
    t[2, 0] = 255
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = lovasz_hinge(x1, t, per_image=per_image)
    ref = ref_lovasz_hinge(x2[:, 0], t, per_image=per_image)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("mode", ["multiclass", "binary"])
def test_smp_parity(mode, per_image):
    g = torch.Generator().manual_seed(3)
    k = 5 if mode == "multiclass" else 1
    x = torch.randn(2, k, 8, 9, generator=g)
    t = torch.randint(0, max(k, 2), (2, 8, 9), generator=g)
    t[0, :2] = 255
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    if mode == "multiclass":
        ours = lovasz_softmax(x1, t, per_image=per_image)
    else:
        ours = lovasz_hinge(x1, t, per_image=per_image)
    ref = smp.losses.LovaszLoss(mode, per_image=per_image, ignore_index=255)(x2, t)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- seed regressions
def test_regression_sort_is_along_pixel_axis_not_last_axis():
    """Batch-level Lovász depends only on the multiset of pixels: tiling images side by side must not change it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 4, 5), generator=g)
    side_by_side_x = torch.cat([x[0], x[1]], dim=-1)[None]  # (1, 3, 4, 10)
    side_by_side_t = torch.cat([t[0], t[1]], dim=-1)[None]
    a = lovasz_softmax(x, t)
    torch.testing.assert_close(a, lovasz_softmax(side_by_side_x, side_by_side_t), atol=1e-12, rtol=0)
    torch.testing.assert_close(a, ref_lovasz_softmax(x.softmax(1), t, classes="all"), atol=1e-12, rtol=0)
    # the seed's last-axis sort gives something else on the same batch
    seed = _seed_lovasz_softmax(x.softmax(1), t)
    assert abs(seed.item() - lovasz_softmax(x, t, classes="all").item()) > 1e-3


# ------------------------------------------------------------------------------------------------- ignore, gradcheck
@pytest.mark.parametrize("fn", ["softmax", "hinge"])
@pytest.mark.parametrize("per_image", [False, True])
def test_ignored_pixels_have_zero_gradient_and_no_effect(fn, per_image):
    g = torch.Generator().manual_seed(5)
    k = 3 if fn == "softmax" else 1
    x = torch.randn(2, k, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, max(k, 2), (2, 5, 5), generator=g)
    t[0, 1:3, 1:4] = 255
    t[1, 4] = 255
    loss_fn = lovasz_softmax if fn == "softmax" else lovasz_hinge
    loss = loss_fn(x, t, per_image=per_image)
    loss.backward()
    ign = (t == 255)[:, None].expand_as(x)
    assert torch.all(x.grad[ign] == 0)
    x2 = x.detach().clone()
    x2[ign] = 1e3 * torch.randn(int(ign.sum()), dtype=torch.float64, generator=g)
    torch.testing.assert_close(loss_fn(x2, t, per_image=per_image), loss.detach(), atol=1e-12, rtol=0)


def test_all_ignored_is_zero_with_zero_grad():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.full((2, 4, 4), 255)
    loss = lovasz_softmax(x, t) + lovasz_softmax(x, t, per_image=True) + lovasz_hinge(x[:, :1], t)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_gradcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (2, 3, 4), generator=g)
    t[0, 0, 0] = 255
    assert torch.autograd.gradcheck(lambda z: lovasz_softmax(z, t, per_image=True), (x,))
    assert torch.autograd.gradcheck(lambda z: lovasz_softmax(z, t, classes="all"), (x,))
    xb = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tb = torch.randint(0, 2, (2, 3, 4), generator=g)
    assert torch.autograd.gradcheck(lambda z: lovasz_hinge(z, tb, per_image=False), (xb,))


# --------------------------------------------------------------------------------------------------------- modules
def test_modules_options_and_aux_outputs():
    x = torch.randn(2, 3, 8, 8)
    t = torch.randint(0, 3, (2, 8, 8))
    m = LovaszSoftmaxLoss(per_image=True)
    aux = torch.randn(2, 3, 4, 4)
    expected = lovasz_softmax(x, t, per_image=True) + 0.4 * lovasz_softmax(aux, t, per_image=True)
    torch.testing.assert_close(m({"out": x, "aux": [aux]}, t), expected)
    assert LovaszSoftmaxLoss(per_image=True, reduction="none")(x, t).shape == (2,)
    assert LovaszHingeLoss()(x[:, :1], (t > 0).long()).dim() == 0
    with pytest.raises(ValueError):
        LovaszSoftmaxLoss(classes="some")
    with pytest.raises(ValueError):
        LovaszSoftmaxLoss(classes=[])
    with pytest.raises(ValueError):
        LovaszHingeLoss(reduction="avg")
    with pytest.raises(ValueError):
        lovasz_softmax(x, t, classes=[5])
    with pytest.raises(ValueError):
        lovasz_hinge(x[:, :1], t)  # label 2 is not binary
