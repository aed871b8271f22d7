"""YOLACT: mmdetection's parameter count, mask assembly and crop (in prototype coordinates), anchors and matching,
OHEM, training losses, the eval output contract, options, and (slow) learning on synthetic shapes."""

from __future__ import annotations

import math
import time

import pytest
import torch

from maskworks.models.instance.yolact import (
    LOSS_NAMES,
    YOLACT,
    _top_k_per_class,
    assemble_masks,
    crop_masks,
    decode_boxes,
    encode_boxes,
    grid_anchors,
    hard_negative_mask,
    match_anchors,
    yolact,
    yolact_resnet50_fpn,
)
from maskworks.registry import create_model, model_entry
from maskworks.testing import count_parameters, rectangle_instances

# a test-size configuration: ResNet-18, narrow neck and heads, few prototypes
TINY = {"fpn_channels": 32, "num_protos": 8, "max_detections": 10}


def _tiny(num_classes: int = 3, **opts) -> YOLACT:
    torch.manual_seed(0)
    return yolact(encoder="resnet18", num_classes=num_classes, **{**TINY, **opts})


def _sample(num_classes: int = 3, size: tuple[int, int] = (64, 80), instances: int = 2):
    """One image with ``instances`` filled 26 x 30 rectangles (boxes, labels, masks)."""
    return rectangle_instances(num_classes, size, instances, box_size=(26, 30))


# --------------------------------------------------------------------------- architecture
def test_parameter_count_equals_mmdetection():
    """mmdetection 3.3.0's yolact_r50_1xb8-55e_coco (num_classes=80) has 35,293,711 parameters: ResNet-50
    23,508,032 + FPN 7,997,440 + head 1,399,135 + protonet 2,368,544 + semantic head 20,560."""
    with torch.device("meta"):
        model = yolact_resnet50_fpn(num_classes=81)
    assert count_parameters(model) == 35_293_711
    assert count_parameters(model.backbone) == 23_508_032
    assert count_parameters(model.neck) == 7_997_440
    assert count_parameters(model.bbox_head) == 1_399_135
    assert count_parameters(model.mask_head) == 2_368_544
    assert count_parameters(model.segm_head) == 20_560
    assert [i for i, m in enumerate(model.mask_head.protonet) if isinstance(m, torch.nn.Conv2d)] == [0, 2, 4, 8, 10]


def test_registry():
    assert model_entry("yolact").task == "instance" and model_entry("yolact_resnet50_fpn").task == "instance"
    with torch.device("meta"):
        model = create_model("yolact", encoder="resnet18", num_classes=5, in_channels=1)
    assert isinstance(model, YOLACT) and model.bbox_head.conv_cls.out_channels == 3 * 5
    assert model.segm_head.segm_conv.out_channels == 4


def test_pyramid_shapes():
    model = _tiny().eval()
    x = torch.randn(1, 3, 96, 64)
    maps = model.backbone.forward_intermediates(x)
    pyramid = model.neck([maps[i] for i in model.feature_indices])
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)]
    assert tuple(model.mask_head(pyramid[0]).shape) == (1, 8, 24, 16)  # prototypes at 1/4


# --------------------------------------------------------------------------- masks
def test_assemble_and_crop_equal_a_per_instance_loop():
    torch.manual_seed(0)
    k, h, w, n = 5, 9, 11, 4
    protos = torch.rand(k, h, w)
    coeffs = torch.rand(n, k) * 2 - 1
    boxes = torch.tensor([[1.0, 2.0, 6.5, 7.0], [0.0, 0.0, 11.0, 9.0], [8.2, 3.7, 10.1, 4.2], [5.0, 5.0, 5.0, 5.0]])
    for padding in (0, 1):
        fast = crop_masks(assemble_masks(protos, coeffs).sigmoid(), boxes, padding)
        loop = torch.zeros(n, h, w)
        for i in range(n):
            m = sum(coeffs[i, j] * protos[j] for j in range(k)).sigmoid()
            x1, y1, x2, y2 = boxes[i].tolist()
            for r in range(h):
                for c in range(w):
                    if x1 - padding <= c < x2 + padding and y1 - padding <= r < y2 + padding:
                        loop[i, r, c] = m[r, c]
        torch.testing.assert_close(fast, loop, atol=1e-6, rtol=0)
        assert ((fast > 0) & (fast < 1)).any() and (fast >= 0).all() and (fast < 1).all()


