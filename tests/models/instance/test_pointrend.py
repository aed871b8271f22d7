"""PointRend on Mask R-CNN (``mask_head="pointrend"``): the point ops of :mod:`maskworks.ops.points` on hand-built
cases, the point head's geometry, training loss, subdivision inference and options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models.detection as tvd

from maskworks.models.instance.mask_rcnn import (
    LOSS_NAMES,
    POINTREND_LOSS_NAMES,
    MaskRCNN,
    PointHead,
    _check_loss_weights,
    mask_rcnn,
    mask_rcnn_resnet50_fpn,
)
from maskworks.ops import get_uncertain_point_coords_on_grid, get_uncertain_point_coords_with_randomness, point_sample
from maskworks.testing import TINY_MASK_RCNN, count_parameters
from maskworks.testing import rectangle_instances as _sample

SMALL = TINY_MASK_RCNN  # tiny models: 64-96 px images, few RoIs, 14x14 coarse masks
POINT_KEYS = [
    f"roi_heads.point_head.{name}.{p}" for name in ("fc1", "fc2", "fc3", "predictor") for p in ("weight", "bias")
]


def _losses(model: MaskRCNN, instances: tuple[int, ...] = (2, 0), seed: int = 0) -> dict[str, torch.Tensor]:
    """Training losses of one batch (same data and sampling for a seed)."""
    torch.manual_seed(123)
    batch = [_sample(model.num_classes, (64, 80), n) for n in instances]
    torch.manual_seed(seed)
    model.train()
    return model([b[0] for b in batch], [b[1] for b in batch])


def _pair(**opts) -> tuple[MaskRCNN, MaskRCNN]:
    """A standard and a PointRend model with the same weights (the point head aside)."""
    torch.manual_seed(0)
    standard = mask_rcnn("resnet18", num_classes=3, **{**SMALL, **opts})
    torch.manual_seed(0)
    pointrend = mask_rcnn("resnet18", num_classes=3, mask_head="pointrend", **{**SMALL, **opts})
    return standard, pointrend


# --------------------------------------------------------------------------- point ops
def test_point_sample_is_bilinear_with_half_pixel_centres():
    grid = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    maps = torch.stack([grid, 10 * grid])[:, None]  # (2, 1, 2, 2): each map reads its own points
    points = torch.tensor(
        [
            [0.25, 0.25],  # pixel centres: the values themselves
            [0.75, 0.25],
            [0.25, 0.75],
            [0.75, 0.75],
            [0.5, 0.5],  # between all four: their mean
            [0.375, 0.5],  # x a quarter of a pixel right of column 0's centre: rows 1.25 and 3.5, then the mean
            [0.0, 0.25],  # left edge of pixel (0, 0): half its value, half the zero padding
        ]
    )
    expected = torch.tensor([1.0, 2.0, 3.0, 5.0, 2.75, 2.375, 0.5])
    out = point_sample(maps, torch.stack([points, points]))
    assert out.shape == (2, 1, 7)
    torch.testing.assert_close(out[0, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1, 0], 10 * expected, atol=1e-5, rtol=0)
    # every cell centre of a random multi-channel map gives the cell exactly; (N, Hg, Wg, 2) grids keep their shape
    values = torch.randn(1, 3, 5, 7)
    ys, xs = torch.meshgrid((torch.arange(5) + 0.5) / 5, (torch.arange(7) + 0.5) / 7, indexing="ij")
    centres = torch.stack([xs, ys], dim=-1)[None]
    torch.testing.assert_close(point_sample(values, centres), values, atol=1e-6, rtol=0)
    torch.testing.assert_close(point_sample(values, centres.reshape(1, -1, 2)), values.flatten(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="point_coords must be"):
        point_sample(values, centres.reshape(-1, 2))


def test_uncertain_points_on_grid_are_the_top_cells_centres():
    uncertainty = torch.zeros(2, 1, 3, 4)
    uncertainty[0, 0, 2, 1] = 5.0  # (row, col) = (2, 1): flat index 9
    uncertainty[0, 0, 0, 3] = 4.0  # flat 3
    uncertainty[0, 0, 1, 0] = 3.0  # flat 4
    uncertainty[1] = -torch.arange(12.0).reshape(1, 3, 4)  # most uncertain: flat 0, 1, 2
    indices, coords = get_uncertain_point_coords_on_grid(uncertainty, 3)
    assert indices.tolist() == [[9, 3, 4], [0, 1, 2]]
    assert coords.dtype == torch.float32 and coords.shape == (2, 3, 2)
    expected = [
        [[1.5 / 4, 2.5 / 3], [3.5 / 4, 0.5 / 3], [0.5 / 4, 1.5 / 3]],
        [[0.5 / 4, 0.5 / 3], [1.5 / 4, 0.5 / 3], [2.5 / 4, 0.5 / 3]],
    ]
    torch.testing.assert_close(coords, torch.tensor(expected), atol=1e-7, rtol=0)
    # the centres read the picked cells back exactly
    picked = point_sample(uncertainty, coords)[:, 0]
    torch.testing.assert_close(picked, uncertainty.flatten(1).gather(1, indices))
    indices, coords = get_uncertain_point_coords_on_grid(uncertainty, 100)  # at most H * W
    assert indices.shape == (2, 12) and coords.shape == (2, 12, 2)
    assert sorted(indices[0].tolist()) == list(range(12))


def test_uncertain_points_with_randomness():
    logits = torch.randn(3, 2, 8, 8)

    def uncertainty(point_logits):  # -|logit| of channel 1
        return -point_logits[:, 1:].abs()

    num_points, k = 10, 3
    points = get_uncertain_point_coords_with_randomness(
        logits, uncertainty, num_points, k, 1.0, generator=torch.Generator().manual_seed(7)
    )
    # beta = 1: exactly the num_points most uncertain of the k * num_points uniform candidates
    candidates = torch.rand(3, num_points * k, 2, generator=torch.Generator().manual_seed(7))
    scores = uncertainty(point_sample(logits, candidates))[:, 0]
    best = scores.topk(num_points, dim=1).indices
    assert points.shape == (3, num_points, 2)
    torch.testing.assert_close(points, candidates.gather(1, best[..., None].expand(-1, -1, 2)))
    # beta = 0.75: the 7 uncertain candidates first, then 3 uniform points; all in [0, 1]
    points = get_uncertain_point_coords_with_randomness(
        logits, uncertainty, num_points, k, 0.75, generator=torch.Generator().manual_seed(7)
    )
    assert points.shape == (3, num_points, 2) and ((points >= 0) & (points <= 1)).all()
    torch.testing.assert_close(points[:, :7], candidates.gather(1, best[:, :7, None].expand(-1, -1, 2)))
    assert not torch.isin(points[:, 7:], candidates).all()
    assert get_uncertain_point_coords_with_randomness(logits[:0], uncertainty, 10, 3, 0.75).shape == (0, 10, 2)
    with pytest.raises(ValueError, match="oversample_ratio must be >= 1"):
        get_uncertain_point_coords_with_randomness(logits, uncertainty, 10, 0.5, 0.75)
    with pytest.raises(ValueError, match=r"importance_sample_ratio must be in \[0, 1\]"):
        get_uncertain_point_coords_with_randomness(logits, uncertainty, 10, 3, 1.5)


# --------------------------------------------------------------------------- point head geometry
def test_point_features_and_targets_follow_the_box_to_image_transform():
    """A P2 map (stride 4) whose channels are the image x and y of its pixel centres: bilinear sampling of a linear
    map is exact, so the sampled features are the points' image coordinates ``x1 + x * (x2 - x1)``."""
    head = PointHead(2, 3)
    image_shapes = [(60, 80), (64, 72)]  # padded batch 64 x 80: P2 is 16 x 20
    xs = (torch.arange(20.0) + 0.5) * 4
    ys = (torch.arange(16.0) + 0.5) * 4
    coords = torch.stack([xs.expand(16, 20), ys[:, None].expand(16, 20)])
    features = {"0": torch.stack([coords, coords + 100.0])}  # image 1: offset by 100
    boxes = [torch.tensor([[10.0, 12.0, 50.0, 44.0]]), torch.tensor([[20.0, 8.0, 36.0, 40.0], [4.0, 4.0, 8.0, 8.0]])]
    points = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 0.25], [0.3, 0.9]]).expand(3, -1, -1)
    got = head.point_features(features, boxes, points, image_shapes)
    assert got.shape == (3, 2, 4) and got.dtype == torch.float32
    all_boxes = torch.cat(boxes)
    expected = all_boxes[:, None, :2] + points * (all_boxes[:, None, 2:] - all_boxes[:, None, :2])  # (3, 4, 2)
    expected = expected.transpose(1, 2) + torch.tensor([0.0, 100.0, 100.0])[:, None, None]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # targets: the ground-truth mask of each box's match at the points; a pixel centre reads its pixel
    masks = torch.zeros(2, 60, 80, dtype=torch.uint8)
    masks[0, 20:30, 10:40] = 1
    masks[1, 0:10, 0:10] = 1
    box = torch.tensor([[10.0, 20.0, 40.0, 30.0]])  # mask 0's box exactly
    inside = torch.tensor([[[0.5 / 30, 0.5 / 10], [29.5 / 30, 9.5 / 10], [0.5, 0.5]]])  # corner / centre pixels
    outside = torch.tensor([[[-0.5 / 30, 0.5], [0.5, 10.5 / 10], [0.5, 0.5]]])  # one pixel out; last: in
    targets = PointHead.point_targets([masks], [torch.tensor([0, 1])], [box.repeat(2, 1)], torch.cat([inside, outside]))
    assert targets.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # the second box reads mask 1 (empty there)
    targets = PointHead.point_targets([masks], [torch.tensor([0])], [box], outside)
    assert targets.tolist() == [[0.0, 0.0, 1.0]]


