"""The timing harness: interleaved comparison, ratios, MAC counting, machine limits, `maskworks bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from maskworks.bench import PAIRS, compare, count_macs, matmul_gflops
from maskworks.cli.main import main


def test_toy_pair_doing_twice_the_work_has_ratio_two():
    a = torch.randn(384, 384)
    b = torch.randn(384, 384)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def once():
            return a @ b

        def twice():
            a @ b
            return a @ b

        result = compare({"twice": twice, "once": once}, warmup=2, repeats=9, inner=3, memory=False)
    finally:
        torch.set_num_threads(threads)
    ratio = result.ratio("twice", "once")
    assert 1.6 < ratio < 2.5, ratio
    assert result.timings["once"].iqr >= 0
    assert "| twice |" in result.markdown(baseline="once")


def test_interleaving_alternates_the_order():
    calls = []
    compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=0, repeats=3, memory=False)
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_peak_memory_sees_a_large_allocation():
    # In a fresh process: after thousands of tests the heap state of this one decides how much of a new allocation
    # shows as resident growth (one full-suite run measured 0 MiB here), which is not what this test is about.
    code = (
        "import torch; from maskworks.bench import compare; "
        "r = compare({'big': lambda: torch.ones(64, 2**20)}, warmup=0, repeats=1); "  # 256 MiB
        "print(r.timings['big'].peak_mib)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[-1] == "None":
        pytest.skip("resident-memory high-water mark not available on this platform")
    peak = float(out[-1])
    assert 200 < peak < 400, peak


def test_count_macs_of_a_convolution_and_linear():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, torch.randn(2, 3, 10, 12)) == 2 * 8 * 3 * 9 * 10 * 12
    lin = torch.nn.Linear(16, 4)
    assert count_macs(lin, torch.randn(5, 16)) == 5 * 16 * 4


def test_machine_limit_is_positive():
    assert matmul_gflops(n=256, repeats=2) > 0.1


def test_bad_arguments():
    with pytest.raises(ValueError, match="fns is empty"):
        compare({})
    with pytest.raises(ValueError, match="repeats >= 1"):
        compare({"a": lambda: None}, repeats=0)


def test_cli_bench_writes_table_and_json(tmp_path, capsys):
    pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "unet_resnet18",
            "--size",
            "64",
            "64",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--mode",
            "both",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| unet_resnet18 | smp Unet | eval |" in text and "| unet_resnet18 | smp Unet | train |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["eval", "train"]
    assert all(r["ratio"] > 0 and r["gmacs"] > 0 for r in rows)


def test_cli_bench_unknown_pair(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown pair" in capsys.readouterr().err


def test_every_pair_names_a_registered_model():
    from maskworks.registry import is_model

    missing = [p.model for p in PAIRS.values() if not is_model(p.model)]
    # ViT pairs join when the ViT family is registered
    assert all(m.startswith("vit_") for m in missing), missing


def test_count_macs_sees_attention_on_the_fused_path():
    from maskworks import create_model
    from maskworks.explain import vit_macs

    model = create_model("vit_test_patch8")
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    macs = count_macs(model, torch.randn(1, 3, 32, 32))
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))  # flags restored
    expected = vit_macs(img_size=32, patch=8, dim=32, depth=2, mlp_ratio=4.0, num_classes=1000)
    assert macs == expected
