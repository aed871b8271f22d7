"""Contour head: iterative contour refinement in the style of Deep Snake (Peng et al., "Deep Snake for Real-Time
Instance Segmentation", CVPR 2020).

An instance is a closed contour of ``num_points`` vertices ``(x, y)`` in input-image pixels (COCO pixel-edge
coordinates, see :mod:`maskworks.ops.polygons`). Starting from an initial contour inside each box
(:func:`box_to_initial_contour`: an ellipse or an octagon inscribed in the box, clockwise on screen from the top
middle), every iteration

1. samples the feature map at each vertex with bilinear ``grid_sample`` (:func:`sample_vertex_features`): a vertex
   at input pixel ``x`` lies at ``x / stride`` on a map of stride ``stride``, i.e. at the normalised grid coordinate
   ``2 x / (stride W_f) - 1`` with ``align_corners=False``;
2. appends the vertex coordinates relative to its box, ``(p - c) / (wh / 2)`` (box centre ``c``, size ``wh``), so
   the box's interior spans ``[-1, 1]^2`` whatever the instance's size;
3. runs circular 1-D convolutions over the cyclic vertex sequence (the contour is a ring: the padding wraps vertex
   ``N - 1`` around to vertex 0), with residual ReLU layers, dilations growing to widen the receptive field along the
   contour, and Deep Snake's global fusion (the max over the vertices of a 1x1 projection of all layers' states,
   appended to every vertex, so each vertex sees the whole shape);
4. predicts a per-vertex offset ``(dx, dy)`` in the same box-normalised units, ``p <- p + (dx, dy) * wh / 2``.

Each iteration has its own weights (as Deep Snake's ``evolve_gcn`` modules). The last offset layer is zero-
initialised, so a fresh head returns the initial contour at every iteration. Training: :func:`contour_loss`
(smooth-L1 after the best cyclic alignment of the start point) on every iteration's output against the ground-truth
contour (:func:`maskworks.ops.mask_to_contour`); :func:`maskworks.ops.contour_to_mask` rasterises a prediction.

The head is standalone: give it a feature map (a backbone / FPN level of any width) and boxes (ground-truth boxes in
training, detections in inference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.models._utils import check_positive_int
from maskworks.ops.polygons import _resample_rings

__all__ = ["ContourHead", "box_to_initial_contour", "contour_loss", "sample_vertex_features"]

# an octagon inscribed in the box [-1, 1]^2 (corners cut at half the half-size), clockwise from the top middle
_OCTAGON = (
    (0.0, -1.0),
    (0.5, -1.0),
    (1.0, -0.5),
    (1.0, 0.5),
    (0.5, 1.0),
    (-0.5, 1.0),
    (-1.0, 0.5),
    (-1.0, -0.5),
    (-0.5, -1.0),
)


def _check_boxes(boxes: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be an (R, 4) tensor of (x1, y1, x2, y2) boxes, got {shape}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{name} holds non-finite coordinates; expected finite (x1, y1, x2, y2)")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError(f"{name} has boxes with x2 < x1 or y2 < y1; expected (x1, y1, x2, y2) with x1 <= x2, y1 <= y2")
    return boxes


def box_to_initial_contour(boxes: torch.Tensor, num_points: int, shape: str = "ellipse") -> torch.Tensor:
    """Initial contours ``(R, num_points, 2)`` inscribed in boxes ``(R, 4)`` (``x1, y1, x2, y2``, input pixels).

    ``"ellipse"``: the ellipse with the box's centre ``c`` and half-axes ``(w / 2, h / 2)``, at equal angles
    ``theta_k = 2 pi k / num_points``: ``p_k = c + (w / 2 sin theta_k, -h / 2 cos theta_k)``. ``"octagon"``: the box
    with its corners cut at a quarter of its width / height (Deep Snake's initial octagon, from the box instead of
    the extreme points), resampled equidistantly. Both start at the top middle of the box and run clockwise on
    screen (positive shoelace area in y-down coordinates), the orientation of :func:`maskworks.ops.mask_to_contour`.
    Float boxes keep their dtype; others give float32.
    """
    boxes = _check_boxes(boxes)
    check_positive_int("num_points", num_points)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    if shape == "ellipse":
        theta = torch.arange(num_points, dtype=boxes.dtype, device=boxes.device) * (2 * math.pi / num_points)
        unit = torch.stack([torch.sin(theta), -torch.cos(theta)], -1)  # (N, 2)
        return centre[:, None] + half[:, None] * unit
    if shape == "octagon":
        unit = torch.tensor(_OCTAGON, dtype=boxes.dtype, device=boxes.device)
        return _resample_rings(centre[:, None] + half[:, None] * unit, num_points)
    raise ValueError(f"shape must be 'ellipse' or 'octagon', got {shape!r}")


def sample_vertex_features(
    features: torch.Tensor, points: torch.Tensor, batch_index: torch.Tensor, stride: float
) -> torch.Tensor:
    """Bilinear features ``(R, C, N)`` of a map ``(B, C, H_f, W_f)`` at contour vertices ``(R, N, 2)``.

    Vertex ``(x, y)`` is in input pixels (pixel-edge coordinates); the map's cell ``j`` covers input pixels
    ``[j stride, (j + 1) stride)``, so the vertex is at map coordinate ``x / stride`` and at ``grid_sample``'s
    normalised coordinate ``2 x / (stride W_f) - 1`` (``align_corners=False``: -1 and 1 are the map's outer edges).
    Outside the map the features are zero (``padding_mode="zeros"``). Instance ``r`` reads image
    ``batch_index[r]``. Differentiable in the features and in the points.
    """
    b, c, h, w = features.shape
    r, n = points.shape[:2]
    scale = points.new_tensor([2.0 / (stride * w), 2.0 / (stride * h)])
    grid = points * scale - 1
    if b == 1:
        return F.grid_sample(features, grid[None], mode="bilinear", align_corners=False)[0].transpose(0, 1)
    out = features.new_zeros(r, c, n)
    for i in torch.unique(batch_index).tolist():
        sel = batch_index == i
        out[sel] = F.grid_sample(features[i : i + 1], grid[sel][None], mode="bilinear", align_corners=False)[
            0
        ].transpose(0, 1)
    return out


class _Snake(nn.Module):
    """One refinement step: circular 1-D convolutions over the vertices -> box-normalised offsets ``(R, 2, N)``."""

    def __init__(self, in_channels: int, hidden: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()

        def conv(cin: int, cout: int, dilation: int = 1) -> nn.Conv1d:
            pad = dilation * (kernel_size // 2)
            return nn.Conv1d(cin, cout, kernel_size, padding=pad, dilation=dilation, padding_mode="circular")

        self.head = conv(in_channels + 2, hidden)
        self.res = nn.ModuleList(conv(hidden, hidden, d) for d in dilations)
        states = hidden * (len(dilations) + 1)
        self.fuse = nn.Conv1d(states, hidden, 1)
        self.pred = nn.Sequential(nn.Conv1d(states + hidden, hidden, 1), nn.ReLU(inplace=True), nn.Conv1d(hidden, 2, 1))
        nn.init.zeros_(self.pred[-1].weight)
        nn.init.zeros_(self.pred[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.head(x))
        states = [x]
        for conv in self.res:
            x = x + F.relu(conv(x))
            states.append(x)
        states = torch.cat(states, 1)
        glob = self.fuse(states).amax(dim=2, keepdim=True)  # (R, hidden, 1): the whole contour at once
        return self.pred(torch.cat([states, glob.expand(-1, -1, states.shape[2])], 1))


class ContourHead(nn.Module):
    """Deep Snake contour refinement on a feature map (see the module docstring).

    Args:
        in_channels: channels of the feature map (any).
        num_points: vertices per contour.
        hidden: channels of the circular convolutions.
        num_iterations: refinement steps (each with its own weights); ``forward`` returns one contour per step.
        kernel_size: odd kernel size of the circular convolutions (Deep Snake: 9, four neighbours on each side).
        dilations: one residual circular convolution per entry, with that dilation (Deep Snake: 1, 1, 1, 2, 2, 4, 4).
        stride: default stride of the feature map relative to the input pixels (``forward`` may override it).
        initial: ``"ellipse"`` or ``"octagon"``: the initial contour built from each box
            (:func:`box_to_initial_contour`) when ``forward`` is not given one.
        detach: feed each step a detached copy of the previous step's contour (each step learns to refine the
            contour it is given; Deep Snake's per-step supervision). ``False`` backpropagates through the chain.
    """

    def __init__(
        self,
        in_channels: int,
        num_points: int = 128,
        hidden: int = 128,
        num_iterations: int = 3,
        kernel_size: int = 9,
        dilations: Sequence[int] = (1, 1, 1, 2, 2, 4, 4),
        stride: float = 4.0,
        initial: str = "ellipse",
        detach: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("hidden", hidden)
        check_positive_int("num_iterations", num_iterations)
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 3:
            raise ValueError(f"num_points must be an int >= 3, got {num_points!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        dilations = tuple(dilations)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations):
            raise ValueError(f"dilations must be positive ints, got {dilations!r}")
        if any(d * (kernel_size // 2) > num_points for d in dilations):
            raise ValueError(
                f"dilations {dilations} with kernel_size {kernel_size} reach further than num_points={num_points} "
                f"vertices; expected dilation * (kernel_size // 2) <= num_points"
            )
        self._check_stride(stride)
        if initial not in ("ellipse", "octagon"):
            raise ValueError(f"initial must be 'ellipse' or 'octagon', got {initial!r}")
        self.in_channels, self.num_points, self.num_iterations = in_channels, num_points, num_iterations
        self.stride, self.initial, self.detach = float(stride), initial, bool(detach)
        self.snakes = nn.ModuleList(_Snake(in_channels, hidden, kernel_size, dilations) for _ in range(num_iterations))

    @staticmethod
    def _check_stride(stride: float) -> None:
        if (
            isinstance(stride, bool)
            or not isinstance(stride, (int, float))
            or not (math.isfinite(stride) and stride > 0)
        ):
            raise ValueError(f"stride must be a positive number (input pixels per feature-map cell), got {stride!r}")

    def _instances(
        self, boxes: torch.Tensor | Sequence[torch.Tensor], batch_index: torch.Tensor | None, num_images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, 4)`` boxes and ``(R,)`` image indices from either form of ``forward``'s arguments."""
        if not isinstance(boxes, torch.Tensor):
            if batch_index is not None:
                raise ValueError("batch_index must be None when boxes is a list of per-image (R_b, 4) tensors")
            boxes = list(boxes)
            if len(boxes) != num_images:
                raise ValueError(
                    f"boxes is a list of {len(boxes)} tensors for {num_images} images; expected one per image"
                )
            for i, bx in enumerate(boxes):
                _check_boxes(bx, f"boxes[{i}]")
            batch_index = torch.cat(
                [torch.full((len(bx),), i, dtype=torch.int64, device=bx.device) for i, bx in enumerate(boxes)]
            )
            boxes = torch.cat(boxes)
            return boxes, batch_index
        _check_boxes(boxes)
        if batch_index is None:
            if num_images != 1:
                raise ValueError(
                    f"batch_index is required with {num_images} images: give (R,) image indices, or boxes as a list "
                    f"of per-image (R_b, 4) tensors"
                )
            return boxes, torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        if batch_index.shape != (len(boxes),) or batch_index.is_floating_point():
            raise ValueError(
                f"batch_index must be an ({len(boxes)},) integer tensor, one image index per box, got "
                f"{batch_index.dtype} {tuple(batch_index.shape)}"
            )
        if len(boxes) and (batch_index.min() < 0 or batch_index.max() >= num_images):
            raise ValueError(f"batch_index values must be in 0..{num_images - 1}, got {batch_index.tolist()[:10]}")
        return boxes, batch_index.long()

    def forward(
        self,
        features: torch.Tensor,
        boxes: torch.Tensor | Sequence[torch.Tensor],
        batch_index: torch.Tensor | None = None,
        stride: float | None = None,
        initial: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Refine contours in the boxes.

        Args:
            features: ``(B, in_channels, H_f, W_f)`` feature map.
            boxes: ``(R, 4)`` boxes ``(x1, y1, x2, y2)`` in input pixels, with ``batch_index``; or a list of ``B``
                per-image ``(R_b, 4)`` tensors (instances then come in image order).
            batch_index: ``(R,)`` image of each box; may be omitted when ``B == 1``.
            stride: input pixels per feature-map cell (default the constructor's ``stride``).
            initial: ``(R, num_points, 2)`` initial contours; default :func:`box_to_initial_contour` of the boxes.

        Returns:
            ``num_iterations`` tensors ``(R, num_points, 2)`` of ``(x, y)`` vertices in input pixels, one per step;
            the last is the final contour.
        """
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"features must be (B, {self.in_channels}, H, W) (in_channels={self.in_channels}), got shape "
                f"{tuple(features.shape)}"
            )
        stride = self.stride if stride is None else stride
        self._check_stride(stride)
        boxes, batch_index = self._instances(boxes, batch_index, features.shape[0])
        boxes = boxes.to(device=features.device, dtype=features.dtype)
        batch_index = batch_index.to(features.device)
        r, n = len(boxes), self.num_points
        if initial is None:
            contour = box_to_initial_contour(boxes, n, self.initial)
        else:
            if not isinstance(initial, torch.Tensor) or initial.shape != (r, n, 2):
                shape = tuple(initial.shape) if isinstance(initial, torch.Tensor) else type(initial).__name__
                raise ValueError(f"initial must be an ({r}, {n}, 2) tensor of contours, one per box, got {shape}")
            contour = initial.to(device=features.device, dtype=features.dtype)
        if r == 0:
            return [contour.new_zeros(0, n, 2) for _ in self.snakes]
        centre = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None]  # (R, 1, 2)
        half = ((boxes[:, 2:] - boxes[:, :2]) / 2).clamp_min(1.0)[:, None]  # no division by a degenerate box
        outputs = []
        for snake in self.snakes:
            if self.detach:
                contour = contour.detach()
            sampled = sample_vertex_features(features, contour, batch_index, stride)  # (R, C, N)
            relative = ((contour - centre) / half).transpose(1, 2)  # (R, 2, N)
            offset = snake(torch.cat([sampled, relative], 1)).transpose(1, 2)  # (R, N, 2), box-normalised
            contour = contour + offset * half
            outputs.append(contour)
        return outputs


def contour_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth-L1 between predicted and target contours after the best cyclic alignment of the start point.

    For each instance, with ``target`` shifted by ``s`` vertices, ``t^s_i = t_{(i + s) mod N}``:
    ``loss = min_s mean_{i, xy} smoothL1(p_i - t^s_i)`` (``smoothL1(d) = d^2 / (2 beta)`` for ``|d| < beta``, else
    ``|d| - beta / 2``), then the mean over the instances. The shift is chosen without gradient and the gradient
    flows through the chosen shift (that of the min). Only start points are aligned, not the orientation: give both
    contours the same orientation (:func:`maskworks.ops.mask_to_contour` and :func:`box_to_initial_contour` are both
    clockwise on screen).

    Args:
        pred, target: ``(R, N, 2)`` (or ``(N, 2)``) contours of the same shape, in pixels.
        beta: smooth-L1 threshold in pixels.

    Returns:
        A scalar; 0 (still attached to ``pred``) when there are no instances.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("pred and target must be tensors of (R, N, 2) contours")
    if pred.shape != target.shape or pred.ndim not in (2, 3) or pred.shape[-1] != 2:
        raise ValueError(
            f"pred and target must both be (R, N, 2) (or (N, 2)) contours of the same shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    r, n = pred.shape[:2]
    if r == 0 or n == 0:
        return pred.sum() * 0.0
    target = target.to(pred.dtype)
    ar = torch.arange(n, device=pred.device)
    shifts = (ar[:, None] + ar[None, :]) % n  # (S, N): shifts[s, i] = (i + s) mod N
    best = []
    with torch.no_grad():
        chunk = max(1, 2**22 // (2 * n * n))  # instances per chunk: at most ~4M elements of (R, S, N, 2) at once
        for p, t in zip(pred.detach().split(chunk), target.split(chunk)):
            per_shift = F.smooth_l1_loss(p[:, None].expand(-1, n, -1, -1), t[:, shifts], reduction="none", beta=beta)
            best.append(per_shift.mean((2, 3)).argmin(1))  # (R_chunk,) the best shift s
    best = torch.cat(best)
    aligned = target.gather(1, shifts[best][..., None].expand(-1, -1, 2))
    return F.smooth_l1_loss(pred, aligned, reduction="none", beta=beta).mean((1, 2)).mean()
