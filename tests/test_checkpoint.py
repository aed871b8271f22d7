"""Model checkpoints: safetensors + JSON recipe, atomic writes."""

import json

import pytest
import torch

from maskworks import create_model, load_model, save_model


def test_round_trip(tmp_path):
    m = create_model("unet_vanilla", num_classes=3, features=(8, 16)).eval()
    path = save_model(m, tmp_path / "ck", meta={"class_names": ["a", "b", "c"], "mean": (0.5,)})
    assert path.name == "ck.safetensors"
    recipe = json.loads((tmp_path / "ck.json").read_text())
    assert recipe["model"] == "unet_vanilla" and recipe["kwargs"]["features"] == [8, 16]
    m2 = load_model(tmp_path / "ck.safetensors")
    x = torch.randn(1, 3, 33, 35)
    torch.testing.assert_close(m(x), m2(x))
    assert m2.maskworks_meta["class_names"] == ["a", "b", "c"]
    assert not list(tmp_path.glob("*.tmp"))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="create_model"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_model(tmp_path / "nothere.safetensors")
    m = create_model("unet_vanilla", num_classes=2, features=(8, 16))
    save_model(m, tmp_path / "y")
    (tmp_path / "y.json").write_text(
        json.dumps({"model": "unet_vanilla", "kwargs": {"num_classes": 5, "features": [8, 16]}})
    )
    with pytest.raises((ValueError, RuntimeError)):
        load_model(tmp_path / "y.safetensors")
