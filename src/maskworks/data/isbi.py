"""ISBI 2012 EM segmentation challenge (Arganda-Carreras et al., 2015): neuronal membranes, 512x512 grayscale.

Layout: ``image/N.png`` (uint8 slices) and ``label/N.png`` (255 = cell interior, 0 = membrane). Labels are
thresholded at 128: cell interior -> class 0 ("cell"), membrane -> class 1 ("membrane").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from maskworks.data.folder import PairedFileDataset, pair_files
from maskworks.data.io import DatasetError
from maskworks.data.palette import ISBI_CLASSES, ISBI_PALETTE

# Measured on the 20 shipped slices.
ISBI_MEAN = (0.4865,)
ISBI_STD = (0.1665,)
SPLITS = ("train", "val", "all")
_MEMBRANE_LUT = np.where(np.arange(256) < 128, 1, 0).astype(np.int64)  # dark label pixels are membrane


class ISBI2012(PairedFileDataset):
    """ISBI 2012 membranes: 2 classes, 1-channel images.

    Args:
        root: dataset folder, absolute or relative to the current directory.
        split: ``"train"`` (slices not in ``val_slices``), ``"val"`` (``val_slices``) or ``"all"``.
        val_slices: slice numbers held out for validation.
        transform: callable on the raw sample.
    """

    num_classes = len(ISBI_CLASSES)
    class_names = list(ISBI_CLASSES)
    palette = list(ISBI_PALETTE)
    mean, std = ISBI_MEAN, ISBI_STD
    in_channels = 1

    def __init__(
        self,
        root: str | Path = "../shared/data/isbi2012",
        split: str = "train",
        val_slices: Sequence[int] = (16, 17, 18, 19),
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"ISBI2012 split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = Path(root).expanduser().resolve(), split
        for sub in ("image", "label"):
            if not (self.root / sub).is_dir():
                raise DatasetError(
                    f"ISBI2012 folder {self.root / sub} not found; expected image/ and label/ "
                    f"with N.png slices under {self.root}"
                )
        pairs = pair_files(self.root / "image", self.root / "label", (".png",))
        bad = [p.name for p, _ in pairs if not p.stem.isdigit()]
        if bad:
            raise DatasetError(
                f"ISBI2012 images must be named by slice number (N.png); got {bad[:10]} in {self.root / 'image'}"
            )
        pairs.sort(key=lambda pair: int(pair[0].stem))
        slices = [int(p.stem) for p, _ in pairs]
        unknown = sorted(set(val_slices) - set(slices))
        if unknown:
            raise DatasetError(f"val_slices {unknown} not found in {self.root / 'image'}; available slices: {slices}")
        held_out = set(val_slices)
        if split != "all":
            pairs = [pair for pair, s in zip(pairs, slices) if (s in held_out) == (split == "val")]
        if not pairs:
            raise DatasetError(
                f"ISBI2012 split {split!r} is empty with val_slices={tuple(val_slices)} (slices {slices})"
            )
        self.val_slices = tuple(val_slices)
        super().__init__(pairs, _MEMBRANE_LUT, transform)

    def __repr__(self) -> str:
        return f"ISBI2012({self.root}, split={self.split!r}, {len(self)} slices)"
