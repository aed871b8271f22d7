"""Segmentation distillation losses: maths against the papers' formulas, gradients, masking, adapters, smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.methods.distillation import (
    AttentionTransfer,
    ChannelWiseKD,
    DistillationLoss,  # noqa: F401  (the package still exports DeiT's names)
    FeatureKD,
    PairwiseKD,
    PixelKD,
    distillation_loss,
    soft_distillation_loss,
)


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def _pixel_kd_reference(s: torch.Tensor, t: torch.Tensor, T: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * sum_c p_t (log p_t - log p_s)`` per pixel, mean over the (valid) pixels, written out."""
    log_ps, log_pt = F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1)
    per_pixel = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * T * T  # (B, H, W)
    if valid is None:
        return per_pixel.mean()
    return per_pixel[valid].mean()


def _mmrazor_cwd(preds_S: torch.Tensor, preds_T: torch.Tensor, tau: float, loss_weight: float) -> torch.Tensor:
    """mmrazor ``ChannelWiseDivergence.forward`` (its published formula, re-typed; mmrazor is not installed)."""
    N, C, H, W = preds_S.shape
    softmax_pred_T = F.softmax(preds_T.reshape(-1, W * H) / tau, dim=1)
    logsoftmax = torch.nn.LogSoftmax(dim=1)
    loss = torch.sum(
        softmax_pred_T * logsoftmax(preds_T.reshape(-1, W * H) / tau)
        - softmax_pred_T * logsoftmax(preds_S.reshape(-1, W * H) / tau)
    ) * (tau**2)
    return loss_weight * loss / (C * N)


# ------------------------------------------------------------------------------------------------ zero at equality
def test_every_loss_is_exactly_zero_when_student_equals_teacher():
    logits = _randn(0, 2, 5, 8, 8)
    assert PixelKD()(logits, logits.clone()).item() == 0.0
    assert PixelKD()(logits, logits.clone(), torch.zeros(2, 8, 8, dtype=torch.long)).item() == 0.0
    assert ChannelWiseKD()(logits, logits.clone()).item() == 0.0
    feats = _randn(1, 2, 6, 8, 8)
    assert PairwiseKD(pool_size=4)(feats, feats.clone()).item() == 0.0
    assert PairwiseKD(pool_size=None)(feats, feats.clone()).item() == 0.0
    assert FeatureKD(6, 6)(feats, feats.clone()).item() == 0.0  # equal widths: identity-initialised adapter
    assert AttentionTransfer()(feats, feats.clone()).item() == 0.0


# ------------------------------------------------------------------------------------------------ gradients
def _teacher_gets_no_grad(loss_fn, student: torch.Tensor, teacher: torch.Tensor) -> None:
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    loss_fn(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "loss_fn, t_channels",
    [
        (PixelKD(), 5),
        (ChannelWiseKD(), 5),
        (PairwiseKD(pool_size=2), 7),
        (FeatureKD(5, 7), 7),
        (AttentionTransfer(), 7),
    ],
    ids=["pixel", "cwd", "pairwise", "feature", "attention"],
)
def test_gradient_reaches_the_student_only(loss_fn, t_channels):
    _teacher_gets_no_grad(loss_fn, _randn(2, 2, 5, 6, 6), _randn(3, 2, t_channels, 6, 6))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_pixel_kd_gradient_is_T_times_prob_difference_over_pixels(T):
    # L = T^2 / N sum_i sum_c p_t log(p_t / p_s), p = softmax(z / T):  dL/ds_ic = T^2 / N * (p_s - p_t)_ic / T
    s = _randn(4, 2, 4, 3, 5, dtype=torch.float64).requires_grad_(True)
    t = _randn(5, 2, 4, 3, 5, dtype=torch.float64)
    PixelKD(temperature=T)(s, t).backward()
    n_pixels = 2 * 3 * 5
    expected = (F.softmax(s.detach() / T, dim=1) - F.softmax(t / T, dim=1)) * T / n_pixels
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=0)

    # with ignored pixels: they get no gradient and N counts the valid pixels only
    target = torch.zeros(2, 3, 5, dtype=torch.long)
    target[0, :, :2] = 255
    target[1, 2, :] = 255
    valid = target != 255
    s.grad = None
    PixelKD(temperature=T)(s, t, target).backward()
    expected = (F.softmax(s.detach() / T, dim=1) - F.softmax(t / T, dim=1)) * T / valid.sum() * valid[:, None]
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ PixelKD values
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_pixel_kd_equals_per_pixel_formula_and_is_hw_times_smaller_than_batchmean(T):
    s, t = _randn(6, 2, 5, 8, 8, dtype=torch.float64), _randn(7, 2, 5, 8, 8, dtype=torch.float64)
    loss = PixelKD(temperature=T)(s, t)
    torch.testing.assert_close(loss, _pixel_kd_reference(s, t, T), atol=1e-10, rtol=0)
    batchmean = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T * T
    torch.testing.assert_close(batchmean, loss * 64, atol=1e-9, rtol=0)
    # one pixel is DeiT's soft term on a (1, C) row, times C (DeiT divides by B * C)
    torch.testing.assert_close(
        PixelKD(temperature=T)(s[:1, :, :1, :1], t[:1, :, :1, :1]),
        soft_distillation_loss(s[:1, :, 0, 0], t[:1, :, 0, 0], T) * 5,
        atol=1e-12,
        rtol=0,
    )
    assert PixelKD(temperature=T, loss_weight=0.5)(s, t).item() == pytest.approx(0.5 * loss.item(), rel=1e-12)


