"""Mask R-CNN on torchvision's detection framework with maskworks backbones: torchvision parity, training losses,
poolers, encoders, options."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.models.detection as tvd
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool

from maskworks.models.instance.mask_rcnn import (
    LOSS_NAMES,
    AlignedMultiScaleRoIAlign,
    MaskRCNN,
    MultiScaleRoIPool,
    _check_loss_weights,
    mask_rcnn,
    mask_rcnn_mobilenet_v3_large_fpn,
    mask_rcnn_resnet50_fpn,
    mask_rcnn_resnet50_fpn_v2,
    paste_masks_bool,
)
from maskworks.ops.roi import fpn_level
from maskworks.registry import create_model, model_entry
from maskworks.testing import TINY_MASK_RCNN, count_parameters, randomize_norms
from maskworks.testing import rectangle_instances as _targets

TV_MEAN, TV_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# small images and few RoIs keep every test fast on 2 CPU cores
SMALL = TINY_MASK_RCNN
FEW_ROIS = {k: v for k, v in SMALL.items() if k not in ("min_size", "max_size", "mask_resolution")}


def _train_losses(model: MaskRCNN, seed: int = 0) -> dict[str, torch.Tensor]:
    """Losses of one batch holding an image with two instances and one with none (same sampling for a seed)."""
    torch.manual_seed(123)
    k, c = model.num_classes, model.in_channels
    batch = [_targets(k, instances=2, channels=c), _targets(k, size=(72, 64), instances=0, channels=c)]
    torch.manual_seed(seed)
    model.train()
    return model([b[0] for b in batch], [b[1] for b in batch])


def _check_eval_output(out: list[dict], sizes: list[tuple[int, int]], num_classes: int) -> None:
    assert len(out) == len(sizes)
    for det, (h, w) in zip(out, sizes):
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (n,)
        assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.bool
        assert ((det["labels"] >= 1) & (det["labels"] < num_classes)).all()


# --------------------------------------------------------------------------- torchvision parity
@pytest.mark.parametrize(
    ("ours", "reference"),
    [(mask_rcnn_resnet50_fpn, tvd.maskrcnn_resnet50_fpn), (mask_rcnn_resnet50_fpn_v2, tvd.maskrcnn_resnet50_fpn_v2)],
    ids=["v1", "v2"],
)
def test_parity_with_torchvision(ours, reference):
    torch.manual_seed(0)
    opts = {"min_size": 96, "max_size": 128, "box_score_thresh": 0.0, **FEW_ROIS}
    tv = reference(weights=None, weights_backbone=None, num_classes=3, **opts)
    randomize_norms(tv, seed=1)  # eval mode, non-trivial BatchNorm statistics
    model = ours(num_classes=3, image_mean=TV_MEAN, image_std=TV_STD, return_mask_probs=True, **opts).eval()
    assert list(model.state_dict()) == list(tv.state_dict())
    model.load_state_dict(tv.state_dict(), strict=True)
    x = torch.rand(3, 100, 120)
    with torch.no_grad():
        expected = tv([x])[0]
        got = model([x])[0]
    assert len(expected["boxes"]) > 0  # the comparison is not vacuous
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-5, rtol=0)
    assert torch.equal(got["labels"], expected["labels"])
    assert torch.equal(got["masks"], expected["masks"][:, 0] > 0.5)
    torch.testing.assert_close(got["mask_probs"], expected["masks"][:, 0], atol=1e-5, rtol=0)
    _check_eval_output([got], [(100, 120)], 3)
    model.return_mask_probs = False  # the default path pastes bool masks directly: the same pixels
    with torch.no_grad():
        plain = model([x])[0]
    assert "mask_probs" not in plain and torch.equal(plain["masks"], expected["masks"][:, 0] > 0.5)


def test_bool_paste_equals_torchvision_paste_then_threshold():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 1, 28, 28, generator=g)
    xy = torch.rand(40, 2, generator=g) * 130 - 10
    wh = torch.rand(40, 2, generator=g) * 60
    wh[:5] = torch.rand(5, 2, generator=g) * 0.8  # sub-pixel boxes
    # detections are clipped to the image, as torchvision's RoI heads do; grown by the padding, they cross its edges
    boxes = torch.cat([xy, xy + wh], 1).clamp(min=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=120)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=90)
    got = paste_masks_bool(masks, boxes, (90, 120))
    expected = paste_masks_in_image(masks, boxes, (90, 120))[:, 0] > 0.5
    assert got.dtype == torch.bool and got.shape == (40, 90, 120)
    assert torch.equal(got, expected) and got.any()
    assert paste_masks_bool(masks[:0], boxes[:0], (9, 7)).shape == (0, 9, 7)


def test_parameter_counts_equal_torchvision():
    assert count_parameters(mask_rcnn_resnet50_fpn()) == 44_454_513  # torchvision, weights=None, 91 classes
    assert count_parameters(mask_rcnn_resnet50_fpn_v2()) == 46_359_409


def test_registry_task_and_generic_resnet50_is_the_named_model():
    for name in (
        "mask_rcnn",
        "mask_rcnn_resnet50_fpn",
        "mask_rcnn_resnet50_fpn_v2",
        "mask_rcnn_mobilenet_v3_large_fpn",
    ):
        assert model_entry(name).task == "instance"
    model = create_model("mask_rcnn", encoder="resnet50", num_classes=5, **SMALL)
    named = create_model("mask_rcnn_resnet50_fpn", num_classes=5)
    assert isinstance(model, MaskRCNN)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}
    assert model.transform.min_size == (64,) and model.transform.max_size == 96


# --------------------------------------------------------------------------- training
def test_training_losses_weighted_with_empty_image():
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=3, **SMALL)
    base = _train_losses(model)
    assert set(base) == set(LOSS_NAMES)
    assert all(torch.isfinite(v) and v.requires_grad for v in base.values())
    weights = {"loss_mask": 2.0, "loss_objectness": 0.0}
    model.loss_weights = _check_loss_weights(weights)
    weighted = _train_losses(model)
    for name in LOSS_NAMES:
        assert torch.equal(weighted[name], base[name] * weights.get(name, 1.0)), name
    sum(weighted.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5]) and all(torch.isfinite(g).all() for g in grads if g is not None)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    # built with the option, the same weights apply
    built = mask_rcnn("resnet18", num_classes=3, loss_weights=weights, **SMALL)
    assert built.loss_weights == model.loss_weights


def test_roi_pool_trains_and_evaluates_on_grayscale():
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=2, in_channels=1, pooler="roi_pool", box_resolution=5, **SMALL)
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIPool)
    assert isinstance(model.roi_heads.mask_roi_pool, MultiScaleRoIPool)
    assert model.transform.image_mean == [0.0] and model.transform.image_std == [1.0]
    losses = _train_losses(model)
    assert set(losses) == set(LOSS_NAMES)
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 80))  # a batched 4D tensor
        logits = model.roi_heads.mask_predictor(torch.zeros(1, 256, 7, 7))
    assert logits.shape == (1, 2, 14, 14)  # mask_resolution 7 -> 14x14 mask logits
    _check_eval_output(out, [(64, 80)] * 2, 2)
    # under bfloat16 autocast (maskworks train's default on CPUs with AMX) RoIPool pools in float32
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _train_losses(model)
    assert all(torch.isfinite(v) for v in losses.values())
    feature = torch.randn(1, 8, 16, 16).to(torch.bfloat16)
    rois = [torch.tensor([[1.0, 2.0, 30.0, 40.0]])]
    pooler = model.roi_heads.box_roi_pool
    pooled = pooler({"0": feature}, rois, [(64, 64)])
    expected = pooler({"0": feature.float()}, rois, [(64, 64)])
    assert pooled.dtype == torch.bfloat16 and torch.equal(pooled.float(), expected)


def test_box_arithmetic_stays_float32_under_autocast():
    """torchvision decodes boxes in the deltas' dtype; in bfloat16 a 256 px box has 1 px resolution and proposals
    collapse to zero width (NaN box losses): the box heads' outputs are float32 under autocast."""
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=3, **SMALL)
    features = {k: torch.randn(1, 256, 8, 8) for k in ("0", "1")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, deltas = model.rpn.head(list(features.values()))
        scores, box_deltas = model.roi_heads.box_predictor(torch.randn(4, 1024))
        losses = _train_losses(model)
    assert all(t.dtype == torch.float32 for t in [*logits, *deltas, scores, box_deltas])
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (det,) = model([torch.randn(3, 64, 80)])
    assert det["boxes"].dtype == torch.float32 and det["masks"].dtype == torch.bool


def test_aligned_roi_align_evaluates():
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=3, aligned=True, sampling_ratio=0, **SMALL).eval()
    assert isinstance(model.roi_heads.mask_roi_pool, AlignedMultiScaleRoIAlign)
    with torch.no_grad():
        out = model([torch.randn(3, 64, 80), torch.randn(3, 70, 64)])
    _check_eval_output(out, [(64, 80), (70, 64)], 3)


