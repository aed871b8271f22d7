"""Volumes: NIfTI reading and writing (``nibabel``), the Medical Segmentation Decathlon / nnU-Net raw folder layout,
synthetic volumes, intensity normalisation, resampling and cross-validation splits.

Axis convention (as SimpleITK and nnU-Net): a NIfTI array indexed ``(i, j, k)`` (``x, y, z`` voxel axes) becomes a
tensor ``(D, H, W) = (k, j, i)``, i.e. the array transposed ``(2, 1, 0)``, and the spacing is the header's zooms
reversed, ``(sz, sy, sx)`` in millimetres. Multi-channel NIfTI files ``(i, j, k, c)`` become ``(C, D, H, W)``.
Writing transposes back and keeps the affine and header of the reference volume, so a prediction overlays its
input in any viewer's world coordinates.

Samples of the volume datasets are dicts ``{"image": float32 (C, D, H, W), "mask": int64 (D, H, W), "meta": {...}}``
with ``meta`` holding ``file``, ``index``, ``spacing`` and ``affine``; labels use ``ignore_index`` 255 like the 2D
datasets.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from maskworks.data.io import IGNORE_INDEX, DatasetError

__all__ = [
    "VolumeInfo",
    "read_nifti",
    "write_nifti",
    "normalize_volume",
    "resampled_shape",
    "resample_image",
    "resample_label",
    "kfold_splits",
    "msd_cases",
    "NiftiFolder",
    "SyntheticVolumes",
    "collate_volumes",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nibabel():
    try:
        import nibabel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f'NIfTI volumes need nibabel: pip install "maskworks[medical]" ({e})') from e
    return nibabel


@dataclass
class VolumeInfo:
    """Where a volume sits in the world: its affine (voxel ``(i, j, k)`` -> scanner millimetres), spacing
    ``(sz, sy, sx)``, array shape ``(D, H, W)`` and, for files, the NIfTI header and path."""

    affine: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    header: Any = None
    file: str | None = None

    @classmethod
    def from_spacing(cls, spacing: Sequence[float], shape: Sequence[int]) -> VolumeInfo:
        """A diagonal affine with ``spacing`` (``(sz, sy, sx)``) and the origin at 0."""
        sz, sy, sx = (float(s) for s in spacing)
        return cls(np.diag([sx, sy, sz, 1.0]), (sz, sy, sx), tuple(int(s) for s in shape))


def _nifti_name(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path) -> tuple[np.ndarray, VolumeInfo]:
    """Read a NIfTI file as ``(D, H, W)`` (or ``(C, D, H, W)`` for a 4D file) with its :class:`VolumeInfo`.

    Raises:
        FileNotFoundError: no such file.
        DatasetError: not a readable NIfTI volume (3D or 4D).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NIfTI file")
    nib = _nibabel()
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable NIfTI volume ({e})") from e
    if data.ndim == 3:
        array = np.ascontiguousarray(data.transpose(2, 1, 0))
    elif data.ndim == 4:
        array = np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    else:
        raise DatasetError(f"{path}: expected a 3D or 4D NIfTI volume, got {data.ndim} dimensions {data.shape}")
    # the header stores float32: keep its shortest decimal (0.7, not 0.699999988079071)
    zooms = tuple(float(str(np.float32(z))) for z in img.header.get_zooms()[:3])
    info = VolumeInfo(
        np.asarray(img.affine, dtype=np.float64), zooms[::-1], tuple(array.shape[-3:]), img.header, str(path)
    )
    return array, info


