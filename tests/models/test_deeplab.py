"""DeepLabv3 (torchvision / smp parity) and DeepLabv3+ (smp parity), any input size, aux outputs."""

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import maskworks.models.semantic.deeplab  # noqa: F401  (registers deeplabv3 / deeplabv3plus)
from maskworks import create_model
from maskworks.convert.deeplab import convert_torchvision_deeplabv3, is_torchvision_deeplab_state_dict
from maskworks.layers import PooledBatchNorm2d
from maskworks.models.semantic.deeplab import DeepLabV3, DeepLabV3Plus, default_atrous_rates
from maskworks.testing import count_parameters, randomize_norms


def _tv_deeplab(depth: int = 50) -> nn.Module:
    build = getattr(torchvision.models.segmentation, f"deeplabv3_resnet{depth}")
    return build(weights=None, weights_backbone=None, num_classes=5, aux_loss=True)


# --------------------------------------------------------------------------- torchvision DeepLabv3
@pytest.fixture(scope="module")
def tv_pair():
    ref = randomize_norms(_tv_deeplab(50))
    ours = create_model("deeplabv3", encoder="resnet50", num_classes=5, output_stride=8, aux=True).eval()
    converted, dropped = convert_torchvision_deeplabv3(ref.state_dict())
    assert dropped == []
    result = ours.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ref, ours


def test_torchvision_deeplabv3_parity(tv_pair):
    ref, ours = tv_pair
    assert (
        count_parameters(ours) == count_parameters(ref) == 41_995_850
    )  # 42,004,074 with 21 classes, torchvision's documented count
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        expected = ref(x)["out"]
        out = ours(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 65, 97)  # eval: a plain tensor, no aux
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_torchvision_deeplabv3_aux_in_training(tv_pair):
    ref, ours = tv_pair
    x = torch.randn(2, 3, 17, 25)
    try:
        ref.train(), ours.train()
        with torch.no_grad():
            torch.manual_seed(0)
            expected = ref(x)
            torch.manual_seed(0)  # same dropout masks: both draw the ASPP dropout, then the aux dropout
            out = ours(x)
    finally:
        ref.eval(), ours.eval()
    assert set(out) == {"out", "aux"} and len(out["aux"]) == 1
    assert out["aux"][0].shape == (2, 5, 17, 25)
    torch.testing.assert_close(out["out"], expected["out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["aux"][0], expected["aux"], atol=1e-4, rtol=1e-4)


def test_torchvision_deeplabv3_resnet101_keys():
    ref = _tv_deeplab(101)
    ours = create_model("deeplabv3", encoder="resnet101", num_classes=5, aux=True)
    converted, dropped = convert_torchvision_deeplabv3(ref.state_dict())
    own = ours.state_dict()
    assert dropped == [] and set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    assert count_parameters(ours) == count_parameters(ref)


def test_converter_aux_and_detection(tv_pair):
    ref, _ = tv_pair
    sd = ref.state_dict()
    assert is_torchvision_deeplab_state_dict(sd)
    assert not is_torchvision_deeplab_state_dict(torchvision.models.resnet18(weights=None).state_dict())
    converted, dropped = convert_torchvision_deeplabv3(sd, aux=False)
    assert dropped and all(k.startswith("aux_classifier.") for k in dropped)
    assert not any(k.startswith("aux_classifier.") for k in converted)
    assert converted["decoder.aspp.convs.4.1.weight"] is sd["classifier.0.convs.4.1.weight"]
    assert converted["segmentation_head.0.bias"] is sd["classifier.4.bias"]
    assert converted["decoder.conv.weight"] is sd["classifier.1.weight"]
    no_aux = create_model("deeplabv3", encoder="resnet50", num_classes=5)
    no_aux.load_state_dict(converted, strict=True)
    one_channel, _ = convert_torchvision_deeplabv3(sd, in_channels=1)
    assert one_channel["encoder.conv1.weight"].shape == (64, 1, 7, 7)


# --------------------------------------------------------------------------- smp DeepLabV3 (keys) and legacy keys
def test_smp_deeplabv3_keys_and_logits():
    ref = randomize_norms(smp.DeepLabV3("resnet18", encoder_weights=None, classes=4))
    ours = create_model("deeplabv3", encoder="resnet18", num_classes=4, uniform_dilation=True).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert count_parameters(ours) == count_parameters(ref)
    # smp resizes with align_corners=True, torchvision (and we) with False: compare the head's logits
    logits = {}
    ref.segmentation_head[0].register_forward_hook(lambda m, i, o: logits.__setitem__("ref", o))
    ours.segmentation_head.register_forward_hook(lambda m, i, o: logits.__setitem__("ours", o))
    with torch.no_grad():
        ref(torch.randn(1, 3, 64, 96))
        x = torch.randn(1, 3, 64, 96)
        ref(x), ours(x)
    torch.testing.assert_close(logits["ours"], logits["ref"], atol=1e-4, rtol=1e-4)


def test_legacy_smp_decoder_keys_load():
    model = create_model("deeplabv3", encoder="resnet18", num_classes=2)
    sd = model.state_dict()
    legacy = {}
    for key, value in sd.items():
        for new, old in (
            ("decoder.aspp.", "decoder.0."),
            ("decoder.conv.", "decoder.1."),
            ("decoder.bn.", "decoder.2."),
        ):
            key = key.replace(new, old)
        legacy[key] = torch.randn_like(value) if value.is_floating_point() else value
    assert "decoder.0.project.0.weight" in legacy
    result = model.load_state_dict(legacy, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.decoder.conv.weight, legacy["decoder.1.weight"])


# --------------------------------------------------------------------------- smp DeepLabV3+
@pytest.mark.parametrize("encoder, output_stride, params", [("resnet34", 16, 22_438_485), ("resnet18", 8, 12_330_325)])
def test_smp_deeplabv3plus_parity(encoder, output_stride, params):
    ref = randomize_norms(
        smp.DeepLabV3Plus(encoder, encoder_weights=None, classes=5, encoder_output_stride=output_stride)
    )
    ours = create_model(
        "deeplabv3plus", encoder=encoder, num_classes=5, output_stride=output_stride, atrous_rates=(12, 24, 36)
    ).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert count_parameters(ours) == count_parameters(ref) == params
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 96)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
        # an odd size smp refuses: ours pads to the output stride and crops, i.e. equals smp on the padded input
        x = torch.randn(1, 3, 65, 97)
        padded = F.pad(x, (0, -97 % output_stride, 0, -65 % output_stride))
        out = ours(x)
        assert out.shape == (1, 5, 65, 97)
        torch.testing.assert_close(out, ref(padded)[..., :65, :97], atol=1e-4, rtol=1e-4)


def test_dilation_style_matters_for_smp_parity():
    # torchvision-style dilation (first block of layer4 at rate 1) gives other logits from smp's weights
    ref = randomize_norms(smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=2))
    ours = create_model("deeplabv3plus", encoder="resnet18", num_classes=2, uniform_dilation=False).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.encoder.layer4[0].conv1.dilation == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(ours(x), ref(x), atol=1e-3)
    uniform = create_model("deeplabv3plus", encoder="resnet18", num_classes=2)
    assert uniform.encoder.layer4[0].conv1.dilation == (2, 2) and uniform.encoder.layer4[0].conv1.padding == (2, 2)


