"""ISBI 2012 EM segmentation challenge (Arganda-Carreras et al., 2015): neuronal membranes, 512x512 grayscale.

Layout: ``image/N.png`` (uint8 slices) and ``label/N.png`` (255 = cell interior, 0 = membrane). Labels are
thresholded at 128: cell interior -> class 0 ("cell"), membrane -> class 1 ("membrane").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from maskworks.data.folder import PairedFileDataset, pair_files
from maskworks.data.io import DatasetError, _describe_values
from maskworks.data.palette import ISBI_CLASSES, ISBI_PALETTE

# Measured on the 20 shipped slices.
ISBI_MEAN = (0.4865,)
ISBI_STD = (0.1665,)
SPLITS = ("train", "val", "all")
_MEMBRANE_LUT = np.where(np.arange(256) < 128, 1, 0).astype(np.int64)  # dark label pixels are membrane


def _describe(values: Sequence[int]) -> str:
    return _describe_values(np.asarray(sorted(values), dtype=np.int64)) if values else "none"


class ISBI2012(PairedFileDataset):
    """ISBI 2012 membranes: 2 classes, 1-channel images.

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: dataset folder (holding ``image/`` and ``label/``), absolute or relative to the current directory.
        split: ``"train"`` (every slice not in ``val_slices``), ``"val"`` (the ``val_slices``) or ``"all"`` (every
            slice found; ``val_slices`` is not used).
        val_slices: slice numbers held out for validation (a list, or a string such as ``"16,17"``); by default
            the last fifth of the slices found, by number (at least one): 16-19 for the 20 shipped slices 0-19.
        transform: callable on the raw sample.

    Raises:
        DatasetError: missing folders, images not named ``N.png``, images without labels, an unknown ``split``, or
            ``val_slices`` that are not among the slices found (the message lists the slices that exist).
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
        val_slices: Sequence[int] | None = None,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DatasetError(f"ISBI2012 split must be one of {SPLITS}, got {split!r}")
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
        if val_slices is None:
            held_out = set(slices[-max(1, round(len(slices) / 5)) :])
        else:
            if isinstance(val_slices, str):
                val_slices = val_slices.replace(",", " ").split()  # "16,17,18" from a command line
            elif isinstance(val_slices, int):
                val_slices = [val_slices]
            try:
                held_out = {int(s) for s in val_slices}
            except (TypeError, ValueError) as e:
                raise DatasetError(f"ISBI2012 val_slices must be slice numbers, got {val_slices!r}") from e
        if split != "all":
            unknown = sorted(held_out - set(slices))
            if unknown:
                raise DatasetError(
                    f"ISBI2012 val_slices {unknown} not found in {self.root / 'image'}; the slices that exist are "
                    f"{_describe(slices)}; expected val_slices among them (or split='all', which needs none)"
                )
            pairs = [pair for pair, s in zip(pairs, slices) if (s in held_out) == (split == "val")]
            if not pairs:
                raise DatasetError(
                    f"ISBI2012 split {split!r} is empty: val_slices {_describe(held_out)} hold out "
                    f"{'no slice' if split == 'val' else 'every slice'} of {_describe(slices)} in "
                    f"{self.root / 'image'}; expected val_slices to leave slices for both train and val"
                )
        self.val_slices = tuple(sorted(held_out))
        super().__init__(pairs, _MEMBRANE_LUT, transform)

    def __repr__(self) -> str:
        return f"ISBI2012({self.root}, split={self.split!r}, {len(self)} slices)"
