"""YOLACT (Bolya et al., "YOLACT: Real-time Instance Segmentation", ICCV 2019) with maskworks backbones.

A one-stage detector that predicts, besides class scores and box deltas, ``k`` mask coefficients per anchor; a
fully convolutional *protonet* on P3 predicts ``k`` prototype masks at 1/4 of the input for the whole image, and
each detection's mask is the linear combination ``sigmoid(P C^T)`` of the prototypes, cropped by its box.

Architecture (mmdetection's ``configs/yolact/yolact_r50_1xb8-55e_coco.py``, its ``YOLACTHead`` /
``YOLACTProtonet`` / ``YOLACTSegmHead`` and ``FPN``): 35,293,711 parameters for ResNet-50 and 81 classes
(mmdetection's ``num_classes=80`` plus the background; mmdet 3.3.0 counts the same):

* ``backbone``: a maskworks encoder; its last maps at reductions 8, 16, 32 (C3..C5) feed the neck.
* ``neck`` (:class:`YOLACTFPN`): FPN P3..P7, 256 channels, bilinear top-down upsampling, P6 = stride-2 3x3 conv on
  C5 (``add_extra_convs="on_input"``), P7 = stride-2 3x3 conv on P6, no ReLU before the extra convs.
* ``bbox_head`` (:class:`YOLACTHead`): shared over levels; one 3x3 conv + ReLU, then 3x3 convs to
  ``A * num_classes`` class logits (softmax; class 0 is the background), ``A * 4`` box deltas and ``A * k`` tanh
  mask coefficients, with ``A = 3`` anchors per location (aspect ratios 0.5, 1, 2; side
  ``3 * base_size``, base sizes 8, 16, 32, 64, 128 px for P3..P7).
* ``mask_head`` (:class:`YOLACTProtonet`): on P3, 3x (3x3 conv 256 + ReLU), x2 bilinear upsampling, 3x3 conv 256
  + ReLU, 1x1 conv to ``k = 32`` prototypes + ReLU (its ``protonet`` children keep mmdetection's indices).
* ``segm_head`` (:class:`YOLACTSegmHead`): 1x1 conv on P3 to ``num_classes - 1`` channels, trained with a
  per-class sigmoid BCE against the GT masks; training only.

Training (``model(images, targets)``) returns ``loss_cls`` (softmax CE over positives and the hardest negatives,
OHEM ``neg_pos_ratio : 1``), ``loss_bbox`` (SmoothL1, beta 1, on the deltas of the positives; weight 1.5),
``loss_mask`` (BCE of the assembled mask logits against the GT mask at prototype resolution, inside the matched GT
box in prototype coordinates, summed per instance and divided by the box area in prototype cells; weight 6.125)
and ``loss_segm`` (weight 1). Anchors match GT boxes by IoU: >= 0.5 positive, < 0.4 negative, in between ignored,
and each GT box also takes its best anchor (mmdetection's ``MaxIoUAssigner``). Box deltas are mmdetection's
``DeltaXYWHBBoxCoder`` (means 0, stds 0.1, 0.1, 0.2, 0.2).

Inference (``model(images)`` in eval): softmax scores, the ``pre_nms_top_n`` best anchors of each level, decoded
boxes clipped to the image, (anchor, class) pairs above ``score_thresh``, class-wise Fast NMS
(:func:`maskworks.ops.fast_nms`, ``top_k`` per class; ``box_nms="soft_linear"`` / ``"soft_gaussian"`` runs Soft-NMS,
:func:`maskworks.ops.soft_nms`, on the ``top_k`` of each class instead, for scenes of overlapping objects), the best
``max_detections``; masks ``sigmoid(P C^T)``
cropped by the predicted box in prototype coordinates, upsampled bilinearly to the padded input size, cropped to
the image and thresholded at ``mask_thresh``. Output per image: ``boxes (N, 4)`` xyxy float, ``labels (N,)``
int64 in ``1..num_classes-1``, ``scores (N,)``, ``masks (N, H, W)`` bool at the input size (plus
``mask_probs (N, H, W)`` with ``return_mask_probs=True``).

Input size: images run at the size they come (no resizing; YOLACT's recipe resizes to 550x550 in the data
pipeline, which is the dataset's job here). A batch is zero-padded at the bottom / right to a common size that is a
multiple of 32, and everything is cropped back. Anchors follow mmdetection's 550 px configuration, where the
stride of a level is ``550 / feature_size`` so that each level's anchor centres tile the image evenly: here the
stride of a level is ``padded_size / feature_size`` per axis (8, 16, 32 exactly for P3..P5; for P6 / P7 the
stride-2 convs round odd sizes up, and the centres still tile the padded image evenly). Anchor sizes stay in
pixels (24..384 px), so they suit objects of the sizes YOLACT's 550 px inputs show.

Training recipe: the protonet ends in a ReLU (the paper's, mmdetection's). Adam-type optimisers at 1e-3 from random
heads drive every prototype below zero within a few dozen steps, after which the mask loss cannot fall; AdamW at
1e-4 to 2e-4 (or SGD at 1e-3, the paper's) keeps them alive.

Deviations from mmdetection, each on purpose:

* Class channel 0 is the background (maskworks' convention, as Mask R-CNN), mmdetection puts it last.
* An image without positive anchors keeps its ``neg_pos_ratio`` hardest negatives in the classification loss
  (mmdetection keeps *all* its negatives, with a normaliser of 1, which swamps the batch's loss; the official
  code keeps none).
* The semantic loss of an image without instances is BCE against all-zero targets (mmdetection weights it 0:
  an image with nothing in it still says "no class here" for every pixel).
* The mask BCE is computed from logits (``binary_cross_entropy_with_logits``) times the crop instead of on cropped
  probabilities: the same value inside the crop, finite everywhere.
* Boxes map to prototype cells by the exact prototype stride of the padded input (``padded / proto_size``);
  mmdetection normalises by the unpadded image size, which misplaces crops when a batch is padded. Box sides
  below one prototype cell count as one cell in the area normaliser (mmdetection's pipeline drops GT boxes under
  4 px, which never reach it).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.models._utils import build_encoder, check_positive_int
from maskworks.models.instance._common import (
    check_image_list,
    check_loss_weights,
    check_normalisation,
    check_targets,
    pad_batch,
)
from maskworks.ops.boxes import box_iou
from maskworks.ops.nms import fast_nms, soft_nms
from maskworks.registry import register_model

__all__ = [
    "LOSS_NAMES",
    "YOLACT",
    "YOLACTFPN",
    "YOLACTHead",
    "YOLACTProtonet",
    "YOLACTSegmHead",
    "assemble_masks",
    "crop_masks",
    "decode_boxes",
    "encode_boxes",
    "grid_anchors",
    "hard_negative_mask",
    "match_anchors",
    "yolact",
    "yolact_resnet50_fpn",
]

LOSS_NAMES: tuple[str, ...] = ("loss_cls", "loss_bbox", "loss_mask", "loss_segm")
_LOSS_WEIGHTS = {"loss_cls": 1.0, "loss_bbox": 1.5, "loss_mask": 6.125, "loss_segm": 1.0}
_BOX_STDS = (0.1, 0.1, 0.2, 0.2)
_MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))  # mmdetection's clamp of the decoded log width / height
_SIZE_DIVISIBLE = 32  # C5 is at 1/32

# option -> default; both constructors take these keyword arguments (see the module docstring)
_DEFAULTS: dict[str, Any] = {
    "fpn_channels": 256,
    "num_protos": 32,
    "anchor_sizes": (8, 16, 32, 64, 128),
    "anchor_scale": 3.0,
    "aspect_ratios": (0.5, 1.0, 2.0),
    "pos_iou_thresh": 0.5,
    "neg_iou_thresh": 0.4,
    "neg_pos_ratio": 3,
    "max_masks_to_train": 100,
    "crop_padding": 1,
    "loss_weights": None,
    "score_thresh": 0.05,
    "nms_iou": 0.5,
    "box_nms": "fast",
    "soft_nms_sigma": 0.5,
    "pre_nms_top_n": 1000,
    "top_k": 200,
    "max_detections": 100,
    "mask_thresh": 0.5,
    "image_mean": None,
    "image_std": None,
    "return_mask_probs": False,
}
_POSITIVE_INTS = ("fpn_channels", "num_protos", "neg_pos_ratio", "max_masks_to_train", "pre_nms_top_n", "top_k")
_UNIT_FLOATS = ("pos_iou_thresh", "neg_iou_thresh", "score_thresh", "nms_iou", "mask_thresh")


# --------------------------------------------------------------------------- anchors and box coding
def grid_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    base_sizes: Sequence[float],
    scale: float = 3.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Anchors of every level, xyxy in input pixels, ordered (row, column, aspect ratio) like the head's outputs.

    Level ``l`` of size ``(h, w)`` has centres ``((j + 0.5) * W / w, (i + 0.5) * H / h)`` with ``(H, W) =
    padded_size`` (mmdetection's YOLACT anchors, whose strides are ``550 / feature_size``) and, per centre, one
    anchor per aspect ratio ``r = height / width`` of width ``base * scale / sqrt(r)`` and height
    ``base * scale * sqrt(r)``.

    Returns:
        One ``(h * w * len(aspect_ratios), 4)`` float32 tensor per level.
    """
    ratios = torch.tensor(list(aspect_ratios), dtype=torch.float32, device=device)
    out = []
    for (h, w), base in zip(feature_sizes, base_sizes):
        half_w = 0.5 * base * scale / ratios.sqrt()  # (A,)
        half_h = 0.5 * base * scale * ratios.sqrt()
        cy = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * (padded_size[0] / h)
        cx = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * (padded_size[1] / w)
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # (h, w)
        cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)  # (h * w, 1)
        anchors = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)  # (h * w, A, 4)
        out.append(anchors.reshape(-1, 4))
    return out