def test_default_atrous_rates():
    assert default_atrous_rates(16) == (6, 12, 18) and default_atrous_rates(8) == (12, 24, 36)
    for name, os_, rates in [("deeplabv3plus", 16, (6, 12, 18)), ("deeplabv3plus", 8, (12, 24, 36))]:
        model = create_model(name, encoder="resnet18", output_stride=os_)
        aspp = model.decoder.aspp[0]
        assert aspp.atrous_rates == rates
        assert [aspp.convs[i][0][0].dilation[0] for i in (1, 2, 3)] == list(rates)  # separable: depthwise conv
    v3 = create_model("deeplabv3", encoder="resnet18")
    assert v3.decoder.aspp.atrous_rates == (12, 24, 36) and v3.encoder.feature_info[-1]["reduction"] == 8
    assert isinstance(v3.decoder.aspp.convs[4][2], PooledBatchNorm2d)


# --------------------------------------------------------------------------- contract: sizes, aux, batch size 1
@pytest.mark.parametrize("name", ["deeplabv3", "deeplabv3plus"])
@pytest.mark.parametrize("size", [(65, 97), (17, 5), (1, 1)])
def test_output_size_equals_input(name, size):
    model = create_model(name, encoder="resnet18", num_classes=3, decoder_channels=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 3, *size)


