"""Deep Snake-style contour masks on Mask R-CNN (``mask_head="contour"``): training loss from the ground-truth boxes
and resized masks, inference masks rasterised at the input size, the initial-contour invariant, learning, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import resize_boxes

from maskworks.models.instance import box_to_initial_contour, contour_loss
from maskworks.models.instance.mask_rcnn import (
    CONTOUR_LOSS_NAMES,
    LOSS_NAMES,
    MaskRCNN,
    _check_loss_weights,
    mask_rcnn,
)
from maskworks.ops import contour_to_mask, mask_to_contour
from maskworks.testing import TINY_MASK_RCNN

SMALL = TINY_MASK_RCNN  # tiny models: 64-96 px images, few RoIs, small contour heads
CONTOUR = {"mask_head": "contour", "contour_num_points": 32, "contour_hidden": 32}
POINTS = 32


def _disk_sample(size: tuple[int, int], disks: list[tuple[float, float, float]], pad: float = 0.0):
    """An image (random noise) with filled disks ``(cx, cy, r)`` as instances; each box is the disk's pixel bounding
    box grown by ``pad`` on every side."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    boxes, masks = [], []
    for cx, cy, r in disks:
        m = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        rows, cols = torch.where(m.any(1))[0], torch.where(m.any(0))[0]
        box = [cols[0] - pad, rows[0] - pad, cols[-1] + 1 + pad, rows[-1] + 1 + pad]
        boxes.append([float(v) for v in box])
        masks.append(m.to(torch.uint8))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(disks), dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8),
    }
    return torch.randn(3, h, w), target


# 48 x 60 images are resized x 4/3 to 64 x 80 by the model's transform
BATCH = [((48, 60), [(14.0, 16.0, 9.0), (38.0, 28.0, 12.5)]), ((48, 60), [])]


def _losses(model: MaskRCNN, batch=BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    samples = [_disk_sample(size, disks) for size, disks in batch]
    torch.manual_seed(seed)
    model.train()
    return model([s[0] for s in samples], [s[1] for s in samples])


def _pair(**opts) -> tuple[MaskRCNN, MaskRCNN]:
    """A standard and a contour model with the same weights (the contour head aside)."""
    torch.manual_seed(0)
    standard = mask_rcnn("resnet18", num_classes=3, **{**SMALL, **opts})
    torch.manual_seed(0)
    contour = mask_rcnn("resnet18", num_classes=3, **{**SMALL, **CONTOUR, **opts})
    return standard, contour


# --------------------------------------------------------------------------- training
def test_contour_training_loss_targets_and_gradients():
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=3, **SMALL, **CONTOUR)
    assert model.loss_weights == dict.fromkeys(LOSS_NAMES + CONTOUR_LOSS_NAMES, 1.0)
    head = model.roi_heads.contour_head
    seen: list[list[torch.Tensor]] = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append([b.clone() for b in args[1]]))
    losses = _losses(model)
    assert set(losses) == {*LOSS_NAMES, "loss_contour"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    # the head starts from the ground-truth boxes in the resized image (each object once; none in the empty image)
    torch.manual_seed(123)
    samples = [_disk_sample(size, disks) for size, disks in BATCH]
    boxes = resize_boxes(samples[0][1]["boxes"], [48, 60], [64, 80])
    (got,) = seen
    assert [len(b) for b in got] == [2, 0]
    torch.testing.assert_close(got[0], boxes)
    # at initialisation every step returns the initial ellipse: loss_contour is its contour loss against the outer
    # contours of the ground-truth masks resized as torchvision resizes them (nearest, to 64 x 80)
    resized = F.interpolate(samples[0][1]["masks"][:, None].float(), size=(64, 80))[:, 0] > 0
    target = torch.stack([mask_to_contour(m, POINTS) for m in resized])
    expected = contour_loss(box_to_initial_contour(boxes, POINTS), target)
    assert expected > 0.1
    torch.testing.assert_close(losses["loss_contour"].detach(), expected, rtol=1e-4, atol=1e-5)
    # gradients reach every step's zero-initialised offset layer
    losses["loss_contour"].backward()
    for snake in head.snakes:
        assert snake.pred[-1].weight.grad is not None and snake.pred[-1].weight.grad.abs().sum() > 0
    # its weight
    model.loss_weights = _check_loss_weights({"loss_contour": 2.0}, "contour")
    weighted = _losses(model)
    torch.testing.assert_close(weighted["loss_contour"].detach(), 2 * losses["loss_contour"].detach())
    # contour_max_instances caps the objects per image
    seen.clear()
    model.roi_heads.contour_max_instances = 1
    _losses(model)
    assert [len(b) for b in seen[0]] == [1, 0]
    hook.remove()
    # a batch without a single object: a zero loss still connected to the head
    empty = _losses(model, batch=[((48, 60), [])])
    assert empty["loss_contour"].item() == 0.0 and empty["loss_contour"].requires_grad
    # bfloat16 autocast: the contour head computes in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _losses(model)
    assert losses["loss_contour"].dtype == torch.float32 and torch.isfinite(losses["loss_contour"])


def test_contour_loss_falls_when_overfitting_one_disk():
    """Only the contour head learns, only from loss_contour: the loose box's ellipse shrinks onto the disk."""
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=2, **SMALL, **CONTOUR)
    head = model.roi_heads.contour_head
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    image, target = _disk_sample((64, 64), [(30.0, 33.0, 13.0)], pad=6.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-4)
    model.train()
    history = []
    for _ in range(30):
        loss = model([image], [target])["loss_contour"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[0] > 2.0  # about 6 px off all around
    assert min(history[-3:]) < 0.3 * history[0], history  # about 0.03 of it over a few seeds


# --------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def pair() -> tuple[MaskRCNN, MaskRCNN]:
    standard, contour = _pair(box_score_thresh=0.0)
    # the contour head comes after torchvision's modules, whose initial values stay the same for a seed
    state = contour.state_dict()
    contour.same_initial_values = all(torch.equal(state[k], v) for k, v in standard.state_dict().items())
    result = contour.load_state_dict(standard.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("roi_heads.contour_head.") for k in result.missing_keys)
    return standard.eval(), contour.eval()


def test_contour_inference_contract_and_initial_contour_invariant(pair):
    standard, model = pair
    sizes = [(48, 60), (70, 50)]  # resized x 4/3 to 64 x 80 and x 1.28 to 89 x 64
    torch.manual_seed(1)
    images = [torch.randn(3, h, w) for h, w in sizes]
    shapes, raw = [], []
    pre = model.roi_heads.register_forward_pre_hook(lambda module, args: shapes.append(list(args[2])))
    post = model.roi_heads.register_forward_hook(
        lambda module, args, out: raw.append([{k: v.clone() for k, v in r.items()} for r in out[0]])
    )
    try:
        with torch.no_grad():
            expected = standard(images)
            out = model(images)
    finally:
        pre.remove()
        post.remove()
    assert sum(len(d["boxes"]) for d in out) > 0  # not vacuous
    ((resized_sizes,), (dets,)) = shapes, raw
    nonempty = 0
    for det, ref, size, resized_size, r in zip(out, expected, sizes, resized_sizes, dets):
        # the detections are the standard model's; only the masks differ
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(det[key], ref[key])
        n, (h, w) = len(det["boxes"]), size
        assert det["masks"].dtype == torch.bool and det["masks"].shape == (n, h, w) == ref["masks"].shape
        # a fresh head (zero-initialised offset layers) returns the ellipse inscribed in each detected box of the
        # resized image; scaled to the input size as the boxes are, it is rasterised there
        initial = box_to_initial_contour(r["boxes"], POINTS)
        assert torch.equal(r["contours"], initial)
        ratio = torch.tensor([w, h], dtype=torch.float32) / torch.tensor(resized_size[::-1], dtype=torch.float32)
        for i in range(n):
            mask = contour_to_mask(initial[i] * ratio, h, w)
            assert torch.equal(det["masks"][i], mask)
            # the same, up to rounding, as the ellipse inscribed in the output box at the input size
            direct = contour_to_mask(box_to_initial_contour(det["boxes"][i : i + 1], POINTS)[0], h, w)
            assert (direct ^ mask).sum() <= 2
            nonempty += int(mask.any())
    assert nonempty > 0
    # return_mask_probs: the contour masks as 0 / 1 probabilities
    model.return_mask_probs = True
    try:
        with torch.no_grad():
            probs = model(images)[0]  # the same batch: padding to a common size changes the features
        # bfloat16 autocast: float32 contours, bool masks
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            (det_bf16,) = model(images[1:])
    finally:
        model.return_mask_probs = False
    assert probs["mask_probs"].dtype == torch.float32 and torch.equal(probs["masks"], out[0]["masks"])
    assert torch.equal(probs["mask_probs"] > 0.5, probs["masks"])
    assert det_bf16["masks"].dtype == torch.bool and det_bf16["masks"].shape[1:] == sizes[1]
    # no detections: empty, well-shaped output
    model.roi_heads.score_thresh = 1.0
    try:
        with torch.no_grad():
            (empty,) = model(images[1:])
    finally:
        model.roi_heads.score_thresh = 0.0
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 70, 50)
    assert empty["masks"].dtype == torch.bool