# --------------------------------------------------------------------------- model
def test_pointrend_training_loss_and_gradients():
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=3, mask_head="pointrend", **SMALL)
    assert model.loss_weights == dict.fromkeys(LOSS_NAMES + POINTREND_LOSS_NAMES, 1.0)
    losses = _losses(model)
    assert set(losses) == {*LOSS_NAMES, "loss_mask_point"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert 0.3 < losses["loss_mask_point"].item() < 1.5  # BCE of near-zero point logits: about log 2
    losses["loss_mask_point"].backward()
    head = model.roi_heads.point_head
    for layer in (head.fc1, head.fc2, head.fc3, head.predictor):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # the point loss also trains the coarse mask head and the backbone (through the sampled P2 features)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert model.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    # its weight
    model.loss_weights = _check_loss_weights({"loss_mask_point": 2.0}, "pointrend")
    weighted = _losses(model)
    assert torch.equal(weighted["loss_mask_point"], 2 * losses["loss_mask_point"].detach())
    # a batch without a single positive RoI: a zero loss still connected to the head
    empty = _losses(model, instances=(0,))
    assert empty["loss_mask_point"].item() == 0.0 and empty["loss_mask_point"].requires_grad
    # bfloat16 autocast: the point head computes in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _losses(model)
    assert losses["loss_mask_point"].dtype == torch.float32 and torch.isfinite(losses["loss_mask_point"])


def test_pointrend_inference_contract_and_zero_steps_equal_standard():
    # the point head costs ~0.3 MFLOP per point and layer: 4 detections per image keep the 5 steps fast on CPUs
    standard, pointrend = _pair(box_score_thresh=0.0, return_mask_probs=True, box_detections_per_img=4)
    result = pointrend.load_state_dict(standard.state_dict(), strict=False)
    assert result.missing_keys == POINT_KEYS and not result.unexpected_keys
    standard.eval()
    pointrend.eval()
    images = [torch.randn(3, 64, 80), torch.randn(3, 70, 64)]
    with torch.no_grad():
        expected = standard(images)
        pointrend.roi_heads.point_head.subdivision_steps = 0  # the coarse 14x14 logits of the predicted class
        same = pointrend(images)
        pointrend.roi_heads.point_head.subdivision_steps = 3  # the default: refined to 14 * 8 = 112 per side
        refined = pointrend(images)
    assert sum(len(d["boxes"]) for d in expected) > 0  # not vacuous
    for a, b, c in zip(expected, same, refined):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["mask_probs"], b["mask_probs"])
        assert c["masks"].dtype == torch.bool and c["mask_probs"].shape == c["masks"].shape
    sizes = [(64, 80), (70, 64)]
    for out in (same, refined):
        assert len(out) == 2
        for det, (h, w) in zip(out, sizes):
            n = det["boxes"].shape[0]
            assert det["boxes"].shape == (n, 4) and det["labels"].dtype == torch.int64
            assert det["scores"].shape == (n,) and det["masks"].shape == (n, h, w)
            assert det["masks"].dtype == torch.bool
    # subdivision: each step upsamples the logits of the predicted class x2 and re-predicts its most uncertain cells
    head = pointrend.roi_heads.point_head
    features = {"0": torch.randn(1, 256, 16, 20)}
    coarse = torch.randn(2, 3, 14, 14)
    boxes, labels = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 30.0, 20.0]])], torch.tensor([1, 2])
    up = F.interpolate(coarse[[0, 1], [1, 2]][:, None], scale_factor=2, mode="bilinear", align_corners=False)
    for steps, num_points, side in ((1, 100, 28), (2, 100, 56), (2, 4 * 28 * 28, 56)):
        head.subdivision_steps, head.subdivision_num_points = steps, num_points
        with torch.no_grad():
            fine = head.subdivide(features, coarse, boxes, labels, [(64, 80)])
        assert fine.shape == (2, 1, side, side) and fine.dtype == torch.float32
        if steps == 1:  # exactly the 100 most uncertain cells of the upsampled coarse logits changed
            changed = (fine != up).flatten(1)
            assert changed.sum(1).tolist() == [100, 100]
            top = (-up.abs()).flatten(1).topk(100).indices
            assert torch.equal(changed.nonzero()[:, 1].reshape(2, 100), top.sort(1).values)
        if num_points == 4 * 28 * 28:  # step 1 is skipped: step 2 re-predicts all 56 x 56 cells
            assert not (fine == F.interpolate(up, scale_factor=2, mode="bilinear")).any()
    # bfloat16 autocast eval: float32 refinement, bool masks
    head.subdivision_steps, head.subdivision_num_points = 1, 28 * 28
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (det,) = pointrend([images[0]])
    assert det["masks"].dtype == torch.bool and det["mask_probs"].dtype == torch.float32
    pointrend.roi_heads.score_thresh = 1.0  # no detections: empty, well-shaped output
    with torch.no_grad():
        (empty,) = pointrend([images[1]])
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 70, 64)


