"""Panoptic FPN (Kirillov, Girshick, He, Dollár, "Panoptic Feature Pyramid Networks", CVPR 2019).

One FPN feeds two branches:

* an **instance branch**, our :class:`~maskworks.models.instance.MaskRCNN` (torchvision's detection framework: RPN,
  RoI heads, mask head) on the *thing* classes only. Detector label ``j`` (``1..T``) is the ``j - 1``-th entry of
  ``thing_classes``; 0 is the background. Its box regressor and mask predictor are class-specific for the ``T`` thing
  classes without the background row torchvision adds (``bbox_pred`` has ``4 T`` outputs, ``mask_fcn_logits`` ``T``
  channels), as in mmdetection's and detectron2's heads: that row is never trained nor read (only positive RoIs enter
  the box and mask losses, and inference reads the predicted class), so torchvision's code sees a zero background
  row (:class:`ThingBoxPredictor`, :class:`ThingMaskPredictor`).
* a **semantic branch** (:class:`PanopticFPNHead`, the paper's Fig. 3; mmdetection's ``PanopticFPNHead``,
  detectron2's ``SemSegFPNHead``) on P2-P5: per level, repeated 3x3 conv (128 channels, no bias) + GroupNorm(32) +
  ReLU + 2x bilinear upsampling until 1/4 scale (P2: one conv and no upsampling; P3: one stage; P4: two; P5: three),
  element-wise sum, 1x1 conv to ``S + 1`` classes (the ``S`` stuff classes in label order, then one "other" class
  for every thing pixel), bilinear x4 upsampling to the (padded) input resolution.

Training (``model(images, targets)``, the panoptic contract of :mod:`maskworks.tasks.panoptic`) returns the Mask R-CNN losses
(``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``) on the thing
segments (crowd segments and stuff segments are left out) plus ``loss_semantic``: cross-entropy of the semantic map
with every thing class merged into "other" and void (255) ignored, at the resized input resolution (detectron2's;
mmdetection 3 computes it at 1/4 scale), weighted by 0.5 (the paper's lambda_s; detectron2's
``SEM_SEG_HEAD.LOSS_WEIGHT`` and mmdetection's ``loss_seg`` weight).

Eval (``model(images)``) returns one dict per image: ``panoptic_seg (H, W) int32`` (0 = void) and ``segments_info``
(``id``, ``category_id`` = label ``0..K-1``, ``isthing``, ``score``), fused by :func:`panoptic_fpn_fusion`; plus
``semantic_logits (S + 1, H, W)`` at the input image's resolution (channels: ``model.stuff_classes`` in order, then
"other") and ``instances`` (the detections, ``boxes``, ``labels`` as dataset labels, ``scores``, bool ``masks`` at
the input size).

Options (keyword arguments, validated when the model is built): every option of
:mod:`maskworks.models.instance.mask_rcnn` (``min_size``, ``max_size``, ``image_mean``, ``rpn_*``, ``box_*``,
``mask_head`` ...), with ``loss_weights`` also taking ``"loss_semantic"`` (default 0.5); and

* ``semantic_channels`` (128) and ``semantic_num_groups`` (32): width and GroupNorm groups of the semantic head;
* ``score_threshold`` (0.5), ``overlap_threshold`` (0.5), ``stuff_area_limit`` (4096 pixels of the input image): the
  fusion's settings (detectron2's ``PANOPTIC_FPN.COMBINE`` defaults; see :func:`panoptic_fpn_fusion`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from maskworks.layers.conv import ConvNormAct
from maskworks.models._utils import build_encoder, check_positive_int
from maskworks.models.instance.mask_rcnn import (
    LOSS_NAMES,
    MaskRCNN,
    _check_options,
    _default_anchors,
    _encoder_fpn,
    _float_outputs,
)
from maskworks.registry import register_model

__all__ = [
    "PanopticFPN",
    "PanopticFPNHead",
    "ThingBoxPredictor",
    "ThingMaskPredictor",
    "panoptic_fpn",
    "panoptic_fpn_fusion",
    "panoptic_fpn_resnet50",
]

VOID = 255
# the options Panoptic FPN adds to Mask R-CNN's (option -> default)
_PANOPTIC_DEFAULTS: dict[str, Any] = {
    "semantic_channels": 128,
    "semantic_num_groups": 32,
    "score_threshold": 0.5,
    "overlap_threshold": 0.5,
    "stuff_area_limit": 4096,
}
SEMANTIC_LOSS_WEIGHT = 0.5  # the paper's lambda_s, detectron2's and mmdetection's default
# COCO panoptic in label order (contiguous labels of the 133 categories sorted by id): 80 things, then 53 stuff
_COCO_NUM_CLASSES, _COCO_NUM_THINGS = 133, 80


# --------------------------------------------------------------------------- fusion
def panoptic_fpn_fusion(
    masks: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    semantic: torch.Tensor,
    *,
    semantic_scores: torch.Tensor | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.5,
    stuff_area_limit: int = 4096,
    stuff_classes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Panoptic FPN's heuristic fusion of instance and semantic predictions into one panoptic map (Kirillov et al.,
    Sec. 3; panopticapi's ``combine_semantic_and_instance_predictions`` and detectron2's
    ``combine_semantic_and_instance_outputs``).

    1. Instances in order of decreasing score (ties: lower index first); the loop stops at the first with
       ``score < score_threshold``. Each instance's mask (``> mask_threshold`` for probabilities) keeps only the
       pixels no earlier instance took; it is dropped when it is empty or when the fraction of its mask already taken
       exceeds ``overlap_threshold`` (with the default 0.5: when less than half of it stays visible) or nothing of it
       is left. A higher-scored instance is never overwritten.
    2. Stuff: each label of the semantic map, on the pixels no instance took, becomes one segment when that area is
       at least ``stuff_area_limit`` pixels. Negative labels and 255 never become segments: they mark the semantic
       branch's "other/things" class and void; with ``stuff_classes`` only those labels do. Pixels left over stay
       void (0), thing pixels of the semantic branch that no instance covers included, as in the reference.

    Segment ids are ``1, 2, ...`` in the order the segments are made (things by score, then stuff by label), so
    every class, stuff class 0 included, is representable, ids never collide and no instance count overflows.

    Args:
        masks: ``(N, H, W)`` bool masks or mask probabilities of the instances at the output size.
        scores: ``(N,)`` instance scores.
        labels: ``(N,)`` instance class labels (reported as ``category_id``).
        semantic: ``(H, W)`` integer stuff label per pixel (the semantic branch's argmax mapped to class labels).
        semantic_scores: ``(H, W)`` optional per-pixel confidence of ``semantic``; a stuff segment's ``score`` is its
            mean over the segment (1.0 without it).
        score_threshold: instances scoring less are dropped (detectron2's ``INSTANCES_CONFIDENCE_THRESH``).
        mask_threshold: probability above which a pixel is in an instance's mask (ignored for bool masks).
        overlap_threshold: largest fraction of an instance's mask that earlier instances may already cover
            (detectron2's ``OVERLAP_THRESH``).
        stuff_area_limit: smallest stuff segment, in pixels (detectron2's ``STUFF_AREA_LIMIT``).
        stuff_classes: the labels that may form stuff segments (``None``: every label ``>= 0`` other than 255).

    Returns:
        ``(panoptic_seg, segments_info)``: an ``(H, W)`` int32 id map (0 = void) on ``semantic``'s device and one dict
        per segment, ``{"id", "category_id", "isthing", "score"}``. Every listed id covers at least one pixel, and
        every non-zero id of the map is listed.
    """
    if semantic.ndim != 2:
        raise ValueError(f"semantic must be an (H, W) label map, got shape {tuple(semantic.shape)}")
    h, w = semantic.shape
    n = masks.shape[0] if masks.ndim == 3 else -1
    if masks.ndim != 3 or masks.shape[1:] != (h, w) or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"masks (N, H, W), scores (N,) and labels (N,) must match the semantic map ({h}, {w}); got "
            f"{tuple(masks.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    if semantic_scores is not None and semantic_scores.shape != (h, w):
        raise ValueError(f"semantic_scores must be ({h}, {w}), got {tuple(semantic_scores.shape)}")
    for name, value in (
        ("score_threshold", score_threshold),
        ("mask_threshold", mask_threshold),
        ("overlap_threshold", overlap_threshold),
    ):
        _check_unit(name, value)
    if isinstance(stuff_area_limit, bool) or not isinstance(stuff_area_limit, int) or stuff_area_limit < 0:
        raise ValueError(f"stuff_area_limit must be an int >= 0, got {stuff_area_limit!r}")

    device = semantic.device
    panoptic = torch.zeros((h, w), dtype=torch.int32, device=device)
    segments: list[dict[str, Any]] = []
    binary = masks.to(device) if masks.dtype == torch.bool else masks.to(device) > mask_threshold
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True).tolist()
    score_list, label_list = scores.detach().float().cpu().tolist(), labels.detach().cpu().tolist()
    for i in order:
        score = score_list[i]
        if score < score_threshold:
            break
        mask = binary[i]
        area = int(mask.sum())
        if area == 0:
            continue
        visible = mask & (panoptic == 0)
        kept = int(visible.sum())
        if kept == 0 or (area - kept) / area > overlap_threshold:
            continue
        segment_id = len(segments) + 1
        panoptic[visible] = segment_id
        segments.append({"id": segment_id, "category_id": int(label_list[i]), "isthing": True, "score": score})

    free = panoptic == 0
    allowed = None if stuff_classes is None else {int(c) for c in stuff_classes}
    for label in torch.unique(semantic[free]).tolist():
        if label < 0 or label == VOID or (allowed is not None and label not in allowed):
            continue
        region = free & (semantic == label)
        area = int(region.sum())
        if area == 0 or area < stuff_area_limit:
            continue
        segment_id = len(segments) + 1
        panoptic[region] = segment_id
        score = 1.0 if semantic_scores is None else float(semantic_scores[region].float().mean())
        segments.append({"id": segment_id, "category_id": int(label), "isthing": False, "score": score})
    return panoptic, segments