def write_nifti(
    path: str | Path, array: np.ndarray | torch.Tensor, like: VolumeInfo | str | Path | None = None, dtype=None
) -> Path:
    """Write ``(D, H, W)`` (or ``(C, D, H, W)``) to NIfTI with the affine and header of ``like`` (a
    :class:`VolumeInfo`, or a NIfTI file to copy them from; default an identity affine).

    Raises:
        ValueError: the array's spatial shape differs from ``like``'s.
    """
    nib = _nibabel()
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"array must be (D, H, W) or (C, D, H, W), got shape {array.shape}")
    if isinstance(like, (str, Path)):
        like = read_nifti(like)[1]
    if dtype is not None:
        array = array.astype(dtype)
    elif array.dtype == np.int64:
        array = array.astype(np.int16 if array.min() >= -32768 and array.max() <= 32767 else np.int32)
    elif array.dtype == bool:
        array = array.astype(np.uint8)
    data = array.transpose(2, 1, 0) if array.ndim == 3 else array.transpose(3, 2, 1, 0)
    if like is not None:
        if tuple(array.shape[-3:]) != tuple(like.shape):
            raise ValueError(f"array shape {array.shape[-3:]} differs from the reference volume's {like.shape}")
        header = like.header.copy() if like.header is not None else None
        img = nib.Nifti1Image(np.ascontiguousarray(data), like.affine, header)
        if header is None:
            img.header.set_zooms(tuple(like.spacing[::-1]) + img.header.get_zooms()[3:])
    else:
        img = nib.Nifti1Image(np.ascontiguousarray(data), np.eye(4))
    img.set_data_dtype(data.dtype)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0  # labels and logits stored as they are
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".part-{path.name}")  # same suffix, so nibabel compresses it the same way
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- normalisation


def normalize_volume(image: np.ndarray | torch.Tensor, schemes: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
    """Normalise each channel of ``(C, D, H, W)`` as nnU-Net does.

    Args:
        image: the raw volume.
        schemes: one dict per channel: ``{"scheme": "zscore"}`` (this image's mean / std, the default for MRI and
            anything not CT), ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}`` (clip to the dataset's
            foreground percentiles 0.5 / 99.5, then the dataset's foreground mean / std), ``"rescale_to_0_1"``,
            ``"rgb_to_0_1"`` (divide by 255) or ``"none"``. A z-score channel with ``"use_mask": true`` takes its
            statistics inside the nonzero region of the image (all channels, holes filled) and is 0 outside, as
            nnU-Net does when cropping to the nonzero region shrank the image. ``None``: z-score every channel.

    Returns:
        float32 ``(C, D, H, W)``.
    """
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    if x.ndim == 3:
        x = x[None]
    schemes = list(schemes) if schemes is not None else [{"scheme": "zscore"}] * x.shape[0]
    if len(schemes) != x.shape[0]:
        raise ValueError(f"{len(schemes)} normalisation schemes for {x.shape[0]} channels")
    out = torch.empty_like(x)
    mask = None
    for c, spec in enumerate(schemes):
        kind = spec.get("scheme", "zscore")
        v = x[c]
        if kind == "zscore" and spec.get("use_mask"):
            # nnU-Net: when cropping to the nonzero region removed much of the image, statistics and output are
            # limited to that region (the union of nonzero voxels of all channels, holes filled); 0 outside
            if mask is None:
                from scipy.ndimage import binary_fill_holes

                mask = torch.from_numpy(binary_fill_holes((x != 0).any(0).numpy()))
            inside = v[mask]
            mean, std = (
                (inside.mean(), inside.std(unbiased=False)) if inside.numel() else (v.new_zeros(()), v.new_ones(()))
            )
            out[c] = torch.where(mask, (v - mean) / std.clamp_min(1e-8), torch.zeros_like(v))
        elif kind == "zscore":
            out[c] = (v - v.mean()) / v.std(unbiased=False).clamp_min(1e-8)
        elif kind == "rescale_to_0_1":
            out[c] = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-8)
        elif kind == "rgb_to_0_1":
            out[c] = v / 255.0
        elif kind == "ct":
            lo, hi = spec["clip"]
            out[c] = (v.clamp(float(lo), float(hi)) - float(spec["mean"])) / max(float(spec["std"]), 1e-8)
        elif kind == "none":
            out[c] = v
        else:
            raise ValueError(
                f"unknown normalisation scheme {kind!r} for channel {c}; expected zscore, ct, rescale_to_0_1, "
                "rgb_to_0_1 or none"
            )
    return out


