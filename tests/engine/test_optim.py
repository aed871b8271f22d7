"""Optimizer parameter groups and learning-rate schedules."""

import math

import pytest
import torch

from maskworks.engine import build_optimizer, build_scheduler
from maskworks.engine.optim import lr_factor


def test_no_weight_decay_on_bias_and_norm():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(m, "adamw", lr=0.1, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_poly_and_cosine_values():
    assert lr_factor(0, 10, "poly") == 1.0
    assert math.isclose(lr_factor(5, 10, "poly", power=0.9), 0.5**0.9)
    assert math.isclose(lr_factor(5, 10, "cosine"), 0.5)
    assert math.isclose(lr_factor(10, 10, "cosine"), 0.0, abs_tol=1e-12)
    # warm-up: linear up to 1 over 4 steps, then cosine over the remaining 6
    assert [lr_factor(s, 10, "cosine", warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lr_factor(7, 10, "cosine", warmup_steps=4), 0.5)


def test_scheduler_steps_and_errors():
    m = torch.nn.Linear(2, 2)
    opt = build_optimizer(m, "sgd", lr=1.0)
    sched = build_scheduler(opt, 4, "poly", power=1.0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer(m, "lion")
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(opt, 4, "step")
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, 4, "poly", warmup_steps=4)
