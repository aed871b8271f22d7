"""Microscopy instance segmentation: targets, loss, watershed post-processing, stain/intensity augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from maskworks.data.transforms import InstanceMasks
from maskworks.methods.microscopy import (
    DISTANCE,
    FOREGROUND,
    HEDJitter,
    IntensityJitter,
    MicroscopyLoss,
    connected_component_instances,
    decode_outputs,
    id_map_to_instances,
    instance_map_from_masks,
    instance_targets,
    isbi_instances,
    microscopy_model,
    predict_instances,
    watershed_instances,
)
from maskworks.metrics.instance_seg import aggregated_jaccard_index, pairwise_instance_iou

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- synthetic cells
def touching_cells(seed: int, size: int = 64, cell: int = 32) -> tuple[np.ndarray, int]:
    """Groups of 2 or 3 overlapping discs, one group per ``cell x cell`` tile, split by their power diagram (so
    every piece is convex and touches its neighbours along a straight line). Returns the id map and the number of
    groups."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    ids = np.zeros((size, size), dtype=np.int32)
    next_id, groups = 1, 0
    for ty in range(0, size - cell + 1, cell):
        for tx in range(0, size - cell + 1, cell):
            cy, cx = ty + cell / 2 + rng.uniform(-1, 1), tx + cell / 2 + rng.uniform(-1, 1)
            n = int(rng.integers(2, 4))
            radii = rng.uniform(5.5, 7.0, n)
            angle0 = rng.uniform(0, 2 * math.pi)
            if n == 2:
                d = 0.75 * radii.sum()
                offsets = [(-d / 2, 0.0), (d / 2, 0.0)]
            else:
                rho = 0.8 * 2 * radii.mean() / math.sqrt(3)
                offsets = [(rho * math.cos(2 * math.pi * k / 3), rho * math.sin(2 * math.pi * k / 3)) for k in range(3)]
            c, s = math.cos(angle0), math.sin(angle0)
            power = np.stack(
                [
                    (yy - (cy + c * oy - s * ox)) ** 2 + (xx - (cx + s * oy + c * ox)) ** 2 - r * r
                    for (oy, ox), r in zip(offsets, radii)
                ]
            )  # (n, H, W)
            inside = power.min(0) <= 0
            ids[inside] = next_id + power.argmin(0)[inside]
            next_id += n
            groups += 1
    return ids, groups


def _matched_one_to_one(pred: np.ndarray, target: np.ndarray, iou: float) -> bool:
    """Every target instance has a prediction of IoU > ``iou``, and no prediction serves two targets."""
    m, _, _ = pairwise_instance_iou(pred, target)
    if m.shape[1] == 0:
        return False
    best = m.argmax(1)
    return bool((m.max(1) > iou).all()) and len(set(best.tolist())) == len(best)


# ---------------------------------------------------------------------------------------------- targets
def test_instance_targets_hand_values():
    ids = np.zeros((5, 8), dtype=np.int64)
    ids[1:4, 1:4] = 7  # ids need not be consecutive
    ids[1:4, 4:7] = 3
    t = instance_targets(ids)
    fg = (ids > 0).astype(np.float32)
    boundary = fg.copy()
    boundary[2, 2] = boundary[2, 5] = 0  # the centres: no other label in their 3x3 neighbourhood
    distance = fg * 0.5  # EDT 1 on the rim, 2 at the centre (to the other square / the background)
    distance[2, 2] = distance[2, 5] = 1.0
    np.testing.assert_array_equal(t["foreground"].numpy(), fg)
    np.testing.assert_array_equal(t["boundary"].numpy(), boundary)
    np.testing.assert_allclose(t["distance"].numpy(), distance)
    assert t["valid"].all() and t["foreground"].dtype == torch.float32

    # the image edge is neither a boundary nor ignored by the distance (it counts as the instance's edge)
    full = instance_targets(torch.ones(3, 3, dtype=torch.int64))
    assert full["boundary"].sum() == 0
    expected = torch.full((3, 3), 0.5)
    expected[1, 1] = 1.0
    torch.testing.assert_close(full["distance"], expected)

    # width 2: every pixel of a 3-wide square is within 2 pixels of another label
    assert instance_targets(ids, boundary_width=2)["boundary"].sum() == 18