def test_state_dict_keys_unchanged_without_the_option():
    standard, pointrend = _pair()
    torch.manual_seed(0)
    explicit = mask_rcnn("resnet18", num_classes=3, mask_head="standard", **SMALL)
    keys = list(standard.state_dict())
    assert list(explicit.state_dict()) == keys
    assert standard.roi_heads.point_head is None and not any("point_head" in k for k in keys)
    # PointRend appends its head after torchvision's modules, whose initial values stay the same for a seed
    assert list(pointrend.state_dict()) == keys + POINT_KEYS
    state = pointrend.state_dict()
    assert all(torch.equal(state[k], v) for k, v in standard.state_dict().items())
    c = 256 + 3  # fine-grained features + the coarse logits of 3 classes, re-fed to every layer
    assert count_parameters(pointrend) - count_parameters(standard) == 3 * (c * 256 + 256) + c * 3 + 3
    # torchvision key compatibility of the default model
    ours = mask_rcnn_resnet50_fpn(num_classes=3)
    reference = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert list(ours.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"mask_head": "point_rend"}, "mask_head must be 'standard' or 'pointrend'"),
        ({"mask_head": "pointrend", "point_head_subdivision_steps": -1}, "point_head_subdivision_steps must be"),
        ({"mask_head": "pointrend", "point_head_subdivision_steps": 2.0}, "point_head_subdivision_steps must be"),
        ({"mask_head": "pointrend", "point_head_train_num_points": 0}, "point_head_train_num_points must be"),
        ({"mask_head": "pointrend", "point_head_subdivision_num_points": 0}, "point_head_subdivision_num_points"),
        ({"mask_head": "pointrend", "point_head_fc_dim": 2.5}, "point_head_fc_dim must be a positive int"),
        ({"mask_head": "pointrend", "point_head_num_fc": 0}, "point_head_num_fc must be a positive int"),
        ({"mask_head": "pointrend", "point_head_oversample_ratio": 0.5}, "point_head_oversample_ratio must be"),
        ({"mask_head": "pointrend", "point_head_importance_sample_ratio": 1.5}, "point_head_importance_sample_ratio"),
        ({"point_head_subdivision_steps": 5}, "point_head_subdivision_steps applies to mask_head='pointrend' only"),
        ({"loss_weights": {"loss_mask_point": 2.0}}, "loss_weights has unknown loss 'loss_mask_point'"),
    ],
)
def test_bad_pointrend_options_raise(opts, message):
    with pytest.raises(ValueError, match=message):
        mask_rcnn("resnet18", num_classes=3, **opts)
