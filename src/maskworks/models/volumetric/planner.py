"""nnU-Net-style experiment planning: a dataset fingerprint -> target spacing, normalisation, patch size, batch size
and a U-Net topology (Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 2021).

The rules are those of nnU-Net v2's default ``ExperimentPlanner`` (``3d_fullres`` and ``2d`` configurations; the
``3d_lowres`` cascade is not planned) and give the same plans as ``nnunetv2`` (checked in the tests):

* **fingerprint**: every case is cropped to the bounding box of its non-zero region (holes filled); the spacings,
  the cropped shapes and foreground intensities (label > 0, sampled with replacement with a fixed seed) are kept.
* **target spacing**: the median spacing; when one axis is both much coarser (> 3x the next coarsest spacing) and
  much shorter (3x fewer voxels than the shortest other axis), that axis takes the 10th percentile of its spacings
  instead (never finer than the other axes).
* **normalisation** per channel: ``CT`` -> clip to the dataset's foreground percentiles 0.5 / 99.5, then subtract
  the foreground mean and divide by the foreground std; anything else -> z-score of each image (inside the
  non-zero region when cropping shrank the images below 3/4 of their size).
* **topology**: axes are pooled (stride 2) one stage at a time while a pooled axis keeps at least 2 x 4 voxels and
  its spacing is within a factor 2 of the finest one; an axis much coarser than the others gets ``1`` instead of
  ``3`` in its conv kernels until pooling the others brings them within a factor 2; the bottleneck is 3 x 3 (x 3).
  The patch is padded to a multiple of ``2 ** pools`` per axis.
* **patch and batch size**: the search starts from a 256^3 (2D: 2048^2) volume shaped like the target spacing,
  clipped to the median image shape; while the U-Net's feature-map size exceeds the memory budget, the axis largest
  relative to the median shape is shrunk. The batch size fills the remaining budget, capped so one batch covers at
  most 5% of the dataset's voxels, and is at least 2.

Axis convention (as SimpleITK, nnU-Net and :mod:`maskworks.data.volumes`): images are ``(C, D, H, W)`` arrays with
spacing ``(sz, sy, sx)`` in millimetres, i.e. a NIfTI array ``(x, y, z)`` transposed ``(2, 1, 0)`` and the header's
zooms reversed. nnU-Net plans on axes reordered so the coarsest one comes first; a :class:`Plan` gives every 3D size
back in the data's own ``(D, H, W)`` order, and the 2D configuration names the axis its slices are taken across.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ChannelStats",
    "Fingerprint",
    "compute_fingerprint",
    "crop_to_nonzero",
    "target_spacing",
    "Topology",
    "pool_and_conv_props",
    "estimate_feature_map_size",
    "ChannelNormalization",
    "normalization_for",
    "Configuration",
    "Plan",
    "plan_experiment",
    "msd_dataset",
    "iter_msd_cases",
]

IGNORE_INDEX = 255
ANISOTROPY_THRESHOLD = 3.0  # an axis is "much coarser" above 3x the next coarsest spacing
MIN_FEATURE_MAP_SIZE = 4  # pooling stops when an axis would drop below 2 x this many voxels
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
# nnU-Net's reference: a feature-map size that fits its reference batch in 8 GB, per dimension
REFERENCE_FEATURE_MAP_SIZE = {2: 85_000_000, 3: 560_000_000}
REFERENCE_BATCH_SIZE = {2: 12, 3: 2}
REFERENCE_GB = 8.0
MIN_BATCH_SIZE = 2
MAX_DATASET_FRACTION = 0.05  # one batch sees at most this fraction of the dataset's voxels
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}
CONVS_PER_STAGE = 2  # encoder and decoder
FOREGROUND_SEED = 1234
# nnU-Net channel names (case-insensitive) -> our scheme names; any other name is z-scored
_SCHEMES = {
    "ct": "ct",
    "nonorm": "none",
    "zscore": "zscore",
    "rescale_to_0_1": "rescale_to_0_1",
    "rgb_to_0_1": "rgb_to_0_1",
}
_EPS = 1e-8


# ------------------------------------------------------------------------------------------------------- JSON
def _json_text(obj: Any, indent: int = 0) -> str:
    """Indented JSON with lists of numbers (and lists of such lists) kept on one line."""

    def flat(v: Any) -> bool:
        return not isinstance(v, (dict, list)) or (
            isinstance(v, list) and all(not isinstance(i, (dict, list)) for i in v)
        )

    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_json_text(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and obj and not all(flat(v) for v in obj):
        return "[\n" + ",\n".join(inner + _json_text(v, indent + 2) for v in obj) + f"\n{pad}]"
    return json.dumps(obj)


def _write_json(path: str | os.PathLike, obj: Any) -> Path:
    from maskworks.checkpoint import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, (_json_text(obj) + "\n").encode())
    return path


def _read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON {what} ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a JSON {what} (expected an object)")
    return d


# ------------------------------------------------------------------------------------------------ fingerprint
def _nan_to_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


@dataclass
class ChannelStats:
    """Foreground intensity statistics of one channel over the whole dataset (NaN where there was no foreground)."""

    mean: float = math.nan
    std: float = math.nan
    median: float = math.nan
    min: float = math.nan
    max: float = math.nan
    percentile_00_5: float = math.nan
    percentile_99_5: float = math.nan

    @classmethod
    def of(cls, values: np.ndarray) -> ChannelStats:
        """Statistics of sampled foreground intensities (an empty array gives NaNs)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return cls()
        p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        return cls(
            mean=float(np.mean(values)),
            std=float(np.std(values)),
            median=float(median),
            min=float(np.min(values)),
            max=float(np.max(values)),
            percentile_00_5=float(p005),
            percentile_99_5=float(p995),
        )

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready dict (NaN written as ``None``)."""
        return {k: _nan_to_none(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelStats:
        return cls(**{k: math.nan if d.get(k) is None else float(d[k]) for k in cls.__dataclass_fields__})


@dataclass
class Fingerprint:
    """What the planner needs to know about a dataset.

    Attributes:
        spacings: per case, ``(sz, sy, sx)`` in mm.
        shapes_after_crop: per case, ``(D, H, W)`` after cropping to the non-zero region.
        modalities: one name per channel, e.g. ``"CT"``, ``"T1"``, ``"MRI"``; ``CT`` selects CT normalisation (the
            names ``zscore``, ``nonorm``, ``rescale_to_0_1`` and ``rgb_to_0_1`` select those schemes, as in
            nnU-Net's ``channel_names``; anything else is z-scored per image).
        intensity_stats: per channel foreground statistics (empty when unknown; CT channels need them).
        class_voxel_counts: voxels of each class id ``0..K-1`` over the dataset (its length is the number of
            classes, background included).
        median_relative_size_after_cropping: median over cases of cropped / original voxel count.
    """

    spacings: list[list[float]]
    shapes_after_crop: list[list[int]]
    modalities: list[str]
    intensity_stats: list[ChannelStats] = field(default_factory=list)
    class_voxel_counts: list[int] = field(default_factory=list)
    median_relative_size_after_cropping: float = 1.0

    def __post_init__(self) -> None:
        self.spacings = [[float(v) for v in s] for s in self.spacings]
        self.shapes_after_crop = [[int(v) for v in s] for s in self.shapes_after_crop]
        self.modalities = [str(m) for m in self.modalities]
        self.class_voxel_counts = [int(c) for c in self.class_voxel_counts]
        if not self.spacings:
            raise ValueError("fingerprint: spacings is empty; expected one (sz, sy, sx) per case")
        if len(self.spacings) != len(self.shapes_after_crop):
            raise ValueError(
                f"fingerprint: {len(self.spacings)} spacings but {len(self.shapes_after_crop)} shapes; expected one "
                "of each per case"
            )
        for s, shape in zip(self.spacings, self.shapes_after_crop):
            if len(s) != 3 or min(s) <= 0 or not all(math.isfinite(v) for v in s):
                raise ValueError(f"fingerprint: spacing must be three positive mm values (sz, sy, sx), got {s}")
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"fingerprint: shape must be three positive sizes (D, H, W), got {shape}")
        if not self.modalities:
            raise ValueError("fingerprint: modalities is empty; expected one name per channel (e.g. ['CT'])")
        if self.intensity_stats and len(self.intensity_stats) != len(self.modalities):
            raise ValueError(
                f"fingerprint: {len(self.intensity_stats)} intensity_stats for {len(self.modalities)} channels"
            )
        if any(c < 0 for c in self.class_voxel_counts):
            raise ValueError(f"fingerprint: class_voxel_counts must be >= 0, got {self.class_voxel_counts}")

    @property
    def num_cases(self) -> int:
        return len(self.spacings)

    @property
    def num_channels(self) -> int:
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        """Classes including background (0 when no labels were seen)."""
        return len(self.class_voxel_counts)

    @property
    def class_frequencies(self) -> list[float]:
        """Fraction of labelled voxels in each class."""
        total = sum(self.class_voxel_counts)
        return [c / total if total else 0.0 for c in self.class_voxel_counts]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "spacings": self.spacings,
            "shapes_after_crop": self.shapes_after_crop,
            "modalities": self.modalities,
            "intensity_stats": [s.to_dict() for s in self.intensity_stats],
            "class_voxel_counts": self.class_voxel_counts,
            "class_frequencies": self.class_frequencies,
            "median_relative_size_after_cropping": float(self.median_relative_size_after_cropping),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        """Inverse of :meth:`to_dict` (``class_frequencies`` is derived and ignored)."""
        missing = [k for k in ("spacings", "shapes_after_crop", "modalities") if k not in d]
        if missing:
            raise ValueError(f"fingerprint: missing key(s) {missing}")
        return cls(
            spacings=d["spacings"],
            shapes_after_crop=d["shapes_after_crop"],
            modalities=d["modalities"],
            intensity_stats=[ChannelStats.from_dict(s) for s in d.get("intensity_stats", [])],
            class_voxel_counts=d.get("class_voxel_counts", []),
            median_relative_size_after_cropping=float(d.get("median_relative_size_after_cropping", 1.0)),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the fingerprint as JSON (atomically) and return the path."""
        return _write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Fingerprint:
        """Read a fingerprint written by :meth:`to_json`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a fingerprint.
        """
        return cls.from_dict(_read_json(path, "fingerprint"))


def _nonzero_bbox(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the non-zero region of ``(C, D, H, W)`` (any channel, holes filled); whole image if empty."""
    from scipy.ndimage import binary_fill_holes

    mask = binary_fill_holes(np.any(image != 0, axis=0))
    slices = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, mask.shape[axis]))
    return tuple(slices)


def crop_to_nonzero(image: np.ndarray, label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop ``(C, D, H, W)`` (and its ``(D, H, W)`` label) to the bounding box of the non-zero region.

    The region is where any channel is non-zero, with enclosed holes filled (nnU-Net's ``crop_to_nonzero``); an
    all-zero image is kept whole.

    Returns:
        ``(image, label)`` cropped (views); ``label`` is ``None`` when none was given.
    """
    box = _nonzero_bbox(image)
    return image[(slice(None), *box)], (label[box] if label is not None else None)


def _check_case(i: int, image: Any, label: Any, spacing: Any) -> tuple[np.ndarray, np.ndarray | None, list[float]]:
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(
            f"case {i}: image must be (C, D, H, W), got shape {image.shape} (use image[None] for one channel)"
        )
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape[1:]:
            raise ValueError(f"case {i}: label shape {label.shape} differs from the image's {image.shape[1:]}")
        if not np.issubdtype(label.dtype, np.integer):
            if not np.array_equal(label, np.round(label)):
                raise ValueError(f"case {i}: label must hold integer class ids, got non-integer values")
            label = label.astype(np.int64)
        if label.size and label.min() < 0:
            raise ValueError(f"case {i}: label must hold class ids >= 0, got {label.min()}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"case {i}: spacing must be three positive mm values (sz, sy, sx), got {spacing}")
    return image, label, spacing


def compute_fingerprint(
    cases: Iterable[tuple[np.ndarray, np.ndarray | None, Sequence[float]]],
    modalities: Sequence[str],
    *,
    num_classes: int | None = None,
    samples_per_case: int = 10_000,
    seed: int = FOREGROUND_SEED,
    ignore_index: int = IGNORE_INDEX,
) -> Fingerprint:
    """Fingerprint a dataset the way nnU-Net's ``DatasetFingerprintExtractor`` does.

    Each case is cropped to its non-zero region; from the cropped image, ``samples_per_case`` foreground intensities
    per channel are drawn with replacement (``np.random.RandomState(seed)`` afresh for every case, as nnU-Net does),
    and the dataset's statistics are computed over all the samples. Foreground is label > 0 (``ignore_index`` voxels
    excluded); a case without a label uses its non-zero region instead.

    Args:
        cases: ``(image (C, D, H, W), label (D, H, W) int or None, spacing (sz, sy, sx))`` per case.
        modalities: one name per channel (``"CT"`` selects CT normalisation in the plan).
        num_classes: classes including background; default the largest label seen + 1.
        samples_per_case: foreground intensities drawn per case and channel. nnU-Net draws ``10**8 // cases``;
            pass that to reproduce its statistics exactly.
        seed: seed of the sampling.
        ignore_index: label value that is neither foreground nor counted as a class.

    Returns:
        The :class:`Fingerprint`; ``class_voxel_counts`` count the labels of the whole (uncropped) volumes.

    Raises:
        ValueError: no cases, a malformed case, or channels / classes that disagree with the arguments.
    """
    modalities = [str(m) for m in modalities]
    if samples_per_case < 1:
        raise ValueError(f"samples_per_case must be >= 1, got {samples_per_case}")
    spacings: list[list[float]] = []
    shapes: list[list[int]] = []
    relative_sizes: list[float] = []
    samples: list[list[np.ndarray]] = [[] for _ in modalities]
    counts = np.zeros(max(num_classes or 0, 0), dtype=np.int64)
    for i, case in enumerate(cases):
        image, label, spacing = _check_case(i, *case)
        if image.shape[0] != len(modalities):
            raise ValueError(f"case {i}: {image.shape[0]} channels but {len(modalities)} modalities {modalities}")
        if label is not None:
            ids = label[label != ignore_index].ravel()
            case_counts = np.bincount(ids, minlength=counts.size)
            if num_classes is not None and case_counts.size > num_classes:
                raise ValueError(f"case {i}: label {case_counts.size - 1} >= num_classes={num_classes}")
            if case_counts.size > counts.size:
                counts = np.pad(counts, (0, case_counts.size - counts.size))
            counts += case_counts
        cropped, cropped_label = crop_to_nonzero(image, label)
        if cropped_label is not None:
            foreground = (cropped_label > 0) & (cropped_label != ignore_index)
        else:
            from scipy.ndimage import binary_fill_holes

            foreground = binary_fill_holes(np.any(cropped != 0, axis=0))
        rs = np.random.RandomState(seed)
        for c in range(len(modalities)):
            values = cropped[c][foreground]
            if values.size:
                samples[c].append(rs.choice(values, samples_per_case, replace=True))
        spacings.append(spacing)
        shapes.append(list(cropped.shape[1:]))
        relative_sizes.append(float(np.prod(cropped.shape[1:]) / np.prod(image.shape[1:])))
    if not spacings:
        raise ValueError("cases is empty; expected at least one (image, label, spacing)")
    stats = [ChannelStats.of(np.concatenate(s) if s else np.empty(0)) for s in samples]
    return Fingerprint(
        spacings=spacings,
        shapes_after_crop=shapes,
        modalities=modalities,
        intensity_stats=stats,
        class_voxel_counts=counts.tolist(),
        median_relative_size_after_cropping=float(np.median(relative_sizes)),
    )


# --------------------------------------------------------------------------------------------- spacing / shape
def target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """The ``3d_fullres`` target spacing: the median, or for strongly anisotropic data a finer coarse axis.

    When the coarsest median spacing exceeds ``anisotropy_threshold`` x the next coarsest one *and* that axis has
    ``anisotropy_threshold`` x fewer (median) voxels than the shortest other axis, the coarse axis takes the 10th
    percentile of its spacings, but never finer than the other axes (then their coarsest + 1e-5).

    Args:
        spacings: per case ``(sz, sy, sx)``.
        shapes: per case ``(D, H, W)`` (after cropping).
        anisotropy_threshold: the factor for both tests (nnU-Net: 3).

    Returns:
        ``(3,)`` float64, in the order of the input axes.
    """
    spacings = np.vstack(spacings).astype(np.float64)
    target = np.percentile(spacings, 50, axis=0)
    median_size = np.percentile(np.vstack(shapes), 50, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    others_max = max(target[a] for a in others)
    aniso_spacing = target[coarse] > anisotropy_threshold * others_max
    aniso_voxels = median_size[coarse] * anisotropy_threshold < min(median_size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        value = np.percentile(spacings[:, coarse], 10)
        if value < others_max:
            value = max(others_max, value) + 1e-5
        target[coarse] = value
    return target


def _resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    return [int(round(s / n * d)) for d, s, n in zip(shape, spacing, new_spacing)]


# -------------------------------------------------------------------------------------------------- topology
@dataclass
class Topology:
    """A U-Net topology for one patch size (nnU-Net's ``get_pool_and_conv_props``).

    Attributes:
        num_pool_per_axis: how often each axis is halved.
        strides: per stage, the stride of its first conv (stage 0: all 1).
        kernel_sizes: per stage, the conv kernel (1 on axes much coarser than the finest one).
        patch_size: the patch padded up to a multiple of ``2 ** num_pool_per_axis``.
        divisor: ``2 ** num_pool_per_axis``.
    """

    num_pool_per_axis: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]
    divisor: list[int]


def pool_and_conv_props(
    spacing: Sequence[float], patch_size: Sequence[float], min_feature_map_size: int = MIN_FEATURE_MAP_SIZE
) -> Topology:
    """Pooling per axis and conv kernels for a patch, from the voxel spacing.

    At every stage the axes still at least ``2 * min_feature_map_size`` long whose (current) spacing is within a
    factor 2 of the finest such axis are halved; a lone such axis needs ``3 * min_feature_map_size``. An axis's
    kernel is 3 once its spacing is within a factor 2 of the finest spacing, else 1 (e.g. 1 x 3 x 3 for thick
    slices). The bottleneck kernel is 3 on every axis.

    Args:
        spacing: voxel spacing per axis.
        patch_size: patch size per axis (may be fractional; it is padded to the divisor).
        min_feature_map_size: smallest bottleneck edge (nnU-Net: 4).

    Returns:
        The :class:`Topology`.
    """
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    num_pool = [0] * dim
    kernel = [1] * dim
    strides = [[1] * dim]
    kernels = []
    while True:
        axes = [a for a in range(dim) if cur_size[a] >= 2 * min_feature_map_size]
        if not axes:
            break
        finest = min(cur_spacing[a] for a in axes)
        axes = [a for a in axes if cur_spacing[a] / finest < 2]
        if len(axes) == 1 and cur_size[axes[0]] < 3 * min_feature_map_size:
            break
        overall_finest = min(cur_spacing)
        kernel = [3 if k == 3 or cur_spacing[a] / overall_finest < 2 else 1 for a, k in enumerate(kernel)]
        kernels.append(list(kernel))
        strides.append([2 if a in axes else 1 for a in range(dim)])
        for a in axes:
            num_pool[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
    kernels.append([3] * dim)
    divisor = [2**n for n in num_pool]
    padded = [int(math.ceil(s / d) * d) for s, d in zip(patch_size, divisor)]
    return Topology(num_pool, strides, kernels, padded, divisor)


def _features_per_stage(num_stages: int, dim: int) -> list[int]:
    return [min(MAX_FEATURES[dim], BASE_FEATURES * 2**i) for i in range(num_stages)]


def estimate_feature_map_size(
    patch_size: Sequence[int], strides: Sequence[Sequence[int]], filters: Sequence[int], num_classes: int
) -> int:
    """Voxels of all conv outputs of nnU-Net's plain U-Net for one patch (its memory proxy).

    The encoder has two convs per stage, the decoder a transposed conv and two convs per stage, and one
    segmentation output at full resolution (``compute_conv_feature_map_size`` of
    ``dynamic_network_architectures``' ``PlainConvUNet`` without deep supervision).

    Args:
        patch_size: patch size per axis.
        strides: per stage stride (stage 0 included).
        filters: features per stage.
        num_classes: output channels.
    """
    sizes = []
    size = [int(s) for s in patch_size]
    for stride in strides:
        size = [s // t for s, t in zip(size, stride)]
        sizes.append(math.prod(size))
    total = sum(CONVS_PER_STAGE * f * n for f, n in zip(filters, sizes))  # encoder
    total += sum((CONVS_PER_STAGE + 1) * f * n for f, n in zip(filters[:-1], sizes[:-1]))  # decoder + transp conv
    return int(total + num_classes * sizes[0])


# ------------------------------------------------------------------------------------------------ normalisation
@dataclass
class ChannelNormalization:
    """How one channel is normalised.

    Attributes:
        scheme: ``"ct"`` (clip to ``clip``, then ``(x - mean) / std`` with the dataset's foreground statistics),
            ``"zscore"`` (each image's own mean / std), ``"none"``, ``"rescale_to_0_1"`` (each image's min / max) or
            ``"rgb_to_0_1"`` (``x / 255``).
        use_mask: z-score: statistics and normalisation inside the non-zero region only.
        clip: ``(lower, upper)`` for ``ct``.
        mean: dataset foreground mean for ``ct``.
        std: dataset foreground std for ``ct``.
    """

    scheme: str
    use_mask: bool = False
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in set(_SCHEMES.values()):
            raise ValueError(
                f"normalization scheme must be one of {sorted(set(_SCHEMES.values()))}, got {self.scheme!r}"
            )
        if self.scheme == "ct":
            if self.clip is None or self.mean is None or self.std is None:
                raise ValueError("normalization scheme 'ct' needs clip, mean and std (the dataset's foreground stats)")
            values = [*self.clip, self.mean, self.std]
            if not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"normalization scheme 'ct' needs finite clip, mean and std, got {values}")
            self.clip = (float(self.clip[0]), float(self.clip[1]))
            self.mean, self.std = float(self.mean), float(self.std)

    def apply(self, image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Normalise one channel.

        Args:
            image: the channel, any shape.
            mask: the non-zero region (bool, same shape), used by ``zscore`` when ``use_mask`` is set; voxels outside
                it are left as they are (zero after cropping).

        Returns:
            float32 array.
        """
        x = np.array(image, dtype=np.float32)
        if self.scheme == "ct":
            np.clip(x, self.clip[0], self.clip[1], out=x)
            return (x - self.mean) / max(self.std, _EPS)
        if self.scheme == "zscore":
            if self.use_mask and mask is not None:
                inside = x[mask]
                x[mask] = (inside - inside.mean()) / max(float(inside.std()), _EPS)
                return x
            return (x - x.mean()) / max(float(x.std()), _EPS)
        if self.scheme == "rescale_to_0_1":
            x -= x.min()
            return x / max(float(x.max()), _EPS)
        if self.scheme == "rgb_to_0_1":
            return x / 255.0
        return x

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"scheme": self.scheme, "use_mask": self.use_mask}
        if self.scheme == "ct":
            d.update(clip=list(self.clip), mean=self.mean, std=self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelNormalization:
        clip = d.get("clip")
        return cls(
            d.get("scheme"), bool(d.get("use_mask", False)), tuple(clip) if clip else None, d.get("mean"), d.get("std")
        )


def normalization_for(fingerprint: Fingerprint) -> list[ChannelNormalization]:
    """Per-channel normalisation from the modality names (nnU-Net's ``channel_names`` mapping).

    ``CT`` (any case) -> ``ct`` with the foreground percentiles 0.5 / 99.5 as clip and the foreground mean / std;
    ``nonorm``, ``zscore``, ``rescale_to_0_1``, ``rgb_to_0_1`` -> those schemes; anything else -> ``zscore``. The
    z-score uses the non-zero mask when cropping left less than 3/4 of the median image.

    Raises:
        ValueError: a CT channel without (finite) intensity statistics.
    """
    use_mask = fingerprint.median_relative_size_after_cropping < 0.75
    out = []
    for c, name in enumerate(fingerprint.modalities):
        scheme = _SCHEMES.get(name.casefold(), "zscore")
        if scheme == "ct":
            if not fingerprint.intensity_stats or not math.isfinite(fingerprint.intensity_stats[c].std):
                raise ValueError(
                    f"channel {c} ({name}) uses CT normalisation, which needs the dataset's foreground intensity "
                    "statistics; the fingerprint has none for it (no foreground voxels?)"
                )
            s = fingerprint.intensity_stats[c]
            out.append(ChannelNormalization("ct", False, (s.percentile_00_5, s.percentile_99_5), s.mean, s.std))
        else:
            out.append(ChannelNormalization(scheme, use_mask and scheme == "zscore"))
    return out


# ----------------------------------------------------------------------------------------------------- plans
@dataclass
class Configuration:
    """One planned configuration (``3d_fullres`` or ``2d``); sizes in the data's axis order.

    Attributes:
        name: ``"3d_fullres"`` or ``"2d"``.
        axes: the data axes (of ``D, H, W`` = 0, 1, 2) the spatial sizes below refer to: ``[0, 1, 2]`` in 3D; in 2D
            the two in-plane axes (slices are taken across the remaining one, :attr:`slice_axis`).
        patch_size: training patch per axis.
        batch_size: patches per batch.
        spacing: target spacing per axis (mm).
        median_shape: median image size at ``spacing`` per axis.
        kernel_size: per stage conv kernel (MONAI ``DynUNet`` ``kernel_size``).
        strides: per stage stride, the first all ones (``DynUNet`` ``strides``).
        filters: features per stage (``DynUNet`` ``filters``).
        feature_map_size: the U-Net's feature-map voxels for one patch (the memory estimate).
    """

    name: str
    axes: list[int]
    patch_size: list[int]
    batch_size: int
    spacing: list[float]
    median_shape: list[float]
    kernel_size: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    feature_map_size: int

    @property
    def dimension(self) -> str:
        """``"3d"`` or ``"2d"``."""
        return f"{len(self.patch_size)}d"

    @property
    def upsample_kernel_size(self) -> list[list[int]]:
        """``DynUNet`` ``upsample_kernel_size``: the strides of the stages below the first."""
        return [list(s) for s in self.strides[1:]]

    @property
    def slice_axis(self) -> int | None:
        """2D: the data axis slices are taken across; 3D: ``None``."""
        return None if len(self.axes) == 3 else next(a for a in range(3) if a not in self.axes)

    @property
    def num_pool_per_axis(self) -> list[int]:
        return [sum(1 for s in self.strides if s[a] == 2) for a in range(len(self.axes))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived ``dimension``, ``upsample_kernel_size`` and ``slice_axis``."""
        return {
            "name": self.name,
            "dimension": self.dimension,
            "axes": list(self.axes),
            "slice_axis": self.slice_axis,
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "spacing": list(self.spacing),
            "median_shape": list(self.median_shape),
            "kernel_size": [list(k) for k in self.kernel_size],
            "strides": [list(s) for s in self.strides],
            "upsample_kernel_size": self.upsample_kernel_size,
            "filters": list(self.filters),
            "feature_map_size": self.feature_map_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Configuration:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a missing key, or a derived value (``dimension``, ``upsample_kernel_size``) that disagrees
                with the fields it derives from (e.g. edited by hand).
        """
        keys = [k for k in cls.__dataclass_fields__ if k not in d]
        if keys:
            raise ValueError(f"plan configuration {d.get('name')!r}: missing key(s) {keys}")
        conf = cls(
            name=str(d["name"]),
            axes=[int(a) for a in d["axes"]],
            patch_size=[int(p) for p in d["patch_size"]],
            batch_size=int(d["batch_size"]),
            spacing=[float(s) for s in d["spacing"]],
            median_shape=[float(s) for s in d["median_shape"]],
            kernel_size=[[int(k) for k in ks] for ks in d["kernel_size"]],
            strides=[[int(s) for s in st] for st in d["strides"]],
            filters=[int(f) for f in d["filters"]],
            feature_map_size=int(d["feature_map_size"]),
        )
        for key in ("dimension", "upsample_kernel_size", "slice_axis"):
            if key in d and d[key] != getattr(conf, key):
                raise ValueError(
                    f"plan configuration {conf.name!r}: {key} {d[key]} disagrees with the value derived from its "
                    f"other fields ({getattr(conf, key)}); edit patch_size / strides / axes instead"
                )
        return conf


_CHOSEN_KEYS = (
    "dimension",
    "patch_size",
    "batch_size",
    "spacing",
    "kernel_size",
    "strides",
    "upsample_kernel_size",
    "filters",
    "slice_axis",
)


@dataclass
class Plan:
    """An experiment plan: the configurations and what every configuration shares.

    Attributes:
        configuration: the configuration to train (``"3d_fullres"`` unless the data are effectively 2D).
        configurations: ``"3d_fullres"`` (absent for 2D data) and ``"2d"``.
        num_input_channels: image channels.
        num_classes: output classes, background included.
        normalization: per channel.
        modalities: per channel names from the fingerprint.
        transpose_forward: the axis order nnU-Net plans in (coarsest target spacing first); for reference, the
            sizes here are already in the data's order.
        median_spacing: the dataset's median spacing ``(sz, sy, sx)``.
        median_shape: the dataset's median cropped shape ``(D, H, W)``.
        gpu_memory_target_gb: the memory budget planned for.
    """

    configuration: str
    configurations: dict[str, Configuration]
    num_input_channels: int
    num_classes: int
    normalization: list[ChannelNormalization]
    modalities: list[str]
    transpose_forward: list[int]
    median_spacing: list[float]
    median_shape: list[float]
    gpu_memory_target_gb: float

    def __post_init__(self) -> None:
        if self.configuration not in self.configurations:
            raise ValueError(f"plan: configuration {self.configuration!r} is not among {sorted(self.configurations)}")

    @property
    def chosen(self) -> Configuration:
        """The configuration to train."""
        return self.configurations[self.configuration]

    @property
    def dimension(self) -> str:
        return self.chosen.dimension

    @property
    def patch_size(self) -> list[int]:
        return self.chosen.patch_size

    @property
    def batch_size(self) -> int:
        return self.chosen.batch_size

    @property
    def spacing(self) -> list[float]:
        return self.chosen.spacing

    @property
    def kernel_size(self) -> list[list[int]]:
        return self.chosen.kernel_size

    @property
    def strides(self) -> list[list[int]]:
        return self.chosen.strides

    @property
    def upsample_kernel_size(self) -> list[list[int]]:
        return self.chosen.upsample_kernel_size

    @property
    def filters(self) -> list[int]:
        return self.chosen.filters

    def dynunet_kwargs(self, configuration: str | None = None) -> dict[str, Any]:
        """Keyword arguments of a ``dynunet`` model (MONAI ``DynUNet`` names) for a configuration (default: the
        chosen one): ``spatial_dims``, ``in_channels``, ``out_channels``, ``kernel_size``, ``strides``,
        ``upsample_kernel_size``, ``filters``."""
        conf = self.configurations[configuration or self.configuration]
        return {
            "spatial_dims": len(conf.patch_size),
            "in_channels": self.num_input_channels,
            "out_channels": self.num_classes,
            "kernel_size": [list(k) for k in conf.kernel_size],
            "strides": [list(s) for s in conf.strides],
            "upsample_kernel_size": conf.upsample_kernel_size,
            "filters": list(conf.filters),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict. The chosen configuration's fields are also copied to the top level (``patch_size``,
        ``batch_size``, ``spacing``, ``kernel_size``, ``strides``, ``upsample_kernel_size``, ``filters``,
        ``dimension``, ``slice_axis``) for readers that want only them."""
        chosen = self.chosen.to_dict()
        return {
            "configuration": self.configuration,
            **{k: chosen[k] for k in _CHOSEN_KEYS},
            "num_input_channels": self.num_input_channels,
            "num_classes": self.num_classes,
            "normalization": [n.to_dict() for n in self.normalization],
            "modalities": list(self.modalities),
            "transpose_forward": list(self.transpose_forward),
            "median_spacing": list(self.median_spacing),
            "median_shape": list(self.median_shape),
            "gpu_memory_target_gb": self.gpu_memory_target_gb,
            "configurations": {k: c.to_dict() for k, c in self.configurations.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a missing key, or a top-level copy that disagrees with the chosen configuration.
        """
        keys = ("configuration", "configurations", "num_input_channels", "num_classes", "normalization")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"plan: missing key(s) {missing}")
        plan = cls(
            configuration=str(d["configuration"]),
            configurations={k: Configuration.from_dict(c) for k, c in d["configurations"].items()},
            num_input_channels=int(d["num_input_channels"]),
            num_classes=int(d["num_classes"]),
            normalization=[ChannelNormalization.from_dict(n) for n in d["normalization"]],
            modalities=[str(m) for m in d.get("modalities", [])],
            transpose_forward=[int(a) for a in d.get("transpose_forward", [0, 1, 2])],
            median_spacing=[float(s) for s in d.get("median_spacing", [])],
            median_shape=[float(s) for s in d.get("median_shape", [])],
            gpu_memory_target_gb=float(d.get("gpu_memory_target_gb", REFERENCE_GB)),
        )
        chosen = plan.chosen.to_dict()
        for k in _CHOSEN_KEYS:
            if k in d and d[k] != chosen[k]:
                raise ValueError(
                    f"plan: top-level {k} {d[k]} differs from configurations[{plan.configuration!r}].{k} {chosen[k]}; "
                    "edit the configuration (the top-level keys are copies)"
                )
        return plan

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically) and return the path."""
        return _write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`to_json`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a plan.
        """
        return cls.from_dict(_read_json(path, "plan"))


def _plan_configuration(
    name: str,
    spacing: np.ndarray,
    median_shape: np.ndarray,
    num_classes: int,
    dataset_voxels: float,
    gpu_memory_target_gb: float,
) -> tuple[list[int], int, Topology, list[int], int]:
    """Patch size, batch size and topology in planning (transposed) axis order: nnU-Net's
    ``get_plans_for_configuration``. Returns ``(patch, batch, topology, filters, feature_map_size)``."""
    dim = len(spacing)
    inverse = 1 / np.asarray(spacing, dtype=np.float64)
    edge = INITIAL_PATCH_EDGE[dim]
    # a volume of edge**dim voxels shaped like the physical aspect ratio, clipped to the median image
    initial = [round(v) for v in inverse * (edge**dim / np.prod(inverse)) ** (1 / dim)]
    initial = [min(i, m) for i, m in zip(initial, median_shape)]
    topo = pool_and_conv_props(spacing, initial)
    filters = _features_per_stage(len(topo.strides), dim)
    estimate = estimate_feature_map_size(topo.patch_size, topo.strides, filters, num_classes)
    reference = REFERENCE_FEATURE_MAP_SIZE[dim] * (gpu_memory_target_gb / REFERENCE_GB)
    ref_bs = REFERENCE_BATCH_SIZE[dim]
    patch = list(topo.patch_size)
    while estimate / ref_bs * MIN_BATCH_SIZE > reference:
        # shrink the axis largest relative to the median shape (ties: the last such axis)
        axis = int(np.argsort([p / m for p, m in zip(patch, median_shape)], kind="stable")[-1])
        if patch[axis] <= topo.divisor[axis]:
            raise ValueError(
                f"{name}: no patch fits gpu_memory_target_gb={gpu_memory_target_gb} (reached {patch}); "
                "give a larger memory budget"
            )
        # step down by the divisor of the next smaller size, so no valid size is skipped (224 between 256 and 192)
        trial = list(patch)
        trial[axis] -= topo.divisor[axis]
        patch[axis] -= pool_and_conv_props(spacing, trial).divisor[axis]
        topo = pool_and_conv_props(spacing, patch)
        patch = list(topo.patch_size)
        filters = _features_per_stage(len(topo.strides), dim)
        estimate = estimate_feature_map_size(patch, topo.strides, filters, num_classes)
    batch = round(reference / estimate * ref_bs)
    cap = round(dataset_voxels * MAX_DATASET_FRACTION / np.prod(patch, dtype=np.float64))
    batch = max(min(batch, cap), MIN_BATCH_SIZE)
    return patch, int(batch), topo, filters, int(estimate)


def plan_experiment(
    fingerprint: Fingerprint,
    gpu_memory_target_gb: float = 8.0,
    *,
    num_classes: int | None = None,
    dimension: str = "auto",
) -> Plan:
    """Plan training from a dataset fingerprint with nnU-Net v2's default rules (see the module docstring).

    Args:
        fingerprint: the dataset's :class:`Fingerprint`.
        gpu_memory_target_gb: memory budget; patch and batch scale with it (nnU-Net's reference: 8).
        num_classes: output classes including background; default the fingerprint's (at least 2).
        dimension: which configuration the plan selects: ``"auto"`` (``3d_fullres`` unless the data are
            effectively 2D, i.e. the median resampled size is 1 along the coarsest axis), ``"3d"`` or ``"2d"``.

    Returns:
        The :class:`Plan` with the ``3d_fullres`` (3D data only) and ``2d`` configurations.

    Raises:
        ValueError: bad arguments, too few classes, ``"3d"`` for 2D data, a CT channel without statistics, or a
            budget too small for any patch.
    """
    if not gpu_memory_target_gb > 0:
        raise ValueError(f"gpu_memory_target_gb must be > 0, got {gpu_memory_target_gb}")
    if dimension not in ("auto", "3d", "2d"):
        raise ValueError(f"dimension must be 'auto', '3d' or '2d', got {dimension!r}")
    classes = num_classes if num_classes is not None else max(fingerprint.num_classes, 2)
    if classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {classes}")
    normalization = normalization_for(fingerprint)

    spacing = target_spacing(fingerprint.spacings, fingerprint.shapes_after_crop)
    coarse = int(np.argmax(spacing))
    forward = [coarse] + [a for a in range(3) if a != coarse]  # nnU-Net plans with the coarsest axis first
    new_shapes = [
        _resampled_shape(sh, sp, spacing) for sh, sp in zip(fingerprint.shapes_after_crop, fingerprint.spacings)
    ]
    median_shape = np.median(new_shapes, axis=0)
    spacing_t, median_t = spacing[forward], median_shape[forward]
    dataset_voxels = float(np.prod(median_t, dtype=np.float64) * fingerprint.num_cases)

    configurations: dict[str, Configuration] = {}
    if median_t[0] != 1:
        patch, batch, topo, filters, estimate = _plan_configuration(
            "3d_fullres", spacing_t, median_t, classes, dataset_voxels, gpu_memory_target_gb
        )

        def back(v: Sequence) -> list:  # planning order -> data order
            return [v[forward.index(a)] for a in range(3)]

        configurations["3d_fullres"] = Configuration(
            name="3d_fullres",
            axes=[0, 1, 2],
            patch_size=[int(p) for p in back(patch)],
            batch_size=batch,
            spacing=[float(s) for s in spacing],
            median_shape=[float(m) for m in median_shape],
            kernel_size=[back(k) for k in topo.kernel_sizes],
            strides=[back(s) for s in topo.strides],
            filters=filters,
            feature_map_size=estimate,
        )
    patch, batch, topo, filters, estimate = _plan_configuration(
        "2d", spacing_t[1:], median_t[1:], classes, dataset_voxels, gpu_memory_target_gb
    )
    configurations["2d"] = Configuration(
        name="2d",
        axes=forward[1:],  # ascending, so the 2D sizes are in the data's order too
        patch_size=[int(p) for p in patch],
        batch_size=batch,
        spacing=[float(s) for s in spacing_t[1:]],
        median_shape=[float(m) for m in median_t[1:]],
        kernel_size=[list(k) for k in topo.kernel_sizes],
        strides=[list(s) for s in topo.strides],
        filters=filters,
        feature_map_size=estimate,
    )
    if dimension == "3d" and "3d_fullres" not in configurations:
        raise ValueError(
            f"dimension='3d' but the data are 2D (median size 1 along axis {coarse} at the target spacing)"
        )
    chosen = "2d" if dimension == "2d" or "3d_fullres" not in configurations else "3d_fullres"
    return Plan(
        configuration=chosen,
        configurations=configurations,
        num_input_channels=fingerprint.num_channels,
        num_classes=int(classes),
        normalization=normalization,
        modalities=list(fingerprint.modalities),
        transpose_forward=forward,
        median_spacing=[float(v) for v in np.median(fingerprint.spacings, axis=0)],
        median_shape=[float(v) for v in np.median(fingerprint.shapes_after_crop, axis=0)],
        gpu_memory_target_gb=float(gpu_memory_target_gb),
    )


# ------------------------------------------------------------------------------------- MSD / nnU-Net raw folders
def msd_dataset(root: str | os.PathLike) -> dict[str, Any]:
    """Describe a Medical Segmentation Decathlon / nnU-Net raw folder without reading volumes.

    Cases are ``imagesTr/<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... (one file per channel, nnU-Net) or
    ``imagesTr/<case>.nii.gz`` (MSD; a 4D file holds the channels last), labels ``labelsTr/<case>.nii.gz``. An
    optional ``dataset.json`` gives ``channel_names`` (or MSD's ``modality``) and ``labels``.

    Returns:
        ``{"cases": [(case id, [image paths], label path or None)], "modalities": [names] or None,
        "num_classes": int or None}``.

    Raises:
        FileNotFoundError: no ``imagesTr`` folder.
        ValueError: no volumes, a case missing a channel, or an unreadable ``dataset.json``.
    """
    from maskworks.data.volumes import msd_cases

    root = Path(root)
    if not (root / "imagesTr").is_dir():
        raise FileNotFoundError(f"{root}: expected an imagesTr/ folder (Medical Segmentation Decathlon layout)")
    cases = [(c["id"], c["images"], c["label"]) for c in msd_cases(root)]
    modalities = num_classes = None
    meta_file = root / "dataset.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file}: not valid JSON ({e})") from e
        names = meta.get("channel_names", meta.get("modality"))
        if isinstance(names, dict):
            modalities = [str(names[k]) for k in sorted(names, key=int)]
        if isinstance(meta.get("labels"), dict):
            num_classes = len(meta["labels"])
    return {"cases": cases, "modalities": modalities, "num_classes": num_classes}


def _read_nifti(path: Path) -> tuple[np.ndarray, list[float]]:
    """``(D, H, W)`` or ``(C, D, H, W)`` float32 and spacing ``(sz, sy, sx)`` (module docstring convention)."""
    from maskworks.data.volumes import read_nifti

    array, info = read_nifti(path)
    return array.astype(np.float32, copy=False), list(info.spacing)


def iter_msd_cases(root: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[float]]]:
    """Read the training cases of an MSD / nnU-Net raw folder (see :func:`msd_dataset`) one at a time.

    A NIfTI array indexed ``(x, y, z)`` becomes ``(D, H, W) = (z, y, x)`` (transposed ``(2, 1, 0)``) and its
    spacing the header's zooms reversed, ``(sz, sy, sx)``; channels come first.

    Yields:
        ``(image float32 (C, D, H, W), label int64 (D, H, W) or None, spacing (sz, sy, sx))`` per case.

    Raises:
        ValueError: channels or label with a different shape than the case's first image.
    """
    for cid, files, label_file in msd_dataset(root)["cases"]:
        parts, spacing = [], None
        for f in files:
            data, sp = _read_nifti(f)
            spacing = spacing or sp
            parts.extend([data] if data.ndim == 3 else list(data))
        if any(p.shape != parts[0].shape for p in parts):
            raise ValueError(f"case {cid!r}: channel shapes differ {[p.shape for p in parts]}")
        label = None
        if label_file is not None:
            lab, _ = _read_nifti(label_file)
            if lab.shape != parts[0].shape:
                raise ValueError(f"{label_file}: label shape {lab.shape} differs from the image's {parts[0].shape}")
            label = np.rint(lab).astype(np.int64)
        yield np.stack(parts), label, spacing