def test_instance_targets_batch_ignore_and_errors():
    ids, _ = touching_cells(0)
    ignore = np.zeros_like(ids, dtype=bool)
    ignore[:5] = True
    batch = torch.from_numpy(np.stack([ids, ids]))
    t = instance_targets(batch, ignore=np.stack([ignore, ignore]))
    single = instance_targets(ids)
    assert t["distance"].shape == (2, 64, 64)
    torch.testing.assert_close(t["distance"][1], single["distance"])
    assert not t["valid"][:, :5].any() and t["valid"][:, 5:].all()
    assert (t["boundary"] <= t["foreground"]).all()
    # every instance reaches exactly 1 at its deepest pixel
    d = single["distance"].numpy()
    assert all(d[ids == k].max() == 1.0 for k in np.unique(ids)[1:])
    with pytest.raises(TypeError, match="integer"):
        instance_targets(ids.astype(np.float32))
    with pytest.raises(ValueError, match="boundary_width"):
        instance_targets(ids, boundary_width=0)


def test_instance_map_from_masks_and_isbi_conversion():
    masks = np.zeros((2, 3, 4), dtype=bool)
    masks[0, :, :2] = True
    masks[1, :, 1:3] = True  # overlaps column 1: the first mask keeps it
    np.testing.assert_array_equal(instance_map_from_masks(masks), [[1, 1, 2, 0]] * 3)
    assert instance_map_from_masks(np.zeros((0, 3, 4), dtype=bool)).shape == (3, 4)

    label = np.zeros((6, 6), dtype=np.uint8)
    label[0:2, 0:2] = 255  # 4 px
    label[2:4, 2:4] = 200  # 4 px, touches the first one only diagonally
    label[5, 5] = 255  # 1 px
    ids, ignore = isbi_instances(label, min_area=2)
    assert ids.max() == 2 and ignore.sum() == 1 and ignore[5, 5]
    ids8, _ = isbi_instances(label, min_area=2, connectivity=8)
    assert ids8.max() == 1 and (ids8 > 0).sum() == 8


def test_isbi_instances_match_the_dataset(isbi_root):
    from maskworks.data.io import IGNORE_INDEX
    from maskworks.data.isbi import ISBI2012Instances

    ds = ISBI2012Instances(isbi_root, split="all")
    sample = ds.load_raw(0)
    from PIL import Image

    label = np.asarray(Image.open(ds.pairs[0][1]))
    ids, ignore = isbi_instances(label)
    np.testing.assert_array_equal(ids, instance_map_from_masks(sample["instances"]["masks"]))
    np.testing.assert_array_equal(ignore, sample["mask"].numpy() == IGNORE_INDEX)
    assert ids.max() == len(sample["instances"]["labels"]) > 50
    # the membranes already separate ISBI cells: components of the perfect foreground are the instances
    t = instance_targets(ids, ignore=ignore)
    assert aggregated_jaccard_index(connected_component_instances(t["foreground"]), ids) == 1.0


# ---------------------------------------------------------------------------------------------- watershed
@pytest.mark.parametrize(
    "options",
    [{}, {"markers": "h_maxima", "h": 0.2}, {"flood": "boundary"}, {"boundary": None}],
    ids=["threshold", "h_maxima", "flood_boundary", "no_boundary_head"],
)
def test_watershed_splits_every_touching_group(options):
    options = dict(options)
    use_boundary = "boundary" not in options
    options.pop("boundary", None)
    for seed in range(3):
        ids, groups = touching_cells(seed)
        n = int(ids.max())
        assert n > groups  # the layout has touching cells
        t = instance_targets(ids)
        ws = watershed_instances(t["foreground"], t["boundary"] if use_boundary else None, t["distance"], **options)
        cc = connected_component_instances(t["foreground"])
        assert ws.max() == n and _matched_one_to_one(ws, ids, 0.8)
        assert cc.max() == groups  # the baseline merges every touching group
        assert aggregated_jaccard_index(ws, ids) > 0.9 > aggregated_jaccard_index(cc, ids)


