"""Joint transforms: image/mask/instance alignment, fill values, determinism, photometric-only invariance."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from maskworks.data import (
    GaussianNoise,
    RandomCrop,
    RandomScale,
    SegmentationDataset,
    SyntheticShapes,
    build_transforms,
    collate_samples,
    normalize_image,
)
from maskworks.data.io import finalize_instances, raw_sample

HEAVY = {"crop_size": (40, 48), "scale_range": (0.5, 2.0), "hflip": 0.5, "vflip": 0.5, "rotate": 40.0, "elastic": 1.0}


def _blobs(h: int = 48, w: int = 56, k: int = 5, seed: int = 0) -> torch.Tensor:
    """A label map of k classes made of smooth blobs (so nearest resampling keeps regions)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(k, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear")[0].argmax(0)


def _encoded_sample(seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Raw sample whose image encodes the mask: channel 0 = 40 * label + 20 (fill 0 never collides)."""
    mask = _blobs(seed=seed)
    image = torch.stack([40 * mask + 20, torch.randint(0, 256, mask.shape), torch.full_like(mask, 99)])
    sample = raw_sample(image.permute(1, 2, 0).numpy().astype("uint8"), mask.numpy())
    return sample, mask


@pytest.mark.parametrize("seed", range(8))
def test_geometric_pipeline_keeps_image_and_mask_aligned(seed):
    torch.manual_seed(seed)
    sample, mask = _encoded_sample(seed)
    out = build_transforms(train=True, interpolation=InterpolationMode.NEAREST, **HEAVY)(sample)
    image, label = out["image"][0].long(), out["mask"]
    assert label.shape == (40, 48) and out["image"].shape == (3, 40, 48)
    valid = label != 255
    assert valid.float().mean() > 0.1
    assert torch.equal(image[valid], 40 * label[valid] + 20)
    assert (image[~valid] == 0).all(), "ignore-filled mask areas should be filled areas of the image"
    assert set(label.unique().tolist()) <= set(mask.unique().tolist()) | {255}


@pytest.mark.parametrize("seed", range(4))
def test_bilinear_image_never_interpolates_labels(seed):
    torch.manual_seed(seed)
    sample, mask = _encoded_sample(seed)
    out = build_transforms(train=True, color_jitter=0.4, noise=0.05, blur=0.5, **HEAVY)(sample)
    assert out["mask"].dtype == torch.int64 and out["image"].dtype == torch.uint8
    assert set(out["mask"].unique().tolist()) <= set(mask.unique().tolist()) | {255}


def test_photometric_only_leaves_mask_bit_identical():
    torch.manual_seed(0)
    sample, mask = _encoded_sample()
    before = sample["image"].clone()
    out = build_transforms(train=True, scale_range=None, hflip=0.0, color_jitter=0.5, noise=0.05, blur=1.0)(sample)
    assert torch.equal(out["mask"], mask)
    assert not torch.equal(out["image"], before)


def test_same_torch_seed_same_output_and_no_reseeding():
    tf = build_transforms(train=True, color_jitter=0.3, noise=0.02, **HEAVY)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(tf(_encoded_sample()[0]))
        outputs.append(torch.rand(1))  # the global stream continues past the transform
    assert torch.equal(outputs[0]["image"], outputs[2]["image"]) and torch.equal(outputs[0]["mask"], outputs[2]["mask"])
    assert torch.equal(outputs[1], outputs[3])
    torch.manual_seed(8)
    assert not torch.equal(tf(_encoded_sample()[0])["mask"], outputs[0]["mask"])


class _Repeat(SegmentationDataset):
    """The same raw sample at every index: any difference between items comes from the transform."""

    num_classes, class_names, palette, in_channels = 5, list("abcde"), [(0, 0, 0)] * 5, 3
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __len__(self) -> int:
        return 4

    def load_raw(self, index: int) -> dict:
        return {**_encoded_sample()[0], "file": "same.png"}


def test_dataloader_workers_get_different_streams_and_seeded_epochs_repeat():
    ds = _Repeat(build_transforms(train=True, **HEAVY))

    def epoch(seed: int) -> list[torch.Tensor]:
        loader = DataLoader(
            ds, batch_size=1, num_workers=2, collate_fn=collate_samples, generator=torch.Generator().manual_seed(seed)
        )
        return [b["mask"][0] for b in loader]

    first, again = epoch(0), epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1]), "two workers produced the same augmentation"


def test_dataset_output_dtypes_shapes_and_normalisation():
    ds = _Repeat(build_transforms(train=True, crop_size=32))
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (32, 32) and s["mask"].dtype == torch.int64
    raw = _encoded_sample()[0]["image"]
    torch.testing.assert_close(
        normalize_image(raw, ds.mean, ds.std), normalize_image(raw.float() / 255, ds.mean, ds.std)
    )
    with pytest.raises(ValueError, match="channels"):
        normalize_image(raw, (0.5,), (0.2,))


@pytest.mark.parametrize("seed", range(4))
def test_instances_move_with_image_and_stay_consistent(seed):
    torch.manual_seed(seed)
    ds = SyntheticShapes(
        num_samples=4,
        image_size=64,
        num_classes=6,
        max_shapes=6,
        transform=build_transforms(train=True, **{**HEAVY, "crop_size": 48}),
    )
    s = ds[seed]
    inst = s["instances"]
    for c in range(1, 6):
        assert torch.equal(inst["masks"][inst["labels"] == c].any(0), s["mask"] == c)
    assert inst["masks"].flatten(1).any(1).all(), "vanished instances must be dropped"
    for m, box in zip(inst["masks"], inst["boxes"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_flip_moves_boxes_and_crop_drops_vanished_instances():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 2:6, 1:5] = True  # top-left corner
    masks[1, 12:20, 10:22] = True  # centre
    mask = masks[0].long() * 1 + masks[1].long() * 2
    image = torch.zeros(32, 32, 3, dtype=torch.uint8)
    sample = raw_sample(image.numpy(), mask.numpy(), {"labels": [1, 2], "masks": masks.numpy()})
    assert sample["instances"]["boxes"].tolist() == [[1, 2, 5, 6], [10, 12, 22, 20]]
    flipped = v2.RandomHorizontalFlip(p=1.0)(sample)
    assert flipped["instances"]["boxes"].tolist() == [[27, 2, 31, 6], [10, 12, 22, 20]]
    assert finalize_instances(flipped["instances"])["boxes"].tolist() == [[27, 2, 31, 6], [10, 12, 22, 20]]
    cropped = finalize_instances(v2.CenterCrop(16)(sample)["instances"])
    assert cropped["labels"].tolist() == [2] and cropped["masks"].shape == (1, 16, 16)
    assert cropped["boxes"].tolist() == [[2, 4, 14, 12]]


def test_crop_pads_small_samples_with_zero_and_ignore():
    torch.manual_seed(0)
    sample, _ = _encoded_sample()
    out = RandomCrop((64, 80))(sample)
    assert out["image"].shape == (3, 64, 80) and out["mask"].shape == (64, 80)
    assert (out["mask"] == 255).sum() == 64 * 80 - 48 * 56
    assert (out["image"][:, out["mask"] == 255] == 0).all()


def test_random_scale_keep_size_zooms_in_and_out():
    sample, _ = _encoded_sample()
    for seed in range(6):
        torch.manual_seed(seed)
        out = RandomScale((0.5, 2.0), keep_size=True)(sample)
        assert out["image"].shape == (3, 48, 56) and out["mask"].shape == (48, 56)
    torch.manual_seed(0)
    zoom_out = RandomScale((0.5, 0.5), keep_size=True)(sample)
    assert (zoom_out["mask"] == 255).sum() == 48 * 56 - 24 * 28
    assert RandomScale((2.0, 2.0))(sample)["mask"].shape == (96, 112)


def test_grayscale_pipeline_and_noise_keep_dtypes():
    torch.manual_seed(0)
    mask = _blobs()
    sample = raw_sample((mask * 50).numpy().astype("uint8")[..., None], mask.numpy())
    out = build_transforms(train=True, color_jitter=0.4, noise=0.1, blur=1.0, **HEAVY)(sample)
    assert out["image"].shape == (1, 40, 48) and out["image"].dtype == torch.uint8
    noisy = GaussianNoise(0.1)(sample)
    assert noisy["image"].dtype == torch.uint8 and torch.equal(noisy["mask"], sample["mask"])


def test_eval_transform_is_identity_and_bad_options_are_rejected():
    sample, mask = _encoded_sample()
    out = build_transforms(train=False, crop_size=16)(sample)
    assert torch.equal(out["mask"], mask) and out["image"].shape == (3, 48, 56)
    for kwargs in (
        {"hflip": 1.5},
        {"elastic": -0.1},
        {"rotate": -5},
        {"scale_range": (0.0, 1.0)},
        {"scale_range": (2.0, 1.0)},
    ):
        with pytest.raises(ValueError):
            build_transforms(train=True, **kwargs)


def test_collate_rejects_mixed_sizes_with_a_hint():
    ds = SyntheticShapes(num_samples=2, image_size=32)
    other = SyntheticShapes(num_samples=2, image_size=24)
    with pytest.raises(ValueError, match="crop_size"):
        collate_samples([ds[0], other[0]])
