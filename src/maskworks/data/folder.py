"""Datasets of image/mask file pairs: the shared base and ``FolderDataset`` for a user's own folder.

``FolderDataset`` layout::

    root/images/<name>.<png|jpg|jpeg|bmp|tif|tiff|webp>   (subfolders allowed)
    root/masks/<name>.<ext>                                (same relative path and stem as the image)
    root/classes.txt | classes.json                        (optional, see maskworks.data.palette)

Masks are palette ("P") or grayscale PNGs of class indices (255 = ignore), or RGB colour masks mapped through the
class file's colours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskworks.data.io import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    SegmentationDataset,
    check_same_size,
    image_channels,
    label_lut,
    map_labels,
    raw_sample,
    read_image,
    read_mask,
)
from maskworks.data.palette import default_palette, read_class_file

log = logging.getLogger(__name__)

CLASS_FILES = ("classes.txt", "classes.json")
_SHOWN = 10  # how many offending files an error message lists


def _list_files(paths: Sequence[Any]) -> str:
    shown = ", ".join(str(p) for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def scan_files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Image files under ``folder`` (recursively) keyed by relative path without suffix, e.g. ``"sub/img_01"``.

    Raises:
        DatasetError: if the folder is missing or two files share a key (``a.png`` and ``a.jpg``).
    """
    if not folder.is_dir():
        raise DatasetError(f"folder {folder} does not exist")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    files: dict[str, Path] = {}
    clashes = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in exts and path.is_file():
            key = path.relative_to(folder).with_suffix("").as_posix()
            if key in files:
                clashes.append(f"{files[key].name} / {path.name}")
            files[key] = path
    if clashes:
        raise DatasetError(f"{folder}: several files share a name: {_list_files(clashes)}; expected one file per stem")
    return files


def pair_files(
    image_dir: Path, mask_dir: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[tuple[Path, Path]]:
    """Match images to masks by relative path and stem.

    Raises:
        DatasetError: if there are no images, or images without a mask (all are named).
    """
    images = scan_files(image_dir, extensions)
    if not images:
        raise DatasetError(f"no images found in {image_dir}; searched for extensions {', '.join(extensions)}")
    masks = scan_files(mask_dir, extensions)
    missing = [images[k].name for k in images if k not in masks]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir}: "
            f"{_list_files(missing)}; expected a mask with the same name (any of "
            f"{', '.join(extensions)})"
        )
    unused = [masks[k].name for k in masks if k not in images]
    if unused:
        log.warning("%d mask(s) in %s have no image and are ignored: %s", len(unused), mask_dir, _list_files(unused))
    return [(images[k], masks[k]) for k in images]


def _infer_num_classes(pairs: Sequence[tuple[Path, Path]], colors: Sequence | None, ignore_colors: Sequence) -> int:
    """K = 1 + the largest label (other than 255) over all masks."""
    top = -1
    for _, mask_path in pairs:
        raw = read_mask(mask_path, colors, ignore_colors)
        labels = raw[raw != 255]
        if labels.size:
            top = max(top, int(labels.max()))
    folder = pairs[0][1].parent
    if not 0 <= top < 255:
        raise DatasetError(
            f"cannot infer num_classes from the masks in {folder}: largest label is {top}; "
            f"expected labels 0..254 (255 = ignore), or pass num_classes or a class file"
        )
    log.info(
        "num_classes not given: inferred %d from the largest label (%d) in %d masks of %s",
        top + 1,
        top,
        len(pairs),
        folder,
    )
    return top + 1


