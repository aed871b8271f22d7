"""torchvision detection checkpoints -> maskworks Mask R-CNN (maskworks.convert.detection, load_weights)."""

from __future__ import annotations

import pytest
import torch

import maskworks.convert.load as convert_load
from maskworks.convert import load_weights
from maskworks.convert.detection import (
    convert_torchvision_detection,
    is_torchvision_detection_state_dict,
    is_torchvision_mask_rcnn_state_dict,
)
from maskworks.models.instance.mask_rcnn import mask_rcnn
from maskworks.testing import randomize_norms

OPTS = {"min_size": 64, "max_size": 96, "box_detections_per_img": 5, "rpn_post_nms_top_n_test": 50}
# True once convert/load.py routes torchvision detection checkpoints through convert_torchvision_detection
WIRED = hasattr(convert_load, "convert_torchvision_detection")


def _legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key layout of torchvision checkpoints saved before Conv2dNormActivation (FPN and mask head)."""
    out = {}
    for key, value in state_dict.items():
        for block in ("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks."):
            if key.startswith(block) and key.count(".") == 5:  # backbone.fpn.inner_blocks.{i}.0.{weight,bias}
                i, _, kind = key[len(block) :].split(".")
                key = f"{block}{i}.{kind}"
        if key.startswith("roi_heads.mask_head."):
            i, _, kind = key[len("roi_heads.mask_head.") :].split(".")
            key = f"roi_heads.mask_head.mask_fcn{int(i) + 1}.{kind}"
        out[key] = value
    return out


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model([x])[0]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = randomize_norms(mask_rcnn("resnet18", num_classes=3, box_score_thresh=0.0, **OPTS), seed=3)
    x = torch.randn(3, 64, 80)
    return model.state_dict(), x, _outputs(model, x)


def _assert_loaded(model, state_dict):
    own = model.state_dict()
    assert own.keys() == state_dict.keys()
    assert all(torch.equal(own[k], v) for k, v in state_dict.items())


def _assert_same(got, expected):
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(got[key], expected[key]), key


def test_detection_state_dict_recognised(reference):
    state_dict, _, _ = reference
    assert is_torchvision_detection_state_dict(state_dict) and is_torchvision_mask_rcnn_state_dict(state_dict)
    assert not is_torchvision_detection_state_dict({"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": 0})
    faster = {k: v for k, v in state_dict.items() if not k.startswith("roi_heads.mask_")}
    assert is_torchvision_detection_state_dict(faster) and not is_torchvision_mask_rcnn_state_dict(faster)


def test_legacy_key_layout_converted(reference):
    state_dict, x, expected = reference
    legacy = _legacy(state_dict)
    assert "backbone.fpn.inner_blocks.0.weight" in legacy and "roi_heads.mask_head.mask_fcn1.weight" in legacy
    converted, dropped = convert_torchvision_detection(legacy)
    assert converted.keys() == state_dict.keys() and not dropped
    model = mask_rcnn("resnet18", num_classes=3, box_score_thresh=0.0, **OPTS)
    model.load_state_dict(converted, strict=True)
    _assert_same(_outputs(model, x), expected)


def test_other_class_count_drops_class_specific_predictors(reference):
    state_dict, _, _ = reference
    target = mask_rcnn("resnet18", num_classes=5, **OPTS)
    converted, dropped = convert_torchvision_detection(state_dict, model=target)
    assert sorted(dropped) == sorted(
        k for k in state_dict if k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits"))
    )
    result = target.load_state_dict(converted, strict=False)
    assert sorted(result.missing_keys) == sorted(dropped) and not result.unexpected_keys


def test_input_channels_adapted(reference):
    state_dict, _, _ = reference
    converted, _ = convert_torchvision_detection(state_dict, in_channels=1)
    stem = "backbone.body.conv1.weight"
    torch.testing.assert_close(converted[stem], state_dict[stem].sum(dim=1, keepdim=True))
    gray = mask_rcnn("resnet18", num_classes=3, in_channels=1, **OPTS)
    gray.load_state_dict(converted, strict=True)


@pytest.mark.parametrize("source", ["torchvision", "auto"])
@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_load_weights(reference, source, layout):
    state_dict, _, _ = reference
    model = mask_rcnn("resnet18", num_classes=3, **OPTS)
    checkpoint = state_dict if layout == "current" else _legacy(state_dict)
    result = load_weights(model, checkpoint, source=source, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_loaded(model, state_dict)


@pytest.mark.skipif(not WIRED, reason="convert/load.py does not route detection checkpoints yet")
@pytest.mark.parametrize("source", ["torchvision", "auto"])
def test_load_weights_adapts_channels_and_classes(reference, source):
    """Needs the detection lines in maskworks/convert/load.py (CONVERTERS / _detect_source)."""
    state_dict, _, _ = reference
    assert convert_load._detect_source(state_dict) == "torchvision"
    gray = mask_rcnn("resnet18", num_classes=3, in_channels=1, **OPTS)
    load_weights(gray, state_dict, source=source, strict=True)
    torch.testing.assert_close(
        gray.backbone.body.conv1.weight, state_dict["backbone.body.conv1.weight"].sum(dim=1, keepdim=True)
    )
    five = mask_rcnn("resnet18", num_classes=5, **OPTS)
    result = load_weights(five, state_dict, source=source)
    assert all(k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.")) for k in result.missing_keys)
