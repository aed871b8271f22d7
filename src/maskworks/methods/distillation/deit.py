"""Knowledge distillation through a distillation token (Touvron et al., "Training data-efficient image
transformers & distillation through attention", ICML 2021, DeiT).

:class:`DistillationLoss` follows ``facebookresearch/deit`` ``losses.py::DistillationLoss`` term for term:

* ``base = base_criterion(cls_logits, labels)`` (labels may be Mixup / CutMix soft targets);
* soft distillation ``tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` summed and divided by ``s.numel()``
  (``B * C``), i.e. DeiT's ``F.kl_div(log_softmax(s / T), log_softmax(t / T), reduction="sum",
  log_target=True) * T * T / s.numel()``. The common ``reduction="batchmean"`` version divides by ``B`` only and
  is ``C`` times larger (1000x on ImageNet), which silently changes the balance set by ``alpha``;
* hard distillation ``CE(dist_logits, argmax(teacher_logits))`` (the paper's better-performing choice);
* ``loss = (1 - alpha) * base + alpha * distillation``; DeiT's defaults are ``alpha=0.5``, ``tau=1.0``.

The student's output is the ``(cls_logits, dist_logits)`` pair of a distilled ViT in distilled training mode
(:class:`maskworks.backbones.deit.VisionTransformerDistilled`), or a single tensor for a student without a
distillation head, which then serves both terms (Hinton-style distillation).

The teacher is frozen and kept apart from the criterion's state: it is never a registered child, so it is not
in ``criterion.parameters()`` (hence not in an optimizer built from them) nor in ``criterion.state_dict()``
(checkpoints of the criterion stay small; save the teacher separately). ``criterion.train()`` leaves it in
eval mode (BatchNorm statistics of a CNN teacher are never updated) and ``criterion.to(...)`` moves it along.
It runs under ``torch.no_grad()`` on the same (augmented) inputs as the student.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DistillationLoss",
    "SoftTargetCrossEntropy",
    "soft_target_cross_entropy",
    "soft_distillation_loss",
    "hard_distillation_loss",
    "split_student_outputs",
]

log = logging.getLogger(__name__)

_DISTILLATION_TYPES = ("none", "soft", "hard")


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``-sum_c target_c * log_softmax(logits)_c``.

    Args:
        logits: ``(B, C)`` raw scores.
        target: ``(B, C)`` class probabilities (Mixup / CutMix / label smoothing; rows sum to 1), or ``(B,)``
            integer class ids, which give ordinary cross-entropy.

    Returns:
        The scalar loss.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if target.ndim == 1 and not target.is_floating_point():
        return F.cross_entropy(logits, target)
    if target.shape != logits.shape:
        raise ValueError(
            f"target must be (B, C) probabilities of the same shape as logits {tuple(logits.shape)} "
            f"or (B,) class ids, got shape {tuple(target.shape)}"
        )
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class SoftTargetCrossEntropy(nn.Module):
    """Module form of :func:`soft_target_cross_entropy` (timm's ``SoftTargetCrossEntropy``, which DeiT uses with
    Mixup / CutMix); integer targets are also accepted."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(logits, target)


def soft_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """DeiT's soft distillation term: ``tau^2 * sum KL(p_t || p_s) / student.numel()`` at temperature ``tau``.

    Args:
        student: ``(B, C)`` student logits (the distillation head).
        teacher: ``(B, C)`` teacher logits.
        tau: temperature ``> 0``.

    Returns:
        The scalar loss, ``1 / C`` times the ``reduction="batchmean"`` KL divergence.
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(
            f"student and teacher logits must both be (B, C), got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    kl = F.kl_div(
        F.log_softmax(student / tau, dim=1),
        F.log_softmax(teacher / tau, dim=1),
        reduction="sum",
        log_target=True,
    )
    return kl * (tau * tau) / student.numel()


def hard_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation term: cross-entropy of ``student`` against the teacher's decisions
    ``argmax(teacher, 1)``.

    Args:
        student: ``(B, C)`` student logits (the distillation head).
        teacher: ``(B, C)`` teacher logits.

    Returns:
        The scalar loss.
    """
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher logits must both be (B, C), got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return F.cross_entropy(student, teacher.argmax(dim=1))


