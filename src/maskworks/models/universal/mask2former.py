"""Mask2Former (Cheng et al., CVPR 2022): one set-prediction model for semantic, instance and panoptic segmentation.

Architecture (the paper's, with the layout and defaults of the official code and HF transformers):

* **Backbone**: any registered hierarchical backbone with maps at strides 4, 8, 16, 32 (ResNet, Swin, ConvNeXt ...);
  Swin / ConvNeXt get one LayerNorm per stage map, as HF's ``SwinBackbone`` (``hidden_states_norms``).
* **Pixel decoder** (:class:`MSDeformAttnPixelDecoder`): the three coarsest maps are projected to 256 channels
  (1x1 conv + GroupNorm), given sine position and level embeddings, and refined together by six Deformable DETR
  encoder layers (multi-scale deformable attention, :class:`~maskworks.layers.MultiScaleDeformableAttention`, pure
  PyTorch on ``grid_sample``; post-norm, FFN 1024). An FPN step adds the stride-4 map (lateral 1x1 + upsampled
  coarser level, 3x3 conv, GroupNorm, ReLU); a 1x1 conv gives the per-pixel mask features at 1/4 resolution.
* **Transformer decoder** (:class:`MaskedAttentionDecoder`): ``num_queries`` learnable query features and query
  position embeddings; nine layers, each masked cross-attention -> self-attention -> FFN (2048), post-norm, going
  round the three levels coarse to fine. **Masked attention**: a query attends only where its mask predicted by the
  previous layer, bilinearly resized to the level, has ``sigmoid >= 0.5``; a query whose mask is empty everywhere
  attends everywhere (its row is reset). A shared LayerNorm, class head (``K + 1`` logits, the last "no object")
  and 3-layer mask-embedding MLP predict classes and masks (dot products with the mask features) before the first
  layer and after each, so there are ten predictions: the last is the output, the others auxiliary.
* **Training**: :class:`~maskworks.models.universal.SetCriterion` (Hungarian matching on class + point-sampled BCE +
  Dice costs, class loss with the no-object weight 0.1, BCE + Dice on importance-sampled points, every prediction
  supervised).
* **Inference** (:func:`semantic_inference`, :func:`instance_inference`, :func:`panoptic_inference`): semantic
  scores are the per-pixel mix ``sum_q softmax(class_q)[:K] * sigmoid(mask_q)``; instances the top-k (query, class)
  pairs scored by class probability times mean mask probability inside the mask; panoptic segments come from
  mask-wise merging (queries kept above ``object_mask_threshold``, each pixel to the query with the highest
  ``score * mask probability``, segments that keep less than ``overlap_threshold`` of their mask dropped, the
  segments of one stuff class merged).

:class:`Mask2Former` serves the three tasks from one set of weights; ``task=`` picks what ``model(images)`` returns
in eval mode. ``model.forward_raw(images)`` returns the un-post-processed set prediction
``{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, H / 4, W / 4), "aux_outputs": [...]}`` (HF's
``class_queries_logits`` / ``masks_queries_logits``). ``maskformer`` is the ablation of the paper's Table: a plain
FPN pixel decoder and cross-attention without masks, trained and run the same way.

Parameter counts (random init) equal HF ``Mask2FormerForUniversalSegmentation`` for 133 classes: ResNet-50
44,036,998, Swin-T 47,436,800. HF checkpoints load with ``load_weights(model, hf_state_dict, source="hf")``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers import MultiScaleDeformableAttention
from maskworks.models._utils import build_dense_encoder, check_positive_int
from maskworks.models.universal.criterion import SetCriterion
from maskworks.models.universal.matcher import HungarianMatcher
from maskworks.registry import register_model

__all__ = [
    "MASK2FORMER_TASKS",
    "Mask2Former",
    "MSDeformAttnPixelDecoder",
    "FPNPixelDecoder",
    "MaskedAttentionDecoder",
    "sine_position_embedding",
    "semantic_inference",
    "instance_inference",
    "panoptic_inference",
    "mask2former",
    "mask2former_resnet50",
    "mask2former_swin_tiny",
    "maskformer",
]

MASK2FORMER_TASKS = ("semantic", "instance", "panoptic")


# ---------------------------------------------------------------------------------------------------------- layers
def sine_position_embedding(
    shape: Sequence[int], num_feats: int, device: torch.device, dtype: torch.dtype, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR's normalised sine position embedding ``(B, 2 * num_feats, H, W)`` of a ``(B, C, H, W)`` map: ``y`` then
    ``x``, each ``sin`` / ``cos`` interleaved over ``num_feats`` frequencies, positions ``1..H`` scaled to ``(0, 2 pi]``.
    """
    b, _, h, w = shape
    eps, scale = 1e-6, 2 * math.pi
    out_dtype, dtype = dtype, dtype if dtype == torch.float64 else torch.float32  # positions > 256 need float32
    y = torch.arange(1, h + 1, dtype=dtype, device=device) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=dtype, device=device) / (w + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.int64, device=device).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x, pos_y = x[:, None] / dim_t, y[:, None] / dim_t  # (W, F), (H, F)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat((pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=-1)
    return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1).to(out_dtype)


