"""SyntheticShapes(panoptic=True): the class space, segments that partition the image, one segment per stuff
class, several instances per thing class, determinism, transforms, and the default mode left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskworks.data import DatasetError, SyntheticShapes, build_transforms
from maskworks.data.synthetic import SHAPES, STUFF
from maskworks.tasks import PanopticTask


def _equal(a: dict, b: dict) -> bool:
    same = torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    return same and all(torch.equal(a["instances"][k], b["instances"][k]) for k in a["instances"])


def test_class_space():
    ds = SyntheticShapes(num_samples=2, image_size=32, panoptic=True)
    assert ds.class_names == [*STUFF, "circle", "rectangle", "triangle"] and ds.num_classes == 6
    assert ds.isthing == [False, False, False, True, True, True] and ds.thing_classes == [3, 4, 5]
    assert ds.category_ids == list(range(6)) and len(ds.palette) == 6
    small = SyntheticShapes(num_samples=2, image_size=32, panoptic=True, num_stuff=2, num_classes=6)
    assert small.class_names == ["stripes", "checks", *SHAPES] and small.thing_classes == [2, 3, 4, 5, 6]
    plain = SyntheticShapes(num_samples=2, image_size=32)  # the default mode has no panoptic attributes
    assert plain.class_names == ["background", "circle", "rectangle", "triangle"] and plain.num_classes == 4
    assert not hasattr(plain, "isthing") and not hasattr(plain, "category_ids")
    assert "isthing" not in plain[0]["instances"] and set(plain[0]["meta"]) == {"file", "index", "orig_size"}


def test_samples_follow_the_panoptic_contract():
    ds = SyntheticShapes(num_samples=12, image_size=(40, 48), panoptic=True, max_shapes=6)
    per_class_counts = []
    for i in range(len(ds)):
        s = ds[i]
        inst, mask = s["instances"], s["mask"]
        n = len(inst["labels"])
        assert inst["masks"].shape == (n, 40, 48) and inst["masks"].dtype == torch.bool
        assert (inst["masks"].sum(0) == 1).all()  # segments partition the image: no void, no overlap
        assert inst["iscrowd"].tolist() == [0] * n and inst["iscrowd"].dtype == torch.int64
        assert inst["isthing"].tolist() == [ds.isthing[c] for c in inst["labels"].tolist()]
        for j in range(n):  # the semantic mask agrees with the segments; boxes are tight
            assert (mask[inst["masks"][j]] == inst["labels"][j]).all()
            ys, xs = torch.nonzero(inst["masks"][j], as_tuple=True)
            assert inst["boxes"][j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        stuff = inst["labels"][~inst["isthing"]].tolist()
        assert len(stuff) == len(set(stuff)) and all(c < 3 for c in stuff)  # at most one segment per stuff class
        assert inst["isthing"].any()
        per_class_counts.append(np.bincount(inst["labels"][inst["isthing"]].numpy(), minlength=6).max())
        meta = s["meta"]
        assert meta["class_names"] == ds.class_names and meta["isthing"] == ds.isthing
        assert meta["category_ids"] == ds.category_ids
    assert max(per_class_counts) >= 2  # several instances of one thing class in a scene


def test_stuff_regions_and_textures_vary():
    ds = SyntheticShapes(num_samples=24, image_size=48, panoptic=True)
    seen = set()
    numbers = []
    for i in range(len(ds)):
        labels = ds[i]["instances"]["labels"]
        stuff = [c for c in labels.tolist() if c < 3]
        seen.update(stuff)
        numbers.append(len(stuff))
    assert seen == {0, 1, 2} and min(numbers) >= 1 and max(numbers) == 3 and min(numbers) < 3


def test_deterministic_per_index_in_any_order_and_with_the_cache():
    a = SyntheticShapes(num_samples=5, image_size=32, panoptic=True, seed=2)
    b = SyntheticShapes(num_samples=5, image_size=32, panoptic=True, seed=2, cache=True)
    forward = [a[i] for i in range(5)]
    assert all(_equal(f, b[i]) for i, f in reversed(list(enumerate(forward))))
    assert all(_equal(f, b[i]) for i, f in enumerate(forward))  # from the cache
    assert not torch.equal(a[0]["image"], a[1]["image"])
    other = SyntheticShapes(num_samples=5, image_size=32, panoptic=True, seed=2, split="val")
    assert not torch.equal(a[0]["image"], other[0]["image"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_stuff": 0}, "num_stuff must be in 1..3"),
        ({"num_stuff": 4}, "num_stuff must be in 1..3"),
        ({"return_instances": False}, "needs return_instances=True"),
    ],  # fmt: skip
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(DatasetError, match=message):
        SyntheticShapes(num_samples=2, panoptic=True, **kwargs)


def test_training_transforms_keep_segments_aligned_and_collate():
    tf = build_transforms(train=True, crop_size=24, scale_range=(0.75, 1.5), hflip=0.5)
    ds = SyntheticShapes(num_samples=6, image_size=32, panoptic=True, transform=tf)
    torch.manual_seed(0)
    samples = [ds[i] for i in range(6)]
    for s in samples:
        inst = s["instances"]
        assert inst["isthing"].tolist() == [ds.isthing[c] for c in inst["labels"].tolist()]
        assert len(inst["iscrowd"]) == len(inst["labels"]) and inst["masks"].flatten(1).any(1).all()
        assert ((s["mask"] == 255) == ~inst["masks"].any(0)).all()  # padding: void in both
    batch = PanopticTask(ds.class_names, ds.isthing).collate(samples)
    assert len(batch["images"]) == 6 and all(t["semantic"].shape == (24, 24) for t in batch["targets"])
