"""Memory-bounded large-image prediction: equality with whole-image sliding window, file formats, errors, crash
safety and peak memory measured in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from maskworks.data.io import IMAGENET_MEAN, IMAGENET_STD
from maskworks.inference.large import predict_large_image, rows_to_tensor
from maskworks.inference.sliding import sliding_window

REPO = Path(__file__).resolve().parents[2]


def tiny_net(in_channels: int = 3, classes: int = 4, seed: int = 0) -> nn.Module:
    """Two 3x3 convolutions (receptive-field radius 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, classes, 3, padding=1)).eval()


def reference(net, pixels: np.ndarray, mean, std, **kwargs) -> torch.Tensor:
    """Whole-image sliding window on the same normalised pixels: ``(K, H, W)``."""
    rows = pixels if pixels.ndim == 3 else pixels[..., None]
    x = rows_to_tensor(rows, mean, std)
    return sliding_window(net, x, **kwargs)[0]


def check_outputs(result, ref: torch.Tensor, activation=None) -> None:
    """Labels equal the argmax of the reference (except at near-ties); probabilities within one 8-bit step."""
    labels = np.load(result.labels)
    probs_ref = ref if activation else ref.softmax(0)
    expected = ref.argmax(0).numpy()
    top2 = probs_ref.topk(2, dim=0).values
    clear = (top2[0] - top2[1]).numpy() > 1e-5
    assert labels.shape == expected.shape
    assert (labels == expected)[clear].all()
    if result.probs is not None:
        probs = np.load(result.probs)
        assert probs.dtype == np.uint8 and probs.shape == tuple(ref.shape)
        assert np.abs(probs.astype(int) - np.rint(probs_ref.numpy() * 255).astype(int)).max() <= 1


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "options",
    [
        {"window": 128, "overlap": 0.25},
        {"window": (96, 160), "overlap": 0.5, "blend": "constant", "batch_size": 3},
        {"window": 100, "overlap": 0.0, "margin": 2, "activation": "softmax"},
    ],
)
def test_equals_sliding_window_on_700x900(tmp_path, rgb, options):
    net = tiny_net()
    np.save(tmp_path / "img.npy", rgb)
    out = predict_large_image(
        net, tmp_path / "img.npy", tmp_path / "pred.npy", num_classes=4, save_probs=True, **options
    )
    assert out.labels == tmp_path / "pred.npy" and out.probs == tmp_path / "pred_probs.npy" and out.png is None
    check_outputs(out, reference(net, rgb, IMAGENET_MEAN, IMAGENET_STD, **options), options.get("activation"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.npy", "pred.npy", "pred_probs.npy"]


def _write_sources(folder: Path, pixels: np.ndarray) -> dict[str, object]:
    tifffile = pytest.importorskip("tifffile")
    sources: dict[str, object] = {"array": pixels, "png": folder / "img.png"}
    Image.fromarray(pixels).save(folder / "img.png")
    tifffile.imwrite(folder / "raw.tif", pixels)
    tifffile.imwrite(folder / "tiled.tif", pixels, tile=(64, 64), compression="zlib")
    tifffile.imwrite(folder / "strips.tif", pixels, rowsperstrip=23, compression="zlib")
    tifffile.imwrite(folder / "planar.tif", np.moveaxis(pixels, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(folder / "stack.tif", np.stack([pixels, 255 - pixels]))  # two pages: the first is read
    tifffile.imwrite(folder / "stackz.tif", np.stack([pixels, 255 - pixels]), compression="zlib")
    for name in ("raw", "tiled", "strips", "planar", "stack", "stackz"):
        sources[name] = folder / f"{name}.tif"
    return sources


def test_every_source_format_gives_the_same_result(tmp_path, rgb):
    pixels = rgb[:300, :410]
    net = tiny_net()
    ref = reference(net, pixels, IMAGENET_MEAN, IMAGENET_STD, window=96, overlap=0.5)
    for name, source in _write_sources(tmp_path, pixels).items():
        out = predict_large_image(net, source, tmp_path / f"{name}.npy", 96, 0.5, num_classes=4, save_probs=True)
        check_outputs(out, ref)


def test_grayscale_uint16_float_and_png_output(tmp_path):
    rng = np.random.default_rng(1)
    net = tiny_net(in_channels=1, classes=3)
    mean, std = (0.5,), (0.25,)
    for pixels in (
        rng.integers(0, 65536, (150, 170), dtype=np.uint16),
        rng.random((150, 170), dtype=np.float32),
        rng.integers(0, 256, (150, 170, 1), dtype=np.uint8),
    ):
        np.save(tmp_path / "img.npy", pixels)
        out = predict_large_image(
            net,
            tmp_path / "img.npy",
            tmp_path / "p.npy",
            64,
            0.25,
            num_classes=3,
            mean=mean,
            std=std,
            png_path=tmp_path / "p.png",
        )
        check_outputs(out, reference(net, pixels, mean, std, window=64, overlap=0.25))
        assert np.array_equal(np.asarray(Image.open(out.png)), np.load(out.labels))
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")
    out = predict_large_image(net, tmp_path / "gray.png", tmp_path / "g.npy", 64, num_classes=3, mean=mean, std=std)
    check_outputs(out, reference(net, pixels, mean, std, window=64))


def test_binary_and_many_classes(tmp_path, rgb):
    pixels = rgb[:60, :75]
    binary = tiny_net(classes=1)
    out = predict_large_image(binary, pixels, tmp_path / "b.npy", 32, num_classes=1, save_probs=True)
    ref = reference(binary, pixels, IMAGENET_MEAN, IMAGENET_STD, window=32)
    assert np.array_equal(np.load(out.labels), (ref[0] > 0).numpy().astype(np.uint8))
    assert np.abs(np.load(out.probs)[0].astype(int) - np.rint(ref[0].sigmoid().numpy() * 255)).max() <= 1
    many = nn.Conv2d(3, 300, 1).eval()
    out = predict_large_image(many, pixels, tmp_path / "m.npy", 32, num_classes=300)
    labels = np.load(out.labels)
    assert labels.dtype == np.int16
    assert np.array_equal(labels, reference(many, pixels, IMAGENET_MEAN, IMAGENET_STD, window=32).argmax(0).numpy())


def test_image_smaller_than_window(tmp_path, rgb):
    net = tiny_net()
    pixels = rgb[:20, :33]
    out = predict_large_image(net, pixels, tmp_path / "s.npy", 64, 0.5, num_classes=4, save_probs=True, margin=3)
    check_outputs(out, reference(net, pixels, IMAGENET_MEAN, IMAGENET_STD, window=64, overlap=0.5, margin=3))


def test_progress_and_train_mode_is_restored(tmp_path, rgb, capsys):
    net = tiny_net()
    net.train()
    out = predict_large_image(net, rgb[:50, :70], tmp_path / "p.npy", 32, num_classes=4, progress=True)
    assert net.training
    net.eval()
    check_outputs(out, reference(net, rgb[:50, :70], IMAGENET_MEAN, IMAGENET_STD, window=32))
    assert "large image" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_name_the_file_and_what_was_expected(tmp_path):
    net = tiny_net()
    out = tmp_path / "out.npy"
    with pytest.raises(FileNotFoundError, match=r"missing\.png does not exist"):
        predict_large_image(net, tmp_path / "missing.png", out, 32, num_classes=4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        predict_large_image(net, tmp_path / "broken.png", out, 32, num_classes=4)
    (tmp_path / "broken.npy").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match=r"cannot read .*broken\.npy as a \.npy array"):
        predict_large_image(net, tmp_path / "broken.npy", out, 32, num_classes=4)
    np.save(tmp_path / "four.npy", np.zeros((40, 40, 4), np.uint8))
    with pytest.raises(ValueError, match=r"four\.npy has 4 channel\(s\) .* expected 3"):
        predict_large_image(net, tmp_path / "four.npy", out, 32, num_classes=4)
    np.save(tmp_path / "int.npy", np.zeros((40, 40, 3), np.int32))
    with pytest.raises(TypeError, match=r"int\.npy has pixels of type int32; expected uint8"):
        predict_large_image(net, tmp_path / "int.npy", out, 32, num_classes=4)
    np.save(tmp_path / "4d.npy", np.zeros((2, 40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"4d\.npy has shape \(2, 40, 40, 3\); expected"):
        predict_large_image(net, tmp_path / "4d.npy", out, 32, num_classes=4)
    pixels = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="model returned 4 channels; expected 5"):
        predict_large_image(net, pixels, out, 32, num_classes=5)
    with pytest.raises(ValueError, match="out_path must be a .npy file"):
        predict_large_image(net, pixels, tmp_path / "out.png", 32, num_classes=4)
    with pytest.raises(FileNotFoundError, match="output folder"):
        predict_large_image(net, pixels, tmp_path / "nowhere" / "out.npy", 32, num_classes=4)
    with pytest.raises(ValueError, match="num_classes must be an int"):
        predict_large_image(net, pixels, out, 32, num_classes=0)
    with pytest.raises(ValueError, match="overlap must be a fraction"):
        predict_large_image(net, pixels, out, 32, 1.5, num_classes=4)
    with pytest.raises(TypeError, match="source must be a file path or a numpy array"):
        predict_large_image(net, torch.zeros(3, 40, 40), out, 32, num_classes=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4d.npy", "broken.npy", "broken.png", "four.npy", "int.npy"]


def test_crash_leaves_no_partial_file_and_keeps_the_previous_result(tmp_path, rgb):
    net = tiny_net()
    pixels = rgb[:200, :100]
    out = tmp_path / "pred.npy"
    np.save(out, np.full((3, 3), 7, np.uint8))
    calls = 0

    def flaky(x):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory")
        return net(x)

    with pytest.raises(RuntimeError, match="out of memory"):
        predict_large_image(flaky, pixels, out, 32, num_classes=4, batch_size=2, save_probs=True)
    assert np.array_equal(np.load(out), np.full((3, 3), 7, np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["pred.npy"]


# ------------------------------------------------------------------------------------------------------ memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from maskworks.inference.large import predict_large_image

    def status_kib(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1])

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
        except OSError:
            pass  # older kernels: VmHWM then also covers the imports (an overestimate)

    class Pointwise(torch.nn.Module):
        # a 1x1 convolution 1 -> 2 channels, by broadcasting (PyTorch's CPU conv2d is ~10x slower here)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
            self.bias = torch.nn.Parameter(torch.tensor([0.0, 0.1]).view(1, 2, 1, 1))

        def forward(self, x):
            return torch.addcmul(self.bias, x, self.weight)

    torch.set_num_threads(2)
    net = Pointwise()
    src, out = sys.argv[1], sys.argv[2]
    reset_peak()
    before = status_kib("VmRSS") * 1024
    predict_large_image(net, src, out, 512, 0.125, num_classes=2, batch_size=4, mean=(0.5,), std=(0.25,))
    peak = status_kib("VmHWM") * 1024
    print(json.dumps({"before": before, "peak": peak}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_stays_far_below_a_full_accumulator(tmp_path):
    """A 16384 x 16384 uint8 image, 2 classes, window 512: the full float32 accumulator would take 2 GiB.

    The peak resident memory
    added by the call is the process's high-water mark after it (VmHWM, reset just before the call) minus the
    resident size before it. ``ru_maxrss`` is not used: it also counts the parent's memory at the fork before exec.
    It must stay below the labels file (256 MiB, whose written pages are resident) plus 0.35 of that accumulator.
    """
    h, w = 16384, 16384
    src = tmp_path / "big.npy"
    with open(src, "wb") as f:  # written in row blocks, so this process never holds the image either
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (h, w)})
        block = (np.add.outer(np.arange(1024), np.arange(w)) % 251).astype(np.uint8)
        for _ in range(h // 1024):
            f.write(block.tobytes())
    out = tmp_path / "labels.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(src), str(out)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    added = mem["peak"] - mem["before"]
    print(f"16384 x 16384: peak resident memory added {added / 2**20:.0f} MiB")
    accumulator = 2 * h * w * 4
    labels = np.load(out, mmap_mode="r")
    assert labels.shape == (h, w) and labels.dtype == np.uint8
    assert added < h * w + 0.35 * accumulator, f"peak grew by {added / 2**20:.0f} MiB"
    # class 1 (logit 0.1 - x) wins where the normalised pixel x = (p / 255 - 0.5) / 0.25 is below 0.05
    pixels = np.add.outer(np.arange(h - 3, h) % 1024, np.arange(w - 300, w)) % 251
    assert np.array_equal(labels[-3:, -300:], (pixels / 255 - 0.5) / 0.25 < 0.05)
