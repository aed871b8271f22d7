"""Losses on hostile batches: every loss gives a finite 0 with zero gradients on an all-ignored batch, and a
target label outside ``0..K-1`` raises a one-line ValueError naming it (not torch's IndexError / device assert).

Normal batches keep their values: cross-entropy is compared with ``F.cross_entropy`` (plain, class-weighted,
label-smoothed, both) to float32 rounding (``rtol=1e-6``) in value and gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskworks.losses import LOSS_NAMES, CrossEntropyLoss, build_loss, cross_entropy
from maskworks.losses._utils import check_labels

K = 3
CE_OPTIONS = {
    "plain": {},
    "weighted": {"class_weights": [0.5, 2.0, 1.0]},
    "smoothed": {"options": {"ce": {"label_smoothing": 0.1}}},
    "weighted+smoothed": {"class_weights": [0.5, 2.0, 1.0], "options": {"ce": {"label_smoothing": 0.2}}},
}


def _setup(name: str) -> tuple[str, int]:
    """(mode, number of logit channels) for a loss name: lovasz_hinge is binary-only."""
    return ("binary", 1) if name == "lovasz_hinge" else ("multiclass", K)


def _logits(channels: int, shape=(2, 8, 8), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], channels, *shape[1:], generator=g, dtype=torch.float32).requires_grad_(True)


def _assert_zero_loss_and_grad(loss: torch.Tensor, x: torch.Tensor, what: str) -> None:
    assert loss.dim() == 0, what
    value = float(loss.detach())
    assert value == 0.0, f"{what}: loss {value}"
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), f"{what}: non-finite gradient"
    assert float(x.grad.abs().max()) == 0.0, f"{what}: non-zero gradient"


# ---------------------------------------------------------------------------------------------- all-ignored batch


@pytest.mark.parametrize("name", sorted(LOSS_NAMES))
def test_every_loss_is_zero_with_zero_grad_on_an_all_ignored_batch(name):
    mode, channels = _setup(name)
    x = _logits(channels)
    target = torch.full((2, 8, 8), 255)
    _assert_zero_loss_and_grad(build_loss(name, mode=mode)(x, target), x, name)


@pytest.mark.parametrize("name", sorted(LOSS_NAMES))
def test_every_loss_with_ce_compound_is_zero_on_an_all_ignored_batch(name):
    if name == "lovasz_hinge":
        pytest.skip("binary-only loss; ce with one channel is binary CE, covered by the binary ce case")
    x = _logits(K)
    target = torch.full((2, 8, 8), 255)
    _assert_zero_loss_and_grad(build_loss(f"ce+0.5*{name}")(x, target), x, f"ce+{name}")


@pytest.mark.parametrize("variant", sorted(CE_OPTIONS))
def test_cross_entropy_variants_are_zero_on_an_all_ignored_batch(variant):
    x = _logits(K)
    target = torch.full((2, 8, 8), 255)
    _assert_zero_loss_and_grad(build_loss("ce", **CE_OPTIONS[variant])(x, target), x, variant)


def test_all_ignored_batch_with_deep_supervision_and_binary_ce():
    x, aux = _logits(K), _logits(K, shape=(2, 4, 4), seed=1)
    target = torch.full((2, 8, 8), 255)
    loss = build_loss("ce+dice")({"out": x, "aux": [aux]}, target)
    _assert_zero_loss_and_grad(loss, x, "deep supervision")
    assert float(aux.grad.abs().max()) == 0.0
    xb = _logits(1)
    _assert_zero_loss_and_grad(cross_entropy(xb, target), xb, "binary ce")


def test_a_batch_whose_only_pixels_have_zero_class_weight_gives_zero_not_nan():
    x = _logits(K)
    target = torch.full((2, 8, 8), 255)
    target[0, :2] = 1
    loss = CrossEntropyLoss(weight=[1.0, 0.0, 1.0])(x, target)
    _assert_zero_loss_and_grad(loss, x, "zero weight")


def test_one_all_ignored_image_in_a_batch_does_not_change_the_others():
    x = _logits(K)
    target = torch.randint(0, K, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    target[1] = 255
    ours = build_loss("ce")(x, target)
    torch.testing.assert_close(ours, F.cross_entropy(x[:1], target[:1]), rtol=1e-6, atol=1e-7)
    clean = build_loss("cldice")(x[:1], target[:1])
    torch.testing.assert_close(build_loss("cldice")(x, target), clean)  # the ignored image is left out of the mean


# ---------------------------------------------------------------------------------------------- normal batches


@pytest.mark.parametrize("variant", sorted(CE_OPTIONS))
@pytest.mark.parametrize("ignored", [False, True])
def test_cross_entropy_on_normal_batches_equals_torch(variant, ignored):
    opts = CE_OPTIONS[variant]
    weight = opts.get("class_weights")
    smoothing = opts.get("options", {}).get("ce", {}).get("label_smoothing", 0.0)
    x1 = _logits(K, seed=4)
    x2 = x1.detach().clone().requires_grad_(True)
    target = torch.randint(0, K, (2, 8, 8), generator=torch.Generator().manual_seed(5))
    if ignored:
        target[:, :3] = 255
    ours = build_loss("ce", **opts)(x1, target)
    ref = F.cross_entropy(
        x2,
        target,
        weight=None if weight is None else torch.tensor(weight),
        ignore_index=255,
        label_smoothing=smoothing,
    )
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-8)
    for reduction in ("sum", "none"):
        torch.testing.assert_close(
            cross_entropy(x1, target, None if weight is None else torch.tensor(weight), 255, smoothing, reduction),
            F.cross_entropy(
                x1,
                target,
                weight=None if weight is None else torch.tensor(weight),
                ignore_index=255,
                label_smoothing=smoothing,
                reduction=reduction,
            ),
        )


def test_cross_entropy_keeps_float64_and_half_inputs_working():
    target = torch.randint(0, K, (1, 4, 4), generator=torch.Generator().manual_seed(6))
    x64 = torch.randn(1, K, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(x64, target), F.cross_entropy(x64, target))
    assert cross_entropy(x64, target).dtype == torch.float64
    x16 = x64.to(torch.bfloat16)
    torch.testing.assert_close(cross_entropy(x16, target), F.cross_entropy(x16.float(), target))


# ---------------------------------------------------------------------------------------------- bad labels


@pytest.mark.parametrize("bad", [3, 7, 254, -1])
def test_cross_entropy_names_out_of_range_labels(bad):
    x = _logits(K)
    target = torch.randint(0, K, (2, 8, 8), generator=torch.Generator().manual_seed(7))
    target[0, 0, 0] = bad
    target[1, 0, 0] = 255  # ignored pixels are fine
    with pytest.raises(ValueError, match=rf"target holds labels \[{bad}\] outside 0\.\.2 for num_classes=3; "):
        CrossEntropyLoss()(x, target)
    with pytest.raises(ValueError) as info:
        cross_entropy(x, target)
    message = str(info.value)
    assert "\n" not in message and "ignore_index=255" in message


def test_binary_cross_entropy_rejects_labels_other_than_0_and_1():
    x = _logits(1)
    target = torch.ones(2, 8, 8, dtype=torch.long)
    target[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"labels \[2\] outside 0\.\.1"):
        cross_entropy(x, target)
    target[0, 0, 0] = 255
    assert torch.isfinite(cross_entropy(x, target))


@pytest.mark.parametrize("name", sorted(LOSS_NAMES))
def test_every_loss_raises_a_clear_value_error_on_an_out_of_range_label(name):
    mode, channels = _setup(name)
    x = _logits(channels)
    target = torch.randint(0, 2 if mode == "binary" else K, (2, 8, 8), generator=torch.Generator().manual_seed(8))
    target[0, 1, 1] = 9
    with pytest.raises(ValueError, match=r"9") as info:
        build_loss(name, mode=mode)(x, target)
    assert "\n" not in str(info.value)


def test_ignore_index_none_counts_every_label_and_says_so():
    target = torch.tensor([[0, 1, 255]])
    with pytest.raises(ValueError, match="no value is ignored"):
        check_labels(target, 2, None)
    assert check_labels(torch.tensor([[0, 1, 255]]), 2, 255) is True
    assert check_labels(torch.full((1, 2), 255), 2, 255) is False
    assert check_labels(torch.zeros(0, 2, dtype=torch.long), 2, 255) is False