class _DeformableEncoderLayer(nn.Module):
    """Deformable DETR encoder layer: multi-scale deformable self-attention and FFN, each residual + post-norm."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, heads, levels, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        p, train = self.dropout, self.training
        x = self.norm1(x + F.dropout(self.self_attn(x, x, reference_points, shapes, query_pos=pos), p, train))
        y = self.linear2(F.dropout(F.relu(self.linear1(x)), p, train))
        return self.norm2(x + F.dropout(y, p, train))


def _xavier_matrices(module: nn.Module) -> None:
    """Xavier-uniform every weight of two or more dimensions (DETR's transformer initialisation)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _xavier_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)  # detectron2's c2_xavier_fill
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _fpn_convs(in_channels: Sequence[int], dim: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """FPN lateral (1x1 conv + GroupNorm) and output (3x3 conv + GroupNorm + ReLU) convs, one of each per input."""
    lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), nn.GroupNorm(32, dim)) for c in in_channels)
    output = nn.ModuleList(
        nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(32, dim), nn.ReLU())
        for _ in in_channels
    )
    return lateral, output


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder (see the module docstring).

    Args:
        in_channels: channels of the backbone maps, finest first (strides ``strides``).
        strides: their strides (e.g. 4, 8, 16, 32).
        hidden_dim: width of the decoder (``conv_dim``).
        mask_dim: channels of the mask features.
        num_layers: deformable encoder layers.
        num_heads, num_points: of the deformable attention.
        ffn_dim: FFN width of the encoder layers.
        num_levels: coarsest maps refined by the encoder.
        common_stride: stride of the mask features; the maps finer than the encoder's join through an FPN.
        dropout: dropout in the encoder layers.

    ``forward(maps)`` returns ``(mask_features (B, mask_dim, H / common_stride, ...), [num_levels maps coarse to
    fine])``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        num_levels: int = 3,
        common_stride: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels, strides = list(in_channels), list(strides)
        if len(in_channels) != len(strides) or len(in_channels) < num_levels:
            raise ValueError(
                f"the pixel decoder needs at least {num_levels} maps with one stride each, got channels "
                f"{in_channels} and strides {strides}"
            )
        self.num_levels = num_levels
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(32, hidden_dim))
            for c in reversed(in_channels[-num_levels:])
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.layers = nn.ModuleList(
            _DeformableEncoderLayer(hidden_dim, num_heads, num_levels, num_points, ffn_dim, dropout)
            for _ in range(num_layers)
        )
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, 1)
        self.num_fpn_levels = max(int(round(math.log2(min(strides[-num_levels:]) / common_stride))), 0)
        fpn_in = in_channels[: self.num_fpn_levels]
        self.lateral_convs, self.output_convs = _fpn_convs(fpn_in, hidden_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in self.layers:
            _xavier_matrices(layer)
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        _xavier_convs(self.lateral_convs)
        _xavier_convs(self.output_convs)
        _xavier_convs(self.mask_features)

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        srcs = [proj(x) for proj, x in zip(self.input_proj, list(maps)[::-1][: self.num_levels])]  # coarse first
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        b, d = srcs[0].shape[:2]
        pos = torch.cat(
            [
                sine_position_embedding(s.shape, d // 2, s.device, s.dtype).flatten(2).transpose(1, 2)
                + self.level_embed[i].to(s.dtype)
                for i, s in enumerate(srcs)
            ],
            1,
        )
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, D)
        refs = []
        for h, w in shapes:  # cell centres of each level, normalised to [0, 1]
            ry, rx = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=x.dtype, device=x.device) / h,
                torch.linspace(0.5, w - 0.5, w, dtype=x.dtype, device=x.device) / w,
                indexing="ij",
            )
            refs.append(torch.stack((rx.reshape(-1), ry.reshape(-1)), -1))
        ref = torch.cat(refs, 0)[None, :, None, :].expand(b, -1, self.num_levels, -1)  # (B, S, L, 2)
        for layer in self.layers:
            x = layer(x, pos, ref, shapes)
        outs = [
            y.transpose(1, 2).reshape(b, d, h, w) for y, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)
        ]
        for j, feature in enumerate(list(maps)[: self.num_fpn_levels][::-1]):
            idx = self.num_fpn_levels - 1 - j
            lateral = self.lateral_convs[idx](feature)
            up = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[idx](lateral + up))
        return self.mask_features(outs[-1]), outs[: self.num_levels]