def encode_boxes(anchors: torch.Tensor, boxes: torch.Tensor, stds: Sequence[float] = _BOX_STDS) -> torch.Tensor:
    """Deltas ``(N, 4)`` that turn xyxy ``anchors`` into xyxy ``boxes`` (mmdetection's ``DeltaXYWHBBoxCoder``,
    means 0): ``((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph)) / stds``."""
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = anchors[:, 0] + 0.5 * pw, anchors[:, 1] + 0.5 * ph
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gx, gy = boxes[:, 0] + 0.5 * gw, boxes[:, 1] + 0.5 * gh
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def decode_boxes(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    stds: Sequence[float] = _BOX_STDS,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`: xyxy boxes ``(N, 4)``, log sizes clamped to ``|log(16 / 1000)|`` and, with
    ``image_size = (H, W)``, coordinates clipped to the image."""
    d = deltas * deltas.new_tensor(stds)
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = anchors[:, 0] + 0.5 * pw, anchors[:, 1] + 0.5 * ph
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    gw = pw * d[:, 2].clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    gh = ph * d[:, 3].clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    boxes = torch.stack([gx - 0.5 * gw, gy - 0.5 * gh, gx + 0.5 * gw, gy + 0.5 * gh], dim=-1)
    if image_size is not None:
        h, w = image_size
        boxes = torch.stack(
            [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], -1
        )
    return boxes


def match_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, pos_iou: float = 0.5, neg_iou: float = 0.4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max-IoU assignment (mmdetection's ``MaxIoUAssigner`` with ``min_pos_iou=0``, ``gt_max_assign_all=False``).

    An anchor is positive when its best IoU with a GT box is ``>= pos_iou`` (matched to that box), negative when
    it is ``< neg_iou``, ignored in between; then every GT box also claims the anchor it overlaps most (when they
    overlap at all; a later box wins a shared anchor).

    Returns:
        ``matched (A,)`` int64 GT index of each anchor (meaningful where positive), ``positive (A,)`` and
        ``negative (A,)`` bool.
    """
    num_anchors = anchors.shape[0]
    if gt_boxes.shape[0] == 0:
        matched = torch.zeros(num_anchors, dtype=torch.int64, device=anchors.device)
        return matched, torch.zeros_like(matched, dtype=torch.bool), torch.ones_like(matched, dtype=torch.bool)
    iou = box_iou(gt_boxes.float(), anchors)  # (G, A)
    best_iou, matched = iou.max(dim=0)
    positive = best_iou >= pos_iou
    negative = best_iou < neg_iou
    gt_best_iou, gt_best = iou.max(dim=1)  # (G,)
    for g in range(gt_boxes.shape[0]):
        if gt_best_iou[g] > 0:
            a = gt_best[g]
            matched[a], positive[a], negative[a] = g, True, False
    return matched, positive, negative


def hard_negative_mask(
    cls_loss: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, neg_pos_ratio: int = 3
) -> torch.Tensor:
    """OHEM: the ``neg_pos_ratio * max(num_positive, 1)`` negatives of highest loss (all of them when fewer).

    Args:
        cls_loss: per-anchor classification loss ``(A,)``.
        positive, negative: ``(A,)`` bool masks.
        neg_pos_ratio: negatives kept per positive (3 in SSD and YOLACT).

    Returns:
        ``(A,)`` bool mask of the kept negatives.
    """
    num_neg = min(neg_pos_ratio * max(int(positive.sum()), 1), int(negative.sum()))
    keep = torch.zeros_like(negative)
    if num_neg > 0:
        ranked = cls_loss.detach().masked_fill(~negative, -math.inf)
        keep[ranked.topk(num_neg).indices] = True
    return keep


# --------------------------------------------------------------------------- masks
def assemble_masks(prototypes: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Mask logits ``P C^T``: ``(N, h, w)`` from prototypes ``(k, h, w)`` and coefficients ``(N, k)`` (apply a
    sigmoid for YOLACT's masks)."""
    k, h, w = prototypes.shape
    return (coefficients @ prototypes.reshape(k, h * w)).reshape(-1, h, w)  # (N, h * w) -> (N, h, w)


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor, padding: float = 1) -> torch.Tensor:
    """Zero every mask outside its box: cell ``(i, j)`` survives when ``x1 - padding <= j < x2 + padding`` and
    ``y1 - padding <= i < y2 + padding`` (YOLACT's and mmdetection's ``crop``).

    Args:
        masks: ``(N, h, w)``.
        boxes: ``(N, 4)`` xyxy **in the masks' cells** (prototype coordinates: input pixels divided by the
            prototype stride), not in input pixels.
        padding: cells added on every side.
    """
    h, w = masks.shape[-2:]
    return masks * _box_region(boxes, h, w, padding).to(masks.dtype)


def _box_region(boxes: torch.Tensor, h: int, w: int, padding: float) -> torch.Tensor:
    """``(N, h, w)`` bool: the cells :func:`crop_masks` keeps."""
    x1 = (torch.minimum(boxes[:, 0], boxes[:, 2]) - padding).clamp(min=0)
    x2 = (torch.maximum(boxes[:, 0], boxes[:, 2]) + padding).clamp(max=w)
    y1 = (torch.minimum(boxes[:, 1], boxes[:, 3]) - padding).clamp(min=0)
    y2 = (torch.maximum(boxes[:, 1], boxes[:, 3]) + padding).clamp(max=h)
    cols = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    rows = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    in_x = (cols >= x1[:, None]) & (cols < x2[:, None])  # (N, w)
    in_y = (rows >= y1[:, None]) & (rows < y2[:, None])  # (N, h)
    return in_y[:, :, None] & in_x[:, None, :]  # (N, h, w)


def _downsample_masks(masks: torch.Tensor, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """GT masks ``(G, H, W)`` zero-padded to ``padded``, resized bilinearly to ``size`` and thresholded at 0.5
    (mmdetection's mask targets): float ``(G, *size)``."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    m = masks.float()
    m = F.pad(m, (0, padded[1] - m.shape[-1], 0, padded[0] - m.shape[-2]))
    m = F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]
    return (m > 0.5).float()


# --------------------------------------------------------------------------- modules
class YOLACTFPN(nn.Module):
    """mmdetection's ``FPN`` as YOLACT configures it: P3..P5 from C3..C5 with 1x1 lateral convs, bilinear
    top-down addition and 3x3 output convs; P6 a stride-2 3x3 conv on C5 and P7 one on P6 (no ReLU between).

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every level.
        num_extra: extra stride-2 levels after P5 (2: P6, P7).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_extra: int = 2) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_extra - 1)
        self.fpn_convs = nn.ModuleList(
            [nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels]
            + [nn.Conv2d(c, out_channels, 3, stride=2, padding=1) for c in extra_in[:num_extra]]
        )
        self.num_levels = len(in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False)
            laterals[i - 1] = laterals[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.fpn_convs[: self.num_levels], laterals)]
        x = features[-1]  # add_extra_convs="on_input": the first extra level reads C5
        # The extra levels are tiny (1/64, 1/128): they run in float32 even under autocast. CPU bf16 convolution on
        # 1 x 1 maps now and then returns a non-finite weight gradient (about 1 call in 300 on torch 2.14 / oneDNN),
        # which ended bf16 training runs with NaN weights; float32 costs nothing measurable here.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            for conv in self.fpn_convs[self.num_levels :]:
                x = conv(x)
                outs.append(x)
        return outs


class YOLACTHead(nn.Module):
    """The prediction head shared by every level: ``num_head_convs`` 3x3 conv + ReLU, then 3x3 convs to class
    logits, box deltas and tanh mask coefficients of ``num_anchors`` anchors per location.

    Args:
        in_channels: channels of the pyramid levels.
        num_classes: classes including the background (channel 0).
        num_anchors: anchors per location.
        num_protos: mask coefficients per anchor.
        num_head_convs: shared convs before the three predictors.
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_anchors: int = 3, num_protos: int = 32, num_head_convs: int = 1
    ) -> None:
        super().__init__()
        self.num_classes, self.num_anchors, self.num_protos = num_classes, num_anchors, num_protos
        self.head_convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_head_convs)
        )
        self.conv_cls = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.conv_coeff = nn.Conv2d(in_channels, num_anchors * num_protos, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        """Per level: class logits ``(B, h * w * A, num_classes)``, deltas ``(B, h * w * A, 4)`` and coefficients
        ``(B, h * w * A, num_protos)``, anchors ordered (row, column, anchor)."""
        cls, reg, coeff = [], [], []
        for x in features:
            for conv in self.head_convs:
                x = F.relu(conv(x))
            b = x.shape[0]
            # (B, A * C, h, w) -> (B, h, w, A * C) -> (B, h * w * A, C)
            cls.append(self.conv_cls(x).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes))
            reg.append(self.conv_reg(x).permute(0, 2, 3, 1).reshape(b, -1, 4))
            coeff.append(self.conv_coeff(x).permute(0, 2, 3, 1).reshape(b, -1, self.num_protos).tanh())
        return cls, reg, coeff


class YOLACTProtonet(nn.Module):
    """The prototype branch on P3: 3x (3x3 conv + ReLU), x2 bilinear upsampling, 3x3 conv + ReLU, 1x1 conv to
    ``num_protos`` maps + ReLU. ``protonet`` keeps mmdetection's child indices (convs at 0, 2, 4, 8, 10; the
    ReLU mmdetection puts after the upsampling is an identity on non-negative input and stays one here).

    Args:
        in_channels: channels of P3.
        num_protos: prototypes ``k``.
        channels: channels of the hidden convs.
    """

    def __init__(self, in_channels: int = 256, num_protos: int = 32, channels: int = 256) -> None:
        super().__init__()
        self.protonet = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Identity(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_protos, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, p3: torch.Tensor) -> torch.Tensor:
        """Prototypes ``(B, k, 2h, 2w)`` from P3 ``(B, C, h, w)``."""
        return self.protonet(p3)


class YOLACTSegmHead(nn.Module):
    """The auxiliary semantic segmentation head (training only): a 1x1 conv on P3 to one logit per foreground
    class."""

    def __init__(self, in_channels: int, num_foreground: int) -> None:
        super().__init__()
        self.segm_conv = nn.Conv2d(in_channels, num_foreground, 1)

    def forward(self, p3: torch.Tensor) -> torch.Tensor:
        return self.segm_conv(p3)


class YOLACT(nn.Module):
    """YOLACT (see the module docstring). Build it with :func:`yolact` or :func:`yolact_resnet50_fpn`.

    Args:
        encoder: a maskworks backbone with ``forward_intermediates``.
        feature_indices: positions in ``forward_intermediates``' list of C3, C4, C5.
        feature_channels: channels of C3, C4, C5.
        num_classes: classes including the background class 0.
        in_channels: image channels.
        options: validated options (``_check_options``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_indices: Sequence[int],
        feature_channels: Sequence[int],
        num_classes: int,
        in_channels: int,
        options: Mapping[str, Any],
    ) -> None:
        super().__init__()
        o = dict(options)
        ch, k = o["fpn_channels"], o["num_protos"]
        self.backbone = encoder
        self.feature_indices = tuple(feature_indices)
        self.neck = YOLACTFPN(feature_channels, ch, num_extra=len(o["anchor_sizes"]) - len(feature_indices))
        self.bbox_head = YOLACTHead(ch, num_classes, len(o["aspect_ratios"]), k)
        self.mask_head = YOLACTProtonet(ch, k, ch)
        self.segm_head = YOLACTSegmHead(ch, num_classes - 1)
        self.num_classes, self.in_channels = num_classes, in_channels
        self.options = o
        self.loss_weights: dict[str, float] = o["loss_weights"]
        self.register_buffer("image_mean", torch.tensor(o["image_mean"]).view(-1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(o["image_std"]).view(-1, 1, 1), persistent=False)
        for module in (self.neck, self.bbox_head, self.mask_head, self.segm_head):  # mmdetection: Xavier uniform
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ inputs
    def _image_list(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return check_image_list(images, self.in_channels)

    def _batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Normalise and zero-pad (bottom / right) to one size, a multiple of 32: ``(B, C, Hp, Wp)``."""
        return pad_batch([(im - self.image_mean) / self.image_std for im in images], _SIZE_DIVISIBLE)

    def _check_targets(self, targets: Sequence[Mapping[str, torch.Tensor]], images: list[torch.Tensor]) -> None:
        check_targets(targets, images, self.num_classes)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training: the weighted loss dict (:data:`LOSS_NAMES`). Eval: one dict per image (boxes, labels, scores,
        bool masks at the image's size).

        Args:
            images: a list of ``(in_channels, H, W)`` tensors (sizes may differ) or a ``(B, in_channels, H, W)``
                tensor, normalised as ``image_mean`` / ``image_std`` say.
            targets: training only: per image ``boxes (N, 4)`` xyxy float in pixels, ``labels (N,)`` int64 in
                ``1..num_classes-1``, ``masks (N, H, W)`` uint8 / bool; ``N = 0`` is allowed.
        """
        image_list = self._image_list(images)
        if self.training:
            if targets is None:
                raise ValueError("YOLACT needs targets in training mode (call model.eval() for predictions)")
            self._check_targets(targets, image_list)
        batch = self._batch(image_list)
        maps = self.backbone.forward_intermediates(batch)
        pyramid = self.neck([maps[i] for i in self.feature_indices])
        cls, reg, coeff = self.bbox_head(pyramid)
        prototypes = self.mask_head(pyramid[0])  # (B, k, Hp / 4, Wp / 4)
        anchors = grid_anchors(
            [p.shape[-2:] for p in pyramid],
            batch.shape[-2:],
            self.options["anchor_sizes"],
            self.options["anchor_scale"],
            self.options["aspect_ratios"],
            device=batch.device,
        )
        if self.training:
            segm = self.segm_head(pyramid[0])
            return self._losses(cls, reg, coeff, prototypes, segm, anchors, targets, batch.shape[-2:])
        sizes = [tuple(im.shape[-2:]) for im in image_list]
        return [
            self._detect(b, cls, reg, coeff, prototypes[b], anchors, sizes[b], batch.shape[-2:])
            for b in range(len(sizes))
        ]

    # ------------------------------------------------------------------ training
    def _losses(
        self,
        cls: list[torch.Tensor],
        reg: list[torch.Tensor],
        coeff: list[torch.Tensor],
        prototypes: torch.Tensor,
        segm: torch.Tensor,
        anchors: list[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]],
        padded: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        o = self.options
        cls_all, reg_all, coeff_all = torch.cat(cls, 1).float(), torch.cat(reg, 1).float(), torch.cat(coeff, 1)
        anchors_all = torch.cat(anchors)  # (A, 4)
        ph, pw = prototypes.shape[-2:]
        proto_stride = prototypes.new_tensor([padded[1] / pw, padded[0] / ph] * 2)  # x, y, x, y
        loss_cls, loss_bbox, loss_mask = cls_all.new_zeros(()), cls_all.new_zeros(()), cls_all.new_zeros(())
        num_total, num_masks = 0, 0
        segm_targets = torch.zeros_like(segm)
        for b, t in enumerate(targets):
            gt_boxes, gt_labels, gt_masks = t["boxes"].float(), t["labels"].long(), t["masks"]
            matched, positive, negative = match_anchors(anchors_all, gt_boxes, o["pos_iou_thresh"], o["neg_iou_thresh"])
            labels = torch.where(positive, gt_labels[matched] if len(gt_labels) else matched, 0)  # (A,)
            ce = F.cross_entropy(cls_all[b], labels, reduction="none")  # (A,)
            hard = hard_negative_mask(ce, positive, negative, o["neg_pos_ratio"])
            loss_cls = loss_cls + ce[positive | hard].sum()
            num_total += max(int(positive.sum()), 1)
            for label, mask in zip(gt_labels.tolist(), _downsample_masks(gt_masks, padded, segm.shape[-2:])):
                segm_targets[b, label - 1] = torch.maximum(segm_targets[b, label - 1], mask)  # per-class union
            pos = torch.nonzero(positive).flatten()
            if pos.numel() == 0:
                continue
            gt_idx = matched[pos]
            deltas = encode_boxes(anchors_all[pos], gt_boxes[gt_idx])
            loss_bbox = loss_bbox + F.smooth_l1_loss(reg_all[b, pos], deltas, beta=1.0, reduction="sum")
            if pos.numel() > o["max_masks_to_train"]:  # full-image masks are costly: train a random subset
                pick = torch.randperm(pos.numel(), device=pos.device)[: o["max_masks_to_train"]]
                pos, gt_idx = pos[pick], gt_idx[pick]
            logits = assemble_masks(prototypes[b].float(), coeff_all[b, pos].float())  # (P, ph, pw)
            mask_targets = _downsample_masks(gt_masks, padded, (ph, pw))[gt_idx]
            boxes = gt_boxes[gt_idx] / proto_stride  # prototype coordinates
            region = _box_region(boxes, ph, pw, o["crop_padding"])
            bce = F.binary_cross_entropy_with_logits(logits, mask_targets, reduction="none") * region
            area = (boxes[:, 2] - boxes[:, 0]).clamp(min=1) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
            loss_mask = loss_mask + (bce.sum(dim=(1, 2)) / area).sum()
            num_masks += pos.numel()
        bsz, _, sh, sw = segm.shape
        loss_segm = F.binary_cross_entropy_with_logits(segm.float(), segm_targets, reduction="sum") / (bsz * sh * sw)
        losses = {
            "loss_cls": loss_cls / num_total,
            "loss_bbox": loss_bbox / num_total,
            "loss_mask": loss_mask / max(num_masks, 1),
            "loss_segm": loss_segm,
        }
        if num_masks == 0:  # keep every head in the graph, so DDP and gradient checks see all parameters
            zero = sum(x.sum() for x in (*reg, *coeff, prototypes)) * 0.0
            losses["loss_bbox"] = losses["loss_bbox"] + zero
        return {k: v * self.loss_weights[k] for k, v in losses.items()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _detect(
        self,
        b: int,
        cls: list[torch.Tensor],
        reg: list[torch.Tensor],
        coeff: list[torch.Tensor],
        prototypes: torch.Tensor,
        anchors: list[torch.Tensor],
        image_size: tuple[int, int],
        padded: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        o = self.options
        boxes, scores, coeffs = [], [], []
        for c, r, k, a in zip(cls, reg, coeff, anchors):
            s = c[b].float().softmax(-1)  # (n, num_classes)
            if s.shape[0] > o["pre_nms_top_n"]:
                top = s[:, 1:].max(-1).values.topk(o["pre_nms_top_n"]).indices
                s, r_b, k_b, a = s[top], r[b, top], k[b, top], a[top]
            else:
                r_b, k_b = r[b], k[b]
            boxes.append(decode_boxes(a, r_b.float(), image_size=image_size))
            scores.append(s[:, 1:])
            coeffs.append(k_b)
        boxes_all, scores_all, coeffs_all = torch.cat(boxes), torch.cat(scores), torch.cat(coeffs)
        anchor_idx, cls_idx = torch.nonzero(scores_all > o["score_thresh"], as_tuple=True)
        cand_boxes, cand_scores = boxes_all[anchor_idx], scores_all[anchor_idx, cls_idx]
        cand_labels = cls_idx + 1
        if o["box_nms"] == "fast":
            keep = fast_nms(cand_boxes, cand_scores, cand_labels, o["nms_iou"], o["top_k"])[: o["max_detections"]]
            det_scores = cand_scores[keep]
        else:  # Soft-NMS over the top_k candidates of each class
            pre = _top_k_per_class(cand_scores, cand_labels, o["top_k"])
            method = "linear" if o["box_nms"] == "soft_linear" else "gaussian"
            kept, decayed = soft_nms(
                cand_boxes[pre], cand_scores[pre], cand_labels[pre], method, o["soft_nms_sigma"], o["nms_iou"],
                max(o["score_thresh"], 1e-3),
            )  # fmt: skip
            keep, det_scores = pre[kept][: o["max_detections"]], decayed[: o["max_detections"]].to(cand_scores.dtype)
        det_boxes, det_labels = cand_boxes[keep], cand_labels[keep]
        probs = self._paste_masks(prototypes, coeffs_all[anchor_idx[keep]], det_boxes, image_size, padded)
        out = {
            "boxes": det_boxes.float(),
            "labels": det_labels.to(torch.int64),
            "scores": det_scores,
            "masks": probs > o["mask_thresh"],
        }
        if o["return_mask_probs"]:
            out["mask_probs"] = probs
        return out

    def _paste_masks(
        self,
        prototypes: torch.Tensor,
        coefficients: torch.Tensor,
        boxes: torch.Tensor,
        image_size: tuple[int, int],
        padded: tuple[int, int],
    ) -> torch.Tensor:
        """Probabilities ``(N, H, W)``: ``sigmoid(P C^T)`` cropped by ``boxes`` (input pixels, mapped to prototype
        cells), upsampled to the padded input and cropped to the image."""
        h, w = image_size
        if boxes.shape[0] == 0:
            return prototypes.new_zeros((0, h, w), dtype=torch.float32)
        ph, pw = prototypes.shape[-2:]
        stride = boxes.new_tensor([padded[1] / pw, padded[0] / ph] * 2)
        masks = assemble_masks(prototypes.float(), coefficients.float()).sigmoid()  # (N, ph, pw)
        masks = crop_masks(masks, boxes / stride, self.options["crop_padding"])
        masks = F.interpolate(masks[None], size=tuple(padded), mode="bilinear", align_corners=False)[0]
        return masks[:, :h, :w]


def _top_k_per_class(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores of every class (all of a class with fewer), by decreasing score."""
    order = scores.argsort(descending=True, stable=True)
    ranked_labels = labels[order]
    # rank of each candidate within its class: position minus the first position of its class in `order`
    _, class_order = ranked_labels.sort(stable=True)
    sorted_labels = ranked_labels[class_order]
    first = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[class_order] = torch.arange(len(order), device=order.device) - first
    return order[rank < k]


# --------------------------------------------------------------------------- options
def _check_options(opts: Mapping[str, Any], in_channels: int) -> dict[str, Any]:
    """Merge ``opts`` over the defaults and validate every value (one-line errors naming the argument)."""
    unknown = [k for k in opts if k not in _DEFAULTS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(_DEFAULTS), n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"YOLACT got unexpected option(s) {', '.join(hints)}; it takes: {', '.join(_DEFAULTS)}")
    o = {**_DEFAULTS, **opts}
    for name in _POSITIVE_INTS:
        check_positive_int(name, o[name])
    check_positive_int("max_detections", o["max_detections"])
    for name in _UNIT_FLOATS:
        value = o[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if o["neg_iou_thresh"] > o["pos_iou_thresh"]:
        raise ValueError(
            f"neg_iou_thresh must be <= pos_iou_thresh, got {o['neg_iou_thresh']!r} > {o['pos_iou_thresh']!r}"
        )
    for name in ("anchor_sizes", "aspect_ratios"):
        value = o[name]
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []
        if not values or not all(_positive_number(v) for v in values):
            raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got {value!r}")
        o[name] = tuple(float(v) for v in values)
    if len(o["anchor_sizes"]) < 3:
        raise ValueError(f"anchor_sizes needs one size per pyramid level, P3 and up (>= 3), got {o['anchor_sizes']!r}")
    if not _positive_number(o["anchor_scale"]):
        raise ValueError(f"anchor_scale must be a positive number, got {o['anchor_scale']!r}")
    if o["box_nms"] not in ("fast", "soft_linear", "soft_gaussian"):
        raise ValueError(f"box_nms must be 'fast', 'soft_linear' or 'soft_gaussian', got {o['box_nms']!r}")
    if not _positive_number(o["soft_nms_sigma"]):
        raise ValueError(f"soft_nms_sigma must be a number > 0, got {o['soft_nms_sigma']!r}")
    padding = o["crop_padding"]
    if isinstance(padding, bool) or not isinstance(padding, (int, float)) or not 0 <= padding < math.inf:
        raise ValueError(f"crop_padding must be a number >= 0 (prototype cells), got {padding!r}")
    check_normalisation(o, in_channels)
    if not isinstance(o["return_mask_probs"], bool):
        raise ValueError(f"return_mask_probs must be a bool, got {o['return_mask_probs']!r}")
    o["loss_weights"] = _check_loss_weights(o["loss_weights"])
    return o


def _positive_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_loss_weights(loss_weights: Mapping[str, float] | None) -> dict[str, float]:
    return check_loss_weights(loss_weights, _LOSS_WEIGHTS)


def _pyramid_indices(encoder: nn.Module, name: str) -> list[int]:
    """Positions of the last map at each reduction 8, 16, 32 in ``encoder.feature_info``."""
    info = getattr(encoder, "feature_info", None)
    if not info:
        raise ValueError(f"encoder {name!r} has no feature_info; expected a hierarchical backbone")
    reductions = [i["reduction"] for i in info]
    indices = []
    for r in (8, 16, 32):
        if r not in reductions:
            raise ValueError(
                f"encoder must give maps at reductions 8, 16 and 32 for YOLACT; {name!r} gives {reductions}"
            )
        indices.append(len(reductions) - 1 - reductions[::-1].index(r))
    return indices


def _build(
    encoder: str,
    num_classes: int,
    in_channels: int,
    encoder_weights: bool | str | os.PathLike | None,
    opts: Mapping[str, Any],
) -> YOLACT:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (it counts the background class 0), got {num_classes!r}")
    check_positive_int("in_channels", in_channels)
    options = _check_options(opts, in_channels)
    body = build_encoder(encoder, in_channels, encoder_weights)
    indices = _pyramid_indices(body, encoder)
    channels = [body.feature_info[i]["num_chs"] for i in indices]
    return YOLACT(body, indices, channels, num_classes, in_channels, options)


@register_model(task="instance")
def yolact(
    encoder: str = "resnet50",
    num_classes: int = 81,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> YOLACT:
    """YOLACT on any registered hierarchical backbone with maps at reductions 8, 16 and 32.

    Args:
        encoder: a registered backbone (``resnet18/34/50/101``, ``convnext_*``, ``swin_*``, ``mit_b*``,
            ``mobilenet_*`` ...); plain ViTs are refused.
        num_classes: classes including the background class 0 (COCO: 81, mmdetection's ``num_classes=80``).
        in_channels: image channels.
        encoder_weights: published backbone weights (``"imagenet"`` or a tag), a local checkpoint path, or
            ``None`` for random initialisation.
        **opts: the options of the module docstring: ``fpn_channels`` (256), ``num_protos`` (32),
            ``anchor_sizes`` ((8, 16, 32, 64, 128) px, one per level P3..), ``anchor_scale`` (3),
            ``aspect_ratios`` ((0.5, 1, 2)), ``pos_iou_thresh`` (0.5), ``neg_iou_thresh`` (0.4),
            ``neg_pos_ratio`` (3), ``max_masks_to_train`` (100 per image), ``crop_padding`` (1 prototype cell),
            ``loss_weights`` (dict over :data:`LOSS_NAMES`; default 1, 1.5, 6.125, 1), ``score_thresh`` (0.05),
            ``nms_iou`` (0.5), ``box_nms`` (``"fast"``; ``"soft_linear"`` / ``"soft_gaussian"``: Soft-NMS over the
            ``top_k`` candidates of each class, ``nms_iou`` as the linear method's threshold), ``soft_nms_sigma``
            (0.5, the Gaussian's width), ``pre_nms_top_n`` (1000 per level), ``top_k`` (200 per class before NMS),
            ``max_detections`` (100), ``mask_thresh`` (0.5), ``image_mean`` / ``image_std`` (``None``: images
            come normalised), ``return_mask_probs`` (False).
    """
    return _build(encoder, num_classes, in_channels, encoder_weights, opts)


@register_model(task="instance")
def yolact_resnet50_fpn(
    num_classes: int = 81,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> YOLACT:
    """YOLACT ResNet-50-FPN: mmdetection's ``yolact_r50_1xb8-55e_coco`` model (35,293,711 parameters with 81
    classes, as mmdetection 3.3.0 counts it with ``num_classes=80``). Arguments as :func:`yolact`."""
    return _build("resnet50", num_classes, in_channels, encoder_weights, opts)
