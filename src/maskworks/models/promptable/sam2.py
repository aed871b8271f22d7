"""SAM 2 in image mode (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024).

In image mode SAM 2 is SAM with three changes:

* the image encoder is a hierarchical Hiera trunk with an FPN neck (:mod:`maskworks.models.promptable.hiera`); its
  1/16 map, plus the learned "no memory" embedding (``no_mem_embed``, what the memory attention adds when there is
  no past frame), is the image embedding, and its 1/4 and 1/8 maps, projected by the decoder's ``conv_s0`` /
  ``conv_s1`` (once per image), are added inside the mask decoder's upscaling (:class:`Sam2MaskDecoder`);
* the mask decoder has an object-score token (its MLP head predicts whether the object is present), a sigmoid on
  the IoU head, and, for single-mask output in eval mode, ``dynamic_multimask_via_stability``: when the stability
  score of the single mask (IoU of the logits thresholded at +delta and -delta) is below a threshold, the best of the
  three multi-mask outputs (by predicted IoU) is returned instead;
* the input is resized to a ``1024 x 1024`` square without keeping the aspect ratio and without padding
  (:class:`Sam2Transform`, as the official ``SAM2Transforms`` and HF's ``Sam2Processor``), so masks go back to the
  original size by a single bilinear resize.

The prompt encoder is SAM's (:class:`Sam2PromptEncoder` only adds SAM 2's point labels 2 / 3, box corners given as
points). Without any point or box prompt, one "not a point" token is used, as SAM 2 was trained.

The builders :func:`sam2_hiera_tiny`, :func:`sam2_hiera_small`, :func:`sam2_hiera_base_plus` and
:func:`sam2_hiera_large` have the sizes of the official SAM 2.1 configs; :func:`maskworks.convert.sam2.convert_hf_sam2`
loads HF ``Sam2Model`` checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.models.promptable.decoder import MLP, MaskDecoder, PromptEncoder, TwoWayTransformer
from maskworks.models.promptable.hiera import FpnNeck, Hiera, Sam2ImageEncoder
from maskworks.models.promptable.sam import PIXEL_MEAN, PIXEL_STD, PromptableModel
from maskworks.registry import register_model

__all__ = [
    "Sam2",
    "Sam2MaskDecoder",
    "Sam2PromptEncoder",
    "Sam2Transform",
    "build_sam2",
    "sam2_hiera_base_plus",
    "sam2_hiera_large",
    "sam2_hiera_small",
    "sam2_hiera_tiny",
]

# ---------------------------------------------------------------------------------------------------------------
# Transform
# ---------------------------------------------------------------------------------------------------------------


class Sam2Transform:
    """Resizes images to a ``target_length`` square (aspect ratio not kept) and maps prompts into that frame.

    The image is resized as a float tensor, bilinear with antialiasing (``torchvision``'s ``Resize`` on tensors,
    what the official ``SAM2Transforms`` runs), so :meth:`apply_image` returns ``float32`` values in ``[0, 255]``
    rather than re-quantised ``uint8``. Coordinates are scaled per axis: ``x * S / W``, ``y * S / H``.

    Args:
        target_length: side ``S`` of the square model input.
    """

    def __init__(self, target_length: int = 1024) -> None:
        self.target_length = target_length

    def get_preprocess_shape(self, oldh: int, oldw: int, long_side_length: int | None = None) -> tuple[int, int]:
        """The resized image size, always ``(S, S)`` (``long_side_length`` overrides ``S``)."""
        side = self.target_length if long_side_length is None else long_side_length
        return side, side

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` image (``uint8`` or float in ``[0, 255]``) -> ``(S, S, 3)`` ``float32`` in ``[0, 255]``."""
        x = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        return self.apply_image_torch(x)[0].permute(1, 2, 0).numpy()  # (S, S, 3)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, 3, S, S)`` float, bilinear with antialiasing (a no-op at ``S x S``)."""
        if tuple(image.shape[-2:]) == (self.target_length, self.target_length):
            return image.float()
        size = (self.target_length, self.target_length)
        return F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False, antialias=True)

    def _scale(self, original_size: Sequence[int]) -> tuple[float, float]:
        h, w = original_size
        return self.target_length / w, self.target_length / h

    def apply_coords(self, coords: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
        """Points ``(..., 2)`` as ``(x, y)`` in an image of ``original_size = (H, W)`` -> the model input frame."""
        sx, sy = self._scale(original_size)
        coords = np.array(coords, dtype=np.float64 if np.asarray(coords).dtype == np.float64 else np.float32)
        coords[..., 0] *= sx
        coords[..., 1] *= sy
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
        """Boxes ``(..., 4)`` as ``x0, y0, x1, y1`` -> the model input frame, ``(N, 4)``."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
        """:meth:`apply_coords` on a tensor (returns a new float tensor)."""
        sx, sy = self._scale(original_size)
        coords = coords.clone().to(torch.float64 if coords.dtype == torch.float64 else torch.float32)
        return coords * coords.new_tensor([sx, sy])

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
        """:meth:`apply_boxes` on a tensor, ``(N, 4)``."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoder and mask decoder
# ---------------------------------------------------------------------------------------------------------------


class Sam2PromptEncoder(PromptEncoder):
    """SAM's :class:`PromptEncoder` with SAM 2's point labels: besides 1 (positive), 0 (negative) and -1 (padding),
    labels 2 and 3 mark the top-left and bottom-right corners of a box given as two points (they get the box-corner
    embeddings, as in :meth:`PromptEncoder._embed_boxes`)."""

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        embedding = super()._embed_points(points, labels, pad)  # (B, N[+1], C)
        if pad:
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)  # (B, N + 1)
        labels = labels[..., None]  # (B, N[+1], 1)
        embedding = embedding + torch.where(labels == 2, self.point_embeddings[2].weight, 0.0)
        return embedding + torch.where(labels == 3, self.point_embeddings[3].weight, 0.0)