# ---------------------------------------------------------------------------------------------- resampling


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """The shape after resampling from ``spacing`` to ``new_spacing`` (nnU-Net's rounding of
    ``shape * spacing / new_spacing``)."""
    return tuple(max(1, int(round(s * a / b))) for s, a, b in zip(shape, spacing, new_spacing))


def resample_image(
    image: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    new_spacing: Sequence[float] | None = None,
    order: int = 3,
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Resample ``(C, D, H, W)`` (or ``(D, H, W)``) to ``new_spacing`` or to ``shape``.

    Args:
        order: 1 trilinear (``torch``), 3 cubic spline (``scipy.ndimage``), 0 nearest. Voxel centres are aligned
            (``align_corners=False`` / ``grid_mode=True``), so the volume covers the same extent in millimetres.
    """
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    squeeze = x.ndim == 3
    x = x[None] if squeeze else x
    target = tuple(shape) if shape is not None else resampled_shape(x.shape[1:], spacing, new_spacing)
    if tuple(target) == tuple(x.shape[1:]):
        out = x.clone()
    elif order == 3:
        from scipy import ndimage

        zoom = [t / s for t, s in zip(target, x.shape[1:])]
        out = torch.stack(
            [
                torch.from_numpy(
                    ndimage.zoom(c.numpy(), zoom, order=3, mode="nearest", grid_mode=True).astype(np.float32)
                )
                for c in x
            ]
        )
        out = out[(slice(None),) + tuple(slice(0, t) for t in target)]
    elif order in (0, 1):
        mode = "nearest-exact" if order == 0 else "trilinear"
        kwargs = {} if order == 0 else {"align_corners": False}
        out = F.interpolate(x[None], size=target, mode=mode, **kwargs)[0]
    else:
        raise ValueError(f"order must be 0, 1 or 3, got {order}")
    return out[0] if squeeze else out


def resample_label(
    label: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    new_spacing: Sequence[float] | None = None,
    mode: str = "onehot",
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Resample an integer label volume ``(D, H, W)``: never fractional values.

    Args:
        mode: ``"onehot"`` (nnU-Net: each label's indicator map resampled trilinearly, then the argmax; smooth
            boundaries without inventing labels) or ``"nearest"``. ``ignore_index`` voxels are a label of their own.
    """
    y = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).long()
    target = tuple(shape) if shape is not None else resampled_shape(y.shape, spacing, new_spacing)
    if tuple(target) == tuple(y.shape):
        return y.clone()
    if mode == "nearest":
        return F.interpolate(y[None, None].float(), size=target, mode="nearest-exact")[0, 0].long()
    if mode != "onehot":
        raise ValueError(f"mode must be 'onehot' or 'nearest', got {mode!r}")
    values = torch.unique(y)
    best = torch.full(target, -1.0)
    out = torch.zeros(target, dtype=torch.long)
    for v in values:  # one indicator map at a time: memory of two volumes, not K
        p = F.interpolate((y == v)[None, None].float(), size=target, mode="trilinear", align_corners=False)[0, 0]
        take = p > best
        best = torch.where(take, p, best)
        out[take] = v
    return out


# ---------------------------------------------------------------------------------------------- folds