class FPNPixelDecoder(nn.Module):
    """MaskFormer's per-pixel decoder (the ablation of the deformable one): a top-down FPN with GroupNorm (lateral
    1x1, nearest upsampling, 3x3 output convs) over the backbone maps; mask features from a 3x3 conv on the finest
    level. Same interface as :class:`MSDeformAttnPixelDecoder`."""

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_levels: int = 3,
        **_: Any,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) < num_levels:
            raise ValueError(f"the pixel decoder needs at least {num_levels} maps, got channels {in_channels}")
        self.num_levels = num_levels
        self.lateral_convs, self.output_convs = _fpn_convs(in_channels, hidden_dim)
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, 3, padding=1)
        _xavier_convs(self)

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = list(maps)
        y = None
        outs = []
        for i in range(len(maps) - 1, -1, -1):  # coarse to fine
            lateral = self.lateral_convs[i](maps[i])
            if y is not None:
                lateral = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output_convs[i](lateral)
            outs.append(y)
        return self.mask_features(y), outs[: self.num_levels]


class _MLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, [hidden_dim] * (num_layers - 1) + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _MaskedAttentionLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each residual + post-norm (Mask2Former's order)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        p, train = self.dropout, self.training
        y = self.cross_attn(x + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        x = self.norm1(x + F.dropout(y, p, train))
        q = x + query_pos
        x = self.norm2(x + F.dropout(self.self_attn(q, q, x, need_weights=False)[0], p, train))
        y = self.linear2(F.dropout(F.relu(self.linear1(x)), p, train))
        return self.norm3(x + F.dropout(y, p, train))


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder with the class and mask heads (see the module docstring).

    Args:
        num_classes: ``K``; the class head has ``K + 1`` outputs (the last is "no object").
        in_channels: channels of the pixel decoder's maps (a 1x1 projection is added when it differs from
            ``hidden_dim`` or with ``enforce_input_proj``).
        hidden_dim, num_heads, ffn_dim: of the decoder layers.
        num_queries: learnable queries.
        num_layers: decoder layers (9 in Mask2Former: ten predictions with the one before the first layer).
        mask_dim: channels of the mask features (the mask MLP's output).
        num_levels: pixel-decoder levels attended to in turn.
        masked_attention: restrict each query's cross-attention to its previous mask (False: MaskFormer-style
            cross-attention over the whole map).
        dropout: in the decoder layers.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        mask_dim: int = 256,
        num_levels: int = 3,
        masked_attention: bool = True,
        enforce_input_proj: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_levels = num_heads, num_levels
        self.masked_attention = bool(masked_attention)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if in_channels != hidden_dim or enforce_input_proj else nn.Identity()
            for _ in range(num_levels)
        )
        self.layers = nn.ModuleList(
            _MaskedAttentionLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = _MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in self.layers:
            _xavier_matrices(layer)
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                _xavier_convs(proj)

    def _predict(
        self, x: torch.Tensor, mask_features: torch.Tensor, size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = self.decoder_norm(x)
        logits = self.class_embed(h)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(h), mask_features)
        if not self.masked_attention:
            return logits, masks, None
        with torch.no_grad():
            small = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)
            blocked = small.sigmoid().flatten(2) < 0.5  # (B, Q, S): True = may not attend
            blocked = blocked[:, None].expand(-1, self.num_heads, -1, -1).flatten(0, 1)  # (B * heads, Q, S)
        return logits, masks, blocked

    def forward(self, features: Sequence[torch.Tensor], mask_features: torch.Tensor) -> dict[str, Any]:
        """``features``: ``num_levels`` maps coarse to fine; ``mask_features (B, mask_dim, h, w)``. Returns
        ``{"pred_logits", "pred_masks", "aux_outputs"}`` (see :meth:`Mask2Former.forward_raw`)."""
        b = mask_features.shape[0]
        memory, memory_pos, sizes = [], [], []
        for i in range(self.num_levels):
            f = features[i]
            sizes.append(f.shape[-2:])
            pos = sine_position_embedding(f.shape, self.query_embed.embedding_dim // 2, f.device, f.dtype)
            memory_pos.append(pos.flatten(2).transpose(1, 2))
            memory.append(self.input_proj[i](f).flatten(2).transpose(1, 2) + self.level_embed.weight[i].to(f.dtype))
        # repeated, not expanded: under no_grad an expanded view of a parameter requires grad without a grad_fn,
        # which torch.utils.module_tracker (FlopCounterMode) rejects
        query_pos = self.query_embed.weight.to(mask_features.dtype).unsqueeze(0).repeat(b, 1, 1)
        x = self.query_feat.weight.to(mask_features.dtype).unsqueeze(0).repeat(b, 1, 1)
        logits, masks, blocked = self._predict(x, mask_features, sizes[0])
        all_logits, all_masks = [logits], [masks]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            if blocked is not None:  # a query masked everywhere attends everywhere
                blocked = blocked & ~blocked.all(-1, keepdim=True)
            x = layer(x, query_pos, memory[level], memory_pos[level], blocked)
            logits, masks, blocked = self._predict(x, mask_features, sizes[(i + 1) % self.num_levels])
            all_logits.append(logits)
            all_masks.append(masks)
        return {
            "pred_logits": all_logits[-1],
            "pred_masks": all_masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(all_logits[:-1], all_masks[:-1])],
        }