class Sam2MaskDecoder(MaskDecoder):
    """SAM 2's mask decoder: SAM's :class:`MaskDecoder` with high-resolution features, an object-score token and
    a sigmoid IoU head.

    The output tokens are ``[obj_score_token, iou_token, mask_tokens]`` (the object-score token only with
    ``pred_obj_scores``). With ``use_high_res_features`` the upscaling adds the projected 1/8 features after the
    first transposed conv and the projected 1/4 features after the second: ``act(ln(dc1(x) + s1))`` then
    ``act(dc2(.) + s0)``, ``s1 = conv_s1(f_1/8)`` and ``s0 = conv_s0(f_1/4)`` being computed once per image by the
    model.

    Args:
        transformer_dim: width of the tokens and the image embedding.
        transformer: the :class:`TwoWayTransformer`.
        num_multimask_outputs: masks of the multi-mask output.
        activation: activation of the upscaling.
        iou_head_depth: layers of the IoU MLP.
        iou_head_hidden_dim: hidden width of the IoU MLP.
        use_high_res_features: add the 1/4 and 1/8 features in the upscaling (``conv_s0`` / ``conv_s1``).
        iou_prediction_use_sigmoid: squash the IoU predictions with a sigmoid.
        pred_obj_scores: predict an object score (``obj_score_token``, ``pred_obj_score_head``); otherwise the
            object score logit is a constant 10.
        pred_obj_scores_mlp: a 3-layer MLP object-score head (a linear layer otherwise).
        dynamic_multimask_via_stability: for single-mask output in eval mode, fall back to the best multi-mask
            output when the single mask is unstable.
        dynamic_multimask_stability_delta: logit offset of the stability score.
        dynamic_multimask_stability_thresh: stability below which the fallback applies.
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
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            activation=activation,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.iou_prediction_head.sigmoid_output = iou_prediction_use_sigmoid
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(transformer_dim, 1)
            )
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks, IoU predictions and object-score logits for each prompt.

        Args:
            image_embeddings: ``(1, C, h, w)`` (shared by all prompts) or ``(B, C, h, w)`` (one per prompt).
            image_pe: ``(1, C, h, w)`` positional encoding of the grid.
            sparse_prompt_embeddings: ``(B, N, C)``.
            dense_prompt_embeddings: ``(B, C, h, w)``.
            multimask_output: return the multi-mask outputs instead of the single mask.
            high_res_features: the projected ``(s0 (1 or B, C / 8, 4h, 4w), s1 (1 or B, C / 4, 2h, 2w))``; needed
                with ``use_high_res_features``.

        Returns:
            Mask logits ``(B, M, 4h, 4w)``, IoU predictions ``(B, M)`` (``M`` = 3 or 1) and object-score logits
            ``(B, 1)``.
        """
        masks, iou_pred, obj_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features
        )
        if multimask_output:
            return masks[:, 1:], iou_pred[:, 1:], obj_logits
        if self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
            return masks, iou_pred, obj_logits
        return masks[:, :1], iou_pred[:, :1], obj_logits

    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ``1 + num_multimask_outputs`` masks ``(B, M, 4h, 4w)``, IoU predictions ``(B, M)`` and object-score
        logits ``(B, 1)``."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            output_tokens.insert(0, self.obj_score_token.weight)
        first = 1 if self.pred_obj_scores else 0  # index of the IoU token
        output_tokens = torch.cat(output_tokens, dim=0)  # (T_out, C)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)  # (B, T, C)
        if image_embeddings.shape[0] != batch:
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings  # (B, C, h, w)
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)  # (B, T, C), (B, h * w, C)
        iou_token_out = hs[:, first]  # (B, C)
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens]  # (B, M, C)
        src = src.transpose(1, 2).reshape(b, c, h, w)  # (B, h * w, C) -> (B, C, h, w)
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this decoder uses high-resolution features: pass high_res_features=(s0, s1)")
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(src) + feat_s1))  # (B, C / 4, 2h, 2w)
            upscaled = act2(dc2(upscaled) + feat_s0)  # (B, C / 8, 4h, 4w)
        else:
            upscaled = self.output_upscaling(src)  # (B, C / 8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, M, C / 8)
        b, c8, h4, w4 = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c8, h4 * w4)).reshape(b, -1, h4, w4)  # (B, M, 4h, 4w)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, M)
        if self.pred_obj_scores:
            obj_logits = self.pred_obj_score_head(hs[:, 0])  # (B, 1)
        else:
            obj_logits = iou_pred.new_full((b, 1), 10.0)
        return masks, iou_pred, obj_logits

    def _stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU of the masks thresholded at ``+delta`` and ``-delta``: ``(B, M, H, W)`` -> ``(B, M)`` (1 when
        both are empty)."""
        logits = mask_logits.flatten(-2)  # (B, M, H * W)
        delta = self.dynamic_multimask_stability_delta
        inter = (logits > delta).sum(-1).float()
        union = (logits > -delta).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))

    def _dynamic_multimask_via_stability(
        self, masks: torch.Tensor, iou_pred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The single mask where it is stable, else the multi-mask output with the highest predicted IoU:
        ``(B, 1, H, W)``, ``(B, 1)``."""
        multi_masks, multi_iou = masks[:, 1:], iou_pred[:, 1:]
        best = multi_iou.argmax(dim=-1)  # (B,)
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks = multi_masks[rows, best].unsqueeze(1)  # (B, 1, H, W)
        best_iou = multi_iou[rows, best].unsqueeze(1)  # (B, 1)
        single_masks, single_iou = masks[:, :1], iou_pred[:, :1]
        stable = self._stability_scores(single_masks) >= self.dynamic_multimask_stability_thresh  # (B, 1)
        out_masks = torch.where(stable[..., None, None], single_masks, best_masks)
        out_iou = torch.where(stable, single_iou, best_iou)
        return out_masks, out_iou


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class Sam2(PromptableModel):
    """SAM 2 for promptable segmentation of single images.

    The predictor interface: :attr:`transform` maps images and prompts into the ``image_size`` square,
    :meth:`preprocess` normalises (and resizes) a batch, :meth:`embed_image` runs the image encoder once per image,
    :meth:`decode` predicts low-resolution masks and IoU for prompts in the model input frame, and
    :meth:`postprocess_masks` resizes mask logits back to the original image.

    Args:
        image_encoder: the Hiera + FPN :class:`~maskworks.models.promptable.hiera.Sam2ImageEncoder`.
        prompt_encoder: a :class:`Sam2PromptEncoder`.
        mask_decoder: a :class:`Sam2MaskDecoder`.
        image_size: side of the square model input.
        pixel_mean: per-channel mean on the ``[0, 255]`` scale.
        pixel_std: per-channel standard deviation on the ``[0, 255]`` scale.
    """

    def __init__(
        self,
        image_encoder: Sam2ImageEncoder,
        prompt_encoder: Sam2PromptEncoder,
        mask_decoder: Sam2MaskDecoder,
        image_size: int = 1024,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder, pixel_mean, pixel_std)
        self.image_size = image_size
        self.hidden_dim = image_encoder.neck.d_model
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.transform = Sam2Transform(image_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, h, w)`` (or ``(3, h, w)``) in ``[0, 255]`` -> normalised ``(B, 3, S, S)`` (resized,
        bilinear with antialiasing, when not ``S x S``)."""
        if x.ndim == 3:
            x = x[None]
        x = self.transform.apply_image_torch(x)
        return (x - self.pixel_mean) / self.pixel_std

    def embed_image(self, x: torch.Tensor) -> dict[str, Any]:
        """Preprocessed images ``(B, 3, S, S)`` -> ``{"image_embed": (B, C, S / 16, S / 16), "high_res_feats":
        [s0 (B, C / 8, S / 4, S / 4), s1 (B, C / 4, S / 8, S / 8)]}`` (``no_mem_embed`` added to the embedding, the
        decoder's ``conv_s0`` / ``conv_s1`` applied to the high-resolution maps)."""
        features = self.image_encoder(x)  # fine to coarse: 1/4, 1/8, 1/16
        image_embed = features[-1] + self.no_mem_embed.reshape(1, -1, 1, 1)  # (B, C, S / 16, S / 16)
        high_res: list[torch.Tensor] = list(features[:-1])
        if self.mask_decoder.use_high_res_features:
            high_res = [self.mask_decoder.conv_s0(features[0]), self.mask_decoder.conv_s1(features[1])]
        return {"image_embed": image_embed, "high_res_feats": high_res}

    @staticmethod
    def _sparse_prompts(
        features: dict[str, Any],
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points and boxes as one point set, SAM 2's way: box corners first (labels 2 / 3), then the points;
        without either, one "not a point" (label -1). The prompt encoder appends one padding point to it."""
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        coords, labels = [], []
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2).float()  # (B, 2, 2)
            coords.append(corners)
            labels.append(torch.tensor([[2, 3]], device=boxes.device).expand(corners.shape[0], -1))  # (B, 2)
        if point_coords is not None:
            coords.append(point_coords.float())
            labels.append(point_labels.long())
        if not coords:
            device = features["image_embed"].device
            batch = mask_input.shape[0] if mask_input is not None else features["image_embed"].shape[0]
            coords.append(torch.zeros(batch, 1, 2, device=device))
            labels.append(-torch.ones(batch, 1, dtype=torch.long, device=device))
        return torch.cat(coords, dim=1), torch.cat(labels, dim=1)  # (B, N, 2), (B, N)

    def decode(
        self,
        features: dict[str, Any],
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_object_scores: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Masks for prompts in the model input frame.

        The image features may hold one image (shared by every prompt of the batch) or as many as prompts.

        Args:
            features: :meth:`embed_image`'s output.
            point_coords: ``(B, N, 2)`` as ``(x, y)``.
            point_labels: ``(B, N)``: 1 positive, 0 negative, -1 padding, 2 / 3 box corners.
            boxes: ``(B, 4)`` as ``x0, y0, x1, y1``.
            mask_input: ``(B, 1, 4h, 4w)`` low-resolution mask logits from a previous prediction (resized, bilinear
                with antialiasing, when of another size).
            multimask_output: return the three multi-mask outputs instead of one mask.
            return_object_scores: also return the object-score logits ``(B, 1)``.

        Returns:
            Low-resolution mask logits ``(B, M, S / 4, S / 4)`` and IoU predictions ``(B, M)``, ``M`` = 3 or 1
            (and the object-score logits).
        """
        points = self._sparse_prompts(features, point_coords, point_labels, boxes, mask_input)
        if mask_input is not None and tuple(mask_input.shape[-2:]) != tuple(self.prompt_encoder.mask_input_size):
            mask_input = F.interpolate(
                mask_input.float(),
                size=self.prompt_encoder.mask_input_size,
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        sparse, dense = self.prompt_encoder(points, None, mask_input)
        masks, iou_pred, obj_logits = self.mask_decoder(
            features["image_embed"],
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
            high_res_features=features["high_res_feats"],
        )
        return (masks, iou_pred, obj_logits) if return_object_scores else (masks, iou_pred)

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Sequence[int], original_size: Sequence[int]
    ) -> torch.Tensor:
        """Low-resolution logits ``(B, M, h, w)`` -> ``(B, M, H, W)`` logits at ``original_size``.

        The whole square input is the (resized) image, so ``input_size`` plays no part: one bilinear resize.
        """
        return F.interpolate(masks.float(), size=tuple(original_size), mode="bilinear", align_corners=False)

    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool = True) -> list[dict[str, Any]]:
        """End to end on a list of images (the interface of the official ``Sam.forward``).

        Args:
            batched_input: one dict per image: ``image`` ``(3, h, w)`` in ``[0, 255]`` (resized by
                :attr:`transform` or not: :meth:`preprocess` resizes it), ``original_size`` ``(H, W)``, and optional
                ``point_coords`` ``(B, N, 2)`` + ``point_labels`` ``(B, N)``, ``boxes`` ``(B, 4)``, ``mask_inputs``
                ``(B, 1, S / 4, S / 4)`` in the ``S x S`` model input frame.
            multimask_output: three masks per prompt instead of one.

        Returns:
            One dict per image: ``masks`` (boolean, ``(B, M, H, W)``), ``iou_predictions`` ``(B, M)`` and
            ``low_res_logits`` ``(B, M, S / 4, S / 4)``.
        """
        images = torch.cat([self.preprocess(record["image"]) for record in batched_input])  # (N, 3, S, S)
        features = self.embed_image(images)
        outputs = []
        for i, record in enumerate(batched_input):
            one = {
                "image_embed": features["image_embed"][i : i + 1],
                "high_res_feats": [f[i : i + 1] for f in features["high_res_feats"]],
            }
            low_res, iou = self.decode(
                one,
                record.get("point_coords"),
                record.get("point_labels"),
                record.get("boxes"),
                record.get("mask_inputs"),
                multimask_output,
            )
            masks = self.postprocess_masks(low_res, images.shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------


def build_sam2(
    *,
    embed_dim: int = 96,
    num_heads: int = 1,
    stages: Sequence[int] = (1, 2, 7, 2),
    global_att_blocks: Sequence[int] = (5, 7, 9),
    window_spec: Sequence[int] = (8, 4, 14, 7),
    window_pos_embed_bkg_spatial_size: Sequence[int] = (7, 7),
    image_size: int = 1024,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_num_heads: int = 8,
    decoder_mlp_dim: int = 2048,
    iou_head_hidden_dim: int = 256,
    dynamic_multimask_via_stability: bool = True,
    drop_path_rate: float = 0.0,
) -> Sam2:
    """Assemble SAM 2 (image mode) from its sizes; the defaults are SAM 2.1 Hiera-T's.

    Args:
        embed_dim: Hiera width of the first stage (doubled at each stage).
        num_heads: Hiera heads of the first stage (doubled at each stage).
        stages: Hiera blocks per stage.
        global_att_blocks: indices of Hiera's global-attention blocks.
        window_spec: Hiera's attention window per stage.
        window_pos_embed_bkg_spatial_size: size of Hiera's background position table.
        image_size: side of the square model input (the image embedding is ``image_size / 16``).
        prompt_embed_dim: width of the FPN, prompt tokens and mask decoder.
        mask_in_chans: hidden channels of the mask prompt downscaling.
        decoder_depth: blocks of the two-way transformer.
        decoder_num_heads: attention heads of the two-way transformer.
        decoder_mlp_dim: MLP width of the two-way transformer.
        iou_head_hidden_dim: hidden width of the IoU head.
        dynamic_multimask_via_stability: single-mask fallback to the best multi-mask output (eval mode).
        drop_path_rate: stochastic depth of Hiera's last block.

    Returns:
        The :class:`Sam2` model.
    """
    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
    trunk = Hiera(
        embed_dim=embed_dim,
        num_heads=num_heads,
        stages=stages,
        global_att_blocks=global_att_blocks,
        window_spec=window_spec,
        window_pos_embed_bkg_spatial_size=window_pos_embed_bkg_spatial_size,
        drop_path_rate=drop_path_rate,
    )
    neck = FpnNeck(prompt_embed_dim, trunk.channel_list[::-1], fpn_top_down_levels=(2, 3), fpn_interp_model="nearest")
    grid = image_size // 16
    prompt_encoder = Sam2PromptEncoder(
        embed_dim=prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=mask_in_chans,
    )
    transformer = TwoWayTransformer(
        depth=decoder_depth, embedding_dim=prompt_embed_dim, num_heads=decoder_num_heads, mlp_dim=decoder_mlp_dim
    )
    mask_decoder = Sam2MaskDecoder(
        transformer_dim=prompt_embed_dim,
        transformer=transformer,
        iou_head_hidden_dim=iou_head_hidden_dim,
        dynamic_multimask_via_stability=dynamic_multimask_via_stability,
    )
    return Sam2(Sam2ImageEncoder(trunk, neck, scalp=1), prompt_encoder, mask_decoder, image_size=image_size)


@register_model(name="sam2_hiera_tiny", task="promptable")
def sam2_hiera_tiny(**kwargs: Any) -> Sam2:
    """SAM 2.1 Hiera-T (image mode): stages 1-2-7-2 of width 96 -> 768, 1 -> 8 heads, global attention in blocks
    5, 7, 9 (31,440,721 parameters, as HF's ``Sam2Model``); ``kwargs`` override :func:`build_sam2`'s arguments."""
    config = {"embed_dim": 96, "num_heads": 1, "stages": (1, 2, 7, 2), "global_att_blocks": (5, 7, 9)}
    return build_sam2(**{**config, "window_pos_embed_bkg_spatial_size": (7, 7), **kwargs})


@register_model(name="sam2_hiera_small", task="promptable")
def sam2_hiera_small(**kwargs: Any) -> Sam2:
    """SAM 2.1 Hiera-S (image mode): stages 1-2-11-2 of width 96 -> 768, 1 -> 8 heads, global attention in blocks
    7, 10, 13 (38,538,577 parameters)."""
    config = {"embed_dim": 96, "num_heads": 1, "stages": (1, 2, 11, 2), "global_att_blocks": (7, 10, 13)}
    return build_sam2(**{**config, "window_pos_embed_bkg_spatial_size": (7, 7), **kwargs})


@register_model(name="sam2_hiera_base_plus", task="promptable")
def sam2_hiera_base_plus(**kwargs: Any) -> Sam2:
    """SAM 2.1 Hiera-B+ (image mode): stages 2-3-16-3 of width 112 -> 896, 2 -> 16 heads, global attention in
    blocks 12, 16, 20, a 14x14 background position table (73,328,401 parameters)."""
    config = {"embed_dim": 112, "num_heads": 2, "stages": (2, 3, 16, 3), "global_att_blocks": (12, 16, 20)}
    return build_sam2(**{**config, "window_pos_embed_bkg_spatial_size": (14, 14), **kwargs})


@register_model(name="sam2_hiera_large", task="promptable")
def sam2_hiera_large(**kwargs: Any) -> Sam2:
    """SAM 2.1 Hiera-L (image mode): stages 2-6-36-4 of width 144 -> 1152, 2 -> 16 heads, global attention in
    blocks 23, 33, 43, windows 8-4-16-8 (216,924,865 parameters)."""
    config = {"embed_dim": 144, "num_heads": 2, "stages": (2, 6, 36, 4), "global_att_blocks": (23, 33, 43)}
    return build_sam2(**{**config, "window_spec": (8, 4, 16, 8), "window_pos_embed_bkg_spatial_size": (7, 7), **kwargs})
