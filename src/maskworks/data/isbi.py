"""ISBI 2012 EM segmentation challenge (Arganda-Carreras et al., 2015): neuronal membranes, 512x512 grayscale.

Layout: ``image/N.png`` (uint8 slices) and ``label/N.png`` (255 = cell interior, 0 = membrane). Labels are
thresholded at 128: cell interior -> class 0 ("cell"), membrane -> class 1 ("membrane").

:class:`ISBI2012Instances` reads the same files as instance segmentation: every connected region of cell interior
is one "cell" instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskworks.data.folder import PairedFileDataset, pair_files
from maskworks.data.io import IGNORE_INDEX, DatasetError, _describe_values, raw_sample
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


_CONNECTIVITY = {4: np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]), 8: np.ones((3, 3), dtype=int)}


class ISBI2012Instances(ISBI2012):
    """ISBI 2012 as instance segmentation: each connected region of cell interior is one instance of "cell".

    Same files, splits and arguments as :class:`ISBI2012`. The cell interior (label value >= 128) is split into
    connected components with ``scipy.ndimage.label``, 4-connected by default: the membranes are one pixel thin in
    places, and two cells that touch only at a pixel corner across a diagonal membrane are separate cells, which
    8-connectivity would merge. Samples::

        "mask": int64 (H, W): 1 = cell (a kept instance), 0 = membrane / background, 255 = cell interior of a
                component smaller than ``min_area`` (ignored: neither a cell instance nor membrane)
        "instances": {"boxes" (N, 4) xyxy, "labels" (N,) all 1, "masks" bool (N, H, W)}, components in the order
                scipy numbers them (raster order of their first pixel)

    Args:
        root: dataset folder (holding ``image/`` and ``label/``).
        split: ``"train"``, ``"val"`` or ``"all"`` (see :class:`ISBI2012`).
        val_slices: slice numbers held out for validation (see :class:`ISBI2012`).
        transform: callable on the raw sample.
        min_area: components of fewer pixels are left out of the instances (and ignored, 255, in ``mask``):
            default 16, which drops only specks of interior between membrane branches.
        connectivity: 4 or 8 (see above).

    Attributes:
        num_classes: 2 (``["background", "cell"]``, torchvision's detection convention: label 0 = background).
    """

    num_classes = 2
    class_names = ["background", "cell"]
    palette = [ISBI_PALETTE[1], ISBI_PALETTE[0]]

    def __init__(
        self,
        root: str | Path = "../shared/data/isbi2012",
        split: str = "train",
        val_slices: Sequence[int] | None = None,
        transform: Callable[[dict], dict] | None = None,
        min_area: int = 16,
        connectivity: int = 4,
    ) -> None:
        if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 0:
            raise DatasetError(f"ISBI2012Instances min_area must be an integer >= 0 (pixels), got {min_area!r}")
        if connectivity not in _CONNECTIVITY or isinstance(connectivity, bool):
            raise DatasetError(f"ISBI2012Instances connectivity must be 4 or 8, got {connectivity!r}")
        self.min_area, self.connectivity = int(min_area), int(connectivity)
        super().__init__(root, split, val_slices, transform)

    def cell_instances(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Instances of a cell-interior map: ``(masks bool (N, H, W), boxes float32 (N, 4) xyxy, small bool (H, W))``.

        Args:
            cells: bool ``(H, W)``, True = cell interior.

        Returns:
            The masks and tight boxes (pixel-edge convention) of the components of at least ``min_area`` pixels, and
            the pixels of the smaller ones.
        """
        from scipy import ndimage

        components, n = ndimage.label(cells, structure=_CONNECTIVITY[self.connectivity])
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        kept = np.flatnonzero(sizes[1:] >= self.min_area) + 1
        masks = components[None] == kept[:, None, None]
        slices = ndimage.find_objects(components)
        boxes = np.array(
            [[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop] for sl in (slices[k - 1] for k in kept)],
            dtype=np.float32,
        ).reshape(-1, 4)
        small = cells & ~np.isin(components, kept)
        return masks, boxes, small

    def load_raw(self, index: int) -> dict[str, Any]:
        image, membrane = self.read_pair(index)  # 0 = cell interior, 1 = membrane
        cells = membrane == 0
        masks, boxes, small = self.cell_instances(cells)
        semantic = cells.astype(np.int64)
        semantic[small] = IGNORE_INDEX
        instances = {"labels": np.ones(len(masks), dtype=np.int64), "masks": masks, "boxes": boxes}
        return {**raw_sample(image, semantic, instances), "file": str(self.pairs[index][0])}

    def __repr__(self) -> str:
        return f"ISBI2012Instances({self.root}, split={self.split!r}, {len(self)} slices, min_area={self.min_area})"
