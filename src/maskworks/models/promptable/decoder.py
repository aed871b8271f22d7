"""SAM's prompt encoder and mask decoder (Kirillov et al., "Segment Anything", ICCV 2023, section 3 and appendix A).

* :class:`PositionEmbeddingRandom`: random Fourier features (Tancik et al., NeurIPS 2020) of coordinates in
  ``[0, 1]^2``: ``[sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)]`` with a fixed Gaussian matrix ``G`` (2 x C/2). The
  same encoding serves the dense image grid (cell centres) and the sparse prompts, so a point and the pixel under
  it get the same code.
* :class:`PromptEncoder`: points (shifted to the pixel centre, normalised by the model input size, plus a learned
  embedding for positive / negative / padding), box corners (two learned corner embeddings) and dense mask prompts
  (two stride-2 convs with LayerNorm2d + GELU, then a 1x1 conv to the embedding width; without a mask, a learned
  "no mask" embedding broadcast over the grid).
* :class:`TwoWayTransformer`: each layer runs token self-attention, token -> image cross-attention, an MLP on the
  tokens and image -> token cross-attention; the positional encodings are re-added at every attention, and the
  cross-attentions work at half the width (``attention_downsample_rate``).
* :class:`MaskDecoder`: an IoU token and ``1 + num_multimask_outputs`` mask tokens are prepended to the prompt
  tokens; after the transformer the image embedding is upscaled 4x by two transposed convs and each mask token,
  through its own 3-layer hypernetwork MLP, becomes the weights of a dot product with every upscaled pixel. Token 0
  is the single-mask output, tokens 1..3 the multi-mask outputs; the IoU head predicts each mask's IoU.

Parameter names are those of the official ``segment_anything`` modules, except that the two MLP blocks reuse
:class:`maskworks.layers.Mlp` (``fc1`` / ``fc2`` for the official ``lin1`` / ``lin2``);
:mod:`maskworks.convert.sam` maps the official and the Hugging Face layouts.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers import LayerNorm2d, Mlp

__all__ = [
    "MLP",
    "DownsampledAttention",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "TwoWayAttentionBlock",
    "TwoWayTransformer",
]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head, SAM's hypernetworks and IoU head).

    Args:
        in_dim: input width.
        hidden_dim: width of the hidden layers.
        out_dim: output width.
        num_layers: number of linear layers (>= 1).
        sigmoid_output: apply a sigmoid to the output.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, sigmoid_output: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims_in = [in_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoder
# ---------------------------------------------------------------------------------------------------------------


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier positional encoding of 2-D coordinates.

    Args:
        num_pos_feats: half the output width (the encoding concatenates sines and cosines).
        scale: standard deviation of the Gaussian matrix (``None`` or <= 0: 1).
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates in ``[0, 1]`` (..., 2) as ``(x, y)`` -> (..., 2 * num_pos_feats)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """The encoding of the centres of an ``(h, w)`` grid: ``(C, h, w)``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # (h, w, 2)
        return self._encode(grid).permute(2, 0, 1)  # (C, h, w)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates ``(B, N, 2)`` as ``(x, y)`` in an image of ``image_size = (H, W)`` -> ``(B, N, C)``."""
        h, w = image_size
        scale = coords.new_tensor([1.0 / w, 1.0 / h])
        return self._encode((coords * scale).float())


