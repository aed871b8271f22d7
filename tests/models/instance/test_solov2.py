"""SOLOv2: mmdet's parameter count, the centre-sampling grid assignment, Dice and Matrix NMS by hand, training
losses and gradients, the eval output contract, encoders, options, and (slow) learning synthetic shapes."""

from __future__ import annotations

import math
import time

import pytest
import torch

from maskworks.models.instance.solo import (
    SOLOv2,
    _dice_per_mask,
    center_cells,
    solov2,
    solov2_predict_single,
    solov2_resnet50_fpn,
    solov2_targets,
)
from maskworks.registry import create_model, model_entry
from maskworks.testing import count_parameters

# a test-size configuration: the real modules with few channels and small grids
TINY = {
    "fpn_channels": 32,
    "feat_channels": 32,
    "stacked_convs": 2,
    "mask_feat_channels": 16,
    "mask_out_channels": 32,
    "num_groups": 8,
    "num_grids": (12, 10, 8, 6, 4),
}
# the learning test's head: narrower than mmdet's and with grids for 64 px images
LEARN = {
    "fpn_channels": 128,
    "feat_channels": 128,
    "stacked_convs": 2,
    "mask_feat_channels": 64,
    "mask_out_channels": 64,
    "num_grids": (12, 10, 8, 6, 4),
}
EPOCHS = 10
DEFAULT_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))


def _image_and_target(size=(64, 80), instances=2, num_classes=3, channels=3):
    h, w = size
    boxes, masks = [], []
    for i in range(instances):
        x1, y1 = 4 + 24 * i, 6 + 14 * i
        x2, y2 = x1 + 26, y1 + 30
        m = torch.zeros(h, w, dtype=torch.uint8)
        m[y1:y2, x1:x2] = 1
        boxes.append([float(x1), float(y1), float(x2), float(y2)])
        masks.append(m)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": (torch.arange(instances) % (num_classes - 1) + 1).to(torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8),
    }
    return torch.randn(channels, h, w), target


def _check_eval_output(out, sizes, num_classes):
    assert len(out) == len(sizes)
    for det, (h, w) in zip(out, sizes):
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (n,) and det["scores"].dtype == torch.float32
        assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.bool
        assert ((det["labels"] >= 1) & (det["labels"] < num_classes)).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


# --------------------------------------------------------------------------- architecture
def test_parameter_count_equals_mmdet_solov2_r50_fpn():
    """mmdet 3.3.0's solov2_r50_fpn_1x_coco with 80 classes: ResNet-50 23,508,032 + FPN 3,344,384 + head
    19,740,496 (kernel branch 8,270,848, category branch 8,261,632, conv_cls 368,720, conv_kernel 1,179,904, mask
    features 1,659,392)."""
    with torch.device("meta"):
        model = solov2_resnet50_fpn(num_classes=81)
    assert count_parameters(model) == 46_592_912
    head = model.mask_head
    assert count_parameters(head.mask_feature_head) == 1_659_392
    assert head.conv_cls.out_channels == 80 and head.conv_kernel.out_channels == 256
    assert head.kernel_convs[0].conv.in_channels == 258  # CoordConv on the kernel branch only
    assert head.cls_convs[0].conv.in_channels == 256
    assert head.mask_feature_head.convs_all_levels[3].conv0.conv.in_channels == 258  # coordinates at P5
    assert model_entry("solov2_resnet50_fpn").task == "instance" and model_entry("solov2").task == "instance"


