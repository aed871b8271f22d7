"""Resizing for SAM: the longest side to the model's input size, the aspect ratio kept (Kirillov et al., "Segment
Anything", ICCV 2023; the official ``ResizeLongestSide``).

An ``H x W`` image becomes ``round(H * s) x round(W * s)`` with ``s = target / max(H, W)``; the model pads it at the
bottom / right to ``target x target``. Point and box coordinates are scaled per axis by the same factors the image
was (``new_w / W``, ``new_h / H``), so a point stays on the pixel it named. Numpy images are resized with PIL (as
the official predictor does), tensors with ``F.interpolate(bilinear, antialias=True)``; the two differ slightly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["ResizeLongestSide"]


class ResizeLongestSide:
    """Resize images so the longest side is ``target_length`` and map coordinates and boxes the same way.

    Args:
        target_length: the longest side after resizing (the model's input size, 1024 for SAM).
    """

    def __init__(self, target_length: int) -> None:
        if int(target_length) < 1:
            raise ValueError(f"target_length must be a positive int, got {target_length!r}")
        self.target_length = int(target_length)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """The ``(h, w)`` an ``oldh x oldw`` image is resized to (rounded half up, at least 1 pixel)."""
        scale = long_side_length / max(oldh, oldw)
        return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """An ``H x W x C`` uint8 image -> the resized uint8 image (PIL, bilinear, as torchvision resizes PIL images)."""
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWxC uint8 image, got shape {image.shape} and dtype {image.dtype}")
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        pil = Image.fromarray(image if image.shape[2] != 1 else image[..., 0])
        out = np.array(pil.resize((w, h), resample=Image.Resampling.BILINEAR))
        return out[..., None] if out.ndim == 2 else out

    def _scale(self, original_size: tuple[int, int]) -> tuple[float, float]:
        oldh, oldw = original_size
        newh, neww = self.get_preprocess_shape(oldh, oldw, self.target_length)
        return neww / oldw, newh / oldh

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Coordinates ``(..., 2)`` as ``(x, y)`` in the original image -> the resized image (float)."""
        sx, sy = self._scale(original_size)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] *= sx
        coords[..., 1] *= sy
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Boxes ``(..., 4)`` as ``x0, y0, x1, y1`` in the original image -> ``(N, 4)`` in the resized image."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def invert_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """The inverse of :meth:`apply_coords`: resized-image coordinates -> original-image coordinates."""
        sx, sy = self._scale(original_size)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] /= sx
        coords[..., 1] /= sy
        return coords

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """A ``(B, C, H, W)`` float tensor -> resized with bilinear interpolation and antialiasing."""
        h, w = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Tensor version of :meth:`apply_coords` (float result, the input untouched)."""
        sx, sy = self._scale(original_size)
        return coords.to(torch.float) * coords.new_tensor([sx, sy], dtype=torch.float)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Tensor version of :meth:`apply_boxes`."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