def _check_unit(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


# --------------------------------------------------------------------------- heads
class PanopticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch on the FPN levels P2..P{num_levels + 1} (finest first).

    Level ``l`` (0 = P2) goes through ``max(l, 1)`` stages of 3x3 conv (``channels``, no bias) + GroupNorm +
    ReLU, each but P2's followed by 2x bilinear upsampling (``align_corners=False``), reaching P2's 1/4 scale; the
    levels are summed and a 1x1 conv (with bias) predicts ``num_classes`` logits, bilinearly upsampled to
    ``output_size`` when given. Children: ``scale_heads.{l}`` (``nn.Sequential`` of :class:`ConvNormAct` and
    ``nn.Upsample``), ``predictor``.

    Args:
        in_channels: channels of every FPN level (256).
        num_classes: output classes (Panoptic FPN: stuff classes + 1 "other").
        channels: width of the branch (128).
        num_levels: FPN levels used (4: P2-P5).
        num_groups: GroupNorm groups (32); must divide ``channels``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 54,
        channels: int = 128,
        num_levels: int = 4,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("channels", channels),
            ("num_levels", num_levels),
            ("num_groups", num_groups),
        ):
            check_positive_int(name, value)
        if channels % num_groups:
            raise ValueError(f"semantic_num_groups ({num_groups}) must divide semantic_channels ({channels})")
        norm = functools.partial(nn.GroupNorm, num_groups)
        self.num_classes = num_classes
        self.scale_heads = nn.ModuleList()
        for level in range(num_levels):
            stages: list[nn.Module] = []
            for k in range(max(level, 1)):
                stages.append(ConvNormAct(in_channels if k == 0 else channels, channels, 3, norm_layer=norm))
                if level > 0:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*stages))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        for m in self.scale_heads.modules():
            if isinstance(m, nn.Conv2d):  # Caffe2's MSRA fill, as detectron2 and mmcv's ConvModule
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.predictor.weight, std=0.01)  # mmdetection's PanopticFPNHead.init_weights
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int] | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes, h, w)`` at P2's size, or at ``output_size`` when given, from the FPN levels
        ``features`` (finest first; at least ``num_levels`` of them, the extra ones are ignored)."""
        if len(features) < len(self.scale_heads):
            raise ValueError(f"the semantic head needs {len(self.scale_heads)} FPN levels, got {len(features)}")
        x = self.scale_heads[0](features[0])
        for head, feature in zip(self.scale_heads[1:], features[1:]):
            y = head(feature)
            if y.shape[-2:] != x.shape[-2:]:  # a level whose size is not exactly P2's / 2**l (odd padded sizes)
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + y
        logits = self.predictor(x)
        if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
        return logits


class ThingBoxPredictor(nn.Module):
    """Box classifier and class-specific box regressor for ``num_classes - 1`` object classes plus background:
    ``cls_score`` ``Linear(in, num_classes)`` (background first, torchvision's order) and ``bbox_pred``
    ``Linear(in, 4 (num_classes - 1))``, without torchvision's never-trained background regression row (mmdetection's
    and detectron2's layout). ``forward`` returns torchvision's ``(scores, deltas)`` with zero background deltas
    in front, so torchvision's ``RoIHeads`` uses it as it is."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, (num_classes - 1) * 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), F.pad(self.bbox_pred(x), (4, 0))


class ThingMaskPredictor(MaskRCNNPredictor):
    """torchvision's ``MaskRCNNPredictor`` (``conv5_mask`` 2x2 transposed conv + ReLU, ``mask_fcn_logits`` 1x1 conv,
    same initialisation) with ``num_classes - 1`` mask channels, one per object class, without the background
    channel that is never trained; ``forward`` puts a zero background channel in front (torchvision's layout)."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__(in_channels, dim_reduced, num_classes - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.pad(super().forward(x), (0, 0, 0, 0, 1, 0))


# --------------------------------------------------------------------------- model
class PanopticFPN(MaskRCNN):
    """Panoptic FPN: :class:`~maskworks.models.instance.MaskRCNN` on the thing classes plus the semantic branch
    ``semantic_head`` (:class:`PanopticFPNHead`) on the same FPN (see the module docstring).

    Build it with :func:`panoptic_fpn` or :func:`panoptic_fpn_resnet50`. The detector's keys are torchvision's
    (``backbone``, ``rpn``, ``roi_heads``), the semantic branch's are under ``semantic_head``.

    Attributes:
        num_classes: panoptic classes ``K`` (labels ``0..K-1``).
        thing_classes, stuff_classes: the labels of each kind, ascending.
        num_detector_classes: ``len(thing_classes) + 1`` (with the background).

    Args:
        backbone: FPN backbone (``OrderedDict`` with levels ``"0".."3"`` at reductions 4..32, plus ``"pool"``).
        num_classes: ``K``.
        thing_classes: labels of the thing classes.
        in_channels: image channels.
        options: validated Mask R-CNN options (``loss_weights`` without ``loss_semantic``).
        panoptic: validated Panoptic FPN options (``_PANOPTIC_DEFAULTS`` plus ``semantic_loss_weight``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        thing_classes: Sequence[int],
        in_channels: int,
        options: Mapping[str, Any],
        panoptic: Mapping[str, Any],
    ) -> None:
        things = sorted(int(c) for c in thing_classes)
        super().__init__(backbone, len(things) + 1, in_channels, options, rpn_anchor_generator=_default_anchors())
        heads = self.roi_heads
        representation = heads.box_predictor.cls_score.in_features  # TwoMLPHead's 1024
        heads.box_predictor = ThingBoxPredictor(representation, len(things) + 1)
        heads.box_predictor.register_forward_hook(_float_outputs)  # as MaskRCNN does for its predictor
        mask_in = heads.mask_predictor.conv5_mask.in_channels
        heads.mask_predictor = ThingMaskPredictor(
            mask_in, heads.mask_predictor.conv5_mask.out_channels, len(things) + 1
        )
        self.num_detector_classes = len(things) + 1
        self.num_classes = num_classes
        self.thing_classes = things
        self.stuff_classes = [c for c in range(num_classes) if c not in set(things)]
        self.semantic_head = PanopticFPNHead(
            backbone.out_channels,
            len(self.stuff_classes) + 1,
            panoptic["semantic_channels"],
            num_levels=4,
            num_groups=panoptic["semantic_num_groups"],
        )
        self.semantic_loss_weight = float(panoptic["semantic_loss_weight"])
        self.score_threshold = float(panoptic["score_threshold"])
        self.overlap_threshold = float(panoptic["overlap_threshold"])
        self.stuff_area_limit = int(panoptic["stuff_area_limit"])
        # label -> semantic-head class (stuff: its index, thing: "other" = S, void: 255); head class -> label (-1: other)
        to_head = torch.full((256,), VOID, dtype=torch.int64)
        to_head[torch.tensor(self.stuff_classes, dtype=torch.int64)] = torch.arange(len(self.stuff_classes))
        to_head[torch.tensor(things, dtype=torch.int64)] = len(self.stuff_classes)
        self.register_buffer("_label_to_head", to_head, persistent=False)
        self.register_buffer(
            "_head_to_label", torch.tensor([*self.stuff_classes, -1], dtype=torch.int64), persistent=False
        )
        self.register_buffer("_detector_to_label", torch.tensor([-1, *things], dtype=torch.int64), persistent=False)

    # ------------------------------------------------------------------ training targets
    def _split_targets(
        self, targets: Sequence[Mapping[str, torch.Tensor]], images: Sequence[torch.Tensor]
    ) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        """The detector's targets (thing segments that are not crowd, labels ``1..T``) and the semantic targets in
        the head's classes (things -> "other", void 255), per image."""
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            raise ValueError(f"targets must be a list of {len(images)} dicts (one per image), got {targets!r:.80}")
        detector, semantic = [], []
        for i, (t, image) in enumerate(zip(targets, images)):
            missing = [k for k in ("boxes", "labels", "masks", "semantic") if k not in t]
            if missing:
                raise ValueError(
                    f"targets[{i}] lacks {missing}; expected boxes (N, 4), labels (N,), masks (N, H, W) of the "
                    "segments and semantic (H, W) (see the panoptic contract)"
                )
            labels, boxes, masks, sem = t["labels"], t["boxes"], t["masks"], t["semantic"]
            n, size = labels.shape[0], tuple(image.shape[-2:])
            if boxes.shape != (n, 4) or masks.shape != (n, *size) or tuple(sem.shape) != size:
                raise ValueError(
                    f"targets[{i}]: boxes {tuple(boxes.shape)}, masks {tuple(masks.shape)} and semantic "
                    f"{tuple(sem.shape)} must be ({n}, 4), ({n}, {size[0]}, {size[1]}) and {size}"
                )
            if n and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
                raise ValueError(f"targets[{i}]: labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
            sem = sem.long()
            if sem.numel() and not bool((((sem >= 0) & (sem < self.num_classes)) | (sem == VOID)).all()):
                raise ValueError(f"targets[{i}]: semantic labels must be in 0..{self.num_classes - 1} or 255 (void)")
            lut = self._label_to_head.to(labels.device)
            keep = lut[labels.long()] == len(self.stuff_classes)  # thing segments
            if "iscrowd" in t:
                keep &= t["iscrowd"].to(keep.device) == 0
            detector.append(
                {
                    "boxes": boxes[keep].float(),
                    "labels": self._thing_index(labels[keep]),
                    "masks": masks[keep],
                }
            )
            semantic.append(self._label_to_head.to(sem.device)[sem])
        return detector, semantic

    def _thing_index(self, labels: torch.Tensor) -> torch.Tensor:
        """Detector labels ``1..T`` of thing labels (their position in ``thing_classes`` plus one)."""
        things = self._detector_to_label.to(labels.device)[1:]
        return (labels.long()[:, None] == things[None]).long().argmax(1) + 1

    def _semantic_loss(
        self, logits: torch.Tensor, semantic: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Cross-entropy of the head's logits ``(B, S + 1, Hp, Wp)`` (the padded resized batch) against the semantic
        targets resized (nearest) as the images were, padded with void; mean over the non-void pixels."""
        target = torch.full((logits.shape[0], *logits.shape[-2:]), VOID, dtype=torch.int64, device=logits.device)
        for k, (sem, (h, w)) in enumerate(zip(semantic, image_sizes)):
            if tuple(sem.shape) != (h, w):  # torchvision resizes the masks the same way (nearest)
                sem = F.interpolate(sem[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
            target[k, :h, :w] = sem.to(logits.device)
        loss = F.cross_entropy(logits.float(), target, ignore_index=VOID, reduction="sum")
        return loss / (target != VOID).sum().clamp(min=1)

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, Any]]:
        """Training: the weighted loss dict. Eval: one panoptic dict per image (see the module docstring).

        Args:
            images: a list of ``(in_channels, H, W)`` tensors (sizes may differ) or a ``(B, in_channels, H, W)``
                tensor, normalised as ``image_mean`` / ``image_std`` say.
            targets: training only, per image (the panoptic contract): ``boxes (N, 4)`` xyxy, ``labels (N,)`` in
                ``0..K-1``, ``masks (N, H, W)`` of every segment (things and stuff; stuff segments are not used),
                optional ``iscrowd (N,)`` (crowd segments are left out of the detector's targets), and ``semantic
                (H, W)`` int64 labels with 255 = void.
        """
        image_list = self._image_list(images)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in image_list]
        if self.training:
            if targets is None:
                raise ValueError("in training, targets must be given (model.eval() for predictions)")
            detector_targets, semantic = self._split_targets(targets, image_list)
        else:
            detector_targets, semantic = None, []
        self.transform.paste_probs = self.return_mask_probs
        batch, detector_targets = self.transform(image_list, detector_targets)
        if detector_targets is not None:
            for i, t in enumerate(detector_targets):
                degenerate = t["boxes"][:, 2:] <= t["boxes"][:, :2]
                if bool(degenerate.any()):
                    j = int(torch.where(degenerate.any(1))[0][0])
                    raise ValueError(
                        f"targets[{i}]: thing boxes must have positive width and height, got {t['boxes'][j].tolist()}"
                    )
        features = self.backbone(batch.tensors)
        logits = self.semantic_head([features[k] for k in ("0", "1", "2", "3")], batch.tensors.shape[-2:])
        proposals, proposal_losses = self.rpn(batch, features, detector_targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, detector_targets)
        if self.training:
            losses = {**detector_losses, **proposal_losses}
            losses = {
                k: v * self.loss_weights[k] if self.loss_weights.get(k, 1.0) != 1.0 else v for k, v in losses.items()
            }
            losses["loss_semantic"] = (
                self._semantic_loss(logits, semantic, batch.image_sizes) * self.semantic_loss_weight
            )
            return losses
        detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        out = []
        for k, (det, (h, w), (oh, ow)) in enumerate(zip(detections, batch.image_sizes, original_sizes)):
            if det["masks"].dtype != torch.bool:  # probabilities (N, 1, H, W), pasted at the input size
                probs = det.pop("masks")[:, 0]
                det["masks"] = probs > 0.5
                if self.return_mask_probs:
                    det["mask_probs"] = probs
            det["labels"] = self._detector_to_label.to(det["labels"].device)[det["labels"]]
            sem = logits[k : k + 1, :, :h, :w]
            if (h, w) != (oh, ow):
                sem = F.interpolate(sem, size=(oh, ow), mode="bilinear", align_corners=False)
            sem = sem[0]
            confidence, head_class = sem.float().softmax(0).max(0)
            panoptic, segments = panoptic_fpn_fusion(
                det["masks"],
                det["scores"],
                det["labels"],
                self._head_to_label.to(head_class.device)[head_class],
                semantic_scores=confidence,
                score_threshold=self.score_threshold,
                overlap_threshold=self.overlap_threshold,
                stuff_area_limit=self.stuff_area_limit,
            )
            out.append({"panoptic_seg": panoptic, "segments_info": segments, "semantic_logits": sem, "instances": det})
        return out


# --------------------------------------------------------------------------- constructors
def _check_classes(num_classes: int, thing_classes: Sequence[int] | None) -> list[int]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= VOID:
        raise ValueError(f"num_classes must be an int in 2..255 (255 is void), got {num_classes!r}")
    if thing_classes is None:
        if num_classes != _COCO_NUM_CLASSES:
            raise ValueError(
                "thing_classes (the labels of the countable classes) is required unless num_classes=133 (COCO "
                f"panoptic, whose first 80 labels are things); got num_classes={num_classes}"
            )
        return list(range(_COCO_NUM_THINGS))
    things = list(thing_classes) if isinstance(thing_classes, Sequence) and not isinstance(thing_classes, str) else None
    if (
        not things
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes for c in things)
        or len(set(things)) != len(things)
    ):
        raise ValueError(
            f"thing_classes must be a non-empty list of distinct labels in 0..{num_classes - 1}, got {thing_classes!r}"
        )
    return sorted(things)


def _check_panoptic_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Split Panoptic FPN's own options (and ``loss_weights["loss_semantic"]``) off ``opts`` (modified)."""
    panoptic = {k: opts.pop(k, v) for k, v in _PANOPTIC_DEFAULTS.items()}
    check_positive_int("semantic_channels", panoptic["semantic_channels"])
    check_positive_int("semantic_num_groups", panoptic["semantic_num_groups"])
    if panoptic["semantic_channels"] % panoptic["semantic_num_groups"]:
        raise ValueError(
            f"semantic_num_groups ({panoptic['semantic_num_groups']}) must divide semantic_channels "
            f"({panoptic['semantic_channels']})"
        )
    _check_unit("score_threshold", panoptic["score_threshold"])
    _check_unit("overlap_threshold", panoptic["overlap_threshold"])
    limit = panoptic["stuff_area_limit"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"stuff_area_limit must be an int >= 0, got {limit!r}")
    weights = opts.get("loss_weights")
    panoptic["semantic_loss_weight"] = SEMANTIC_LOSS_WEIGHT
    if isinstance(weights, Mapping) and "loss_semantic" in weights:
        weights = dict(weights)
        value = weights.pop("loss_semantic")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"loss_weights['loss_semantic'] must be a finite number >= 0, got {value!r}")
        panoptic["semantic_loss_weight"] = float(value)
        opts["loss_weights"] = weights
    elif weights is not None and isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in LOSS_NAMES]
        if unknown:
            raise ValueError(
                f"loss_weights has unknown loss {unknown[0]!r}; the losses are {[*LOSS_NAMES, 'loss_semantic']}"
            )
    return panoptic


def _build(
    encoder: str,
    num_classes: int,
    thing_classes: Sequence[int] | None,
    in_channels: int,
    encoder_weights: bool | str | os.PathLike | None,
    opts: Mapping[str, Any],
) -> PanopticFPN:
    things = _check_classes(num_classes, thing_classes)
    check_positive_int("in_channels", in_channels)
    opts = dict(opts)
    panoptic = _check_panoptic_options(opts)
    options = _check_options(opts, {}, in_channels)
    body = build_encoder(encoder, in_channels, encoder_weights)
    return PanopticFPN(_encoder_fpn(body, encoder, None), num_classes, things, in_channels, options, panoptic)


@register_model(task="panoptic")
def panoptic_fpn(
    encoder: str = "resnet50",
    num_classes: int = _COCO_NUM_CLASSES,
    thing_classes: Sequence[int] | None = None,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> PanopticFPN:
    """Panoptic FPN on any registered hierarchical backbone (maps at reductions 4, 8, 16, 32; see
    :func:`~maskworks.models.instance.mask_rcnn.mask_rcnn`).

    Args:
        encoder: a registered backbone (``resnet18/34/50/101``, ``convnext_*``, ``swin_*``, ``mit_b*`` ...).
        num_classes: panoptic classes ``K`` (things and stuff; labels ``0..K-1``, at most 255).
        thing_classes: labels of the thing (countable) classes; ``None`` only with ``num_classes=133``, COCO
            panoptic's label order, whose first 80 labels are the things.
        in_channels: image channels.
        encoder_weights: published backbone weights (``"imagenet"`` or a tag), a local checkpoint path, or ``None``.
        **opts: Mask R-CNN's options (:mod:`maskworks.models.instance.mask_rcnn`; ``loss_weights`` also takes
            ``"loss_semantic"``, default 0.5) and ``semantic_channels``, ``semantic_num_groups``,
            ``score_threshold``, ``overlap_threshold``, ``stuff_area_limit`` (module docstring).
    """
    return _build(encoder, num_classes, thing_classes, in_channels, encoder_weights, opts)


@register_model(task="panoptic")
def panoptic_fpn_resnet50(
    num_classes: int = _COCO_NUM_CLASSES,
    thing_classes: Sequence[int] | None = None,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> PanopticFPN:
    """Panoptic FPN R50-FPN: :func:`panoptic_fpn` with ``encoder="resnet50"``.

    With COCO panoptic's 133 classes (80 things, 53 stuff) it has 46,027,110 parameters, exactly mmdetection's
    ``panoptic-fpn_r50_fpn_1x_coco`` (ResNet-50 with every layer's parameters counted, FPN, RPN, 2fc box head with
    class-specific regression for the 80 things, 4conv mask head with 80 mask channels: 44,396,336; semantic head:
    1,630,774). It is torchvision's ``maskrcnn_resnet50_fpn`` with 81 classes (44,400,693) less the 4,100 + 257
    parameters of the background row of its box regressor and mask predictor, which are never trained.
    Arguments as :func:`panoptic_fpn`."""
    return _build("resnet50", num_classes, thing_classes, in_channels, encoder_weights, opts)
