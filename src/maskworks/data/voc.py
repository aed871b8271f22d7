"""Pascal VOC 2012 segmentation (Everingham et al., "The PASCAL Visual Object Classes Challenge", IJCV 2010), with
the SBD augmented training set (Hariharan et al., "Semantic Contours from Inverse Detectors", ICCV 2011): 21 classes.

Layout of the official ``VOCtrainval_11-May-2012.tar``::

    VOCdevkit/VOC2012/
      JPEGImages/2007_000032.jpg
      SegmentationClass/2007_000032.png        palette PNGs: 0 = background, 1..20 = classes, 255 = object borders
      ImageSets/Segmentation/{train,val,trainval}.txt   one image id per line
      SegmentationClassAug/2007_000032.png     optional: the augmented labels (grayscale PNGs, values 0..20, 255)
      ImageSets/Segmentation/train_aug.txt     optional: the 10,582-image augmented training list

The borders (255) are ignored. The augmented training split ``train_aug`` is the usual 10,582 images: VOC train and
all of SBD, minus VOC val. It is read from a list file with its labels in ``SegmentationClassAug/`` (an id missing
there is read from ``SegmentationClass/``): ``ImageSets/Segmentation/train_aug.txt``, mmsegmentation's
``ImageSets/Segmentation/trainaug.txt`` or deeplab-pytorch's ``ImageSets/SegmentationAug/train_aug.txt`` (the first
found). A list line is an image id, or an image path and a label path relative to ``VOC2012/`` (e.g.
``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``). Given ``sbd_root``, ``train_aug`` is built
from the original SBD release instead (``benchmark_RELEASE/dataset``: ``cls/<id>.mat`` label files, ``img/``,
``train.txt``, ``val.txt``), reading ``GTcls.Segmentation`` from each ``.mat`` file with :func:`scipy.io.loadmat`;
there an image with an official VOC label uses that one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from maskworks.data.folder import PairedFileDataset, _list_files
from maskworks.data.io import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    check_same_size,
    label_lut,
    map_labels,
    read_image,
)
from maskworks.data.palette import VOC_BORDER_COLOR, VOC_CLASSES, VOC_PALETTE

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "trainval", "train_aug")
AUG_LISTS = (
    "ImageSets/Segmentation/train_aug.txt",
    "ImageSets/Segmentation/trainaug.txt",
    "ImageSets/SegmentationAug/train_aug.txt",
)
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """The class label map ``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file, as int64 ``(H, W)``.

    Raises:
        DatasetError: the file is missing, not a MATLAB file, or holds no 2-D integer ``GTcls.Segmentation``.
    """
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path)
    except FileNotFoundError as e:
        raise DatasetError(f"SBD label file {path} does not exist") from e
    except Exception as e:  # scipy raises MatReadError, ValueError, OSError, ... on damaged files
        raise DatasetError(
            f"cannot read SBD label file {path}: {type(e).__name__}: {e}; expected a MATLAB .mat file with a GTcls "
            f"struct"
        ) from e
    expected = "expected a GTcls struct whose Segmentation field is a 2-D integer label map (SBD's cls/*.mat)"
    gt = mat.get("GTcls")
    names = getattr(getattr(gt, "dtype", None), "names", None) or ()
    if "Segmentation" not in names:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"SBD label file {path} holds {found or 'no variables'}; {expected}")
    seg: Any = gt["Segmentation"]
    while isinstance(seg, np.ndarray) and seg.dtype == object and seg.size == 1:  # MATLAB cells / 1x1 structs
        seg = seg.flat[0]
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.integer):
        raise DatasetError(
            f"SBD label file {path}: GTcls.Segmentation is a {seg.dtype} array of shape {seg.shape}; {expected}"
        )
    return seg.astype(np.int64)


def _find_voc_root(root: Path) -> Path:
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(
        f"Pascal VOC not found at {root}: expected the VOC2012 folder (holding JPEGImages/, SegmentationClass/ and "
        f"ImageSets/Segmentation/), i.e. one of {', '.join(str(c / 'JPEGImages') for c in candidates)}"
    )


def _find_sbd_root(sbd_root: str | Path) -> Path:
    given = Path(sbd_root).expanduser().resolve()
    candidates = [given, given / "dataset", given / "benchmark_RELEASE" / "dataset"]
    for candidate in candidates:
        if (candidate / "cls").is_dir():
            return candidate
    raise DatasetError(
        f"SBD not found at {given}: expected the benchmark_RELEASE/dataset folder (holding cls/*.mat, img/, "
        f"train.txt and val.txt), i.e. one of {', '.join(str(c / 'cls') for c in candidates)}"
    )


def _read_list(path: Path) -> list[list[str]]:
    """The non-empty lines of a split file, each split into 1 (an id) or 2 (image and label paths) fields."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DatasetError(f"split file {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"cannot read split file {path}: {e}; expected a text file with one image id per line"
        ) from e
    entries = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DatasetError(
                f"split file {path}, line {lineno}: {line.strip()!r}; expected an image id (e.g. 2007_000032) or "
                f"an image path and a label path"
            )
        entries.append(fields)
    if not entries:
        raise DatasetError(f"split file {path} is empty; expected one image id per line")
    return entries


