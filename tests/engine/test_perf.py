"""The trainer's fast default path: channels_last, torch.compile (with its fallback), inference-mode validation, and
progress output that stays readable in logs."""

from __future__ import annotations

import functools
import io
import json
import re
import sys

import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.checkpoint import load_model
from maskworks.data import SyntheticShapes, build_transforms
from maskworks.engine import Trainer
from maskworks.engine.perf import prefers_channels_last


def tiny_data(n=24, size=32, split="train"):
    return SyntheticShapes(num_samples=n, image_size=size, split=split, transform=build_transforms(train=False))


def tiny_model(k):
    torch.manual_seed(0)
    return create_model("unet_vanilla", in_channels=3, num_classes=k, features=(8, 16, 32))


def step_losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def run(tmp_path, name, **kw):
    train = tiny_data()
    model = tiny_model(train.num_classes)
    trainer = Trainer(
        model,
        train,
        None,
        tmp_path / name,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        log_every=1,
        progress=False,
        device="cpu",
        seed=1,
        **kw,
    )
    trainer.fit()
    return trainer


def test_channels_last_matches_nchw_and_checkpoints_load(tmp_path):
    # float32 on both sides: the layout alone must not change the numbers
    fast = run(tmp_path, "nhwc", channels_last=True, amp="off")
    plain = run(tmp_path, "nchw", channels_last=False, amp="off")
    assert fast.channels_last and not plain.channels_last
    conv = next(m for m in fast.module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    a, b = step_losses(tmp_path / "nhwc"), step_losses(tmp_path / "nchw")
    assert len(a) == 3
    assert a == pytest.approx(b, rel=1e-4)
    # the checkpoints hold ordinary tensors and load into a fresh (NCHW) model
    loaded = load_model(tmp_path / "nhwc" / "final.safetensors")
    for k, v in fast.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    resumed_state = torch.load(tmp_path / "nhwc" / "checkpoints" / "last.pt", weights_only=True)
    fresh = tiny_model(tiny_data().num_classes)
    fresh.load_state_dict(resumed_state["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), fast.module.eval()(x), atol=1e-5, rtol=1e-4)


def test_channels_last_rule():
    assert prefers_channels_last(tiny_model(3))
    assert not prefers_channels_last(create_model("vit_test_patch16"))  # only a patch projection
    assert prefers_channels_last(nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.Conv2d(8, 8, 1)))  # 1x1 conv
    assert not prefers_channels_last(nn.Sequential(nn.Linear(4, 4)))


def test_compile_failure_falls_back_with_a_warning(tmp_path, monkeypatch):
    class Broken(nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, x):
            raise RuntimeError("no C++ compiler found\nmore details")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken(module))
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\)"):
        compiled = run(tmp_path, "compiled", compile=True)
    eager = run(tmp_path, "eager")
    assert compiled.compile_error == "RuntimeError: no C++ compiler found"
    assert not isinstance(compiled.model, Broken)
    assert step_losses(tmp_path / "compiled") == step_losses(tmp_path / "eager")
    for k, v in eager.module.state_dict().items():
        assert torch.equal(compiled.module.state_dict()[k], v), k


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    # torch.compile's default backend needs minutes of C++ compilation on a small CPU; aot_eager runs the same
    # dynamo capture and AOT autograd graphs without code generation
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = run(tmp_path, "compiled", compile=True)
    assert compiled.compile_error is None
    assert type(compiled.model).__name__ == "OptimizedModule"
    eager = run(tmp_path, "eager")
    assert step_losses(tmp_path / "compiled") == pytest.approx(step_losses(tmp_path / "eager"), rel=1e-4)
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])
    assert state["model"].keys() == eager.module.state_dict().keys()
    loaded = load_model(tmp_path / "compiled" / "final.safetensors")
    assert loaded.state_dict().keys() == eager.module.state_dict().keys()


def test_evaluate_runs_in_inference_mode(tmp_path):
    train = tiny_data(8)
    trainer = Trainer(
        tiny_model(train.num_classes), train, tiny_data(4, split="val"), tmp_path, batch_size=8, device="cpu"
    )
    seen = []
    trainer.module.register_forward_hook(lambda m, args, out: seen.append(torch.is_inference_mode_enabled()))
    metrics = trainer.evaluate()
    assert seen == [True] and 0.0 <= metrics["miou"] <= 1.0


LINE = re.compile(r"^epoch (\d)/2 loss=\d+\.\d{4} lr=\S+ img/s=\d+\.\d val_mIoU=\d\.\d{4} time=\d+\.\ds$")


def _fit_with_progress(tmp_path, name):
    train = tiny_data(16)
    Trainer(
        tiny_model(train.num_classes),
        train,
        tiny_data(4, split="val"),
        tmp_path / name,
        epochs=2,
        batch_size=8,
        progress=True,
        device="cpu",
    ).fit()


def test_progress_without_a_terminal_is_one_line_per_epoch(tmp_path, caplog, capsys):
    assert not sys.stderr.isatty()  # pytest captures stderr
    with caplog.at_level("INFO", logger="maskworks.engine.trainer"):
        _fit_with_progress(tmp_path, "log")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2, lines
    assert [LINE.match(line).group(1) for line in lines] == ["1", "2"], lines
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "s/it" not in err  # no progress bars in a log


def test_progress_on_a_terminal_shows_bars(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    _fit_with_progress(tmp_path, "tty")
    assert "epoch 1/2" in term.getvalue() and "\r" in term.getvalue()


def test_auto_mixed_precision_uses_bfloat16_exactly_where_the_cpu_has_it(tmp_path):
    from maskworks.engine.trainer import cpu_has_native_bf16

    trainer = run(tmp_path, "auto")
    assert trainer.amp_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert run(tmp_path, "off", amp="off").amp_dtype is None