@pytest.mark.parametrize("output_stride, size", [(16, (513, 513)), (16, (500, 375)), (8, (129, 97))])
def test_deeplabv3plus_large_sizes_and_high_level_map(output_stride, size):
    model = create_model(
        "deeplabv3plus", encoder="resnet18", num_classes=3, output_stride=output_stride, decoder_channels=32
    ).eval()
    shapes = {}
    model.decoder.aspp.register_forward_hook(lambda m, i, o: shapes.__setitem__("high", i[0].shape[-2:]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3, *size)
    assert tuple(shapes["high"]) == tuple(-(-s // output_stride) for s in size)  # ceil(H / os)


@pytest.mark.parametrize("name", ["deeplabv3", "deeplabv3plus"])
def test_batch_size_one_train_step_with_aux(name):
    model = create_model(name, encoder="resnet18", num_classes=3, decoder_channels=16, aux=True).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, target = torch.randn(1, 3, 33, 47), torch.randint(0, 3, (1, 33, 47))
    out = model(x)
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"][0].shape == (1, 3, 33, 47)
    loss = F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"][0], target)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert model.aux_classifier[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)


@pytest.mark.parametrize("cls", [DeepLabV3, DeepLabV3Plus])
def test_no_aux_head_by_default(cls):
    model = cls(encoder="resnet18", num_classes=2, decoder_channels=16).train()
    assert model.aux_classifier is None and not any(k.startswith("aux") for k in model.state_dict())
    assert isinstance(model(torch.randn(2, 3, 32, 32)), torch.Tensor)


def test_aux_head_is_torchvision_fcn_head():
    model = create_model("deeplabv3", encoder="resnet50", num_classes=7, aux=True)
    head = model.aux_classifier
    assert head[0].in_channels == 1024 and head[0].out_channels == 256 and head[0].bias is None
    assert isinstance(head[3], nn.Dropout) and head[3].p == 0.1 and head[4].out_channels == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output_stride": 4},
        {"encoder": "unet"},
        {"num_classes": 0},
        {"atrous_rates": (6, 0, 18)},
        {"decoder_channels": 0},
    ],
)
@pytest.mark.parametrize("name", ["deeplabv3", "deeplabv3plus"])
def test_invalid_arguments(name, kwargs):
    with pytest.raises(ValueError):
        create_model(name, **{"encoder": "resnet18", **kwargs})


# --------------------------------------------------------------------------- MobileNetV3-Large preset (separable)
# Parameter counts with one class, recorded before the preset was added (deeplabv3plus itself is unchanged by it).
DEEPLABV3PLUS_RESNET50 = 26_677_585
DEEPLABV3PLUS_MOBILENET_V3_LARGE = 4_708_353  # separable ASPP (the default)
DEEPLABV3PLUS_MOBILENET_V3_LARGE_REGULAR = 10_580_673  # aspp_separable=False


def test_default_deeplabv3plus_is_unchanged():
    assert count_parameters(create_model("deeplabv3plus")) == DEEPLABV3PLUS_RESNET50
    regular = create_model("deeplabv3plus", encoder="mobilenet_v3_large", aspp_separable=False)
    assert count_parameters(regular) == DEEPLABV3PLUS_MOBILENET_V3_LARGE_REGULAR


def test_mobilenet_v3_large_preset_is_deeplabv3plus_with_separable_aspp():
    preset = create_model("deeplabv3plus_mobilenet_v3_large")
    generic = create_model("deeplabv3plus", encoder="mobilenet_v3_large")
    regular = create_model("deeplabv3plus", encoder="mobilenet_v3_large", aspp_separable=False)
    assert type(preset) is DeepLabV3Plus and preset.output_stride == 16 and preset.atrous_rates == (6, 12, 18)
    assert [(k, v.shape) for k, v in preset.state_dict().items()] == [
        (k, v.shape) for k, v in generic.state_dict().items()
    ]
    assert count_parameters(preset) == count_parameters(generic) == DEEPLABV3PLUS_MOBILENET_V3_LARGE
    # by hand: each atrous branch (rates 6, 12, 18) maps C_in = 960 to C_out = 256 channels; a 3x3 conv has
    # 9 C_in C_out weights, a separable one 9 C_in (depthwise) + C_in C_out (pointwise); BN, 1x1, pooling and
    # projection branches, and the (always separable) decoder convs are the same in both
    c_in, c_out = 960, 256
    per_branch = 9 * c_in * c_out - (9 * c_in + c_in * c_out)
    assert count_parameters(regular) - count_parameters(preset) == 3 * per_branch == 5_872_320
    aspp = preset.decoder.aspp[0]
    for i, rate in zip((1, 2, 3), (6, 12, 18), strict=True):
        depthwise, pointwise = aspp.convs[i][0]
        assert depthwise.groups == depthwise.in_channels == 960 and depthwise.kernel_size == (3, 3)
        assert depthwise.dilation == depthwise.padding == (rate, rate)
        assert pointwise.kernel_size == (1, 1) and (pointwise.in_channels, pointwise.out_channels) == (960, 256)
    assert isinstance(regular.decoder.aspp[0].convs[1][0], nn.Conv2d)
    assert regular.decoder.aspp[0].convs[1][0].weight.shape == (256, 960, 3, 3)
    for model in (preset, regular):  # decoder convs: separable either way (smp's layout)
        assert model.decoder.aspp[1][0].groups == 256 and model.decoder.block2[0][0].groups == 256 + 48
    # encoder: torchvision's dilated MobileNetV3 (last stage stride 1, dilation 2); low-level map = features.3
    assert preset.decoder.block1[0].in_channels == 24 and preset.decoder.low_level_index == 1
    dilations = {i: block.block[1][0].dilation for i, block in enumerate(preset.encoder.features) if 1 <= i <= 15}
    assert [i for i, d in dilations.items() if d != (1, 1)] == [13, 14, 15] and dilations[13] == (2, 2)


@pytest.mark.parametrize("size", [(97, 129), (37, 53), (1, 1)])
def test_mobilenet_v3_large_preset_any_size(size):
    model = create_model("deeplabv3plus_mobilenet_v3_large", num_classes=3, decoder_channels=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3, *size) and torch.isfinite(out).all()


def test_mobilenet_v3_large_preset_fixes_its_encoder():
    with pytest.raises(TypeError, match="unexpected argument"):
        create_model("deeplabv3plus_mobilenet_v3_large", encoder="resnet18")
    model = create_model("deeplabv3plus_mobilenet_v3_large", num_classes=2, output_stride=8, decoder_channels=16)
    assert model.output_stride == 8 and model.atrous_rates == (12, 24, 36)