@pytest.mark.parametrize("image_size", [(64, 64), (50, 61)])
def test_masks_are_cropped_in_prototype_coordinates(image_size):
    """A box of input pixels (16, 8, 32, 24) covers prototype cells 4..7 x 2..5 (stride 4): the pasted mask of a
    prototype that is 1 everywhere is exactly that box at the input size (not the box read as prototype cells,
    which would cover the lower-right part of the prototypes or nothing). Bilinear upsampling rounds the box's
    corner pixels off, so the mask is checked inside the box and along the lines through its centre."""
    model = _tiny(crop_padding=0).eval()
    protos = torch.full((1, 16, 16), 20.0)  # sigmoid ~ 1 everywhere
    probs = model._paste_masks(protos, torch.ones(1, 1), torch.tensor([[16.0, 8.0, 32.0, 24.0]]), image_size, (64, 64))
    expected = torch.zeros(image_size, dtype=torch.bool)
    expected[8:24, 16:32] = True
    assert probs.shape == (1, *image_size)
    _check_box_mask(probs[0] > 0.5, expected)
    # one cell of padding (the default) grows the kept region by 4 px on every side
    probs = (
        _tiny()
        .eval()
        ._paste_masks(protos, torch.ones(1, 1), torch.tensor([[16.0, 8.0, 32.0, 24.0]]), image_size, (64, 64))
    )
    expected = torch.zeros(image_size, dtype=torch.bool)
    expected[4:28, 12:36] = True
    _check_box_mask(probs[0] > 0.5, expected)


def _check_box_mask(mask: torch.Tensor, box: torch.Tensor) -> None:
    """``mask`` lies inside ``box`` (both bool) and equals it along row 16 and column 24 (inside every box here)."""
    assert not (mask & ~box).any()
    assert torch.equal(mask[16], box[16]) and torch.equal(mask[:, 24], box[:, 24])
    assert int(mask.sum()) >= int(box.sum()) - 4


# --------------------------------------------------------------------------- anchors, boxes, matching, OHEM
def test_anchors_follow_mmdetection_at_550():
    """mmdetection's config: strides 550 / [69, 35, 18, 9, 5], centres at half a stride, side 3 * base size."""
    sizes = [(69, 69), (35, 35), (18, 18), (9, 9), (5, 5)]
    anchors = grid_anchors(sizes, (550, 550), (8, 16, 32, 64, 128), 3.0, (0.5, 1.0, 2.0))
    assert [a.shape[0] for a in anchors] == [s[0] * s[1] * 3 for s in sizes]
    stride = 550 / 69
    c = stride / 2
    r = math.sqrt(2.0)
    expected = [[c - 12 * r, c - 12 / r, c + 12 * r, c + 12 / r], [c - 12, c - 12, c + 12, c + 12]]
    torch.testing.assert_close(anchors[0][:2], torch.tensor(expected))
    torch.testing.assert_close(anchors[0][3, 1::2], anchors[0][0, 1::2])  # next column: same rows
    torch.testing.assert_close(anchors[0][3, ::2], anchors[0][0, ::2] + stride)
    torch.testing.assert_close(anchors[4][-2], torch.tensor([303.0, 303, 687, 687]))  # centre 4.5 * 110, side 384


def test_box_coding_round_trip():
    torch.manual_seed(0)
    anchors = torch.tensor([[10.0, 10, 40, 30], [0, 0, 24, 24], [5, 50, 100, 80]])
    boxes = torch.tensor([[12.0, 8, 44, 35], [3, 1, 20, 30], [0, 40, 90, 99]])
    deltas = encode_boxes(anchors, boxes)
    torch.testing.assert_close(decode_boxes(anchors, deltas), boxes)
    assert torch.allclose(deltas[0, 2], torch.tensor(math.log(32 / 30) / 0.2))
    clipped = decode_boxes(anchors, deltas, image_size=(60, 70))
    assert clipped[:, 0::2].max() <= 70 and clipped[:, 1::2].max() <= 60 and clipped.min() >= 0


def test_match_anchors():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 20, 20], [50, 50, 60, 60], [30, 30, 41, 41]])
    gt = torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40]])
    matched, pos, neg = match_anchors(anchors, gt, 0.5, 0.4)
    # anchor 1: IoU 10/12 -> positive; anchor 2: IoU 0.25 -> negative; anchor 4: IoU 100/121 -> positive
    assert pos.tolist() == [True, True, False, False, True]
    assert neg.tolist() == [False, False, True, True, False]
    assert matched[pos].tolist() == [0, 0, 1]
    # a GT box no anchor overlaps by 0.5 still takes its best anchor
    matched, pos, neg = match_anchors(anchors, torch.tensor([[0.0, 0, 20, 14]]), 0.5, 0.4)
    assert pos.tolist() == [False, False, True, False, False] and not neg[2]
    matched, pos, neg = match_anchors(anchors, torch.zeros(0, 4), 0.5, 0.4)
    assert not pos.any() and neg.all()


