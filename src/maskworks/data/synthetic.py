"""SyntheticShapes: procedural scenes of coloured shapes on textured backgrounds, the built-in dataset.

Each scene is generated on the fly from a NumPy generator seeded with ``(seed, split, index)``, so any sample is
reproducible in any order, in any DataLoader worker, without files. Shapes (circle, rectangle, triangle, star,
cross) get random colours, sizes and rotations, so only their *shape* tells the class; backgrounds are smooth
noise, gradients or stripes with light pixel noise. Later shapes occlude earlier ones: the semantic mask and the
instance masks agree on what is visible, and every shape keeps at least half of its area visible.

With ``panoptic=True`` the background is split into *stuff* regions (smooth random partitions of the image, each
class with its own texture: stripes, checks, blotches) and the shapes are *things*; samples then follow the panoptic
contract (one ``instances`` entry per segment, stuff and things, with ``isthing`` and ``iscrowd``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from maskworks.data.io import DatasetError, SegmentationDataset, raw_sample
from maskworks.data.palette import default_palette

SHAPES = ("circle", "rectangle", "triangle", "star", "cross")
STUFF = ("stripes", "checks", "blotches")  # the stuff classes of panoptic scenes, told apart by their texture
SPLITS = {"train": 0, "val": 1, "test": 2}
# Measured over 2048 training samples at 96x96 (seed 0, default options).
SYNTHETIC_MEAN = (0.4968, 0.4997, 0.4987)
SYNTHETIC_STD = (0.2294, 0.2297, 0.2295)

_MIN_VISIBLE = 0.7  # fraction of each shape that must stay visible when later shapes are drawn
_BG_CONTRAST = 60.0  # backgrounds vary by at most this much (0-255 units) around their base colour
_MIN_CONTRAST = 110.0  # RGB distance (0-255 units) wanted between a shape and what lies under it
_PLACEMENT_TRIES = 8


def _circle(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return u * u + v * v <= 1.0


def _rectangle(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    aspect = rng.uniform(0.5, 1.0)
    return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95 * aspect)


def _triangle(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # intersection of three half-planes with normals 120 degrees apart (inradius ~0.66 -> circumradius ~1.3)
    offsets = rng.uniform(0.6, 0.72, 3)
    inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for k, d in enumerate(offsets):
        phi = 2 * math.pi * k / 3
        inside &= u * math.cos(phi) + v * math.sin(phi) <= d
    return inside


def _star(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    inner = rng.uniform(0.5, 0.65)
    t = (np.arctan2(v, u) % (2 * math.pi / 5)) / (2 * math.pi / 5)  # position within one of the 5 points, 0..1
    boundary = inner + (1.25 - inner) * np.abs(1.0 - 2.0 * t)
    return u * u + v * v <= boundary * boundary


def _cross(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    half_width = rng.uniform(0.28, 0.38)
    au, av = np.abs(u), np.abs(v)
    return ((au <= 1.1) & (av <= half_width)) | ((au <= half_width) & (av <= 1.1))


_RASTERISERS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "circle": _circle,
    "rectangle": _rectangle,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
}


@lru_cache(maxsize=64)
def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
    """``(size, coarse)`` linear interpolation weights from ``coarse`` control points to ``size`` pixels."""
    pos = np.linspace(0.0, coarse - 1.0, size)
    i0 = np.minimum(pos.astype(np.int64), coarse - 2)
    frac = (pos - i0).astype(np.float32)
    m = np.zeros((size, coarse), dtype=np.float32)
    m[np.arange(size), i0] = 1.0 - frac
    m[np.arange(size), i0 + 1] = frac
    return m


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int, low: float, high: float) -> np.ndarray:
    """Bilinearly upsampled ``cells x cells`` random RGB control grid: ``(h, w, 3)`` float32."""
    grid = rng.uniform(low, high, (cells, cells, 3)).astype(np.float32)
    rows = np.tensordot(_upsample_matrix(h, cells), grid, axes=(1, 0))  # (h, cells, 3)
    return np.tensordot(rows, _upsample_matrix(w, cells), axes=(1, 1)).transpose(0, 2, 1)  # (h, w, 3)


def _smooth_scalar(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled ``cells x cells`` uniform random grid: ``(h, w)`` float32 in [0, 1]."""
    grid = rng.uniform(0.0, 1.0, (cells, cells)).astype(np.float32)
    return _upsample_matrix(h, cells) @ grid @ _upsample_matrix(w, cells).T


