"""Panoptic FPN: the heuristic fusion (hand-built case, invariants), mmdetection's parameter count, training losses,
the eval contract and a short overfit."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.models.detection as tvd

from maskworks.models.instance.mask_rcnn import LOSS_NAMES
from maskworks.models.panoptic import PanopticFPN, PanopticFPNHead, panoptic_fpn, panoptic_fpn_fusion
from maskworks.registry import create_model, model_entry
from maskworks.testing import TINY_MASK_RCNN, count_parameters

# labels 0..4: things 1 and 3, stuff 0, 2, 4 (stuff label 0 must survive as a segment)
NUM_CLASSES, THINGS, STUFF = 5, [1, 3], [0, 2, 4]
TINY = {**TINY_MASK_RCNN, "semantic_channels": 32, "semantic_num_groups": 8}


# --------------------------------------------------------------------------- fusion
def _hand_case() -> tuple[torch.Tensor, ...]:
    semantic = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 5, 5],
            [0, 0, 0, 0, 0, 0, 5, 5],
            [0, 0, 0, 0, 0, 0, -1, -1],
            [4, 4, 4, 4, 4, 4, -1, -1],
            [4, 4, 4, 4, 4, 4, 4, 7],
            [4, 4, 4, 4, 4, 4, 4, 7],
        ]
    )
    masks = torch.zeros(4, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 3:6] = True  # 0.6: 4 of its 9 pixels under instance 1 -> keeps 5/9
    masks[1, 1:3, 1:5] = True  # 0.9: placed first
    masks[2, 1:3, 0:4] = True  # 0.7: 6 of its 8 pixels under instance 1 -> 1/4 visible, dropped
    masks[3, 4:6, 0:2] = True  # 0.4: below the score threshold
    scores = torch.tensor([0.6, 0.9, 0.7, 0.4])
    labels = torch.tensor([3, 1, 1, 2])
    return masks, scores, labels, semantic


def test_fusion_hand_built_case_exact():
    masks, scores, labels, semantic = _hand_case()
    expected = torch.tensor(
        [
            [3, 3, 3, 3, 3, 3, 5, 5],
            [3, 1, 1, 1, 1, 2, 5, 5],
            [3, 1, 1, 1, 1, 2, 0, 0],
            [4, 4, 4, 2, 2, 2, 0, 0],
            [4, 4, 4, 4, 4, 4, 4, 0],
            [4, 4, 4, 4, 4, 4, 4, 0],
        ],
        dtype=torch.int32,
    )
    info = [
        {"id": 1, "category_id": 1, "isthing": True, "score": pytest.approx(0.9)},
        {"id": 2, "category_id": 3, "isthing": True, "score": pytest.approx(0.6)},
        {"id": 3, "category_id": 0, "isthing": False, "score": 1.0},  # stuff class 0 is a segment, not void
        {"id": 4, "category_id": 4, "isthing": False, "score": 1.0},
        {"id": 5, "category_id": 5, "isthing": False, "score": 1.0},  # exactly the 4-pixel limit: kept
    ]  # label 7 (2 pixels) is below the limit; -1 ("other") never becomes a segment
    panoptic, segments = panoptic_fpn_fusion(masks, scores, labels, semantic, stuff_area_limit=4)
    assert panoptic.dtype == torch.int32 and torch.equal(panoptic, expected)
    assert segments == info
    # probabilities are thresholded at 0.5; a stuff segment's score is the mean of semantic_scores over it
    probs = masks.float() * 0.8 + 0.1
    conf = torch.full((6, 8), 0.25)
    panoptic2, segments2 = panoptic_fpn_fusion(
        probs, scores, labels, semantic, semantic_scores=conf, stuff_area_limit=4
    )
    assert torch.equal(panoptic2, expected)
    assert [s["score"] for s in segments2[2:]] == [0.25, 0.25, 0.25]
    # stuff_classes restricts which labels may form stuff; a larger area limit drops the small stuff
    panoptic3, segments3 = panoptic_fpn_fusion(
        masks, scores, labels, semantic, stuff_area_limit=5, stuff_classes=[0, 4]
    )
    assert [s["category_id"] for s in segments3] == [1, 3, 0, 4]
    assert (panoptic3[:2, 6:] == 0).all()


def _check_contract(panoptic: torch.Tensor, segments: list[dict], size: tuple[int, int]) -> None:
    """The panoptic contract: one int32 id per pixel, ids unique, listed ids == non-zero ids present, area > 0."""
    assert panoptic.shape == size and panoptic.dtype == torch.int32
    ids = [s["id"] for s in segments]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    present = set(torch.unique(panoptic).tolist()) - {0}
    assert present == set(ids)
    for s in segments:
        assert set(s) == {"id", "category_id", "isthing", "score"}
        assert isinstance(s["category_id"], int) and isinstance(s["isthing"], bool) and math.isfinite(s["score"])


@pytest.mark.parametrize("seed", range(6))
def test_fusion_invariants(seed: int):
    g = torch.Generator().manual_seed(seed)
    h, w, n = 40, 48, 12
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):  # random overlapping rectangles (one empty)
        if i == 5:
            continue
        y0, x0 = (int(v) for v in torch.randint(0, 30, (2,), generator=g))
        dy, dx = (int(v) for v in torch.randint(3, 18, (2,), generator=g))
        masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
    scores = torch.randperm(100, generator=g)[:n].float() / 100  # distinct
    labels = torch.tensor(THINGS)[torch.randint(0, 2, (n,), generator=g)]
    semantic = torch.tensor([-1, *STUFF, 255])[torch.randint(0, 5, (h // 4, w // 4), generator=g)]
    semantic = semantic.repeat_interleave(4, 0).repeat_interleave(4, 1)  # blocky stuff regions of various sizes
    thr, overlap, limit = 0.3, 0.5, 40
    panoptic, segments = panoptic_fpn_fusion(
        masks, scores, labels, semantic, score_threshold=thr, overlap_threshold=overlap, stuff_area_limit=limit
    )
    _check_contract(panoptic, segments, (h, w))

    # replay: each instance over the threshold, by decreasing score, sees the pixels higher-scored kept ones left
    things = {round(s["score"], 6): s for s in segments if s["isthing"]}
    taken = torch.zeros(h, w, dtype=torch.bool)
    for i in torch.argsort(scores, descending=True).tolist():
        segment = things.pop(round(float(scores[i]), 6), None)
        area = int(masks[i].sum())
        visible = masks[i] & ~taken
        if scores[i] < thr:
            assert segment is None  # below the score threshold: dropped
            continue
        if area == 0 or int(visible.sum()) / area < 1 - overlap:
            assert segment is None  # low visible fraction (or empty): dropped
            continue
        assert segment is not None and segment["category_id"] == int(labels[i])
        # exactly its visible pixels: a higher-scored instance is never overwritten
        assert torch.equal(panoptic == segment["id"], visible)
        taken |= masks[i]
    assert not things

    stuff = [s for s in segments if not s["isthing"]]
    free = panoptic == 0
    for s in stuff:
        region = panoptic == s["id"]
        assert s["category_id"] in STUFF and int(region.sum()) >= limit
        assert (semantic[region] == s["category_id"]).all()
        free |= region
    for label in STUFF:  # each stuff label's unclaimed area is one segment when large enough, else void
        area = int(((semantic == label) & free).sum())
        assert (label in [s["category_id"] for s in stuff]) == (area >= limit)


def test_fusion_refuses_bad_input():
    masks, scores, labels, semantic = _hand_case()
    with pytest.raises(ValueError, match="must match the semantic map"):
        panoptic_fpn_fusion(masks[:, :5], scores, labels, semantic)
    with pytest.raises(ValueError, match="overlap_threshold"):
        panoptic_fpn_fusion(masks, scores, labels, semantic, overlap_threshold=1.5)
    empty = panoptic_fpn_fusion(masks[:0], scores[:0], labels[:0], torch.full((6, 8), -1))
    assert (empty[0] == 0).all() and empty[1] == []


# --------------------------------------------------------------------------- model
def test_parameter_count_equals_mmdetection():
    entry = model_entry("panoptic_fpn_resnet50")
    assert entry.task == "panoptic" and model_entry("panoptic_fpn").task == "panoptic"
    with torch.device("meta"):
        model = create_model("panoptic_fpn_resnet50", num_classes=133, thing_classes=list(range(80)))
        reference = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    assert isinstance(model, PanopticFPN)
    # mmdetection's panoptic-fpn_r50_fpn_1x_coco
    assert count_parameters(model) == 46_027_110
    assert count_parameters(model.semantic_head) == 1_630_774
    # the detector is torchvision's 81-class Mask R-CNN without the background rows of bbox_pred and mask logits
    detector = count_parameters(model) - count_parameters(model.semantic_head)
    assert detector == count_parameters(reference) - (1024 + 1) * 4 - (256 + 1)
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 320
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 80
    assert model.stuff_classes == list(range(80, 133)) and model.semantic_head.num_classes == 54


def test_semantic_head_layout():
    head = PanopticFPNHead(256, 54)
    convs = [len([m for m in s.modules() if isinstance(m, torch.nn.Conv2d)]) for s in head.scale_heads]
    assert convs == [1, 1, 2, 3]  # P2..P5: stages until 1/4 scale
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 7 and all(n.num_groups == 32 and n.num_channels == 128 for n in norms)
    feats = [torch.randn(2, 256, 16 // 2**k, 20 // 2**k) for k in range(4)]
    assert head(feats).shape == (2, 54, 16, 20) and head(feats, (64, 80)).shape == (2, 54, 64, 80)


def _sample(seed: int = 0, size: tuple[int, int] = (64, 64)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An image whose classes are visible (per-class mean colour plus noise): stuff 0 (top), 2 (bottom-left), 4
    (bottom-right), things 1 and 3 (rectangles), a crowd thing segment and a void strip; and its panoptic target."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    semantic = torch.zeros(h, w, dtype=torch.int64)
    semantic[h // 2 :, : w // 2] = 2
    semantic[h // 2 :, w // 2 :] = 4
    semantic[:, -3:] = 255
    segments = [(0, semantic == 0, 0), (2, semantic == 2, 0), (4, semantic == 4, 0)]
    for label, (y0, x0, y1, x1), crowd in [(1, (6, 6, 26, 30), 0), (3, (34, 30, 58, 56), 0), (1, (4, 40, 14, 52), 1)]:
        m = torch.zeros(h, w, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        semantic[m] = label
        segments = [(lab, seg & ~m, c) for lab, seg, c in segments] + [(label, m, crowd)]
    colours = torch.randn(NUM_CLASSES, 3, generator=g)
    image = colours[semantic.clamp(max=NUM_CLASSES - 1)].permute(2, 0, 1) + 0.3 * torch.randn(3, h, w, generator=g)
    masks = torch.stack([m for _, m, _ in segments])
    ys, xs = [torch.where(m.any(1))[0] for m in masks], [torch.where(m.any(0))[0] for m in masks]
    boxes = torch.tensor([[x[0], y[0], x[-1] + 1, y[-1] + 1] for x, y in zip(xs, ys)], dtype=torch.float32)
    labels = torch.tensor([lab for lab, _, _ in segments])
    target = {
        "boxes": boxes,
        "labels": labels,
        "masks": masks,
        "iscrowd": torch.tensor([c for _, _, c in segments]),
        "isthing": torch.tensor([lab in THINGS for lab in labels.tolist()]),
        "semantic": semantic,
    }
    return image, target


def _tiny(**kw) -> PanopticFPN:
    torch.manual_seed(0)
    return panoptic_fpn(encoder="resnet18", num_classes=NUM_CLASSES, thing_classes=THINGS, **{**TINY, **kw})


def test_targets_are_split_into_things_and_semantic():
    model = _tiny()
    image, target = _sample()
    (det,), (sem,) = model._split_targets([target], [image])
    # stuff and crowd segments are left out; thing labels 1, 3 -> detector labels 1, 2
    assert det["labels"].tolist() == [1, 2] and det["masks"].shape == (2, 64, 64)
    assert torch.equal(det["boxes"], target["boxes"][[3, 4]])
    # stuff labels 0, 2, 4 -> 0, 1, 2; things (crowd too) -> "other" 3; void stays 255
    lut = torch.full((256,), 255)
    lut[:NUM_CLASSES] = torch.tensor([0, 3, 1, 3, 2])
    assert torch.equal(sem, lut[target["semantic"]])


def test_training_step_losses_and_backward():
    model = _tiny()
    model.train()
    batch = [_sample(0), _sample(1, size=(72, 60))]
    torch.manual_seed(1)
    losses = model([b[0] for b in batch], [b[1] for b in batch])
    assert set(losses) == {*LOSS_NAMES, "loss_semantic"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.semantic_head.predictor.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    # loss_semantic is 0.5 x the mean cross-entropy over non-void pixels (loss_weights can change the 0.5)
    reweighted = _tiny(loss_weights={"loss_semantic": 1.0})
    reweighted.train()
    torch.manual_seed(1)
    again = reweighted([b[0] for b in batch], [b[1] for b in batch])
    torch.testing.assert_close(again["loss_semantic"], 2 * losses["loss_semantic"].detach())
    with pytest.raises(ValueError, match="lacks \\['semantic'\\]"):
        model([batch[0][0]], [{k: v for k, v in batch[0][1].items() if k != "semantic"}])


def test_eval_output_follows_the_contract():
    model = _tiny(score_threshold=0.0, stuff_area_limit=0, box_score_thresh=0.0)
    model.eval()
    sizes = [(64, 80), (72, 60)]
    torch.manual_seed(2)
    with torch.no_grad():
        out = model([torch.randn(3, *s) for s in sizes])
    assert len(out) == 2
    for result, size in zip(out, sizes):
        _check_contract(result["panoptic_seg"], result["segments_info"], size)
        assert result["semantic_logits"].shape == (len(STUFF) + 1, *size)  # at the input resolution
        for s in result["segments_info"]:
            assert s["category_id"] in (THINGS if s["isthing"] else STUFF)
        det = result["instances"]
        n = det["boxes"].shape[0]
        assert det["masks"].shape == (n, *size) and det["masks"].dtype == torch.bool
        assert set(det["labels"].tolist()) <= set(THINGS)
        # with every threshold at 0, stuff covers all pixels the instances leave (no "other" argmax: void stays)
        head = result["semantic_logits"].argmax(0)
        assert ((result["panoptic_seg"] == 0) <= (head == len(STUFF))).all()


def test_few_steps_overfit_one_image():
    model = _tiny()
    model.train()
    image, target = _sample(3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    totals, semantic = [], []
    for step in range(10):
        torch.manual_seed(step)
        losses = model([image], [target])
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        totals.append(float(total.detach()))
        semantic.append(float(losses["loss_semantic"].detach()))
    # the RPN / RoI samples differ per step, so single steps can jump: the best of the last three halves the loss
    assert min(totals[-3:]) < 0.5 * totals[0], totals
    assert semantic[-1] < 0.9 * semantic[0] and semantic == sorted(semantic, reverse=True), semantic
