"""Mask R-CNN (He et al., "Mask R-CNN", ICCV 2017) on torchvision's detection framework with maskworks backbones.

Everything after the feature extractor is torchvision's own code: ``GeneralizedRCNNTransform``, the anchor generator,
``RegionProposalNetwork`` / ``RPNHead``, ``RoIHeads`` with ``TwoMLPHead`` or ``FastRCNNConvFCHead``,
``MaskRCNNHeads`` / ``MaskRCNNPredictor``, ``FeaturePyramidNetwork`` with ``LastLevelMaxPool`` and
``MultiScaleRoIAlign``. Only the body of the FPN backbone is a maskworks backbone:

* :func:`mask_rcnn_resnet50_fpn` / :func:`mask_rcnn_resnet50_fpn_v2`: state-dict keys and shapes equal those of
  torchvision's ``maskrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn_v2`` built with ``weights=None,
  weights_backbone=None`` (plain ``BatchNorm2d``, every layer trainable), so torchvision checkpoints load as they
  are and compute the same detections.
* :func:`mask_rcnn_mobilenet_v3_large_fpn`: torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn`` recipe (FPN on
  the last two stride-32 maps, three anchor levels) plus the standard mask branch; its detector keys equal
  torchvision's, so a ``fasterrcnn_mobilenet_v3_large*_fpn`` checkpoint fills everything but the mask branch.
* :func:`mask_rcnn`: any registered hierarchical backbone (ResNet, ConvNeXt, Swin, MiT, MobileNet ...) whose maps at
  reductions 4, 8, 16, 32 feed the FPN.

Output contract (DESIGN.md "Instance output"): in training ``model(images, targets)`` returns torchvision's five
losses (``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``; plus
``loss_mask_point`` with ``mask_head="pointrend"``, ``loss_contour`` with ``mask_head="contour"``), each multiplied
by its ``loss_weights`` entry; in eval ``model(images)`` returns one dict per image with ``boxes (N, 4)`` xyxy float,
``labels (N,)`` int64, ``scores (N,)`` and ``masks (N, H, W)`` bool at the input image size (torchvision's mask
probabilities ``> 0.5``; with ``mask_head="contour"`` the rasterised contours), plus ``mask_probs (N, H, W)`` float
when built with ``return_mask_probs=True``.

Options shared by every constructor (keyword arguments, validated when the model is built):

* ``min_size`` (int or tuple of ints; a tuple picks one at random per training batch), ``max_size`` (int): the
  shorter image side is resized to ``min_size`` unless the longer side would exceed ``max_size`` (torchvision's
  ``GeneralizedRCNNTransform``); the real input-size knob of Mask R-CNN (predictions come back at the input size).
* ``image_mean``, ``image_std``: per-channel normalisation applied inside the model. ``None`` (default) means the
  images are already normalised, as every maskworks dataset delivers them (mean 0, std 1 of ``in_channels``
  entries). Pass torchvision's ``[0.485, 0.456, 0.406]`` / ``[0.229, 0.224, 0.225]`` to feed 0-1 images to a model
  with torchvision's COCO weights.
* ``rpn_pre_nms_top_n_train`` / ``rpn_pre_nms_top_n_test``, ``rpn_post_nms_top_n_train`` /
  ``rpn_post_nms_top_n_test`` (proposals kept per level before NMS / in total after NMS), ``rpn_nms_thresh``,
  ``rpn_score_thresh``, ``rpn_batch_size_per_image``, ``box_score_thresh`` (detections below it are dropped),
  ``box_nms_thresh``, ``box_detections_per_img``, ``box_batch_size_per_image``: torchvision's ``MaskRCNN``
  arguments, passed through.
* ``box_resolution`` (default 7) and ``mask_resolution`` (default 14, giving 28x28 mask logits): output size of the
  box and mask RoI poolers.
* ``pooler``: ``"roi_align"`` (default, torchvision's ``MultiScaleRoIAlign``) or ``"roi_pool"``
  (:class:`MultiScaleRoIPool`, Fast R-CNN's quantising RoIPool; the Q14 ablation) for both poolers.
* ``sampling_ratio`` (default 2; ``<= 0``: adaptive) of RoIAlign; ``aligned`` (default False, torchvision's
  behaviour): RoIAlign with the half-pixel offset (detectron2's ROIAlignV2), :class:`AlignedMultiScaleRoIAlign`.
* ``loss_weights``: dict over the five loss names (default 1.0 each; Mask R-CNN's ``L = L_cls + L_box + L_mask`` plus
  the RPN's two terms; and ``loss_mask_point`` with ``mask_head="pointrend"``, ``loss_contour`` with
  ``mask_head="contour"``); the returned training losses are multiplied by them.
* ``return_mask_probs``: also return the soft masks in eval.
* ``box_nms``: the per-class NMS of the final detections, ``"hard"`` (default, torchvision's), ``"soft_linear"`` or
  ``"soft_gaussian"`` (Soft-NMS with ``soft_nms_sigma``, default 0.5): overlapping objects of dense scenes keep
  decayed scores instead of being removed.
* ``mask_head``: ``"standard"`` (default, torchvision's mask branch) or ``"pointrend"`` (Kirillov et al.,
  "PointRend: Image Segmentation as Rendering", CVPR 2020; :class:`PointHead` under ``roi_heads.point_head``): the
  standard 28x28 mask head stays as the coarse head (``loss_mask``), and a point head (an MLP over P2 features and
  the coarse logits at real-valued points) adds ``loss_mask_point`` in training and refines the masks by adaptive
  subdivision in eval. Its settings, detectron2's ``MODEL.POINT_HEAD`` defaults: ``point_head_num_fc`` (3) layers
  of ``point_head_fc_dim`` (256) channels; ``point_head_train_num_points`` (196) points per RoI in training, the
  ``point_head_importance_sample_ratio`` (0.75) share of them the most uncertain of
  ``point_head_oversample_ratio`` (3) times as many uniform points; in eval ``point_head_subdivision_steps`` (3)
  steps, each upsampling the mask logits x2 and re-predicting its ``point_head_subdivision_num_points`` (784) most
  uncertain cells (from 28x28 the masks come out at ``28 * 2**steps``: 224x224, the resolution detectron2 reaches
  with 5 steps from its 7x7 coarse head; ``0`` steps give the standard masks).
  Other values of these settings need ``mask_head="pointrend"``.
  ``"contour"`` (Deep Snake-style contours, Peng et al., "Deep Snake for Real-Time Instance Segmentation", CVPR
  2020; :class:`~maskworks.models.instance.ContourHead` under ``roi_heads.contour_head``): the standard mask branch
  stays and trains as before (``loss_mask``), and a contour head on the finest FPN level (``"0"``: P2, stride 4 of the
  padded batch; its stride is inferred from the map and image sizes as the RoI poolers do) evolves an ellipse
  inscribed in each box into the object's outline. Training: from the ground-truth boxes of each image (each object
  once, not once per positive proposal; at most ``contour_max_instances`` (64) objects per image, a random subset
  of the others, and none whose mask is empty after torchvision's resize), against the objects' outer contours
  (:func:`~maskworks.ops.mask_to_contour` of the resized ground-truth masks), it adds ``loss_contour``: the mean
  over the ``contour_iterations`` (3) steps of :func:`~maskworks.models.instance.contour_loss`. Eval: the head runs on
  the final detections (the standard mask branch is skipped, its masks would be discarded); each final contour is
  scaled to the input image as torchvision scales the boxes (``input / resized`` per axis) and rasterised there
  (:func:`~maskworks.ops.contour_to_mask`): these are the output ``masks`` (and, with ``return_mask_probs``, their 0 /
  1 ``mask_probs``). Its settings: ``contour_num_points`` (128, at least 16) vertices, ``contour_hidden`` (128)
  channels of the circular convolutions, ``contour_iterations`` (3), ``contour_max_instances`` (64, training only).
  Other values of these settings need ``mask_head="contour"``. The contour head computes in float32 under autocast.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads, expand_boxes, expand_masks
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image, remove_small_boxes, roi_align, roi_pool
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper, _convert_to_roi_format, _filter_input, _infer_scale, _setup_scales

from maskworks.backbones.mobilenet import MobileNetV3
from maskworks.backbones.resnet import ResNet
from maskworks.models._utils import build_encoder, check_positive_int
from maskworks.models.instance._common import check_image_list, check_loss_weights, check_normalisation
from maskworks.models.instance.contour import ContourHead, contour_loss
from maskworks.ops.nms import soft_nms
from maskworks.ops.points import (
    get_uncertain_point_coords_on_grid,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from maskworks.ops.polygons import contour_to_mask, mask_to_contour
from maskworks.registry import register_model

__all__ = [
    "CONTOUR_LOSS_NAMES",
    "LOSS_NAMES",
    "POINTREND_LOSS_NAMES",
    "AlignedMultiScaleRoIAlign",
    "EncoderBody",
    "FPNBackbone",
    "MaskRCNN",
    "MultiScaleRoIPool",
    "PointHead",
    "mask_rcnn",
    "mask_rcnn_mobilenet_v3_large_fpn",
    "mask_rcnn_resnet50_fpn",
    "mask_rcnn_resnet50_fpn_v2",
]

LOSS_NAMES: tuple[str, ...] = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
# the losses mask_head="pointrend" adds to LOSS_NAMES
POINTREND_LOSS_NAMES: tuple[str, ...] = ("loss_mask_point",)
# the losses mask_head="contour" adds to LOSS_NAMES
CONTOUR_LOSS_NAMES: tuple[str, ...] = ("loss_contour",)
_MASK_HEADS = ("standard", "pointrend", "contour")
# the FPN levels the RoI poolers read ("pool", the max-pooled extra level, is for the RPN only), as in torchvision
_POOLED_LEVELS = ["0", "1", "2", "3"]

# option -> default; every constructor takes these keyword arguments (see the module docstring)
_DEFAULTS: dict[str, Any] = {
    "min_size": 800,
    "max_size": 1333,
    "image_mean": None,
    "image_std": None,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_nms_thresh": 0.7,
    "rpn_score_thresh": 0.0,
    "rpn_batch_size_per_image": 256,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "box_nms": "hard",
    "soft_nms_sigma": 0.5,
    "box_detections_per_img": 100,
    "box_batch_size_per_image": 512,
    "box_resolution": 7,
    "mask_resolution": 14,
    "pooler": "roi_align",
    "sampling_ratio": 2,
    "aligned": False,
    "loss_weights": None,
    "return_mask_probs": False,
    "mask_head": "standard",
    "point_head_num_fc": 3,
    "point_head_fc_dim": 256,
    "point_head_train_num_points": 14 * 14,
    "point_head_oversample_ratio": 3,
    "point_head_importance_sample_ratio": 0.75,
    "point_head_subdivision_steps": 3,
    "point_head_subdivision_num_points": 28 * 28,
    "contour_num_points": 128,
    "contour_hidden": 128,
    "contour_iterations": 3,
    "contour_max_instances": 64,
}
# the settings of mask_head="pointrend" (PointHead's arguments without the prefix)
_POINT_HEAD_OPTIONS = tuple(k for k in _DEFAULTS if k.startswith("point_head_"))
# the settings of mask_head="contour"
_CONTOUR_OPTIONS = tuple(k for k in _DEFAULTS if k.startswith("contour_"))
_POSITIVE_INTS = (
    "max_size",
    "rpn_pre_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image",
    "box_detections_per_img",
    "box_batch_size_per_image",
    "box_resolution",
    "mask_resolution",
    "point_head_num_fc",
    "point_head_fc_dim",
    "point_head_train_num_points",
    "point_head_subdivision_num_points",
    "contour_hidden",
    "contour_iterations",
    "contour_max_instances",
)
_UNIT_FLOATS = ("rpn_nms_thresh", "rpn_score_thresh", "box_score_thresh", "box_nms_thresh")  # in [0, 1]
# passed to torchvision's MaskRCNN under the same name
_TV_KWARGS = (
    "min_size",
    "max_size",
    "rpn_pre_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test",
    "rpn_nms_thresh",
    "rpn_score_thresh",
    "rpn_batch_size_per_image",
    "box_score_thresh",
    "box_nms_thresh",
    "box_detections_per_img",
    "box_batch_size_per_image",
)
# torchvision's fasterrcnn_mobilenet_v3_large_320_fpn defaults (the real-time recipe)
_MOBILENET_DEFAULTS: dict[str, Any] = {
    "min_size": 320,
    "max_size": 640,
    "rpn_pre_nms_top_n_test": 150,
    "rpn_post_nms_top_n_test": 150,
    "rpn_score_thresh": 0.05,
}


# --------------------------------------------------------------------------- RoI poolers
class _MultiScalePooler(MultiScaleRoIAlign, ABC):
    """``MultiScaleRoIAlign``'s level assignment (FPN eq. 1: canonical 224 px box at level 4) and scale inference
    with another per-level pooling op (:meth:`_pool`). A subclass of ``MultiScaleRoIAlign`` because torchvision's
    ``MaskRCNN`` accepts only that type."""

    @abstractmethod
    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        """Pool ``rois`` (K, 5) from one level's ``feature`` at ``scale``: ``(K, C, *output_size)``."""

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Pool ``boxes`` (per image, xyxy in input-image coordinates) from the feature maps ``x`` named in
        ``featmap_names``, each box from the level its size selects: ``(K, C, *output_size)``."""
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        return _pool_levels(self._pool, features, boxes, self.scales, self.map_levels, self.output_size)


def _pool_levels(
    pool: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    features: list[torch.Tensor],
    boxes: list[torch.Tensor],
    scales: list[float],
    mapper: LevelMapper,
    output_size: tuple[int, ...],
) -> torch.Tensor:
    """torchvision's ``_multiscale_roi_align`` loop with ``pool(feature, rois, scale)`` as the per-level op."""
    rois = _convert_to_roi_format(boxes)  # (K, 5): batch index, x1, y1, x2, y2
    if len(features) == 1:
        return pool(features[0], rois, scales[0])
    levels = mapper(boxes)
    first = features[0]
    result = first.new_zeros((len(rois), first.shape[1], *output_size))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == level)[0]
        result[idx] = pool(feature, rois[idx], scale).to(result.dtype)
    return result