def _stuff_texture(rng: np.random.Generator, kind: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The texture of stuff class ``kind`` (:data:`STUFF`) over the whole image, in random colours: ``(h, w, 3)``.

    Stripes: soft stripes of a 5-9 px period; checks: a rotated checkerboard of 3-6 px squares; blotches: high
    contrast smooth noise of 8-12 cells. Colours change from image to image, so only the texture tells the class.
    """
    h, w = ys.shape[0], xs.shape[1]
    c0 = rng.uniform(_BG_CONTRAST, 255 - _BG_CONTRAST, 3).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-80.0, 80.0, 3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)  # (h, w)
    v = ys * math.cos(angle) - xs * math.sin(angle)
    if kind == 0:
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / rng.uniform(5, 9) + rng.uniform(0, 2 * math.pi))
    elif kind == 1:
        p = rng.uniform(3, 6)
        t = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    else:
        t = _smooth_scalar(rng, h, w, int(rng.integers(8, 13)))
    return c0 + t[..., None].astype(np.float32) * (c1 - c0)


def _background(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Smooth noise, a linear gradient or soft stripes around a base colour, plus a faint tint: ``(h, w, 3)``."""
    h, w = ys.shape[0], xs.shape[1]
    kind = rng.integers(3)
    c0 = rng.uniform(_BG_CONTRAST, 255 - _BG_CONTRAST, 3).astype(np.float32)
    if kind == 0:
        bg = c0 + _smooth_field(rng, h, w, int(rng.integers(2, 6)), -_BG_CONTRAST, _BG_CONTRAST)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(angle) + ys * math.sin(angle)  # (h, w)
        c1 = c0 + rng.uniform(-_BG_CONTRAST, _BG_CONTRAST, 3).astype(np.float32)
        if kind == 1:
            t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        else:
            period, sharpness = rng.uniform(6, 24), rng.uniform(1, 4)
            t = np.clip(sharpness * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi)), -1, 1) / 2 + 0.5
        bg = c0 + t[..., None].astype(np.float32) * (c1 - c0)
    return bg + _smooth_field(rng, h, w, 4, -15.0, 15.0)


