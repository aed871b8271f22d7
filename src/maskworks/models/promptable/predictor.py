"""Interactive prediction with a promptable model: embed an image once, then answer prompts in milliseconds
(Kirillov et al., "Segment Anything", ICCV 2023; the interface of the official ``SamPredictor``).

:meth:`SamPredictor.set_image` resizes the image (the model's ``transform``: for SAM, longest side to 1024 with
PIL, as the official predictor does), normalises and pads it, and caches the image embedding.
:meth:`SamPredictor.predict` takes prompts in original-image pixels, maps them into the model frame, decodes and
returns masks at the original size (the padding removed before resizing back), their predicted IoU and the
256 x 256 logits that can be fed back as ``mask_input``. Batched prompts (``(B, N, 2)`` points, ``(B, 4)`` boxes)
are answered in one decoder pass.

The predictor only needs the model to provide ``transform``, ``preprocess``, ``embed_image``, ``decode``,
``postprocess_masks``, ``image_size`` and ``mask_threshold``, so SAM and SAM 2 share it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

__all__ = ["SamPredictor"]


def _as_array(value: object, name: str, last: int | None, ndims: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim not in ndims or (last is not None and array.shape[-1] != last):
        want = " or ".join(f"{d}-D" for d in ndims)
        tail = f" with last dimension {last}" if last is not None else ""
        raise ValueError(f"{name} must be a {want} array{tail}, got shape {array.shape}")
    return array


class SamPredictor:
    """Compute an image's embedding once and predict masks for any number of prompts.

    Args:
        sam_model: a promptable model (``sam_vit_base`` ...), used in eval mode without gradients.
    """

    def __init__(self, sam_model: nn.Module) -> None:
        for attr in ("transform", "preprocess", "embed_image", "decode", "postprocess_masks"):
            if not hasattr(sam_model, attr):
                raise TypeError(f"{type(sam_model).__name__} is not a promptable model: it has no {attr!r}")
        self.model = sam_model
        self.transform = sam_model.transform
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an ``H x W x 3`` uint8 image (RGB, or BGR with ``image_format="BGR"``)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be an HxWx3 uint8 array, got shape {image.shape} and dtype {image.dtype}")
        if image_format != getattr(self.model, "image_format", "RGB"):
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]  # (1, 3, h, w)
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Embed an image already resized by ``model.transform``: ``(1, 3, h, w)``, 0-255."""
        if transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3):
            raise ValueError(f"transformed_image must be (1, 3, H, W), got {tuple(transformed_image.shape)}")
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        was_training = self.model.training
        self.model.eval()
        try:
            self.features = self.model.embed_image(self.model.preprocess(transformed_image.float()))
        finally:
            self.model.train(was_training)
        self.is_image_set = True

    def set_embedding(
        self, features: torch.Tensor | dict, original_size: tuple[int, int], input_size: tuple[int, int]
    ) -> None:
        """Use an embedding computed earlier (``get_image_embedding`` with the ``original_size`` and ``input_size``
        of that image) instead of embedding the image again: a server keeps embeddings and answers each click with
        the decoder only."""
        self.reset_image()
        self.features = features
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor | dict:
        """The cached embedding of the current image."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("an image must be set with .set_image(...) before mask prediction")

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts given in original-image pixels.

        One prompt: ``point_coords`` ``(N, 2)`` as ``(x, y)``, ``point_labels`` ``(N,)`` (1 foreground,
        0 background), ``box`` ``(4,)`` as ``x0, y0, x1, y1``, ``mask_input`` ``(1, 256, 256)`` logits.
        A batch of ``B`` prompts: ``(B, N, 2)`` / ``(B, N)`` / ``(B, 4)`` / ``(B, 1, 256, 256)``.

        Args:
            point_coords: point prompts or ``None``.
            point_labels: their labels (required with ``point_coords``).
            box: box prompt(s) or ``None``.
            mask_input: low-resolution logits of an earlier prediction, or ``None``.
            multimask_output: three candidate masks per prompt (best for a single ambiguous click).
            return_logits: return the logits instead of boolean masks.

        Returns:
            ``masks`` ``(M, H, W)`` at the original size, ``iou_predictions`` ``(M,)`` and ``low_res_masks``
            ``(M, 256, 256)`` (each with a leading ``B`` for a batch of prompts), as numpy arrays.
        """
        self._require_image()
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        batched = False
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None:
            coords = _as_array(point_coords, "point_coords", 2, (2, 3))
            labels = _as_array(point_labels, "point_labels", None, (1, 2))
            if coords.shape[:-1] != labels.shape:
                raise ValueError(
                    f"point_labels of shape {labels.shape} do not match point_coords of shape {coords.shape}"
                )
            batched = coords.ndim == 3
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)
            if not batched:
                coords_t, labels_t = coords_t[None], labels_t[None]  # (1, N, 2), (1, N)
        if box is not None:
            boxes = _as_array(box, "box", 4, (1, 2))
            batched = batched or boxes.ndim == 2
            box_t = torch.as_tensor(self.transform.apply_boxes(boxes, self.original_size), dtype=torch.float)
            box_t = box_t.to(self.device)  # (B, 4)
        if mask_input is not None:
            masks_in = _as_array(mask_input, "mask_input", None, (3, 4))
            batched = batched or masks_in.ndim == 4
            mask_t = torch.as_tensor(masks_in, dtype=torch.float, device=self.device)
            if mask_t.ndim == 3:
                mask_t = mask_t[None]  # (1, 1, 256, 256)
        sizes = {t.shape[0] for t in (coords_t, box_t, mask_t) if t is not None}
        if len(sizes) > 1:
            raise ValueError(f"the prompts disagree on the batch size: {sorted(sizes)}")
        masks, iou, low_res = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output, return_logits)
        masks, iou, low_res = masks.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy()
        return (masks, iou, low_res) if batched else (masks[0], iou[0], low_res[0])

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for a batch of prompts already in the model's input frame (see ``model.transform``).

        Args:
            point_coords: ``(B, N, 2)`` or ``None``.
            point_labels: ``(B, N)`` or ``None``.
            boxes: ``(B, 4)`` or ``None``.
            mask_input: ``(B, 1, 256, 256)`` or ``None``.
            multimask_output: three masks per prompt instead of one.
            return_logits: logits instead of boolean masks.

        Returns:
            Masks ``(B, M, H, W)`` at the original size, IoU predictions ``(B, M)``, low-resolution logits
            ``(B, M, 256, 256)``.
        """
        self._require_image()
        was_training = self.model.training
        self.model.eval()
        try:
            low_res, iou = self.model.decode(
                self.features, point_coords, point_labels, boxes, mask_input, multimask_output
            )
        finally:
            self.model.train(was_training)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res
