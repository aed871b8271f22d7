"""Cityscapes (Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016): 19 classes.

Layout of the official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` (``gtCoarse.zip``)::

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    gtCoarse/{train,val,train_extra}/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png

``*_labelIds.png`` hold the label ids of cityscapesScripts' table (0..33); they are mapped to the 19 train ids of
that table (road = 0 ... bicycle = 18) and every other label (unlabeled, ego vehicle, parking, guard rail, caravan,
...) to 255. The license plate label has id -1 and never appears in those files (its pixels keep the vehicle's
id); a raw 255, as some tools write for it, stays 255. Values 34..254 are an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from maskworks.data.folder import PairedFileDataset, _list_files
from maskworks.data.io import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, DatasetError, label_lut
from maskworks.data.palette import CITYSCAPES_CLASSES, CITYSCAPES_LABELS, CITYSCAPES_PALETTE

SPLITS = {"gtFine": ("train", "val", "test"), "gtCoarse": ("train", "val", "train_extra")}
LABEL_TYPES = ("labelIds", "labelTrainIds")
IMAGE_SUFFIX = "_leftImg8bit.png"


def cityscapes_lut() -> np.ndarray:
    """Label id -> train id (cityscapesScripts' table): 19 ids -> 0..18, the other 15 ids of 0..33 and 255 ->
    255, everything else -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int64)
    for label_id, train_id, _, _ in CITYSCAPES_LABELS:
        if label_id >= 0:
            lut[label_id] = train_id
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


class Cityscapes(PairedFileDataset):
    """Cityscapes semantic segmentation with the 19 train classes, RGB images.

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/`` (or ``gtCoarse/``), absolute or relative to the
            current directory.
        split: ``"train"`` (2,975 images), ``"val"`` (500) or ``"test"`` (1,525; its public labels are all void,
            so it only serves prediction); with ``annotations="gtCoarse"``: ``"train"``, ``"val"`` or
            ``"train_extra"`` (19,998).
        transform: callable on the raw sample.
        annotations: ``"gtFine"`` (fine annotations) or ``"gtCoarse"`` (coarse ones).
        label_type: which label files to read: ``"labelIds"`` (the official files, mapped to train ids here) or
            ``"labelTrainIds"`` (``*_labelTrainIds.png`` written by cityscapesScripts'
            ``createTrainIdLabelImgs``: already 0..18 and 255).

    Raises:
        DatasetError: an unknown ``split``, ``annotations`` or ``label_type``, a missing folder (the message names
            the path expected), no images, or images without a label file (each named with the path expected).
    """

    num_classes = len(CITYSCAPES_CLASSES)
    class_names = list(CITYSCAPES_CLASSES)
    palette = list(CITYSCAPES_PALETTE)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    in_channels = 3

    def __init__(
        self,
        root: str | Path = "../shared/data/cityscapes",
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        annotations: str = "gtFine",
        label_type: str = "labelIds",
    ) -> None:
        if annotations not in SPLITS:
            raise DatasetError(f"Cityscapes annotations must be one of {', '.join(SPLITS)}, got {annotations!r}")
        if split not in SPLITS[annotations]:
            raise DatasetError(
                f"Cityscapes split must be one of {', '.join(SPLITS[annotations])} for annotations={annotations!r}, "
                f"got {split!r}"
            )
        if label_type not in LABEL_TYPES:
            raise DatasetError(f"Cityscapes label_type must be one of {', '.join(LABEL_TYPES)}, got {label_type!r}")
        self.root, self.split = Path(root).expanduser().resolve(), split
        self.annotations, self.label_type = annotations, label_type
        image_dir, label_dir = self.root / "leftImg8bit" / split, self.root / annotations / split
        missing = [str(d) for d in (image_dir, label_dir) if not d.is_dir()]
        if missing:
            raise DatasetError(
                f"Cityscapes split {split!r} not found: missing folder(s) {', '.join(missing)}; expected "
                f"leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX} and {annotations}/{split}/<city>/"
                f"*_{annotations}_{label_type}.png under {self.root}"
            )
        lut = cityscapes_lut() if label_type == "labelIds" else label_lut(self.num_classes)
        super().__init__(self._pair(image_dir, label_dir), lut, transform)

    def _pair(self, image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
        """``(image, label file)`` for every ``*_leftImg8bit.png`` under ``image_dir``, by city and frame name."""
        images = sorted(p for p in image_dir.rglob(f"*{IMAGE_SUFFIX}") if p.is_file())
        if not images:
            raise DatasetError(f"Cityscapes: no images found in {image_dir}; expected <city>/*{IMAGE_SUFFIX} files")
        suffix = f"_{self.annotations}_{self.label_type}.png"
        pairs, missing = [], []
        for image in images:
            relative = image.relative_to(image_dir)  # <city>/<city>_<seq>_<frame>_leftImg8bit.png
            label = label_dir / relative.parent / (image.name[: -len(IMAGE_SUFFIX)] + suffix)
            if label.is_file():
                pairs.append((image, label))
            else:
                missing.append(f"{relative} (expected {label})")
        if missing:
            hint = ""
            if self.label_type == "labelTrainIds":
                hint = "; create them with cityscapesScripts' createTrainIdLabelImgs or use label_type='labelIds'"
            raise DatasetError(
                f"Cityscapes: {len(missing)} of {len(images)} image(s) in {image_dir} have no label file: "
                f"{_list_files(missing)}{hint}"
            )
        return pairs

    def __repr__(self) -> str:
        return f"Cityscapes({self.root}, split={self.split!r}, {self.annotations}, {len(self)} samples)"