class MultiScaleRoIPool(_MultiScalePooler):
    """RoIPool (Girshick, "Fast R-CNN", ICCV 2015) over FPN levels: torchvision's compiled ``roi_pool`` with
    ``MultiScaleRoIAlign``'s level mapping. It rounds boxes to whole feature pixels and max-pools bins with
    floor / ceil edges (the quantisation RoIAlign removes; Mask R-CNN, Table 2c).

    Args:
        featmap_names: names of the feature maps to pool from (others are ignored).
        output_size: ``(h, w)`` or one int of the pooled maps.
        canonical_scale, canonical_level: box side that maps to ``canonical_level`` (FPN eq. 1: 224 and 4).
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int],
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(
            featmap_names, output_size, 0, canonical_scale=canonical_scale, canonical_level=canonical_level
        )

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        if feature.dtype in (torch.bfloat16, torch.float16):
            # torchvision registers no autocast rule for roi_pool and has no CPU kernel for low precision: pool in
            # float32 and return the input's dtype, as its autocast rule for roi_align does
            pooled = roi_pool(feature.float(), rois.float(), self.output_size, spatial_scale=scale)
            return pooled.to(feature.dtype)
        return roi_pool(feature, rois.to(feature.dtype), self.output_size, spatial_scale=scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(featmap_names={self.featmap_names}, output_size={self.output_size})"


class AlignedMultiScaleRoIAlign(_MultiScalePooler):
    """``MultiScaleRoIAlign`` with ``aligned=True``: box corners shifted by half a pixel so that pixel centres
    sit at ``i + 0.5`` (detectron2's ROIAlignV2); torchvision's ``MultiScaleRoIAlign`` always uses
    ``aligned=False``. Arguments as ``MultiScaleRoIAlign``."""

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        return roi_align(
            feature, rois, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio, aligned=True
        )


def _make_pooler(pooler: str, output_size: int, sampling_ratio: int, aligned: bool) -> MultiScaleRoIAlign:
    if pooler == "roi_pool":
        return MultiScaleRoIPool(list(_POOLED_LEVELS), output_size)
    if aligned:
        return AlignedMultiScaleRoIAlign(list(_POOLED_LEVELS), output_size, sampling_ratio)
    return MultiScaleRoIAlign(list(_POOLED_LEVELS), output_size, sampling_ratio)


# --------------------------------------------------------------------------- backbone
class EncoderBody(nn.Module):
    """A registered backbone as FPN body: its maps at reductions 4, 8, 16, 32 as an ``OrderedDict`` ``"0".."3"``.

    Args:
        encoder: a maskworks backbone with ``forward_intermediates`` and ``feature_info``.
        indices: positions in ``forward_intermediates``' list of the maps to return, finest first.
    """

    def __init__(self, encoder: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.indices = tuple(indices)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.encoder.forward_intermediates(x)
        return OrderedDict((str(i), maps[j]) for i, j in enumerate(self.indices))


class FPNBackbone(nn.Module):
    """``body`` (images -> ``OrderedDict`` of maps) followed by torchvision's ``FeaturePyramidNetwork`` with
    ``LastLevelMaxPool``; the layout of torchvision's ``BackboneWithFPN`` (``body``, ``fpn``, ``out_channels``).

    Args:
        body: the feature extractor.
        in_channels_list: channels of the body's maps, in order.
        out_channels: channels of every pyramid level.
        norm_layer: norm of the FPN convs (``None``: conv with bias, v1; ``nn.BatchNorm2d``: v2).
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels_list: Sequence[int],
        out_channels: int = 256,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(in_channels_list), out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _pyramid_indices(encoder: nn.Module, name: str) -> list[int]:
    """Positions of the last map at each reduction 4, 8, 16, 32 in ``encoder.feature_info``."""
    info = getattr(encoder, "feature_info", None)
    if not info:
        raise ValueError(f"encoder {name!r} has no feature_info; expected a hierarchical backbone")
    reductions = [i["reduction"] for i in info]
    indices = []
    for r in (4, 8, 16, 32):
        if r not in reductions:
            raise ValueError(
                f"encoder must give maps at reductions 4, 8, 16 and 32 for the FPN; {name!r} gives {reductions}"
            )
        indices.append(len(reductions) - 1 - reductions[::-1].index(r))
    return indices


def _resnet_body(encoder: ResNet) -> tuple[nn.Module, list[int]]:
    """torchvision's FPN body of a ResNet: an ``IntermediateLayerGetter`` over its children, returning
    ``layer1..layer4`` as ``"0".."3"`` (keys ``body.conv1.*``, ``body.layer1.*`` ...: torchvision's)."""
    stages = [i for i in encoder.feature_info if i["module"].startswith("layer")]
    body = IntermediateLayerGetter(encoder, return_layers={i["module"]: str(k) for k, i in enumerate(stages)})
    return body, [i["num_chs"] for i in stages]


def _encoder_fpn(encoder: nn.Module, name: str, norm_layer: Callable[..., nn.Module] | None) -> FPNBackbone:
    if isinstance(encoder, ResNet) and encoder.output_stride == 32:
        body, channels = _resnet_body(encoder)
        return FPNBackbone(body, channels, norm_layer=norm_layer)
    indices = _pyramid_indices(encoder, name)
    return FPNBackbone(
        EncoderBody(encoder, indices), [encoder.feature_info[i]["num_chs"] for i in indices], norm_layer=norm_layer
    )


def _mobilenet_fpn(encoder: MobileNetV3) -> FPNBackbone:
    """torchvision's ``_mobilenet_extractor(fpn=True)`` body: the first block of the last stage (its stride-2
    block) and the final 1x1 conv, both at reduction 32, from ``features`` (keys ``body.0.*`` .. ``body.16.*``)."""
    last_tap = int(encoder.feature_info[-2]["module"].split(".")[-1])  # last block before the final stride-2 one
    first, last = last_tap + 1, len(encoder.features) - 1
    body = IntermediateLayerGetter(encoder.features, return_layers={str(first): "0", str(last): "1"})
    channels = [encoder.features[first].out_channels, encoder.features[last].out_channels]
    return FPNBackbone(body, channels)


# --------------------------------------------------------------------------- options
def _check_options(opts: Mapping[str, Any], defaults: Mapping[str, Any], in_channels: int) -> dict[str, Any]:
    """Merge ``opts`` over ``defaults`` and validate every value (one-line errors naming the argument)."""
    unknown = [k for k in opts if k not in _DEFAULTS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(_DEFAULTS), n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"Mask R-CNN got unexpected option(s) {', '.join(hints)}; it takes: {', '.join(_DEFAULTS)}")
    o = {**_DEFAULTS, **defaults, **opts}
    min_size = o["min_size"]
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size) if isinstance(min_size, Sequence) else ()
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"min_size must be a positive int or a tuple of positive ints, got {min_size!r}")
    o["min_size"] = sizes[0] if isinstance(min_size, int) else sizes
    for name in _POSITIVE_INTS:
        check_positive_int(name, o[name])
    if o["max_size"] < max(sizes):
        raise ValueError(f"max_size must be >= min_size, got max_size={o['max_size']!r}, min_size={min_size!r}")
    for name in _UNIT_FLOATS:
        value = o[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    check_normalisation(o, in_channels)
    if o["pooler"] not in ("roi_align", "roi_pool"):
        raise ValueError(f"pooler must be 'roi_align' or 'roi_pool', got {o['pooler']!r}")
    if isinstance(o["sampling_ratio"], bool) or not isinstance(o["sampling_ratio"], int):
        raise ValueError(f"sampling_ratio must be an int (<= 0: adaptive), got {o['sampling_ratio']!r}")
    if not isinstance(o["aligned"], bool):
        raise ValueError(f"aligned must be a bool, got {o['aligned']!r}")
    if o["aligned"] and o["pooler"] == "roi_pool":
        raise ValueError("aligned=True applies to pooler='roi_align' only (RoIPool rounds boxes to whole pixels)")
    if o["box_nms"] not in ("hard", "soft_linear", "soft_gaussian"):
        raise ValueError(f"box_nms must be 'hard', 'soft_linear' or 'soft_gaussian', got {o['box_nms']!r}")
    sigma = o["soft_nms_sigma"]
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"soft_nms_sigma must be a number > 0, got {sigma!r}")
    if not isinstance(o["return_mask_probs"], bool):
        raise ValueError(f"return_mask_probs must be a bool, got {o['return_mask_probs']!r}")
    if o["mask_head"] not in _MASK_HEADS:
        raise ValueError(f"mask_head must be 'standard' or 'pointrend' or 'contour', got {o['mask_head']!r}")
    _check_point_head_options(o)
    _check_contour_options(o)
    o["loss_weights"] = _check_loss_weights(o["loss_weights"], o["mask_head"])
    return o