# ------------------------------------------------------------------------------------------------------- inference
def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores ``(B, K, H, W) = sum_q softmax(pred_logits)[..., :K] * sigmoid(pred_masks)`` for
    ``pred_logits (B, Q, K + 1)`` and ``pred_masks (B, Q, H, W)`` (already at the wanted size)."""
    classes = pred_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", classes, pred_masks.sigmoid())


def _boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes ``(N, 4)`` around boolean masks ``(N, H, W)`` (pixel edges); zeros for an empty mask."""
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).min(1).values
    y2 = torch.where(rows, ar_h, -1).max(1).values + 1
    x1 = torch.where(cols, ar_w, w).min(1).values
    x2 = torch.where(cols, ar_w, -1).max(1).values + 1
    boxes = torch.stack((x1, y1, x2, y2), 1).float()
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def instance_inference(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    topk: int | None = None,
    thing_classes: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Instances of one image from ``pred_logits (Q, K + 1)`` and ``pred_masks (Q, H, W)`` (logits at the image
    size): the ``topk`` (default ``Q``) best (query, class) pairs over all queries and real classes (a query may give
    several classes), only ``thing_classes`` when given; mask = ``logit > 0``; score = class probability x mean mask
    probability inside the mask. Returns ``boxes`` (around the masks), ``labels``, ``scores``, ``masks`` (bool),
    ``mask_probs``, best first."""
    q, k1 = pred_logits.shape
    k = k1 - 1
    scores = pred_logits.softmax(-1)[:, :-1]  # (Q, K)
    if thing_classes is not None:
        keep = torch.zeros(k, dtype=torch.bool, device=scores.device)
        keep[list(thing_classes)] = True
        scores = scores.masked_fill(~keep, -1.0)
    topk = q if topk is None else min(int(topk), q * k)
    top_scores, top_idx = scores.flatten().topk(topk, sorted=True)
    if thing_classes is not None:
        valid = top_scores >= 0
        top_scores, top_idx = top_scores[valid], top_idx[valid]
    labels = top_idx % k
    queries = torch.div(top_idx, k, rounding_mode="floor")
    logits = pred_masks[queries]
    masks = logits > 0
    probs = logits.sigmoid()
    fm = masks.flatten(1).to(probs.dtype)
    mask_scores = (probs.flatten(1) * fm).sum(1) / (fm.sum(1) + 1e-6)
    final = top_scores * mask_scores
    order = final.argsort(descending=True, stable=True)
    masks = masks[order]
    return {
        "boxes": _boxes_of(masks),
        "labels": labels[order],
        "scores": final[order],
        "masks": masks,
        "mask_probs": probs[order],
    }


def panoptic_inference(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    thing_classes: Sequence[int] = (),
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    reference: str = "mask2former",
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Panoptic segmentation of one image by mask-wise merging, from ``pred_logits (Q, K + 1)`` and ``pred_masks
    (Q, H, W)`` (logits at the image size).

    Queries whose best class is a real one with probability ``> object_mask_threshold`` are kept; each pixel goes to
    the kept query with the highest ``score * sigmoid(mask)``; a query's segment is dropped when it keeps no more
    than ``overlap_threshold`` of its own mask (``sigmoid >= 0.5``); the segments of one stuff class (not in
    ``thing_classes``) share one id.

    ``reference`` selects the rules of the original code (``"mask2former"``, default: a pixel joins its query's
    segment only where that mask's probability is ``>= 0.5``, so pixels no query claims stay void, and the area
    test is ``kept / mask area < overlap_threshold``) or those of HF's
    ``Mask2FormerImageProcessor.post_process_panoptic_segmentation`` (``"hf"``: every pixel goes to its argmax query,
    the mask area is that of ``score * probability >= 0.5``, and a segment needs ``kept / area > overlap_threshold``).
    The segments and their pixels then equal HF's; the ids may not: after fusing a stuff query into an earlier
    segment, HF's ``compute_segments`` resets its counter to that segment's id, so its next new segment reuses an id
    already in use. Ours numbers every segment once.

    Returns:
        ``(id_map (H, W) int32, segments_info)`` with 0 = void, ids 1.. and ``segments_info`` entries ``{"id",
        "category_id", "isthing", "score"}`` (a merged stuff segment keeps its first query's score).
    """
    if reference not in ("mask2former", "hf"):
        raise ValueError(f"reference must be 'mask2former' or 'hf', got {reference!r}")
    h, w = pred_masks.shape[-2:]
    id_map = torch.zeros((h, w), dtype=torch.int32, device=pred_masks.device)
    segments: list[dict[str, Any]] = []
    k = pred_logits.shape[-1] - 1
    scores, labels = pred_logits.softmax(-1).max(-1)
    keep = labels.ne(k) & (scores > object_mask_threshold)
    scores, labels, probs = scores[keep], labels[keep], pred_masks[keep].sigmoid()
    if probs.shape[0] == 0:
        return id_map, segments
    weighted = scores[:, None, None] * probs
    owner = weighted.argmax(0)
    things = {int(c) for c in thing_classes}
    stuff_ids: dict[int, int] = {}
    next_id = 0
    for q in range(probs.shape[0]):
        label = int(labels[q])
        isthing = label in things
        if reference == "hf":
            mask = owner == q
            area, original = int(mask.sum()), int((weighted[q] >= 0.5).sum())
            if not (area > 0 and original > 0 and area / original > overlap_threshold):
                continue
        else:
            mine = owner == q
            mask = mine & (probs[q] >= 0.5)
            area, original = int(mine.sum()), int((probs[q] >= 0.5).sum())
            if not (area > 0 and original > 0 and int(mask.sum()) > 0) or area / original < overlap_threshold:
                continue
        if not isthing and label in stuff_ids:
            id_map[mask] = stuff_ids[label]
            continue
        next_id += 1
        id_map[mask] = next_id
        if not isthing:
            stuff_ids[label] = next_id
        segments.append({"id": next_id, "category_id": label, "isthing": isthing, "score": float(scores[q])})
    return id_map, segments


# ----------------------------------------------------------------------------------------------------------- model
def _set_targets(target: Mapping[str, Any], num_classes: int, where: str) -> dict[str, torch.Tensor]:
    """``labels (G,)`` / ``masks (G, H, W)`` of one image from an instance / panoptic target (``labels`` + ``masks``)
    or a semantic one (``semantic (H, W)``: one mask per class present, 255 ignored)."""
    if "masks" in target and "labels" in target:
        labels = torch.as_tensor(target["labels"]).long()
        masks = torch.as_tensor(target["masks"]).bool()
    elif "semantic" in target:
        sem = torch.as_tensor(target["semantic"]).long()
        labels = sem.unique()
        labels = labels[(labels != 255)]
        masks = sem[None] == labels[:, None, None]
    else:
        raise ValueError(f"{where}: a Mask2Former target needs 'labels' and 'masks', or a 'semantic' map")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels must be in [0, {num_classes - 1}] (the model has num_classes={num_classes}), got "
            f"{sorted(set(labels.tolist()))[:10]}"
        )
    return {"labels": labels, "masks": masks}