def kfold_splits(cases: Sequence[str], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net's cross-validation splits: the sorted case ids shuffled with ``numpy.random.RandomState(seed)`` and
    cut into ``num_folds`` folds, the first ``len % num_folds`` one case larger (scikit-learn's
    ``KFold(shuffle=True, random_state=seed)``, which nnU-Net calls).

    Returns:
        ``[{"train": [...], "val": [...]}, ...]``, one per fold.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    keys = sorted(cases)
    if len(keys) < num_folds:
        raise ValueError(f"{len(keys)} cases cannot make {num_folds} folds")
    order = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(num_folds, len(keys) // num_folds)
    sizes[: len(keys) % num_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val_idx = np.sort(order[start : start + size])
        train_idx = np.sort(np.setdiff1d(order, val_idx))
        splits.append({"train": [keys[i] for i in train_idx], "val": [keys[i] for i in val_idx]})
        start += size
    return splits


# ---------------------------------------------------------------------------------------------- datasets


def _case_id(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def msd_cases(root: str | Path, images: str = "imagesTr", labels: str | None = "labelsTr") -> list[dict[str, Any]]:
    """The cases of a Medical Segmentation Decathlon / nnU-Net raw folder: ``[{"id", "images": [paths per
    channel], "label": path or None}]`` sorted by id. Channel files are ``<case>_0000.nii.gz``, ``<case>_0001...``
    (nnU-Net); a file without the ``_XXXX`` suffix is one (possibly 4D) case.

    Raises:
        DatasetError: the folder is missing, empty, a case lacks a channel, or a label has no image.
    """
    root = Path(root)
    image_dir = root / images
    if not image_dir.is_dir():
        raise DatasetError(f"{root}: expected an {images}/ folder of NIfTI volumes (MSD / nnU-Net layout)")
    groups: dict[str, dict[int, Path]] = {}
    for p in sorted(image_dir.iterdir()):
        if p.name.startswith(".") or not _nifti_name(p):
            continue
        stem = _case_id(p.name)
        head, sep, tail = stem.rpartition("_")
        if sep and len(tail) == 4 and tail.isdigit():
            groups.setdefault(head, {})[int(tail)] = p
        else:
            groups.setdefault(stem, {})[0] = p
    if not groups:
        raise DatasetError(f"{image_dir}: no .nii / .nii.gz volumes")
    channels = max(len(g) for g in groups.values())
    cases = []
    label_dir = root / labels if labels else None
    for cid in sorted(groups):
        g = groups[cid]
        if sorted(g) != list(range(channels)):
            missing = sorted(set(range(channels)) - set(g))
            raise DatasetError(
                f"{image_dir}: case {cid!r} lacks channel(s) {missing} (expected _0000.._{channels - 1:04d})"
            )
        label = None
        if label_dir is not None and label_dir.is_dir():
            found = [label_dir / f"{cid}{s}" for s in NIFTI_SUFFIXES if (label_dir / f"{cid}{s}").is_file()]
            label = found[0] if found else None
        cases.append({"id": cid, "images": [g[c] for c in range(channels)], "label": label})
    if label_dir is not None and label_dir.is_dir():
        ids = {c["id"] for c in cases}
        orphans = sorted(
            _case_id(p.name) for p in label_dir.iterdir() if _nifti_name(p) and _case_id(p.name) not in ids
        )
        if orphans:
            raise DatasetError(f"{label_dir}: labels without images: {', '.join(orphans[:5])}")
    return cases


def _labels_from_json(meta: dict[str, Any]) -> dict[int, str] | None:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    first = next(iter(labels))
    if str(first).lstrip("-").isdigit():  # MSD: {"0": "background", ...}
        return {int(k): str(v) for k, v in labels.items()}
    return {int(v): str(k) for k, v in labels.items() if not isinstance(v, (list, tuple))}  # nnU-Net v2


class VolumeDataset(Dataset, ABC):
    """Base of the volume datasets: ``load(index) -> (image (C, D, H, W), label (D, H, W) or None, VolumeInfo)``,
    normalisation, the transform, and the sample dict of the module docstring.

    Attributes:
        num_classes, class_names, in_channels, ignore_index: the class space and input channels.
        normalization: one scheme per channel (see :func:`normalize_volume`).
        target_spacing: when set, every volume is resampled to it (images cubic, labels one-hot linear).
    """

    ignore_index = IGNORE_INDEX
    num_classes: int
    class_names: list[str]
    in_channels: int

    def __init__(
        self,
        transform: Callable[[dict], dict] | None = None,
        normalization: Sequence[dict[str, Any]] | None = None,
        target_spacing: Sequence[float] | None = None,
    ):
        self.transform = transform
        self.normalization = list(normalization) if normalization is not None else None
        self.target_spacing = tuple(float(s) for s in target_spacing) if target_spacing is not None else None

    @abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, VolumeInfo]:
        """Volume ``index``: image ``(C, D, H, W)``, label ``(D, H, W)`` or None, and its :class:`VolumeInfo`."""

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        from maskworks.viz import default_palette

        return [tuple(c) for c in default_palette(max(self.num_classes, 2))][: self.num_classes]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} volumes")
        index = int(index) % n
        image, label, info = self.load(index)
        image = torch.as_tensor(np.asarray(image, dtype=np.float32))
        image = image[None] if image.ndim == 3 else image
        mask = torch.as_tensor(np.asarray(label)).long() if label is not None else None
        spacing = info.spacing
        if self.target_spacing is not None and tuple(self.target_spacing) != tuple(spacing):
            image = resample_image(image, spacing, self.target_spacing, order=3)
            if mask is not None:
                mask = resample_label(mask, shape=image.shape[1:])
            spacing = self.target_spacing
        image = normalize_volume(image, self.normalization)
        meta = {"file": info.file, "index": index, "spacing": tuple(spacing), "orig_spacing": tuple(info.spacing),
                "orig_shape": tuple(info.shape), "affine": info.affine}  # fmt: skip
        sample: dict[str, Any] = {"image": image, "meta": meta}
        if mask is not None:
            sample["mask"] = mask
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def info(self, index: int) -> VolumeInfo:
        """The :class:`VolumeInfo` of volume ``index`` (to write its prediction with the input's header)."""
        return self.load(index)[2]


class NiftiFolder(VolumeDataset):
    """A Medical Segmentation Decathlon / nnU-Net raw folder: ``imagesTr/<case>_0000.nii.gz`` (one file per
    channel, ``_0001`` ...), ``labelsTr/<case>.nii.gz``, optional ``imagesTs/`` and ``dataset.json`` (``labels``,
    ``channel_names`` / ``modality``).

    Args:
        root: the dataset folder.
        split: ``"train"`` / ``"val"`` (fold ``fold`` of :func:`kfold_splits` over the training cases), ``"all"``
            (every training case) or ``"test"`` (``imagesTs/``, no labels).
        fold: cross-validation fold for ``train`` / ``val`` (``None``: ``train`` and ``all`` are every case).
        num_folds: number of folds.
        transform, normalization, target_spacing: see :class:`VolumeDataset`; a plan from ``maskworks plan``
            supplies the last two (``plan=``).
        plan: a plan dict or JSON path; its ``normalization`` and ``spacing`` are used unless given explicitly.
        num_classes: classes (default: ``dataset.json``'s labels, else the largest label of the first case + 1).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        fold: int | None = 0,
        num_folds: int = 5,
        transform: Callable[[dict], dict] | None = None,
        normalization: Sequence[dict[str, Any]] | None = None,
        target_spacing: Sequence[float] | None = None,
        plan: dict[str, Any] | str | Path | None = None,
        num_classes: int | None = None,
    ):
        if split not in ("train", "val", "all", "test"):
            raise ValueError(f"split must be 'train', 'val', 'all' or 'test', got {split!r}")
        if isinstance(plan, (str, Path)):
            plan = json.loads(Path(plan).read_text())
        plan = plan or {}
        super().__init__(
            transform,
            normalization if normalization is not None else plan.get("normalization"),
            target_spacing if target_spacing is not None else plan.get("spacing"),
        )
        self.root = Path(root)
        meta_file = self.root / "dataset.json"
        self.dataset_json = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if split == "test":
            self.cases = msd_cases(self.root, "imagesTs", None)
        else:
            cases = msd_cases(self.root)
            unlabelled = [c["id"] for c in cases if c["label"] is None]
            if unlabelled:
                raise DatasetError(f"{self.root / 'labelsTr'}: no label for case(s) {', '.join(unlabelled[:5])}")
            if split != "all" and fold is not None:
                folds = kfold_splits([c["id"] for c in cases], num_folds)
                if not 0 <= fold < num_folds:
                    raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
                keep = set(folds[fold][split])
                cases = [c for c in cases if c["id"] in keep]
            elif split == "val":
                raise ValueError("split='val' needs a fold")
            self.cases = cases
        self.split, self.fold = split, fold
        names = _labels_from_json(self.dataset_json)
        if num_classes is None:
            num_classes = plan.get("num_classes")
        if num_classes is None and names:
            num_classes = max(names) + 1
        if num_classes is None:
            label = next((c["label"] for c in self.cases if c["label"] is not None), None)
            num_classes = int(read_nifti(label)[0].max()) + 1 if label is not None else 2
        self.num_classes = int(num_classes)
        self.class_names = [(names or {}).get(i, f"class_{i}") for i in range(self.num_classes)]
        self.in_channels = self._channels()

    def _channels(self) -> int:
        if not self.cases:
            return 1
        first = self.cases[0]["images"]
        if len(first) > 1:
            return len(first)
        array, _ = read_nifti(first[0])
        return array.shape[0] if array.ndim == 4 else 1

    def __len__(self) -> int:
        return len(self.cases)

    def case_id(self, index: int) -> str:
        return self.cases[index]["id"]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, VolumeInfo]:
        case = self.cases[index]
        arrays, info = [], None
        for path in case["images"]:
            array, this = read_nifti(path)
            if info is not None and tuple(this.shape) != tuple(info.shape):
                raise DatasetError(f"{path}: shape {this.shape} differs from the case's first channel {info.shape}")
            info = info or this
            arrays.append(array if array.ndim == 4 else array[None])
        image = np.concatenate(arrays).astype(np.float32)
        label = None
        if case["label"] is not None:
            label, linfo = read_nifti(case["label"])
            if label.ndim != 3 or tuple(label.shape) != tuple(info.shape):
                raise DatasetError(f"{case['label']}: label shape {label.shape} differs from the image's {info.shape}")
            rounded = np.rint(label)
            if not np.array_equal(rounded, label):
                raise DatasetError(f"{case['label']}: label volume holds non-integer values")
            label = rounded.astype(np.int64)
            bad = (label < 0) | ((label >= self.num_classes) & (label != self.ignore_index))
            if bad.any():
                raise DatasetError(
                    f"{case['label']}: label values {sorted(np.unique(label[bad]).tolist())[:5]} outside "
                    f"0..{self.num_classes - 1} and {self.ignore_index}"
                )
        info.file = str(case["images"][0])
        return image, label, info


class SyntheticVolumes(VolumeDataset):
    """Procedural volumes, no files needed: blobs (spheres and ellipsoids, class 1) and tubes (class 2) in noise,
    with anisotropic spacing.

    Shapes are drawn in millimetres, so with the default spacing ``(2.5, 1, 1)`` a sphere is flattened along
    ``D`` in voxels, as in a CT scan with thick slices. Intensities: background 0, blobs 1, tubes 0.6, plus a
    smooth bias field and Gaussian noise; the image is z-scored like an MRI volume.

    Args:
        num_samples: dataset length.
        size: ``(D, H, W)`` voxels.
        spacing: ``(sz, sy, sx)`` millimetres per voxel.
        num_classes: 2 (background + blobs) or 3 (+ tubes).
        seed, split: the volume of ``index`` depends only on ``(seed, split, index)``.
        noise_std: Gaussian noise std (blob contrast is 1).
        max_shapes: most blobs per volume (one tube per volume when ``num_classes == 3``).
        transform: callable on the sample dict (3D augmentation, patch sampling).
        in_channels: image channels (extra channels are the same scene with their own noise and contrast).
    """

    def __init__(
        self,
        num_samples: int = 16,
        size: Sequence[int] = (24, 48, 48),
        spacing: Sequence[float] = (2.5, 1.0, 1.0),
        num_classes: int = 3,
        seed: int = 0,
        split: str = "train",
        noise_std: float = 0.35,
        max_shapes: int = 3,
        transform: Callable[[dict], dict] | None = None,
        in_channels: int = 1,
    ):
        if num_classes not in (2, 3):
            raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")
        if len(tuple(size)) != 3 or min(size) < 8:
            raise ValueError(f"size must be (D, H, W) with every axis >= 8, got {tuple(size)}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        super().__init__(transform)
        self.num_samples, self.size = int(num_samples), tuple(int(s) for s in size)
        self.spacing = tuple(float(s) for s in spacing)
        self.num_classes, self.seed, self.split = num_classes, seed, split
        self.noise_std, self.max_shapes, self.in_channels = noise_std, max_shapes, in_channels
        self.class_names = ["background", "blob", "tube"][:num_classes]

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, VolumeInfo]:
        split_id = ("train", "val", "test").index(self.split)
        rng = np.random.default_rng([self.seed, split_id, index])
        d, h, w = self.size
        sz, sy, sx = self.spacing
        zz, yy, xx = np.meshgrid(np.arange(d) * sz, np.arange(h) * sy, np.arange(w) * sx, indexing="ij")
        extent = np.array([d * sz, h * sy, w * sx])
        label = np.zeros(self.size, dtype=np.int64)
        scene = np.zeros(self.size, dtype=np.float32)
        small = float(min(extent))
        for _ in range(int(rng.integers(1, self.max_shapes + 1))):
            radii = rng.uniform(0.12, 0.22, size=3) * small
            if rng.random() < 0.5:
                radii[:] = radii[0]  # a sphere
            centre = rng.uniform(radii + 1.0, np.maximum(extent - radii - 1.0, radii + 1.0))
            inside = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
            inside = (inside + ((xx - centre[2]) / radii[2]) ** 2) <= 1.0
            label[inside], scene[inside] = 1, 1.0
        if self.num_classes == 3:  # a tube: points within a radius of a segment crossing the volume
            a = rng.uniform(0.1, 0.9, size=3) * extent
            b = rng.uniform(0.1, 0.9, size=3) * extent
            a[2], b[2] = 0.05 * extent[2], 0.95 * extent[2]
            radius = rng.uniform(0.05, 0.08) * small
            p = np.stack([zz, yy, xx], -1) - a
            seg = b - a
            t = np.clip((p @ seg) / float(seg @ seg), 0.0, 1.0)
            dist = np.linalg.norm(p - t[..., None] * seg, axis=-1)
            tube = (dist <= radius) & (label == 0)
            label[tube], scene[tube] = 2, 0.6
        bias = 0.2 * np.sin(zz / extent[0] * math.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, math.pi))
        channels = []
        for _c in range(self.in_channels):
            contrast = rng.uniform(0.8, 1.2)
            channels.append(contrast * scene + bias + rng.normal(0.0, self.noise_std, size=self.size))
        image = np.stack(channels).astype(np.float32)
        info = VolumeInfo.from_spacing(self.spacing, self.size)
        info.file = f"synthetic_{self.split}_{index:04d}"
        return image, label, info


def collate_volumes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image`` ``(B, C, D, H, W)`` and ``mask`` ``(B, D, H, W)`` (same sizes: training patches), keep
    ``meta`` (and anything else) as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("image", "mask") and isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot batch volumes of different sizes {sorted(shapes)}: crop training volumes to a patch "
                    "size (RandomPatch) or use batch size 1"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
