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
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    SegmentationDataset,
    _describe_values,
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


def format_problems(problems: Sequence[str], shown: int = _SHOWN) -> str:
    """One ``"  - problem"`` line per problem (the first ``shown``), then ``"  ... and N more"``."""
    lines = [f"  - {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return "\n".join(lines)


def scan_files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Image files under ``folder`` (recursively) keyed by relative path without suffix, e.g. ``"sub/img_01"``.

    Raises:
        DatasetError: if the folder is missing or two files share a key (``a.png`` and ``a.jpg``).
    """
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"folder {folder} {what}; expected a folder of image files")
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


def _infer_num_classes(
    pairs: Sequence[tuple[Path, Path]], colors: Sequence | None, ignore_colors: Sequence, root: Path
) -> int:
    """K = 1 + the largest label (other than 255) over all masks, with a warning that lists the labels found."""
    folder = pairs[0][1].parent
    holders: dict[int, list[Path]] = {}  # label value -> masks holding it
    problems = []
    for _, mask_path in pairs:
        try:
            raw = read_mask(mask_path, colors, ignore_colors)
        except DatasetError as e:
            problems.append(str(e))
            continue
        for value in np.unique(raw).tolist():
            holders.setdefault(int(value), []).append(mask_path)
    if problems:
        raise DatasetError(
            f"cannot infer num_classes: {len(problems)} of {len(pairs)} masks in {folder} cannot be read:\n"
            + format_problems(problems)
        )
    labels = sorted(v for v in holders if v != IGNORE_INDEX)
    if not labels:
        raise DatasetError(
            f"cannot infer num_classes from the masks in {folder}: they hold only {IGNORE_INDEX} (ignore); expected "
            f"labels 0..{IGNORE_INDEX - 1}, or pass num_classes or a class file"
        )
    outside = [v for v in labels if not 0 <= v < IGNORE_INDEX]
    if outside:
        raise DatasetError(
            f"cannot infer num_classes from the masks in {folder}: label values {_describe(outside)} (e.g. in "
            f"{holders[outside[0]][0]}) are outside 0..{IGNORE_INDEX - 1}; expected labels 0..{IGNORE_INDEX - 1} "
            f"({IGNORE_INDEX} = ignore), or pass num_classes or a class file"
        )
    top = labels[-1]
    run_end = next((i - 1 for i, v in enumerate(labels) if v != i), top)  # 0..run_end are all present
    unusual = [v for v in labels if v > run_end]
    found = _describe(labels) + (f", {IGNORE_INDEX} (ignore)" if IGNORE_INDEX in holders else "")
    message = (
        f"num_classes not given: inferred {top + 1} from the largest label ({top}) in {len(pairs)} masks of {folder}; "
        f"labels found: {found}"
    )
    if unusual:
        missing = [v for v in range(top + 1) if v not in holders]
        counts = "; ".join(
            f"{v} in {len(holders[v])} mask(s) (e.g. {holders[v][0].name})" for v in unusual[:_SHOWN]
        ) + (f"; and {len(unusual) - _SHOWN} more values" if len(unusual) > _SHOWN else "")
        message += (
            f". The labels are not contiguous: {_describe(missing)} never occur, so those classes would be empty. "
            f"Unusual values: {counts}. If they are stray labels, set num_classes=K (CLI: --set data.num_classes=K) "
            f"and fix those masks, or list the classes in {root / CLASS_FILES[0]} (one name per line, in id order)"
        )
    log.warning(message)
    return top + 1


def _describe(values: Sequence[int]) -> str:
    """``[0, 1, 2, 17]`` -> ``"0..2, 17"``."""
    return _describe_values(np.asarray(values, dtype=np.int64))


def _decide_channels(images: Sequence[Path], folder: Path) -> int:
    """1 if every image is grayscale, else 3 (grayscale images are then repeated over 3 channels); headers only."""
    gray, colour, problems = [], [], []
    for path in images:
        try:
            (gray if image_channels(path) == 1 else colour).append(path)
        except DatasetError as e:
            problems.append(str(e))
    if problems:
        raise DatasetError(
            f"{len(problems)} of {len(images)} image(s) in {folder} cannot be read:\n" + format_problems(problems)
        )
    if gray and colour:
        log.warning(
            "%s holds %d grayscale and %d colour image(s) (grayscale e.g. %s; colour e.g. %s); using in_channels=3: "
            "grayscale images are repeated over 3 channels. Pass in_channels=1 (CLI: --set data.in_channels=1) "
            "to read every image as grayscale instead",
            folder,
            len(gray),
            len(colour),
            _list_files([p.name for p in gray[:3]]),
            _list_files([p.name for p in colour[:3]]),
        )
    return 3 if colour else 1


def _channel_stats(
    mean: Sequence[float] | None, std: Sequence[float] | None, in_channels: int, root: Path
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std: each given one checked, each missing one ImageNet's (its average for grayscale)."""
    gray = in_channels == 1
    stats = []
    for name, given, default in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        if given is None:
            given = (sum(default) / 3,) if gray else default
        try:
            values = tuple(float(v) for v in ([given] if isinstance(given, (int, float)) else given))
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{root}: {name} must be a list of numbers, got {given!r}") from e
        if len(values) != in_channels:
            raise DatasetError(
                f"{root}: {name} has {len(values)} value(s) {list(values)} but the images have {in_channels} "
                f"channel(s) (in_channels={in_channels}); expected {in_channels} value(s) in 0-1 units"
            )
        if not all(np.isfinite(values)) or (name == "std" and min(values) <= 0):
            raise DatasetError(f"{root}: {name}={list(values)}; expected finite values" + (", > 0" * (name == "std")))
        stats.append(values)
    return stats[0], stats[1]


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

    def validate(self, progress: bool = False, cache: bool = False) -> None:
        """Read every pair and raise one :class:`DatasetError` listing all problems found.

        The same as :func:`maskworks.data.validate_dataset` (``cache=False`` by default here).

        Args:
            progress: show a progress bar.
            cache: skip pairs already found good and unchanged since (see :func:`~maskworks.data.validate_dataset`).
        """
        from maskworks.data.validate import validate_dataset

        validate_dataset(self, progress=progress, cache=cache)


class FolderDataset(PairedFileDataset):
    """Images and masks from a folder (see the module docstring for the layout).

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: dataset folder.
        images_dir: image subfolder of ``root``.
        masks_dir: mask subfolder of ``root``.
        num_classes: K; by default the class file's length, or else inferred from the masks as 1 + the largest
            label (with a warning listing the labels found, since a stray value would add classes).
        classes_file: class names (and colours) file, absolute or relative to the current directory, else to
            ``root``; by default ``root/classes.txt`` or ``root/classes.json`` when present.
        transform: callable on the raw sample.
        extensions: image and mask file extensions to search, with or without the dot (e.g. ``[".png", "jpg"]``
            or ``".png,.jpg"``).
        mean: per-channel mean (0-1 units, ``in_channels`` values); default ImageNet's (its average for grayscale).
        std: per-channel std (0-1 units, ``in_channels`` values, > 0); default ImageNet's (its average for
            grayscale).
        in_channels: 1 or 3 to read every image as grayscale or RGB. By default it is decided from the headers of
            all images: 3 if any image is colour (grayscale images are then repeated over 3 channels, with a
            warning that counts both kinds), else 1.

    Raises:
        DatasetError: missing folders, no images, images without masks, an unreadable class file or image header,
            bad ``num_classes`` / ``in_channels`` / ``mean`` / ``std``; messages name the files.
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
        in_channels: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if isinstance(extensions, str):
            extensions = extensions.replace(",", " ").split()  # ".png,.jpg" from a command line
        if not extensions:
            raise DatasetError(f"{self.root}: no file extensions given; expected e.g. {list(IMAGE_EXTENSIONS)}")
        if in_channels is not None and (isinstance(in_channels, bool) or in_channels not in (1, 3)):
            raise DatasetError(f"{self.root}: in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
        pairs = pair_files(self.root / images_dir, self.root / masks_dir, extensions)
        names, colors, ignore_colors = self._read_classes(classes_file)
        if num_classes is None:
            if names is not None:
                num_classes = len(names)
            else:
                num_classes = _infer_num_classes(pairs, colors, ignore_colors, self.root)
        elif names is not None and len(names) != num_classes:
            raise DatasetError(f"num_classes={num_classes} but the class file lists {len(names)} classes: {names}")
        super().__init__(pairs, label_lut(num_classes), transform, colors, ignore_colors)
        self.num_classes = num_classes
        self.in_channels = (
            in_channels if in_channels is not None else _decide_channels([p for p, _ in pairs], self.root / images_dir)
        )
        self.class_names = names if names is not None else [f"class_{i}" for i in range(num_classes)]
        self.palette = list(colors) if colors is not None else default_palette(num_classes)
        self.mean, self.std = _channel_stats(mean, std, self.in_channels, self.root)

    def _read_classes(self, classes_file: str | Path | None) -> tuple[list[str] | None, list | None, list]:
        if classes_file is None:
            found = [self.root / name for name in CLASS_FILES if (self.root / name).is_file()]
            if not found:
                return None, None, []
            classes_file = found[0]
        else:
            given = Path(classes_file).expanduser()
            candidates = [given] if given.is_absolute() else [given, self.root / given]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise DatasetError(
                    f"class file {classes_file} does not exist (looked for {', '.join(str(c) for c in candidates)})"
                )
            classes_file = found[0]
        return read_class_file(classes_file)

    def __repr__(self) -> str:
        return f"FolderDataset({self.root}, {len(self)} samples, {self.num_classes} classes)"