class Mask2Former(nn.Module):
    """Mask2Former on a registered backbone (see the module docstring).

    Args:
        encoder: a registered backbone with maps at strides 4, 8, 16, 32 (``resnet50``,
            ``swin_tiny_patch4_window7_224``, ``convnext_tiny`` ...).
        num_classes: ``K`` classes (semantic classes; for instance data, the dataset's labels including its unused
            background 0; for panoptic data, things and stuff).
        task: what ``model(images)`` returns in eval mode: ``"semantic"`` (class scores ``(B, K, H, W)`` as
            log-probabilities), ``"instance"`` (per-image dicts ``boxes / labels / scores / masks``) or
            ``"panoptic"`` (per-image ``{"panoptic_seg", "segments_info"}``).
        thing_classes: labels that are things (panoptic: stuff segments of one class are merged; instance
            outputs of a panoptic model keep only things). Required for ``"panoptic"`` unless ``num_classes`` is
            COCO panoptic's 133 (its first 80 labels); default: all classes for ``"instance"``, none for
            ``"semantic"``.
        in_channels: input image channels.
        encoder_weights: published encoder weights tag, a checkpoint path, or None.
        num_queries, hidden_dim, mask_dim, num_heads: of the decoder.
        enc_layers, enc_ffn_dim, enc_points: pixel decoder's deformable encoder.
        dec_layers, dec_ffn_dim: transformer decoder.
        pixel_decoder: ``"msdeformattn"`` (Mask2Former) or ``"fpn"`` (MaskFormer's per-pixel decoder).
        masked_attention: Mask2Former's masked attention (False: plain cross-attention, as MaskFormer).
        dropout: dropout of the decoders (0 as in Mask2Former).
        no_object_weight, class_weight, mask_weight, dice_weight, num_points, oversample_ratio,
            importance_sample_ratio: of the loss (:class:`SetCriterion`).
        object_mask_threshold, overlap_threshold: panoptic merging.
        test_topk: instances per image.
    """

    set_prediction = True  # tasks hand this model its targets; it computes its own loss

    def __init__(
        self,
        encoder: str = "resnet50",
        num_classes: int = 133,
        task: str = "semantic",
        thing_classes: Sequence[int] | None = None,
        in_channels: int = 3,
        encoder_weights: str | os.PathLike | None = None,
        num_queries: int = 100,
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        enc_layers: int = 6,
        enc_ffn_dim: int = 1024,
        enc_points: int = 4,
        dec_layers: int = 9,
        dec_ffn_dim: int = 2048,
        pixel_decoder: str = "msdeformattn",
        masked_attention: bool = True,
        dropout: float = 0.0,
        no_object_weight: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        test_topk: int = 100,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        for name, v in (("num_queries", num_queries), ("hidden_dim", hidden_dim), ("mask_dim", mask_dim),
                        ("num_heads", num_heads), ("dec_layers", dec_layers), ("test_topk", test_topk)):  # fmt: skip
            check_positive_int(name, v)
        if task not in MASK2FORMER_TASKS:
            raise ValueError(f"task must be one of {', '.join(MASK2FORMER_TASKS)}, got {task!r}")
        if pixel_decoder not in ("msdeformattn", "fpn"):
            raise ValueError(f"pixel_decoder must be 'msdeformattn' or 'fpn', got {pixel_decoder!r}")
        if hidden_dim % 32:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm(32)), got {hidden_dim}")
        self.num_classes, self.task, self.in_channels = num_classes, task, in_channels
        if thing_classes is None:
            if task == "panoptic" and num_classes != 133:
                raise ValueError(
                    "a panoptic Mask2Former needs thing_classes= (the labels that are things; the others are stuff, "
                    "whose segments of one class are merged); only COCO's 133 classes default to their 80 things"
                )
            thing_classes = range(80) if task == "panoptic" else range(num_classes) if task == "instance" else ()
        self.thing_classes = sorted({int(c) for c in thing_classes})
        bad = [c for c in self.thing_classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"thing_classes must be labels in [0, {num_classes - 1}], got {bad}")
        self.object_mask_threshold, self.overlap_threshold = float(object_mask_threshold), float(overlap_threshold)
        self.test_topk = int(test_topk)
        self.encoder = build_dense_encoder(encoder, in_channels, encoder_weights, True)
        info = self.encoder.feature_info
        usable = [i for i, f in enumerate(info) if f["reduction"] >= 4]
        if len(usable) < 3:
            raise ValueError(
                f"encoder {encoder!r} must give at least 3 maps of stride >= 4, got strides "
                f"{[f['reduction'] for f in info]}"
            )
        self._feature_indices = tuple(usable[-4:])
        channels = [info[i]["num_chs"] for i in self._feature_indices]
        strides = [info[i]["reduction"] for i in self._feature_indices]
        self._pad_multiple = max(strides)
        decoder_cls = MSDeformAttnPixelDecoder if pixel_decoder == "msdeformattn" else FPNPixelDecoder
        self.pixel_decoder = decoder_cls(
            channels,
            strides,
            hidden_dim=hidden_dim,
            mask_dim=mask_dim,
            num_layers=enc_layers,
            num_heads=num_heads,
            num_points=enc_points,
            ffn_dim=enc_ffn_dim,
            dropout=dropout,
        )
        self.predictor = MaskedAttentionDecoder(
            num_classes,
            in_channels=hidden_dim,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            ffn_dim=dec_ffn_dim,
            num_layers=dec_layers,
            mask_dim=mask_dim,
            masked_attention=masked_attention,
            dropout=dropout,
        )
        matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.criterion = SetCriterion(
            num_classes,
            matcher,
            no_object_weight,
            class_weight,
            mask_weight,
            dice_weight,
            num_points,
            oversample_ratio,
            importance_sample_ratio,
        )

    # -------------------------------------------------------------------------------------------------- batches
    def _batch(self, images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images -> one zero-padded batch (bottom / right, to a multiple of the encoder's stride) and their sizes."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"images must be (B, C, H, W) or a list of (C, H, W), got {tuple(images.shape)}")
            sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
            batch = images
        else:
            images = list(images)
            if not images:
                raise ValueError("images is an empty list")
            for i, im in enumerate(images):
                if im.ndim != 3 or im.shape[0] != images[0].shape[0]:
                    raise ValueError(
                        f"images[{i}] is {tuple(im.shape)}; expected (C, H, W) with the C of images[0] "
                        f"({images[0].shape[0]})"
                    )
            sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
            batch = images[0].new_zeros((len(images), images[0].shape[0], hmax, wmax))
            for i, im in enumerate(images):
                batch[i, :, : im.shape[-2], : im.shape[-1]] = im
        m = self._pad_multiple
        ph, pw = (-batch.shape[-2]) % m, (-batch.shape[-1]) % m
        if ph or pw:
            batch = F.pad(batch, (0, pw, 0, ph))
        return batch, sizes

    def forward_raw(self, images: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, Any]:
        """The set prediction before post-processing: ``{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, H / 4,
        W / 4), "aux_outputs": [{"pred_logits", "pred_masks"} of the earlier predictions]}`` (HF's
        ``class_queries_logits`` / ``masks_queries_logits``). Images travel as one batch zero-padded at the bottom /
        right to a multiple of 32 (and to the largest image of a list), so the masks cover that padded canvas."""
        batch, _ = self._batch(images)
        return self._raw(batch)

    def _raw(self, batch: torch.Tensor) -> dict[str, Any]:
        maps = self.encoder.forward_intermediates(batch)
        mask_features, multi_scale = self.pixel_decoder([maps[i] for i in self._feature_indices])
        return self.predictor(multi_scale, mask_features)

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, Any]] | None = None,
    ) -> Any:
        """Training (with ``targets``): the weighted losses (``loss_ce``, ``loss_mask``, ``loss_dice`` and
        ``loss_*_{i}`` of the auxiliary predictions). Targets are per image ``labels (G,)`` + ``masks (G, H, W)``
        (instance / panoptic segments) or ``semantic (H, W)`` (one segment per class present, 255 ignored).
        Eval: the output of :attr:`task` (see the class docstring), at each image's size."""
        batch, sizes = self._batch(images)
        if targets is not None:
            if len(targets) != batch.shape[0]:
                raise ValueError(f"{len(targets)} targets for {batch.shape[0]} images")
            raw = self._raw(batch)
            canvas = batch.shape[-2:]
            set_targets = []
            for i, t in enumerate(targets):
                st = _set_targets(t, self.num_classes, f"target {i}")
                m = st["masks"]
                if m.shape[-2:] != sizes[i]:
                    raise ValueError(f"target {i}: masks are {tuple(m.shape[-2:])} but the image is {sizes[i]}")
                padded = m.new_zeros((m.shape[0], *canvas))
                padded[:, : m.shape[-2], : m.shape[-1]] = m
                set_targets.append({"labels": st["labels"].to(batch.device), "masks": padded.to(batch.device)})
            return self.criterion(raw, set_targets)
        if self.training:
            raise ValueError(
                "Mask2Former computes its own loss in training: call model(images, targets) with per-image "
                "'labels' + 'masks' or a 'semantic' map (or use model.eval() for predictions)"
            )
        return self.postprocess(self._raw(batch), sizes, batch.shape[-2:])

    def _image_masks(self, masks: torch.Tensor, canvas: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        if masks.shape[0] == 0:
            return masks.new_zeros((0, *size))
        up = F.interpolate(masks[None], size=tuple(canvas), mode="bilinear", align_corners=False)[0]
        return up[:, : size[0], : size[1]]

    def postprocess(
        self, raw: Mapping[str, Any], sizes: Sequence[Sequence[int]], canvas: Sequence[int], task: str | None = None
    ) -> Any:
        """:meth:`forward_raw`'s output -> the eval output of ``task`` (default :attr:`task`) for images of
        ``sizes`` on a padded ``canvas``: masks are upsampled (bilinear) to the canvas and cropped to each image."""
        task = task or self.task
        logits, masks = raw["pred_logits"].float(), raw["pred_masks"].float()
        if task == "semantic":
            up = F.interpolate(masks, size=tuple(canvas), mode="bilinear", align_corners=False)
            scores = semantic_inference(logits, up)
            h = max(s[0] for s in sizes)
            w = max(s[1] for s in sizes)
            return scores[..., :h, :w].clamp_min(1e-8).log()
        if task not in MASK2FORMER_TASKS:
            raise ValueError(f"task must be one of {', '.join(MASK2FORMER_TASKS)}, got {task!r}")
        results = []
        k = logits.shape[-1] - 1
        for i, size in enumerate(sizes):
            # only the queries the result can use are upsampled to the image (Q full-size masks can be gigabytes)
            if task == "instance":
                things = self.thing_classes if self.thing_classes else None
                scores = logits[i].softmax(-1)[:, :-1]
                if things is not None:
                    scores = scores[:, things]
                topk = min(self.test_topk, scores.numel())
                kk = scores.shape[1]
                used = torch.unique(torch.div(scores.flatten().topk(topk).indices, kk, rounding_mode="floor"))
                m = self._image_masks(masks[i][used], canvas, size)
                results.append(instance_inference(logits[i][used], m, self.test_topk, things))
            else:
                scores, labels = logits[i].softmax(-1).max(-1)
                used = torch.nonzero(labels.ne(k) & (scores > self.object_mask_threshold)).flatten()
                m = self._image_masks(masks[i][used], canvas, size)
                id_map, info = panoptic_inference(
                    logits[i][used], m, self.thing_classes, self.object_mask_threshold, self.overlap_threshold
                )
                results.append({"panoptic_seg": id_map, "segments_info": info})
        return results


def _register(name: str, doc: str, **fixed: Any):
    def fn(**kwargs: Any) -> Mask2Former:
        clash = sorted(set(fixed) & set(kwargs))
        if clash:
            raise TypeError(f"{name} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; use 'mask2former'")
        return Mask2Former(**fixed, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return register_model(name=name, task="semantic", tasks=MASK2FORMER_TASKS)(fn)


mask2former = register_model(name="mask2former", task="semantic", tasks=MASK2FORMER_TASKS)(Mask2Former)
mask2former_resnet50 = _register(
    "mask2former_resnet50",
    "Mask2Former with a ResNet-50 backbone (44,036,998 parameters for 133 classes, as HF's); arguments as "
    ":class:`Mask2Former`.",
    encoder="resnet50",
)
mask2former_swin_tiny = _register(
    "mask2former_swin_tiny",
    "Mask2Former with a Swin-T backbone (47,436,800 parameters for 133 classes, as HF's); arguments as "
    ":class:`Mask2Former`.",
    encoder="swin_tiny_patch4_window7_224",
)
maskformer = _register(
    "maskformer",
    "MaskFormer as Mask2Former's ablation: an FPN per-pixel decoder and cross-attention without masks, same "
    "queries, heads, loss and inference; ``encoder=`` as :class:`Mask2Former` (default ``resnet50``).",
    pixel_decoder="fpn",
    masked_attention=False,
)