# --------------------------------------------------------------------------- targets
def test_grid_assignment_follows_the_centre_sampling_rule():
    """Two objects in a 256 x 256 padded batch, the paper's rule worked out by hand (cell of y: floor(y S / 256);
    centre region: centre of mass +- 0.2 * half the box side; at most the 3x3 cells around the centre's cell)."""
    size = 256
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    # A: 10 x 20 rectangle, rows 20..29, cols 40..59; sqrt(w h) = sqrt(200) = 14.1: level 0 only (1..96)
    masks[0, 20:30, 40:60] = True
    # B: an L (120 x 40 bar + 40 x 60 foot), box (60, 100, 160, 220): sqrt(100 * 120) = 109.5: levels 1 and 2
    masks[1, 100:220, 60:100] = True
    masks[1, 180:220, 100:160] = True
    boxes = torch.tensor([[40.0, 20, 60, 30], [60, 100, 160, 220]])
    labels = torch.tensor([2, 1])
    levels = solov2_targets(boxes, labels, masks, (size, size), (40, 36, 24, 16, 12), DEFAULT_RANGES, 0.2)

    # A at S = 40: centre (24.5, 49.5), half sides (1, 2): rows floor(23.5 * 40/256) = 3 .. floor(25.5 * 40/256) = 3,
    # cols floor(47.5 * 40/256) = 7 .. floor(51.5 * 40/256) = 8; centre cell (3, 7): cells (3, 7), (3, 8)
    # B: centre of mass (172.83, 96.17) (box centre (160, 110)), half sides (12, 10)
    #   S = 36: centre cell (24, 13); region rows 22..25, cols 12..14; within 3x3: rows 23..25, cols 12..14
    #   S = 24: centre cell (16, 9); region rows 15..17, cols 8..9 (already within the 3x3)
    expected = {
        0: {(3, 7): (2, 0), (3, 8): (2, 0)},
        1: {(r, c): (1, 1) for r in range(23, 26) for c in range(12, 15)},
        2: {(r, c): (1, 1) for r in range(15, 18) for c in range(8, 10)},
        3: {},
        4: {},
    }
    for level, ((cell_labels, cell_objects), grid) in enumerate(zip(levels, (40, 36, 24, 16, 12))):
        assert cell_labels.shape == cell_objects.shape == (grid * grid,)
        got = {
            divmod(int(i), grid): (int(cell_labels[i]), int(cell_objects[i]))
            for i in torch.nonzero(cell_labels).flatten()
        }
        assert got == expected[level], level
        assert ((cell_labels > 0) == (cell_objects >= 0)).all()
    # the region as center_cells gives it: (top, bottom, left, right), inclusive
    assert center_cells((24.5, 49.5), (40, 20, 60, 30), 40, (256, 256)) == (3, 3, 7, 8)
    assert center_cells((24.5, 49.5), (0, 0, 250, 250), 40, (256, 256)) == (2, 4, 6, 8)  # a big box: 3x3 limit
    assert center_cells((1.0, 1.0), (0, 0, 250, 250), 40, (256, 256)) == (0, 1, 0, 1)  # clipped at the edge


def test_later_object_takes_a_shared_cell_and_empty_masks_are_skipped():
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 12:32, 12:32] = True  # nearly the same centre: shares cells with object 0
    boxes = torch.tensor([[10.0, 10, 30, 30], [12, 12, 32, 32], [0, 0, 20, 20]])  # object 2: empty mask
    (labels, objects), *_ = solov2_targets(
        boxes, torch.tensor([1, 2, 1]), masks, (64, 64), (8, 4, 4, 2, 2), DEFAULT_RANGES
    )
    assert set(objects[objects >= 0].tolist()) == {1} and set(labels[labels > 0].tolist()) == {2}