def test_state_dict_keys_unchanged_without_the_option(pair):
    standard, contour = pair
    keys = list(standard.state_dict())
    assert standard.roi_heads.contour_head is None and not any("contour" in k for k in keys)
    contour_keys = list(contour.state_dict())
    assert contour_keys[: len(keys)] == keys
    extra = contour_keys[len(keys) :]
    assert extra and all(k.startswith("roi_heads.contour_head.snakes.") for k in extra)
    assert {k.split(".")[3] for k in extra} == {"0", "1", "2"}  # contour_iterations=3 steps
    assert contour.same_initial_values  # recorded before the standard weights were loaded


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"mask_head": "snake"}, "mask_head must be 'standard' or 'pointrend' or 'contour'"),
        ({"mask_head": "contour", "contour_num_points": 8}, "contour_num_points must be an int >= 16"),
        ({"mask_head": "contour", "contour_num_points": 32.0}, "contour_num_points must be an int >= 16"),
        ({"mask_head": "contour", "contour_hidden": 0}, "contour_hidden must be a positive int"),
        ({"mask_head": "contour", "contour_iterations": 1.5}, "contour_iterations must be a positive int"),
        ({"mask_head": "contour", "contour_max_instances": 0}, "contour_max_instances must be a positive int"),
        ({"mask_head": "contour", "contour_max_instances": True}, "contour_max_instances must be a positive int"),
        (
            {"contour_num_points": 64},
            "contour_num_points applies to mask_head='contour' only, got mask_head='standard'",
        ),
        ({"mask_head": "pointrend", "contour_iterations": 2}, "contour_iterations applies to mask_head='contour' only"),
        ({"mask_head": "contour", "point_head_num_fc": 2}, "point_head_num_fc applies to mask_head='pointrend' only"),
        ({"loss_weights": {"loss_contour": 2.0}}, "loss_weights has unknown loss 'loss_contour'"),
        ({"mask_head": "contour", "loss_weights": {"loss_contour": -1.0}}, r"loss_weights\['loss_contour'\] must be"),
    ],
)
def test_bad_contour_options_raise(opts, message):
    with pytest.raises(ValueError, match=message):
        mask_rcnn("resnet18", num_classes=3, **opts)
