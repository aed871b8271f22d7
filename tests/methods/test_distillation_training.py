"""Distillation through the one trainer: ``DistillationTask`` (teacher frozen in eval, the adapter optimised and
checkpointed) and ``maskworks train --set distill.teacher=... --set distill.kind=...``."""

from __future__ import annotations

import json

import pytest
import torch

from maskworks.checkpoint import load_training_state, save_model
from maskworks.cli.main import main
from maskworks.data import SyntheticShapes, build_transforms
from maskworks.engine import Trainer
from maskworks.methods.distillation import DistillationTask
from maskworks.registry import create_model


def _data():
    train = SyntheticShapes(num_samples=8, image_size=32, transform=build_transforms(train=False))
    val = SyntheticShapes(num_samples=4, image_size=32, split="val", transform=build_transforms(train=False))
    return train, val


def _unet(k: int, seed: int):
    torch.manual_seed(seed)
    return create_model("unet", encoder="resnet18", num_classes=k, decoder_channels=(32, 16, 16, 8, 8))


@pytest.mark.parametrize("kind", ["pixel", "feature"])
def test_teacher_stays_frozen_and_the_adapter_trains_and_is_checkpointed(kind, tmp_path):
    train, val = _data()
    teacher = _unet(train.num_classes, seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # incl. BatchNorm running statistics
    student = create_model("unet_vanilla", num_classes=train.num_classes, features=(8, 16, 32))
    task = DistillationTask(teacher, kind=kind, alpha=0.5, student=student, num_classes=train.num_classes)
    adapter = [p.detach().clone() for p in task.parameters()]
    assert (len(adapter) > 0) == (kind == "feature")
    trainer = Trainer(student, train, val, tmp_path, task=task, epochs=1, batch_size=4, lr=0.01, amp="off",
                      progress=False, device="cpu")  # fmt: skip
    if kind == "feature":
        assert trainer.optimizer.param_groups[-1]["params"] == list(task.parameters())
    trainer.fit()
    row = trainer.history[-1]
    assert row["train_kd"] > 0 and row["train_task"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    if kind == "feature":
        assert any(not torch.equal(a, b) for a, b in zip(adapter, task.parameters()))
        saved = load_training_state(trainer.checkpoint_path)["task"]
        assert all(torch.equal(saved[k], v) for k, v in task.state_dict().items())


def test_kd_term_is_zero_for_a_student_equal_to_its_teacher():
    train, _ = _data()
    teacher = _unet(train.num_classes, seed=1).eval()
    student = _unet(train.num_classes, seed=1).eval()
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, train.num_classes, (2, 32, 32))}
    for kind in ("pixel", "cwd", "pairwise", "feature"):
        task = DistillationTask(teacher, kind=kind, student=student, num_classes=train.num_classes)
        if kind == "feature":
            torch.nn.init.eye_(task.kd.adapters[0].weight.view(task.kd.adapters[0].weight.shape[:2]))
        losses = task.training_step(student, batch)
        assert float(losses["kd"]) == pytest.approx(0.0, abs=1e-6), kind


def test_distillation_from_the_command_line(tmp_path, capsys):
    train, _ = _data()
    teacher = _unet(train.num_classes, seed=1)
    save_model(teacher, tmp_path / "teacher.safetensors", {"num_classes": train.num_classes})
    common = ["train", "--data", "synthetic", "--model", "unet_vanilla", "--set", "model.features=[8,16,32]",
              "--set", "data.image_size=32", "--set", "data.num_train=8", "--set", "data.num_val=4",
              "--set", "train.batch_size=4", "--set", "train.device=cpu", "--no-progress", "--epochs", "1"]  # fmt: skip
    run = tmp_path / "run"
    distill = ["--set", f"distill.teacher={tmp_path / 'teacher.safetensors'}", "--set", "distill.kind=cwd"]
    assert main([*common, *distill, "--run-dir", str(run)]) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line]
    assert "train_kd" in history[-1] and "train_task" in history[-1]
    assert json.loads((run / "best.json").read_text())["meta"]["distill"]["kind"] == "cwd"
    capsys.readouterr()
    assert main([*common, "--set", "distill.kind=logits", *distill[:2], "--run-dir", str(tmp_path / "r2")]) == 2
    assert "distill.kind" in capsys.readouterr().err
    assert main([*common, "--set", "distill.teacher=missing.safetensors", "--run-dir", str(tmp_path / "r3")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
