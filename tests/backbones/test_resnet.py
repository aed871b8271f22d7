"""ResNet backbones: torchvision / timm parity, output stride, input channels, feature_info."""

import pytest
import torch
import torch.nn as nn
import torchvision

from maskworks import create_model, list_models
from maskworks.backbones import ResNet
from maskworks.convert import load_weights
from maskworks.testing import randomize_norms

timm = pytest.importorskip("timm")


def _torchvision_intermediates(model: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.relu(model.bn1(model.conv1(x)))
    feats = [x]
    x = model.maxpool(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def _assert_features_close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref) == 5
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_registered_as_backbones():
    assert list_models("resnet*", kind="backbone") == ["resnet101", "resnet18", "resnet34", "resnet50"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_parity(name):
    ref = randomize_norms(getattr(torchvision.models, name)(weights=None))
    ours = create_model(name).eval()
    result = load_weights(ours, ref.state_dict(), source="torchvision", strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _assert_features_close(ours(x), _torchvision_intermediates(ref, x))
        torch.testing.assert_close(
            ours.forward_features(x),
            ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_timm_parity(name):
    ref = randomize_norms(timm.create_model(name, pretrained=False))
    ours = create_model(name).eval()
    load_weights(ours, ref.state_dict(), source="timm", strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_features_close(ours(x), ref.forward_intermediates(x, intermediates_only=True))
    assert [(i["num_chs"], i["reduction"]) for i in ours.feature_info] == [
        (i["num_chs"], i["reduction"]) for i in ref.feature_info
    ]


@pytest.mark.parametrize("output_stride, dilate", [(16, [False, False, True]), (8, [False, True, True])])
def test_output_stride_matches_torchvision_dilation(output_stride, dilate):
    ref = randomize_norms(torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate))
    ours = create_model("resnet50", output_stride=output_stride).eval()
    load_weights(ours, ref.state_dict(), source="torchvision")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = ours(x)
        _assert_features_close(feats, _torchvision_intermediates(ref, x))
    assert feats[-1].shape[-2:] == (64 // output_stride, 64 // output_stride)
    assert ours.output_stride == output_stride


@pytest.mark.parametrize("name, output_stride", [("resnet18", 16), ("resnet34", 8)])
def test_output_stride_basic_block_matches_timm(name, output_stride):
    # torchvision's BasicBlock refuses dilation; timm dilates it (first conv keeps the previous rate).
    ref = randomize_norms(timm.create_model(name, pretrained=False, output_stride=output_stride))
    ours = create_model(name, output_stride=output_stride).eval()
    load_weights(ours, ref.state_dict(), source="timm")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_features_close(ours(x), ref.forward_intermediates(x, intermediates_only=True))


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_feature_info_matches_outputs(name, output_stride):
    model = create_model(name, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 64, 96))
    assert [info["module"] for info in model.feature_info] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (1, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
        assert isinstance(model.get_submodule(info["module"]), nn.Module)
    assert model.feature_info[-1]["reduction"] == output_stride
    assert model.out_channels == (3, *(info["num_chs"] for info in model.feature_info))


@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(in_channels):
    model = create_model("resnet18", in_channels=in_channels).eval()
    assert model.conv1.weight.shape[1] == in_channels and model.out_channels[0] == in_channels
    feats = model(torch.randn(2, in_channels, 64, 64))
    assert feats[-1].shape == (2, 512, 2, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 4"):
        create_model("resnet18", output_stride=4)
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        create_model("resnet18", in_channels=0)


def test_resnet101_builds():
    model = create_model("resnet101")
    assert isinstance(model, ResNet)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    ref_keys = set(torchvision.models.resnet101(weights=None).state_dict()) - {"fc.weight", "fc.bias"}
    assert set(model.state_dict()) == ref_keys
