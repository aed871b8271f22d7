"""Box IoU and the NMS family: torchvision equality for IoU / GIoU / batched NMS, the papers' definitions on
hand-built cases for Soft-NMS, Fast NMS and Matrix NMS, and mask-IoU NMS."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from maskworks.ops import (
    batched_nms,
    box_iou,
    fast_nms,
    generalized_box_iou,
    mask_iou,
    mask_nms,
    matrix_nms,
    soft_nms,
)


def _random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_iou_and_giou_equal_torchvision():
    a, b = _random_boxes(30, 0), _random_boxes(20, 1)
    torch.testing.assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))
    with pytest.raises(ValueError, match="\\(N, 4\\)"):
        box_iou(a[:, :3], b)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_batched_nms_equals_torchvision(threshold):
    boxes = _random_boxes(300, 2)
    g = torch.Generator().manual_seed(3)
    scores, labels = torch.rand(300, generator=g), torch.randint(0, 5, (300,), generator=g)
    expected = torchvision.ops.batched_nms(boxes, scores, labels, threshold)
    assert torch.equal(batched_nms(boxes, scores, labels, threshold), expected)
    assert batched_nms(boxes[:0], scores[:0], labels[:0], threshold).numel() == 0


# two boxes of IoU 1/3 (10x10 squares overlapping by half) and a far one
_BOXES = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]])
_IOU = 50 / 150


def test_soft_nms_gaussian_and_linear_follow_the_paper():
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, final = soft_nms(_BOXES, scores, method="gaussian", sigma=0.5)
    # M = box 0; box 1 decays by exp(-IoU^2 / sigma); box 2 does not overlap
    assert keep.tolist() == [0, 1, 2] or keep.tolist() == [0, 2, 1]
    decayed = 0.8 * math.exp(-(_IOU**2) / 0.5)
    assert dict(zip(keep.tolist(), final.tolist())) == pytest.approx({0: 0.9, 1: decayed, 2: 0.7})
    # linear: decays only at IoU >= N_t, by (1 - IoU)
    _, final = soft_nms(_BOXES, scores, method="linear", iou_threshold=0.3)
    assert sorted(final.tolist(), reverse=True) == pytest.approx([0.9, 0.7, 0.8 * (1 - _IOU)])
    _, final = soft_nms(_BOXES, scores, method="linear", iou_threshold=0.5)  # below N_t: untouched
    assert sorted(final.tolist(), reverse=True) == pytest.approx([0.9, 0.8, 0.7])
    # dropped below the score threshold; other classes are not decayed
    keep, _ = soft_nms(_BOXES, scores, method="linear", iou_threshold=0.3, score_threshold=0.6)
    assert keep.tolist() == [0, 2]
    keep, final = soft_nms(_BOXES, scores, labels=torch.tensor([0, 1, 0]), method="gaussian")
    assert final.tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_fast_nms_lets_suppressed_boxes_suppress():
    # A > B > C; IoU(A, B) and IoU(B, C) above the threshold, IoU(A, C) below: greedy NMS keeps A and C,
    # Fast NMS only A (B, though suppressed, still removes C)
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert torchvision.ops.nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert fast_nms(boxes, scores, iou_threshold=0.4).tolist() == [0]
    # classes are independent; top_k drops the rest of a class
    assert fast_nms(boxes, scores, labels=torch.tensor([0, 1, 0]), iou_threshold=0.4).tolist() == [0, 1, 2]
    assert fast_nms(boxes, scores, iou_threshold=0.99, top_k=2).tolist() == [0, 1]


def _square_masks() -> torch.Tensor:
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 0:10, 0:10] = True
    masks[1, 0:10, 5:15] = True  # IoU 1/3 with mask 0
    masks[2, 12:20, 12:20] = True  # disjoint
    return masks


def test_mask_iou_and_mask_nms():
    masks = _square_masks()
    iou = mask_iou(masks, masks)
    assert iou[0, 1].item() == pytest.approx(_IOU) and iou[0, 2].item() == 0 and iou[2, 2].item() == 1
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert mask_nms(masks, scores, iou_threshold=0.3).tolist() == [0, 2]
    assert mask_nms(masks, scores, iou_threshold=0.5).tolist() == [0, 1, 2]
    assert mask_nms(masks, scores, labels=torch.tensor([0, 1, 0]), iou_threshold=0.3).tolist() == [0, 1, 2]


def test_matrix_nms_follows_solov2():
    masks = _square_masks()
    scores = torch.tensor([0.8, 0.9, 0.7])  # mask 1 is the best
    sigma = 2.0
    out = matrix_nms(masks, scores, kernel="gaussian", sigma=sigma)
    # the best mask keeps its score; mask 0 decays by f(IoU) / f(0) with f(x) = exp(-sigma x^2); mask 2 is untouched
    assert out.tolist() == pytest.approx([0.8 * math.exp(-sigma * _IOU**2), 0.9, 0.7])
    out = matrix_nms(masks, scores, kernel="linear")
    assert out.tolist() == pytest.approx([0.8 * (1 - _IOU), 0.9, 0.7])
    # other classes do not decay each other
    assert matrix_nms(masks, scores, labels=torch.tensor([0, 1, 0])).tolist() == pytest.approx([0.8, 0.9, 0.7])


def test_matrix_nms_compensates_for_an_overlapped_decayer():
    # chain 0 > 1 > 2 with IoU(0,1) = IoU(1,2) = u, IoU(0,2) = 0: mask 2's decay by mask 1 is divided by
    # f(u) (mask 1 was itself overlapped by u), so f(u) / f(u) = 1: mask 2 keeps its score
    masks = torch.zeros(3, 10, 30, dtype=torch.bool)
    masks[0, :, 0:10] = True
    masks[1, :, 5:15] = True
    masks[2, :, 10:20] = True
    scores = torch.tensor([0.9, 0.8, 0.7])
    u = _IOU
    out = matrix_nms(masks, scores, kernel="gaussian", sigma=2.0)
    assert out.tolist() == pytest.approx([0.9, 0.8 * math.exp(-2.0 * u**2), 0.7])
