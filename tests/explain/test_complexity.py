"""Analytic attention / ViT MACs against the flop counter and the Swin paper; the complexity table and plot."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import maskworks.backbones.vit  # noqa: F401  (registers the ViT variants)
from maskworks.explain.complexity import (
    VARIANTS,
    attention_complexity,
    attention_macs,
    build_attention,
    complexity_table,
    count_attention_macs,
    num_patches,
    plot_complexity,
    vit_macs,
)
from maskworks.layers.vit_layers import capture_attention
from maskworks.registry import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_token_counts_and_the_quadratic_ratio():
    assert [num_patches(s, 16) for s in (224, 384, 512, 1024)] == [196, 576, 1024, 4096]
    assert (4096 / 196) ** 2 == pytest.approx(436.7, abs=0.05)  # not the seed's "43x"
    assert num_patches((224, 320), 16) == 14 * 20


def test_swin_paper_formulas():
    """Swin eqs. (1)-(2) at stage 1 of Swin-T: 56 x 56 tokens, C = 96, M = 7."""
    assert attention_macs("full", (56, 56), 96, 3) == 4 * 3136 * 96**2 + 2 * 3136**2 * 96 == 2_003_828_736
    assert attention_macs("window", (56, 56), 96, 3, window_size=7) == 145_108_992
    parts = attention_macs("window", 3136, 96, 3, window_size=7, breakdown=True)
    assert parts["qkv"] + parts["proj"] == 115_605_504 and parts["attention"] == 29_503_488


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (8, 8)])
def test_analytic_macs_equal_the_flop_counter(variant, grid):
    opts = {"window_size": 3, "num_features": 20, "sr_ratio": 2}
    module = build_attention(variant, 32, 4, **opts).eval()
    x = torch.randn(1, grid[0] * grid[1], 32)
    g = grid if variant in ("window", "pooled") else None
    assert count_attention_macs(module, x, g) == attention_macs(variant, grid, 32, 4, **opts)
    assert getattr(module, "fused_attn", True)  # restored after counting


def test_pooled_avg_and_ratio_one():
    assert attention_macs("pooled", 64, 32, 4, sr_ratio=1) == attention_macs("full", 64, 32, 4)
    module = build_attention("pooled", 32, 4, sr_ratio=2, pool="avg")
    count = count_attention_macs(module, torch.randn(1, 35, 32), (5, 7))
    assert count == attention_macs("pooled", (5, 7), 32, 4, sr_ratio=2, pool="avg")


def test_scaling_linear_for_windows_quadratic_for_full():
    small, big = (56, 56), (56, 112)
    w = [attention_macs("window", g, 96, 3, window_size=7) for g in (small, big)]
    assert w[1] / w[0] == pytest.approx(2.0, abs=0.01)
    a = [attention_macs("full", g, 96, 3, breakdown=True)["attention"] for g in (small, big)]
    assert a[1] / a[0] == pytest.approx(4.0, abs=0.01)
    for v in ("linear", "performer"):
        m = [attention_macs(v, g, 96, 3) for g in (small, big)]
        assert m[1] / m[0] == pytest.approx(2.0, abs=0.01)


def test_vit_macs_equal_counted_model_macs():
    from torch.utils.flop_counter import FlopCounterMode

    for name, size, patch, dim, depth in (
        ("vit_test_patch8", 32, 8, 32, 2),
        ("vit_tiny_patch16_224", 224, 16, 192, 12),
    ):
        model = create_model(name).eval()
        with torch.no_grad(), capture_attention(model), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, size, size))  # explicit attention: the matmuls are counted
        assert counter.get_total_flops() // 2 == vit_macs(size, patch, dim, depth)
    assert vit_macs(224, 16, 768, 12) == 17_563_828_224  # ViT-B/16, timm lists 17.6 GMACs


def test_vit_macs_match_timm():
    timm = pytest.importorskip("timm")
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() // 2 == vit_macs(224, 16, 192, 12)


def test_attention_complexity_rows_table_and_plot(tmp_path):
    rows = attention_complexity(16, 2, [16, (4, 8)], repeats=1, window_size=3)
    assert len(rows) == 2 * len(VARIANTS)
    assert [r["tokens"] for r in rows[:5]] == [16] * 5 and rows[5]["grid"] == [4, 8]
    for r in rows:
        assert r["time_ms"] > 0 and r["skipped"] is None
        assert r["macs"] == attention_macs(r["variant"], tuple(r["grid"]), 16, 2, window_size=3)
    assert rows[0]["macs_vs_full"] == 1.0
    table = complexity_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 32 | window |" in table
    assert plot_complexity(rows, tmp_path / "c.png").exists()
    analytic = attention_complexity(16, 2, [16, 64], variants=["full", "linear"], measure=False)
    assert all(r["time_ms"] is None and r["skipped"] == "not measured" for r in analytic)
    with Image.open(plot_complexity(analytic, tmp_path / "a.png")) as im:
        assert im.size[0] > 400
    guarded = attention_complexity(16, 2, [64], variants=["full", "linear"], repeats=1, max_memory_mib=0.01)
    assert guarded[0]["skipped"] and guarded[0]["time_ms"] is None and guarded[1]["time_ms"] is not None


def test_errors():
    with pytest.raises(ValueError, match="unknown attention variant"):
        attention_macs("flash", 16, 16, 2)
    with pytest.raises(ValueError, match="square grid"):
        attention_macs("window", 197, 16, 2)
    assert attention_macs("full", 197, 16, 2) == 4 * 197 * 256 + 2 * 197**2 * 16
    with pytest.raises(ValueError, match="divisible"):
        attention_macs("full", 16, 15, 2)
    with pytest.raises(ValueError, match="empty"):
        attention_complexity(16, 2, [])
    with pytest.raises(ValueError, match="empty"):
        plot_complexity([], "x.png")
