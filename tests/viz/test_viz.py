"""maskworks.viz: exact colours, label-PNG round trip, plot files and the HTML report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks.viz import (
    colorize,
    default_palette,
    denormalize,
    make_grid,
    overlay,
    plot_confusion_matrix,
    plot_training_curves,
    save_label_png,
    save_rgb_png,
    write_html_report,
)

PALETTE = [(10, 20, 30), (40, 50, 60), (200, 100, 0)]
MASK = np.array([[0, 1], [2, 255]], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- render
def test_default_palette_distinct_deterministic_dark_background():
    pal = default_palette(256)
    assert len(pal) == 256 and len(set(pal)) == 256
    assert pal == default_palette(256)
    assert pal[0] == (0, 0, 0)
    assert pal[1:4] == [(128, 0, 0), (0, 128, 0), (128, 128, 0)]  # PASCAL VOC colour map
    assert all(isinstance(c, int) and 0 <= c <= 255 for rgb in pal for c in rgb)
    assert default_palette(0) == []
    with pytest.raises(ValueError, match="-1"):
        default_palette(-1)


def test_colorize_exact_colours():
    out = colorize(MASK, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, [[(10, 20, 30), (40, 50, 60)], [(200, 100, 0), (0, 0, 0)]])
    out = colorize(torch.from_numpy(MASK).long(), PALETTE, ignore_color=(255, 0, 255))
    np.testing.assert_array_equal(out[1, 1], (255, 0, 255))
    with pytest.raises(ValueError, match=r"\[3\]"):
        colorize(np.array([[0, 3]]), PALETTE)


def test_overlay_exact_blend_and_layouts():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    out = overlay(image, MASK, PALETTE, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    expected = np.array([[(55, 60, 65), (70, 75, 80)], [(150, 100, 50), (100, 100, 100)]])  # ignore keeps image
    np.testing.assert_array_equal(out, expected)
    chw = torch.from_numpy(image).permute(2, 0, 1)  # (3, H, W) tensor
    np.testing.assert_array_equal(overlay(chw, MASK, PALETTE, alpha=0.5), expected)
    np.testing.assert_array_equal(overlay(image, MASK, PALETTE, alpha=0.0), image)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((3, 2), dtype=np.int64), PALETTE)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, MASK, PALETTE, alpha=1.5)


def test_denormalize_and_overlay_of_normalised_tensor():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]  # (3, H, W) normalised
    back = denormalize(x, mean, std)
    assert back.dtype == np.uint8 and back.shape == (5, 7, 3)
    np.testing.assert_array_equal(back, rgb)
    mask = rng.integers(0, 3, (5, 7))
    np.testing.assert_array_equal(overlay(x, mask, PALETTE, mean=mean, std=std), overlay(rgb, mask, PALETTE))
    gray = denormalize(x[:1], [0.485], [0.229])
    assert gray.shape == (5, 7, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_label_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 3, (6, 9)).astype(np.uint8)
    mask[0, :3] = 255
    path = save_label_png(mask, tmp_path / "sub" / "label.png", PALETTE)
    with Image.open(path) as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img), mask)
        pal = img.getpalette()
    assert [tuple(pal[3 * i : 3 * i + 3]) for i in range(3)] == PALETTE
    with pytest.raises(ValueError, match="256"):
        save_label_png(np.array([[0, 256]]), tmp_path / "bad.png", PALETTE)


def test_rgb_png_and_grid(tmp_path):
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    path = save_rgb_png(img, tmp_path / "rgb.png")
    with Image.open(path) as back:
        assert back.mode == "RGB"
        np.testing.assert_array_equal(np.array(back), img)
    grid = make_grid([img, colorize(MASK, PALETTE), img[..., 0]], ncol=3, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 + 4 + 2, 2 + 3 * (5 + 2), 3)
    np.testing.assert_array_equal(grid[2:6, 2:7], img)
    np.testing.assert_array_equal(grid[2:4, 9:11], colorize(MASK, PALETTE))
    assert make_grid([img] * 4, ncol=3).shape[0] == 2 + 2 * (4 + 2)  # two rows
    with pytest.raises(ValueError, match="ncol"):
        make_grid([img], ncol=0)


# ---------------------------------------------------------------------------------------------- plots
def _assert_png(path, min_side=200):
    assert path.stat().st_size > 5_000
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= min_side
        assert np.array(img.convert("L")).std() > 5  # not a blank canvas


def test_training_curves_png(tmp_path):
    history = [
        {"epoch": 1, "step": 50, "loss": 1.2, "lr": 1e-3},  # step rows and epoch rows mixed
        {"epoch": 1, "step": 100, "train_loss": 0.9, "val_miou": 0.31, "val_pixel_acc": 0.6, "lr": 1e-3},
        {"epoch": 2, "step": 200, "train_loss": 0.6, "val_miou": 0.45, "lr": 5e-4, "note": "text"},
        {"epoch": 3, "train_loss": 0.5, "val_miou": float("nan"), "lr": 1e-4},
    ]
    path = plot_training_curves(history, tmp_path / "curves.png")
    _assert_png(path)
    _assert_png(plot_training_curves([{"epoch": 1, "train_loss": 0.3}], tmp_path / "one.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "none.png")


def test_confusion_matrix_png(tmp_path):
    matrix = torch.tensor([[50, 3, 0], [4, 20, 1], [0, 0, 0]])
    for normalize in ("true", "pred", "all", None):
        _assert_png(
            plot_confusion_matrix(matrix, ["bg", "cat", "dog"], tmp_path / f"cm_{normalize}.png", normalize=normalize)
        )
    with pytest.raises(ValueError, match="normalize"):
        plot_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "x.png", normalize="rows")
    with pytest.raises(ValueError, match="class_names"):
        plot_confusion_matrix(matrix, ["a", "b"], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------- report
def test_html_report_contents_and_escaping(tmp_path):
    metrics = {
        "miou": 0.5123,
        "pixel_acc": 0.9,
        "num_pixels": 1234,
        "iou": [0.9, float("nan"), 0.1234],
        "dice": [0.95, float("nan"), 0.2],
        "class_names": ["road", "<script>alert(1)</script>", "sky & sea"],
        "history": [{"epoch": 1}],
    }
    path = write_html_report(
        tmp_path / "report.html",
        "Run <1>",
        metrics,
        images=[("val 0: image | truth | prediction", "predictions/val_00.png")],
        curves_png="training_curves.png",
    )
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    assert "road" in text and "sky &amp; sea" in text
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Run &lt;1&gt;" in text
    assert 'src="predictions/val_00.png"' in text and 'src="training_curves.png"' in text
    assert "0.5123" in text and "0.1234" in text and "n/a" in text
    assert "1,234" in text
    no_table = write_html_report(tmp_path / "r2.html", "t", metrics, per_class_table=False).read_text()
    assert "road" not in no_table


def test_reliability_diagram_png(tmp_path):
    import torch
    from PIL import Image

    from maskworks.metrics import Calibration
    from maskworks.viz import plot_reliability

    cal = Calibration(3, from_logits=True)
    cal.update(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 16, 16).long())
    path = plot_reliability(cal.compute(), tmp_path / "sub" / "reliability.png")
    assert path.exists() and Image.open(path).size[0] > 100
    with pytest.raises(ValueError, match="reliability"):
        plot_reliability({"ece": 0.1}, tmp_path / "x.png")
