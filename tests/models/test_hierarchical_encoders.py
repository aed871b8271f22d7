"""Swin / Swin V2 / ConvNeXt as the encoder of the dense models: parity with smp's timm ("tu-") encoders, any input
size, gradients, and ConvNeXt's output stride (dilation) equal to timm's."""

from __future__ import annotations

import pytest
import torch

import maskworks as mw
from maskworks import registry
from maskworks.backbones.swin import SwinTransformer
from maskworks.backbones.swin_v2 import SwinTransformerV2
from maskworks.convert import load_weights

smp = pytest.importorskip("segmentation_models_pytorch")
timm = pytest.importorskip("timm")


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    # random init leaves BatchNorm at identity and biases at zero: perturb everything so every weight matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "smp_arch, ours, encoder, size, kwargs",
    [
        ("Unet", "unet", "swin_tiny_patch4_window7_224", 224, {}),  # windows of 7 at every stage
        ("UnetPlusPlus", "unetplusplus", "convnextv2_atto", 96, {}),
        ("FPN", "fpn", "convnextv2_atto", 96, {}),
        ("DeepLabV3Plus", "deeplabv3plus", "convnextv2_atto", 96, {"atrous_rates": (12, 24, 36)}),
    ],
)
def test_dense_models_equal_smp_timm_encoders(smp_arch, ours, encoder, size, kwargs):
    torch.manual_seed(0)
    ref = _perturbed(getattr(smp, smp_arch)("tu-" + encoder, encoder_weights=None, classes=3))
    model = mw.create_model(ours, encoder=encoder, num_classes=3, **kwargs).eval()
    load_weights(model, ref.state_dict(), source="smp", strict=True)  # every key used, none missing
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_convnext_output_stride_equals_timm(output_stride):
    torch.manual_seed(0)
    ref = timm.create_model("convnextv2_atto", features_only=True, output_stride=output_stride).eval()
    ours = mw.create_model("convnextv2_atto", output_stride=output_stride).eval()
    state = {k.replace("stages_", "stages.").replace("stem_", "stem."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    assert [i["reduction"] for i in ours.feature_info] == [i["reduction"] for i in ref.feature_info.get_dicts()]
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def small_swins():
    """Small Swin V1 / V2 registered as backbones for the duration of this module (the real classes)."""
    names = {
        "_test_swin_small_config": lambda in_channels=3, **kw: SwinTransformer(
            16, (1, 2, 1, 1), (1, 2, 2, 4), window_size=4, in_channels=in_channels, **kw
        ),
        "_test_swinv2_small_config": lambda in_channels=3, **kw: SwinTransformerV2(
            16, (1, 2, 1, 1), (1, 2, 2, 4), window_size=4, in_channels=in_channels, **kw
        ),
    }
    for name, fn in names.items():
        registry.register_model(fn, name=name, kind="backbone")
    yield list(names)
    for name in names:
        registry._REGISTRY.pop(name)


@pytest.mark.parametrize("encoder", ["_test_swin_small_config", "_test_swinv2_small_config", "convnextv2_atto"])
@pytest.mark.parametrize("arch", ["unet", "fpn", "deeplabv3plus"])
def test_any_size_and_every_parameter_learns(arch, encoder, small_swins):
    torch.manual_seed(0)
    model = mw.create_model(arch, encoder=encoder, num_classes=3).train()
    out = model(torch.randn(2, 3, 33, 45))
    assert out.shape == (2, 3, 33, 45)
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 97, 131)).shape == (1, 3, 97, 131)


def test_unet_stride2_level_is_empty_like_smp():
    # one decoder block per octave: the stride-2 block of a stride-4-first encoder has no skip
    model = mw.create_model("unet", encoder="convnextv2_atto", num_classes=2)
    assert model._empty_stride2 and len(model.decoder.blocks) == 5
    four = mw.create_model("unet", encoder="convnextv2_atto", num_classes=2, decoder_channels=(128, 64, 32, 16))
    assert not four._empty_stride2 and len(four.decoder.blocks) == 4
    assert four(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_deeplab_on_undilatable_encoder(small_swins):
    model = mw.create_model("deeplabv3plus", encoder=small_swins[0], num_classes=2)
    assert model.output_stride == 32 and model.atrous_rates == (3, 6, 9)
    assert mw.create_model("deeplabv3plus", encoder="convnextv2_atto", num_classes=2).output_stride == 16
    assert mw.create_model("deeplabv3", encoder="convnextv2_atto", num_classes=2).output_stride == 8
    with pytest.raises(ValueError, match="cannot be dilated.*output_stride=None"):
        mw.create_model("deeplabv3plus", encoder=small_swins[0], output_stride=16)


def test_unetplusplus_deep_supervision_needs_every_level():
    with pytest.raises(ValueError, match="deep_supervision.*decoder_channels=\\(256, 128, 64, 32\\)"):
        mw.create_model("unetplusplus", encoder="convnextv2_atto", deep_supervision=True)
    model = mw.create_model(
        "unetplusplus", encoder="convnextv2_atto", deep_supervision=True, decoder_channels=(256, 128, 64, 32)
    ).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, 1, 64, 64) and len(out["aux"]) == 2


def test_swin_encoder_has_no_parameter_without_gradient_and_loads_timm_norm_as_unexpected():
    model = mw.create_model("unet", encoder="swin_tiny_patch4_window7_224", num_classes=2)
    assert not any(k.startswith("encoder.norm.") for k in model.state_dict())
    backbone = mw.create_model("swin_tiny_patch4_window7_224")
    result = load_weights(model, backbone.state_dict(), source="timm")
    assert set(result.unexpected_keys) == {"encoder.norm.weight", "encoder.norm.bias"}
