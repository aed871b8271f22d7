"""Copy-paste of rare-class regions (seed Q6; Ghiasi et al. 2021, "Simple Copy-Paste").

A bank of object crops is built once from the training set: every connected component of a rare
class (scipy's 8-connected labelling, so two separate poles are two objects, not one "class region")
is cut out to its bounding box together with its binary mask. During training the transform pastes
up to ``max_objects`` banked objects into the raw sample at random positions: image pixels are
replaced exactly where the object's mask is set, the semantic mask there becomes the object's class,
and everything else is left untouched. Instance annotations (if the sample has them) are occluded by
the pasted object and the object is added as a new instance.

The bank is bounded (``max_per_class`` objects per class, reservoir-sampled so every component in
the dataset is equally likely to be kept) and is stored as uint8 tensors, so DataLoader workers
share it copy-on-write. Randomness comes from torch's global RNG, like every other maskworks
transform. Put it *first* in the pipeline, so the pasted object is then scaled, cropped and
flipped with the rest of the scene::

    paste = RareClassCopyPaste.from_dataset(train_set, classes=[5, 9, 10], p=0.5)
    train_set.transform = v2.Compose([paste, build_transforms(train=True, crop_size=(360, 480))])
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torchvision import tv_tensors
from tqdm.auto import tqdm

from maskworks.data.io import masks_to_boxes
from maskworks.data.transforms import InstanceMasks

__all__ = ["BankedObject", "RareClassCopyPaste", "extract_objects"]


@dataclass
class BankedObject:
    """One object cut out to its bounding box: ``image`` uint8 ``(C, h, w)``, ``mask`` bool ``(h, w)``."""

    image: torch.Tensor
    mask: torch.Tensor
    label: int


def extract_objects(
    image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, classes: Iterable[int], min_area: int = 16
) -> list[BankedObject]:
    """Connected components of ``classes`` in one sample, each cropped to its bounding box.

    Args:
        image: ``(C, H, W)`` (tensor) image, any dtype (kept as is).
        mask: ``(H, W)`` class ids.
        classes: the classes to cut out.
        min_area: components with fewer pixels are skipped (annotation specks).
    """
    image = torch.as_tensor(image).as_subclass(torch.Tensor)
    mask_np = np.asarray(torch.as_tensor(mask).as_subclass(torch.Tensor))
    if image.ndim != 3 or tuple(image.shape[-2:]) != mask_np.shape:
        raise ValueError(
            f"expected image (C, H, W) and mask (H, W) of the same size, got {tuple(image.shape)} and {mask_np.shape}"
        )
    objects = []
    eight = np.ones((3, 3), dtype=bool)
    for c in classes:
        components, n = ndimage.label(mask_np == c, structure=eight)
        if n == 0:
            continue
        for k, sl in enumerate(ndimage.find_objects(components), start=1):
            if sl is None:
                continue
            obj = components[sl] == k
            if obj.sum() < min_area:
                continue
            objects.append(BankedObject(image[:, sl[0], sl[1]].clone(), torch.from_numpy(obj.copy()), int(c)))
    return objects


class RareClassCopyPaste:
    """Paste banked rare-class objects into a raw sample (a callable on the raw sample dict).

    Args:
        bank: the objects to paste (see :meth:`from_dataset` and :func:`extract_objects`).
        p: probability of pasting anything into a sample.
        max_objects: up to this many objects per sample (uniform in ``1..max_objects``).
        class_probs: ``{class: probability}`` of drawing each class; uniform over the banked classes by
            default, so the rarest class is pasted as often as the others.
        hflip: probability of mirroring a pasted object.

    Pasted pixels are always labelled with the object's class, also where the sample was ignore (255).
    """

    def __init__(
        self,
        bank: Sequence[BankedObject],
        p: float = 0.5,
        max_objects: int = 3,
        class_probs: dict[int, float] | None = None,
        hflip: float = 0.5,
    ) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p is a probability and must be in [0, 1], got {p}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability and must be in [0, 1], got {hflip}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.p, self.max_objects, self.hflip = float(p), int(max_objects), float(hflip)
        self.by_class: dict[int, list[BankedObject]] = {}
        for obj in bank:
            self.by_class.setdefault(int(obj.label), []).append(obj)
        if not self.by_class and p > 0:
            raise ValueError("the copy-paste bank is empty: none of the classes has an object of min_area pixels")
        classes = sorted(self.by_class)
        if class_probs is None:
            weights = [1.0] * len(classes)
        else:
            missing = set(class_probs) - set(classes)
            if missing:
                raise ValueError(
                    f"class_probs names classes {sorted(missing)} that have no banked object; banked classes: {classes}"
                )
            weights = [float(class_probs.get(c, 0.0)) for c in classes]
            if min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"class_probs must be >= 0 with a positive sum, got {class_probs}")
        self.classes = classes
        self.class_weights = torch.tensor(weights, dtype=torch.float64) if classes else torch.zeros(0)

    @classmethod
    def from_dataset(
        cls,
        dataset,
        classes: Iterable[int],
        max_per_class: int = 256,
        min_area: int = 16,
        seed: int = 0,
        progress: bool = False,
        indices: Sequence[int] | None = None,
        **kwargs,
    ) -> RareClassCopyPaste:
        """Build the bank from a maskworks dataset's raw samples (``dataset.load_raw``), without transforms.

        Args:
            dataset: a :class:`~maskworks.data.SegmentationDataset` (or anything with ``load_raw`` and ``len``).
            classes: the rare classes to bank (e.g. the lowest-frequency classes of :func:`class_weights`).
            max_per_class: bank size per class; components beyond it are reservoir-sampled with ``seed``.
            min_area: skip components with fewer pixels.
            seed: seed of the reservoir sampling.
            progress: show a progress bar over the dataset.
            indices: bank only these samples (e.g. the training part of a split); all by default.
            **kwargs: passed to the constructor (``p``, ``max_objects``, ...).
        """
        if not hasattr(dataset, "load_raw"):
            raise TypeError(f"expected a maskworks dataset with load_raw(), got {type(dataset).__name__}")
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("classes is empty; name the rare classes to bank")
        num_classes = getattr(dataset, "num_classes", None)
        bad = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
        if bad:
            raise ValueError(f"classes {bad} are not in 0..{(num_classes or 0) - 1}")
        if max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
        rng = random.Random(seed)
        reservoirs: dict[int, list[BankedObject]] = {c: [] for c in classes}
        seen = dict.fromkeys(classes, 0)
        order = range(len(dataset)) if indices is None else [int(i) for i in indices]
        for i in tqdm(order, desc="copy-paste bank", disable=not progress):
            raw = dataset.load_raw(i)
            for obj in extract_objects(raw["image"], raw["mask"], classes, min_area):
                seen[obj.label] += 1
                res = reservoirs[obj.label]
                if len(res) < max_per_class:
                    res.append(obj)
                else:
                    j = rng.randrange(seen[obj.label])
                    if j < max_per_class:
                        res[j] = obj
        bank = [obj for c in classes for obj in reservoirs[c]]
        return cls(bank, **kwargs)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_class.values())

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}: {len(v)}" for c, v in sorted(self.by_class.items()))
        return f"{type(self).__name__}(p={self.p}, max_objects={self.max_objects}, bank={{{counts}}})"

    def _draw(self) -> BankedObject:
        c = self.classes[int(torch.multinomial(self.class_weights, 1))]
        objs = self.by_class[c]
        return objs[int(torch.randint(len(objs), ()))]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.p == 0 or float(torch.rand(())) >= self.p:
            return sample
        image, mask = sample["image"], sample["mask"]
        H, W = mask.shape[-2:]
        new_image = image.as_subclass(torch.Tensor).clone()
        new_mask = mask.as_subclass(torch.Tensor).clone()
        inst = sample.get("instances")
        inst_masks = inst["masks"].as_subclass(torch.Tensor).clone() if inst is not None and "masks" in inst else None
        added_masks, added_labels = [], []
        for _ in range(int(torch.randint(1, self.max_objects + 1, ()))):
            obj = self._draw()
            if obj.image.shape[0] != new_image.shape[0]:
                raise ValueError(
                    f"banked object has {obj.image.shape[0]} channels but the sample image has {new_image.shape[0]}"
                )
            oi, om = obj.image, obj.mask
            if self.hflip and float(torch.rand(())) < self.hflip:
                oi, om = oi.flip(-1), om.flip(-1)
            h, w = om.shape
            # An object larger than the image is cropped at a random offset (never an error).
            if h > H or w > W:
                y0 = int(torch.randint(h - H + 1, ())) if h > H else 0
                x0 = int(torch.randint(w - W + 1, ())) if w > W else 0
                oi, om = oi[:, y0 : y0 + min(h, H), x0 : x0 + min(w, W)], om[y0 : y0 + min(h, H), x0 : x0 + min(w, W)]
                h, w = om.shape
            top = int(torch.randint(H - h + 1, ()))
            left = int(torch.randint(W - w + 1, ()))
            region = (slice(top, top + h), slice(left, left + w))
            new_image[:, region[0], region[1]] = torch.where(
                om, oi.to(new_image.dtype), new_image[:, region[0], region[1]]
            )
            new_mask[region] = torch.where(om, torch.as_tensor(obj.label, dtype=new_mask.dtype), new_mask[region])
            if inst_masks is not None:
                full = torch.zeros((H, W), dtype=torch.bool)
                full[region] = om
                inst_masks[:, full] = 0  # the pasted object occludes existing instances
                for prev in added_masks:
                    prev &= ~full
                added_masks.append(full)
                added_labels.append(obj.label)
        out = dict(sample)
        out["image"] = tv_tensors.wrap(new_image, like=image) if isinstance(image, tv_tensors.TVTensor) else new_image
        out["mask"] = tv_tensors.Mask(new_mask) if isinstance(mask, tv_tensors.Mask) else new_mask
        if inst_masks is not None:
            masks = torch.cat([inst_masks, torch.stack(added_masks).to(inst_masks.dtype)])
            labels = torch.cat(
                [
                    torch.as_tensor(inst["labels"]).as_subclass(torch.Tensor).long(),
                    torch.tensor(added_labels, dtype=torch.int64),
                ]
            )
            keep = (masks == 1).flatten(1).any(1)
            masks, labels = masks[keep], labels[keep]
            crowd = {}
            if inst.get("iscrowd") is not None:  # pasted objects are single instances, never crowd regions
                flags = torch.as_tensor(inst["iscrowd"]).as_subclass(torch.Tensor).long()
                crowd["iscrowd"] = torch.cat([flags, torch.zeros(len(added_labels), dtype=torch.int64)])[keep]
            out["instances"] = {
                **inst,
                "masks": InstanceMasks(masks),
                "labels": labels,
                "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks == 1), format="XYXY", canvas_size=(H, W)),
                **crowd,
            }
        return out
