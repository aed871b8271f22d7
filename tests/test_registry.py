"""One registry: create_model, list_models, register_model."""

import pytest
import torch.nn as nn

import maskworks
from maskworks.registry import _REGISTRY, model_entry


def test_list_and_create():
    names = maskworks.list_models()
    assert {"unet", "unet_vanilla", "resnet18", "resnet34", "resnet50", "resnet101"} <= set(names)
    assert names == sorted(names)
    assert maskworks.list_models("resnet*", kind="backbone") == ["resnet101", "resnet18", "resnet34", "resnet50"]
    assert "unet" not in maskworks.list_models(kind="backbone")
    m = maskworks.create_model("unet", encoder="resnet18", num_classes=3)
    assert m.maskworks_config == {"name": "unet", "kwargs": {"encoder": "resnet18", "num_classes": 3}}


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean: .*resnet34"):
        maskworks.create_model("resnet43")
    with pytest.raises(ValueError, match="unknown model 'zzz'"):
        maskworks.create_model("zzz")


def test_register_refuses_duplicates():
    @maskworks.register_model(name="_test_tiny")
    def _tiny(**kw):
        return nn.Identity()

    try:
        assert model_entry("_test_tiny").kind == "model"
        with pytest.raises(ValueError, match="already registered"):
            maskworks.register_model(_tiny, name="_test_tiny")
    finally:
        del _REGISTRY["_test_tiny"]
