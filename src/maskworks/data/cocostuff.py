"""COCO-Stuff 164k (Caesar et al., "COCO-Stuff: Thing and Stuff Classes in Context", CVPR 2018): 171 classes.

Layout of the official downloads (``train2017.zip``, ``val2017.zip`` and ``stuffthingmaps_trainval2017.zip``)::

    images/train2017/000000000009.jpg          images/val2017/000000000139.jpg
    stuffthingmaps/train2017/000000000009.png  stuffthingmaps/val2017/000000000139.png

The stuffthingmaps are 8-bit PNGs holding the official label id minus one (0..181: 91 COCO thing labels, then 91
stuff labels) and 255 = unlabeled. Eleven of the thing labels were never annotated in COCO (street sign, hat, shoe,
eye glasses, plate, mirror, window, desk, door, blender, hair brush), so 171 classes remain; they are numbered
0..170 in label order (the usual compaction, as in mmsegmentation's ``coco_stuff`` converter). The 11 unused values
map to 255, and any value in 182..254 is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from maskworks.data.ade20k import pair_by_stem, split_folder
from maskworks.data.folder import PairedFileDataset
from maskworks.data.io import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, DatasetError
from maskworks.data.palette import COCOSTUFF_CLASSES, COCOSTUFF_LABELS, COCOSTUFF_UNUSED, default_palette

SPLITS = {"train": "train2017", "val": "val2017"}


def cocostuff_lut() -> np.ndarray:
    """stuffthingmaps value -> class id: the 171 used values 0..181 -> 0..170 in order, the 11 unused ones and 255
    -> 255, everything else -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int64)
    used = [v for v in range(len(COCOSTUFF_LABELS)) if v not in COCOSTUFF_UNUSED]
    lut[used] = np.arange(len(used))
    lut[list(COCOSTUFF_UNUSED)] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


class CocoStuff(PairedFileDataset):
    """COCO-Stuff 164k: 171 classes (80 things, 91 stuff), RGB images, unlabeled pixels ignored.

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: the folder holding ``images/`` and ``stuffthingmaps/``, absolute or relative to the current directory.
        split: ``"train"`` (``train2017/``, 118k images) or ``"val"`` (``val2017/``, 5k images); the folder names
            are accepted too. COCO's test images have no public labels.
        transform: callable on the raw sample.
        masks_dir: the folder of ``root`` holding the label PNGs (``<masks_dir>/train2017/*.png``): e.g.
            ``"annotations"`` where the stuffthingmaps were unpacked into mmsegmentation's ``annotations/`` folder
            (its converted ``*_labelTrainIds.png`` files there have no image of the same name and are skipped).

    Raises:
        DatasetError: an unknown ``split``, a missing folder (the message names the path expected), no images, or
            images without a stuffthingmaps PNG.
    """

    num_classes = len(COCOSTUFF_CLASSES)
    class_names = list(COCOSTUFF_CLASSES)
    palette = default_palette(len(COCOSTUFF_CLASSES))
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    in_channels = 3

    def __init__(
        self,
        root: str | Path = "../shared/data/cocostuff",
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        masks_dir: str = "stuffthingmaps",
    ) -> None:
        sub = split_folder(split, SPLITS, "COCO-Stuff")
        self.root, self.split = Path(root).expanduser().resolve(), split
        missing = [str(self.root / d) for d in ("images", masks_dir) if not (self.root / d).is_dir()]
        if missing:
            raise DatasetError(
                f"COCO-Stuff not found at {self.root}: missing folder(s) {', '.join(missing)}; expected "
                f"images/{sub}/*.jpg and {masks_dir}/{sub}/*.png under it"
            )
        pairs = pair_by_stem(self.root / "images" / sub, self.root / masks_dir / sub, "COCO-Stuff")
        super().__init__(pairs, cocostuff_lut(), transform)

    def __repr__(self) -> str:
        return f"CocoStuff({self.root}, split={self.split!r}, {len(self)} samples)"
