"""COCO instance segmentation (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014): a COCO JSON file
plus a folder of images, read through pycocotools.

Layouts (see :func:`coco_layout`)::

    root/annotations/instances_train2017.json   root/train2017/000000000009.jpg    (official COCO 2017)
    root/annotations/instances_val2017.json     root/val2017/000000000139.jpg
    root/annotations/instances_{split}.json     root/{split}/...  or  root/images/{split}/...   (any split name)

or any ``annotation_file`` with any ``images_dir``: ``CocoInstances("my/images", annotation_file="my/coco.json")``.

Samples follow :mod:`maskworks.data.io`::

    {"image": float32 (3, H, W) (ImageNet mean/std),
     "mask": int64 (H, W): instance labels painted (see below), 0 = background, 255 = crowd regions (ignore),
     "instances": {"boxes": float32 (N, 4) xyxy, "labels": int64 (N,), "masks": bool (N, H, W),
                   "iscrowd": int64 (N,)},
     "meta": {"file", "index", "orig_size", "image_id"}}

Labels: the COCO category ids, sorted, become the contiguous labels ``1..C``; 0 is the background (torchvision's
detection convention, ``num_classes = C + 1``). ``category_ids[label]`` gives the COCO id back (``category_ids[0]``
is None). Crowd annotations (``iscrowd=1``) are instances with ``iscrowd=1``: training code should ignore them (or
use them as ignore regions), evaluation treats them as COCO crowd regions.

Masks are decoded at the image size given in the JSON (``height``/``width``, checked against the image file when it
is read): polygons (``[[x1, y1, x2, y2, ...], ...]`` in pixel-edge coordinates, pixel ``i`` covering ``[i, i + 1)``;
the polygons of one annotation are unioned), uncompressed RLE (``{"size": [h, w], "counts": [int, ...]}``, column-
major runs starting with background) and compressed RLE (``counts`` a string, as written by
``pycocotools.mask.encode``).

The semantic ``mask``: first every crowd region is painted 255 (ignore); then the non-crowd instances are painted
with their label in order of decreasing mask area (ties: annotation order), so where instances overlap the smaller
one stays visible, and a non-crowd instance's pixels win over a crowd region.

Results: :func:`coco_results` (or :meth:`CocoInstances.to_coco_results`) turns per-image predictions of the
maskworks instance contract into COCO result dicts, which :func:`write_coco_results` writes atomically; they load
with ``COCO.loadRes`` and evaluate with ``COCOeval`` against :attr:`CocoInstances.coco`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskworks.data.io import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    SegmentationDataset,
    raw_sample,
    read_image,
)
from maskworks.data.palette import default_palette
from maskworks.ops.polygons import simplify_polygon

__all__ = [
    "CocoInstances",
    "coco_layout",
    "coco_results",
    "write_coco_results",
    "mask_to_polygons",
]

_SHOWN = 10  # offending items listed in one error message


def _mask_utils() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'COCO datasets need pycocotools: pip install "maskworks[coco]" (or pip install pycocotools)'
        ) from err
    return mask_utils


# --------------------------------------------------------------------------------------------------- layout
def coco_layout(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(images_dir, annotation_file)`` of a split under a COCO-style ``root``.

    Looks for ``root/annotations/instances_{split}.json``, then, when ``split`` does not end with a digit,
    ``root/annotations/instances_{split}2017.json`` (so ``"train"`` finds the official COCO 2017 files). The images
    of the file found (``instances_{name}.json``) are in ``root/{name}/`` or ``root/images/{name}/``.

    Raises:
        DatasetError: no annotation file or no image folder; the message lists the paths tried.
    """
    root = Path(root).expanduser()
    names = [split] + ([f"{split}2017"] if not split[-1:].isdigit() else [])
    tried = [root / "annotations" / f"instances_{name}.json" for name in names]
    for name, ann in zip(names, tried):
        if ann.is_file():
            folders = [root / name, root / "images" / name]
            for folder in folders:
                if folder.is_dir():
                    return folder, ann
            raise DatasetError(
                f"COCO split {split!r}: found {ann} but no image folder {' or '.join(str(f) for f in folders)}; "
                f"expected the images of {ann.name} in one of them"
            )
    raise DatasetError(
        f"COCO split {split!r}: no annotation file {' or '.join(str(t) for t in tried)}; expected the COCO layout "
        f"root/annotations/instances_<split>.json + root/<split>/ (e.g. instances_val2017.json + val2017/), or pass "
        f"annotation_file= (and images_dir=)"
    )