# --------------------------------------------------------------------------- losses
def test_dice_loss_by_hand():
    """SOLO's Dice ``1 - 2 sum(p q) / (sum p^2 + sum q^2 + 2e-3)`` per mask, no smoothing in the numerator."""
    ln3 = math.log(3.0)
    logits = torch.tensor([[[0.0, ln3], [-ln3, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # p = .5 .75 .25 .5 / all .5
    targets = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    # mask 0: sum pq = 1.25, sum p^2 = 1.125, sum q^2 = 2; mask 1: no overlap -> 1
    expected = torch.tensor([1 - 2 * 1.25 / (1.125 + 2 + 2e-3), 1.0])
    torch.testing.assert_close(_dice_per_mask(logits, targets), expected, atol=1e-6, rtol=0)


def _train_losses(model: SOLOv2):
    torch.manual_seed(0)
    images, targets = zip(_image_and_target(), _image_and_target(size=(72, 50), instances=0))
    model.train()
    return model(list(images), list(targets))


def test_training_losses_and_gradients_are_finite_with_and_without_instances():
    torch.manual_seed(0)
    model = solov2(encoder="resnet18", num_classes=3, **TINY)
    losses = _train_losses(model)
    assert set(losses) == {"loss_cls", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.mask_head.conv_kernel.weight.grad.abs().sum() > 0

    # a batch without any instance: focal loss on background cells only, zero mask loss, still a graph
    model.zero_grad()
    image, empty = _image_and_target(instances=0)
    losses = model([image], [empty])
    assert losses["loss_mask"] == 0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_weights_scale_the_losses():
    torch.manual_seed(0)
    model = solov2(encoder="resnet18", num_classes=3, **TINY)
    base = _train_losses(model)
    model.loss_weights = {"loss_cls": 2.0, "loss_mask": 1.5}  # the default is (1, 3)
    scaled = _train_losses(model)
    torch.testing.assert_close(scaled["loss_cls"], 2 * base["loss_cls"])
    torch.testing.assert_close(scaled["loss_mask"], 0.5 * base["loss_mask"])


# --------------------------------------------------------------------------- inference
def test_inference_mask_scoring_and_matrix_nms_by_hand():
    """Three (cell, class) hits with the same mask: two of class 0, one of class 1. Mask scoring multiplies every
    score by the mean probability inside the mask (sigmoid(10)); Matrix NMS decays the lower class-0 score by
    exp(-sigma (IoU^2 - compensate^2)) = exp(-2) (IoU 1 with the best one, which nothing overlaps), and leaves the
    class-1 one alone."""
    grids, e = (4, 4, 4, 4, 4), 2
    logits = [torch.full((2, s, s), -10.0) for s in grids]
    kernels = [torch.zeros(e, s, s) for s in grids]
    for level, cls, p in ((0, 0, 0.9), (1, 0, 0.6), (2, 1, 0.5)):
        logits[level][cls, 1, 2] = math.log(p / (1 - p))
        kernels[level][:, 1, 2] = torch.tensor([1.0, 0.0])
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[2:7, 3:11] = True  # 40 cells at 1/4 resolution > stride 16
    mask_feats = torch.stack([torch.where(region, 10.0, -10.0), torch.randn(16, 16)])
    options = {
        "strides": (8, 8, 16, 32, 32),
        "score_thresh": 0.1,
        "mask_thresh": 0.5,
        "nms_pre": 500,
        "nms_kernel": "gaussian",
        "nms_sigma": 2.0,
        "filter_thresh": 0.05,
        "max_detections": 100,
    }
    out = solov2_predict_single(kernels, logits, mask_feats, (64, 60), options)
    m = torch.sigmoid(torch.tensor(10.0))
    expected = torch.stack([0.9 * m, 0.5 * m, 0.6 * m * math.exp(-2.0)])
    torch.testing.assert_close(out["scores"], expected, atol=1e-6, rtol=0)
    assert out["labels"].tolist() == [1, 2, 1]
    # masks: the soft mask upsampled 4x (bilinear), cropped to the image, > 0.5: the 4x block minus its corners
    full = region.repeat_interleave(4, 0).repeat_interleave(4, 1)[:64, :60]
    for y, x in ((8, 12), (8, 43), (27, 12), (27, 43)):
        full[y, x] = False
    assert out["masks"].shape == (3, 64, 60) and all(torch.equal(mask, full) for mask in out["masks"])
    assert out["boxes"].tolist() == [[12.0, 8.0, 44.0, 28.0]] * 3  # tight, x2 = last column + 1

    options["filter_thresh"] = 0.1  # the decayed one (0.08) is dropped; max_detections keeps the best
    assert len(solov2_predict_single(kernels, logits, mask_feats, (64, 60), options)["scores"]) == 2
    options.update(filter_thresh=0.05, max_detections=1)
    assert solov2_predict_single(kernels, logits, mask_feats, (64, 60), options)["labels"].tolist() == [1]


def test_eval_output_contract_with_images_of_different_sizes():
    torch.manual_seed(0)
    # low thresholds: a randomly initialised model still returns detections, so the check is not vacuous
    model = solov2(encoder="resnet18", num_classes=4, score_thresh=0.0, filter_thresh=0.0, max_detections=7, **TINY)
    model.eval()
    sizes = [(64, 80), (45, 33), (70, 70)]
    with torch.no_grad():
        out = model([torch.randn(3, h, w) for h, w in sizes])
    _check_eval_output(out, sizes, 4)
    assert any(len(det["scores"]) for det in out)
    for det in out:
        for mask, box in zip(det["masks"], det["boxes"].tolist()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    with torch.no_grad():  # a (B, C, H, W) tensor works too
        _check_eval_output(model(torch.randn(2, 3, 40, 48)), [(40, 48)] * 2, 4)


def test_other_encoders_and_the_registry():
    torch.manual_seed(0)
    model = create_model("solov2", encoder="resnet18", num_classes=3, in_channels=1, **TINY)
    assert isinstance(model, SOLOv2) and type(model.backbone.body).__name__ == "IntermediateLayerGetter"
    image, target = _image_and_target(channels=1)
    model.train()
    losses = model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    mobile = solov2(encoder="mobilenet_v2", num_classes=3, **TINY).eval()  # a non-ResNet body
    with torch.no_grad():
        _check_eval_output(mobile([torch.randn(3, 50, 60)]), [(50, 60)], 3)


def test_options_are_validated():
    with pytest.raises(TypeError, match="did you mean 'score_thresh'"):
        solov2(encoder="resnet18", score_tresh=0.2)
    with pytest.raises(ValueError, match="num_groups=32 must divide feat_channels=48"):
        solov2(encoder="resnet18", feat_channels=48)
    with pytest.raises(ValueError, match="num_grids must be 5 entries"):
        solov2(encoder="resnet18", num_grids=(40, 36, 24))
    with pytest.raises(ValueError, match="nms_kernel"):
        solov2(encoder="resnet18", nms_kernel="hard")
    with pytest.raises(ValueError, match="loss_weights has unknown loss 'loss_box'"):
        solov2(encoder="resnet18", loss_weights={"loss_box": 1.0})
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        solov2(encoder="resnet18", num_classes=1)
    model = solov2(encoder="resnet18", num_classes=3, **TINY).train()
    image, target = _image_and_target()
    with pytest.raises(ValueError, match=r"labels must be in 1\.\.2"):
        model([image], [{**target, "labels": torch.tensor([0, 1])}])
    with pytest.raises(ValueError, match="targets are required"):
        model([image])


# --------------------------------------------------------------------------- learning
@pytest.mark.slow
@pytest.mark.heavy
def test_solov2_learns_synthetic_shapes(tmp_path):
    """Learning through the trainer and the instance task, test-sized (the Mask R-CNN recipe of
    configs/synthetic_mask_rcnn.yaml: 64 px, one or two large shapes of one class): mask AP50 >= 0.5."""
    from maskworks.data import SyntheticShapes
    from maskworks.engine import Trainer
    from maskworks.tasks import InstanceTask

    kw = {"image_size": 64, "num_classes": 2, "max_shapes": 2, "radius_range": (0.2, 0.4)}
    train, val = SyntheticShapes(96, split="train", **kw), SyntheticShapes(16, split="val", **kw)
    torch.manual_seed(0)
    model = create_model("solov2", encoder="resnet18", num_classes=2, **LEARN)
    trainer = Trainer(
        model, train, val, tmp_path, task=InstanceTask(), epochs=EPOCHS, batch_size=4, optimizer="sgd", lr=0.01,
        schedule="cosine", warmup_epochs=0.5, grad_clip=10.0, progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    result = trainer.fit()
    rows = result["history"]
    print(
        f"SOLOv2 learning: {time.perf_counter() - start:.0f} s, mask AP50 per epoch",
        [round(r["val_mask_ap50"], 3) for r in rows],
    )
    assert rows[-1]["val_mask_ap50"] >= 0.5, [round(r["val_mask_ap50"], 3) for r in rows]