def test_watershed_skimage_gallery_discs_with_a_global_distance_map():
    """The scikit-image watershed gallery example: two overlapping discs and the EDT of their union (one distance
    map for both, not per instance): h-maxima markers split them."""
    from scipy import ndimage

    y, x = np.indices((80, 80))
    p1, p2 = (x - 28) ** 2 + (y - 28) ** 2 - 16**2, (x - 52) ** 2 + (y - 44) ** 2 - 20**2
    union = np.minimum(p1, p2) < 0
    gt = np.where(union, np.where(p1 < p2, 1, 2), 0)
    d = ndimage.distance_transform_edt(union)
    ws = watershed_instances(union.astype(np.float32), None, d / d.max(), markers="h_maxima", h=0.1)
    assert ws.max() == 2 and _matched_one_to_one(ws, gt, 0.9)
    # the global EDT has a saddle above 0.5 between the discs: a 0.5 distance threshold gives a single marker
    assert watershed_instances(union.astype(np.float32), None, d / d.max()).max() == 1


def test_watershed_on_blurred_maps_and_options():
    from scipy import ndimage

    ids, groups = touching_cells(5)
    t = {k: ndimage.gaussian_filter(v.numpy(), 1.0) for k, v in instance_targets(ids).items() if k != "valid"}
    ws = watershed_instances(t["foreground"], t["boundary"], t["distance"], boundary_threshold=0.3)
    assert ws.max() == ids.max() and _matched_one_to_one(ws, ids, 0.7)
    assert connected_component_instances(t["foreground"]).max() == groups

    # unmarked foreground: kept as its own instance, or dropped; min_size removes it
    fg = (ids > 0).astype(np.float32)
    fg[0:3, 0:3] = 1.0  # a speck no marker reaches
    dist = instance_targets(ids)["distance"].numpy()
    kept = watershed_instances(fg, None, dist)
    assert kept.max() == ids.max() + 1 and kept[1, 1] > 0
    assert watershed_instances(fg, None, dist, keep_unmarked=False)[1, 1] == 0
    assert watershed_instances(fg, None, dist, min_size=10)[1, 1] == 0
    with pytest.raises(ValueError, match="flood"):
        watershed_instances(fg, None, dist, flood="boundary")
    with pytest.raises(ValueError, match="markers"):
        watershed_instances(fg, None, dist, markers="peaks")
    with pytest.raises(ValueError, match="shape"):
        watershed_instances(fg, None, dist[:10])


# ---------------------------------------------------------------------------------------------- loss
def _perfect_logits(t: dict[str, torch.Tensor], margin: float = 30.0) -> torch.Tensor:
    return torch.stack(
        [(2 * t["foreground"] - 1) * margin, (2 * t["boundary"] - 1) * margin, t["distance"]], dim=1
    )  # (B, 3, H, W)


def test_loss_perfect_logits_gradients_and_masks():
    ids = torch.from_numpy(np.stack([touching_cells(1)[0], touching_cells(2)[0]]))
    t = instance_targets(ids)
    loss_fn = MicroscopyLoss(boundary_pos_weight=3.0)
    perfect = _perfect_logits(t)
    assert loss_fn(perfect, t) < 1e-6

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 64, 64, requires_grad=True)
    parts = loss_fn.terms(logits, t)
    assert all(parts[k] > 0.1 for k in ("foreground", "boundary", "distance"))
    parts["loss"].backward()
    grad = logits.grad.abs().sum(dim=(0, 2, 3))
    assert torch.isfinite(logits.grad).all() and (grad > 0).all()

    # the distance term only looks inside the target foreground unless distance_region="all"
    background = (t["foreground"] == 0).unsqueeze(1) & (torch.arange(3) == DISTANCE).view(1, 3, 1, 1)
    shifted = torch.where(background, perfect + 5.0, perfect)
    assert loss_fn(shifted, t) < 1e-6
    assert MicroscopyLoss(distance_region="all")(shifted, t) > 1.0
    # invalid pixels count nowhere
    t_ignore = {**t, "valid": t["foreground"] == 0}
    fg_wrong = perfect.clone()
    fg_wrong[:, FOREGROUND] = -fg_wrong[:, FOREGROUND]
    assert loss_fn(fg_wrong, t) > 1.0
    bad_on_fg = torch.where((t["foreground"] == 1).unsqueeze(1), fg_wrong, perfect)
    assert loss_fn(bad_on_fg, t_ignore) < 1e-6
    # weights and deep supervision
    l1 = MicroscopyLoss(foreground_weight=0, boundary_weight=0, distance_loss="l1")
    torch.testing.assert_close(
        l1(logits.detach(), t), (logits[:, DISTANCE].detach() - t["distance"]).abs()[t["foreground"] == 1].mean()
    )
    aux = torch.randn(2, 3, 32, 32)
    total = loss_fn({"out": perfect, "aux": [aux]}, t)
    torch.testing.assert_close(total, loss_fn(perfect, t) + 0.4 * loss_fn(aux, t))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        loss_fn(torch.zeros(2, 2, 64, 64), t)
    with pytest.raises(ValueError, match="distance_loss"):
        MicroscopyLoss(distance_loss="huber")


