"""Measured MACs of whole models (Q33): Swin grows linearly with the token count, ViT's attention quadratically."""

from __future__ import annotations

import json

import pytest

from maskworks.cli.main import main
from maskworks.explain.complexity import model_macs, model_scaling, vit_macs


def test_vit_measured_macs_equal_the_analytic_count():
    measured = model_macs("vit_base_patch16_224", 224)
    assert measured["macs"] == vit_macs(224, 16, 768, 12, num_classes=1000)  # 17.56 G
    t, d, depth = 197, 768, 12
    assert measured["attention_macs"] == depth * 2 * t * t * d  # Q K^T and A V of every block


def test_swin_is_linear_and_vit_attention_quadratic_in_tokens():
    rows = {(r["model"], r["img_size"]): r for r in model_scaling(img_sizes=(224, 448))}
    swin, swin2 = rows[("swin_tiny_patch4_window7_224", 224)], rows[("swin_tiny_patch4_window7_224", 448)]
    assert swin["macs"] == pytest.approx(4.49e9, rel=1e-3)  # timm lists 4.5 GMACs
    assert swin2["macs"] == 4 * swin["macs"] and swin2["attention_macs"] == 4 * swin["attention_macs"]
    vit2 = rows[("vit_base_patch16_224", 448)]
    assert vit2["attention_macs"] == 12 * 2 * 785**2 * 768  # 4x the tokens (+ class token): ~16x the attention
    assert 15.8 < vit2["attention_growth"] < 16 and 4.4 < vit2["growth"] < 4.6


def test_cli_models_mode(tmp_path, capsys):
    assert (
        main(
            [
                "complexity",
                "--models",
                "swin_tiny_patch4_window7_224",
                "--img-sizes",
                "64",
                "128",
                "--out",
                str(tmp_path / "cx"),
            ]
        )
        == 0
    )
    assert "swin_tiny_patch4_window7_224" in capsys.readouterr().out
    rows = json.loads((tmp_path / "cx" / "model_macs.json").read_text())["rows"]
    assert [r["img_size"] for r in rows] == [64, 128] and 3 < rows[1]["growth"] < 5
