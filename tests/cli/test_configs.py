"""Every recipe in configs/ parses, and its model section builds the registered model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskworks.cli import builders
from maskworks.cli.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_is_a_camvid_recipe_for_every_semantic_model():
    from maskworks.testing import semantic_models_to_test

    names = {p.stem.removeprefix("camvid_") for p in CONFIGS if p.stem.startswith("camvid_")}
    # size variants (upernet_swin_tiny, segformer_b2, ...) are covered by their family's recipes
    assert {"upernet", "upernet_convnext_tiny", "segformer_b0", "segformer_b2"} <= names
    assert set(semantic_models_to_test()) - {"unet_vanilla"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_builds_its_model(path):
    cfg = load_config(path)
    # published weights are not fetched here (no network in tests): the recipe's architecture is what is checked
    spec = {k: v for k, v in cfg["model"].items() if k not in ("encoder_weights", "pretrained")}
    if builders.model_task(spec["name"]) == "instance":  # a list of images in, one dict of instances per image out
        if "min_size" in spec:  # Mask R-CNN resizes inside the model: the architecture, at a test size
            spec = {**spec, "min_size": 64, "max_size": 96}
        model = builders.build_model(spec, num_classes=3, in_channels=3).eval()
        with torch.no_grad():
            (out,) = model([torch.rand(3, 64, 96)])
        assert {"boxes", "labels", "scores", "masks"} <= set(out) and out["masks"].shape[-2:] == (64, 96)
        return
    model = builders.build_model(spec, num_classes=11, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 11, 64, 96)