def _check_point_head_options(o: Mapping[str, Any]) -> None:
    steps = o["point_head_subdivision_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"point_head_subdivision_steps must be an int >= 0, got {steps!r}")
    ratio = o["point_head_oversample_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1 <= ratio < float("inf"):
        raise ValueError(f"point_head_oversample_ratio must be a number >= 1, got {ratio!r}")
    share = o["point_head_importance_sample_ratio"]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"point_head_importance_sample_ratio must be a number in [0, 1], got {share!r}")
    if o["mask_head"] != "pointrend":
        changed = [k for k in _POINT_HEAD_OPTIONS if o[k] != _DEFAULTS[k]]
        if changed:
            raise ValueError(f"{changed[0]} applies to mask_head='pointrend' only, got mask_head={o['mask_head']!r}")


def _check_contour_options(o: Mapping[str, Any]) -> None:
    points = o["contour_num_points"]
    if isinstance(points, bool) or not isinstance(points, int) or points < 16:
        # ContourHead's circular convolutions (kernel 9, dilations up to 4) reach 16 vertices along the contour
        raise ValueError(f"contour_num_points must be an int >= 16, got {points!r}")
    if o["mask_head"] != "contour":
        changed = [k for k in _CONTOUR_OPTIONS if o[k] != _DEFAULTS[k]]
        if changed:
            raise ValueError(f"{changed[0]} applies to mask_head='contour' only, got mask_head={o['mask_head']!r}")


def _check_loss_weights(loss_weights: Mapping[str, float] | None, mask_head: str = "standard") -> dict[str, float]:
    extra = {"pointrend": POINTREND_LOSS_NAMES, "contour": CONTOUR_LOSS_NAMES}.get(mask_head, ())
    names = LOSS_NAMES + extra
    return check_loss_weights(loss_weights, dict.fromkeys(names, 1.0))


def _check_model_args(num_classes: int, in_channels: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (it counts the background class 0), got {num_classes!r}")
    check_positive_int("in_channels", in_channels)


# --------------------------------------------------------------------------- mask pasting
def paste_masks_bool(
    masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """torchvision's ``paste_masks_in_image`` followed by ``> threshold``, written straight into a bool
    ``(N, H, W)``: the same pixels, without the float ``(N, H, W)`` image per mask and their stack.

    Each ``(1, M, M)`` mask probability map is padded by one pixel, its box grown by ``(M + 2) / M`` and rounded to
    whole pixels, resized bilinearly to that box and thresholded inside the part of the box within the image
    (torchvision's geometry, kept so that the output equals torchvision's model).

    Args:
        masks: ``(N, 1, M, M)`` probabilities.
        boxes: ``(N, 4)`` xyxy in the image's pixels.
        image_size: ``(H, W)``.
        threshold: the probability above which a pixel is in the mask.
    """
    im_h, im_w = image_size
    out = torch.zeros((masks.shape[0], im_h, im_w), dtype=torch.bool, device=masks.device)
    if masks.shape[0] == 0:
        return out
    padded, scale = expand_masks(masks, padding=1)
    for i, (x0, y0, x1, y1) in enumerate(expand_boxes(boxes, scale).to(torch.int64).tolist()):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        left, right, top, bottom = max(x0, 0), min(x1 + 1, im_w), max(y0, 0), min(y1 + 1, im_h)
        if right <= left or bottom <= top:
            continue
        m = F.interpolate(padded[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        out[i, top:bottom, left:right] = m[top - y0 : bottom - y0, left - x0 : right - x0] > threshold
    return out


def _mask_contours(masks: torch.Tensor, num_points: int) -> torch.Tensor:
    """:func:`~maskworks.ops.mask_to_contour` of each non-empty mask ``(G, H, W)``: float32 ``(G, num_points, 2)`` on
    the CPU. Each mask is cropped to its set pixels first (the boundary is the same, shifted by the crop's corner;
    this keeps the cost independent of the image size)."""
    out = []
    for mask in masks.detach().cpu() != 0:
        rows, cols = torch.where(mask.any(1))[0], torch.where(mask.any(0))[0]
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        out.append(mask_to_contour(mask[y0:y1, x0:x1], num_points) + torch.tensor([float(x0), float(y0)]))
    return torch.stack(out) if out else torch.zeros(0, num_points, 2)


def _rasterise_contours(
    contours: torch.Tensor, image_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Bool masks ``(N, H, W)`` at ``original_size`` ``(H, W)`` of contours ``(N, P, 2)`` given in the resized image
    of ``image_size``: the vertices are scaled by ``original / resized`` per axis, the float32 ratios torchvision's
    ``resize_boxes`` scales the boxes with, and each ring is rasterised at the original size
    (:func:`~maskworks.ops.contour_to_mask`). A contour with a non-finite vertex gives an empty mask."""
    h, w = original_size
    out = torch.zeros((contours.shape[0], h, w), dtype=torch.bool, device=contours.device)
    if contours.shape[0] == 0:
        return out
    ratio = torch.tensor([w, h], dtype=torch.float32, device=contours.device) / torch.tensor(
        [image_size[1], image_size[0]], dtype=torch.float32, device=contours.device
    )
    scaled = (contours.float() * ratio).cpu()
    for i, ring in enumerate(scaled):
        if torch.isfinite(ring).all():
            out[i] = contour_to_mask(ring, h, w).to(out.device)
    return out


class _Transform(GeneralizedRCNNTransform):
    """torchvision's transform; in eval, unless ``paste_probs`` is set (or the model is traced), masks are pasted
    as bool images by :func:`paste_masks_bool`. Detections with ``contours`` (``mask_head="contour"``: ``(N, P, 2)``
    in the resized image) get the masks :func:`_rasterise_contours` draws at the input size instead (as 0 / 1 float
    ``(N, 1, H, W)`` with ``paste_probs``); the ``contours`` entry is consumed."""

    paste_probs = False

    def postprocess(
        self,
        result: list[dict[str, torch.Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        contours = any("contours" in pred for pred in result)
        if not contours and (self.training or self.paste_probs or torchvision._is_tracing()):
            return super().postprocess(result, image_shapes, original_image_sizes)
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "contours" in pred:
                masks = _rasterise_contours(pred.pop("contours"), im_s, o_im_s)
                pred["masks"] = masks[:, None].float() if self.paste_probs else masks
            elif "masks" in pred:
                pred["masks"] = paste_masks_bool(pred["masks"], pred["boxes"], o_im_s)
        return result


# --------------------------------------------------------------------------- PointRend
def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (where autocast exists there): the point head computes in float32."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _box_points_to_image(boxes: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Points ``(R, P, 2)`` in ``[0, 1]`` of the boxes ``(R, 4)`` (xyxy, 0 and 1 on the box edges) as image
    coordinates (``x1 + x * (x2 - x1)``, ``y1 + y * (y2 - y1)``), in the continuous frame where pixel ``i`` covers
    ``[i, i + 1)``."""
    corner, size = boxes[:, None, :2], boxes[:, None, 2:] - boxes[:, None, :2]
    return corner + point_coords * size


class PointHead(nn.Module):
    """PointRend's point head (Kirillov et al., CVPR 2020; detectron2's ``StandardPointHead``) on a Mask R-CNN
    whose standard mask head gives the coarse ``(R, num_classes, M, M)`` logits.

    Every point of a box, in ``[0, 1]`` box coordinates, is described by the fine-grained feature of the finest
    pyramid level (``in_feature``, P2) and the ``num_classes`` coarse logits, both interpolated bilinearly there
    (:func:`~maskworks.ops.points.point_sample`, ``align_corners=False``). An MLP of 1x1 ``Conv1d`` layers
    (``num_fc`` layers of ``fc_dim`` channels with ReLU, the coarse logits concatenated again to every layer's
    input) predicts class-specific logits at each point.

    * Training (:meth:`loss`): ``train_num_points`` points per positive RoI, the ``importance_sample_ratio`` share
      of them the most uncertain (``-abs`` of the ground-truth class's coarse logit) of ``oversample_ratio`` times
      as many uniform points, the rest uniform; the target is the ground-truth mask interpolated at the point;
      binary cross-entropy with logits averaged over points (``loss_mask_point``). The point loss also trains the
      coarse head and the backbone through the sampled features.
    * Inference (:meth:`subdivide`): from the coarse logits of the predicted class, ``subdivision_steps`` times
      upsample x2 (bilinear, ``align_corners=False``), re-predict the ``subdivision_num_points`` most uncertain
      cells and write them back: masks of ``M * 2**subdivision_steps`` cells per side (a step whose successor
      re-predicts every cell anyway is skipped, as in detectron2).

    Both run in float32 under autocast.

    Args:
        in_channels: channels of the fine-grained features (the FPN's 256).
        num_classes: mask classes (the mask predictor's output channels, background included).
        fc_dim, num_fc: width and depth of the MLP (detectron2: 256, 3).
        in_feature: the feature map (key of the FPN's output) the fine-grained features come from.
        train_num_points, oversample_ratio, importance_sample_ratio: training points (196, 3, 0.75).
        subdivision_steps, subdivision_num_points: inference refinement (3, 784).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        fc_dim: int = 256,
        num_fc: int = 3,
        *,
        in_feature: str = "0",
        train_num_points: int = 14 * 14,
        oversample_ratio: float = 3,
        importance_sample_ratio: float = 0.75,
        subdivision_steps: int = 3,
        subdivision_num_points: int = 28 * 28,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_feature = in_feature
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.subdivision_steps = subdivision_steps
        self.subdivision_num_points = subdivision_num_points
        dim = in_channels + num_classes
        self.fcs: list[nn.Conv1d] = []
        for k in range(num_fc):
            fc = nn.Conv1d(dim, fc_dim, kernel_size=1)
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")  # Caffe2's MSRA fill
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{k + 1}", fc)  # detectron2's names: fc1 .. fc{num_fc}, predictor
            self.fcs.append(fc)
            dim = fc_dim + num_classes
        self.predictor = nn.Conv1d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine_grained: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Point logits ``(R, num_classes, P)`` from fine-grained features ``(R, in_channels, P)`` and coarse
        logits ``(R, num_classes, P)`` at the same points."""
        x = torch.cat([fine_grained, coarse], dim=1)
        for fc in self.fcs:
            x = torch.cat([F.relu(fc(x)), coarse], dim=1)
        return self.predictor(x)

    def point_features(
        self,
        features: Mapping[str, torch.Tensor],
        boxes: Sequence[torch.Tensor],
        point_coords: torch.Tensor,
        image_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Fine-grained features ``(R, C, P)`` (float32) of ``features[in_feature]`` at the points
        ``(R, P, 2)`` of the boxes (per image ``(R_i, 4)`` xyxy in the batch's image coordinates; ``R = sum R_i``).
        The map's stride is inferred from the image sizes as torchvision's RoI poolers do."""
        feature = features[self.in_feature]
        channels, (h, w) = feature.shape[1], feature.shape[-2:]
        scale = _infer_scale(feature, [max(s[0] for s in image_shapes), max(s[1] for s in image_shapes)])
        size = torch.tensor([w, h], dtype=torch.float32, device=feature.device)
        out, start = [], 0
        for i, image_boxes in enumerate(boxes):
            n = len(image_boxes)
            coords = _box_points_to_image(image_boxes.float(), point_coords[start : start + n]) * scale / size
            start += n
            sampled = point_sample(feature[i : i + 1].float(), coords.reshape(1, -1, 2))  # (1, C, n * P)
            out.append(sampled.reshape(channels, n, point_coords.shape[1]).transpose(0, 1))
        return torch.cat(out)

    @staticmethod
    def point_targets(
        gt_masks: Sequence[torch.Tensor],
        gt_index: Sequence[torch.Tensor],
        boxes: Sequence[torch.Tensor],
        point_coords: torch.Tensor,
    ) -> torch.Tensor:
        """Ground-truth mask values ``(R, P)`` in ``[0, 1]`` (bilinear between pixels) at the points ``(R, P, 2)``
        of the boxes; per image the masks ``(G_i, H, W)``, the index ``(R_i,)`` of each box's mask and the boxes
        ``(R_i, 4)`` in the masks' pixel coordinates."""
        out, start = [], 0
        for masks, index, image_boxes in zip(gt_masks, gt_index, boxes):
            n = len(image_boxes)
            coords = point_coords[start : start + n]
            start += n
            if n == 0:
                out.append(coords.new_zeros(0, coords.shape[1]))
                continue
            size = torch.tensor([masks.shape[-1], masks.shape[-2]], dtype=torch.float32, device=masks.device)
            coords = _box_points_to_image(image_boxes.float(), coords) / size
            values = point_sample(masks[None].float(), coords.reshape(1, -1, 2))[0]  # (G, n * P): every mask
            out.append(values.reshape(len(masks), n, coords.shape[1])[index, torch.arange(n, device=index.device)])
        return torch.cat(out)

    def loss(
        self,
        features: Mapping[str, torch.Tensor],
        mask_logits: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        gt_masks: Sequence[torch.Tensor],
        gt_index: Sequence[torch.Tensor],
        gt_labels: torch.Tensor,
        image_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """``loss_mask_point`` of the positive RoIs: their boxes (per image), coarse logits
        ``(R, num_classes, M, M)``, matched ground-truth masks (per image ``(G_i, H, W)`` and the index of each
        box's mask) and classes ``(R,)``."""
        with _no_autocast(mask_logits.device):
            coarse = mask_logits.float()
            rows = torch.arange(len(coarse), device=coarse.device)
            with torch.no_grad():
                point_coords = get_uncertain_point_coords_with_randomness(
                    coarse,
                    lambda logits: -logits[rows, gt_labels][:, None].abs(),
                    self.train_num_points,
                    self.oversample_ratio,
                    self.importance_sample_ratio,
                )
                targets = self.point_targets(gt_masks, gt_index, boxes, point_coords)
            fine = self.point_features(features, boxes, point_coords, image_shapes)
            point_logits = self(fine, point_sample(coarse, point_coords))[rows, gt_labels]  # (R, P)
            if point_logits.numel() == 0:
                return point_logits.sum() * 0
            return F.binary_cross_entropy_with_logits(point_logits, targets)

    def subdivide(
        self,
        features: Mapping[str, torch.Tensor],
        mask_logits: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        labels: torch.Tensor,
        image_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Refined logits ``(R, 1, S, S)`` (float32, ``S = M * 2**subdivision_steps``) of the class ``labels (R,)``
        of each box (per image ``(R_i, 4)``) from the coarse ``(R, num_classes, M, M)``: adaptive subdivision."""
        with _no_autocast(mask_logits.device):
            coarse = mask_logits.float()
            rows = torch.arange(len(coarse), device=coarse.device)
            refined = coarse[rows, labels][:, None]
            if len(coarse) == 0:
                return refined
            steps = self.subdivision_steps
            for step in range(steps):
                refined = F.interpolate(refined, scale_factor=2, mode="bilinear", align_corners=False)
                num_masks, _, h, w = refined.shape
                if self.subdivision_num_points >= 4 * h * w and step < steps - 1:
                    continue  # the next step re-predicts every cell of its grid
                point_indices, point_coords = get_uncertain_point_coords_on_grid(
                    -refined.abs(), self.subdivision_num_points
                )
                fine = self.point_features(features, boxes, point_coords, image_shapes)
                point_logits = self(fine, point_sample(coarse, point_coords))[rows, labels]  # (R, P)
                refined = refined.reshape(num_masks, h * w).scatter_(1, point_indices, point_logits)
                refined = refined.reshape(num_masks, 1, h, w)
            return refined


class _RoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose per-class NMS of the final detections can be Soft-NMS (Bodla et al.,
    ICCV 2017; :func:`maskworks.ops.soft_nms`): ``nms_method`` ``"hard"`` (torchvision's own path), ``"soft_linear"``
    (scores times ``1 - IoU`` above ``nms_thresh``) or ``"soft_gaussian"`` (times ``exp(-IoU^2 / soft_nms_sigma)``);
    Soft-NMS drops boxes whose decayed score falls below ``score_thresh``. Dense scenes keep overlapping objects
    that hard NMS would remove (Q16).

    With a ``point_head`` (:class:`PointHead`, ``mask_head="pointrend"``; ``None`` otherwise) torchvision's forward
    still runs unchanged; its coarse mask logits and training samples are recorded on the way, and afterwards the
    point head adds ``loss_mask_point`` (training) or replaces the masks by its refined ones (eval).

    With a ``contour_head`` (:class:`~maskworks.models.instance.ContourHead`, ``mask_head="contour"``; ``None``
    otherwise) torchvision's forward runs unchanged in training and the contour head adds ``loss_contour`` from the
    ground-truth boxes and masks of each image (at most ``contour_max_instances`` objects per image); in eval the
    standard mask branch is skipped and each detection gets the head's final contour as ``contours`` ``(N, P, 2)`` in
    the resized image, which the model's transform rasterises into the output masks at the input size."""

    nms_method = "hard"
    soft_nms_sigma = 0.5
    contour_max_instances = 64
    contour_in_feature = "0"  # the FPN level the contour head reads (P2)

    def has_mask(self) -> bool:
        # False during an eval forward with the contour head: the standard masks would be discarded
        return not self.__dict__.get("_skip_mask_branch", False) and super().has_mask()

    def select_training_samples(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        sampled = super().select_training_samples(proposals, targets)
        if self.point_head is not None:
            self._point_samples = sampled  # proposals, matched GT indices, labels (0: background): read by forward
        return sampled

    def forward(  # type: ignore[override]
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.contour_head is not None and self.has_mask():
            return self._contour_forward(features, proposals, image_shapes, targets)
        if self.point_head is None or not self.has_mask():
            return super().forward(features, proposals, image_shapes, targets)
        captured: list[torch.Tensor] = []
        hook = self.mask_predictor.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
            sampled = self.__dict__.get("_point_samples")
        finally:
            hook.remove()
            self.__dict__.pop("_point_samples", None)
        (mask_logits,) = captured  # (R, num_classes, M, M): positive proposals (training) or detections (eval)
        if self.training:
            sampled_proposals, matched_idxs, labels, _ = sampled
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            losses["loss_mask_point"] = self.point_head.loss(
                features,
                mask_logits,
                [p[k] for p, k in zip(sampled_proposals, positive)],
                [t["masks"] for t in targets or []],
                [m[k] for m, k in zip(matched_idxs, positive)],
                torch.cat([image_labels[k] for image_labels, k in zip(labels, positive)]),
                image_shapes,
            )
            return result, losses
        boxes = [r["boxes"] for r in result]
        labels = torch.cat([r["labels"] for r in result])
        refined = self.point_head.subdivide(features, mask_logits, boxes, labels, image_shapes)
        for r, probs in zip(result, refined.sigmoid().split([len(b) for b in boxes])):
            r["masks"] = probs
        return result, losses

    def _contour_forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """``mask_head="contour"``: torchvision's forward, plus ``loss_contour`` (training) or ``contours`` per
        detection (eval, with the standard mask branch skipped)."""
        if self.training:
            result, losses = super().forward(features, proposals, image_shapes, targets)
            losses["loss_contour"] = self._contour_loss(features, targets or [], image_shapes)
            return result, losses
        self._skip_mask_branch = True
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            self._skip_mask_branch = False
        boxes = [r["boxes"] for r in result]
        contours = self._contours(features, boxes, image_shapes)[-1]
        for r, image_contours in zip(result, contours.split([len(b) for b in boxes])):
            r["contours"] = image_contours
        return result, losses

    def _contours(
        self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """The contour head's ``(R, P, 2)`` contours of every step (float32, in the resized images' pixels) from the
        boxes (per image ``(R_i, 4)`` in those pixels); the map's stride is inferred as the RoI poolers do."""
        feature = features[self.contour_in_feature]
        scale = _infer_scale(feature, [max(s[0] for s in image_shapes), max(s[1] for s in image_shapes)])
        with _no_autocast(feature.device):
            return self.contour_head(feature.float(), [b.detach().float() for b in boxes], stride=1.0 / scale)

    def _contour_loss(
        self,
        features: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """``loss_contour``: the mean over the head's steps of :func:`contour_loss` between the contours evolved from
        the ground-truth boxes and the outer contours of the (resized) ground-truth masks. Objects with an empty mask
        are left out; images with more than ``contour_max_instances`` objects use a random subset of them."""
        head = self.contour_head
        boxes, contours = [], []
        for t in targets:
            masks = t["masks"]
            keep = torch.where(masks.flatten(1).any(1))[0]  # a mask can vanish in torchvision's resize
            if len(keep) > self.contour_max_instances:
                keep = keep[torch.randperm(len(keep), device=keep.device)[: self.contour_max_instances]]
            boxes.append(t["boxes"][keep])
            contours.append(_mask_contours(masks[keep], head.num_points).to(t["boxes"].device))
        if not any(len(b) for b in boxes):  # a zero still connected to the head (no unused parameters)
            return torch.stack([p.sum() for p in head.parameters()]).sum() * 0.0
        outputs = self._contours(features, boxes, image_shapes)
        target = torch.cat(contours)
        with _no_autocast(target.device):
            return torch.stack([contour_loss(out, target) for out in outputs]).mean()

    def postprocess_detections(
        self,
        class_logits: torch.Tensor,
        box_regression: torch.Tensor,
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        if self.nms_method == "hard":
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        num_classes = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals).split(per_image, 0)
        scores_all = F.softmax(class_logits, -1).split(per_image, 0)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, image_shape in zip(boxes_all, scores_all, image_shapes):
            boxes = clip_boxes_to_image(boxes, image_shape)[:, 1:].reshape(-1, 4)  # background column dropped
            labels = torch.arange(1, num_classes, device=scores.device).expand(len(scores), -1).reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            method = self.nms_method.removeprefix("soft_")
            keep, decayed = soft_nms(
                boxes, scores, labels, method, self.soft_nms_sigma, self.nms_thresh, max(self.score_thresh, 1e-3)
            )
            keep, decayed = keep[: self.detections_per_img], decayed[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(decayed.to(scores.dtype))
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float(v) for v in value)
    return value


def _float_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: a head's floating-point outputs in float32 (a no-op outside autocast)."""
    return _to_float(output)


# --------------------------------------------------------------------------- model
class MaskRCNN(TorchvisionMaskRCNN):
    """torchvision's ``MaskRCNN`` with the maskworks instance contract (see the module docstring).

    Build it with :func:`mask_rcnn`, :func:`mask_rcnn_resnet50_fpn`, :func:`mask_rcnn_resnet50_fpn_v2` or
    :func:`mask_rcnn_mobilenet_v3_large_fpn`; the submodules and their state-dict keys are torchvision's.

    Args:
        backbone: module mapping ``(B, C, H, W)`` to an ``OrderedDict`` of FPN maps, with ``out_channels``.
        num_classes: classes including the background class 0.
        in_channels: image channels.
        options: validated options (``_check_options``): transform, RPN, RoI-head and pooler settings.
        rpn_anchor_generator, rpn_head, box_head, mask_head: torchvision modules (``None``: torchvision's default).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_channels: int,
        options: Mapping[str, Any],
        rpn_anchor_generator: AnchorGenerator | None = None,
        rpn_head: nn.Module | None = None,
        box_head: nn.Module | None = None,
        mask_head: nn.Module | None = None,
    ) -> None:
        pool = (options["pooler"], options["sampling_ratio"], options["aligned"])
        super().__init__(
            backbone,
            num_classes=num_classes,
            image_mean=options["image_mean"],
            image_std=options["image_std"],
            rpn_anchor_generator=rpn_anchor_generator,
            rpn_head=rpn_head,
            box_roi_pool=_make_pooler(pool[0], options["box_resolution"], *pool[1:]),
            box_head=box_head,
            mask_roi_pool=_make_pooler(pool[0], options["mask_resolution"], *pool[1:]),
            mask_head=mask_head,
            **{k: options[k] for k in _TV_KWARGS},
        )
        self.roi_heads.__class__ = _RoIHeads  # adds the Soft-NMS choice; same modules, state and defaults
        self.roi_heads.nms_method = options["box_nms"]
        self.roi_heads.soft_nms_sigma = float(options["soft_nms_sigma"])
        # PointRend adds roi_heads.point_head (after every torchvision module: their keys and initial values stay)
        self.roi_heads.point_head = None
        if options["mask_head"] == "pointrend":
            point = {k.removeprefix("point_head_"): options[k] for k in _POINT_HEAD_OPTIONS}
            self.roi_heads.point_head = PointHead(backbone.out_channels, num_classes, **point)
        # the contour head adds roi_heads.contour_head, likewise after every other module
        self.roi_heads.contour_head = None
        self.roi_heads.contour_max_instances = int(options["contour_max_instances"])
        if options["mask_head"] == "contour":
            self.roi_heads.contour_head = ContourHead(
                backbone.out_channels,
                num_points=options["contour_num_points"],
                hidden=options["contour_hidden"],
                num_iterations=options["contour_iterations"],
            )
        t = self.transform
        self.transform = _Transform(
            t.min_size,
            t.max_size,
            t.image_mean,
            t.image_std,
            size_divisible=t.size_divisible,
            fixed_size=t.fixed_size,
            _skip_resize=t._skip_resize,
        )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.loss_weights: dict[str, float] = dict(options["loss_weights"])
        self.return_mask_probs = bool(options["return_mask_probs"])
        # under autocast the box heads' deltas would be bfloat16 / float16, and torchvision's BoxCoder decodes and
        # encodes boxes in the deltas' dtype: a pixel's resolution at 256 px in bfloat16, zero-width proposals and
        # NaN box losses. Their outputs are cast to float32 so that all box arithmetic stays in float32.
        self.rpn.head.register_forward_hook(_float_outputs)
        self.roi_heads.box_predictor.register_forward_hook(_float_outputs)

    def _image_list(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return check_image_list(images, self.in_channels)

    def forward(  # type: ignore[override]
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training: the weighted loss dict. Eval: one dict per image (boxes, labels, scores, bool masks).

        Args:
            images: a list of ``(in_channels, H, W)`` tensors (sizes may differ) or a ``(B, in_channels, H, W)``
                tensor, normalised as ``image_mean`` / ``image_std`` say.
            targets: training only: per image ``boxes (N, 4)`` xyxy float, ``labels (N,)`` int64 in
                ``1..num_classes-1``, ``masks (N, H, W)`` uint8 / bool; ``N = 0`` is allowed.
        """
        image_list = self._image_list(images)
        self.transform.paste_probs = self.return_mask_probs
        out = super().forward(image_list, None if targets is None else list(targets))
        if self.training:
            return {k: v * self.loss_weights[k] if self.loss_weights.get(k, 1.0) != 1.0 else v for k, v in out.items()}
        for det in out:
            if det["masks"].dtype != torch.bool:  # probabilities (N, 1, H, W), pasted at the input size
                probs = det.pop("masks")[:, 0]
                det["masks"] = probs > 0.5
                if self.return_mask_probs:
                    det["mask_probs"] = probs
        return out


def _v2_heads(out_channels: int, box_resolution: int) -> dict[str, nn.Module]:
    """torchvision's ``maskrcnn_resnet50_fpn_v2`` heads (Li et al., "Benchmarking Detection Transfer Learning with
    Vision Transformers", 2021): 2-conv RPN head, 4conv1fc box head and BatchNorm mask head."""
    anchors = _default_anchors()
    return {
        "rpn_anchor_generator": anchors,
        "rpn_head": RPNHead(out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        "box_head": FastRCNNConvFCHead(
            (out_channels, box_resolution, box_resolution), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d
        ),
        "mask_head": MaskRCNNHeads(out_channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d),
    }


def _default_anchors() -> AnchorGenerator:
    """One size per FPN level (32..512 px for P2..P6), three aspect ratios: torchvision's ``_default_anchorgen``."""
    return AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)


def _build(
    encoder: str,
    num_classes: int,
    in_channels: int,
    encoder_weights: bool | str | os.PathLike | None,
    opts: Mapping[str, Any],
    v2: bool = False,
) -> MaskRCNN:
    _check_model_args(num_classes, in_channels)
    options = _check_options(opts, {}, in_channels)
    body = build_encoder(encoder, in_channels, encoder_weights)
    backbone = _encoder_fpn(body, encoder, nn.BatchNorm2d if v2 else None)
    # v1: torchvision's default TwoMLPHead (sized from the box pooler), RPNHead and MaskRCNNHeads
    heads = _v2_heads(backbone.out_channels, options["box_resolution"]) if v2 else {}
    heads.setdefault("rpn_anchor_generator", _default_anchors())
    return MaskRCNN(backbone, num_classes, in_channels, options, **heads)


@register_model(task="instance")
def mask_rcnn(
    encoder: str = "resnet50",
    num_classes: int = 91,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> MaskRCNN:
    """Mask R-CNN with FPN on any registered hierarchical backbone.

    The backbone's last maps at reductions 4, 8, 16 and 32 feed torchvision's ``FeaturePyramidNetwork`` (256
    channels) with a max-pooled fifth level; anchors, RPN, box and mask heads are torchvision's
    ``maskrcnn_resnet50_fpn`` defaults. A ResNet keeps torchvision's body layout (``backbone.body.layer1...``), so
    ``mask_rcnn(encoder="resnet50")`` is :func:`mask_rcnn_resnet50_fpn`; other backbones sit under
    ``backbone.body.encoder``.

    Args:
        encoder: a registered backbone with maps at reductions 4, 8, 16, 32 (``resnet18/34/50/101``,
            ``convnext_*``, ``convnextv2_*``, ``swin_*``, ``swinv2_*``, ``mit_b*``, ``mobilenet_*``); plain ViTs
            are refused.
        num_classes: classes including the background class 0 (COCO: 91).
        in_channels: image channels (1 for grayscale microscopy).
        encoder_weights: published backbone weights (``"imagenet"`` or a tag), a local checkpoint path, or
            ``None`` for random initialisation.
        **opts: the options of the module docstring (``min_size``, ``max_size``, ``image_mean``, ``image_std``,
            ``rpn_*``, ``box_*``, ``soft_nms_sigma``, ``mask_resolution``, ``pooler``, ``sampling_ratio``,
            ``aligned``, ``loss_weights``, ``return_mask_probs``, ``mask_head`` (``"standard"``, ``"pointrend"`` with
            its ``point_head_*`` settings, or ``"contour"`` with its ``contour_*`` settings)).
    """
    return _build(encoder, num_classes, in_channels, encoder_weights, opts)


@register_model(task="instance")
def mask_rcnn_resnet50_fpn(
    num_classes: int = 91,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> MaskRCNN:
    """Mask R-CNN ResNet-50-FPN: torchvision's ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)``
    (44,454,513 parameters with 91 classes) on maskworks' ``resnet50``; same keys, so its checkpoints load as they
    are. torchvision's COCO_V1 weights were trained with frozen BatchNorm of ``eps=0`` and 0-1 images: pass
    torchvision's ``image_mean`` / ``image_std`` to use them. Arguments as :func:`mask_rcnn`."""
    return _build("resnet50", num_classes, in_channels, encoder_weights, opts)


@register_model(task="instance")
def mask_rcnn_resnet50_fpn_v2(
    num_classes: int = 91,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> MaskRCNN:
    """Mask R-CNN ResNet-50-FPN v2: torchvision's ``maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)``
    (46,359,409 parameters with 91 classes): BatchNorm in the FPN, a 2-conv RPN head, a 4conv1fc box head and a
    BatchNorm mask head. Same keys as torchvision's. Arguments as :func:`mask_rcnn`."""
    return _build("resnet50", num_classes, in_channels, encoder_weights, opts, v2=True)


@register_model(task="instance")
def mask_rcnn_mobilenet_v3_large_fpn(
    num_classes: int = 91,
    in_channels: int = 3,
    encoder_weights: bool | str | os.PathLike | None = None,
    **opts: Any,
) -> MaskRCNN:
    """Real-time Mask R-CNN on MobileNetV3-Large (Q19): torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn``
    detector plus the standard mask branch.

    The FPN reads the last two maps of ``features`` (the stride-2 block of the last stage, 160 channels, and the
    final 1x1 conv, 960 channels; both at reduction 32) plus a max-pooled level; every level has anchors of 32..512
    px at ratios 0.5, 1, 2. BatchNorm is plain ``nn.BatchNorm2d`` (``eps=1e-5``), as torchvision's detection
    builder uses. Defaults are the 320 recipe: ``min_size=320``, ``max_size=640``, ``rpn_pre_nms_top_n_test=150``,
    ``rpn_post_nms_top_n_test=150``, ``rpn_score_thresh=0.05`` (``min_size=800, max_size=1333,
    rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000`` give ``fasterrcnn_mobilenet_v3_large_fpn``'s).
    The detector keys equal torchvision's (``backbone.body.0..16``, ``backbone.fpn``, ``rpn``,
    ``roi_heads.box_*``), so its Faster R-CNN checkpoints fill all but the mask branch. Arguments as
    :func:`mask_rcnn`.
    """
    _check_model_args(num_classes, in_channels)
    options = _check_options(opts, _MOBILENET_DEFAULTS, in_channels)
    encoder = build_encoder("mobilenet_v3_large", in_channels, encoder_weights, norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(_mobilenet_fpn(encoder), num_classes, in_channels, options, rpn_anchor_generator=anchors)
