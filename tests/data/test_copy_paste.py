"""Copy-paste of rare-class regions (seed Q6 defect 7: the seed's version always raises)."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskworks.data import (
    BankedObject,
    RareClassCopyPaste,
    SyntheticShapes,
    build_transforms,
    extract_objects,
    raw_sample,
)


def _scene():
    image = np.zeros((8, 10, 3), np.uint8)
    mask = np.zeros((8, 10), np.int64)
    mask[1:3, 1:3] = 2  # first component of class 2 (4 px)
    mask[5:8, 6:9] = 2  # second, separate component (9 px)
    mask[0, 9] = 1
    image[mask == 2] = (200, 100, 50)
    image[5:8, 6:9] = (10, 20, 30)
    return image, mask


def test_extract_objects_splits_components_and_crops_to_boxes():
    image, mask = _scene()
    s = raw_sample(image, mask)
    objs = extract_objects(s["image"], s["mask"], classes=[2], min_area=1)
    assert sorted(tuple(o.mask.shape) for o in objs) == [(2, 2), (3, 3)]  # two instances, not one class region
    big = next(o for o in objs if o.mask.shape == (3, 3))
    assert big.mask.all() and big.label == 2
    assert big.image[:, 0, 0].tolist() == [10, 20, 30]
    assert len(extract_objects(s["image"], s["mask"], classes=[2], min_area=5)) == 1
    assert extract_objects(s["image"], s["mask"], classes=[3]) == []


def test_paste_copies_source_pixels_exactly_and_leaves_the_rest():
    torch.manual_seed(0)
    obj_mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    obj_img = torch.arange(3 * 2 * 3, dtype=torch.uint8).reshape(3, 2, 3) + 100
    paste = RareClassCopyPaste([BankedObject(obj_img, obj_mask, 4)], p=1.0, max_objects=1, hflip=0.0)
    image = np.full((6, 7, 3), 7, np.uint8)
    mask = np.full((6, 7), 1, np.int64)
    mask[0, 0] = 255
    for _ in range(20):
        s = raw_sample(image, mask)
        out = paste(s)
        assert isinstance(out["image"], tv_tensors.Image) and isinstance(out["mask"], tv_tensors.Mask)
        changed = out["mask"] == 4
        assert int(changed.sum()) == int(obj_mask.sum())
        ys, xs = torch.nonzero(changed, as_tuple=True)
        top, left = int(ys.min()), int(xs.min())
        region = (slice(top, top + 2), slice(left, left + 3))
        # pasted image pixels equal the source pixels exactly where the object's mask is set
        got = out["image"][:, region[0], region[1]]
        assert torch.equal(got[:, obj_mask], obj_img[:, obj_mask])
        # everything else is unchanged: image and mask
        assert (out["image"][:, ~changed] == 7).all()
        assert torch.equal(out["mask"][~changed], s["mask"][~changed])
        # the input sample is not modified in place
        assert (s["image"] == 7).all()


def test_object_as_large_as_or_larger_than_the_image_never_raises():
    torch.manual_seed(1)
    big = BankedObject(torch.full((3, 8, 9), 50, dtype=torch.uint8), torch.ones(8, 9, dtype=torch.bool), 3)
    paste = RareClassCopyPaste([big], p=1.0, max_objects=2)
    for shape in [(8, 9), (5, 4), (8, 12)]:
        s = raw_sample(np.zeros((*shape, 3), np.uint8), np.zeros(shape, np.int64))
        out = paste(s)
        assert out["mask"].shape == shape
        assert int((out["mask"] == 3).sum()) >= min(8, shape[0]) * min(9, shape[1])


def test_from_dataset_bank_is_bounded_and_pastes_instances():
    ds = SyntheticShapes(num_samples=6, image_size=(48, 48), seed=3, return_instances=True)
    paste = RareClassCopyPaste.from_dataset(ds, classes=[1, 2], max_per_class=2, min_area=4, p=1.0, max_objects=1)
    assert 1 <= len(paste) <= 4 and all(len(v) <= 2 for v in paste.by_class.values())
    assert "bank=" in repr(paste)
    torch.manual_seed(0)
    raw = ds.load_raw(0)
    raw.pop("file")
    n_before = len(raw["instances"]["labels"])
    out = paste(raw)
    inst = out["instances"]
    assert inst["masks"].shape[0] == len(inst["labels"]) == inst["boxes"].shape[0]
    assert inst["masks"].shape[0] <= n_before + 1
    new = inst["masks"][-1].bool()
    assert int(inst["labels"][-1]) in (1, 2) and (out["mask"][new] == inst["labels"][-1]).all()
    # earlier instances no longer overlap the pasted object
    assert not (inst["masks"][:-1].bool() & new).any()


def test_in_a_pipeline_through_the_dataset_and_seeded():
    ds = SyntheticShapes(num_samples=4, image_size=(40, 40), seed=1)
    paste = RareClassCopyPaste.from_dataset(ds, classes=[3], p=1.0, min_area=4)
    ds.transform = v2.Compose([paste, build_transforms(train=True, crop_size=(32, 32))])
    torch.manual_seed(5)
    a = ds[0]
    torch.manual_seed(5)
    b = ds[0]
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["image"], b["image"])
    assert a["mask"].shape == (32, 32)


def test_p_zero_is_identity_and_options_are_validated():
    obj = BankedObject(torch.ones(3, 2, 2, dtype=torch.uint8), torch.ones(2, 2, dtype=torch.bool), 1)
    s = raw_sample(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64))
    assert RareClassCopyPaste([obj], p=0.0)(s) is s
    with pytest.raises(ValueError, match="p is a probability"):
        RareClassCopyPaste([obj], p=1.5)
    with pytest.raises(ValueError, match="bank is empty"):
        RareClassCopyPaste([], p=0.5)
    with pytest.raises(ValueError, match="class_probs"):
        RareClassCopyPaste([obj], class_probs={7: 1.0})
    ds = SyntheticShapes(num_samples=2, image_size=(32, 32))
    with pytest.raises(ValueError, match="not in 0"):
        RareClassCopyPaste.from_dataset(ds, classes=[99])
    with pytest.raises(TypeError, match="load_raw"):
        RareClassCopyPaste.from_dataset([1, 2], classes=[1])
