"""Checks every registered semantic model passes, parametrised over the registry (smp / timm style base tester).

Each model is built in a tiny configuration (small encoder, few channels) so the whole file stays fast; the
architecture-specific parity and parameter-count tests live in the per-family files.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.losses import CrossEntropyLoss, split_outputs
from maskworks.testing import TINY_SEMANTIC, semantic_models_to_test

TINY = TINY_SEMANTIC
SEMANTIC = semantic_models_to_test()


def build(name: str, num_classes: int = 3, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_channels=in_channels, **TINY[name])


def test_every_semantic_model_has_a_tiny_config():
    assert sorted(TINY) == sorted(SEMANTIC)


@pytest.mark.parametrize("name", SEMANTIC)
def test_forward_on_odd_sizes(name):
    model = build(name).eval()
    with torch.no_grad():
        for size in [(37, 53), (64, 48)]:
            out = model(torch.randn(2, 3, *size))
            assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *size), (name, size, out.shape)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SEMANTIC)
def test_backward_reaches_every_trainable_parameter(name):
    model = build(name).train()
    x, y = torch.randn(2, 3, 48, 64), torch.randint(0, 3, (2, 48, 64))
    y[:, :4] = 255  # ignored pixels are fine everywhere
    output = model(x)
    main, aux = split_outputs(output)
    assert main.shape == (2, 3, 48, 64)
    assert all(a.shape == main.shape for a in aux), [a.shape for a in aux]
    CrossEntropyLoss()(output, y).backward()
    # every parameter is in the graph; a bias followed by a BatchNorm over the same values (e.g. after global
    # pooling) may legitimately get an exactly-zero gradient, so zeros are allowed for a few tensors only
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]} ({len(missing)} parameters)"
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any()]
    assert len(zero) <= 2, f"{name}: all-zero gradients for {zero}"


@pytest.mark.parametrize("name", SEMANTIC)
@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(name, in_channels):
    model = build(name, num_classes=2, in_channels=in_channels).eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, 40, 40)).shape == (1, 2, 40, 40)


@pytest.mark.parametrize("name", SEMANTIC)
def test_batch_size_one_trains(name):
    model = build(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = CrossEntropyLoss()(model(torch.randn(1, 3, 64, 64)), torch.randint(0, 3, (1, 64, 64)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", SEMANTIC)
def test_eval_is_deterministic_and_returns_a_tensor(name):
    model = build(name)
    model.train()
    model(torch.randn(2, 3, 32, 32))  # move running statistics off their initial values
    model.eval()
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert isinstance(a, torch.Tensor)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["deeplabv3", "pspnet", "bisenetv2"])
def test_trainer_consumes_auxiliary_outputs(name, tmp_path):
    from maskworks.data import SyntheticShapes, build_transforms
    from maskworks.engine import Trainer

    data = SyntheticShapes(num_samples=4, image_size=32, transform=build_transforms(train=False))
    model = build(name, num_classes=data.num_classes)
    trainer = Trainer(model, data, data, tmp_path, epochs=1, batch_size=2, progress=False, device="cpu")
    summary = trainer.fit()
    assert torch.isfinite(torch.tensor(summary["history"][-1]["train_loss"]))
    assert 0.0 <= summary["history"][-1]["val_miou"] <= 1.0
