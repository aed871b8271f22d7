"""Attention U-Net: the additive attention gate, equivalence with U-Net, shapes, counts, training."""

import pytest
import torch
import torch.nn as nn

import maskworks.models.semantic.attention_unet  # noqa: F401  (registers "attention_unet")
from maskworks import create_model
from maskworks.models.semantic.attention_unet import AttentionGate, AttentionUNet
from maskworks.testing import count_parameters, randomize_norms

SMALL = (32, 16, 16, 8, 8)


def _gate_params(gate: int, skip: int, inter: int, batch_norm: bool = True) -> int:
    # W_g: gate*inter (+ BN 2*inter), W_x: skip*inter (+ BN 2*inter), psi: inter (+ BN 2); convs biased without BN
    return inter * (gate + skip + 5) + 2 if batch_norm else inter * (gate + skip + 3) + 1


class _PassSkip(nn.Module):
    """A gate replaced by identity: the skip goes through unchanged."""

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gate_coefficients_and_output(mode):
    torch.manual_seed(0)
    gate = randomize_norms(AttentionGate(12, 8, 4)).train(mode == "train")
    g, x = torch.randn(2, 12, 9, 7), torch.randn(2, 8, 9, 7)
    alpha = gate.coefficients(g, x)
    assert alpha.shape == (2, 1, 9, 7)
    assert (alpha > 0).all() and (alpha < 1).all()
    assert alpha.std() > 0  # not a constant map
    torch.testing.assert_close(gate(g, x), x * alpha, atol=0, rtol=0)


def test_gate_formula_and_resampled_gating_signal():
    torch.manual_seed(0)
    gate = randomize_norms(AttentionGate(6, 4, 3))
    g, x = torch.randn(1, 6, 5, 5), torch.randn(1, 4, 5, 5)
    g1 = gate.W_g[1](gate.W_g[0](g))
    x1 = gate.W_x[1](gate.W_x[0](x))
    expected = torch.sigmoid(gate.psi[1](gate.psi[0](torch.relu(g1 + x1))))
    with torch.no_grad():
        torch.testing.assert_close(gate.coefficients(g, x), expected)
        # a coarser gating signal is resampled to the skip's size
        assert gate(torch.randn(1, 6, 3, 2), x).shape == x.shape


@pytest.mark.parametrize("batch_norm", [True, False])
def test_gate_parameter_count(batch_norm):
    assert count_parameters(AttentionGate(64, 64, 32, batch_norm)) == _gate_params(64, 64, 32, batch_norm)
    assert count_parameters(AttentionGate(512, 256, 128, batch_norm)) == _gate_params(512, 256, 128, batch_norm)


def test_seed_vanilla_gate_total():
    # the seed's four gates AttentionGate(f, f, f // 2): 31,394,089 - 31,043,521 parameters
    assert sum(_gate_params(f, f, f // 2) for f in (64, 128, 256, 512)) == 31_394_089 - 31_043_521


def test_identity_gates_give_unet():
    torch.manual_seed(0)
    unet = randomize_norms(create_model("unet", encoder="resnet18", decoder_channels=SMALL, num_classes=3))
    model = create_model("attention_unet", encoder="resnet18", decoder_channels=SMALL, num_classes=3)
    # every shared key is a UNet key, in the same order; only the gates are extra
    keys = [k for k in model.state_dict() if ".attention_gate." not in k]
    assert keys == list(unet.state_dict())
    randomize_norms(model, seed=1)  # non-trivial gate BNs; the shared ones are overwritten by the UNet's
    result = model.load_state_dict(unet.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(".attention_gate." in k for k in result.missing_keys)
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        gated = model(x)
        for block in model.decoder.blocks:
            if block.attention_gate is not None:
                block.attention_gate = _PassSkip()
        torch.testing.assert_close(model(x), unet(x), atol=0, rtol=0)
    assert not torch.allclose(gated, unet(x))  # the real gates do change the output


def test_gates_see_the_upsampled_decoder_feature_at_skip_resolution():
    model = create_model("attention_unet", encoder="resnet18", decoder_channels=SMALL).eval()
    seen = []
    for gate in model.attention_gates():
        gate.register_forward_hook(lambda _m, inp, out: seen.append((inp[0].shape, inp[1].shape, out.shape)))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    # deepest skip first: layer3 (1/16), layer2 (1/8), layer1 (1/4), stem (1/2); no gate on the last block
    assert [s[1][1:] for s in seen] == [(256, 4, 4), (128, 8, 8), (64, 16, 16), (64, 32, 32)]
    assert [s[0][1] for s in seen] == [512, *SMALL[:3]]
    assert all(g[-2:] == x[-2:] and out == x for g, x, out in seen)


def test_output_shape_for_odd_input():
    model = create_model("attention_unet", encoder="resnet18", decoder_channels=SMALL, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 101, 77)).shape == (2, 2, 101, 77)


def test_parameter_count_is_unet_plus_gates():
    unet = create_model("unet")  # resnet34, 1 class
    model = create_model("attention_unet")
    # (gating channels, skip channels) of the four gated blocks: decoder input and ResNet-34 skip
    gates = [(512, 256), (256, 128), (128, 64), (64, 64)]
    extra = sum(_gate_params(g, s, s // 2) for g, s in gates)
    assert extra == 134_408
    assert count_parameters(model) == count_parameters(unet) + extra == 24_436_369 + 134_408
    assert [(gt.W_g[0].in_channels, gt.W_x[0].in_channels) for gt in model.attention_gates()] == gates
    small = create_model("attention_unet", encoder="resnet18", decoder_channels=SMALL, decoder_batch_norm=False)
    small_unet = create_model("unet", encoder="resnet18", decoder_channels=SMALL, decoder_batch_norm=False)
    gates = [(512, 256), (32, 128), (16, 64), (16, 64)]
    assert count_parameters(small) == count_parameters(small_unet) + sum(
        _gate_params(g, s, s // 2, False) for g, s in gates
    )


def test_smp_unet_checkpoint_loads_with_only_gates_missing():
    smp = pytest.importorskip("segmentation_models_pytorch")
    ref = smp.Unet("resnet18", encoder_weights=None, classes=2)
    model = create_model("attention_unet", encoder="resnet18", num_classes=2)
    result = model.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == [] and len(result.missing_keys) > 0
    assert all(".attention_gate." in k for k in result.missing_keys)


def test_batch_size_one_train_step():
    torch.manual_seed(0)
    model = create_model("attention_unet", encoder="resnet18", decoder_channels=SMALL, num_classes=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(1, 3, 33, 47), torch.randint(0, 3, (1, 33, 47))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    assert torch.isfinite(loss)


def test_argument_errors():
    with pytest.raises(ValueError, match="inter_channels must be a positive int, got 0"):
        AttentionGate(8, 8, 0)
    with pytest.raises(ValueError, match="one entry per encoder map \\(5\\)"):
        AttentionUNet(encoder="resnet18", decoder_channels=(64, 32, 16))
    with pytest.raises(ValueError, match="registered backbone, got 'attention_unet'"):
        AttentionUNet(encoder="attention_unet")
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        AttentionUNet(encoder="resnet18", num_classes=0)
