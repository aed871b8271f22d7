"""SOLOv2 (Wang, Zhang, Kong, Li, Shen, "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020).

A box-free single-stage instance segmenter: each FPN level is divided into an ``S x S`` grid and every grid cell
predicts a category (``C`` sigmoid scores) and a *dynamic kernel*; the kernel of a cell, a 1x1 convolution over
one unified mask feature map at 1/4 resolution, gives the mask of the object whose centre falls in that cell.
Architecture and hyper-parameters follow mmdetection's ``solov2_r50_fpn_1x_coco`` (``SOLOV2Head`` with
``MaskFeatModule``):

* **Backbone**: a maskworks encoder's maps at reductions 4, 8, 16, 32 feed torchvision's ``FeaturePyramidNetwork``
  with a max-pooled P6 (P2-P6, 256 channels; the same layers and parameters as mmdet's FPN with ``start_level=0,
  num_outs=5``). A ResNet keeps torchvision's body keys (``backbone.body.layer1...``), as in Mask R-CNN.
* **Category and kernel branches** (``mask_head``): P2 is resized to P3's size and P6 to P5's; each level gets
  two normalised coordinate channels (CoordConv), is resized bilinearly to its grid ``S`` (40, 36, 24, 16, 12) and
  goes through ``stacked_convs`` 3x3 conv-GroupNorm-ReLU blocks of ``feat_channels`` (512) into a 3x3 conv
  predicting the kernel (``mask_out_channels`` weights: a 1x1 kernel) per cell; the category branch sees the same
  resized features without the coordinates, through its own blocks into ``C`` logits per cell.
* **Unified mask feature branch** (``mask_head.mask_feature_head``): P2..P5, level ``i`` through ``max(i, 1)``
  conv-GN-ReLU blocks of ``mask_feat_channels`` (128) with a 2x bilinear upsampling after each (P5 with coordinate
  channels), summed at 1/4 resolution, then a 1x1 conv-GN-ReLU to ``mask_out_channels`` (256).
* **Targets**: an object (box side ``sqrt(w h)`` in pixels) goes to every level whose ``scale_ranges`` interval
  holds it. In a level of grid ``S`` it is positive in the cells of its *centre region*: the cells that the box
  ``(c_y +- pos_scale * h / 2, c_x +- pos_scale * w / 2)`` around its mask's centre of mass touches (cell of a
  point ``y``: ``floor(y / H_pad * S)``), limited to the 3x3 cells around the centre's own cell
  (:func:`center_cells`). A cell claimed by two objects goes to the later one.
* **Losses**: sigmoid focal loss over all cells (``alpha`` 0.25, ``gamma`` 2, summed and divided by the number
  of positive cells + 1, weight 1) and Dice loss ``1 - 2 sum(p q) / (sum p^2 + sum q^2)`` of each positive
  cell's mask against its object's mask at 1/4 resolution (mean over positive cells, weight 3). In training
  ``model(images, targets)`` returns ``{"loss_cls", "loss_mask"}``, each multiplied by its weight.
* **Inference**: category scores are kept at local maxima of 2x2 windows (mmdet's point NMS) and above
  ``score_thresh``; each kept (cell, class) gives a soft mask, binarised at ``mask_thresh``; masks whose area at
  1/4 resolution is not larger than their level's stride are dropped; the score is multiplied by the mean
  probability inside the binary mask (mask scoring); the best ``nms_pre`` go through Matrix NMS
  (:func:`maskworks.ops.matrix_nms`, Gaussian kernel, ``sigma`` 2, class-aware), scores below ``filter_thresh``
  are dropped and the best ``max_detections`` kept. Soft masks are upsampled 4x, cropped to the image and
  thresholded; boxes are the masks' tight boxes (pixel-edge convention, ``x2`` = last column + 1).

Output contract (DESIGN.md "Instance output"): in eval ``model(images)`` returns one dict per image with
``boxes (N, 4)`` xyxy float32, ``labels (N,)`` int64 in ``1..num_classes-1`` (``num_classes`` counts the
background 0, so 81 is COCO's 80 classes), ``scores (N,)`` and ``masks (N, H, W)`` bool at the input size.

Images are taken at their size, already normalised (as maskworks datasets deliver them; there is no resizing and
no mean / std inside the model): a batch is zero-padded at the bottom and right to the largest height and width,
rounded up to a multiple of 32 (mmdet's ``pad_size_divisor=32``); grids cover the padded batch, as in mmdet, and
predictions are cropped back to each image.

Options (keyword arguments of every constructor, validated when the model is built): ``fpn_channels`` (256),
``feat_channels`` (512), ``stacked_convs`` (4), ``mask_feat_channels`` (128), ``mask_out_channels`` (256),
``num_groups`` (32, of every GroupNorm), ``num_grids``, ``scale_ranges``, ``strides`` ((8, 8, 16, 32, 32): the
area filter of inference), ``pos_scale`` (0.2), ``focal_alpha`` (0.25), ``focal_gamma`` (2.0), ``loss_weights``
(``{"loss_cls": 1.0, "loss_mask": 3.0}``), ``score_thresh`` (0.1), ``mask_thresh`` (0.5), ``nms_pre`` (500),
``nms_kernel`` (``"gaussian"`` or ``"linear"``), ``nms_sigma`` (2.0), ``filter_thresh`` (0.05),
``max_detections`` (100).

Differences from mmdetection, on purpose: the backbone is fully trainable with plain BatchNorm (mmdet freezes the
stem and stage 1 and keeps BatchNorm in eval mode: a training-recipe choice, not architecture); target masks are
downsampled with ``F.interpolate`` (bilinear) and ``>= 0.5`` instead of OpenCV's ``imrescale``; a cell claimed by
two objects trains only the later one's mask (mmdet trains both masks there but labels it with the later one);
detections whose mask is empty inside the image (it lies in the padding) are dropped; boxes are filled from the
masks (mmdet returns zeros).
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

from maskworks.backbones.resnet import ResNet
from maskworks.losses.focal import focal_loss
from maskworks.losses.overlap import dice_loss
from maskworks.models._utils import build_encoder, check_positive_int
from maskworks.models.instance._common import check_image_list, check_loss_weights, check_targets, pad_batch
from maskworks.models.instance.mask_rcnn import EncoderBody, FPNBackbone, _pyramid_indices, _resnet_body
from maskworks.ops.nms import matrix_nms
from maskworks.registry import register_model

__all__ = [
    "LOSS_NAMES",
    "MaskFeatureHead",
    "SOLOv2",
    "SOLOv2Head",
    "center_cells",
    "solov2",
    "solov2_resnet50_fpn",
    "solov2_targets",
]

LOSS_NAMES: tuple[str, ...] = ("loss_cls", "loss_mask")
NUM_LEVELS = 5  # P2..P6
SIZE_DIVISOR = 32  # the batch is padded to a multiple of this (the coarsest backbone reduction)
MASK_STRIDE = 4  # the unified mask feature map is at 1/4 of the padded batch
_DICE_EPS = 1e-3  # added to sum(p^2) and to sum(q^2) in the Dice denominator, as mmdet's DiceLoss

# option -> default (mmdet's solov2_r50_fpn_1x_coco); see the module docstring
_DEFAULTS: dict[str, Any] = {
    "fpn_channels": 256,
    "feat_channels": 512,
    "stacked_convs": 4,
    "mask_feat_channels": 128,
    "mask_out_channels": 256,
    "num_groups": 32,
    "num_grids": (40, 36, 24, 16, 12),
    "scale_ranges": ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)),
    "strides": (8, 8, 16, 32, 32),
    "pos_scale": 0.2,
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
    "loss_weights": None,
    "score_thresh": 0.1,
    "mask_thresh": 0.5,
    "nms_pre": 500,
    "nms_kernel": "gaussian",
    "nms_sigma": 2.0,
    "filter_thresh": 0.05,
    "max_detections": 100,
}
_DEFAULT_LOSS_WEIGHTS = {"loss_cls": 1.0, "loss_mask": 3.0}
_POSITIVE_INTS = (
    "fpn_channels",
    "feat_channels",
    "stacked_convs",
    "mask_feat_channels",
    "mask_out_channels",
    "num_groups",
    "nms_pre",
    "max_detections",
)
_UNIT_FLOATS = ("focal_alpha", "score_thresh", "mask_thresh", "filter_thresh")  # in [0, 1]


# --------------------------------------------------------------------------- layers
class ConvGNReLU(nn.Module):
    """Conv (no bias) -> GroupNorm -> ReLU, with mmcv ``ConvModule``'s attribute names (``conv``, ``gn``).

    Args:
        in_channels, out_channels: channels.
        kernel_size: square kernel size (padding keeps the spatial size).
        num_groups: GroupNorm groups (must divide ``out_channels``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.gn(self.conv(x)))


