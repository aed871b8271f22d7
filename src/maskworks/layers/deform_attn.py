"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), in pure PyTorch on ``grid_sample``.

Each query attends to a handful of points around its reference point on every level of a feature pyramid instead of
to every pixel: for head ``h``, level ``l`` and point ``k`` the query predicts a sampling offset ``Δp_hlk`` and a
weight ``A_hlk`` (softmax over the ``L * K`` points of the head), and the head's output is

    sum_l sum_k A_hlk * V_hl(p_ref + Δp_hlk / (W_l, H_l))

where ``V_hl`` is the head's slice of the projected values of level ``l``, read by bilinear interpolation at the
normalised location (``(0, 0)`` the top-left corner of the map, ``(1, 1)`` its bottom-right corner; pixel ``i``
covers ``[i / W, (i + 1) / W)``; outside the map reads zero). The cost is linear in the number of pixels, so the
pixel decoder of Mask2Former can run self-attention over all pyramid levels at once.

The module keeps the parameter names of Deformable DETR, mmcv and HF transformers (``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj``), so their checkpoints load unchanged, and Deformable DETR's
initialisation: zero offset weights with biases that place head ``h``'s ``k``-th point ``k + 1`` cells away in
direction ``2 pi h / num_heads`` (the heads look around the reference point in a star), zero attention weights
(uniform attention at the start), Xavier-uniform value and output projections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MultiScaleDeformableAttention", "multi_scale_deformable_attention"]


def _shapes(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The core of deformable attention: weighted bilinear samples of every level's values.

    Args:
        value: ``(B, S, heads, head_dim)`` projected values of all levels, flattened row-major level after level
            (``S = sum(H_l * W_l)``).
        spatial_shapes: ``(L, 2)`` ``(H_l, W_l)`` per level (tensor or sequence).
        sampling_locations: ``(B, Q, heads, L, K, 2)`` ``(x, y)`` in ``[0, 1]`` map coordinates (outside reads 0).
        attention_weights: ``(B, Q, heads, L, K)`` (normalised by the caller, e.g. softmax over ``L * K``).

    Returns:
        ``(B, Q, heads * head_dim)``.
    """
    shapes = _shapes(spatial_shapes)
    b, s, heads, head_dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} hold {sum(h * w for h, w in shapes)} positions, value has {s}")
    if len(shapes) != levels:
        raise ValueError(f"sampling_locations has {levels} levels, spatial_shapes {len(shapes)}")
    grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1] with align_corners=False
    # (B, Q, heads, L, K, 2) -> (B * heads, L, Q, K, 2): one grid per head and level
    grids = grids.permute(0, 2, 3, 1, 4, 5).reshape(b * heads, levels, q, points, 2)
    sampled = []
    for level, ((h, w), v) in enumerate(zip(shapes, value.split([h * w for h, w in shapes], dim=1))):
        # (B, h * w, heads, d) -> (B * heads, d, h, w)
        v = v.permute(0, 2, 3, 1).reshape(b * heads, head_dim, h, w)
        sampled.append(F.grid_sample(v, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B * heads, d, Q, L * K) weighted by (B * heads, 1, Q, L * K)
    samples = torch.stack(sampled, dim=3).flatten(3)  # (B * heads, d, Q, L, K) -> (..., L * K)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(b * heads, 1, q, levels * points)
    out = (samples * weights).sum(-1)  # (B * heads, d, Q)
    return out.reshape(b, heads * head_dim, q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (see the module docstring).

    Args:
        embed_dim: query / value channels (divisible by ``num_heads``).
        num_heads: attention heads.
        num_levels: pyramid levels attended to.
        num_points: sampling points per head and level.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.num_levels, self.num_points = embed_dim, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation (see the module docstring)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)  # (heads, 2)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # on the unit square's border
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)  # point k at k + 1 cells
        bias = directions[:, None, None, :] * steps[None, None, :, None]  # (heads, 1, K, 2)
        self.sampling_offsets.bias.copy_(bias.expand(-1, self.num_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
        query_pos: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to ``value``.

        Args:
            query: ``(B, Q, embed_dim)``.
            value: ``(B, S, embed_dim)``, the levels flattened row-major one after the other.
            reference_points: ``(B, Q, num_levels, 2)`` ``(x, y)`` in ``[0, 1]``, offsets in cells of each level;
                or ``(B, Q, num_levels, 4)`` boxes ``(cx, cy, w, h)``, offsets in units of ``num_points`` / half the
                box.
            spatial_shapes: ``(num_levels, 2)`` ``(H_l, W_l)``.
            query_pos: position embedding added to the query (not to the value).
            padding_mask: ``(B, S)`` bool, True where the value is padding (it reads as zero).

        Returns:
            ``(B, Q, embed_dim)``.
        """
        shapes = _shapes(spatial_shapes)
        if len(shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes has {len(shapes)} levels, the module attends to {self.num_levels}")
        if query_pos is not None:
            query = query + query_pos
        b, q, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(b, v.shape[1], heads, self.embed_dim // heads)
        offsets = self.sampling_offsets(query).view(b, q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, q, heads, levels * points).softmax(-1)
        weights = weights.view(b, q, heads, levels, points)
        if reference_points.shape[-1] == 2:
            # offsets are in cells of each level: divide by (W_l, H_l)
            normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            centre, size = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / points * size * 0.5
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}"
            )
        return self.output_proj(multi_scale_deformable_attention(v, shapes, locations, weights))
