"""Every recipe in configs/ parses, and its model section builds the registered model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskworks.cli import builders
from maskworks.cli.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_is_a_camvid_recipe_for_every_semantic_model():
    from maskworks import list_models
    from maskworks.registry import model_entry

    names = {p.stem.removeprefix("camvid_") for p in CONFIGS if p.stem.startswith("camvid_")}
    semantic = {n for n in list_models(kind="model") if model_entry(n).task == "semantic"}
    # upernet_swin_tiny, upernet_convnext_base, ...: upernet with a fixed encoder, covered by the upernet recipes
    aliases = {n for n in semantic if n.startswith("upernet_")}
    assert {"upernet", "upernet_convnext_tiny"} <= names
    assert semantic - {"unet_vanilla"} - aliases <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_builds_its_model(path):
    cfg = load_config(path)
    # published weights are not fetched here (no network in tests): the recipe's architecture is what is checked
    spec = {k: v for k, v in cfg["model"].items() if k not in ("encoder_weights", "pretrained")}
    model = builders.build_model(spec, num_classes=11, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 11, 64, 96)
