"""DeiT distillation loss: maths against DeiT's losses.py, frozen teacher, soft targets, smoke training."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks import create_model
from maskworks.backbones import deit  # noqa: F401  (registers the DeiT variants)
from maskworks.methods.distillation import (
    DistillationLoss,
    SoftTargetCrossEntropy,
    hard_distillation_loss,
    soft_distillation_loss,
    soft_target_cross_entropy,
)

NUM_CLASSES = 10


class TinyTeacher(nn.Module):
    """A small CNN with BatchNorm (whose statistics must never move) mapping (B, 3, H, W) to 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class CountingTeacher(nn.Module):
    """Returns fixed logits and counts its calls."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits * 1.0


def _deit_soft_reference(outputs_kd: torch.Tensor, teacher_outputs: torch.Tensor, T: float) -> torch.Tensor:
    """facebookresearch/deit losses.py, soft branch, verbatim maths."""
    return (
        F.kl_div(
            F.log_softmax(outputs_kd / T, dim=1),
            F.log_softmax(teacher_outputs / T, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (T * T)
        / outputs_kd.numel()
    )


def _logits(
    seed: int, b: int = 4, c: int = NUM_CLASSES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cls_logits, dist_logits, teacher = (torch.randn(b, c, generator=g) * 2 for _ in range(3))
    labels = torch.randint(0, c, (b,), generator=g)
    return cls_logits, dist_logits, teacher, labels


# ------------------------------------------------------------------------------------------------ maths
def test_hard_distillation_equals_half_ce_plus_half_ce_teacher_argmax():
    cls_logits, dist_logits, teacher_logits, labels = _logits(0)
    criterion = DistillationLoss(teacher=CountingTeacher(teacher_logits), distillation_type="hard", alpha=0.5)
    loss = criterion(torch.zeros(4, 3, 8, 8), (cls_logits, dist_logits), labels)
    expected = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(dist_logits, teacher_logits.argmax(1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        hard_distillation_loss(dist_logits, teacher_logits), criterion.last_terms["distillation"]
    )


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_matches_deit_formula_and_is_1_over_c_of_batchmean(tau):
    cls_logits, dist_logits, teacher_logits, labels = _logits(1)
    reference = _deit_soft_reference(dist_logits, teacher_logits, tau)
    torch.testing.assert_close(soft_distillation_loss(dist_logits, teacher_logits, tau), reference, atol=1e-6, rtol=0)

    # the seed's version: KL(log_softmax(s / T) || softmax(t / T), batchmean) * T^2 is C times larger
    seed_version = F.kl_div(
        F.log_softmax(dist_logits / tau, dim=1), F.softmax(teacher_logits / tau, dim=1), reduction="batchmean"
    ) * (tau * tau)
    torch.testing.assert_close(reference, seed_version / NUM_CLASSES, atol=1e-6, rtol=0)

    alpha = 0.3
    criterion = DistillationLoss(
        teacher=CountingTeacher(teacher_logits), distillation_type="soft", alpha=alpha, tau=tau
    )
    loss = criterion(torch.zeros(4, 3, 8, 8), (cls_logits, dist_logits), labels)
    expected = (1 - alpha) * F.cross_entropy(cls_logits, labels) + alpha * reference
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_soft_distillation_is_zero_when_student_equals_teacher():
    _, _, teacher_logits, _ = _logits(2)
    assert soft_distillation_loss(teacher_logits, teacher_logits, 2.0).abs().item() < 1e-7


def test_none_returns_base_loss_without_running_the_teacher():
    cls_logits, dist_logits, teacher_logits, labels = _logits(3)
    teacher = CountingTeacher(teacher_logits)
    criterion = DistillationLoss(teacher=teacher, distillation_type="none")
    loss = criterion(torch.zeros(4, 3, 8, 8), (cls_logits, dist_logits), labels)
    torch.testing.assert_close(loss, F.cross_entropy(cls_logits, labels))
    assert teacher.calls == 0
    assert DistillationLoss(distillation_type="none")(None, cls_logits, labels).item() == pytest.approx(
        F.cross_entropy(cls_logits, labels).item()
    )


def test_single_tensor_student_uses_it_for_both_terms():
    cls_logits, _, teacher_logits, labels = _logits(4)
    criterion = DistillationLoss(teacher=CountingTeacher(teacher_logits), distillation_type="soft", tau=2.0)
    loss = criterion(torch.zeros(4, 3, 8, 8), cls_logits, labels)
    expected = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * _deit_soft_reference(cls_logits, teacher_logits, 2.0)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_precomputed_teacher_outputs_skip_the_teacher():
    cls_logits, dist_logits, teacher_logits, labels = _logits(5)
    teacher = CountingTeacher(torch.zeros(4, NUM_CLASSES))
    criterion = DistillationLoss(teacher=teacher, distillation_type="hard")
    loss = criterion(None, (cls_logits, dist_logits), labels, teacher_outputs=teacher_logits)
    expected = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(dist_logits, teacher_logits.argmax(1))
    torch.testing.assert_close(loss, expected)
    assert teacher.calls == 0


# ------------------------------------------------------------------------------------------------ soft targets
def test_soft_target_cross_entropy():
    cls_logits, _, _, labels = _logits(6)
    one_hot = F.one_hot(labels, NUM_CLASSES).float()
    torch.testing.assert_close(soft_target_cross_entropy(cls_logits, one_hot), F.cross_entropy(cls_logits, labels))
    torch.testing.assert_close(soft_target_cross_entropy(cls_logits, labels), F.cross_entropy(cls_logits, labels))
    # a Mixup target: lam * y_a + (1 - lam) * y_b
    mixed = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    expected = 0.7 * F.cross_entropy(cls_logits, labels, reduction="none") + 0.3 * F.cross_entropy(
        cls_logits, labels.flip(0), reduction="none"
    )
    torch.testing.assert_close(SoftTargetCrossEntropy()(cls_logits, mixed), expected.mean())
    with pytest.raises(ValueError, match="target"):
        soft_target_cross_entropy(cls_logits, mixed[:, :3])


def test_distillation_with_mixup_soft_targets():
    cls_logits, dist_logits, teacher_logits, labels = _logits(7)
    mixed = 0.6 * F.one_hot(labels, NUM_CLASSES).float() + 0.4 * F.one_hot(labels.flip(0), NUM_CLASSES).float()
    for base in (None, SoftTargetCrossEntropy()):  # default CrossEntropyLoss takes probabilities too
        criterion = DistillationLoss(base, CountingTeacher(teacher_logits), distillation_type="hard")
        loss = criterion(None, (cls_logits, dist_logits), mixed)
        expected = 0.5 * soft_target_cross_entropy(cls_logits, mixed) + 0.5 * F.cross_entropy(
            dist_logits, teacher_logits.argmax(1)
        )
        torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------------ frozen teacher
def test_teacher_frozen_eval_and_outside_the_criterion_state():
    torch.manual_seed(0)
    teacher = TinyTeacher().train()
    bn_mean = teacher.bn.running_mean.clone()
    criterion = DistillationLoss(teacher=teacher, distillation_type="soft", tau=2.0)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert list(criterion.parameters()) == []
    assert len(criterion.state_dict()) == 0
    assert "teacher" not in dict(criterion.named_modules())

    criterion.train()
    assert criterion.training and not teacher.training
    criterion.to(torch.float64)  # moves the teacher too; still frozen and in eval
    assert teacher.conv.weight.dtype == torch.float64
    assert not teacher.training and not teacher.conv.weight.requires_grad
    criterion.to(torch.float32)

    student = create_model("deit_test_distilled_patch16", num_classes=NUM_CLASSES, img_size=32, patch_size=8)
    student.train().set_distilled_training(True)
    optimizer = torch.optim.AdamW([*student.parameters(), *criterion.parameters()], lr=1e-3)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}

    x = torch.randn(4, 3, 32, 32)
    loss = criterion(x, student(x), torch.randint(0, NUM_CLASSES, (4,)))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.head_dist.weight.grad is not None and student.head.weight.grad is not None
    torch.testing.assert_close(teacher.bn.running_mean, bn_mean, atol=0, rtol=0)  # eval-mode BatchNorm


def test_validation():
    with pytest.raises(ValueError, match="distillation_type"):
        DistillationLoss(teacher=TinyTeacher(), distillation_type="kl")
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(teacher=TinyTeacher(), alpha=1.5)
    with pytest.raises(ValueError, match="tau"):
        DistillationLoss(teacher=TinyTeacher(), tau=0.0)
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(distillation_type="hard")
    with pytest.raises(TypeError, match="teacher"):
        DistillationLoss(teacher=lambda x: x)
    criterion = DistillationLoss(teacher=TinyTeacher())
    with pytest.raises(TypeError, match="outputs"):
        criterion(torch.zeros(2, 3, 8, 8), (torch.zeros(2, 10),) * 3, torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ smoke training
def _prototype_teacher(prototypes: torch.Tensor) -> nn.Module:
    """A nearest-prototype CNN: full-image template matching ``<P_k, x> - |P_k|^2 / 2`` behind an eval BatchNorm."""
    k, c, h, w = prototypes.shape
    conv = nn.Conv2d(c, k, (h, w))
    with torch.no_grad():
        conv.weight.copy_(prototypes)
        conv.bias.copy_(-0.5 * prototypes.flatten(1).pow(2).sum(1))
    return nn.Sequential(nn.BatchNorm2d(c), conv, nn.Flatten())


def test_smoke_training_learns_the_teacher():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size = 32
    prototypes = F.interpolate(torch.randn(NUM_CLASSES, 3, 4, 4, generator=g), size=size, mode="nearest")

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        x = prototypes[y] + 0.8 * torch.randn(n, 3, size, size, generator=g)
        noisy = torch.rand(n, generator=g) < 0.2  # label noise: the teacher is not the labels
        y = torch.where(noisy, torch.randint(0, NUM_CLASSES, (n,), generator=g), y)
        return x, y

    teacher = _prototype_teacher(prototypes)
    criterion = DistillationLoss(teacher=teacher, distillation_type="hard", alpha=0.5)
    student = create_model("deit_test_distilled_patch16", num_classes=NUM_CLASSES, img_size=size, patch_size=8)
    student.set_distilled_training(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.05)

    x_val, _ = batch(256)
    with torch.no_grad():
        teacher_val = teacher(x_val).argmax(1)

    def agreement() -> float:
        student.eval()
        with torch.no_grad():
            _, dist_logits = student.forward_heads(x_val)
        student.train()
        return (dist_logits.argmax(1) == teacher_val).float().mean().item()

    before = agreement()
    criterion.train()
    student.train()
    losses = []
    for _ in range(50):
        x, y = batch(32)
        loss = criterion(x, student(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = agreement()

    assert not teacher.training
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert after > before + 0.3, (before, after)