class PromptEncoder(nn.Module):
    """Embeds points, boxes and masks for :class:`MaskDecoder`.

    Args:
        embed_dim: token width (256 in SAM).
        image_embedding_size: the image embedding grid ``(h, w)`` (64 x 64 for 1024-pixel inputs).
        input_image_size: the padded model input ``(H, W)`` that point coordinates refer to.
        mask_in_chans: hidden channels of the mask downscaling convs (16 in SAM).
        activation: activation class of the mask downscaling.
    """

    num_point_embeddings = 4  # negative point, positive point, box top-left, box bottom-right

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """The positional encoding of the image embedding grid, ``(1, C, h, w)``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Points ``(B, N, 2)`` and labels ``(B, N)`` (1 positive, 0 negative, -1 padding) -> ``(B, N[+1], C)``.

        Without a box one padding point is appended, as SAM was trained (it marks "no box").
        """
        points = points + 0.5  # the centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)  # (B, N + 1, 2)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)  # (B, N + 1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)  # (B, N, C)
        labels = labels[..., None]  # (B, N, 1)
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = embedding + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        return embedding + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``(B, 4)`` as ``x0, y0, x1, y1`` -> two corner tokens ``(B, 2, C)``."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # (B, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])  # (2, C)
        return embedding + corner

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompts of a batch.

        Args:
            points: ``(coords (B, N, 2), labels (B, N))`` in the model input frame, or ``None``.
            boxes: ``(B, 4)`` in the model input frame, or ``None``.
            masks: ``(B, 1, 4h, 4w)`` mask logits (the low-resolution output of a previous prediction), or ``None``.

        Returns:
            Sparse embeddings ``(B, N_tokens, C)`` and dense embeddings ``(B, C, h, w)``.
        """
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1
        device = self.no_mask_embed.weight.device
        parts = [torch.empty(batch, 0, self.embed_dim, device=device)]
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1)  # (B, N_tokens, C)
        if masks is not None:
            dense = self.mask_downscaling(masks)  # (B, C, h, w)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense


# ---------------------------------------------------------------------------------------------------------------
# Two-way transformer
# ---------------------------------------------------------------------------------------------------------------


class DownsampledAttention(nn.Module):
    """Multi-head attention whose projections map to ``embedding_dim // downsample_rate`` channels.

    Args:
        embedding_dim: input and output width.
        num_heads: heads (must divide the internal width).
        downsample_rate: internal width divisor (2 for SAM's cross-attentions).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {self.internal_dim}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, heads, N, C / heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N_q, C / heads)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))  # (B, N_q, C)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token -> image attention, token MLP, image -> token attention (each + residual +
    LayerNorm). The first block of the transformer skips the positional encoding in its self-attention and does
    not add its residual there (the tokens *are* the prompt encodings)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = DownsampledAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DownsampledAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = Mlp(embedding_dim, mlp_dim, act_layer=activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DownsampledAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        keys_pe = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys_pe, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` :class:`TwoWayAttentionBlock` s and a final token -> image attention.

    Args:
        depth: number of blocks (2 in SAM).
        embedding_dim: token and image-embedding width.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        activation: activation class of the MLP.
        attention_downsample_rate: internal width divisor of the cross-attentions.
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth, self.embedding_dim, self.num_heads, self.mlp_dim = depth, embedding_dim, num_heads, mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = DownsampledAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embedding and its encoding ``(B, C, h, w)``, tokens ``(B, N, C)`` -> tokens ``(B, N, C)`` and the
        updated image embedding ``(B, h * w, C)``."""
        keys = image_embedding.flatten(2).transpose(1, 2)  # (B, h * w, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)  # (B, h * w, C)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


# ---------------------------------------------------------------------------------------------------------------
# Mask decoder
# ---------------------------------------------------------------------------------------------------------------


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from an image embedding and prompt embeddings.

    Args:
        transformer_dim: width of the tokens and the image embedding.
        transformer: the :class:`TwoWayTransformer`.
        num_multimask_outputs: masks of the multi-mask output (3: whole, part, subpart).
        activation: activation of the upscaling.
        iou_head_depth: layers of the IoU MLP.
        iou_head_hidden_dim: hidden width of the IoU MLP.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions for each prompt.

        Args:
            image_embeddings: ``(1, C, h, w)`` (shared by all prompts) or ``(B, C, h, w)`` (one per prompt).
            image_pe: ``(1, C, h, w)`` positional encoding of the grid.
            sparse_prompt_embeddings: ``(B, N, C)``.
            dense_prompt_embeddings: ``(B, C, h, w)``.
            multimask_output: return the three multi-mask outputs instead of the single mask.

        Returns:
            Mask logits ``(B, M, 4h, 4w)`` and IoU predictions ``(B, M)``, ``M`` = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``1 + num_multimask_outputs`` masks ``(B, M, 4h, 4w)`` and IoU predictions ``(B, M)``."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M, C)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)  # (B, T, C)
        if image_embeddings.shape[0] != batch:
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings  # (B, C, h, w)
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0]  # (B, C)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # (B, M, C)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C / 8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, M, C / 8)
        b, c8, h4, w4 = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c8, h4 * w4)).reshape(b, -1, h4, w4)  # (B, M, 4h, 4w)
        return masks, self.iou_prediction_head(iou_token_out)