def test_multiscale_roi_pool_matches_per_level_ops():
    torch.manual_seed(0)
    feats = {str(i): torch.randn(2, 4, 64 >> i, 48 >> i) for i in range(4)}
    image_shapes = [(256, 192)]
    boxes = [
        torch.tensor([[3.3, 5.1, 30.7, 41.2], [10.0, 12.0, 200.0, 180.0]]),
        torch.tensor([[0.5, 1.5, 90.2, 120.9]]),
    ]
    pooled = MultiScaleRoIPool(list(feats), 5)(feats, boxes, image_shapes)
    levels = fpn_level(boxes)  # index from P2, FPN eq. 1
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    for k, level in enumerate(levels.tolist()):
        expected = roi_pool(feats[str(level)], rois[k : k + 1], 5, spatial_scale=1 / 4 / 2**level)
        assert torch.equal(pooled[k : k + 1], expected)
    aligned = AlignedMultiScaleRoIAlign(list(feats), 5, 2)(feats, boxes, image_shapes)
    for k, level in enumerate(levels.tolist()):
        expected = roi_align(feats[str(level)], rois[k : k + 1], 5, 1 / 4 / 2**level, 2, aligned=True)
        torch.testing.assert_close(aligned[k : k + 1], expected, atol=0, rtol=0)

    class Unaligned(AlignedMultiScaleRoIAlign):  # the shared level loop reproduces MultiScaleRoIAlign exactly
        def _pool(self, feature, rois, scale):
            return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio)

    reference = MultiScaleRoIAlign(list(feats), 5, 2)(feats, boxes, image_shapes)
    assert torch.equal(Unaligned(list(feats), 5, 2)(feats, boxes, image_shapes), reference)


