"""Optimizers and learning-rate schedules (per-step, resumable through ``state_dict``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["build_optimizer", "build_scheduler", "param_groups"]

OPTIMIZERS = ("adamw", "sgd", "adam")
SCHEDULES = ("poly", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and normalisation parameters (1-D tensors) without."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 1e-4, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (Nesterov momentum) with no weight decay on biases and norms."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(model, weight_decay)
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def lr_factor(
    step: int, total_steps: int, schedule: str, warmup_steps: int = 0, power: float = 0.9, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        f = (1.0 - t) ** power
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    schedule: str = "poly",
    warmup_steps: int = 0,
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``: linear warm-up, then poly (``(1-t)^power``), cosine or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, schedule, warmup_steps, power, min_lr_ratio)
    )