class VOCSegmentation(PairedFileDataset):
    """Pascal VOC 2012 semantic segmentation: 21 classes (background + 20 objects), RGB images, borders ignored.

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: the ``VOC2012`` folder, the ``VOCdevkit`` folder holding it, or the folder holding ``VOCdevkit``;
            absolute or relative to the current directory.
        split: ``"train"`` (1,464 images), ``"val"`` (1,449), ``"trainval"`` (2,913), ``"train_aug"`` (10,582 with
            SBD, see the module docstring) or the name of any other list file in ``ImageSets/Segmentation/``.
        transform: callable on the raw sample.
        sbd_root: the SBD release (``benchmark_RELEASE`` or its ``dataset`` folder) to build ``train_aug`` from its
            ``.mat`` labels; by default ``train_aug`` comes from ``ImageSets/Segmentation/train_aug.txt`` and
            ``SegmentationClassAug/``.

    Raises:
        DatasetError: a missing folder or split file (the message names the path expected), a malformed split file,
            or images / labels missing for listed ids (all named).
    """

    num_classes = len(VOC_CLASSES)
    class_names = list(VOC_CLASSES)
    palette = list(VOC_PALETTE)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    in_channels = 3

    def __init__(
        self,
        root: str | Path = "../shared/data/voc",
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        sbd_root: str | Path | None = None,
    ) -> None:
        if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
            raise DatasetError(f"VOC split must be one of {', '.join(SPLITS)} (or a list file's name), got {split!r}")
        self.root = _find_voc_root(Path(root).expanduser().resolve())
        self.split = split
        self.sbd_root = None if sbd_root is None else _find_sbd_root(sbd_root)
        self.list_dir = self.root / "ImageSets" / "Segmentation"
        if split == "train_aug":
            pairs = self._sbd_pairs() if self.sbd_root is not None else self._aug_list_pairs()
        else:
            pairs = self._list_pairs(self._split_file(split), ("SegmentationClass",))
        # RGB-converted label PNGs are read through the VOC colours too (the border colour is ignored).
        super().__init__(pairs, label_lut(self.num_classes), transform, list(VOC_PALETTE), [VOC_BORDER_COLOR])

    def _split_file(self, split: str) -> Path:
        path = self.list_dir / f"{split}.txt"
        if not path.is_file():
            found = sorted(p.stem for p in self.list_dir.glob("*.txt")) if self.list_dir.is_dir() else []
            raise DatasetError(
                f"VOC split file {path} not found; split files in {self.list_dir}: {', '.join(found) or 'none'}"
            )
        return path

    def _aug_list_pairs(self) -> list[tuple[Path, Path]]:
        lists = [self.root / name for name in AUG_LISTS]
        found = [p for p in lists if p.is_file()]
        if not found:
            raise DatasetError(
                f"VOC split 'train_aug' needs a list file ({', '.join(str(p) for p in lists)}) with its labels in "
                f"{self.root / 'SegmentationClassAug'}, or sbd_root= the SBD release (benchmark_RELEASE) to build it"
            )
        return self._list_pairs(found[0], ("SegmentationClassAug", "SegmentationClass"))

    def _list_pairs(self, list_file: Path, label_dirs: tuple[str, ...]) -> list[tuple[Path, Path]]:
        """Pairs of a list file: ids (image ``JPEGImages/<id>.jpg``, label ``<label_dir>/<id>.png`` from the first
        label folder that has it) or ``image label`` path pairs relative to the VOC2012 folder."""
        pairs, missing = [], []
        for fields in _read_list(list_file):
            if len(fields) == 2:
                image, label = (self.root / f.lstrip("/") for f in fields)
            else:
                image = self.root / "JPEGImages" / f"{fields[0]}.jpg"
                options = [self.root / d / f"{fields[0]}.png" for d in label_dirs]
                label = next((p for p in options if p.is_file()), options[0])
            missing += [f"{p} ({kind})" for p, kind in ((image, "image"), (label, "label")) if not p.is_file()]
            pairs.append((image, label))
        if missing:
            raise DatasetError(
                f"VOC split file {list_file} lists {len(missing)} file(s) that do not exist: {_list_files(missing)}"
            )
        return pairs

    def _sbd_pairs(self) -> list[tuple[Path, Path]]:
        """train_aug from the SBD release: (VOC train + SBD train + SBD val) - VOC val, sorted by id."""
        assert self.sbd_root is not None
        voc_train = {f[0] for f in _read_list(self._split_file("train"))}
        voc_val = {f[0] for f in _read_list(self._split_file("val"))}
        sbd = set()
        for name in ("train.txt", "val.txt"):
            sbd |= {f[0] for f in _read_list(self.sbd_root / name)}
        pairs, missing = [], []
        for image_id in sorted((voc_train | sbd) - voc_val):
            images = [self.root / "JPEGImages" / f"{image_id}.jpg", self.sbd_root / "img" / f"{image_id}.jpg"]
            labels = [self.root / "SegmentationClass" / f"{image_id}.png", self.sbd_root / "cls" / f"{image_id}.mat"]
            image = next((p for p in images if p.is_file()), None)
            label = next((p for p in labels if p.is_file()), None)
            if image is None:
                missing.append(f"image {image_id} (expected {images[0]} or {images[1]})")
            if label is None:
                missing.append(f"label {image_id} (expected {labels[0]} or {labels[1]})")
            if image is not None and label is not None:
                pairs.append((image, label))
        if missing:
            raise DatasetError(
                f"VOC split 'train_aug' from SBD {self.sbd_root}: {len(missing)} file(s) missing: {_list_files(missing)}"
            )
        return pairs

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        if mask_path.suffix.lower() != ".mat":
            return super().read_pair(index)
        image = read_image(image_path, self.in_channels)
        mask = map_labels(read_sbd_mat(mask_path), self.lut, mask_path)
        check_same_size(image, mask, image_path, mask_path)
        return image, mask

    def __repr__(self) -> str:
        return f"VOCSegmentation({self.root}, split={self.split!r}, {len(self)} samples)"
