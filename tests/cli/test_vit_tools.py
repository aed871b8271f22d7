"""``maskworks complexity`` and ``maskworks attention`` through their own argparse parser."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import maskworks.backbones.vit  # noqa: F401  (registers the ViT variants)
from maskworks.checkpoint import save_model
from maskworks.cli.vit_tools import add_parsers
from maskworks.registry import create_model

torch.set_num_threads(1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskworks")
    add_parsers(parser.add_subparsers(dest="command"))
    return parser


def run(*argv: str) -> int:
    args = _parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("square", (32, 32)), ("wide", (30, 45))):
        p = tmp_path / "imgs" / f"{name}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("cmd", ["complexity", "attention"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 300


# --------------------------------------------------------------------------------------------- complexity
def test_complexity_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "cx"
    assert run("complexity", "--dim", 32, "--heads", 4, "--tokens", 16, 64, "--repeats", 1, "--out", out) == 0
    table = capsys.readouterr().out
    assert "| 16 | full |" in table and "| 64 | performer |" in table
    report = json.loads((out / "complexity.json").read_text())
    rows = report["rows"]
    assert len(rows) == 10 and {r["variant"] for r in rows} == {"full", "linear", "window", "performer", "pooled"}
    full64 = next(r for r in rows if r["variant"] == "full" and r["tokens"] == 64)
    assert full64["macs"] == 4 * 64 * 32**2 + 2 * 64**2 * 32
    assert all(r["time_ms"] is not None and r["time_ms"] > 0 and r["skipped"] is None for r in rows)
    assert "MACs" in report["unit"] and report["machine"]["device"] == "cpu"
    with Image.open(out / "complexity.png") as im:
        assert im.size[0] > 400


def test_complexity_img_sizes_no_measure_and_memory_guard(tmp_path, capsys):
    out = tmp_path / "cx"
    argv = [
        "complexity",
        "--dim",
        16,
        "--heads",
        2,
        "--img-sizes",
        32,
        64,
        "--patch",
        8,
        "--variants",
        "full",
        "window",
    ]
    assert run(*argv, "--no-measure", "--out", out) == 0
    rows = json.loads((out / "complexity.json").read_text())["rows"]
    assert [r["tokens"] for r in rows] == [16, 16, 64, 64] and all(r["time_ms"] is None for r in rows)
    assert run(*argv, "--repeats", 1, "--max-memory-mib", 0.0005, "--out", out) == 0
    rows = json.loads((out / "complexity.json").read_text())["rows"]
    big_full = next(r for r in rows if r["variant"] == "full" and r["tokens"] == 64)
    assert big_full["time_ms"] is None and "max_memory_mib" in big_full["skipped"]
    assert "max_memory_mib" in capsys.readouterr().out


def test_complexity_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of --heads"):
        run("complexity", "--dim", 30, "--heads", 4, "--no-measure", "--out", tmp_path)
    with pytest.raises(ValueError, match="square grid"):
        run("complexity", "--dim", 16, "--heads", 2, "--tokens", 197, "--no-measure", "--out", tmp_path)
    with pytest.raises(ValueError, match="not both"):
        run("complexity", "--tokens", 16, "--img-sizes", 32, "--out", tmp_path)
    with pytest.raises(SystemExit):
        _parser().parse_args(["complexity", "--variants", "flash"])


# --------------------------------------------------------------------------------------------- attention
def test_attention_with_random_weights_warns_and_writes_maps(tmp_path, images, caplog, capsys):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="maskworks"):
        assert run("attention", *images, "--model", "vit_test_patch8", "--out", out, "--device", "cpu") == 0
    assert "random weights" in caplog.text
    for p in images:
        with Image.open(out / f"{p.stem}_rollout.png") as im, Image.open(p) as src:
            assert im.size == src.size and im.mode == "RGB"  # overlay at the original image size
        assert (out / f"{p.stem}_heads.png").stat().st_size > 1000
    assert "2 image(s)" in capsys.readouterr().out


def test_attention_from_checkpoints(tmp_path, images):
    torch.manual_seed(0)
    model = create_model("vit_test_patch8", num_classes=3)
    ckpt = save_model(model, tmp_path / "ckpt" / "vit")
    raw = tmp_path / "vit_timm_layout.pth"
    torch.save(model.state_dict(), raw)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run("attention", images[0], "--checkpoint", ckpt, "--out", a, "--device", "cpu") == 0
    assert run("attention", images[0], "--checkpoint", raw, "--model", "vit_test_patch8", "--out", b) == 0
    rollout_a = np.asarray(Image.open(a / "square_rollout.png"))
    np.testing.assert_array_equal(rollout_a, np.asarray(Image.open(b / "square_rollout.png")))  # same weights
    # another input size: the stored position table is resampled on the fly
    assert run("attention", images[1], "--checkpoint", ckpt, "--img-size", 48, "--head-fusion", "max",
               "--discard-ratio", 0.5, "--out", c) == 0  # fmt: skip
    assert (c / "wide_rollout.png").exists() and (c / "wide_heads.png").exists()
    # a timm-layout state dict at another size: position table resampled by load_weights(source="timm")
    d = tmp_path / "d"
    assert run("attention", images[1], "--checkpoint", raw, "--model", "vit_test_patch8", "--img-size", 48,
               "--out", d) == 0  # fmt: skip
    assert (d / "wide_rollout.png").exists()
    with pytest.raises(ValueError, match="does not fit"):
        run("attention", images[0], "--checkpoint", raw, "--model", "vit_test_patch16", "--out", d)


def test_attention_from_a_timm_checkpoint(tmp_path, images):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7)
    path = tmp_path / "timm_vit_tiny.pth"
    torch.save(ref.state_dict(), path)
    out = tmp_path / "timm"
    argv = ["attention", images[0], "--checkpoint", path, "--model", "vit_tiny_patch16_224", "--img-size", 96]
    assert run(*argv, "--out", out) == 0
    assert (out / "square_heads.png").exists()


def test_attention_with_two_prefix_tokens(tmp_path, images):
    import maskworks.backbones.deit  # noqa: F401

    out = tmp_path / "deit"
    assert run("attention", images[0], "--model", "deit_test_distilled_patch16", "--out", out) == 0
    assert (out / "square_rollout.png").exists()


def test_attention_errors(tmp_path, images):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        run("attention", images[0], tmp_path / "missing.png", "--model", "vit_test_patch8", "--out", tmp_path)
    with pytest.raises(ValueError, match="no maskworks Attention"):
        run("attention", images[0], "--model", "resnet18", "--out", tmp_path)
    with pytest.raises(ValueError, match="give --model"):
        run("attention", images[0], "--out", tmp_path)
    ckpt = save_model(create_model("vit_test_patch8", num_classes=3), tmp_path / "vit")
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        run("attention", images[0], "--checkpoint", ckpt, "--model", "vit_test_patch16", "--out", tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run("attention", images[0], "--checkpoint", tmp_path / "nope.pth", "--model", "vit_test_patch8")
    with pytest.raises(ValueError, match="discard-ratio"):
        run("attention", images[0], "--model", "vit_test_patch8", "--discard-ratio", 1.0)
