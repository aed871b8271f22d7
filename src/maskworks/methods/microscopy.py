"""Microscopy instance segmentation: foreground + boundary + distance heads and marker-controlled watershed.

Touching cells or nuclei merge when a semantic foreground map is split into connected components. The remedy of
DCAN (Chen et al., "DCAN: Deep Contour-Aware Networks for Object Instance Segmentation from Histology Images",
MedIA 2017) and of distance-map regression (Naylor et al., "Segmentation of Nuclei in Histopathology Images by Deep
Regression of the Distance Map", IEEE TMI 2019) is to predict, besides the foreground, where instances end and how
deep inside an instance each pixel lies, and to flood the foreground from one marker per instance
(marker-controlled watershed, Beucher & Meyer 1993, here ``skimage.segmentation.watershed``).

Channels of the model output (any registered semantic model built with ``num_classes=3``, see
:func:`microscopy_model`), constants :data:`FOREGROUND`, :data:`BOUNDARY`, :data:`DISTANCE`:

* ``0`` foreground logit (sigmoid -> probability of "inside an instance"),
* ``1`` boundary logit (sigmoid -> probability of "on the inner border of an instance", touching borders included),
* ``2`` distance regression: the pixel's distance to the edge of its instance divided by that instance's largest
  distance, so 1 at each instance's centre whatever its size, 0 on the background (not squashed; clamp to ``[0, 1]``
  when decoding).

Pieces: :func:`instance_targets` (the three training targets of an id map), :class:`MicroscopyLoss` (BCE + BCE +
MSE/L1), :func:`decode_outputs` / :func:`predict_instances`, :func:`watershed_instances` and the baseline
:func:`connected_component_instances`, :func:`isbi_instances` / :func:`instance_map_from_masks` (id maps from the
datasets), :func:`id_map_to_instances` (to the torchvision instance format, e.g. for ``MaskAP``), and the stain /
intensity augmentations :class:`HEDJitter` (Tellez et al., "Whole-Slide Mitosis Detection in H&E Breast Histology
Using PHH3 as a Reference to Train Distilled Stain-Invariant Convolutional Networks", IEEE TMI 2018) and
:class:`IntensityJitter`.

Markers: the usual sketch takes ``peak_local_max`` of the raw distance with a fixed ``min_distance``, which puts
several markers on the flat top of one cell and none on a cell smaller than ``min_distance``, and ignores the
boundary head. Here a marker is a connected component of the pixels that are confidently foreground, not on a
predicted boundary and deep inside their instance (``distance > marker_threshold``); with the per-instance
normalised distance every instance, small or large, reaches 1 at its centre. ``markers="h_maxima"`` takes the
extended maxima of the distance instead (one marker per dome at least ``h`` above its surroundings); use it for a
distance map that is not normalised per instance (e.g. the EDT of a binary mask), whose saddles between touching
cells can lie above any fixed threshold. Elongated, non-convex cells (ISBI 2012 neurites) have several distance
domes: there a low ``marker_threshold`` (about 0.1) with a ``min_marker_size`` lets the boundary head separate the
cells instead (on the exact targets of ISBI slice 0: AJI 0.91 with the defaults, 0.99 with ``marker_threshold=0.1,
min_marker_size=10``).

Training on ISBI 2012 (:class:`maskworks.data.isbi.ISBI2012Instances` samples, after their transforms)::

    ids = np.stack([instance_map_from_masks(s["instances"]["masks"]) for s in samples])  # (B, H, W), membranes 0
    ignore = torch.stack([s["mask"] for s in samples]) == 255  # small specks of interior and padding
    loss = MicroscopyLoss()(model(images), instance_targets(ids, ignore=ignore))
    pred_ids = predict_instances(model, images, marker_threshold=0.1, min_marker_size=10)  # list of (H, W)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import tv_tensors

from maskworks.data.transforms import _Transform
from maskworks.losses.base import split_outputs

__all__ = [
    "FOREGROUND",
    "BOUNDARY",
    "DISTANCE",
    "CHANNELS",
    "instance_targets",
    "instance_map_from_masks",
    "isbi_instances",
    "microscopy_model",
    "MicroscopyLoss",
    "decode_outputs",
    "watershed_instances",
    "connected_component_instances",
    "predict_instances",
    "id_map_to_instances",
    "HEDJitter",
    "IntensityJitter",
]

FOREGROUND, BOUNDARY, DISTANCE = 0, 1, 2
CHANNELS = ("foreground", "boundary", "distance")
_STRUCTURE = {1: np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool), 2: np.ones((3, 3), dtype=bool)}


# ---------------------------------------------------------------------------------------------- helpers
def _numpy(x: Any, name: str, ndim: tuple[int, ...] = (2,)) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim not in ndim:
        shapes = " or ".join({2: "(H, W)", 3: "(B, H, W)"}[n] for n in ndim)
        raise ValueError(f"{name} must be {shapes}, got shape {a.shape}")
    return a


def _id_array(x: Any, name: str, ndim: tuple[int, ...] = (2,)) -> np.ndarray:
    a = _numpy(x, name, ndim)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer instance id map (0 = background), got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must hold instance ids >= 0 (0 = background), got {int(a.min())}")
    return a


def _sequential(ids: np.ndarray) -> np.ndarray:
    """Ids relabelled ``1..N`` in increasing order of the original ids (0 stays 0), int32."""
    uniq, inv = np.unique(ids, return_inverse=True)
    if uniq.size and uniq[0] != 0:
        inv = inv + 1
    return inv.reshape(ids.shape).astype(np.int32)


def _check_connectivity(connectivity: int) -> int:
    if connectivity not in _STRUCTURE or isinstance(connectivity, bool):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity!r}")
    return int(connectivity)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set the labels of fewer than ``min_size`` pixels to 0 (in place) and return ``labels``."""
    if min_size > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    return labels


