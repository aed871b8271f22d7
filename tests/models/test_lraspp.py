"""LR-ASPP MobileNetV3-Large: torchvision parity (structure, keys, parameters, logits at odd sizes), the converter and
its detection, input channels, the ``coco_voc`` weights row end to end (offline, a random file in torchvision's
layout)."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
import torch.nn as nn
import torchvision

import maskworks.hub.table as table_module
from maskworks import create_model, load_weights
from maskworks.convert import convert_torchvision_lraspp, is_torchvision_lraspp_state_dict
from maskworks.convert.load import _detect_source
from maskworks.hub import weights_dir
from maskworks.models.semantic.lraspp import LRASPP
from maskworks.testing import count_parameters, randomize_norms

# torchvision's LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1 meta["num_params"] (21 classes)
TV_PARAMS_21 = 3_221_538


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tv_lraspp(num_classes: int = 21) -> nn.Module:
    torch.manual_seed(0)
    ref = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    return randomize_norms(ref, seed=1, perturb=0.05)  # eval mode, every norm and weight off its initial value


@pytest.fixture(scope="module")
def tv_pair():
    ref = _tv_lraspp(7)
    ours = create_model("lraspp_mobilenet_v3_large", num_classes=7).eval()
    converted, dropped = convert_torchvision_lraspp(ref.state_dict())
    assert dropped == []
    result = ours.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ref, ours


@pytest.mark.parametrize("size", [(97, 129), (128, 160)])
def test_torchvision_parity(tv_pair, size):
    ref, ours = tv_pair
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = ref(x)["out"]
        out = ours(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7, *size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_parameters_and_keys_are_torchvisions():
    ref = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    ours = create_model("lraspp_mobilenet_v3_large")  # 21 classes, torchvision's default
    assert count_parameters(ours) == count_parameters(ref) == TV_PARAMS_21
    converted, _ = convert_torchvision_lraspp(ref.state_dict())
    own = ours.state_dict()
    assert sorted(converted) == sorted(own)
    assert all(converted[k].shape == own[k].shape for k in own)


def test_backbone_is_torchvisions_dilated_mobilenet_and_low_is_its_tap(tv_pair):
    ref, ours = tv_pair
    ref_convs = [m for m in ref.backbone.modules() if isinstance(m, nn.Conv2d)]
    our_convs = [m for m in ours.encoder.features.modules() if isinstance(m, nn.Conv2d)]
    assert len(ref_convs) == len(our_convs)
    for a, b in zip(ref_convs, our_convs, strict=True):
        assert (a.stride, a.dilation, a.padding, a.groups) == (b.stride, b.dilation, b.padding, b.groups)
    dilated = [
        i
        for i, block in enumerate(ours.encoder.features)
        if any(isinstance(m, nn.Conv2d) and m.dilation != (1, 1) for m in block.modules())
    ]
    assert dilated == [13, 14, 15]  # the last stage, as torchvision's dilated=True
    # torchvision's "low" is features[4] (the first stride-8 block), not the backbone's stage-end tap features.6
    assert ref.backbone.return_layers == {"4": "low", "16": "high"}
    assert ours.low_index == 4 and ours.encoder.feature_info[2]["module"] == "features.6"
    assert ours.classifier.low_classifier.in_channels == 40 and ours.classifier.cbr[0].in_channels == 960


def test_training_returns_the_logits_tensor():
    model = create_model("lraspp_mobilenet_v3_large", num_classes=3, inter_channels=16).train()
    out = model(torch.randn(1, 3, 33, 47))  # batch size 1: the gate has no norm layer
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 33, 47)


def test_load_weights_detects_torchvision_lraspp_and_adapts_the_stem(tv_pair):
    ref, ours = tv_pair
    state = ref.state_dict()
    assert is_torchvision_lraspp_state_dict(state) and _detect_source(state) == "torchvision"
    assert not is_torchvision_lraspp_state_dict(ours.state_dict()) and _detect_source(ours.state_dict()) == "maskworks"
    model = create_model("lraspp_mobilenet_v3_large", num_classes=7).eval()
    result = load_weights(model, state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x)["out"], atol=1e-5, rtol=0)
    gray = create_model("lraspp_mobilenet_v3_large", num_classes=7, in_channels=1).eval()
    load_weights(gray, state, strict=True)
    assert gray.encoder.features[0][0].weight.shape[1] == 1
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 40, 56)).shape == (1, 7, 40, 56)


def test_other_mobilenet_and_arguments():
    small = LRASPP("mobilenet_v3_small", num_classes=4).eval()
    # torchvision publishes no builder for the small one; its private helper builds the same LR-ASPP on it
    backbone = torchvision.models.mobilenet_v3_small(weights=None, dilated=True)
    ref = randomize_norms(torchvision.models.segmentation.lraspp._lraspp_mobilenetv3(backbone, 4), seed=2)
    assert ref.backbone.return_layers == {"2": "low", "12": "high"} and small.low_index == 2
    small.load_state_dict(convert_torchvision_lraspp(ref.state_dict())[0], strict=True)
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x)["out"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="output_stride"):
        create_model("lraspp_mobilenet_v3_large", output_stride=4)
    with pytest.raises(ValueError, match="MobileNet encoder"):
        LRASPP("resnet18")
    with pytest.raises(TypeError, match="unexpected argument"):
        create_model("lraspp_mobilenet_v3_large", aux=True)


def test_coco_voc_row_builds_21_classes_and_loads_the_file(tmp_path, monkeypatch):
    """``pretrained="coco_voc"``: a file in torchvision's layout, placed where a manual download goes, is checked
    against the hash in its (patched) URL, converted and gives torchvision's logits."""
    monkeypatch.setenv("MASKWORKS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MASKWORKS_OFFLINE", "1")
    ref = _tv_lraspp(21)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    name = f"lraspp_mobilenet_v3_large-{sha[:8]}.pth"
    real = table_module.torchvision_weights_url
    monkeypatch.setattr(
        table_module,
        "torchvision_weights_url",
        lambda w: f"http://127.0.0.1:9/models/{name}" if w.startswith("LRASPP_") else real(w),
    )
    path = weights_dir() / name
    path.parent.mkdir(parents=True)
    path.write_bytes(buffer.getvalue())
    model = create_model("lraspp_mobilenet_v3_large", pretrained=True).eval()
    assert model.maskworks_config["kwargs"] == {"num_classes": 21, "pretrained": True}
    x = torch.randn(1, 3, 57, 83)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x)["out"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_classes=5"):
        create_model("lraspp_mobilenet_v3_large", pretrained="coco_voc", num_classes=5)