def test_decode_model_and_instance_dicts():
    t = instance_targets(touching_cells(3)[0])
    t = {k: v[None] for k, v in t.items()}
    dec = decode_outputs(_perfect_logits(t))
    for k in ("foreground", "boundary"):
        torch.testing.assert_close(dec[k], t[k], atol=1e-6, rtol=0)
    assert decode_outputs(torch.full((3, 4, 4), 7.0))["distance"].max() == 1.0

    model = microscopy_model("unet_vanilla", in_channels=1, features=(4, 8))
    assert model(torch.zeros(1, 1, 20, 24)).shape == (1, 3, 20, 24)
    model.train()
    maps = predict_instances(model, torch.zeros(2, 1, 20, 24), min_size=2)
    assert len(maps) == 2 and maps[0].shape == (20, 24) and model.training
    with pytest.raises(ValueError, match="num_classes"):
        microscopy_model("unet_vanilla", num_classes=2)

    ids = np.array([[0, 4, 4], [9, 9, 0]])
    fg = np.array([[0.0, 0.6, 0.8], [0.9, 0.5, 0.0]])
    inst = id_map_to_instances(ids, foreground=fg)
    assert inst["masks"].shape == (2, 2, 3) and inst["labels"].tolist() == [1, 1]
    torch.testing.assert_close(inst["scores"], torch.tensor([0.7, 0.7]))
    torch.testing.assert_close(inst["boxes"], torch.tensor([[1.0, 0.0, 3.0, 1.0], [0.0, 1.0, 2.0, 2.0]]))


def test_instances_score_with_mask_ap():
    pytest.importorskip("pycocotools")
    from maskworks.metrics import MaskAP

    ids, _ = touching_cells(4)
    ap = MaskAP()
    ap.update([id_map_to_instances(ids)], [id_map_to_instances(ids)])
    assert ap.compute()["map"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- augmentation
def _sample(image: torch.Tensor) -> dict:
    h, w = image.shape[-2:]
    mask = torch.randint(0, 3, (h, w))
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, :2], masks[1, 3:] = 1, 1
    return {
        "image": tv_tensors.Image(image),
        "mask": tv_tensors.Mask(mask),
        "instances": {"masks": InstanceMasks(masks), "labels": torch.tensor([1, 1])},
    }