class PairedFileDataset(SegmentationDataset):
    """Base for datasets of ``(image file, mask file)`` pairs whose raw labels map to class ids via a table.

    Subclasses set ``num_classes``, ``class_names``, ``palette``, ``mean``, ``std`` and ``in_channels``.

    Args:
        pairs: ``(image_path, mask_path)`` per sample.
        lut: 256-entry raw label -> class id table (-1 = invalid), see :func:`maskworks.data.io.label_lut`.
        transform: callable on the raw sample.
        colors: class colours for RGB colour masks.
        ignore_colors: colours of ignored pixels in RGB colour masks.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        lut: np.ndarray,
        transform: Callable[[dict], dict] | None = None,
        colors: Sequence[Sequence[int]] | None = None,
        ignore_colors: Sequence[Sequence[int]] = (),
    ) -> None:
        super().__init__(transform)
        self.pairs = list(pairs)
        self.lut = lut
        self.colors, self.ignore_colors = colors, ignore_colors

    def __len__(self) -> int:
        return len(self.pairs)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and check sample ``index``: ``(image uint8 (H, W, C), mask int64 (H, W) class ids)``."""
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path, self.in_channels)
        mask = map_labels(read_mask(mask_path, self.colors, self.ignore_colors), self.lut, mask_path)
        check_same_size(image, mask, image_path, mask_path)
        return image, mask

    def load_raw(self, index: int) -> dict[str, Any]:
        image, mask = self.read_pair(index)
        return {**raw_sample(image, mask), "file": str(self.pairs[index][0])}

    def validate(self, progress: bool = False) -> None:
        """Read every pair and raise one :class:`DatasetError` listing all problems found.

        Args:
            progress: show a progress bar.
        """
        indices: Any = range(len(self))
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"validating {type(self).__name__}", dynamic_ncols=True)
        problems = []
        for i in indices:
            try:
                self.read_pair(i)
            except DatasetError as e:
                problems.append(str(e))
        if problems:
            raise DatasetError(
                f"{len(problems)} problem(s) in {len(self)} samples of {type(self).__name__}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        log.info("%s: all %d samples are readable and consistent", type(self).__name__, len(self))


class FolderDataset(PairedFileDataset):
    """Images and masks from a folder (see the module docstring for the layout).

    Args:
        root: dataset folder.
        images_dir: image subfolder of ``root``.
        masks_dir: mask subfolder of ``root``.
        num_classes: K; by default the class file's length, or inferred from the largest label in the masks.
        classes_file: class names (and colours) file; by default ``root/classes.txt`` or ``root/classes.json``.
        transform: callable on the raw sample.
        extensions: image and mask file extensions to search.
        mean: per-channel mean (0-1 units); default ImageNet's (its average for grayscale images).
        std: per-channel std (0-1 units); default ImageNet's (its average for grayscale images).
    """

    def __init__(
        self,
        root: str | Path,
        images_dir: str = "images",
        masks_dir: str = "masks",
        num_classes: int | None = None,
        classes_file: str | Path | None = None,
        transform: Callable[[dict], dict] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.root = Path(root)
        pairs = pair_files(self.root / images_dir, self.root / masks_dir, extensions)
        names, colors, ignore_colors = self._read_classes(classes_file)
        if num_classes is None:
            num_classes = len(names) if names is not None else _infer_num_classes(pairs, colors, ignore_colors)
        elif names is not None and len(names) != num_classes:
            raise DatasetError(f"num_classes={num_classes} but the class file lists {len(names)} classes: {names}")
        super().__init__(pairs, label_lut(num_classes), transform, colors, ignore_colors)
        self.num_classes = num_classes
        self.in_channels = image_channels(pairs[0][0])
        self.class_names = names if names is not None else [f"class_{i}" for i in range(num_classes)]
        self.palette = list(colors) if colors is not None else default_palette(num_classes)
        if mean is None or std is None:
            gray = self.in_channels == 1
            mean = (sum(IMAGENET_MEAN) / 3,) if gray else IMAGENET_MEAN
            std = (sum(IMAGENET_STD) / 3,) if gray else IMAGENET_STD
        if len(mean) != self.in_channels or len(std) != self.in_channels:
            raise ValueError(f"mean/std need {self.in_channels} values (the images' channels), got {mean}, {std}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def _read_classes(self, classes_file: str | Path | None) -> tuple[list[str] | None, list | None, list]:
        if classes_file is None:
            found = [self.root / name for name in CLASS_FILES if (self.root / name).is_file()]
            if not found:
                return None, None, []
            classes_file = found[0]
        elif not Path(classes_file).is_file():
            raise DatasetError(f"class file {classes_file} does not exist")
        return read_class_file(classes_file)

    def __repr__(self) -> str:
        return f"FolderDataset({self.root}, {len(self)} samples, {self.num_classes} classes)"
