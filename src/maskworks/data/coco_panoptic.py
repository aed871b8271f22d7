"""COCO panoptic segmentation (Kirillov et al., "Panoptic Segmentation", CVPR 2019): images, a JSON file of
``segments_info`` and a folder of RGB id PNGs.

Layouts (see :func:`coco_panoptic_layout`)::

    root/annotations/panoptic_val2017.json     the JSON (images, annotations, categories)
    root/annotations/panoptic_val2017/         one RGB PNG per image: segment id = R + 256 * G + 256**2 * B
    root/val2017/000000000139.jpg              the images (or root/images/val2017/)

or any ``ann_file`` with any ``png_dir`` and ``image_dir``. An annotation is
``{"image_id", "file_name" (its PNG), "segments_info": [{"id", "category_id", "iscrowd", "bbox", "area"}, ...]}``;
a category is ``{"id", "name", "isthing"}``. Id 0 in a PNG is void (unlabelled).

Samples follow the panoptic contract (:mod:`maskworks.tasks.panoptic`)::

    {"image": float32 (3, H, W) (ImageNet mean/std),
     "mask": int64 (H, W) semantic labels 0..K-1, 255 = void (crowd pixels keep their class),
     "instances": one entry per segment, things and stuff: {"boxes": (N, 4) xyxy, "labels": (N,) int64,
                  "masks": (N, H, W) bool, "iscrowd": (N,) int64, "isthing": (N,) bool},
     "meta": {"file", "index", "orig_size", "image_id", "png", "class_names", "isthing", "category_ids"}}

Labels: the category ids, sorted, become the contiguous labels ``0..K-1`` (no background label: void is 255 in the
semantic map); ``category_ids[label]`` gives the COCO id back, ``isthing[label]`` tells things from stuff.

Writing: :func:`write_coco_panoptic` writes id maps and ``segments_info`` in this layout (PNGs, JSON and optionally
the images), so that :class:`CocoPanoptic` reads them back exactly; :func:`rgb_to_id` / :func:`id_to_rgb` convert
between the PNG colours and segment ids; :func:`instances_to_panoptic` turns a sample's per-segment masks into an id
map with ``segments_info``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskworks.data.coco import check_coco_top_level
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

__all__ = [
    "CocoPanoptic",
    "coco_panoptic_layout",
    "rgb_to_id",
    "id_to_rgb",
    "read_id_png",
    "save_id_png",
    "segment_areas_and_boxes",
    "instances_to_panoptic",
    "panoptic_sample",
    "write_coco_panoptic",
    "MAX_SEGMENT_ID",
]

MAX_SEGMENT_ID = 256**3 - 1  # the largest id an RGB PNG holds


# --------------------------------------------------------------------------------------------------- ids <-> PNG
def rgb_to_id(rgb: Any) -> np.ndarray:
    """``(H, W, 3)`` RGB colours -> int64 ``(H, W)`` segment ids ``R + 256 * G + 256**2 * B`` (panopticapi's
    ``rgb2id``)."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"rgb_to_id expects an (H, W, 3) array, got shape {a.shape}")
    a = a.astype(np.int64)
    return a[..., 0] + 256 * a[..., 1] + 65536 * a[..., 2]