# ---------------------------------------------------------------------------------------------- targets
def _targets_2d(ids: np.ndarray, boundary_width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    ids = _sequential(ids)
    fg = ids > 0
    size = 2 * boundary_width + 1
    hi = ndimage.maximum_filter(ids, size=size, mode="nearest")
    lo = ndimage.minimum_filter(ids, size=size, mode="nearest")
    boundary = fg & ((hi != ids) | (lo != ids))
    distance = np.zeros(ids.shape, dtype=np.float32)
    for label, box in enumerate(ndimage.find_objects(ids), start=1):
        if box is None:
            continue
        inside = ids[box] == label
        edt = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]  # zero pad: the image edge is an edge
        distance[box][inside] = edt[inside] / edt.max()
    return fg, boundary, distance


def instance_targets(instances: Any, boundary_width: int = 1, ignore: Any = None) -> dict[str, torch.Tensor]:
    """The three training targets of instance id map(s).

    * ``foreground``: 1 inside any instance.
    * ``boundary``: 1 on the pixels of an instance that have a pixel of another label (another instance or the
      background) within ``boundary_width`` pixels (square neighbourhood), so two touching instances are separated
      by a band of ``2 * boundary_width`` boundary pixels. The image edge is not a boundary.
    * ``distance``: inside each instance, the Euclidean distance to the nearest pixel outside it (another instance,
      the background or beyond the image edge) divided by the instance's largest such distance: in ``(0, 1]``,
      exactly 1 at its deepest pixel(s); 0 on the background.

    Args:
        instances: integer ``(H, W)`` or ``(B, H, W)`` id map(s), numpy or torch; 0 = background, ids need not be
            consecutive.
        boundary_width: width of the inner boundary band in pixels (>= 1).
        ignore: optional bool mask of the same shape; its pixels get ``valid = False`` (the loss skips them).

    Returns:
        ``{"foreground", "boundary", "distance"}`` float32 and ``"valid"`` bool tensors of the input's shape, on the
        input's device when it is a tensor.
    """
    if isinstance(boundary_width, bool) or not isinstance(boundary_width, (int, np.integer)) or boundary_width < 1:
        raise ValueError(f"boundary_width must be an integer >= 1 (pixels), got {boundary_width!r}")
    ids = _id_array(instances, "instances", (2, 3))
    device = instances.device if isinstance(instances, torch.Tensor) else None
    batch = ids if ids.ndim == 3 else ids[None]
    maps = [_targets_2d(x, int(boundary_width)) for x in batch]  # [(fg, boundary, distance)] per image
    out = {name: torch.from_numpy(np.stack([m[k] for m in maps]).astype(np.float32)) for k, name in enumerate(CHANNELS)}
    if ignore is None:
        out["valid"] = torch.ones(batch.shape, dtype=torch.bool)
    else:
        ign = _numpy(ignore, "ignore", (ids.ndim,))
        if ign.shape != ids.shape:
            raise ValueError(f"ignore must have the shape of instances {ids.shape}, got {ign.shape}")
        out["valid"] = torch.from_numpy(~ign.astype(bool).reshape(batch.shape))
    if ids.ndim == 2:
        out = {k: v[0] for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def instance_map_from_masks(masks: Any) -> np.ndarray:
    """``(H, W)`` int32 id map of stacked binary instance masks ``(N, H, W)``: mask ``i`` gets id ``i + 1``.

    Where masks overlap, the first one keeps the pixel. This turns the ``instances["masks"]`` of a dataset sample
    (e.g. :class:`maskworks.data.isbi.ISBI2012Instances` after its transforms) into the input of
    :func:`instance_targets`.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    m = np.asarray(masks).astype(bool)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    if m.shape[0] == 0:
        return np.zeros(m.shape[1:], dtype=np.int32)
    return np.where(m.any(0), m.argmax(0) + 1, 0).astype(np.int32)


def isbi_instances(label: Any, min_area: int = 16, connectivity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Cell instances of an ISBI 2012 label slice.

    ISBI 2012 labels are 8-bit images with 255 (white) = cell interior and 0 (black) = membrane; as in
    :class:`maskworks.data.isbi.ISBI2012Instances`, values >= 128 are interior, every connected region of interior
    is one cell (4-connected by default: two cells touching only diagonally across a one-pixel membrane stay apart),
    and regions smaller than ``min_area`` are ignored (neither cell nor membrane). Membranes are background (0).

    Args:
        label: ``(H, W)`` uint8 label image (numpy or torch).
        min_area: regions of fewer pixels are ignored.
        connectivity: 4 or 8.

    Returns:
        ``(ids, ignore)``: int32 ``(H, W)`` id map numbered ``1..N`` in scipy's raster order (the order of the
        dataset's instances), and the bool ``(H, W)`` mask of the ignored small regions.
    """
    from scipy import ndimage

    if connectivity not in (4, 8) or isinstance(connectivity, bool):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 0:
        raise ValueError(f"min_area must be an integer >= 0 (pixels), got {min_area!r}")
    cells = _numpy(label, "label") >= 128
    components, n = ndimage.label(cells, structure=_STRUCTURE[1 if connectivity == 4 else 2])
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    new_id = np.zeros(n + 1, dtype=np.int32)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_id[components], cells & ~keep[components]


# ---------------------------------------------------------------------------------------------- model and loss
def microscopy_model(name: str = "unet", **kwargs: Any) -> nn.Module:
    """A registered semantic model with the three output channels of this module (see the module docstring).

    The model is the registered one, unchanged (its checkpoints reload with ``create_model(name, num_classes=3)``);
    only the meaning of its channels is fixed here.

    Args:
        name: a registered semantic model, e.g. ``"unet"`` (with ``encoder=...``) or ``"unet_vanilla"``.
        **kwargs: its constructor arguments (``in_channels``, ``encoder``, ...); ``num_classes`` must be 3 if given.

    Returns:
        The model; its output ``(B, 3, H, W)`` is foreground logit, boundary logit, distance.
    """
    from maskworks.registry import create_model, model_entry

    if kwargs.get("num_classes", 3) != 3:
        raise ValueError(
            f"microscopy_model outputs 3 channels (foreground, boundary, distance), got num_classes="
            f"{kwargs['num_classes']!r}"
        )
    entry = model_entry(name)
    if entry.task != "semantic":
        raise ValueError(f"microscopy_model needs a semantic model (logits at input size), {name!r} is {entry.task!r}")
    return create_model(name, **{**kwargs, "num_classes": 3})


_DISTANCE_LOSSES = ("mse", "l1")
_DISTANCE_REGIONS = ("foreground", "all")


class MicroscopyLoss(nn.Module):
    """BCE on the foreground and boundary logits plus MSE (or L1) on the distance channel.

    ``loss = foreground_weight * BCE(fg) + boundary_weight * BCE(boundary) + distance_weight * D(distance)``, each
    term a mean over the valid pixels; ``D`` is taken over the target foreground (``distance_region="foreground"``:
    the background's distance is never used by :func:`watershed_instances`, which masks it with the foreground) or
    over all valid pixels (``"all"``: the background is pulled to 0). Auxiliary outputs (``{"out", "aux"}``) are
    upsampled to the target size and add ``aux_weight`` times their loss.

    Args:
        foreground_weight: weight of the foreground BCE.
        boundary_weight: weight of the boundary BCE.
        distance_weight: weight of the distance regression.
        boundary_pos_weight: BCE ``pos_weight`` of boundary pixels (they are few; e.g. 2-5), or None for 1.
        distance_loss: ``"mse"`` or ``"l1"``.
        distance_region: ``"foreground"`` or ``"all"`` (see above).
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(
        self,
        foreground_weight: float = 1.0,
        boundary_weight: float = 1.0,
        distance_weight: float = 1.0,
        boundary_pos_weight: float | None = None,
        distance_loss: str = "mse",
        distance_region: str = "foreground",
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        weights = {"foreground_weight": foreground_weight, "boundary_weight": boundary_weight}
        weights |= {"distance_weight": distance_weight, "aux_weight": aux_weight}
        for key, value in weights.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if boundary_pos_weight is not None and not boundary_pos_weight > 0:
            raise ValueError(f"boundary_pos_weight must be > 0 or None, got {boundary_pos_weight!r}")
        if distance_loss not in _DISTANCE_LOSSES:
            raise ValueError(f"distance_loss must be one of {_DISTANCE_LOSSES}, got {distance_loss!r}")
        if distance_region not in _DISTANCE_REGIONS:
            raise ValueError(f"distance_region must be one of {_DISTANCE_REGIONS}, got {distance_region!r}")
        self.foreground_weight, self.boundary_weight = float(foreground_weight), float(boundary_weight)
        self.distance_weight, self.aux_weight = float(distance_weight), float(aux_weight)
        self.boundary_pos_weight = None if boundary_pos_weight is None else float(boundary_pos_weight)
        self.distance_loss, self.distance_region = distance_loss, distance_region

    def terms(self, logits: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted total and its three unweighted parts for one logits tensor.

        Args:
            logits: ``(B, 3, h, w)``; resized (bilinear) to the target size when it differs.
            targets: ``foreground``, ``boundary``, ``distance`` ``(B, H, W)`` and optionally ``valid`` (bool) as
                :func:`instance_targets` returns them.

        Returns:
            ``{"loss", "foreground", "boundary", "distance"}`` scalars.
        """
        fg_t, bd_t, dist_t, valid = self._check(logits, targets)
        if logits.shape[-2:] != fg_t.shape[-2:]:
            logits = F.interpolate(logits, size=fg_t.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits.float()
        w = valid.float()
        n = w.sum().clamp_min(1.0)
        fg = (F.binary_cross_entropy_with_logits(logits[:, FOREGROUND], fg_t, reduction="none") * w).sum() / n
        pos = None if self.boundary_pos_weight is None else logits.new_tensor(self.boundary_pos_weight)
        bd = F.binary_cross_entropy_with_logits(logits[:, BOUNDARY], bd_t, reduction="none", pos_weight=pos)
        bd = (bd * w).sum() / n
        region = w * fg_t if self.distance_region == "foreground" else w
        err = logits[:, DISTANCE] - dist_t
        err = err.square() if self.distance_loss == "mse" else err.abs()
        dist = (err * region).sum() / region.sum().clamp_min(1.0)
        total = self.foreground_weight * fg + self.boundary_weight * bd + self.distance_weight * dist
        return {"loss": total, "foreground": fg, "boundary": bd, "distance": dist}

    @staticmethod
    def _check(
        logits: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if logits.ndim != 4 or logits.shape[1] != 3:
            raise ValueError(
                f"logits must be (B, 3, H, W) (foreground, boundary, distance), got shape {tuple(logits.shape)}"
            )
        missing = [k for k in CHANNELS if k not in targets]
        if missing:
            raise KeyError(f"targets lack {missing}; expected the dict of instance_targets()")
        fg_t, bd_t, dist_t = (targets[k].to(logits.device, torch.float32) for k in CHANNELS)
        valid = targets.get("valid")
        valid = torch.ones_like(fg_t, dtype=torch.bool) if valid is None else valid.to(logits.device, torch.bool)
        for name, t in zip((*CHANNELS, "valid"), (fg_t, bd_t, dist_t, valid)):
            if t.ndim != 3 or t.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"targets[{name!r}] must be (B, H, W) with B = {logits.shape[0]}, got shape {tuple(t.shape)}"
                )
            if t.shape != fg_t.shape:
                raise ValueError(f"targets[{name!r}] has shape {tuple(t.shape)}, foreground {tuple(fg_t.shape)}")
        return fg_t, bd_t, dist_t, valid

    def forward(self, output: torch.Tensor | dict, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Loss of the main output plus ``aux_weight`` times the loss of each auxiliary output.

        Args:
            output: logits ``(B, 3, H, W)`` or ``{"out": logits, "aux": [logits, ...]}``.
            targets: the dict of :func:`instance_targets` (batched).

        Returns:
            The scalar loss.
        """
        main, aux = split_outputs(output)
        loss = self.terms(main, targets)["loss"]
        for a in aux:
            loss = loss + self.aux_weight * self.terms(a, targets)["loss"]
        return loss


# ---------------------------------------------------------------------------------------------- inference
def decode_outputs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Foreground and boundary probabilities (sigmoid) and the distance clamped to ``[0, 1]``.

    Args:
        logits: ``(B, 3, H, W)`` or ``(3, H, W)`` model output.

    Returns:
        ``{"foreground", "boundary", "distance"}``, each ``(B, H, W)`` (or ``(H, W)``).
    """
    if logits.ndim not in (3, 4) or logits.shape[-3] != 3:
        raise ValueError(f"logits must be (B, 3, H, W) or (3, H, W), got shape {tuple(logits.shape)}")
    return {
        "foreground": logits[..., FOREGROUND, :, :].sigmoid(),
        "boundary": logits[..., BOUNDARY, :, :].sigmoid(),
        "distance": logits[..., DISTANCE, :, :].clamp(0.0, 1.0),
    }


_MARKERS = ("threshold", "h_maxima")
_FLOODS = ("distance", "boundary")


def _extended_maxima(image: np.ndarray, h: float, connectivity: int) -> np.ndarray:
    """Extended maxima: the regional maxima of the h-maxima transform (morphological reconstruction by dilation of
    ``image - h`` under ``image``), one connected plateau per dome of height >= ``h`` (``skimage.morphology.h_maxima``
    keeps only the top pixels, which can be several unconnected pixels of one dome)."""
    from skimage.morphology import local_maxima, reconstruction

    rec = reconstruction(image - h, image, method="dilation", footprint=_STRUCTURE[connectivity])
    return local_maxima(rec, connectivity=connectivity, allow_borders=True)


def watershed_instances(
    foreground: Any,
    boundary: Any | None,
    distance: Any,
    fg_threshold: float = 0.5,
    marker_threshold: float = 0.5,
    boundary_threshold: float = 0.5,
    markers: str = "threshold",
    h: float = 0.1,
    flood: str = "distance",
    min_marker_size: int = 1,
    min_size: int = 1,
    keep_unmarked: bool = True,
    connectivity: int = 1,
) -> np.ndarray:
    """Instances of one image by marker-controlled watershed of the three head outputs.

    1. Foreground: ``foreground > fg_threshold``.
    2. Markers: connected components of the foreground pixels with ``boundary < boundary_threshold`` (when a
       boundary map is given) and ``distance > marker_threshold`` (``markers="threshold"``) or on an extended maximum
       of the distance (``markers="h_maxima"``: the regional maxima of the h-maxima transform, one plateau per dome
       at least ``h`` high); components of fewer than ``min_marker_size`` pixels are dropped.
    3. Flooding: ``skimage.segmentation.watershed`` of ``-distance`` (``flood="distance"``) or of the boundary
       probability (``flood="boundary"``) from the markers, restricted to the foreground.
    4. Foreground components reached by no marker become instances of their own (``keep_unmarked``) instead of
       being dropped; instances of fewer than ``min_size`` pixels are removed; ids are renumbered ``1..N``.

    Args:
        foreground: ``(H, W)`` foreground probability (numpy or torch).
        boundary: ``(H, W)`` boundary probability, or None to build markers from the distance alone.
        distance: ``(H, W)`` normalised distance (1 at instance centres).
        fg_threshold: foreground probability threshold.
        marker_threshold: distance a marker pixel must exceed (``markers="threshold"``).
        boundary_threshold: boundary probability a marker pixel must stay below.
        markers: ``"threshold"`` or ``"h_maxima"``.
        h: smallest dome height of a marker (``markers="h_maxima"``), in distance units.
        flood: ``"distance"`` or ``"boundary"`` (needs ``boundary``).
        min_marker_size: smallest marker in pixels.
        min_size: smallest instance in pixels.
        keep_unmarked: give unmarked foreground components their own instance.
        connectivity: 1 (4-neighbours) or 2 (8-neighbours) for markers, flooding and components.

    Returns:
        int32 ``(H, W)`` id map, 0 = background.
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    connectivity = _check_connectivity(connectivity)
    if markers not in _MARKERS:
        raise ValueError(f"markers must be one of {_MARKERS}, got {markers!r}")
    if flood not in _FLOODS:
        raise ValueError(f"flood must be one of {_FLOODS}, got {flood!r}")
    if flood == "boundary" and boundary is None:
        raise ValueError("flood='boundary' needs a boundary map, got boundary=None")
    if markers == "h_maxima" and not h > 0:
        raise ValueError(f"h must be > 0 for markers='h_maxima', got {h!r}")
    fg_p = _numpy(foreground, "foreground").astype(np.float32)
    dist = _numpy(distance, "distance").astype(np.float32)
    bd = None if boundary is None else _numpy(boundary, "boundary").astype(np.float32)
    for name, a in (("distance", dist), ("boundary", bd)):
        if a is not None and a.shape != fg_p.shape:
            raise ValueError(f"{name} must have the foreground's shape {fg_p.shape}, got {a.shape}")
    fg = fg_p > fg_threshold
    seed = fg if bd is None else fg & (bd < boundary_threshold)
    if markers == "threshold":
        seed = seed & (dist > marker_threshold)
    else:
        seed = seed & _extended_maxima(np.where(fg, dist, 0.0), h, connectivity)
    marker_ids, _ = ndimage.label(seed, structure=_STRUCTURE[connectivity])
    marker_ids = _remove_small(marker_ids, min_marker_size)
    elevation = -dist if flood == "distance" else bd
    labels = watershed(elevation, marker_ids, mask=fg, connectivity=connectivity).astype(np.int32)
    if keep_unmarked:
        rest, n = ndimage.label(fg & (labels == 0), structure=_STRUCTURE[connectivity])
        if n:
            labels = np.where(rest > 0, rest + labels.max(), labels).astype(np.int32)
    return _sequential(_remove_small(labels, min_size))


def connected_component_instances(
    foreground: Any, threshold: float = 0.5, connectivity: int = 1, min_size: int = 1
) -> np.ndarray:
    """Baseline instances: connected components of ``foreground > threshold`` (touching instances merge).

    Args:
        foreground: ``(H, W)`` foreground probability (numpy or torch).
        threshold: probability threshold.
        connectivity: 1 (4-neighbours) or 2 (8-neighbours).
        min_size: components of fewer pixels are removed.

    Returns:
        int32 ``(H, W)`` id map, 0 = background.
    """
    from scipy import ndimage

    connectivity = _check_connectivity(connectivity)
    labels, _ = ndimage.label(_numpy(foreground, "foreground") > threshold, structure=_STRUCTURE[connectivity])
    return _sequential(_remove_small(labels.astype(np.int32), min_size))


def predict_instances(
    model: nn.Module, images: torch.Tensor, method: str = "watershed", **kwargs: Any
) -> list[np.ndarray]:
    """Run a three-channel model on a batch and post-process each image into an instance id map.

    The model runs in eval mode under ``torch.inference_mode`` (its training flag is restored afterwards).

    Args:
        model: a model from :func:`microscopy_model` (output ``(B, 3, H, W)``).
        images: ``(B, C, H, W)`` normalised images on the model's device.
        method: ``"watershed"`` (:func:`watershed_instances`) or ``"components"``
            (:func:`connected_component_instances` of the foreground).
        **kwargs: options of the chosen post-processing function.

    Returns:
        One int32 ``(H, W)`` id map per image.
    """
    if method not in ("watershed", "components"):
        raise ValueError(f"method must be 'watershed' or 'components', got {method!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits, _ = split_outputs(model(images))
    finally:
        model.train(was_training)
    maps = {k: v.float().cpu().numpy() for k, v in decode_outputs(logits).items()}
    if method == "components":
        return [connected_component_instances(fg, **kwargs) for fg in maps["foreground"]]
    return [
        watershed_instances(fg, bd, dist, **kwargs)
        for fg, bd, dist in zip(maps["foreground"], maps["boundary"], maps["distance"])
    ]


def id_map_to_instances(ids: Any, foreground: Any | None = None, label: int = 1) -> dict[str, torch.Tensor]:
    """An id map as a torchvision-style instance dict (the contract of instance models), e.g. for ``MaskAP``.

    Args:
        ids: ``(H, W)`` integer id map, 0 = background.
        foreground: optional ``(H, W)`` foreground probability; each instance's score is its mean over the
            instance (1.0 without it).
        label: class id given to every instance.

    Returns:
        ``{"masks": bool (N, H, W), "boxes": float32 (N, 4) xyxy, "labels": int64 (N,), "scores": float32 (N,)}``,
        instances in increasing id order.
    """
    from maskworks.data.io import masks_to_boxes

    a = _id_array(ids, "ids")
    present = np.unique(a)
    present = present[present > 0]
    masks = torch.from_numpy(a[None] == present[:, None, None])  # (N, H, W)
    if foreground is None:
        scores = torch.ones(len(present), dtype=torch.float32)
    else:
        fg = _numpy(foreground, "foreground").astype(np.float64)
        if fg.shape != a.shape:
            raise ValueError(f"foreground must have the shape of ids {a.shape}, got {fg.shape}")
        seq = _sequential(a)
        sums = np.bincount(seq.ravel(), weights=fg.ravel(), minlength=len(present) + 1)[1:]
        counts = np.bincount(seq.ravel(), minlength=len(present) + 1)[1:]
        scores = torch.from_numpy((sums / np.maximum(counts, 1)).astype(np.float32))
    return {
        "masks": masks,
        "boxes": masks_to_boxes(masks),
        "labels": torch.full((len(present),), int(label), dtype=torch.int64),
        "scores": scores,
    }


# ---------------------------------------------------------------------------------------------- augmentation
# Ruifrok & Johnston (2001) haematoxylin, eosin and DAB optical-density vectors, as skimage.color.rgb_from_hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LOG_EPS = math.log(1e-6)  # skimage's optical-density scale: stains = log(max(rgb, 1e-6)) / log(1e-6) @ hed_from_rgb


def _to_unit(inpt: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    x = inpt.as_subclass(torch.Tensor)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0), x.dtype
    if not x.is_floating_point():
        raise TypeError(f"expected a uint8 (0-255) or float (0-1) image, got dtype {x.dtype}")
    return x, x.dtype


def _from_unit(x: torch.Tensor, dtype: torch.dtype, like: Any) -> Any:
    x = x.clamp_(0.0, 1.0)
    if dtype == torch.uint8:
        x = x.mul_(255.0).round_().to(torch.uint8)
    else:
        x = x.to(dtype)
    return tv_tensors.wrap(x, like=like)


def _range(name: str, value: float | Sequence[float], center: float, low: float = -math.inf) -> tuple[float, float]:
    """``(center - v, center + v)`` of a number, or a ``(lo, hi)`` pair as given; checked against ``low``."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 or a (low, high) pair, got {value!r}")
        lo, hi = center - float(value), center + float(value)
    else:
        lo, hi = (float(v) for v in value)
    if not low <= lo <= hi:
        raise ValueError(f"{name} range must satisfy {low} <= low <= high, got ({lo}, {hi})")
    return lo, hi


class HEDJitter(_Transform):
    """Stain augmentation of RGB (e.g. H&E) images in haematoxylin-eosin-DAB space (Tellez et al. 2018).

    The image is deconvolved into the stain space of ``skimage.color.rgb2hed`` (Ruifrok & Johnston colour
    deconvolution: optical density ``log(rgb) / log(1e-6)`` times ``hed_from_rgb``), each stain channel ``s`` is
    changed to ``alpha * s + beta`` with ``alpha`` uniform in ``[1 - alpha_range, 1 + alpha_range]`` and ``beta``
    uniform in ``[-beta_range, beta_range]``, drawn per channel, and the result is converted back to RGB and
    clipped. Unlike ``skimage.color.rgb2hed``, negative stain values are not clipped, so with ``alpha = 1`` and
    ``beta = 0`` any RGB image comes back unchanged. Only the image is touched; masks and instances pass through.

    Args:
        alpha: ``alpha_range`` (scale jitter) or an explicit ``(low, high)`` range of the factor.
        beta: ``beta_range`` (shift jitter, in ``rgb2hed`` units) or an explicit ``(low, high)`` range.
        p: probability of applying it.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, alpha: float | Sequence[float] = 0.05, beta: float | Sequence[float] = 0.05, p: float = 1.0):
        super().__init__()
        self.alpha, self.beta = _range("alpha", alpha, 1.0, low=0.0), _range("beta", beta, 0.0)
        if not 0 <= p <= 1:
            raise ValueError(f"p is a probability and must be in [0, 1], got {p}")
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = bool(torch.rand(()) < self.p)
        alpha = torch.empty(3, dtype=torch.float64).uniform_(*self.alpha)
        beta = torch.empty(3, dtype=torch.float64).uniform_(*self.beta)
        return {"apply": apply, "alpha": alpha, "beta": beta}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        if inpt.shape[-3] != 3:
            raise ValueError(f"HEDJitter needs RGB images (3 channels), got {inpt.shape[-3]} channels")
        x, dtype = _to_unit(inpt)
        od = x.double().clamp_min(1e-6).log_() / _LOG_EPS  # (..., 3, H, W)
        stains = torch.einsum("...chw,cd->...dhw", od, _HED_FROM_RGB)
        stains = stains * params["alpha"].view(3, 1, 1) + params["beta"].view(3, 1, 1)
        rgb = torch.einsum("...dhw,dc->...chw", stains, _RGB_FROM_HED).mul_(_LOG_EPS).exp_()
        return _from_unit(rgb.float(), dtype, inpt)


class IntensityJitter(_Transform):
    """Gamma, contrast and brightness jitter for greyscale (or any-channel) microscopy images.

    On intensities in ``[0, 1]``: ``x ** gamma``, then ``(x - mean) * contrast + mean`` (``mean`` over the whole
    image), then ``+ brightness``, clipped to ``[0, 1]``; one draw of each factor per call, shared by all channels.
    uint8 images come back as uint8, float ones as float. Only the image is touched.

    Args:
        gamma: ``(low, high)`` range of the gamma exponent (drawn log-uniformly), or None to skip.
        contrast: contrast jitter ``c`` (factor uniform in ``[1 - c, 1 + c]``) or a ``(low, high)`` range.
        brightness: brightness jitter ``b`` (shift uniform in ``[-b, b]``, 0-1 units) or a ``(low, high)`` range.
        p: probability of applying it.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self,
        gamma: Sequence[float] | None = (0.7, 1.5),
        contrast: float | Sequence[float] = 0.2,
        brightness: float | Sequence[float] = 0.1,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        if gamma is not None:
            lo, hi = (float(g) for g in gamma)
            if not 0 < lo <= hi:
                raise ValueError(f"gamma must be a (low, high) range with 0 < low <= high, got {tuple(gamma)}")
            gamma = (lo, hi)
        self.gamma = gamma
        self.contrast = _range("contrast", contrast, 1.0, low=0.0)
        self.brightness = _range("brightness", brightness, 0.0)
        if not 0 <= p <= 1:
            raise ValueError(f"p is a probability and must be in [0, 1], got {p}")
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = bool(torch.rand(()) < self.p)
        gamma = 1.0
        if self.gamma is not None:
            gamma = math.exp(float(torch.empty(()).uniform_(math.log(self.gamma[0]), math.log(self.gamma[1]))))
        contrast = float(torch.empty(()).uniform_(*self.contrast))
        brightness = float(torch.empty(()).uniform_(*self.brightness))
        return {"apply": apply, "gamma": gamma, "contrast": contrast, "brightness": brightness}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        x, dtype = _to_unit(inpt)
        x = x.float().clamp(0.0, 1.0).pow(params["gamma"])
        mean = x.mean(dim=(-3, -2, -1), keepdim=True)
        x = (x - mean) * params["contrast"] + mean + params["brightness"]
        return _from_unit(x, dtype, inpt)
