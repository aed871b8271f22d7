"""Point sampling for PointRend (Kirillov et al., "PointRend: Image Segmentation as Rendering", CVPR 2020).

PointRend predicts a mask at a set of real-valued points instead of on a dense grid. Points are ``(x, y)`` pairs
in ``[0, 1] x [0, 1]``, normalised to the map they are read from (a box's coarse mask, an image, a feature map):
``(0, 0)`` is the top-left corner of the top-left cell and ``(1, 1)`` the bottom-right corner of the bottom-right
cell, so that cell ``(i, j)`` of an ``H x W`` map has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``
(``grid_sample`` with ``align_corners=False``).

* :func:`point_sample`: bilinear values of a map at points.
* :func:`get_uncertain_point_coords_with_randomness`: the training points (section 3.1 of the paper): ``k * N``
  uniform points, the ``beta * N`` most uncertain of them, plus ``(1 - beta) * N`` new uniform points.
* :func:`get_uncertain_point_coords_on_grid`: the inference points (adaptive subdivision): the ``N`` most uncertain
  cells of a regular grid and their centres.

Written from the paper's definitions and detectron2's ``projects/PointRend`` conventions (same shapes, ``[0, 1]``
coordinates and ``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["get_uncertain_point_coords_on_grid", "get_uncertain_point_coords_with_randomness", "point_sample"]


def point_sample(
    input: torch.Tensor, point_coords: torch.Tensor, align_corners: bool = False, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Bilinear values of ``input`` at ``point_coords``: ``F.grid_sample`` with ``[0, 1]`` coordinates.

    Args:
        input: ``(N, C, H, W)`` maps.
        point_coords: ``(N, P, 2)`` (or ``(N, Hg, Wg, 2)``) ``(x, y)`` points in ``[0, 1] x [0, 1]``, one set per
            map; with ``align_corners=False`` 0 and 1 are the outer edges of the first and last cells, so a cell
            centre gives that cell's value exactly.
        align_corners: ``grid_sample``'s flag (``True``: 0 and 1 are the centres of the first and last cells).
        padding_mode: ``grid_sample``'s rule for points outside the map (``"zeros"``: bilinear weights on a
            zero-padded border, its default).

    Returns:
        ``(N, C, P)`` (or ``(N, C, Hg, Wg)``) values in ``input``'s dtype.
    """
    if input.ndim != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if point_coords.ndim not in (3, 4) or point_coords.shape[-1] != 2 or point_coords.shape[0] != input.shape[0]:
        raise ValueError(
            f"point_coords must be (N, P, 2) or (N, Hg, Wg, 2) with N = {input.shape[0]}, got "
            f"{tuple(point_coords.shape)}"
        )
    grid = point_coords[:, :, None] if point_coords.ndim == 3 else point_coords
    out = F.grid_sample(
        input, 2.0 * grid.to(input.dtype) - 1.0, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners
    )
    return out[..., 0] if point_coords.ndim == 3 else out


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's training points: biased towards uncertain regions, with uniform coverage kept.

    ``int(num_points * oversample_ratio)`` points are drawn uniformly in ``[0, 1]^2`` for every map, the coarse
    logits are interpolated at them (:func:`point_sample`) and scored by ``uncertainty_func``; the
    ``int(importance_sample_ratio * num_points)`` highest-scoring ones are kept and the rest of the ``num_points``
    are new uniform points. Uncertainty is measured on the interpolated logits, not interpolated from per-cell
    uncertainties (a point between logits -1 and 1 has logit 0: the most uncertain, as the paper intends).

    Args:
        coarse_logits: ``(R, C, H, W)`` coarse predictions (``C = 1`` for class-agnostic masks).
        uncertainty_func: maps point logits ``(R, C, P)`` to uncertainties ``(R, 1, P)`` (higher: more uncertain),
            e.g. ``-abs(logit)`` of each map's class.
        num_points: ``N``, points per map.
        oversample_ratio: ``k >= 1``; ``k * N`` candidates are scored.
        importance_sample_ratio: ``beta`` in ``[0, 1]``, the share of points chosen by uncertainty.
        generator: random generator for the uniform points (``None``: the global one).

    Returns:
        ``(R, N, 2)`` ``(x, y)`` points in ``[0, 1]``, the uncertain ones first.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio!r}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio!r}")
    num_maps, device = coarse_logits.shape[0], coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = torch.rand(num_maps, num_sampled, 2, device=device, generator=generator)
    uncertainty = uncertainty_func(point_sample(coarse_logits, candidates.to(coarse_logits.dtype)))
    if uncertainty.shape != (num_maps, 1, num_sampled):
        raise ValueError(
            f"uncertainty_func must return ({num_maps}, 1, {num_sampled}) uncertainties, got {tuple(uncertainty.shape)}"
        )
    top = uncertainty[:, 0].topk(num_uncertain, dim=1).indices  # (R, beta N)
    uncertain = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    random = torch.rand(num_maps, num_points - num_uncertain, 2, device=device, generator=generator)
    return torch.cat([uncertain, random], dim=1)


def get_uncertain_point_coords_on_grid(
    uncertainty_map: torch.Tensor, num_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_points`` most uncertain cells of a regular grid (PointRend's subdivision inference).

    Args:
        uncertainty_map: ``(R, 1, H, W)`` uncertainties (higher: more uncertain).
        num_points: cells to pick per map; at most ``H * W`` are returned.

    Returns:
        ``point_indices (R, P)``: flat indices ``y * W + x`` of the picked cells, most uncertain first, with
        ``P = min(num_points, H * W)``; ``point_coords (R, P, 2)`` float32: their centres
        ``((x + 0.5) / W, (y + 0.5) / H)`` in ``[0, 1]``.
    """
    if uncertainty_map.ndim != 4 or uncertainty_map.shape[1] != 1:
        raise ValueError(f"uncertainty_map must be (R, 1, H, W), got shape {tuple(uncertainty_map.shape)}")
    num_maps, _, h, w = uncertainty_map.shape
    k = min(num_points, h * w)
    point_indices = uncertainty_map.reshape(num_maps, h * w).topk(k, dim=1).indices
    x = (point_indices % w).to(torch.float32).add_(0.5).div_(w)
    y = torch.div(point_indices, w, rounding_mode="floor").to(torch.float32).add_(0.5).div_(h)
    return point_indices, torch.stack([x, y], dim=-1)