def id_to_rgb(ids: Any) -> np.ndarray:
    """int ``(H, W)`` segment ids in ``0..256**3 - 1`` -> uint8 ``(H, W, 3)`` colours (panopticapi's ``id2rgb``).

    Raises:
        ValueError: negative ids or ids that do not fit three bytes.
    """
    a = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if a.dtype.kind not in "iu":
        raise ValueError(f"id_to_rgb expects integer ids, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must be in 0..{MAX_SEGMENT_ID} to fit an RGB PNG, got {a.min()}..{a.max()}")
    return np.stack([a % 256, (a // 256) % 256, a // 65536], axis=-1).astype(np.uint8)


def read_id_png(path: str | Path) -> np.ndarray:
    """The int64 ``(H, W)`` segment ids of a COCO panoptic PNG.

    Raises:
        DatasetError: a missing, unreadable or non-RGB file (the message names it).
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"panoptic PNG {path} does not exist; expected an RGB PNG of segment ids")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in ("RGB", "RGBA", "RGBX"):
                raise DatasetError(
                    f"panoptic PNG {path} has image mode {mode!r}; expected an RGB PNG (segment id = R + 256 G + "
                    "256^2 B)"
                )
            arr = np.asarray(img.convert("RGB"))
    except DatasetError:
        raise
    except Exception as e:  # PIL: UnidentifiedImageError, OSError, truncated files ...
        raise DatasetError(f"cannot read panoptic PNG {path}: {type(e).__name__}: {e}; expected an RGB PNG") from e
    return rgb_to_id(arr)


def save_id_png(ids: Any, path: str | Path) -> Path:
    """Write segment ids as a COCO panoptic RGB PNG (atomically; parent folders are created); returns the path."""
    import io

    from PIL import Image

    from maskworks.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids)).save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def segment_areas_and_boxes(ids: Any, segment_ids: Sequence[int]) -> list[tuple[int, list[int]]]:
    """``(area, [x, y, w, h])`` of each of ``segment_ids`` in an id map (COCO panoptic boxes: integer pixel edges,
    ``w = x_max - x_min + 1``); ``(0, [0, 0, 0, 0])`` for an absent id."""
    a = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    out = []
    for sid in segment_ids:
        m = a == int(sid)
        area = int(m.sum())
        if not area:
            out.append((0, [0, 0, 0, 0]))
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        out.append((area, [x0, y0, x1 - x0 + 1, y1 - y0 + 1]))
    return out


def instances_to_panoptic(
    instances: Mapping[str, Any],
    semantic: Any = None,
    isthing: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """One image's per-segment masks (a panoptic sample's ``instances``, or a :class:`~maskworks.tasks.PanopticTask`
    target) -> ``(id map (H, W) int64, segments_info)``.

    Segment ``i`` (0-based, in the order of ``instances``) gets id ``i + 1``; where masks overlap (they do not in
    panoptic data) the later segment wins. ``segments_info`` lists ``{"id", "category_id" (the label), "iscrowd",
    "isthing"}`` of every segment with at least one pixel in the map. Pixels no segment covers are void (0), except
    where ``semantic`` (the ``(H, W)`` label map) gives a *stuff* class there: those pixels join that class's
    segment (a new one when the image has none), so a semantic map and segments that disagree lose no stuff pixels.

    Args:
        instances: ``masks (N, H, W)``, ``labels (N,)`` and optionally ``iscrowd (N,)``, ``isthing (N,)``.
        semantic: optional ``(H, W)`` labels, 255 = void.
        isthing: per label, for segments without an ``isthing`` entry and for the ``semantic`` fill.
    """
    masks = torch.as_tensor(instances["masks"]).bool().cpu()
    labels = torch.as_tensor(instances["labels"]).reshape(-1).long().cpu().tolist()
    n = len(labels)
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(f"instances: masks {tuple(masks.shape)} for {n} labels; expected (N, H, W)")
    crowd = instances.get("iscrowd")
    crowd = [0] * n if crowd is None else torch.as_tensor(crowd).reshape(-1).long().tolist()
    things = instances.get("isthing")
    if things is not None:
        things = [bool(t) for t in torch.as_tensor(things).reshape(-1).tolist()]
    elif isthing is not None:
        things = [bool(isthing[c]) if 0 <= c < len(isthing) else None for c in labels]
    else:
        things = [None] * n
    h, w = masks.shape[-2:]
    ids = torch.zeros(h, w, dtype=torch.int64)
    for i in range(n):  # later segments win where masks overlap (one (H, W) map, no (N, H, W) temporary)
        ids[masks[i]] = i + 1
    infos = {
        i + 1: {"id": i + 1, "category_id": labels[i], "iscrowd": int(crowd[i]), "isthing": things[i]} for i in range(n)
    }
    if semantic is not None and isthing is not None:
        sem = torch.as_tensor(semantic).long().cpu()
        if tuple(sem.shape) != (h, w):
            raise ValueError(f"semantic map {tuple(sem.shape)} differs from the masks' size {(h, w)}")
        loose = (ids == 0) & (sem != IGNORE_INDEX)
        if bool(loose.any()):
            next_id = n + 1
            for c in torch.unique(sem[loose]).tolist():
                if not (0 <= c < len(isthing)) or isthing[c]:
                    continue  # thing pixels without an instance stay void: their instance is unknown
                where = loose & (sem == c)
                owner = next(
                    (sid for sid, s in infos.items() if s["category_id"] == c and not s["iscrowd"]),
                    None,
                )
                if owner is None:
                    owner = next_id
                    next_id += 1
                    infos[owner] = {"id": owner, "category_id": int(c), "iscrowd": 0, "isthing": False}
                ids[where] = owner
    present = set(torch.unique(ids).tolist())
    segments = [s for sid, s in infos.items() if sid in present]
    for s in segments:
        if s["isthing"] is None:
            del s["isthing"]
    return ids, segments


# --------------------------------------------------------------------------------------------------- layout
def coco_panoptic_layout(root: str | Path, split: str) -> tuple[Path, Path, Path]:
    """``(image_dir, ann_file, png_dir)`` of a split under a COCO-style ``root``.

    Looks for ``root/annotations/panoptic_{split}.json``, then, when ``split`` does not end with a digit,
    ``root/annotations/panoptic_{split}2017.json``; the PNGs of ``panoptic_{name}.json`` are in
    ``root/annotations/panoptic_{name}/`` and the images in ``root/{name}/`` or ``root/images/{name}/``.

    Raises:
        DatasetError: no JSON, no PNG folder or no image folder; the message lists the paths tried.
    """
    root = Path(root).expanduser()
    names = [split] + ([f"{split}2017"] if not split[-1:].isdigit() else [])
    tried = [root / "annotations" / f"panoptic_{name}.json" for name in names]
    for name, ann in zip(names, tried):
        if not ann.is_file():
            continue
        png_dir = ann.with_suffix("")
        if not png_dir.is_dir():
            raise DatasetError(
                f"COCO panoptic split {split!r}: found {ann} but no PNG folder {png_dir}; expected the id PNGs of "
                f"{ann.name} there (or pass png_dir=)"
            )
        folders = [root / name, root / "images" / name]
        for folder in folders:
            if folder.is_dir():
                return folder, ann, png_dir
        raise DatasetError(
            f"COCO panoptic split {split!r}: found {ann} but no image folder "
            f"{' or '.join(str(f) for f in folders)}; expected the images of {ann.name} in one of them (or pass "
            "image_dir=)"
        )
    raise DatasetError(
        f"COCO panoptic split {split!r}: no annotation file {' or '.join(str(t) for t in tried)}; expected the COCO "
        "panoptic layout root/annotations/panoptic_<split>.json + root/annotations/panoptic_<split>/ + root/<split>/ "
        "(e.g. panoptic_val2017.json), or pass ann_file= (and png_dir=, image_dir=)"
    )


def _resolve(path: str | Path, root: Path) -> Path:
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return root / path


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# --------------------------------------------------------------------------------------------------- dataset
def panoptic_sample(
    sample: dict[str, Any],
    isthing: Sequence[bool],
    class_names: Sequence[str],
    category_ids: Sequence[int],
) -> dict[str, Any]:
    """Complete a finalised panoptic sample (in place, and return it): ``instances["isthing"]`` from the labels
    (so it stays aligned with whatever a transform dropped), ``iscrowd`` zeros when absent, and the class space in
    ``meta``."""
    inst = sample.get("instances")
    if inst is not None:
        labels = inst["labels"]
        table = torch.as_tensor(list(isthing), dtype=torch.bool)
        inst["isthing"] = table[labels] if len(labels) else torch.zeros(0, dtype=torch.bool)
        if "iscrowd" not in inst:
            inst["iscrowd"] = torch.zeros(len(labels), dtype=torch.int64)
    sample["meta"].update(
        {"class_names": list(class_names), "isthing": [bool(t) for t in isthing], "category_ids": list(category_ids)}
    )
    return sample


class CocoPanoptic(SegmentationDataset):
    """COCO panoptic segmentation: images + a panoptic JSON + id PNGs (see the module docstring).

    Every keyword argument below can be given on the command line as ``--set data.<name>=<value>``.

    Args:
        root: dataset folder holding ``annotations/`` and the image folders (see :func:`coco_panoptic_layout`); with
            ``ann_file`` given and no ``image_dir``, the image folder itself.
        split: split name (``"train"``, ``"val"``, ``"val2017"``, any ``panoptic_<split>.json``) used when no
            ``ann_file`` is given; ``"train"`` and ``"val"`` find the COCO 2017 files.
        transform: callable on the raw sample (see :mod:`maskworks.data.transforms`).
        ann_file: a COCO panoptic JSON, absolute, relative to the current directory or to ``root``.
        png_dir: folder of the id PNGs (default: the JSON's path without ``.json``, the COCO convention).
        image_dir: folder that the images' ``file_name`` are relative to (default: the split's image folder, or
            ``root`` with ``ann_file``).

    Attributes:
        num_classes: K (no background class: void is 255).
        class_names, isthing, category_ids: per label ``0..K-1``: the category name, whether it is a thing, and its
            COCO category id.
        thing_classes: the labels of the thing categories.

    Images of the JSON without a panoptic annotation are left out. Raises :class:`DatasetError` on malformed JSON
    (missing keys, duplicate ids, unknown images or categories, bad ``segments_info``), missing image or PNG files,
    and, when a sample is read, a PNG holding an id that its ``segments_info`` does not list or a PNG / image whose
    size differs from the JSON's.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    in_channels = 3

    def __init__(
        self,
        root: str | Path = "../shared/data/coco",
        split: str | None = "train",
        transform: Callable[[dict], dict] | None = None,
        ann_file: str | Path | None = None,
        png_dir: str | Path | None = None,
        image_dir: str | Path | None = None,
    ) -> None:
        super().__init__(transform)
        self.root, self.split = Path(root).expanduser(), split
        if ann_file is not None:
            ann = _resolve(ann_file, self.root)
            images = _resolve(image_dir, self.root) if image_dir is not None else self.root
            pngs = _resolve(png_dir, self.root) if png_dir is not None else ann.with_suffix("")
        else:
            if not split:
                raise DatasetError(f"CocoPanoptic({self.root}): give a split or an ann_file")
            images, ann, pngs = coco_panoptic_layout(self.root, split)
            if image_dir is not None:
                images = _resolve(image_dir, self.root)
            if png_dir is not None:
                pngs = _resolve(png_dir, self.root)
        if not ann.is_file():
            raise DatasetError(f"COCO panoptic annotation file {ann} does not exist; expected a panoptic JSON file")
        if not images.is_dir():
            raise DatasetError(f"COCO panoptic image folder {images} does not exist; expected the images of {ann}")
        if not pngs.is_dir():
            raise DatasetError(f"COCO panoptic PNG folder {pngs} does not exist; expected the id PNGs of {ann}")
        self.ann_file, self.image_dir, self.png_dir = ann, images, pngs
        self._index(self._load(ann))

    # ----------------------------------------------------------------------------------------- indexing
    @staticmethod
    def _load(path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except OSError as e:
            raise DatasetError(f"cannot read COCO panoptic annotation file {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"COCO panoptic annotation file {path} is not valid JSON: {e.msg} at line {e.lineno} column "
                f"{e.colno}; expected a JSON object with 'images', 'annotations' and 'categories'"
            ) from e
        except UnicodeDecodeError as e:
            raise DatasetError(f"COCO panoptic annotation file {path} is not UTF-8 text ({e})") from e

    def _error(self, what: str, expected: str) -> DatasetError:
        return DatasetError(f"COCO panoptic annotation file {self.ann_file}: {what}; expected {expected}")

    def _index(self, data: Any) -> None:
        check_coco_top_level(data, self._error, "a COCO panoptic file")

        cats: dict[int, dict] = {}
        for i, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise self._error(f"categories[{i}] = {str(cat)[:80]} has no integer 'id'", "{'id', 'name', 'isthing'}")
            if cat["id"] in cats:
                raise self._error(f"category id {cat['id']} appears twice", "unique category ids")
            if cat.get("isthing") not in (0, 1, True, False):
                raise self._error(
                    f"category {cat['id']} has isthing={cat.get('isthing')!r}", "'isthing': 0 or 1 for every category"
                )
            cats[int(cat["id"])] = cat
        if not cats:
            raise self._error("'categories' is empty", "at least one category")

        images: dict[int, dict] = {}
        for i, img in enumerate(data["images"]):
            ok = (
                isinstance(img, dict)
                and _is_int(img.get("id"))
                and isinstance(img.get("file_name"), str)
                and _is_int(img.get("height"))
                and _is_int(img.get("width"))
                and img["height"] > 0
                and img["width"] > 0
            )
            if not ok:
                raise self._error(
                    f"images[{i}] = {str(img)[:100]} lacks an integer 'id', a 'file_name' or positive integer "
                    "'height'/'width'",
                    "{'id': int, 'file_name': str, 'height': int > 0, 'width': int > 0}",
                )
            if img["id"] in images:
                raise self._error(f"image id {img['id']} appears twice", "unique image ids")
            images[int(img["id"])] = img

        anns: dict[int, dict] = {}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise self._error(f"annotations[{i}] is a {type(ann).__name__}", "an object")
            desc = f"annotations[{i}] (image_id {ann.get('image_id')!r})"
            if ann.get("image_id") not in images:
                raise self._error(f"{desc} refers to an unknown image_id", "an id listed in 'images'")
            if ann["image_id"] in anns:
                raise self._error(f"image_id {ann['image_id']} has two annotations", "one annotation per image")
            if not isinstance(ann.get("file_name"), str):
                raise self._error(f"{desc} has no 'file_name'", "the file name of its PNG")
            segs = ann.get("segments_info")
            if not isinstance(segs, list):
                raise self._error(f"{desc} has no 'segments_info' list", "a list of segments")
            seen: set[int] = set()
            for j, s in enumerate(segs):
                where = f"{desc} segments_info[{j}]"
                if not isinstance(s, dict) or not _is_int(s.get("id")) or not 0 < s["id"] <= MAX_SEGMENT_ID:
                    raise self._error(
                        f"{where} = {str(s)[:80]} has no positive integer 'id'", f"ids in 1..{MAX_SEGMENT_ID}"
                    )
                if s["id"] in seen:
                    raise self._error(f"{where}: segment id {s['id']} appears twice", "unique ids within an image")
                seen.add(s["id"])
                if s.get("category_id") not in cats:
                    raise self._error(
                        f"{where} has unknown category_id {s.get('category_id')!r}",
                        f"one of the category ids {sorted(cats)[:20]}",
                    )
                if s.get("iscrowd", 0) not in (0, 1, True, False):
                    raise self._error(f"{where} has iscrowd={s.get('iscrowd')!r}", "0 or 1")
            anns[int(ann["image_id"])] = ann

        ids = sorted(anns)
        for kind, folder, key, lookup in (
            ("image", self.image_dir, "file_name", images),
            ("panoptic PNG", self.png_dir, "file_name", anns),
        ):
            missing_files = [folder / lookup[k][key] for k in ids]
            missing_files = [p for p in missing_files if not p.is_file()]
            if missing_files:
                more = f" and {len(missing_files) - 1} more" if len(missing_files) > 1 else ""
                raise DatasetError(
                    f"{kind} file {missing_files[0]} does not exist{more} (listed in {self.ann_file}); expected the "
                    f"{kind}s' file_name relative to {folder}"
                )
        self.category_ids: list[int] = sorted(cats)
        self.category_to_label = {c: i for i, c in enumerate(self.category_ids)}
        self.class_names = [str(cats[c].get("name", f"category_{c}")) for c in self.category_ids]
        self.isthing = [bool(cats[c]["isthing"]) for c in self.category_ids]
        self.thing_classes = [i for i, t in enumerate(self.isthing) if t]
        self.num_classes = len(self.class_names)
        self.palette = default_palette(self.num_classes)
        self.image_ids: list[int] = ids
        self._images, self._anns = images, anns
        self._dataset = data

    # ----------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict:
        """The JSON ``images`` entry of sample ``index``."""
        return self._images[self.image_ids[index]]

    def annotation(self, index: int) -> dict:
        """The JSON panoptic annotation (``file_name``, ``segments_info``) of sample ``index``."""
        return self._anns[self.image_ids[index]]

    @property
    def categories(self) -> list[dict]:
        """The JSON ``categories`` in label order (``id``, ``name``, ``isthing``...)."""
        by_id = {c["id"]: c for c in self._dataset["categories"]}
        return [dict(by_id[c]) for c in self.category_ids]

    def load_raw(self, index: int) -> dict[str, Any]:
        info, ann = self.image_info(index), self.annotation(index)
        path, png = self.image_dir / info["file_name"], self.png_dir / ann["file_name"]
        h, w = info["height"], info["width"]
        image = read_image(path, channels=3)
        if image.shape[:2] != (h, w):
            raise DatasetError(
                f"image {path} is {image.shape[0]}x{image.shape[1]} (HxW) but {self.ann_file} says {h}x{w} "
                f"(image_id {info['id']}); expected the same size"
            )
        ids = read_id_png(png)
        if ids.shape != (h, w):
            raise DatasetError(
                f"panoptic PNG {png} is {ids.shape[0]}x{ids.shape[1]} (HxW) but its image {path} is {h}x{w}; "
                "expected the same size"
            )
        segs = ann["segments_info"]
        label_of = {int(s["id"]): self.category_to_label[s["category_id"]] for s in segs}
        uniq, inv = np.unique(ids, return_inverse=True)
        unknown = [int(u) for u in uniq if u != 0 and int(u) not in label_of]
        if unknown:
            more = f" ... ({len(unknown)} in all)" if len(unknown) > 10 else ""
            raise DatasetError(
                f"panoptic PNG {png} holds segment id(s) {unknown[:10]}{more} that segments_info of image_id "
                f"{info['id']} in {self.ann_file} does not list; expected every non-zero id of the PNG listed "
                "(0 = void)"
            )
        semantic = np.array([IGNORE_INDEX if u == 0 else label_of[int(u)] for u in uniq], dtype=np.int64)[
            inv.reshape(h, w)
        ]
        seg_ids = np.array([int(s["id"]) for s in segs], dtype=np.int64)
        masks = ids[None] == seg_ids[:, None, None]
        labels = np.array([label_of[int(s)] for s in seg_ids], dtype=np.int64)
        iscrowd = np.array([int(s.get("iscrowd", 0)) for s in segs], dtype=np.int64)
        instances = {"labels": labels, "masks": masks, "iscrowd": iscrowd}
        return {**raw_sample(image, semantic, instances), "file": str(path)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        i = sample["meta"]["index"]
        sample["meta"]["image_id"] = self.image_ids[i]
        sample["meta"]["png"] = str(self.png_dir / self.annotation(i)["file_name"])
        return panoptic_sample(sample, self.isthing, self.class_names, self.category_ids)

    def __repr__(self) -> str:
        return (
            f"CocoPanoptic({self.ann_file}, {len(self)} images, {len(self.thing_classes)} thing + "
            f"{self.num_classes - len(self.thing_classes)} stuff categories)"
        )


# --------------------------------------------------------------------------------------------------- writer
def write_coco_panoptic(
    out_dir: str | Path,
    items: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    split: str = "val2017",
) -> Path:
    """Write id maps and their segments in the COCO panoptic layout under ``out_dir``; returns the JSON's path.

    Writes ``out_dir/annotations/panoptic_{split}.json``, one RGB id PNG per item in
    ``out_dir/annotations/panoptic_{split}/`` and, for items with an ``image``, the image in ``out_dir/{split}/``,
    so that ``CocoPanoptic(out_dir, split=split)`` reads exactly these maps and segments back. Segment ``area`` and
    ``bbox`` are computed from the maps.

    Args:
        out_dir: the dataset folder (created).
        items: per image: ``file_name`` (the image's file name; its PNG is the same name with ``.png``),
            ``panoptic_seg`` (``(H, W)`` int ids, 0 = void), ``segments_info`` (dicts with ``id`` and ``category_id``,
            a COCO category id of ``categories``, and optionally ``iscrowd``), and optionally ``image_id`` (default:
            the item's position), ``image`` (uint8 ``(H, W, 3)``, saved by its file extension: use ``.png`` for a
            lossless copy).
        categories: ``{"id", "name", "isthing"}`` dicts (other keys, e.g. ``supercategory``, are kept).
        split: the split name in the file names.

    Raises:
        ValueError: an id in a map that its ``segments_info`` does not list, a listed segment absent from its map,
            duplicate ids, an unknown category, or an image of another size than its map.
    """
    from PIL import Image

    from maskworks.checkpoint import atomic_write_bytes

    out_dir = Path(out_dir)
    png_dir = out_dir / "annotations" / f"panoptic_{split}"
    image_dir = out_dir / split
    known = {int(c["id"]) for c in categories}
    images, annotations = [], []
    for k, item in enumerate(items):
        ids = item["panoptic_seg"]
        ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"item {k}: panoptic_seg must be (H, W), got shape {ids.shape}")
        h, w = ids.shape
        image_id = int(item.get("image_id", k))
        file_name = str(item["file_name"])
        segs = list(item["segments_info"])
        listed = [int(s["id"]) for s in segs]
        if len(set(listed)) != len(listed):
            raise ValueError(f"item {k} ({file_name}): duplicate segment ids in segments_info {listed}")
        bad = [s["category_id"] for s in segs if int(s["category_id"]) not in known]
        if bad:
            raise ValueError(f"item {k} ({file_name}): category ids {bad} are not in categories {sorted(known)}")
        present = {int(v) for v in np.unique(ids)} - {0}
        unlisted = sorted(present - set(listed))
        if unlisted:
            raise ValueError(f"item {k} ({file_name}): ids {unlisted[:10]} of the map are not in its segments_info")
        absent = sorted(set(listed) - present)
        if absent:
            raise ValueError(f"item {k} ({file_name}): segments {absent[:10]} are listed but have no pixel")
        png_name = str(Path(file_name).with_suffix(".png"))
        save_id_png(ids, png_dir / png_name)
        stats = segment_areas_and_boxes(ids, listed)
        annotations.append(
            {
                "image_id": image_id,
                "file_name": png_name,
                "segments_info": [
                    {
                        "id": int(s["id"]),
                        "category_id": int(s["category_id"]),
                        "iscrowd": int(s.get("iscrowd", 0)),
                        "area": area,
                        "bbox": bbox,
                    }
                    for s, (area, bbox) in zip(segs, stats)
                ],
            }
        )
        images.append({"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)})
        if item.get("image") is not None:
            img = np.asarray(item["image"])
            if img.shape[:2] != (h, w):
                raise ValueError(f"item {k} ({file_name}): image {img.shape[:2]} but panoptic_seg {(h, w)}")
            target = image_dir / file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.astype(np.uint8).squeeze()).save(target)
    cats = [{**dict(c), "id": int(c["id"]), "isthing": int(bool(c["isthing"]))} for c in categories]
    path = out_dir / "annotations" / f"panoptic_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "annotations": annotations, "categories": cats}
    atomic_write_bytes(path, json.dumps(payload).encode())
    png_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    return path
