"""MobileNetV2 / V3 backbones: torchvision and smp parity, output stride, input channels, converter."""

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import mobilenetv3 as tv_mobilenetv3

import maskworks.backbones.mobilenet  # noqa: F401  (registers the backbones)
from maskworks import create_model, list_models
from maskworks.backbones.mobilenet import MobileNetV2, MobileNetV3
from maskworks.convert.mobilenet import convert_torchvision_mobilenet, is_mobilenet_state_dict
from maskworks.testing import randomize_norms

smp = pytest.importorskip("segmentation_models_pytorch")

NAMES = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
# torchvision `features` indices of the five maps, their channels, and the parameter count of `features`.
TAPS = {
    "mobilenet_v2": ([1, 3, 6, 13, 18], [16, 24, 32, 96, 1280], 2_223_872),
    "mobilenet_v3_large": ([1, 3, 6, 12, 16], [16, 24, 40, 112, 960], 2_971_952),
    "mobilenet_v3_small": ([0, 1, 3, 8, 12], [16, 16, 24, 48, 576], 927_008),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Depthwise convs on tiny maps gain nothing from 2 threads and slow down 5x when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features_only(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if k.startswith("features.")}


def _run_features(features: nn.Sequential, x: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
    """Run a torchvision `features` Sequential block by block and keep the outputs at `taps`."""
    out = []
    for i, module in enumerate(features):
        x = module(x)
        if i in taps:
            out.append(x)
    return out


def _assert_features_close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref) == 5
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_registered_as_backbones():
    assert list_models("mobilenet*", kind="backbone") == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_parity(name):
    taps, channels, num_params = TAPS[name]
    ref = randomize_norms(getattr(torchvision.models, name)(weights=None))
    ours = create_model(name).eval()
    ours.load_state_dict(_features_only(ref.state_dict()))  # strict: identical keys
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.features.parameters()) == num_params
    assert [i["module"] for i in ours.feature_info] == [f"features.{i}" for i in taps]
    assert [i["num_chs"] for i in ours.feature_info] == channels
    assert [i["reduction"] for i in ours.feature_info] == [2, 4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        _assert_features_close(ours(x), _run_features(ref.features, x, taps))
        torch.testing.assert_close(ours.forward_features(x), ref.features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs",
    [("mobilenet_v2", {"width_mult": 0.5}), ("mobilenet_v3_large", {"width_mult": 0.75, "reduced_tail": True})],
)
def test_width_options_match_torchvision(name, kwargs):
    ref = randomize_norms(getattr(torchvision.models, name)(weights=None, **kwargs))
    ours = create_model(name, **kwargs).eval()
    ours.load_state_dict(_features_only(ref.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_output_stride_16_matches_torchvision_dilated(name):
    setting, last_channel = tv_mobilenetv3._mobilenet_v3_conf(name, dilated=True)
    ref = randomize_norms(tv_mobilenetv3.MobileNetV3(setting, last_channel))
    ours = create_model(name, output_stride=16).eval()
    ours.load_state_dict(_features_only(ref.state_dict()))
    assert [i["reduction"] for i in ours.feature_info] == [2, 4, 8, 16, 16]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _assert_features_close(ours(x), _run_features(ref.features, x, TAPS[name][0]))
    assert ours.output_stride == 16


@pytest.mark.parametrize("output_stride", [16, 8])
def test_mobilenet_v2_output_stride_matches_smp(output_stride):
    ref = randomize_norms(smp.encoders.get_encoder("mobilenet_v2", weights=None, output_stride=output_stride))
    ours = create_model("mobilenet_v2", output_stride=output_stride).eval()
    ours.load_state_dict(ref.state_dict())  # smp's encoder keys are torchvision's `features.*`
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _assert_features_close(ours(x), ref(x)[1:])


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("name", NAMES)
def test_feature_info_matches_outputs(name, output_stride):
    model = create_model(name, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 64, 96))
    expected = {32: [2, 4, 8, 16, 32], 16: [2, 4, 8, 16, 16], 8: [2, 4, 8, 8, 8]}[output_stride]
    assert [info["reduction"] for info in model.feature_info] == expected
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (1, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
        assert isinstance(model.get_submodule(info["module"]), nn.Module)
    assert model.out_channels == (3, *(info["num_chs"] for info in model.feature_info))
    assert model.output_stride == output_stride


def test_odd_input_size():
    model = create_model("mobilenet_v3_small").eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 65, 97))
    assert [f.shape[-2:] for f in feats] == [(33, 49), (17, 25), (9, 13), (5, 7), (3, 4)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(name, in_channels):
    model = create_model(name, in_channels=in_channels).eval()
    assert model.features[0][0].weight.shape[1] == in_channels and model.out_channels[0] == in_channels
    with torch.no_grad():
        feats = model(torch.randn(2, in_channels, 64, 64))
    assert feats[-1].shape == (2, TAPS[name][1][-1], 2, 2)


def test_converter_drops_classifier_and_loads_strictly():
    for name in NAMES:
        ref_sd = getattr(torchvision.models, name)(weights=None).state_dict()
        assert is_mobilenet_state_dict(ref_sd)
        converted, dropped = convert_torchvision_mobilenet(ref_sd)
        assert dropped and all(k.startswith("classifier.") for k in dropped)
        assert set(dropped) == {k for k in ref_sd if k.startswith("classifier.")}
        create_model(name).load_state_dict(converted)  # strict
    smp_sd = smp.encoders.get_encoder("mobilenet_v2", weights=None).state_dict()
    assert is_mobilenet_state_dict(smp_sd)
    converted, dropped = convert_torchvision_mobilenet(smp_sd)
    assert dropped == []
    create_model("mobilenet_v2").load_state_dict(converted)
    assert not is_mobilenet_state_dict(torchvision.models.resnet18(weights=None).state_dict())


def test_converter_adapts_stem_to_grayscale():
    # A 1-channel stem with the summed filters sees a gray image as the RGB stem sees it repeated 3 times.
    ref = randomize_norms(torchvision.models.mobilenet_v3_small(weights=None))
    converted, _ = convert_torchvision_mobilenet(ref.state_dict(), in_channels=1)
    assert converted["features.0.0.weight"].shape[1] == 1
    ours = create_model("mobilenet_v3_small", in_channels=1).eval()
    ours.load_state_dict(converted)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x), ref.features(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5
        )
    converted4, _ = convert_torchvision_mobilenet(ref.state_dict(), in_channels=4)
    create_model("mobilenet_v3_small", in_channels=4).load_state_dict(converted4)


def test_channels_match_smp_unet_encoder():
    assert create_model("mobilenet_v2").out_channels[1:] == tuple(
        smp.Unet("mobilenet_v2", encoder_weights=None).encoder.out_channels[1:]
    )


def test_unet_with_mobilenet_v2_matches_smp_unet():
    from maskworks.models.semantic.unet import UNet

    ref = randomize_norms(smp.Unet("mobilenet_v2", encoder_weights=None, classes=2))
    ours = UNet(encoder="mobilenet_v2", num_classes=2).eval()
    ours.load_state_dict(ref.state_dict())  # strict: smp's `encoder.features.*` keys are ours
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_batch_size_one_train_step():
    model = create_model("mobilenet_v3_small").train()
    feats = model(torch.randn(1, 3, 64, 64))
    sum(f.mean() for f in feats).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_classes_and_bad_arguments():
    assert isinstance(create_model("mobilenet_v2"), MobileNetV2)
    assert isinstance(create_model("mobilenet_v3_large"), MobileNetV3)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 4"):
        create_model("mobilenet_v2", output_stride=4)
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        create_model("mobilenet_v3_small", in_channels=0)
    with pytest.raises(ValueError, match="width_mult must be a positive number, got 0"):
        create_model("mobilenet_v3_large", width_mult=0)