class SyntheticShapes(SegmentationDataset):
    """Procedural shapes dataset with semantic and instance labels (no files needed).

    Class 0 is background; classes ``1..num_classes-1`` are the first shapes of :data:`SHAPES`.

    Args:
        num_samples: dataset length.
        image_size: ``(H, W)`` or an int for square images.
        num_classes: 2..6 (background plus up to five shape classes).
        seed: base seed; the scene of ``index`` depends only on ``(seed, split, index)`` and the options.
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        transform: callable on the raw sample (see :mod:`maskworks.data.io`).
        max_shapes: most shapes per image (at least ``min_shapes``, at least one).
        min_shapes: fewest shapes attempted per image.
        radius_range: shape radius as a fraction of ``min(H, W)`` (0.11-0.32: about 10-30 px at 96x96).
        noise_std: pixel noise std of the shapes in 0-1 units.
        background_grain: pixel noise std of the background in 0-1 units (a fine texture that tells background
            from the flat shapes locally; the class still has to come from the shape).
        return_instances: include ``instances`` in the samples.
        cache: keep every generated scene in memory (about ``H * W * 4`` bytes each), so later epochs skip the
            generation; scenes are the same either way.
        dense: crowded scenes (Q16): every shape after the first is centred next to an earlier one (its centre
            0.5-1.0 of the two radii away), so that instances touch and occlude each other. Instances are numbered
            in paint order, back to front: where shapes overlap, the later one is visible, and each shape keeps
            at least 70 % of its area visible.
        panoptic: panoptic scenes (see the module docstring): ``num_stuff`` stuff classes (labels
            ``0..num_stuff-1``, :data:`STUFF`) followed by the ``num_classes - 1`` shape classes as things; every
            pixel belongs to a segment (no void), ``instances`` lists the visible stuff regions (one per class) and
            then the shapes. ``num_classes`` keeps counting "background + shapes" here, so the dataset's own
            ``num_classes`` attribute is ``num_stuff + num_classes - 1``.
        num_stuff: stuff classes of panoptic scenes, 1..3; each scene shows a random 1..num_stuff of them.

    Attributes:
        class_names, num_classes, palette: the class space (background + shapes, or stuff + shapes when panoptic).
        isthing, category_ids, thing_classes: panoptic only: per label whether it is a thing, its category id
            (``range(K)``), and the labels of the things.
    """

    in_channels = 3
    mean = SYNTHETIC_MEAN
    std = SYNTHETIC_STD

    def __init__(
        self,
        num_samples: int = 512,
        image_size: int | Sequence[int] = 96,
        num_classes: int = 4,
        seed: int = 0,
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        max_shapes: int = 4,
        min_shapes: int = 1,
        radius_range: Sequence[float] = (0.11, 0.32),
        noise_std: float = 0.02,
        background_grain: float = 0.08,
        return_instances: bool = True,
        cache: bool = False,
        dense: bool = False,
        panoptic: bool = False,
        num_stuff: int = 3,
    ) -> None:
        super().__init__(transform)
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not 2 <= num_classes <= len(SHAPES) + 1:
            raise DatasetError(
                f"num_classes must be in 2..{len(SHAPES) + 1} (background + shapes {SHAPES}), got {num_classes}"
            )
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(size) != 2 or min(size) < 8:
            raise DatasetError(f"image_size must be an int or (H, W) of at least 8 pixels, got {image_size!r}")
        if not 1 <= min_shapes <= max_shapes:
            raise DatasetError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        if not 0 < radius_range[0] <= radius_range[1]:
            raise DatasetError(f"radius_range must be (low, high) with 0 < low <= high, got {tuple(radius_range)}")
        if num_samples < 0 or seed < 0:
            raise DatasetError(f"num_samples and seed must be >= 0, got {num_samples}, {seed}")
        if panoptic and not 1 <= num_stuff <= len(STUFF):
            raise DatasetError(f"num_stuff must be in 1..{len(STUFF)} (stuff textures {STUFF}), got {num_stuff}")
        if panoptic and not return_instances:
            raise DatasetError("panoptic=True needs return_instances=True: panoptic samples list their segments")
        self.num_samples, self.image_size, self.seed, self.split = num_samples, size, seed, split
        self.panoptic, self.num_stuff = bool(panoptic), int(num_stuff) if panoptic else 0
        self._num_shapes = num_classes - 1
        if self.panoptic:
            self.class_names = [*STUFF[:num_stuff], *SHAPES[: num_classes - 1]]
            self.isthing = [False] * num_stuff + [True] * (num_classes - 1)
            self.num_classes = len(self.class_names)
            self.category_ids = list(range(self.num_classes))
            self.thing_classes = [i for i, t in enumerate(self.isthing) if t]
        else:
            self.num_classes = num_classes
            self.class_names = ["background", *SHAPES[: num_classes - 1]]
        self.palette = default_palette(self.num_classes)
        self.max_shapes, self.min_shapes = max_shapes, min_shapes
        self.radius_range = (float(radius_range[0]), float(radius_range[1]))
        self.noise_std, self.background_grain, self.return_instances = noise_std, background_grain, return_instances
        self.dense = bool(dense)
        h, w = size
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = {} if cache else None
        self._ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None]  # (H, 1) pixel centres
        self._xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :]  # (1, W)

    def __len__(self) -> int:
        return self.num_samples

    def _rasterise(
        self, rng: np.random.Generator, shape: str, near: list[tuple[float, float, float]] | None = None
    ) -> tuple[np.ndarray, tuple[float, float, float]]:
        """A random placement of ``shape``: boolean ``(H, W)`` mask and its ``(cx, cy, r)``; with ``near`` (earlier
        shapes' ``(cx, cy, r)``), centred next to one of them."""
        h, w = self.image_size
        r = rng.uniform(*self.radius_range) * min(h, w)
        if near:
            ncx, ncy, nr = near[int(rng.integers(len(near)))]
            dist, angle = rng.uniform(0.5, 1.0) * (nr + r), rng.uniform(0, 2 * math.pi)
            cx = float(np.clip(ncx + dist * math.cos(angle), 0.25 * r, w - 0.25 * r))
            cy = float(np.clip(ncy + dist * math.sin(angle), 0.25 * r, h - 0.25 * r))
        else:
            cx, cy = rng.uniform(0.25 * r, w - 0.25 * r), rng.uniform(0.25 * r, h - 0.25 * r)
        theta = rng.uniform(0, 2 * math.pi)
        reach = 1.5 * r  # every shape lies within 1.5 radii of its centre
        y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
        dy, dx = self._ys[y0:y1] - cy, self._xs[:, x0:x1] - cx  # (h', 1), (1, w')
        c, s = math.cos(theta) / r, math.sin(theta) / r
        u, v = dx * c + dy * s, dy * c - dx * s  # rotated coordinates in radius units, (h', w')
        inside = np.zeros((h, w), dtype=bool)
        inside[y0:y1, x0:x1] = _RASTERISERS[shape](u, v, rng)
        return inside, (cx, cy, r)

    def _color(self, rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
        """A random colour that stands out from the mean colour of the pixels it will cover."""
        ref = under.mean(0)
        best, best_dist = None, -1.0
        for _ in range(6):
            color = rng.uniform(0, 255, 3).astype(np.float32)
            dist = float(np.linalg.norm(color - ref))
            if dist > best_dist:
                best, best_dist = color, dist
            if dist >= _MIN_CONTRAST:
                break
        return best

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scene of ``index``: ``(image uint8 (H, W, 3), instance id map int64 (H, W), labels (N,))``.

        Instance ``i`` (1-based) covers ``id_map == i`` and has class ``labels[i - 1]``; 0 is background. Panoptic
        scenes: segment ``i`` (1-based; the visible stuff regions first, then the shapes) covers ``id_map == i``
        and has label ``labels[i - 1]``; every pixel belongs to a segment.
        """
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        if self.panoptic:
            canvas, stuff = self._stuff(rng)
        else:
            canvas = _background(rng, self._ys, self._xs)  # (H, W, 3) float32
        id_map = np.zeros(self.image_size, dtype=np.int64)
        full_area, visible, labels = [0], [0], []  # per instance id (index 0 = background)
        min_area = 0.25 * math.pi * (self.radius_range[0] * min(self.image_size)) ** 2
        placed: list[tuple[float, float, float]] = []  # (cx, cy, r) of the shapes drawn so far
        for _ in range(int(rng.integers(self.min_shapes, self.max_shapes + 1))):
            cls = int(rng.integers(1, self._num_shapes + 1))
            for _ in range(_PLACEMENT_TRIES):
                inside, where = self._rasterise(rng, SHAPES[cls - 1], placed if self.dense else None)
                area = int(inside.sum())
                covered = np.bincount(id_map[inside], minlength=len(visible))
                if area >= min_area and all(
                    visible[i] - covered[i] >= _MIN_VISIBLE * full_area[i] for i in range(1, len(visible))
                ):
                    break
            else:
                continue
            canvas[inside] = self._color(rng, canvas[inside])
            id_map[inside] = len(visible)
            visible = [v - c for v, c in zip(visible, covered)] + [area]
            full_area.append(area)
            labels.append(cls)
            placed.append(where)
        grain = np.where(id_map > 0, self.noise_std * 255.0, self.background_grain * 255.0).astype(np.float32)
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * grain[..., None]
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        if not self.panoptic:
            return image, id_map, np.asarray(labels, dtype=np.int64)
        # panoptic: the visible stuff regions become segments 1..S (labels 0..num_stuff-1), the shapes S+1..
        stuff_labels = [int(c) for c in np.unique(stuff[id_map == 0])]
        segments = np.zeros(self.image_size, dtype=np.int64)
        for j, c in enumerate(stuff_labels):
            segments[(id_map == 0) & (stuff == c)] = j + 1
        segments[id_map > 0] = id_map[id_map > 0] + len(stuff_labels)
        seg_labels = stuff_labels + [self.num_stuff + c - 1 for c in labels]
        return image, segments, np.asarray(seg_labels, dtype=np.int64)

    def _stuff(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A panoptic background: ``(canvas (H, W, 3) float32, stuff class per pixel (H, W) int64)``.

        A random 1..num_stuff of the stuff classes partition the image along the argmax of smooth random fields
        (3-4 cells: a few large blobs per class); each region shows its class's texture."""
        h, w = self.image_size
        k = int(rng.integers(1, self.num_stuff + 1))
        classes = np.sort(rng.choice(self.num_stuff, size=k, replace=False))
        cells = int(rng.integers(3, 5))
        fields = np.stack([_smooth_scalar(rng, h, w, cells) for _ in range(k)])  # (k, H, W)
        stuff = classes[fields.argmax(0)].astype(np.int64)
        canvas = np.zeros((h, w, 3), dtype=np.float32)
        for c in classes:
            region = stuff == c
            canvas[region] = _stuff_texture(rng, int(c), self._ys, self._xs)[region]
        return canvas, stuff

    def _scene(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None:
            return self.generate(index)
        if index not in self._cache:
            image, id_map, labels = self.generate(index)
            self._cache[index] = (image, id_map.astype(np.uint8 if len(labels) < 256 else np.int64), labels)
        image, id_map, labels = self._cache[index]
        return image, id_map.astype(np.int64), labels

    def load_raw(self, index: int) -> dict[str, Any]:
        image, id_map, labels = self._scene(index)
        if self.panoptic:
            masks = id_map[None] == np.arange(1, len(labels) + 1)[:, None, None]  # (N, H, W), stuff and things
            instances = {"labels": labels, "masks": masks, "iscrowd": np.zeros(len(labels), dtype=np.int64)}
            return {**raw_sample(image, labels[id_map - 1], instances), "file": None}
        mask = np.concatenate([[0], labels])[id_map]  # (H, W) class ids
        instances = None
        if self.return_instances:
            masks = id_map[None] == np.arange(1, len(labels) + 1)[:, None, None]  # (N, H, W)
            instances = {"labels": labels, "masks": masks}
        return {**raw_sample(image, mask, instances), "file": None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        if not self.panoptic:
            return sample
        from maskworks.data.coco_panoptic import panoptic_sample

        return panoptic_sample(sample, self.isthing, self.class_names, self.category_ids)

    def __repr__(self) -> str:
        kind = f", panoptic: {self.num_stuff} stuff + {self._num_shapes} things" if self.panoptic else ""
        return (
            f"SyntheticShapes({self.num_samples} samples, {self.image_size[0]}x{self.image_size[1]}, "
            f"{self.num_classes} classes{kind}, split={self.split!r}, seed={self.seed})"
        )