def _resolve(path: str | Path, root: Path) -> Path:
    """A user path: absolute, or relative to the current directory when it exists there, else to ``root``."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return root / path


# --------------------------------------------------------------------------------------------------- JSON checks
def _load_json(path: Path) -> Any:
    try:
        text = path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"COCO annotation file {path} does not exist") from e
    except OSError as e:
        raise DatasetError(f"cannot read COCO annotation file {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"COCO annotation file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
            f"(char {e.pos}); expected a COCO JSON object with 'images', 'annotations' and 'categories'"
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"COCO annotation file {path} is not UTF-8 text ({e}); expected a COCO JSON file") from e


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _rle_string_counts(counts: str) -> list[int] | None:
    """Run lengths of a compressed RLE string (pycocotools' ``rleFrString``), or None when it is malformed."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


class _Problems:
    """Context of the annotation-file checks: raises one-line DatasetErrors naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, what: str, expected: str) -> DatasetError:
        return DatasetError(f"COCO annotation file {self.path}: {what}; expected {expected}")


def _check_segmentation(
    seg: Any, ann_desc: str, height: int, width: int, tolerance: float, problems: _Problems
) -> None:
    """Polygons: >= 3 points each, finite coordinates inside the image (+- tolerance); RLE: size == image size."""
    if isinstance(seg, list):
        if not seg:
            raise problems.error(f"{ann_desc} has an empty polygon list", "at least one polygon of >= 3 points")
        if not all(isinstance(poly, list) for poly in seg):
            raise problems.error(
                f"{ann_desc} has segmentation {str(seg)[:60]}... (not a list of polygons)",
                "polygons as a list of flat lists [[x1, y1, x2, y2, ...], ...]",
            )
        for j, poly in enumerate(seg):
            if len(poly) < 6 or len(poly) % 2:
                raise problems.error(
                    f"{ann_desc} polygon {j} has {len(poly)} coordinates",
                    "an even number >= 6 (at least 3 points x, y)",
                )
            if not all(_is_number(v) for v in poly):
                raise problems.error(f"{ann_desc} polygon {j} holds non-numeric or non-finite coordinates", "numbers")
            xs, ys = poly[0::2], poly[1::2]
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
                raise problems.error(
                    f"{ann_desc} polygon {j} spans x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, outside the image "
                    f"({width}x{height} WxH)",
                    f"coordinates within 0..{width} x 0..{height} (+-{tolerance:g} px)",
                )
        return
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise problems.error(f"{ann_desc} has RLE size {size!r}", "'size': [height, width]")
        if list(size) != [height, width]:
            raise problems.error(
                f"{ann_desc} has RLE size {size[0]}x{size[1]} (HxW) but its image is {height}x{width}",
                "the RLE size to equal the image's height and width",
            )
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                raise problems.error(f"{ann_desc} has RLE counts that are not non-negative integers", "run lengths")
            runs = counts
        elif isinstance(counts, str):
            runs = _rle_string_counts(counts)
            if runs is None or any(v < 0 for v in runs):
                raise problems.error(f"{ann_desc} has a malformed compressed RLE string", "pycocotools' RLE string")
        else:
            raise problems.error(
                f"{ann_desc} has RLE counts of type {type(counts).__name__}", "a list of ints or an RLE string"
            )
        if sum(runs) != height * width:
            raise problems.error(
                f"{ann_desc} has RLE runs summing to {sum(runs)} pixels but its image has {height}x{width} = "
                f"{height * width}",
                "runs covering the whole image",
            )
        return
    raise problems.error(
        f"{ann_desc} has segmentation of type {type(seg).__name__}", "polygons (list) or RLE (dict with size/counts)"
    )


def _to_rle(seg: Any, height: int, width: int) -> dict:
    """One annotation's segmentation (already checked) -> a compressed RLE of the image size."""
    mask_utils = _mask_utils()
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": [height, width], "counts": seg["counts"].encode("ascii")}


def _decode_all(segs: Sequence[Any], height: int, width: int) -> np.ndarray:
    """Segmentations (already checked) -> bool ``(N, H, W)``."""
    if not segs:
        return np.zeros((0, height, width), dtype=bool)
    rles = [_to_rle(seg, height, width) for seg in segs]
    with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        masks = _mask_utils().decode(rles)  # (H, W, N) uint8
    return np.ascontiguousarray(masks.transpose(2, 0, 1)).astype(bool)


# --------------------------------------------------------------------------------------------------- dataset
def check_coco_top_level(data: Any, error: Any, kind: str) -> None:
    """Raise ``error(what, expected)`` unless ``data`` is a JSON object with ``images``, ``annotations`` and
    ``categories`` lists (``kind`` names the file type in the message: "a COCO instances file")."""
    if not isinstance(data, dict):
        raise error(f"the top level is a {type(data).__name__}", "a JSON object")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise error(
            f"missing key(s) {missing} (found {sorted(data)[:10]})",
            f"'images', 'annotations' and 'categories' ({kind})",
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise error(f"'{key}' is a {type(data[key]).__name__}", f"'{key}' to be a list")


class CocoInstances(SegmentationDataset):
    """COCO instance segmentation: images + a COCO JSON file (see the module docstring for layouts and samples).

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: dataset folder holding ``annotations/`` and the image folders (see :func:`coco_layout`); or, with
            ``annotation_file`` given and no ``images_dir``, the image folder itself.
        split: split name (``"train"``, ``"val"``, ``"train2017"``, any ``instances_<split>.json``) used when no
            ``annotation_file`` is given; ``"train"`` and ``"val"`` find the COCO 2017 files.
        transform: callable on the raw sample (see :mod:`maskworks.data.transforms`).
        annotation_file: a COCO JSON file, absolute, relative to the current directory or to ``root``; overrides
            the split layout.
        images_dir: folder that the images' ``file_name`` are relative to (absolute, relative to the current
            directory or to ``root``); default the split's image folder, or ``root`` with ``annotation_file``.
        skip_empty: leave out images without any (kept) annotation; by default they are samples with empty
            instances (``(0, 4)`` boxes, ``(0,)`` labels, ``(0, H, W)`` masks).
        min_area: leave out annotations whose ``area`` (the JSON field, as COCOeval uses it) is below this;
            annotations without ``area`` are kept. 0 keeps all.
        polygon_tolerance: polygon coordinates may lie this many pixels outside the image (COCO's own polygons
            touch the border at ``width``/``height``); further out is an error.

    Attributes:
        num_classes: C + 1 (background included).
        class_names: ``["background", <category names in sorted id order>]``.
        category_ids: label -> COCO category id (``category_ids[0]`` is None).
        image_ids: COCO image id of each sample, sorted by id (as torchvision's ``CocoDetection``).
        coco: the ``pycocotools.coco.COCO`` of the whole annotation file (built on first use), for ``COCOeval``.

    Raises:
        DatasetError: missing or malformed files (invalid JSON with its position, missing 'images' / 'annotations' /
            'categories', duplicate ids, annotations of unknown images or categories, polygons of fewer than 3
            points or outside the image, RLE of another size than the image, missing image files). Reading a sample
            whose image file has another size than the JSON says is a DatasetError naming the file and both sizes.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    in_channels = 3

    def __init__(
        self,
        root: str | Path = "../shared/data/coco",
        split: str | None = "train",
        transform: Callable[[dict], dict] | None = None,
        annotation_file: str | Path | None = None,
        images_dir: str | Path | None = None,
        skip_empty: bool = False,
        min_area: float = 0.0,
        polygon_tolerance: float = 1.0,
    ) -> None:
        super().__init__(transform)
        self.root, self.split = Path(root).expanduser(), split
        if annotation_file is not None:
            ann_path = _resolve(annotation_file, self.root)
            image_dir = _resolve(images_dir, self.root) if images_dir is not None else self.root
        else:
            if not split:
                raise DatasetError(f"CocoInstances({self.root}): give a split or an annotation_file")
            image_dir, ann_path = coco_layout(self.root, split)
            if images_dir is not None:
                image_dir = _resolve(images_dir, self.root)
        if not image_dir.is_dir():
            raise DatasetError(f"COCO image folder {image_dir} does not exist; expected the images of {ann_path}")
        if not _is_number(min_area) or min_area < 0 or not _is_number(polygon_tolerance) or polygon_tolerance < 0:
            raise DatasetError(
                f"CocoInstances({ann_path}): min_area and polygon_tolerance must be numbers >= 0, got "
                f"{min_area!r} and {polygon_tolerance!r}"
            )
        self.annotation_file, self.images_dir = ann_path, image_dir
        self.skip_empty, self.min_area, self.polygon_tolerance = bool(skip_empty), float(min_area), polygon_tolerance
        self._dataset = _load_json(ann_path)
        self._index(self._dataset)
        self._coco: Any = None

    # ----------------------------------------------------------------------------------------- indexing
    def _index(self, data: Any) -> None:
        problems = _Problems(self.annotation_file)
        check_coco_top_level(data, problems.error, "a COCO instances file")

        categories: dict[int, str] = {}
        for i, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise problems.error(f"categories[{i}] = {str(cat)[:80]} has no integer 'id'", "{'id': int, 'name'}")
            if cat["id"] in categories:
                raise problems.error(f"category id {cat['id']} appears twice", "unique category ids")
            categories[cat["id"]] = str(cat.get("name", f"category_{cat['id']}"))
        if not categories:
            raise problems.error("'categories' is empty", "at least one category")

        images: dict[int, dict] = {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict):
                raise problems.error(f"images[{i}] is a {type(img).__name__}", "an object")
            ok = (
                _is_int(img.get("id"))
                and isinstance(img.get("file_name"), str)
                and _is_int(img.get("height"))
                and _is_int(img.get("width"))
                and img["height"] > 0
                and img["width"] > 0
            )
            if not ok:
                raise problems.error(
                    f"images[{i}] = {str(img)[:100]} lacks an integer 'id', a 'file_name' or positive integer "
                    f"'height'/'width'",
                    "{'id': int, 'file_name': str, 'height': int > 0, 'width': int > 0}",
                )
            if img["id"] in images:
                raise problems.error(f"image id {img['id']} appears twice", "unique image ids")
            images[img["id"]] = img

        per_image: dict[int, list[dict]] = {k: [] for k in images}
        seen_ids: set = set()
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise problems.error(f"annotations[{i}] is a {type(ann).__name__}", "an object")
            desc = f"annotation {ann.get('id')!r} (annotations[{i}])"
            if not _is_int(ann.get("id")):
                raise problems.error(f"{desc} has no integer 'id'", "an integer annotation id")
            if ann["id"] in seen_ids:
                raise problems.error(f"annotation id {ann['id']} appears twice", "unique annotation ids")
            seen_ids.add(ann["id"])
            if ann.get("image_id") not in images:
                raise problems.error(
                    f"{desc} refers to unknown image_id {ann.get('image_id')!r}", "an id listed in 'images'"
                )
            if ann.get("category_id") not in categories:
                raise problems.error(
                    f"{desc} refers to unknown category_id {ann.get('category_id')!r}",
                    f"one of the category ids {sorted(categories)[:20]}",
                )
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1):
                raise problems.error(f"{desc} has iscrowd={crowd!r}", "0 or 1")
            if "segmentation" not in ann:
                raise problems.error(f"{desc} has no 'segmentation'", "polygons or RLE (instance segmentation)")
            area = ann.get("area")
            if area is not None and not _is_number(area):
                raise problems.error(f"{desc} has area={area!r}", "a number")
            img = images[ann["image_id"]]
            _check_segmentation(
                ann["segmentation"], desc, img["height"], img["width"], self.polygon_tolerance, problems
            )
            if area is not None and area < self.min_area:
                continue
            per_image[ann["image_id"]].append(ann)

        ids = sorted(images)
        if self.skip_empty:
            ids = [k for k in ids if per_image[k]]
        missing_files = [self.images_dir / images[k]["file_name"] for k in ids]
        missing_files = [p for p in missing_files if not p.is_file()]
        if missing_files:
            more = f" and {len(missing_files) - 1} more" if len(missing_files) > 1 else ""
            raise DatasetError(
                f"image file {missing_files[0]} does not exist{more} (listed in {self.annotation_file}); expected the "
                f"images' file_name relative to {self.images_dir}"
            )
        self.category_ids: list[int | None] = [None, *sorted(categories)]
        self.category_to_label = {c: i for i, c in enumerate(self.category_ids) if c is not None}
        self.class_names = ["background", *(categories[c] for c in self.category_ids[1:])]
        self.num_classes = len(self.class_names)
        self.palette = default_palette(self.num_classes)
        self.image_ids: list[int] = ids
        self._images = images
        self._anns = per_image

    # ----------------------------------------------------------------------------------------- access
    @property
    def coco(self) -> Any:
        """``pycocotools.coco.COCO`` of the whole annotation file (every image and annotation), for ``COCOeval``."""
        if self._coco is None:
            try:
                from pycocotools.coco import COCO
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError('COCO needs pycocotools: pip install "maskworks[coco]"') from err
            coco = COCO()
            coco.dataset = self._dataset
            with contextlib.redirect_stdout(io.StringIO()):  # COCO.createIndex prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    def label_to_category(self, label: int) -> int:
        """The COCO category id of a contiguous label 1..C."""
        label = int(label)
        if not 1 <= label < self.num_classes:
            raise ValueError(f"label {label} has no COCO category; expected 1..{self.num_classes - 1} (0 = background)")
        return int(self.category_ids[label])  # type: ignore[arg-type]

    def image_info(self, index: int) -> dict:
        """The JSON ``images`` entry of sample ``index``."""
        return self._images[self.image_ids[index]]

    def annotations(self, index: int) -> list[dict]:
        """The (kept) JSON annotations of sample ``index``, in file order."""
        return list(self._anns[self.image_ids[index]])

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_raw(self, index: int) -> dict[str, Any]:
        info = self.image_info(index)
        path = self.images_dir / info["file_name"]
        h, w = info["height"], info["width"]
        image = read_image(path, channels=3)
        if image.shape[:2] != (h, w):
            raise DatasetError(
                f"image {path} is {image.shape[0]}x{image.shape[1]} (HxW) but {self.annotation_file} says "
                f"{h}x{w} (image_id {info['id']}); expected the same size"
            )
        anns = self._anns[info["id"]]
        masks = _decode_all([a["segmentation"] for a in anns], h, w)
        labels = np.array([self.category_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        iscrowd = np.array([int(a.get("iscrowd", 0)) for a in anns], dtype=np.int64)
        semantic = np.zeros((h, w), dtype=np.int64)
        for k in np.flatnonzero(iscrowd == 1):
            semantic[masks[k]] = IGNORE_INDEX
        areas = masks.reshape(len(anns), h * w).sum(1)
        things = [k for k in range(len(anns)) if not iscrowd[k]]
        for k in sorted(things, key=lambda k: (-areas[k], k)):  # largest first: smaller instances stay on top
            semantic[masks[k]] = labels[k]
        instances = {"labels": labels, "masks": masks, "iscrowd": iscrowd}
        return {**raw_sample(image, semantic, instances), "file": str(path)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        sample["meta"]["image_id"] = self.image_ids[sample["meta"]["index"]]
        return sample

    def to_coco_results(
        self, predictions: Sequence[Mapping[str, Any]], indices: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """COCO result dicts of per-image predictions of samples ``indices`` (default ``0..len(predictions)-1``).

        Masks must have the original image size (checked against the JSON). See :func:`coco_results`.
        """
        indices = list(range(len(predictions))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(indices)} indices; expected one per image")
        for pred, i in zip(predictions, indices):
            masks = pred.get("masks")
            info = self.image_info(i)
            if masks is not None and tuple(masks.shape[-2:]) != (info["height"], info["width"]):
                raise ValueError(
                    f"prediction masks of sample {i} ({info['file_name']}) are {tuple(masks.shape[-2:])} but the "
                    f"image is {(info['height'], info['width'])}; expected masks at the original image size"
                )
        return coco_results(predictions, [self.image_ids[i] for i in indices], self.category_ids)

    def __repr__(self) -> str:
        return (
            f"CocoInstances({self.annotation_file}, {len(self)} images, {self.num_classes - 1} categories"
            f"{', skip_empty' if self.skip_empty else ''})"
        )


# --------------------------------------------------------------------------------------------------- results
def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int | None] | Mapping[int, int],
) -> list[dict[str, Any]]:
    """COCO result dicts from per-image predictions of the maskworks instance contract.

    Args:
        predictions: one dict per image: ``labels (N,)`` contiguous labels (1..C), ``scores (N,)``, and
            ``masks (N, H, W)`` (bool, 0/1 integers, or probabilities thresholded at 0.5; ``(N, 1, H, W)`` is
            accepted) and/or ``boxes (N, 4)`` xyxy in pixels. Tensors or arrays.
        image_ids: the COCO image id of each prediction.
        category_ids: label -> COCO category id, a list (``category_ids[0]`` = background, unused) or a dict.

    Returns:
        ``[{"image_id", "category_id", "score", "bbox": [x, y, w, h], "segmentation": {"size": [H, W],
        "counts": str}}, ...]``; ``segmentation`` only when masks are given; ``bbox`` from ``boxes`` when given,
        else the mask's tight box (pixel-edge convention, as ``pycocotools.mask.toBbox``).

    Raises:
        ValueError: mismatched lengths, or a label without a category id (e.g. 0 = background).
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions but {len(image_ids)} image ids; expected one per image")
    mask_utils = _mask_utils()
    lookup = dict(category_ids) if isinstance(category_ids, Mapping) else dict(enumerate(category_ids))
    results: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids):
        labels = _numpy(pred["labels"]).astype(np.int64).reshape(-1)
        scores = _numpy(pred["scores"]).astype(np.float64).reshape(-1)
        n = len(labels)
        masks = pred.get("masks")
        boxes = pred.get("boxes")
        if masks is None and boxes is None:
            raise ValueError(f"prediction for image {image_id} has neither 'masks' nor 'boxes'")
        if masks is not None:
            masks = _numpy(masks)
            if masks.ndim == 4 and masks.shape[1] == 1:
                masks = masks[:, 0]
            if masks.dtype.kind == "f":
                masks = masks >= 0.5
            masks = masks.astype(bool)
            if masks.ndim != 3 or masks.shape[0] != n:
                raise ValueError(
                    f"prediction for image {image_id}: masks {masks.shape} for {n} labels; expected (N,H,W)"
                )
        if boxes is not None:
            boxes = _numpy(boxes).astype(np.float64).reshape(-1, 4)
            if boxes.shape[0] != n:
                raise ValueError(f"prediction for image {image_id}: {boxes.shape[0]} boxes for {n} labels")
        if scores.shape[0] != n:
            raise ValueError(f"prediction for image {image_id}: {scores.shape[0]} scores for {n} labels")
        rles = (
            mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
            if masks is not None
            else None
        )
        for k in range(n):
            category = lookup.get(int(labels[k]))
            if category is None:
                raise ValueError(
                    f"prediction for image {image_id} has label {int(labels[k])}, which has no COCO category id "
                    f"(known labels: {sorted(k for k, v in lookup.items() if v is not None)}; 0 = background)"
                )
            result: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(category),
                "score": float(scores[k]),
            }
            if boxes is not None:
                x1, y1, x2, y2 = boxes[k].tolist()
                result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            if rles is not None:
                rle = rles[k]
                if boxes is None:
                    result["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
                result["segmentation"] = {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                }
            results.append(result)
    return results


def write_coco_results(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write COCO result dicts as JSON through a temporary file and an atomic rename; returns the path."""
    from maskworks.checkpoint import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(list(results), separators=(",", ":")).encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------------- polygons
def mask_to_polygons(mask: Any, tolerance: float = 0.25) -> list[list[float]]:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` of the outer boundaries of a binary mask.

    The boundaries are the level-0.5 iso-lines (``contourpy`` filled contours) of the mask padded by one pixel,
    shifted to COCO's pixel-edge coordinates (pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)``, so its centre is
    at ``(c + 0.5, r + 0.5)``): they run through the midpoints of the pixel edges between set and unset pixels, with
    the convex corners cut diagonally, and ``pycocotools.mask.frPyObjects`` rasterises them back to exactly the same
    pixels (for masks without holes, with ``tolerance`` <= 0.25). One polygon per 4-connected component: pixels
    touching only at a corner give separate polygons. COCO polygons cannot hold holes: hole boundaries are dropped,
    so a ring comes back filled; use RLE (:func:`coco_results`) for masks with holes.

    Args:
        mask: bool ``(H, W)`` (array or tensor; non-zero = set).
        tolerance: Douglas-Peucker simplification tolerance in pixels (:func:`maskworks.ops.simplify_polygon`); 0
            keeps every boundary vertex. The default 0.25 drops collinear vertices (about 2-3x fewer points) and still
            rasterises back to the same pixels; 0.5 and more simplify further but start to move boundary pixels. A
            ring that would fall below 3 points (a single pixel) is kept unsimplified.

    Returns:
        Flat polygons of at least 3 points each (none for an empty mask), in the order contourpy finds them.
    """
    from contourpy import FillType, contour_generator

    m = _numpy(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_to_polygons expects a (H, W) mask, got shape {m.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if not m.any():
        return []
    z = np.pad(m != 0, 1).astype(np.float64)
    gen = contour_generator(z=z, fill_type=FillType.OuterOffset)
    points, offsets = gen.filled(0.5, 1.5)
    polygons = []
    for pts, offs in zip(points, offsets):
        ring = pts[offs[0] : offs[1]] - 0.5  # padded centre-index coordinates -> pixel-edge coordinates
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if tolerance > 0 and len(ring) > 3:
            simple = simplify_polygon(ring, tolerance)
            ring = simple if len(simple) >= 3 else ring  # tiny objects (a single pixel's diamond) stay as they are
        if len(ring) >= 3:
            polygons.append([float(v) for v in ring.reshape(-1)])
    return polygons