def coord_channels(x: torch.Tensor) -> torch.Tensor:
    """CoordConv's two channels for ``x (B, C, H, W)``: ``x`` then ``y`` coordinates, each from -1 to 1 across the
    map (``(B, 2, H, W)``, ``x``'s dtype and device)."""
    b, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])  # (2, H, W)
    return grid[None].expand(b, 2, h, w)


def _with_coords(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, coord_channels(x)], dim=1)  # (B, C + 2, H, W)


class MaskFeatureHead(nn.Module):
    """SOLOv2's unified mask feature branch: FPN levels P2..P5 fused at P2's resolution (1/4).

    Level ``i`` goes through ``max(i, 1)`` conv-GN-ReLU blocks, each but level 0's followed by a 2x bilinear
    upsampling (``convs_all_levels[i].conv{j}`` / ``.upsample{j}``); the coarsest level carries two coordinate
    channels. The sum goes through a 1x1 conv-GN-ReLU (``conv_pred``).

    Args:
        in_channels: channels of the FPN levels.
        feat_channels: channels of the per-level blocks.
        out_channels: channels of the unified mask features (the dynamic kernels' input size).
        num_groups: GroupNorm groups.
        num_levels: number of FPN levels fused (4: P2..P5).
    """

    def __init__(
        self, in_channels: int, feat_channels: int, out_channels: int, num_groups: int = 32, num_levels: int = 4
    ) -> None:
        super().__init__()
        self.convs_all_levels = nn.ModuleList()
        for i in range(num_levels):
            level = nn.Sequential()
            if i == 0:
                level.add_module("conv0", ConvGNReLU(in_channels, feat_channels, 3, num_groups))
            for j in range(i):
                chn = (in_channels + (2 if i == num_levels - 1 else 0)) if j == 0 else feat_channels
                level.add_module(f"conv{j}", ConvGNReLU(chn, feat_channels, 3, num_groups))
                level.add_module(f"upsample{j}", nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.convs_all_levels.append(level)
        self.conv_pred = ConvGNReLU(feat_channels, out_channels, 1, num_groups)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``feats``: P2..P5 ``(B, C, H/4, W/4)`` .. ``(B, C, H/32, W/32)``. Returns ``(B, out_channels, H/4,
        W/4)``."""
        if len(feats) != len(self.convs_all_levels):
            raise ValueError(f"expected {len(self.convs_all_levels)} feature maps, got {len(feats)}")
        last = len(feats) - 1
        fused = self.convs_all_levels[0](feats[0])
        for i in range(1, len(feats)):
            x = _with_coords(feats[i]) if i == last else feats[i]
            fused = fused + self.convs_all_levels[i](x)
        return self.conv_pred(fused)


class SOLOv2Head(nn.Module):
    """SOLOv2's category and dynamic-kernel branches over ``S x S`` grids, plus the mask feature branch.

    Args:
        in_channels: channels of the FPN levels.
        num_classes: foreground classes (sigmoid scores; no background channel).
        feat_channels: channels of the stacked convs.
        stacked_convs: conv-GN-ReLU blocks in each branch.
        kernel_channels: weights of one dynamic kernel (the mask features' channels, 1x1 kernels).
        num_grids: grid size ``S`` of each level.
        num_groups: GroupNorm groups.
        mask_feature_head: the unified mask feature branch (:class:`MaskFeatureHead`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        feat_channels: int,
        stacked_convs: int,
        kernel_channels: int,
        num_grids: Sequence[int],
        num_groups: int,
        mask_feature_head: MaskFeatureHead,
    ) -> None:
        super().__init__()
        self.num_grids = tuple(num_grids)
        self.kernel_convs = nn.ModuleList(
            ConvGNReLU(in_channels + 2 if i == 0 else feat_channels, feat_channels, 3, num_groups)
            for i in range(stacked_convs)
        )
        self.cls_convs = nn.ModuleList(
            ConvGNReLU(in_channels if i == 0 else feat_channels, feat_channels, 3, num_groups)
            for i in range(stacked_convs)
        )
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.conv_kernel = nn.Conv2d(feat_channels, kernel_channels, 3, padding=1)
        self.mask_feature_head = mask_feature_head
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet's initialisation: convs ``N(0, 0.01)`` with zero bias, the class bias at prior probability 0.01."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """``feats``: P2..P6. Returns per level the kernels ``(B, E, S, S)`` and class logits ``(B, C, S, S)``, and
        the unified mask features ``(B, E, H/4, W/4)``."""
        if len(feats) != len(self.num_grids):
            raise ValueError(f"expected {len(self.num_grids)} feature maps, got {len(feats)}")
        mask_feats = self.mask_feature_head(feats[:-1])
        # P2 at P3's size and P6 at P5's (mmdet's resize_feats)
        feats = [
            F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear", align_corners=False),
            *feats[1:-1],
            F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear", align_corners=False),
        ]
        kernels, logits = [], []
        for x, grid in zip(feats, self.num_grids):
            x = F.interpolate(_with_coords(x), size=(grid, grid), mode="bilinear", align_corners=False)  # (B,C+2,S,S)
            kernel_feat, cls_feat = x, x[:, :-2]  # the category branch has no coordinates
            for conv in self.kernel_convs:
                kernel_feat = conv(kernel_feat)
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            kernels.append(self.conv_kernel(kernel_feat))
            logits.append(self.conv_cls(cls_feat))
        return kernels, logits, mask_feats


# --------------------------------------------------------------------------- targets
def center_cells(
    center: tuple[float, float],
    box: Sequence[float],
    num_grid: int,
    image_size: tuple[int, int],
    pos_scale: float = 0.2,
) -> tuple[int, int, int, int]:
    """The positive cells of one object in an ``S x S`` grid over ``image_size``: SOLO's centre region.

    The centre region is the box of half-sides ``pos_scale * h / 2`` and ``pos_scale * w / 2`` (``h``, ``w`` of
    the object's box) around the mask's centre of mass; its cells (cell of ``y``: ``floor(y / H * S)``, clipped
    to the grid) are positive, limited to the 3x3 cells around the centre's cell.

    Args:
        center: ``(c_y, c_x)`` centre of mass in pixels.
        box: ``(x1, y1, x2, y2)`` of the object.
        num_grid: ``S``.
        image_size: ``(H, W)`` the grid covers (the padded batch).
        pos_scale: the centre region's scale ``epsilon`` (0.2 in SOLO).

    Returns:
        ``(top, bottom, left, right)``: inclusive row and column ranges of the positive cells.
    """
    cy, cx = center
    x1, y1, x2, y2 = (float(v) for v in box)
    h, w = image_size
    half_h, half_w = 0.5 * (y2 - y1) * pos_scale, 0.5 * (x2 - x1) * pos_scale

    def cell(v: float, size: int) -> int:
        return math.floor(v * num_grid / size)

    row, col = min(cell(cy, h), num_grid - 1), min(cell(cx, w), num_grid - 1)
    top = max(0, cell(cy - half_h, h), row - 1)
    bottom = min(num_grid - 1, cell(cy + half_h, h), row + 1)
    left = max(0, cell(cx - half_w, w), col - 1)
    right = min(num_grid - 1, cell(cx + half_w, w), col + 1)
    return top, bottom, left, right


def _centers_of_mass(masks: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` centre of mass ``(c_y, c_x)`` in pixel indices of ``(N, H, W)`` masks (NaN for empty ones)."""
    m = masks.to(torch.float64)
    area = m.sum((1, 2))
    ys = torch.arange(m.shape[1], device=m.device, dtype=m.dtype)
    xs = torch.arange(m.shape[2], device=m.device, dtype=m.dtype)
    cy = (m.sum(2) * ys).sum(1) / area
    cx = (m.sum(1) * xs).sum(1) / area
    return torch.stack([cy, cx], 1)


def solov2_targets(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    image_size: tuple[int, int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[tuple[float, float]],
    pos_scale: float = 0.2,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Grid targets of one image: per level, each cell's class and the object whose mask it must predict.

    An object whose box side ``sqrt(w h)`` lies in a level's ``scale_ranges`` interval (bounds included) labels
    the cells :func:`center_cells` gives in that level; later objects overwrite earlier ones. Objects with an
    empty mask are skipped.

    Args:
        boxes: ``(N, 4)`` xyxy in pixels.
        labels: ``(N,)`` class ids ``>= 1``.
        masks: ``(N, H, W)`` binary masks.
        image_size: ``(H, W)`` the grids cover (the padded batch).
        num_grids: ``S`` per level.
        scale_ranges: ``(low, high)`` per level.
        pos_scale: the centre region's scale.

    Returns:
        Per level ``(cell_labels, cell_objects)``, both ``(S * S,)`` int64 in row-major cell order: the class id
        (0 = background) and the index of the object (-1 = none).
    """
    device = labels.device
    out = []
    sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt().tolist()
    valid = masks.flatten(1).any(1).tolist()
    centers = _centers_of_mass(masks).tolist() if len(valid) else []
    box_list, label_list = boxes.tolist(), labels.tolist()
    for grid, (low, high) in zip(num_grids, scale_ranges):
        cell_labels = torch.zeros((grid, grid), dtype=torch.int64)
        cell_objects = torch.full((grid, grid), -1, dtype=torch.int64)
        for k, side in enumerate(sides):
            if not valid[k] or not low <= side <= high:
                continue
            top, bottom, left, right = center_cells(centers[k], box_list[k], grid, image_size, pos_scale)
            cell_labels[top : bottom + 1, left : right + 1] = label_list[k]
            cell_objects[top : bottom + 1, left : right + 1] = k
        out.append((cell_labels.flatten().to(device), cell_objects.flatten().to(device)))
    return out


# --------------------------------------------------------------------------- losses
def _dice_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SOLO's Dice loss ``1 - 2 sum(p q) / (sum p^2 + sum q^2 + 2 eps)`` of each mask: ``(P,)`` from ``(P, h, w)``
    logits and binary targets (:func:`maskworks.losses.dice_loss` with squared sums, one "class" per mask)."""
    return dice_loss(
        logits[None],
        targets[None].to(logits.dtype),
        mode="multilabel",
        squared=True,
        smooth=0.0,
        smooth_dr=2 * _DICE_EPS,
        mask_absent=False,
        ignore_index=None,
        reduction="none",
    )


def _downsample_masks(masks: torch.Tensor, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``(N, H, W)`` binary masks zero-padded to ``padded`` and resized bilinearly to ``size``, ``>= 0.5``: the
    mask targets at the mask features' resolution (bool ``(N, h, w)``)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=masks.device)
    m = F.pad(masks.float(), (0, padded[1] - masks.shape[-1], 0, padded[0] - masks.shape[-2]))
    return F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0] >= 0.5


# --------------------------------------------------------------------------- inference
def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel-edge convention, ``x2`` = last column + 1) of non-empty bool ``(N, H, W)`` masks."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ys, h).amin(1)
    y2 = torch.where(rows, ys, -1).amax(1) + 1
    x1 = torch.where(cols, xs, w).amin(1)
    x2 = torch.where(cols, xs, -1).amax(1) + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


def _empty_result(size: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
        "scores": torch.zeros(0, dtype=torch.float32, device=device),
        "masks": torch.zeros((0, *size), dtype=torch.bool, device=device),
    }


def _point_nms(probs: torch.Tensor) -> torch.Tensor:
    """Keep each score of ``(C, S, S)`` only where it is the maximum of the 2x2 window ending at it (mmdet)."""
    local_max = F.max_pool2d(probs, 2, stride=1, padding=1)[..., :-1, :-1]
    return probs * (local_max == probs)


def solov2_predict_single(
    kernels: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    mask_feats: torch.Tensor,
    image_size: tuple[int, int],
    options: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Detections of one image from its head outputs (see the module docstring, "Inference").

    Args:
        kernels: per level ``(E, S, S)`` dynamic kernels.
        logits: per level ``(C, S, S)`` class logits.
        mask_feats: ``(E, h, w)`` unified mask features of the padded batch (``h, w`` = padded size / 4).
        image_size: ``(H, W)`` of the image (its top-left part of the padded batch).
        options: the validated model options (thresholds, ``strides``, ``nms_*``, ``max_detections``).

    Returns:
        ``boxes``, ``labels`` (1-based), ``scores``, ``masks (N, H, W)`` bool, by decreasing score.
    """
    device = mask_feats.device
    probs = torch.cat([_point_nms(x.float().sigmoid()).flatten(1).T for x in logits])  # (M, C), M = sum S^2
    kernel_rows = torch.cat([k.flatten(1).T for k in kernels])  # (M, E)
    strides = torch.cat(
        [torch.full((k.shape[-2] * k.shape[-1],), float(s), device=device) for k, s in zip(kernels, options["strides"])]
    )
    cells, classes = torch.nonzero(probs > options["score_thresh"], as_tuple=True)
    if cells.numel() == 0:
        return _empty_result(image_size, device)
    scores = probs[cells, classes]
    mask_probs = torch.einsum("ne,ehw->nhw", kernel_rows[cells].float(), mask_feats.float()).sigmoid()  # (n, h, w)
    masks = mask_probs > options["mask_thresh"]
    area = masks.sum((1, 2)).float()
    keep = area > strides[cells]
    if not bool(keep.any()):
        return _empty_result(image_size, device)
    mask_probs, masks, area, scores, classes = mask_probs[keep], masks[keep], area[keep], scores[keep], classes[keep]
    scores = scores * (mask_probs * masks).sum((1, 2)) / area  # mask scoring ("maskness")
    order = scores.argsort(descending=True, stable=True)[: options["nms_pre"]]
    mask_probs, masks, scores, classes = mask_probs[order], masks[order], scores[order], classes[order]
    scores = matrix_nms(masks, scores, classes, kernel=options["nms_kernel"], sigma=options["nms_sigma"])
    order = torch.nonzero(scores >= options["filter_thresh"]).flatten()
    order = order[scores[order].argsort(descending=True, stable=True)][: options["max_detections"]]
    if order.numel() == 0:
        return _empty_result(image_size, device)
    h, w = image_size
    up = (mask_probs.shape[-2] * MASK_STRIDE, mask_probs.shape[-1] * MASK_STRIDE)
    full = F.interpolate(mask_probs[order][None], size=up, mode="bilinear", align_corners=False)[0, :, :h, :w]
    masks = full > options["mask_thresh"]  # (N, H, W)
    nonempty = masks.flatten(1).any(1)
    masks, order = masks[nonempty], order[nonempty]
    return {
        "boxes": _tight_boxes(masks),
        "labels": classes[order].to(torch.int64) + 1,
        "scores": scores[order].float(),
        "masks": masks,
    }


# --------------------------------------------------------------------------- model
class SOLOv2(nn.Module):
    """SOLOv2 with the maskworks instance contract (see the module docstring). Build it with :func:`solov2` or
    :func:`solov2_resnet50_fpn`.

    Args:
        backbone: module mapping ``(B, C, H, W)`` to an ordered dict of the five FPN maps P2..P6.
        mask_head: the :class:`SOLOv2Head`.
        num_classes: classes including the background class 0.
        in_channels: image channels.
        options: validated options (``_check_options``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        mask_head: SOLOv2Head,
        *,
        num_classes: int,
        in_channels: int,
        options: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_head = mask_head
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.options = dict(options)
        self.loss_weights: dict[str, float] = dict(options["loss_weights"])

    # ------------------------------------------------------------------ inputs
    def _image_list(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return check_image_list(images, self.in_channels)

    @staticmethod
    def _batch(images: list[torch.Tensor]) -> torch.Tensor:
        """Zero-pad the images at the bottom and right to one ``(B, C, H, W)``, ``H, W`` multiples of 32."""
        return pad_batch(images, SIZE_DIVISOR)

    def _check_targets(self, targets: Sequence[Mapping[str, torch.Tensor]], images: list[torch.Tensor]) -> None:
        check_targets(targets, images, self.num_classes)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training: the weighted loss dict ``{"loss_cls", "loss_mask"}``. Eval: one dict per image (boxes,
        labels, scores, bool masks at the image's size).

        Args:
            images: a list of ``(in_channels, H, W)`` normalised tensors (sizes may differ) or a ``(B, in_channels,
                H, W)`` tensor.
            targets: training only: per image ``boxes (N, 4)`` xyxy, ``labels (N,)`` int64 in
                ``1..num_classes-1``, ``masks (N, H, W)`` uint8 / bool; ``N = 0`` is allowed.
        """
        image_list = self._image_list(images)
        batch = self._batch(image_list)
        feats = list(self.backbone(batch).values())  # P2..P6
        kernels, logits, mask_feats = self.mask_head(feats)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode (call model.eval() to predict)")
            self._check_targets(targets, image_list)
            return self.losses(kernels, logits, mask_feats, targets, tuple(batch.shape[-2:]))
        sizes = [tuple(im.shape[-2:]) for im in image_list]
        return [
            solov2_predict_single(
                [k[b] for k in kernels], [x[b] for x in logits], mask_feats[b], sizes[b], self.options
            )
            for b in range(len(image_list))
        ]

    def losses(
        self,
        kernels: Sequence[torch.Tensor],
        logits: Sequence[torch.Tensor],
        mask_feats: torch.Tensor,
        targets: Sequence[Mapping[str, torch.Tensor]],
        padded_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Focal loss of the categories and Dice loss of the positive cells' masks, weighted (module docstring).

        Args:
            kernels: per level ``(B, E, S, S)``.
            logits: per level ``(B, C, S, S)``.
            mask_feats: ``(B, E, h, w)``.
            targets: per image ``boxes``, ``labels``, ``masks`` at the image's size.
            padded_size: ``(H, W)`` of the padded batch.
        """
        o = self.options
        num_fg = self.num_classes - 1
        cell_labels, mask_logits, mask_targets = [], [], []
        for b, t in enumerate(targets):
            levels = solov2_targets(
                t["boxes"], t["labels"], t["masks"], padded_size, o["num_grids"], o["scale_ranges"], o["pos_scale"]
            )
            small = _downsample_masks(t["masks"], padded_size, tuple(mask_feats.shape[-2:]))  # (N, h, w)
            for (labels, objects), kernel in zip(levels, kernels):
                cell_labels.append(labels)
                pos = torch.nonzero(objects >= 0).flatten()
                if pos.numel() == 0:
                    continue
                k = kernel[b].flatten(1)[:, pos].T  # (P, E)
                mask_logits.append(torch.einsum("pe,ehw->phw", k, mask_feats[b]))  # (P, h, w)
                mask_targets.append(small[objects[pos]])
        num_pos = sum(m.shape[0] for m in mask_logits)
        if num_pos:
            loss_mask = _dice_per_mask(torch.cat(mask_logits), torch.cat(mask_targets)).sum() / num_pos
        else:  # zero, with (zero) gradients reaching the kernel and mask branches
            loss_mask = mask_feats.sum() * 0 + sum(k.sum() for k in kernels) * 0
        # categories: all cells of every level and image, one-hot over the foreground classes
        flat_logits = torch.cat([x.permute(1, 0, 2, 3).flatten(1) for x in logits], 1)  # (C, sum_l B S_l^2)
        labels = torch.cat(
            [torch.stack(cell_labels[lvl :: len(kernels)]).flatten() for lvl in range(len(kernels))]
        )  # same order: level, image, cell
        one_hot = F.one_hot(labels, num_fg + 1)[:, 1:].T  # (C, N): background is no class
        loss_cls = focal_loss(
            flat_logits[None],
            one_hot[None],
            mode="multilabel",
            alpha=o["focal_alpha"],
            gamma=o["focal_gamma"],
            ignore_index=None,
            reduction="sum",
        ) / (num_pos + 1)
        w = self.loss_weights
        return {"loss_cls": loss_cls * w["loss_cls"], "loss_mask": loss_mask * w["loss_mask"]}


# --------------------------------------------------------------------------- construction
def _check_levels(name: str, value: Any, check: Any) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if values is None or len(values) != NUM_LEVELS or not all(check(v) for v in values):
        raise ValueError(f"{name} must be {NUM_LEVELS} entries (one per level P2..P6), got {value!r}")
    return values


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_loss_weights(loss_weights: Mapping[str, float] | None) -> dict[str, float]:
    return check_loss_weights(loss_weights, _DEFAULT_LOSS_WEIGHTS)


def _check_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``opts`` over the defaults and validate every value (one-line errors naming the argument)."""
    unknown = [k for k in opts if k not in _DEFAULTS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(_DEFAULTS), n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"SOLOv2 got unexpected option(s) {', '.join(hints)}; it takes: {', '.join(_DEFAULTS)}")
    o = {**_DEFAULTS, **opts}
    for name in _POSITIVE_INTS:
        check_positive_int(name, o[name])
    for name in ("feat_channels", "mask_feat_channels", "mask_out_channels"):
        if o[name] % o["num_groups"]:
            raise ValueError(f"num_groups={o['num_groups']} must divide {name}={o[name]} (GroupNorm)")
    for name in _UNIT_FLOATS:
        if not _is_number(o[name]) or not 0.0 <= o[name] <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {o[name]!r}")
    o["num_grids"] = _check_levels("num_grids", o["num_grids"], lambda v: isinstance(v, int) and v > 0)
    o["strides"] = _check_levels("strides", o["strides"], lambda v: _is_number(v) and v > 0)
    o["scale_ranges"] = _check_levels(
        "scale_ranges",
        o["scale_ranges"],
        lambda v: isinstance(v, Sequence) and len(v) == 2 and all(_is_number(x) for x in v) and 0 <= v[0] <= v[1],
    )
    o["scale_ranges"] = tuple((float(lo), float(hi)) for lo, hi in o["scale_ranges"])
    for name in ("pos_scale", "nms_sigma"):
        if not _is_number(o[name]) or o[name] <= 0:
            raise ValueError(f"{name} must be a positive number, got {o[name]!r}")
    if not _is_number(o["focal_gamma"]) or o["focal_gamma"] < 0:
        raise ValueError(f"focal_gamma must be a number >= 0, got {o['focal_gamma']!r}")
    if o["nms_kernel"] not in ("gaussian", "linear"):
        raise ValueError(f"nms_kernel must be 'gaussian' or 'linear', got {o['nms_kernel']!r}")
    o["loss_weights"] = _check_loss_weights(o["loss_weights"])
    return o


def _fpn_backbone(encoder: nn.Module, name: str, out_channels: int) -> FPNBackbone:
    """The encoder's maps at reductions 4..32 into torchvision's FPN with a max-pooled P6 (as Mask R-CNN's)."""
    if isinstance(encoder, ResNet) and encoder.output_stride == 32:
        body, channels = _resnet_body(encoder)
        return FPNBackbone(body, channels, out_channels)
    indices = _pyramid_indices(encoder, name)
    return FPNBackbone(
        EncoderBody(encoder, indices), [encoder.feature_info[i]["num_chs"] for i in indices], out_channels
    )


def _build(
    encoder: str,
    num_classes: int,
    in_channels: int,
    encoder_weights: bool | str | os.PathLike | None,
    opts: Mapping[str, Any],
) -> SOLOv2:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (it counts the background class 0), got {num_classes!r}")
    check_positive_int("in_channels", in_channels)
    o = _check_options(opts)
    backbone = _fpn_backbone(build_encoder(encoder, in_channels, encoder_weights), encoder, o["fpn_channels"])
    mask_features = MaskFeatureHead(o["fpn_channels"], o["mask_feat_channels"], o["mask_out_channels"], o["num_groups"])
    head = SOLOv2Head(
        o["fpn_channels"],
        num_classes - 1,
        o["feat_channels"],
        o["stacked_convs"],
        o["mask_out_channels"],
        o["num_grids"],
        o["num_groups"],
        mask_features,
    )
    return SOLOv2(backbone, head, num_classes=num_classes, in_channels=in_channels, options=o)


@register_model(task="instance")
def solov2(
    encoder: str = "resnet50",
    num_classes: int = 81,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **options: Any,
) -> SOLOv2:
    """SOLOv2 with FPN on any registered hierarchical backbone.

    Args:
        encoder: a registered backbone with maps at reductions 4, 8, 16, 32 (``resnet18/34/50/101``,
            ``convnext_*``, ``swin_*``, ``mit_b*``, ``mobilenet_*`` ...); plain ViTs are refused.
        num_classes: classes including the background class 0 (COCO: 81, mmdet's 80 foreground classes).
        in_channels: image channels.
        encoder_weights: published backbone weights (``"imagenet"`` or a tag), a local checkpoint path, or
            ``None`` for random initialisation.
        **options: the options of the module docstring.
    """
    return _build(encoder, num_classes, in_channels, encoder_weights, options)


@register_model(task="instance")
def solov2_resnet50_fpn(
    num_classes: int = 81,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **options: Any,
) -> SOLOv2:
    """SOLOv2 ResNet-50-FPN: mmdet's ``solov2_r50_fpn_1x_coco`` architecture (46,592,912 parameters with 81
    classes, as mmdet 3.3.0 counts it with 80). Arguments as :func:`solov2`."""
    return _build("resnet50", num_classes, in_channels, encoder_weights, options)
