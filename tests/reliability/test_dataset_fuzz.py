"""Fuzzing dataset files: every odd or corrupted file either works or raises a DatasetError naming it.

Each case builds a two-sample FolderDataset in tmp_path (one good pair, one pair with an odd image or mask), then
constructs it, reads every sample and validates it. A sample that works must be a finite image with the dataset's
channels and a mask of class ids 0..K-1 or 255; anything else must be a ``DatasetError`` that names the odd file.
``dataset[i]`` and ``validate_dataset`` must agree on which samples are bad. Random cases use fixed seeds.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks.data import DatasetError, FolderDataset, validate_dataset

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

H, W, K = 6, 8, 3
SEED = 20240611
Writer = Callable[[Path], Path]  # stem (no suffix) -> written file


def _rgb(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _labels(h: int = H, w: int = W, k: int = K, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (h, w)).astype(np.uint8)


def _png_bytes(width: int, height: int, depth: int = 8, color_type: int = 0, data: bytes = b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def save(img: Image.Image | np.ndarray, ext: str = ".png", **kwargs) -> Writer:
    def write(stem: Path) -> Path:
        path = stem.with_suffix(ext)
        (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, **kwargs)
        return path

    return write


def raw(data: bytes, ext: str = ".png") -> Writer:
    def write(stem: Path) -> Path:
        path = stem.with_suffix(ext)
        path.write_bytes(data)
        return path

    return write


def truncated(inner: Writer, fraction: float) -> Writer:
    def write(stem: Path) -> Path:
        path = inner(stem)
        data = path.read_bytes()
        path.write_bytes(data[: max(1, int(len(data) * fraction))])
        return path

    return write


def flipped(inner: Writer, seed: int, count: int = 4) -> Writer:
    def write(stem: Path) -> Path:
        path = inner(stem)
        data = bytearray(path.read_bytes())
        rng = np.random.default_rng(seed)
        for pos in rng.integers(0, len(data), count):
            data[pos] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        return path

    return write


def _with(labels: np.ndarray, **values) -> np.ndarray:
    out = labels.copy()
    for where, v in values.items():
        y, x = (int(c) for c in where[1:].split("_"))
        out[y, x] = v
    return out


def _two_bit_mask() -> bytes:
    """A 2-bit grayscale PNG mask (H x W) of labels 0..2: four pixels per byte, first pixel in the high bits."""
    labels = _labels(seed=1).astype(np.int64).reshape(H, W // 4, 4)
    packed = (labels[..., 0] << 6) | (labels[..., 1] << 4) | (labels[..., 2] << 2) | labels[..., 3]
    return _png_bytes(W, H, depth=2, data=b"".join(b"\x00" + bytes(row.tolist()) for row in packed))


@dataclass
class Case:
    id: str
    expect: str  # "ok", "error" or "any"
    image: Writer | None = None  # None: a good RGB PNG
    mask: Writer | None = None  # None: a good label PNG
    num_classes: int | None = K  # None: inferred from the masks


def _cases() -> list[Case]:
    rgb, labels = _rgb(seed=1), _labels(seed=1)
    pil = Image.fromarray(rgb)
    palette_t = pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette_t.info["transparency"] = 0
    cases = [
        # image modes
        Case("image_rgba", "ok", image=save(pil.convert("RGBA"))),
        Case("image_la", "ok", image=save(pil.convert("LA"))),
        Case("image_palette", "ok", image=save(pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=8))),
        Case("image_palette_transparency", "ok", image=save(palette_t)),
        Case("image_cmyk_jpeg", "ok", image=save(pil.convert("CMYK"), ".jpg")),
        Case("image_cmyk_tiff", "ok", image=save(pil.convert("CMYK"), ".tif")),
        Case("image_ycbcr_tiff", "ok", image=save(pil.convert("YCbCr"), ".tif")),
        Case("image_lab_tiff", "ok", image=save(Image.new("LAB", (W, H), (50, 0, 0)), ".tif")),
        Case("image_bilevel", "ok", image=save(pil.convert("1"))),
        Case("image_bmp", "ok", image=save(pil, ".bmp")),
        Case("image_16bit", "ok", image=save(np.full((H, W), 40000, np.uint16))),
        Case(
            "image_16bit_rgb",
            "ok",
            image=raw(_png_bytes(W, H, 16, 2, b"".join(b"\x00" + bytes(6 * W) for _ in range(H)))),
        ),
        Case("image_int32_in_range", "ok", image=save(np.full((H, W), 65535, np.int32), ".tif")),
        Case("image_int32_above_16bit", "error", image=save(np.full((H, W), 70000, np.int32), ".tif")),
        Case("image_int32_negative", "error", image=save(np.full((H, W), -1, np.int32), ".tif")),
        Case("image_float_unit", "ok", image=save(np.full((H, W), 0.25, np.float32), ".tif")),
        Case("image_float_0_255", "error", image=save(np.full((H, W), 200.0, np.float32), ".tif")),
        Case("image_float_nan", "error", image=save(np.full((H, W), np.nan, np.float32), ".tif")),
        # image files and sizes
        Case("image_empty_file", "error", image=raw(b"")),
        Case("image_text_file", "error", image=raw(b"this is not an image\n")),
        Case("image_zero_width", "error", image=raw(_png_bytes(0, H))),
        Case("image_bomb_error", "error", image=raw(_png_bytes(20_000, 20_000))),
        Case("image_bomb_warning", "error", image=raw(_png_bytes(10_000, 10_000))),
        Case("image_large_no_data", "error", image=raw(_png_bytes(3000, 2000))),
        Case("image_wrong_size", "error", image=save(_rgb(H + 1, W))),
        Case("image_and_mask_1x1", "ok", image=save(_rgb(1, 1)), mask=save(_labels(1, 1))),
        Case("image_and_mask_1x40", "ok", image=save(_rgb(1, 40)), mask=save(_labels(1, 40))),
        # mask modes and values
        Case("mask_rgb_colours_no_class_file", "error", mask=save(_rgb())),
        Case("mask_rgb_gray", "ok", mask=save(np.repeat(labels[..., None], 3, axis=2))),
        Case("mask_rgba_gray", "ok", mask=save(Image.fromarray(labels).convert("RGBA"))),
        Case("mask_la", "ok", mask=save(Image.fromarray(labels).convert("LA"))),
        Case("mask_bilevel", "ok", mask=save(Image.fromarray(labels > 0))),
        Case("mask_16bit", "ok", mask=save(labels.astype(np.uint16))),
        Case("mask_16bit_300", "error", mask=save(_with(labels.astype(np.uint16), p0_0=300))),
        Case("mask_16bit_65535", "error", mask=save(_with(labels.astype(np.uint16), p1_1=65535))),
        Case("mask_int32_negative", "error", mask=save(_with(labels.astype(np.int32), p2_2=-3), ".tif")),
        Case("mask_float", "error", mask=save(labels.astype(np.float32), ".tif")),
        Case("mask_cmyk", "error", mask=save(Image.fromarray(labels).convert("CMYK"), ".tif")),
        Case("mask_two_bit", "ok", mask=raw(_two_bit_mask())),
        Case("mask_ignore_255", "ok", mask=save(_with(labels, p0_0=255))),
        Case("mask_stray_17", "error", mask=save(_with(labels, p3_3=17))),
        Case("mask_stray_17_inferred", "ok", mask=save(_with(labels, p3_3=17)), num_classes=None),
        Case("mask_only_ignore_inferred", "ok", mask=save(np.full((H, W), 255, np.uint8)), num_classes=None),
        Case("mask_300_inferred", "error", mask=save(_with(labels.astype(np.uint16), p0_0=300)), num_classes=None),
        Case("mask_empty_file", "error", mask=raw(b"")),
        Case("mask_empty_file_inferred", "error", mask=raw(b""), num_classes=None),
        Case("mask_wrong_size", "error", mask=save(_labels(H, W + 2))),
        Case("mask_jpeg", "any", mask=save(labels * 100, ".jpg", quality=50)),
        Case("mask_bomb", "error", mask=raw(_png_bytes(20_000, 20_000))),
    ]
    rng = np.random.default_rng(SEED)
    sources = [
        ("png", save(rgb), None),
        ("jpeg", save(rgb, ".jpg"), None),
        ("bmp", save(rgb, ".bmp"), None),
        ("mask_png", None, save(labels)),
    ]
    for name, image, mask in sources:
        for k in range(2):
            fraction = float(rng.uniform(0.05, 0.95))
            cases.append(
                Case(
                    f"truncated_{name}_{k}",
                    "any",
                    image=truncated(image, fraction) if image else None,
                    mask=truncated(mask, fraction) if mask else None,
                    num_classes=None if k else K,
                )
            )
            seed = int(rng.integers(0, 2**31))
            cases.append(
                Case(
                    f"flipped_{name}_{k}",
                    "any",
                    image=flipped(image, seed) if image else None,
                    mask=flipped(mask, seed) if mask else None,
                    num_classes=None if k else K,
                )
            )
    for k in range(2):
        noise = np.random.default_rng([SEED, k]).integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
        cases.append(Case(f"random_bytes_image_{k}", "error", image=raw(noise)))
        cases.append(Case(f"random_bytes_png_signature_mask_{k}", "error", mask=raw(b"\x89PNG\r\n\x1a\n" + noise)))
    return cases


CASES = _cases()


def _build(root: Path, case: Case) -> list[Path]:
    """``root/images``, ``root/masks`` with a good pair ``good`` and the case's pair ``odd``; the odd files."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(_rgb(seed=0)).save(root / "images" / "good.png")
    Image.fromarray(_labels(seed=0)).save(root / "masks" / "good.png")
    image = (case.image or save(_rgb(seed=1)))(root / "images" / "odd")
    mask = (case.mask or save(_labels(seed=1)))(root / "masks" / "odd")
    return [p for p, written in ((image, case.image), (mask, case.mask)) if written]


