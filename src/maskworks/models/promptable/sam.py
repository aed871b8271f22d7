"""Segment Anything (Kirillov et al., "Segment Anything", ICCV 2023): a promptable segmentation model.

The heavy :class:`~maskworks.models.promptable.image_encoder.ImageEncoderViT` runs once per image; the light
:class:`~maskworks.models.promptable.decoder.PromptEncoder` and
:class:`~maskworks.models.promptable.decoder.MaskDecoder` then answer any number of point / box / mask prompts
from the cached embedding, each with one mask or three candidate masks (whole, part, subpart) and a predicted IoU.

Frames: the image is resized so its longest side is ``image_size`` (1024), normalised with ImageNet's mean / std in
0-255 units and zero-padded at the bottom / right to ``image_size x image_size``. Prompts are given in that
resized frame (:class:`~maskworks.models.promptable.transforms.ResizeLongestSide` maps them from the original
image). Masks come out as 256 x 256 logits over the padded input; :meth:`Sam.postprocess_masks` upsamples them to
the padded input, removes the padding and resizes to the original image.

``sam_vit_base`` / ``sam_vit_large`` / ``sam_vit_huge`` have the official architectures (93,735,472 /
312,342,832 / 641,090,608 parameters). Weights in the official ``segment_anything`` layout (``sam_vit_b_01ec64.pth``
...) and Hugging Face ``SamModel`` state dicts load with :func:`maskworks.convert.load_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.models.promptable.decoder import MaskDecoder, PromptEncoder, TwoWayTransformer
from maskworks.models.promptable.image_encoder import ImageEncoderViT
from maskworks.models.promptable.transforms import ResizeLongestSide
from maskworks.registry import register_model

__all__ = ["PromptableModel", "Sam", "build_sam", "sam_vit_base", "sam_vit_huge", "sam_vit_large"]

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class PromptableModel(nn.Module):
    """What SAM and SAM 2 share: an image encoder, a prompt encoder and a mask decoder, the pixel mean / std (0-255
    units) as buffers, and the interface :class:`~maskworks.models.promptable.SamPredictor` uses (``transform``,
    ``preprocess``, ``embed_image``, ``decode``, ``postprocess_masks``, ``image_size``, ``mask_threshold``).

    Args:
        image_encoder: the image encoder.
        prompt_encoder: embeds points, boxes and masks.
        mask_decoder: predicts masks and IoU from the embeddings.
        pixel_mean: per-channel mean in 0-255 units.
        pixel_std: per-channel standard deviation in 0-255 units.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    task = "promptable"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        """The device of the model."""
        return self.pixel_mean.device