def test_pixel_kd_is_per_pixel_normalised():
    s_vec, t_vec = _randn(8, 1, 6, 1, 1), _randn(9, 1, 6, 1, 1)
    small = PixelKD()(s_vec.expand(2, 6, 16, 16), t_vec.expand(2, 6, 16, 16))
    large = PixelKD()(s_vec.expand(2, 6, 32, 32), t_vec.expand(2, 6, 32, 32))
    torch.testing.assert_close(small, large, atol=1e-6, rtol=1e-5)
    # and it is the single-pixel KD value, written out
    log_ps, log_pt = F.log_softmax(s_vec[0, :, 0, 0] / 4, 0), F.log_softmax(t_vec[0, :, 0, 0] / 4, 0)
    single = 16 * (log_pt.exp() * (log_pt - log_ps)).sum()
    torch.testing.assert_close(small, single, atol=1e-6, rtol=1e-5)


def test_pixel_kd_ignore_index_pixels_do_not_contribute():
    s, t = _randn(10, 2, 4, 8, 8), _randn(11, 2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    target[:, :3] = 255
    ignored = target == 255
    kd = PixelKD(temperature=2.0)
    loss = kd(s, t, target)
    s2, t2 = s.clone(), t.clone()
    s2[ignored[:, None].expand_as(s)] = 50.0
    t2[ignored[:, None].expand_as(t)] = -30.0
    assert kd(s2, t2, target).item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(loss, _pixel_kd_reference(s, t, 2.0, ~ignored), atol=1e-6, rtol=0)
    assert kd(s, t, target).item() != pytest.approx(kd(s, t).item(), rel=1e-3)  # the mask does something
    assert PixelKD(ignore_index=None)(s, t, target).item() == pytest.approx(PixelKD()(s, t).item(), rel=1e-6)

    # a full-resolution target is reduced to the logits' grid (nearest)
    target_2x = target.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert kd(s, t, target_2x).item() == pytest.approx(loss.item(), rel=1e-6)

    # nothing valid: 0, and backward still works
    s_req = s.clone().requires_grad_(True)
    zero = kd(s_req, t, torch.full((2, 8, 8), 255))
    zero.backward()
    assert zero.item() == 0.0 and s_req.grad.abs().sum() == 0


def test_pixel_kd_resizes_the_teacher_to_the_student():
    s, t = _randn(12, 2, 3, 8, 8), _randn(13, 2, 3, 16, 16)
    resized = F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(PixelKD()(s, t), PixelKD()(s, resized))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*\(2, 4, 8, 8\)"):
        PixelKD()(s, _randn(0, 2, 4, 8, 8))
    with pytest.raises(ValueError, match="target"):
        PixelKD()(s, t, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        PixelKD(temperature=0)


# ------------------------------------------------------------------------------------------------ ChannelWiseKD
def _cwd_by_loops(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            zs, zt = s[i, j].reshape(-1) / tau, t[i, j].reshape(-1) / tau
            ps = np.exp(zs - zs.max()) / np.exp(zs - zs.max()).sum()
            pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
            for k in range(h * w):
                total += pt[k] * (math.log(pt[k]) - math.log(ps[k]))
    return tau * tau * total / (n * c)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_definition_and_mmrazor(tau):
    s = np.array(
        [
            [[[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], [[2.0, 2.0, 2.0], [0.0, 0.0, 1.0]]],
            [[[-2.0, 0.0, 4.0], [1.0, 1.0, 1.0]], [[5.0, -3.0, 0.0], [0.0, 2.0, -1.0]]],
        ]
    )  # (N=2, C=2, H=2, W=3)
    t = np.array(
        [
            [[[1.0, 1.0, 0.0], [2.0, 0.0, -1.0]], [[0.0, 3.0, 1.0], [1.0, -2.0, 0.0]]],
            [[[0.0, 0.0, 0.0], [0.0, 0.0, 6.0]], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]],
        ]
    )
    st, tt = torch.from_numpy(s), torch.from_numpy(t)
    loss = ChannelWiseKD(temperature=tau)(st, tt)
    assert loss.item() == pytest.approx(_cwd_by_loops(s, t, tau), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(loss, _mmrazor_cwd(st, tt, tau, 1.0), atol=1e-10, rtol=0)

    s_big, t_big = _randn(14, 2, 7, 9, 11), _randn(15, 2, 7, 9, 11)
    torch.testing.assert_close(
        ChannelWiseKD(tau, loss_weight=3.0)(s_big, t_big), _mmrazor_cwd(s_big, t_big, tau, 3.0), atol=1e-5, rtol=1e-5
    )


def test_cwd_resizes_teacher_and_rejects_channel_mismatch():
    s, t = _randn(16, 2, 4, 8, 8), _randn(17, 2, 4, 16, 16)
    resized = F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ChannelWiseKD()(s, t), ChannelWiseKD()(s, resized))
    with pytest.raises(ValueError, match=r"student \(2, 4, 8, 8\) vs teacher \(2, 6, 8, 8\).*adapter"):
        ChannelWiseKD()(s, _randn(0, 2, 6, 8, 8))


# ------------------------------------------------------------------------------------------------ PairwiseKD
def _hand_example() -> tuple[torch.Tensor, torch.Tensor, float]:
    """2x2 grid. Student nodes (C=2): (1,0), (0,2), (3,3), (-1,0); teacher nodes (C=3) all along (1,0,0).

    Student cosines: [[1, 0, r, -1], [0, 1, r, 0], [r, r, 1, -r], [-1, 0, -r, 1]] with r = 1/sqrt(2); the
    teacher's are all 1. Squared differences sum to 12 + 4 (1 - r)^2 + 2 (1 + r)^2 = 21 - 2 sqrt(2); mean over 16.
    """
    student = torch.tensor([[[1.0, 0.0], [3.0, -1.0]], [[0.0, 2.0], [3.0, 0.0]]], dtype=torch.float64)[None]
    teacher = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    teacher[0, 0] = torch.tensor([[2.0, 1.0], [5.0, 3.0]])
    return student, teacher, (21 - 2 * math.sqrt(2)) / 16


def test_pairwise_hand_computed_value_with_different_channel_counts():
    student, teacher, expected = _hand_example()
    assert PairwiseKD(pool_size=None)(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    assert PairwiseKD(pool_size=2)(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    # 2x2-constant blocks on a 4x4 student and an 8x8 teacher pool to the same nodes
    s4 = student.repeat_interleave(2, 2).repeat_interleave(2, 3)
    t8 = teacher.repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert PairwiseKD(pool_size=2)(s4, t8).item() == pytest.approx(expected, rel=1e-12)
    assert PairwiseKD(pool_size=(2, 2), loss_weight=2.0)(s4, t8).item() == pytest.approx(2 * expected, rel=1e-12)
    # batch: the mean runs over B * N^2
    both = PairwiseKD(pool_size=2)(torch.cat([student, teacher[:, :2]]), torch.cat([teacher, teacher]))
    assert both.item() == pytest.approx(expected / 2, rel=1e-12)


def test_pairwise_affinity_shape_and_validation():
    kd = PairwiseKD(pool_size=(3, 4))
    assert kd.affinity(_randn(0, 2, 5, 12, 16)).shape == (2, 12, 12)
    assert kd(_randn(1, 2, 5, 12, 16), _randn(2, 2, 9, 24, 32)).ndim == 0
    with pytest.raises(ValueError, match="pool_size"):
        PairwiseKD(pool_size=0)
    with pytest.raises(ValueError, match="batch"):
        kd(_randn(1, 2, 5, 12, 16), _randn(2, 3, 9, 24, 32))


# ------------------------------------------------------------------------------------------------ FeatureKD
def test_feature_kd_adapters_are_trained():
    kd = FeatureKD([4, 8], [16, 8])
    student = nn.Conv2d(3, 4, 1)
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.5)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in kd.adapters.parameters()} <= optimized
    assert len(list(kd.parameters())) == 4  # two 1x1 convs with bias
    before = [p.detach().clone() for p in kd.parameters()]

    x = _randn(20, 2, 3, 8, 8)
    feats_t = [_randn(21, 2, 16, 16, 16), _randn(22, 2, 8, 4, 4)]
    loss = kd([student(x), _randn(23, 2, 8, 4, 4)], feats_t)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, kd.parameters()))


def test_feature_kd_value_determinism_and_mismatches():
    kd = FeatureKD([4, 6], [16, 6], loss_weight=2.0)
    s = [_randn(30, 2, 4, 8, 8), _randn(31, 2, 6, 5, 5)]  # channel mismatch, size mismatch (8 -> 16)
    t = [_randn(32, 2, 16, 16, 16), _randn(33, 2, 6, 5, 5)]
    first, second = kd(s, t), kd(s, t)
    assert torch.equal(first, second)
    adapted = F.interpolate(kd.adapters[0](s[0]), size=(16, 16), mode="bilinear", align_corners=False)
    expected = 2.0 * (F.mse_loss(adapted, t[0]) + F.mse_loss(s[1], t[1])) / 2  # adapter 1 is the identity
    torch.testing.assert_close(first, expected)

    single = FeatureKD(3, 5)
    assert single(_randn(0, 1, 3, 4, 4), _randn(1, 1, 5, 4, 4)).ndim == 0
    with pytest.raises(ValueError, match="adapter"):
        kd(s[:1], t[:1])
    with pytest.raises(ValueError, match=r"4 -> 16 channels.*\(2, 5, 8, 8\)"):
        kd([_randn(0, 2, 5, 8, 8), s[1]], t)
    with pytest.raises(ValueError, match="same length"):
        FeatureKD([4, 6], [16])
    with pytest.raises(TypeError, match="student"):
        kd("features", t)


# ------------------------------------------------------------------------------------------------ AttentionTransfer
def test_attention_transfer_value_and_mismatches():
    s = [_randn(40, 2, 4, 8, 8), _randn(41, 2, 3, 4, 4)]
    t = [_randn(42, 2, 9, 16, 16), _randn(43, 2, 5, 4, 4)]

    def at(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        a = x.pow(2).mean(1, keepdim=True)
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False) if a.shape[-2:] != size else a
        a = a.flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    expected = 1000 / 2 * sum((at(a, b.shape[-2:]) - at(b, b.shape[-2:])).pow(2).mean() for a, b in zip(s, t))
    torch.testing.assert_close(AttentionTransfer()(s, t), expected)
    with pytest.raises(ValueError, match="feature maps"):
        AttentionTransfer()(s, t[:1])


# ------------------------------------------------------------------------------------------------ factory
def test_distillation_loss_factory():
    assert isinstance(distillation_loss("pixel", temperature=2.0), PixelKD)
    assert isinstance(distillation_loss("cwd"), ChannelWiseKD)
    assert isinstance(distillation_loss("pairwise", pool_size=4), PairwiseKD)
    assert isinstance(distillation_loss("feature", student_channels=4, teacher_channels=8), FeatureKD)
    assert isinstance(distillation_loss("attention"), AttentionTransfer)
    assert distillation_loss("pixel", temperature=2.0).temperature == 2.0
    with pytest.raises(ValueError, match="pixel, cwd, pairwise, feature") as info:
        distillation_loss("kl")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ end to end
def test_student_learns_from_a_frozen_teacher_with_pixel_kd():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16, generator=g)
    labels = images.argmax(dim=1)  # the brightest channel's index: a per-pixel 3-class problem

    teacher = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 3, 1))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(teacher(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.zero_grad(set_to_none=True)
    teacher.requires_grad_(False).eval()  # frozen: no gradients, BatchNorm statistics fixed
    assert (teacher(images).argmax(1) == labels).float().mean() > 0.9
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}  # weights and BatchNorm buffers

    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    kd = PixelKD(temperature=2.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-2)
    losses = []
    for _ in range(100):
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = kd(student(images), teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