def _names_an_odd_file(error: DatasetError, odd: list[Path]) -> bool:
    return any(str(p) in str(error) for p in odd)


def test_fuzz_cases_are_many_and_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and 40 <= len(ids) <= 70


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dataset_file_fuzz(case: Case, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKWORKS_HOME", str(tmp_path / "home"))
    odd = _build(tmp_path / "data", case)
    try:
        ds = FolderDataset(tmp_path / "data", num_classes=case.num_classes)
    except DatasetError as e:
        assert _names_an_odd_file(e, odd), f"construction error does not name {odd}: {e}"
        assert case.expect != "ok", f"construction failed: {e}"
        return
    k = ds.num_classes
    bad = set()
    for i in range(len(ds)):
        try:
            sample = ds[i]
        except DatasetError as e:
            assert _names_an_odd_file(e, odd), f"dataset[{i}] error does not name {odd}: {e}"
            bad.add(i)
            continue
        image, mask = sample["image"], sample["mask"]
        assert image.dtype == torch.float32 and image.shape[0] == ds.in_channels and torch.isfinite(image).all()
        assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
        values = set(mask.unique().tolist())
        assert values <= set(range(k)) | {255}, values
    assert 0 not in bad, "the good pair must always read"
    try:
        validate_dataset(ds, progress=False)
    except DatasetError as e:
        assert bad, f"validate_dataset failed but every sample read: {e}"
        assert _names_an_odd_file(e, odd) and "good.png" not in str(e), str(e)
    else:
        assert not bad, "validate_dataset passed but a sample failed to read"
    if case.expect == "ok":
        assert not bad
    elif case.expect == "error":
        assert bad