def split_student_outputs(outputs: torch.Tensor | tuple | list) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls_logits, dist_logits)`` from a student output: the pair of a distilled ViT, or one tensor (used
    for both)."""
    if isinstance(outputs, torch.Tensor):
        return outputs, outputs
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2 and all(isinstance(o, torch.Tensor) for o in outputs):
        return outputs[0], outputs[1]
    raise TypeError(
        "outputs must be a logits tensor (B, C) or a (cls_logits, dist_logits) pair of tensors, got "
        f"{type(outputs).__name__}" + (f" of length {len(outputs)}" if isinstance(outputs, (tuple, list)) else "")
    )


def _teacher_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)  # HF ModelOutput
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the teacher must return a logits tensor (B, C) (or an object with .logits), got {type(out)}")


class _FrozenHolder:
    """Plain (non-Module) box for the teacher, so ``nn.Module`` does not register it as a child."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module


class DistillationLoss(nn.Module):
    """DeiT's distillation criterion: ``(1 - alpha) * base(cls, y) + alpha * distill(dist, teacher(x))``.

    Args:
        base_criterion: loss on the class-token logits and the labels, called as ``base_criterion(logits,
            labels)``; default ``nn.CrossEntropyLoss()``, which accepts class ids and probability targets.
            Use :class:`SoftTargetCrossEntropy` (or label smoothing) as DeiT does with Mixup.
        teacher: the teacher network (e.g. a CNN such as RegNetY-16GF, timm ``regnety_160``), mapping the
            student's inputs to ``(B, C)`` logits. It is frozen in place: ``requires_grad_(False)`` and
            ``eval()``. Required unless ``distillation_type="none"``.
        distillation_type: ``"hard"`` (cross-entropy with the teacher's argmax), ``"soft"`` (temperature-scaled
            KL divergence) or ``"none"`` (base loss only; the teacher is not run).
        alpha: weight of the distillation term, in ``[0, 1]``.
        tau: temperature of the soft term, ``> 0`` (DeiT's default 1.0).

    Attributes:
        last_terms: detached ``{"base", "distillation"}`` values of the last call, for logging.

    Example:
        >>> student.set_distilled_training(True)
        >>> criterion = DistillationLoss(teacher=cnn, distillation_type="hard")
        >>> loss = criterion(images, student(images), labels)
    """

    def __init__(
        self,
        base_criterion: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        teacher: nn.Module | None = None,
        distillation_type: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if distillation_type not in _DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {_DISTILLATION_TYPES}, got {distillation_type!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not float(tau) > 0.0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is None and distillation_type != "none":
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher; pass teacher=<nn.Module>")
        if base_criterion is not None and not callable(base_criterion):
            raise TypeError(f"base_criterion must be callable, got {type(base_criterion).__name__}")
        self.base_criterion = base_criterion if base_criterion is not None else nn.CrossEntropyLoss()
        self.distillation_type = distillation_type
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.last_terms: dict[str, torch.Tensor] = {}
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self._teacher = _FrozenHolder(teacher)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (not a registered submodule)."""
        return self._teacher.module

    def train(self, mode: bool = True) -> DistillationLoss:
        """Set the criterion's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> DistillationLoss:
        # .to() / .cuda() / .double() ... move the teacher too, and it stays frozen.
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn)
            self.teacher.requires_grad_(False)
        return self

    def extra_repr(self) -> str:
        teacher = type(self.teacher).__name__ if self.teacher is not None else None
        return f"distillation_type={self.distillation_type!r}, alpha={self.alpha}, tau={self.tau}, teacher={teacher}"

    def forward(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor,
        teacher_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The combined loss.

        Args:
            inputs: the images the student saw ``(B, C_in, H, W)``; the teacher runs on them.
            outputs: the student's ``(cls_logits, dist_logits)``, each ``(B, C)``, or one ``(B, C)`` tensor.
            labels: ``(B,)`` class ids or ``(B, C)`` soft targets for ``base_criterion``.
            teacher_outputs: precomputed teacher logits ``(B, C)`` (e.g. cached); the teacher is then not run.

        Returns:
            The scalar loss.
        """
        cls_logits, dist_logits = split_student_outputs(outputs)
        base = self.base_criterion(cls_logits, labels)
        if self.distillation_type == "none":
            self.last_terms = {"base": base.detach()}
            return base
        if teacher_outputs is None:
            with torch.no_grad():
                teacher_outputs = _teacher_logits(self.teacher(inputs))
        teacher_outputs = teacher_outputs.detach()
        if self.distillation_type == "soft":
            distill = soft_distillation_loss(dist_logits, teacher_outputs, self.tau)
        else:
            distill = hard_distillation_loss(dist_logits, teacher_outputs)
        self.last_terms = {"base": base.detach(), "distillation": distill.detach()}
        return base * (1.0 - self.alpha) + distill * self.alpha
