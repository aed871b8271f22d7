"""U-Net: vanilla (same / valid padding) and encoder-based (smp layout and parity)."""

import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.convert import load_weights
from maskworks.models.semantic import UNet, UNetVanilla, valid_input_size, valid_output_size
from maskworks.testing import count_parameters, randomize_norms

SMALL = (8, 16, 32, 64)


def _small(name: str, **kw) -> nn.Module:
    if name == "unet_vanilla":
        return create_model(name, features=SMALL, **kw)
    return create_model(name, encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), **kw)


def test_vanilla_parameter_count():
    assert count_parameters(create_model("unet_vanilla"), trainable_only=True) == 31_043_521
    assert count_parameters(create_model("unet_vanilla", num_classes=2), trainable_only=True) == 31_043_586


@pytest.mark.parametrize("name", ["unet_vanilla", "unet"])
@pytest.mark.parametrize("size", [(97, 131), (65, 65), (64, 64)])
def test_output_size_equals_input(name, size):
    model = _small(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 3, *size)


def test_padding_does_not_leak_into_output():
    # The padded region is cropped: the top-left output of an odd input equals that of the padded input.
    model = _small("unet_vanilla").eval()
    x = torch.randn(1, 3, 33, 47)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 15))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[..., :33, :47])


def test_valid_mode_paper_shapes():
    model = create_model("unet_vanilla", features=SMALL, padding="valid").eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the paper has no BN
    shapes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape[-1]))
        for m in [*model.encoder, model.bottleneck, *model.decoder]
    ]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 572, 572))
    for h in hooks:
        h.remove()
    assert out.shape == (1, 1, 388, 388)
    assert shapes == [568, 280, 136, 64, 28, 52, 100, 196, 388]
    assert model.valid_output_size(572) == 388 and model.valid_input_size(388) == 572


def test_valid_size_helpers():
    assert valid_output_size(572) == 388
    assert valid_input_size(388) == 572
    assert valid_input_size(1) == valid_input_size(4) == 188 and valid_output_size(188) == 4
    assert valid_input_size(389) == 588 and valid_output_size(588) == 404
    for out in range(1, 300, 7):  # minimal: the next smaller legal input gives less than `out`
        size = valid_input_size(out)
        assert valid_output_size(size) >= out
        if size - 16 >= 188:
            assert valid_output_size(size - 16) < out
    assert valid_output_size(44, depth=1) == 28 and valid_input_size(28, depth=1) == 44
    assert valid_input_size(1, depth=1) == 18 and valid_output_size(18, depth=1) == 2
    with pytest.raises(ValueError, match="input size 570 .*nearest legal sizes: 556, 572"):
        valid_output_size(570)
    with pytest.raises(ValueError, match="input size 100 .*smallest legal size: 188"):
        valid_output_size(100)


@pytest.mark.parametrize("depth", [1, 2])
def test_valid_size_helpers_match_the_network(depth):
    model = create_model("unet_vanilla", features=(2, 4)[:depth], padding="valid").eval()
    smallest = valid_input_size(1, depth)
    with torch.no_grad():
        for size in range(smallest, smallest + 3 * 2**depth + 1):
            try:
                expected = valid_output_size(size, depth)
            except ValueError:
                continue
            assert model(torch.randn(1, 3, size, size)).shape[-1] == expected
        with pytest.raises((RuntimeError, ValueError)):  # one step below the smallest legal size breaks the network
            model._forward(torch.randn(1, 3, smallest - 2**depth, smallest - 2**depth))


def test_valid_mode_rejects_bad_size():
    model = create_model("unet_vanilla", features=SMALL, padding="valid")
    with pytest.raises(ValueError, match="input size 570"):
        model(torch.randn(1, 3, 572, 570))


def test_vanilla_argument_errors():
    with pytest.raises(ValueError, match="padding must be 'same' or 'valid', got 'full'"):
        UNetVanilla(padding="full")
    with pytest.raises(ValueError, match="features .* got \\(\\)"):
        UNetVanilla(features=())
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        UNetVanilla(num_classes=0)
    with pytest.raises(ValueError, match="in_channels must be a positive int, got -1"):
        UNetVanilla(in_channels=-1)
    assert any(
        isinstance(m, nn.BatchNorm2d) for m in UNetVanilla(features=(4,), padding="valid", batch_norm=True).modules()
    )


def test_unet_argument_errors():
    with pytest.raises(ValueError, match="registered backbone, got 'unet_vanilla'"):
        UNet(encoder="unet_vanilla")
    with pytest.raises(ValueError, match="one entry per encoder map \\(5\\)"):
        UNet(encoder="resnet18", decoder_channels=(64, 32, 16))


@pytest.mark.parametrize("name", ["unet_vanilla", "unet"])
def test_backward_reaches_every_parameter(name):
    model = _small(name, num_classes=2).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["unet_vanilla", "unet"])
@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(name, in_channels):
    model = _small(name, in_channels=in_channels, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize("name", ["unet_vanilla", "unet"])
def test_batch_size_one_train_mode(name):
    model = _small(name).train()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_unet_attributes():
    model = create_model("unet", encoder="resnet18", num_classes=4)
    assert model.num_classes == 4
    assert isinstance(model.encoder, nn.Module) and isinstance(model.decoder, nn.Module)
    assert model.segmentation_head[0].out_channels == 4


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
@pytest.mark.parametrize("source", ["smp", "auto"])
def test_smp_parity(encoder, source):
    smp = pytest.importorskip("segmentation_models_pytorch")
    ref = randomize_norms(smp.Unet(encoder, encoder_weights=None, classes=3))
    ours = create_model("unet", encoder=encoder, num_classes=3).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    result = load_weights(ours, ref.state_dict(), source=source, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_smp_parity_without_decoder_norm():
    smp = pytest.importorskip("segmentation_models_pytorch")
    ref = smp.Unet("resnet18", encoder_weights=None, classes=2, decoder_use_norm=False, in_channels=1).eval()
    ours = create_model("unet", encoder="resnet18", num_classes=2, decoder_batch_norm=False, in_channels=1).eval()
    load_weights(ours, ref.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
