"""SyntheticShapes: determinism, consistency of semantic and instance labels, formats, DataLoader use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maskworks.data import SyntheticShapes, build_transforms, collate_samples


def _equal(a: dict, b: dict) -> bool:
    same = torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    return same and all(torch.equal(a["instances"][k], b["instances"][k]) for k in ("boxes", "labels", "masks"))


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_sample_format_and_value_ranges():
    ds = SyntheticShapes(num_samples=8, image_size=(64, 80), num_classes=6)
    assert (ds.num_classes, ds.in_channels, ds.ignore_index) == (6, 3, 255)
    assert len(ds.class_names) == len(ds.palette) == 6 and len(ds.mean) == len(ds.std) == 3
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 64, 80) and s["image"].dtype == torch.float32
        assert s["mask"].shape == (64, 80) and s["mask"].dtype == torch.int64
        assert torch.isfinite(s["image"]).all()
        assert 0 <= s["mask"].min() and s["mask"].max() < 6
        inst = s["instances"]
        n = len(inst["labels"])
        assert n >= 1 and inst["boxes"].shape == (n, 4) and inst["masks"].shape == (n, 64, 80)
        assert inst["boxes"].dtype == torch.float32 and inst["labels"].dtype == torch.int64
        assert inst["masks"].dtype == torch.bool
        assert s["meta"] == {"file": None, "index": i, "orig_size": (64, 80)}


def test_same_seed_identical_and_index_seed_split_change_the_scene():
    a, b = SyntheticShapes(num_samples=4, seed=3), SyntheticShapes(num_samples=4, seed=3)
    assert all(_equal(a[i], b[i]) for i in range(4))
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], SyntheticShapes(num_samples=4, seed=4)[0]["image"])
    assert not torch.equal(a[0]["image"], SyntheticShapes(num_samples=4, seed=3, split="val")[0]["image"])


def test_random_access_in_any_order_gives_the_same_samples():
    ds = SyntheticShapes(num_samples=6, image_size=48)
    forward = [ds[i] for i in range(6)]
    backward = [ds[i] for i in reversed(range(6))][::-1]
    assert all(_equal(f, b) for f, b in zip(forward, backward))
    assert _equal(ds[-1], forward[5])
    with pytest.raises(IndexError):
        ds[6]


def test_instances_agree_with_semantic_mask_and_boxes_are_tight():
    ds = SyntheticShapes(num_samples=24, image_size=64, num_classes=6, max_shapes=6)
    for i in range(len(ds)):
        s = ds[i]
        mask, inst = s["mask"], s["instances"]
        assert (inst["masks"].sum(0) <= 1).all(), "instances overlap after occlusion"
        for c in range(1, ds.num_classes):
            union = inst["masks"][inst["labels"] == c].any(0)
            assert torch.equal(union, mask == c)
        for m, box in zip(inst["masks"], inst["boxes"]):
            assert m.any()
            assert box.tolist() == _tight_box(m)


def test_every_shape_keeps_half_its_area_and_backgrounds_vary():
    ds = SyntheticShapes(num_samples=32, image_size=96, num_classes=6, max_shapes=5)
    counts = torch.zeros(6)
    for i in range(len(ds)):
        mask = ds[i]["mask"]
        counts += torch.bincount(mask.flatten(), minlength=6)
        areas = ds[i]["instances"]["masks"].flatten(1).sum(1)
        assert (areas >= 0.5 * torch.pi * 0.25 * (0.11 * 96) ** 2).all()
    assert (counts > 0).all(), f"a class never appears: {counts}"


def test_normalisation_constants_fit_the_data():
    ds = SyntheticShapes(num_samples=64, image_size=64)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.mean().abs() < 0.15
    assert (images.std() - 1).abs() < 0.15


def test_dataloader_with_collate_and_workers_matches_direct_access():
    ds = SyntheticShapes(num_samples=8, image_size=32, transform=build_transforms(train=False))
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_samples, num_workers=2))
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["mask"].shape == (4, 32, 32)
    assert isinstance(batches[0]["instances"], list) and len(batches[0]["meta"]) == 4
    assert torch.equal(batches[1]["image"][2], ds[6]["image"])
    assert [m["index"] for m in batches[1]["meta"]] == [4, 5, 6, 7]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 7},
        {"num_classes": 1},
        {"split": "holdout"},
        {"image_size": (4, 4)},
        {"min_shapes": 3, "max_shapes": 2},
    ],
)
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SyntheticShapes(**kwargs)


def _touching_pairs(ds: SyntheticShapes) -> int:
    """Pairs of instances that touch (one pixel apart at most), over the whole dataset."""
    count = 0
    for i in range(len(ds)):
        _, id_map, labels = ds.generate(i)
        n = len(labels)
        assert set(np.unique(id_map)) <= set(range(n + 1))
        masks = torch.from_numpy(id_map[None] == np.arange(1, n + 1)[:, None, None]).float()
        grown = F.max_pool2d(masks[:, None], 3, stride=1, padding=1)[:, 0] > 0
        count += sum(bool((grown[a] & (masks[b] > 0)).any()) for a in range(n) for b in range(a + 1, n))
    return count


def test_dense_scenes_touch_and_occlude():
    kw = {"num_samples": 12, "image_size": 96, "max_shapes": 10, "min_shapes": 8, "radius_range": (0.07, 0.12)}
    dense, sparse = SyntheticShapes(dense=True, **kw), SyntheticShapes(**kw)
    assert _touching_pairs(dense) > 3 * max(_touching_pairs(sparse), 1)  # measured: 113 vs 31
    assert dense[0]["instances"]["masks"].shape[0] == len(dense.generate(0)[2])