# --------------------------------------------------------------------------- encoders
def test_transformer_encoder_train_and_eval():
    """A hierarchical transformer (SegFormer's MiT-B0) under ``backbone.body.encoder``; ConvNeXt / Swin likewise."""
    encoder = "mit_b0"
    torch.manual_seed(0)
    model = mask_rcnn(encoder, num_classes=3, **SMALL)
    assert list(model.backbone.body(torch.randn(1, 3, 64, 64))) == ["0", "1", "2", "3"]
    losses = _train_losses(model)
    assert set(losses) == set(LOSS_NAMES)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([torch.randn(3, 64, 80)])
    _check_eval_output(out, [(64, 80)], 3)


def test_plain_vit_encoder_refused():
    with pytest.raises(ValueError, match="reductions 4, 8, 16 and 32"):
        mask_rcnn("vit_test_patch16", num_classes=3)


# --------------------------------------------------------------------------- MobileNetV3
def test_mobilenet_matches_torchvision_faster_rcnn_and_trains():
    torch.manual_seed(0)
    opts = {"min_size": 96, "max_size": 128, "box_score_thresh": 0.0, **FEW_ROIS}
    tv = tvd.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3, **opts)
    randomize_norms(tv, seed=2)
    model = mask_rcnn_mobilenet_v3_large_fpn(
        num_classes=3, image_mean=TV_MEAN, image_std=TV_STD, mask_resolution=7, **opts
    ).eval()
    result = model.load_state_dict(tv.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("roi_heads.mask_") for k in result.missing_keys)
    assert model.rpn.score_thresh == 0.05 and model.transform.min_size == (96,)
    default = mask_rcnn_mobilenet_v3_large_fpn()  # the 320 recipe
    assert default.rpn._pre_nms_top_n["testing"] == 150 and default.transform.max_size == 640
    x = torch.rand(3, 120, 150)
    with torch.no_grad():
        expected, got = tv([x])[0], model([x])[0]
    assert len(expected["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-5, rtol=0)
    assert torch.equal(got["labels"], expected["labels"])
    _check_eval_output([got], [(120, 150)], 3)
    losses = _train_losses(model)
    assert set(losses) == set(LOSS_NAMES)
    sum(losses.values()).backward()


# --------------------------------------------------------------------------- grayscale, empty output
def test_no_detections_and_wrong_channels():
    torch.manual_seed(0)
    model = mask_rcnn("resnet18", num_classes=2, in_channels=1, **SMALL).eval()
    model.roi_heads.score_thresh = 1.0  # nothing passes: empty but well-shaped output
    with torch.no_grad():
        empty = model([torch.randn(1, 50, 70)])[0]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 50, 70)
    assert empty["labels"].dtype == torch.int64 and empty["masks"].dtype == torch.bool
    with pytest.raises(ValueError, match=r"images\[0\] must be a \(1, H, W\) tensor"):
        model([torch.randn(3, 64, 64)])


# --------------------------------------------------------------------------- option errors
@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"min_size": 0}, "min_size must be a positive int"),
        ({"min_size": 800, "max_size": 500}, "max_size must be >= min_size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be None or 3 numbers"),
        ({"image_std": [1.0, 0.0, 1.0]}, "image_std must be positive"),
        ({"rpn_post_nms_top_n_test": 0}, "rpn_post_nms_top_n_test must be a positive int"),
        ({"box_detections_per_img": 1.5}, "box_detections_per_img must be a positive int"),
        ({"box_score_thresh": 1.5}, r"box_score_thresh must be a number in \[0, 1\]"),
        ({"mask_resolution": -2}, "mask_resolution must be a positive int"),
        ({"pooler": "roi_warp"}, "pooler must be 'roi_align' or 'roi_pool'"),
        ({"sampling_ratio": 2.0}, "sampling_ratio must be an int"),
        ({"pooler": "roi_pool", "aligned": True}, "aligned=True applies to pooler='roi_align' only"),
        ({"loss_weights": {"loss_cls": 1.0}}, "loss_weights has unknown loss 'loss_cls'"),
        ({"loss_weights": {"loss_mask": -1.0}}, r"loss_weights\['loss_mask'\] must be a finite number >= 0"),
    ],
)
def test_bad_options_raise(opts, message):
    with pytest.raises(ValueError, match=message):
        mask_rcnn("resnet18", **{"num_classes": 3, **opts})