def test_hed_jitter_identity_parity_and_mask_untouched():
    skcolor = pytest.importorskip("skimage.color")
    torch.manual_seed(0)
    rgb = torch.randint(0, 256, (3, 6, 7), dtype=torch.uint8)
    same = HEDJitter(alpha=(1.0, 1.0), beta=(0.0, 0.0))(tv_tensors.Image(rgb))
    torch.testing.assert_close(same.as_subclass(torch.Tensor), rgb, atol=1, rtol=0)

    # an H&E-like image (non-negative stains): one draw equals skimage's rgb2hed -> scale/shift -> hed2rgb
    rng = np.random.default_rng(0)
    stains = rng.uniform(0.0, 0.08, (6, 7, 3))
    stains[..., 2] = 0.0
    img = skcolor.hed2rgb(stains).astype(np.float32)  # (H, W, 3) in [0, 1]
    tf = HEDJitter(alpha=(1.1, 1.1), beta=(-0.01, -0.01))
    out = tf(tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous()))
    ref = skcolor.hed2rgb(skcolor.rgb2hed(img.astype(np.float64)) * 1.1 - 0.01)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert out.dtype == torch.float32

    sample = _sample(rgb)
    mask, inst = sample["mask"].clone(), sample["instances"]["masks"].clone()
    torch.manual_seed(1)
    a = HEDJitter(alpha=0.2, beta=0.05)(sample)
    torch.manual_seed(1)
    b = HEDJitter(alpha=0.2, beta=0.05)(sample)
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], rgb)
    assert torch.equal(a["mask"], mask) and torch.equal(a["instances"]["masks"], inst)
    assert a["image"].dtype == torch.uint8
    with pytest.raises(ValueError, match="RGB"):
        HEDJitter()(tv_tensors.Image(torch.zeros(1, 4, 4, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="alpha"):
        HEDJitter(alpha=-0.1)


def test_intensity_jitter_values_and_mask_untouched():
    grey = torch.arange(0, 256, 8, dtype=torch.uint8).view(1, 4, 8)
    out = IntensityJitter(gamma=(2.0, 2.0), contrast=0.0, brightness=0.0)(tv_tensors.Image(grey))
    expected = ((grey.double() / 255) ** 2 * 255).round().to(torch.uint8)
    assert torch.equal(out.as_subclass(torch.Tensor), expected)

    x = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]])
    out = IntensityJitter(gamma=None, contrast=(2.0, 2.0), brightness=(0.1, 0.1))(tv_tensors.Image(x))
    torch.testing.assert_close(out.as_subclass(torch.Tensor), torch.tensor([[[0.0, 0.4], [0.8, 1.0]]]))

    sample = _sample(torch.randint(0, 256, (1, 6, 7), dtype=torch.uint8))
    mask = sample["mask"].clone()
    out = IntensityJitter(p=1.0)(sample)
    assert torch.equal(out["mask"], mask) and out["image"].dtype == torch.uint8
    assert IntensityJitter(p=0.0)(sample)["image"] is sample["image"]
    with pytest.raises(ValueError, match="gamma"):
        IntensityJitter(gamma=(0.0, 1.0))


# ---------------------------------------------------------------------------------------------- learning
def _cell_images(seeds: range, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose cells are bright at the centre and dim at their edges (a valley where two cells touch)."""
    rng = np.random.default_rng(seeds.start)
    ids = np.stack([touching_cells(s)[0] for s in seeds])
    d = instance_targets(ids)["distance"].numpy()
    img = np.where(ids > 0, 0.35 + 0.65 * d, 0.0) + rng.normal(0, noise, ids.shape)
    return torch.from_numpy(img.astype(np.float32)).unsqueeze(1), torch.from_numpy(ids)


def test_tiny_model_learns_to_split_touching_cells():
    torch.manual_seed(1)
    images, ids = _cell_images(range(10, 18))
    targets = instance_targets(ids)
    model = microscopy_model("unet_vanilla", in_channels=1, features=(4, 8))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    loss_fn = MicroscopyLoss(boundary_pos_weight=2.0)
    model.train()
    for _ in range(60):
        loss = loss_fn(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_ids = _cell_images(range(100, 104))
    ws = predict_instances(model, test_images)
    cc = predict_instances(model, test_images, method="components")
    aji_ws = np.mean([aggregated_jaccard_index(p, t) for p, t in zip(ws, test_ids)])
    aji_cc = np.mean([aggregated_jaccard_index(p, t) for p, t in zip(cc, test_ids)])
    n_true = [int(t.max()) for t in test_ids]
    err_ws = np.mean([abs(int(p.max()) - n) for p, n in zip(ws, n_true)])
    err_cc = np.mean([abs(int(p.max()) - n) for p, n in zip(cc, n_true)])
    assert aji_ws > aji_cc + 0.1, (aji_ws, aji_cc)
    assert err_ws < err_cc, (err_ws, err_cc)
