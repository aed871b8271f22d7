"""``pretrain-mae``: a tiny MAE pre-training run on random PNGs, its outputs, resume and folder errors."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import maskworks.backbones.vit  # noqa: F401  (registers the encoder's ViT)
from maskworks.checkpoint import load_model
from maskworks.cli.mae import add_parser, find_images, mae_learning_rate
from maskworks.models.mae import MaskedAutoencoderViT


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maskworks")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["pretrain-mae", *argv])


def tiny_args(images: Path, out: Path, *extra: str) -> argparse.Namespace:
    return parse(
        "--images",
        str(images),
        "--model",
        "mae_vit_test_patch8",
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--warmup-epochs",
        "1",
        "--lr",
        "1e-3",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / "sub" if i % 2 else root  # recursive search
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_defaults_follow_mae():
    args = parse("--images", "x")
    assert (args.model, args.mask_ratio, args.blr, args.weight_decay, args.norm_pix_loss, args.lr) == (
        "mae_vit_base_patch16",
        0.75,
        1.5e-4,
        0.05,
        True,
        None,
    )
    assert parse("--images", "x", "--no-norm-pix-loss").norm_pix_loss is False
    # warm-up then half-cosine, per fractional epoch
    assert mae_learning_rate(0.5, 1.0, 0.0, 1, 3) == 0.5
    assert mae_learning_rate(1.0, 1.0, 0.0, 1, 3) == 1.0
    assert mae_learning_rate(2.0, 1.0, 0.1, 1, 3) == pytest.approx(0.55)


def test_pretrain_writes_outputs_and_resumes_exactly(images, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(images, out, "--epochs", "2")
    assert args.func(args) == 0
    for name in ("mae.safetensors", "mae.json", "encoder.safetensors", "encoder.json", "last.pt"):
        assert (out / name).is_file(), name
    rows = history(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    for epoch in (1, 2):
        grid = Image.open(out / f"recon_epoch{epoch:03d}.png")
        assert grid.size[0] > 4 * 96 and grid.size[1] > 4 * 96  # 4 images x 4 columns of 96 px tiles

    mae = load_model(out / "mae.safetensors")
    assert isinstance(mae, MaskedAutoencoderViT) and mae.norm_pix_loss and mae.maskworks_meta["epoch"] == 2
    vit = load_model(out / "encoder.safetensors")  # a VisionTransformer without head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        latent, _, _ = mae.forward_encoder(x, 0.0, noise=torch.arange(16.0).expand(2, -1))
        torch.testing.assert_close(vit.forward_features(x), latent, atol=1e-5, rtol=0)
    assert json.loads((out / "encoder.json").read_text())["model"] == "vit_test_patch8"

    # resume continues the epoch count
    resumed = tiny_args(images, out, "--epochs", "3", "--resume")
    assert resumed.func(resumed) == 0
    assert [r["epoch"] for r in history(out)] == [1, 2, 3]
    assert load_model(out / "mae.safetensors").maskworks_meta["epoch"] == 3


def test_resume_after_a_crash_equals_the_uninterrupted_run(images, tmp_path, monkeypatch):
    import maskworks.cli.mae as cli_mae

    grid = cli_mae._reconstruction_grid
    calls = []

    def crash_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after epoch 3's weights, before its training state is saved
            raise KeyboardInterrupt
        return grid(*args, **kwargs)

    out = tmp_path / "crashed"
    args = tiny_args(images, out, "--epochs", "3")
    monkeypatch.setattr(cli_mae, "_reconstruction_grid", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        args.func(args)
    monkeypatch.setattr(cli_mae, "_reconstruction_grid", grid)
    assert [r["epoch"] for r in history(out)] == [1, 2]
    resumed = tiny_args(images, out, "--epochs", "3", "--resume")
    assert resumed.func(resumed) == 0

    straight_out = tmp_path / "straight"
    straight = tiny_args(images, straight_out, "--epochs", "3")
    assert straight.func(straight) == 0
    a, b = load_file(out / "mae.safetensors"), load_file(straight_out / "mae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in history(out)] == [r["loss"] for r in history(straight_out)]


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    (empty / "readme.md").write_text("no images here")
    args = tiny_args(empty, tmp_path / "out", "--epochs", "1")
    with pytest.raises(ValueError, match=f"no images found under --images folder {re.escape(str(empty))}"):
        args.func(args)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        find_images(missing)


def test_argument_errors(images, tmp_path):
    args = tiny_args(images, tmp_path / "out", "--epochs", "1", "--resume")
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        args.func(args)
    args = tiny_args(images, tmp_path / "out", "--epochs", "1", "--mask-ratio", "1.0")
    with pytest.raises(ValueError, match="mask_ratio"):
        args.func(args)


def test_a_finished_run_is_kept_unless_resumed_or_overwritten_and_resume_refuses_changed_settings(images, tmp_path):
    from maskworks.cli.config import ConfigError

    out = tmp_path / "mae"
    args = tiny_args(images, out, "--epochs", "1")
    assert args.func(args) == 0
    history, last = (out / "history.jsonl").read_bytes(), (out / "last.pt").read_bytes()
    again = tiny_args(images, out, "--epochs", "1")
    with pytest.raises(ConfigError, match="already holds a run.*--overwrite"):
        again.func(again)
    changed = tiny_args(images, out, "--epochs", "2", "--resume", "--mask-ratio", "0.5")
    with pytest.raises(ConfigError, match="--mask-ratio: 0.75 -> 0.5"):
        changed.func(changed)
    assert (out / "history.jsonl").read_bytes() == history and (out / "last.pt").read_bytes() == last
    fresh = tiny_args(images, out, "--epochs", "1", "--overwrite")
    assert fresh.func(fresh) == 0
