"""ADE20K SceneParsing benchmark (Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017): 150 classes.

Layout of the official ``ADEChallengeData2016.zip``::

    ADEChallengeData2016/
      images/training/ADE_train_00000001.jpg       images/validation/ADE_val_00000001.jpg
      annotations/training/ADE_train_00000001.png  annotations/validation/ADE_val_00000001.png

Annotations are 8-bit PNGs: 0 = "other" (not one of the 150 classes) and 1..150 = the classes of objectInfo150.
Label 0 becomes 255 (ignore) and 1..150 become class ids 0..149 (what mmsegmentation calls ``reduce_zero_label``);
a raw 255 stays 255, any other value is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from maskworks.data.folder import PairedFileDataset, _list_files, scan_files
from maskworks.data.io import IGNORE_INDEX, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DatasetError
from maskworks.data.palette import ADE20K_CLASSES, ADE20K_PALETTE

log = logging.getLogger(__name__)

SPLITS = {"train": "training", "val": "validation"}
FOLDER = "ADEChallengeData2016"


def ade20k_lut() -> np.ndarray:
    """Raw annotation value -> class id: 0 -> 255, 1..150 -> 0..149, 255 -> 255, everything else -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[0] = IGNORE_INDEX
    lut[1 : len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES))
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def pair_by_stem(
    image_dir: Path, mask_dir: Path, dataset: str, image_extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[tuple[Path, Path]]:
    """Pair ``image_dir/<name>.<ext>`` with ``mask_dir/<name>.png`` (relative path and stem), sorted by name.

    Masks without an image are logged and skipped.

    Raises:
        DatasetError: a missing folder (named), no images, or images without a ``.png`` mask (all are named, with
            the mask path that was expected).
    """
    for folder, what in ((image_dir, "image"), (mask_dir, "annotation")):
        if not folder.is_dir():
            state = "is not a folder" if folder.exists() else "does not exist"
            raise DatasetError(f"{dataset} {what} folder {folder} {state}; expected a folder of {what} files there")
    images = scan_files(image_dir, image_extensions)
    if not images:
        raise DatasetError(
            f"{dataset}: no images found in {image_dir}; searched for extensions {', '.join(image_extensions)}"
        )
    masks = scan_files(mask_dir, (".png",))
    missing = [f"{images[k].name} (expected {mask_dir / k}.png)" for k in images if k not in masks]
    if missing:
        raise DatasetError(
            f"{dataset}: {len(missing)} of {len(images)} image(s) in {image_dir} have no annotation: "
            f"{_list_files(missing)}"
        )
    unused = [masks[k].name for k in masks if k not in images]
    if unused:
        log.warning(
            "%s: %d annotation(s) in %s have no image and are ignored: %s",
            dataset,
            len(unused),
            mask_dir,
            _list_files(unused),
        )
    return [(images[k], masks[k]) for k in sorted(images)]


def split_folder(split: str, splits: dict[str, str], dataset: str) -> str:
    """The folder name of ``split`` (a short name such as ``"train"`` or the folder name itself)."""
    if split in splits:
        return splits[split]
    if split in splits.values():
        return split
    raise DatasetError(
        f"{dataset} split must be one of {', '.join(splits)} (or {', '.join(splits.values())}), got {split!r}"
    )


class ADE20K(PairedFileDataset):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, RGB images, label 0 ("other") ignored.

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: the ``ADEChallengeData2016`` folder (holding ``images/`` and ``annotations/``) or the folder that
            contains it, absolute or relative to the current directory.
        split: ``"train"`` (``training/``, 20,210 images) or ``"val"`` (``validation/``, 2,000 images); the folder
            names ``"training"`` / ``"validation"`` are accepted too. The test images have no public annotations.
        transform: callable on the raw sample.

    Raises:
        DatasetError: an unknown ``split``, a missing folder (the message names the path expected), no images, or
            images without an annotation.
    """

    num_classes = len(ADE20K_CLASSES)
    class_names = list(ADE20K_CLASSES)
    palette = list(ADE20K_PALETTE)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    in_channels = 3

    def __init__(
        self,
        root: str | Path = "../shared/data/ade20k",
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        sub = split_folder(split, SPLITS, "ADE20K")
        given = Path(root).expanduser().resolve()
        candidates = [given, given / FOLDER]
        found = [c for c in candidates if (c / "images").is_dir() and (c / "annotations").is_dir()]
        if not found:
            raise DatasetError(
                f"ADE20K not found at {given}: expected {given / 'images'} and {given / 'annotations'} (the "
                f"{FOLDER} folder), or {given / FOLDER / 'images'} and {given / FOLDER / 'annotations'}"
            )
        self.root, self.split = found[0], split
        pairs = pair_by_stem(self.root / "images" / sub, self.root / "annotations" / sub, "ADE20K")
        super().__init__(pairs, ade20k_lut(), transform)

    def __repr__(self) -> str:
        return f"ADE20K({self.root}, split={self.split!r}, {len(self)} samples)"
