"""PSPNet: pyramid pooling module, smp parity (keys, counts, logits), truncated encoder, aux head."""

import pytest
import torch
import torch.nn as nn

import maskworks.models._utils as fpn_module
import maskworks.models.semantic.pspnet  # noqa: F401  (registers "pspnet")
from maskworks import create_model
from maskworks.convert import load_weights
from maskworks.layers.norm import PooledBatchNorm2d
from maskworks.layers.ppm import PSPBlock, PSPModule
from maskworks.losses import CrossEntropyLoss
from maskworks.models.semantic.pspnet import PSPNet, run_resnet_stages
from maskworks.registry import ModelEntry
from maskworks.testing import count_parameters, randomize_norms

smp = pytest.importorskip("segmentation_models_pytorch")

SMP_PSPNET_RESNET34_PARAMS = 21_447_203  # smp.PSPNet("resnet34", classes=3): encoder_depth=3, layer3/4 kept


def _small(**kw) -> PSPNet:
    return PSPNet("resnet18", psp_out_channels=32, **kw)


# --------------------------------------------------------------------------- pyramid pooling module
def test_psp_module_shapes_and_global_branch():
    ppm = PSPModule(16, sizes=(1, 2, 3, 6))
    assert ppm.out_channels == 32
    assert isinstance(ppm.blocks[0].pool[1][1], nn.Identity) and ppm.blocks[0].pool[1][0].bias is not None
    assert isinstance(ppm.blocks[1].pool[1][1], nn.BatchNorm2d)
    assert ppm(torch.randn(1, 16, 7, 5)).shape == (1, 32, 7, 5)  # batch 1 trains (no BN on the 1x1 branch)

    ppm = PSPModule(16, out_channels=8, global_norm=True).train()
    assert isinstance(ppm.blocks[0].pool[1][1], PooledBatchNorm2d)
    assert ppm(torch.randn(1, 16, 6, 6)).shape == (1, 16 + 4 * 8, 6, 6)
    assert PSPBlock(4, 2, 3, norm_layer=None).pool[1][0].bias is not None
    with pytest.raises(ValueError, match="pool_size must be a positive int, got 0"):
        PSPBlock(4, 2, 0)


# --------------------------------------------------------------------------- smp parity
def test_smp_parity_resnet34():
    ref = randomize_norms(smp.PSPNet("resnet34", encoder_weights=None, classes=3))
    ours = create_model("pspnet", encoder="resnet34", num_classes=3).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert count_parameters(ours) == count_parameters(ref) == SMP_PSPNET_RESNET34_PARAMS
    result = load_weights(ours, ref.state_dict(), source="auto", strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("depth", "batch_norm"), [(5, True), (4, False)])
def test_smp_parity_other_depths(depth, batch_norm):
    # smp's upsampling stays 8 unless told; ours always upsamples by the stride of the used map
    ref = smp.PSPNet(
        "resnet18",
        encoder_weights=None,
        classes=2,
        encoder_depth=depth,
        psp_out_channels=32,
        decoder_use_norm=batch_norm,
        upsampling=2**depth,
    )
    ref = randomize_norms(ref)
    ours = _small(num_classes=2, encoder_depth=depth, psp_use_batchnorm=batch_norm).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert count_parameters(ours) == count_parameters(ref)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- truncated encoder
def test_unused_stages_are_not_run_and_frozen():
    model = _small().eval()
    calls = []
    for name in ("layer2", "layer3", "layer4"):
        getattr(model.encoder, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == ["layer2"]
    assert not any(p.requires_grad for p in model.encoder.layer3.parameters())
    assert not any(p.requires_grad for p in model.encoder.layer4.parameters())
    assert all(p.requires_grad for p in model.encoder.layer2.parameters())


def test_run_resnet_stages_matches_forward_intermediates():
    encoder = randomize_norms(create_model("resnet18"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = encoder.forward_intermediates(x)
        for depth in (1, 3, 5):
            part = run_resnet_stages(encoder, x, depth)
            assert len(part) == depth
            for a, b in zip(part, full):
                torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- any size, training, aux
@pytest.mark.parametrize("size", [(65, 97), (64, 64), (9, 15)])
def test_output_size_equals_input(size):
    model = _small(num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 3, *size)


def test_batch_size_one_train_step():
    model = _small(num_classes=2).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    out = model(torch.randn(1, 3, 33, 47))
    assert out.shape == (1, 2, 33, 47)
    nn.functional.cross_entropy(out, torch.randint(0, 2, (1, 33, 47))).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert name.startswith(("encoder.layer3.", "encoder.layer4.")), name
    opt.step()


@pytest.mark.parametrize("depth", [3, 5])
def test_aux_head(depth):
    model = _small(num_classes=3, encoder_depth=depth, aux=True).train()
    assert model.aux_head[0][0].in_channels == (64 if depth == 3 else 256)  # the map before the last used one
    x = torch.randn(2, 3, 33, 47)
    out = model(x)
    assert set(out) == {"out", "aux"} and len(out["aux"]) == 1
    assert out["out"].shape == out["aux"][0].shape == (2, 3, 33, 47)
    target = torch.randint(0, 3, (2, 33, 47))
    loss = CrossEntropyLoss()(out, target)  # main + 0.4 * aux
    expected = nn.functional.cross_entropy(out["out"], target) + 0.4 * nn.functional.cross_entropy(
        out["aux"][0], target
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.aux_head[0][0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)


def test_aux_model_loads_smp_weights_except_aux_head():
    ref = smp.PSPNet("resnet18", encoder_weights=None, classes=2, psp_out_channels=32)
    ours = _small(num_classes=2, aux=True)
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("aux_head.") for k in result.missing_keys)


def test_argument_errors(monkeypatch):
    with pytest.raises(ValueError, match="encoder_depth must be an int in \\[1, 5\\]"):
        PSPNet("resnet18", encoder_depth=6)
    with pytest.raises(ValueError, match="aux=True needs encoder_depth >= 2"):
        PSPNet("resnet18", encoder_depth=1, aux=True)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        PSPNet("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="registered backbone, got 'pspnet'"):
        PSPNet(encoder="pspnet")

    class Plain(nn.Module):  # a backbone without the ResNet stage layout
        feature_info = [{"num_chs": 8, "reduction": 2 ** (i + 1), "module": f"s{i}"} for i in range(5)]

    monkeypatch.setattr(fpn_module, "model_entry", lambda name: ModelEntry(name, lambda **kw: Plain(), "backbone", ""))
    with pytest.raises(ValueError, match="needs a ResNet-like encoder .* supports encoder_depth=5 only"):
        PSPNet("plain", encoder_depth=3)