class Sam(PromptableModel):
    """Image encoder + prompt encoder + mask decoder, with SAM's pre- and post-processing.

    Args:
        image_encoder: maps a ``(B, 3, S, S)`` normalised image to the ``(B, C, S / 16, S / 16)`` embedding.
        prompt_encoder: embeds points, boxes and masks.
        mask_decoder: predicts masks and IoU from the embeddings.
        pixel_mean: per-channel mean in 0-255 units.
        pixel_std: per-channel standard deviation in 0-255 units.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder, pixel_mean, pixel_std)
        self.transform = ResizeLongestSide(image_encoder.img_size)

    @property
    def image_size(self) -> int:
        """The side of the square model input (1024)."""
        return self.image_encoder.img_size

    # -- the three stages ------------------------------------------------------------------------------------------

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resized images ``(B, 3, h, w)`` (0-255, longest side ``image_size``) -> normalised and zero-padded to
        ``(B, 3, image_size, image_size)``."""
        if x.ndim == 3:
            x = x[None]
        h, w = x.shape[-2:]
        if max(h, w) > self.image_size:
            raise ValueError(
                f"input of size {(h, w)} is larger than the model input {self.image_size}; resize it first "
                "(model.transform.apply_image / apply_image_torch)"
            )
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(B, 3, S, S)`` -> image embeddings ``(B, C, S / 16, S / 16)``."""
        return self.image_encoder(x)

    def decode(
        self,
        features: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for a batch of prompts on one image embedding.

        Args:
            features: the image embedding ``(1, C, h, w)`` from :meth:`embed_image`.
            point_coords: ``(B, N, 2)`` points as ``(x, y)`` in the resized input frame.
            point_labels: ``(B, N)``: 1 foreground, 0 background, -1 padding.
            boxes: ``(B, 4)`` boxes ``x0, y0, x1, y1`` in the resized input frame.
            mask_input: ``(B, 1, 256, 256)`` low-resolution logits of an earlier prediction.
            multimask_output: three candidate masks per prompt instead of one.

        Returns:
            Low-resolution mask logits ``(B, M, 4h, 4w)`` and IoU predictions ``(B, M)``.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=features,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Low-resolution logits ``(B, M, 256, 256)`` -> logits at the original image size ``(B, M, H, W)``.

        Upsampled to the padded input, cropped to the resized image ``input_size`` (removing the padding), then
        resized to ``original_size``.
        """
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool = True) -> list[dict[str, Any]]:
        """End to end on a list of images (the official ``Sam.forward``).

        Args:
            batched_input: one dict per image: ``image`` ``(3, h, w)`` already resized (0-255), ``original_size``
                ``(H, W)``, and optional ``point_coords`` ``(B, N, 2)`` + ``point_labels`` ``(B, N)``, ``boxes``
                ``(B, 4)``, ``mask_inputs`` ``(B, 1, 256, 256)`` in the resized frame.
            multimask_output: three masks per prompt instead of one.

        Returns:
            One dict per image: ``masks`` (boolean, ``(B, M, H, W)``), ``iou_predictions`` ``(B, M)`` and
            ``low_res_logits`` ``(B, M, 256, 256)``.
        """
        images = torch.stack([self.preprocess(record["image"])[0] for record in batched_input])  # (N, 3, S, S)
        embeddings = self.embed_image(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            low_res, iou = self.decode(
                embedding[None],
                record.get("point_coords"),
                record.get("point_labels"),
                record.get("boxes"),
                record.get("mask_inputs"),
                multimask_output,
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs


def build_sam(
    encoder_embed_dim: int = 768,
    encoder_depth: int = 12,
    encoder_num_heads: int = 12,
    encoder_global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
    num_multimask_outputs: int = 3,
) -> Sam:
    """A SAM of any size (the defaults are ViT-B). Tests use a tiny one, e.g. ``image_size=256,
    encoder_embed_dim=64, encoder_depth=2, window_size=4, encoder_global_attn_indexes=(1,)``.

    Args:
        encoder_embed_dim: ViT width.
        encoder_depth: ViT blocks.
        encoder_num_heads: ViT heads.
        encoder_global_attn_indexes: blocks with global attention (the others are windowed).
        image_size: square model input side.
        patch_size: ViT patch side (the embedding grid is ``image_size / patch_size``).
        window_size: side of the attention windows.
        prompt_embed_dim: width of the neck, the prompt tokens and the mask decoder.
        mask_in_chans: hidden channels of the mask-prompt downscaling.
        decoder_depth: two-way transformer blocks.
        decoder_mlp_dim: MLP width of the two-way transformer.
        decoder_num_heads: heads of the two-way transformer.
        iou_head_hidden_dim: hidden width of the IoU head.
        num_multimask_outputs: masks of the multi-mask output.
    """
    grid = image_size // patch_size
    encoder = ImageEncoderViT(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=encoder_embed_dim,
        depth=encoder_depth,
        num_heads=encoder_num_heads,
        mlp_ratio=4.0,
        out_chans=prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=window_size,
        global_attn_indexes=tuple(encoder_global_attn_indexes),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=mask_in_chans,
    )
    decoder = MaskDecoder(
        transformer_dim=prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=decoder_depth, embedding_dim=prompt_embed_dim, num_heads=decoder_num_heads, mlp_dim=decoder_mlp_dim
        ),
        num_multimask_outputs=num_multimask_outputs,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    return Sam(encoder, prompt_encoder, decoder)


@register_model(task="promptable")
def sam_vit_base(**kwargs: Any) -> Sam:
    """SAM ViT-B: 12 blocks of width 768, global attention in blocks 2, 5, 8, 11 (93.7 M parameters)."""
    return build_sam(**{"encoder_embed_dim": 768, "encoder_depth": 12, "encoder_num_heads": 12, **kwargs})


@register_model(task="promptable")
def sam_vit_large(**kwargs: Any) -> Sam:
    """SAM ViT-L: 24 blocks of width 1024, global attention in blocks 5, 11, 17, 23 (312.3 M parameters)."""
    config = {"encoder_embed_dim": 1024, "encoder_depth": 24, "encoder_num_heads": 16}
    return build_sam(**{**config, "encoder_global_attn_indexes": (5, 11, 17, 23), **kwargs})


@register_model(task="promptable")
def sam_vit_huge(**kwargs: Any) -> Sam:
    """SAM ViT-H: 32 blocks of width 1280, global attention in blocks 7, 15, 23, 31 (641.1 M parameters)."""
    config = {"encoder_embed_dim": 1280, "encoder_depth": 32, "encoder_num_heads": 16}
    return build_sam(**{**config, "encoder_global_attn_indexes": (7, 15, 23, 31), **kwargs})