def test_unknown_option_and_bad_images():
    with pytest.raises(TypeError, match="'mask_resolutoin' \\(did you mean 'mask_resolution'\\?\\)"):
        mask_rcnn("resnet18", num_classes=3, mask_resolutoin=7)
    model = mask_rcnn("resnet18", num_classes=3, **SMALL).eval()
    with pytest.raises(ValueError, match="images must be a list of"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize("method", ["hard", "soft_linear", "soft_gaussian"])
def test_soft_nms_option_decays_overlapping_detections(method):
    """Two same-class proposals overlapping at IoU 0.6 (no box regression): hard NMS keeps one, Soft-NMS keeps both
    with the second score decayed by its formula; a third, far box is untouched."""
    model = mask_rcnn("resnet18", num_classes=3, box_nms=method, soft_nms_sigma=0.5, **SMALL).eval()
    proposals = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 10.0, 40.0, 50.0], [50.0, 50.0, 60.0, 60.0]])]
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.3, 0.0, 0.7]])
    logits = probs.clamp(min=1e-9).log()
    boxes, scores, labels = model.roi_heads.postprocess_detections(logits, torch.zeros(3, 12), proposals, [(64, 64)])
    iou = 30 * 40 / (40 * 50)  # 0.6
    expected = {
        "hard": [0.9, 0.7],
        "soft_linear": [0.9, 0.7, 0.8 * (1 - iou)],
        "soft_gaussian": [0.9, 0.7, 0.8 * math.exp(-(iou**2) / 0.5)],
    }[method]
    torch.testing.assert_close(scores[0], torch.tensor(expected), atol=1e-5, rtol=0)
    assert len(boxes[0]) == len(expected) and set(labels[0].tolist()) == {1, 2}
    with pytest.raises(ValueError, match="box_nms must be"):
        mask_rcnn("resnet18", num_classes=3, box_nms="soft")