def test_ohem_keeps_three_negatives_per_positive():
    torch.manual_seed(0)
    loss = torch.rand(200)
    pos = torch.zeros(200, dtype=torch.bool)
    pos[[3, 50, 77, 120, 199]] = True
    neg = ~pos
    neg[10:20] = False  # ignored anchors
    keep = hard_negative_mask(loss, pos, neg, 3)
    assert int(keep.sum()) == 15 and not (keep & ~neg).any()
    assert loss[keep].min() >= loss[neg & ~keep].max()  # the hardest negatives
    assert int(hard_negative_mask(loss, torch.zeros_like(pos), neg, 3).sum()) == 3  # no positive: 3 x 1
    few = torch.zeros_like(neg)
    few[:4] = True
    assert torch.equal(hard_negative_mask(loss, pos, few, 3), few)  # fewer negatives than wanted: all


# --------------------------------------------------------------------------- training and eval
def test_training_losses_and_gradients():
    torch.manual_seed(1)
    model = _tiny().train()
    batch = [_sample(instances=2), _sample(size=(72, 64), instances=0)]
    losses = model([b[0] for b in batch], [b[1] for b in batch])
    assert set(losses) == set(LOSS_NAMES)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert all(float(v.detach()) > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.mask_head.protonet[10].weight.grad.abs().sum() > 0
    assert model.bbox_head.conv_coeff.weight.grad.abs().sum() > 0


def test_training_without_any_instance():
    model = _tiny().train()
    image, target = _sample(instances=0)
    losses = model([image], [target])
    assert float(losses["loss_bbox"]) == 0 and float(losses["loss_mask"]) == 0
    assert float(losses["loss_cls"]) > 0 and float(losses["loss_segm"]) > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_weights_scale_the_losses():
    image, target = _sample()
    torch.manual_seed(0)
    base = _tiny().train()([image], [target])
    torch.manual_seed(0)
    weighted = _tiny(loss_weights={"loss_mask": 1.0, "loss_cls": 2.0}).train()([image], [target])
    torch.testing.assert_close(weighted["loss_mask"], base["loss_mask"] / 6.125)
    torch.testing.assert_close(weighted["loss_cls"], base["loss_cls"] * 2)
    torch.testing.assert_close(weighted["loss_bbox"], base["loss_bbox"])


def test_eval_output_contract():
    model = _tiny(num_classes=4, return_mask_probs=True).eval()
    sizes = [(64, 80), (50, 37), (96, 64)]
    with torch.no_grad():
        out = model([torch.randn(3, h, w) for h, w in sizes])
    assert len(out) == 3
    for det, (h, w) in zip(out, sizes):
        n = det["boxes"].shape[0]
        assert 0 < n <= 10  # random weights: softmax over 4 classes passes the 0.05 threshold
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (n,) and (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.bool
        assert det["mask_probs"].shape == (n, h, w)
        assert torch.equal(det["masks"], det["mask_probs"] > 0.5)
        assert ((det["labels"] >= 1) & (det["labels"] < 4)).all()
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
    # a batch tensor works like a list, and a high threshold leaves empty, well-formed results
    model.options["score_thresh"] = 1.0
    with torch.no_grad():
        empty = model(torch.randn(2, 3, 40, 40))
    assert all(d["masks"].shape == (0, 40, 40) and d["boxes"].shape == (0, 4) for d in empty)


def test_top_k_per_class_by_hand():
    scores = torch.tensor([0.9, 0.2, 0.8, 0.7, 0.6, 0.5, 0.95])
    labels = torch.tensor([1, 1, 2, 1, 2, 2, 3])
    # class 1: 0.9 (0), 0.7 (3), 0.2 (1); class 2: 0.8 (2), 0.6 (4), 0.5 (5); class 3: 0.95 (6)
    assert _top_k_per_class(scores, labels, 2).tolist() == [6, 0, 2, 3, 4]
    assert _top_k_per_class(scores, labels, 10).tolist() == [6, 0, 2, 3, 4, 5, 1]


def test_soft_nms_option():
    """Soft-NMS decays instead of removing: its first detection is Fast NMS's first and its scores never exceed the
    candidates' own; with a Gaussian too wide to decay anything it keeps exactly what no suppression keeps (Fast NMS
    at IoU threshold 1)."""
    torch.manual_seed(1)
    images = [torch.randn(3, 64, 64)]
    model = _tiny(num_classes=3, max_detections=1000, score_thresh=0.3).eval()
    with torch.no_grad():
        hard = model(images)[0]
        model.options["nms_iou"] = 1.0
        everything = model(images)[0]
        model.options["box_nms"], model.options["soft_nms_sigma"] = "soft_gaussian", 1e9
        undecayed = model(images)[0]
    assert hard["boxes"].shape[0] < everything["boxes"].shape[0]
    assert torch.equal(undecayed["boxes"], everything["boxes"]) and torch.equal(
        undecayed["scores"], everything["scores"]
    )
    model.options["nms_iou"] = 0.5
    for method in ("soft_linear", "soft_gaussian"):
        model.options["box_nms"], model.options["soft_nms_sigma"] = method, 0.5
        with torch.no_grad():
            soft = model(images)[0]
        assert torch.equal(soft["boxes"][0], hard["boxes"][0]) and soft["scores"][0] == hard["scores"][0]
        assert (soft["scores"][:-1] >= soft["scores"][1:]).all() and (soft["scores"] >= 0.3).all()
        assert soft["masks"].shape == (soft["boxes"].shape[0], 64, 64)
        # every detection is a candidate box whose score only went down
        match = (soft["boxes"][:, None] == everything["boxes"][None]).all(-1)
        assert match.any(1).all()
        assert (soft["scores"] <= (match * everything["scores"][None]).max(1).values + 1e-7).all()
    with pytest.raises(ValueError, match="box_nms"):
        yolact(encoder="resnet18", box_nms="soft")
    with pytest.raises(ValueError, match="soft_nms_sigma"):
        yolact(encoder="resnet18", soft_nms_sigma=0)


def test_extra_pyramid_levels_run_in_float32_under_autocast():
    """P6 / P7 are computed in float32 under bf16 autocast (CPU bf16 convolutions on 1 x 1 maps now and then
    give non-finite weight gradients); P3-P5 follow autocast."""
    model = _tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model.backbone.forward_intermediates(torch.randn(2, 3, 64, 64))
        pyramid = model.neck([maps[i] for i in model.feature_indices])
    assert [p.dtype for p in pyramid] == [torch.bfloat16] * 3 + [torch.float32] * 2
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]


def test_options_are_validated():
    with pytest.raises(TypeError, match="score_thres"):
        yolact(encoder="resnet18", score_thres=0.1)
    with pytest.raises(ValueError, match="nms_iou"):
        yolact(encoder="resnet18", nms_iou=1.5)
    with pytest.raises(ValueError, match="neg_iou_thresh"):
        yolact(encoder="resnet18", neg_iou_thresh=0.6)
    with pytest.raises(ValueError, match="num_classes"):
        yolact(encoder="resnet18", num_classes=1)
    with pytest.raises(ValueError, match="loss_weights"):
        yolact(encoder="resnet18", loss_weights={"loss_rpn": 1.0})
    model = _tiny().train()
    image, target = _sample(num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        model([image], [{**target, "labels": torch.tensor([0, 1])}])
    with pytest.raises(ValueError, match="targets"):
        model([image])


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.heavy
def test_yolact_learns_synthetic_shapes(tmp_path):
    """Learning through the trainer and the instance task, test-sized (64 px, one or two large shapes of one class,
    ResNet-18, 128-channel neck and heads, AdamW 2e-4, bf16 autocast where the CPU has it): mask AP50 >= 0.5
    (0.89 after 12 epochs on a 2-core machine, about 55 s)."""
    from maskworks.data import SyntheticShapes
    from maskworks.engine import Trainer
    from maskworks.tasks import InstanceTask

    kw = {"image_size": 64, "num_classes": 2, "max_shapes": 2, "radius_range": (0.2, 0.4)}
    train, val = SyntheticShapes(96, split="train", **kw), SyntheticShapes(16, split="val", **kw)
    torch.manual_seed(0)
    model = create_model("yolact", encoder="resnet18", num_classes=2, fpn_channels=128)
    trainer = Trainer(
        model, train, val, tmp_path, task=InstanceTask(), epochs=12, batch_size=4, optimizer="adamw", lr=2e-4,
        schedule="cosine", warmup_epochs=0.5, grad_clip=10.0, progress=False, amp="auto",
    )  # fmt: skip
    start = time.perf_counter()
    rows = trainer.fit()["history"]
    print(
        f"YOLACT learning: {time.perf_counter() - start:.0f} s, mask AP50 per epoch",
        [round(r["val_mask_ap50"], 3) for r in rows],
    )
    assert rows[-1]["val_mask_ap50"] >= 0.5, [round(r["val_mask_ap50"], 3) for r in rows]
