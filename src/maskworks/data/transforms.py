"""Joint image/mask/instance augmentation on ``torchvision.transforms.v2``.

Transforms act on the *raw* sample dict of a maskworks dataset, before the image becomes float::

    {"image": tv_tensors.Image uint8 (C, H, W), "mask": tv_tensors.Mask int64 (H, W),
     "instances": {"boxes": tv_tensors.BoundingBoxes, "labels": Tensor, "masks": InstanceMasks uint8 (N, H, W)}}

Because the mask is a ``tv_tensors.Mask``, every geometric op resamples it with nearest neighbour (no
interpolated labels, the defect of the stacked-tensor trick), and one call draws one set of random parameters for
all entries (no desynchronised image/mask). Padded or rotated-in areas are filled with 0 in the image, with
``ignore_index`` (255) in the semantic mask and with 0 in instance masks (constant borders, never reflections).
Photometric ops touch only the image. The dataset converts the image to float and normalises it *after* the
transform (:func:`normalize_image`), so a transform never needs mean/std.

Randomness: every op draws from torch's global RNG and nothing reseeds it. To make epochs reproducible, call
``torch.manual_seed(seed + epoch)`` before iterating (single process) and give the DataLoader a
``generator=torch.Generator().manual_seed(seed + epoch)`` (torch derives each worker's seed from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = [
    "InstanceMasks",
    "segmentation_fill",
    "RandomScale",
    "RandomCrop",
    "GaussianNoise",
    "normalize_image",
    "build_transforms",
]


class InstanceMasks(tv_tensors.Mask):
    """Stacked binary instance masks ``(N, H, W)`` (uint8 0/1): resampled like masks but padded with 0, not 255."""


def segmentation_fill(fill: float = 0, ignore_index: int = 255) -> dict[Any, float]:
    """The v2 ``fill`` dict for segmentation: image ``fill``, semantic mask ``ignore_index``, instance masks 0."""
    return {tv_tensors.Image: fill, tv_tensors.Mask: ignore_index, "others": 0}


def _fill_for(fill: dict[Any, float], inpt: Any) -> float:
    return fill.get(type(inpt), fill["others"])


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            h, w = F.get_size(inpt)
            return h, w
    raise TypeError("expected a sample with a tv_tensors.Image or tv_tensors.Mask")


class _Transform(v2.Transform):
    """v2 transform base; also answers to the hook names of torchvision < 0.21."""

    def _get_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.transform(inpt, params)


class RandomScale(_Transform):
    """Resize by a random factor; optionally crop or pad back to the input size (a random zoom).

    With ``keep_size=False`` the output is ``round(s * H) x round(s * W)``. With ``keep_size=True`` a zoomed-in
    sample is randomly cropped and a zoomed-out one randomly placed on a constant-filled canvas of the input size,
    so batches stay stackable without a crop size (unlike ``RandomResizedCrop``, this can zoom out).

    Args:
        scale_range: ``(low, high)`` range of the factor ``s``, drawn uniformly.
        keep_size: crop/pad back to the input size.
        interpolation: for the image (masks always use nearest).
        fill: image fill of padded areas.
        ignore_index: semantic mask fill of padded areas.
    """

    def __init__(
        self,
        scale_range: Sequence[float] = (0.5, 2.0),
        keep_size: bool = False,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        fill: float = 0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range, self.keep_size, self.interpolation = (lo, hi), keep_size, interpolation
        self.fill = segmentation_fill(fill, ignore_index)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _spatial_size(flat_inputs)
        s = float(torch.empty(()).uniform_(*self.scale_range))
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        params: dict[str, Any] = {"size": [nh, nw], "padding": None, "crop": None}
        if self.keep_size:
            top, bottom, crop_top = self._place(nh, h)
            left, right, crop_left = self._place(nw, w)
            params["padding"] = [left, top, right, bottom] if top or bottom or left or right else None
            params["crop"] = (crop_top, crop_left, h, w)
        return params

    @staticmethod
    def _place(new: int, old: int) -> tuple[int, int, int]:
        """``(pad_before, pad_after, crop_start)`` along one axis to go from ``new`` back to ``old`` pixels."""
        if new >= old:
            return 0, 0, int(torch.randint(new - old + 1, ()))
        before = int(torch.randint(old - new + 1, ()))
        return before, old - new - before, 0

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self._call_kernel(F.resize, inpt, params["size"], interpolation=self.interpolation, antialias=True)
        if params["padding"] is not None:
            out = self._call_kernel(
                F.pad, out, params["padding"], fill=_fill_for(self.fill, inpt), padding_mode="constant"
            )
        if params["crop"] is not None:
            out = self._call_kernel(F.crop, out, *params["crop"])
        return out


class RandomCrop(v2.RandomCrop):
    """Random crop that pads with constants when the sample is smaller (image ``fill``, mask ``ignore_index``).

    Args:
        size: output ``(H, W)`` or an int for a square.
        fill: image fill of padded areas.
        ignore_index: semantic mask fill of padded areas.
    """

    def __init__(self, size: int | Sequence[int], fill: float = 0, ignore_index: int = 255) -> None:
        super().__init__(size, pad_if_needed=True, fill=segmentation_fill(fill, ignore_index), padding_mode="constant")


class GaussianNoise(_Transform):
    """Additive Gaussian noise on the image only (uint8 or float images).

    Args:
        std: noise standard deviation in 0-1 intensity units.
        p: probability of applying it.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, std: float = 0.03, p: float = 1.0) -> None:
        super().__init__()
        if std < 0 or not 0 <= p <= 1:
            raise ValueError(f"GaussianNoise needs std >= 0 and 0 <= p <= 1, got std={std}, p={p}")
        self.std, self.p = std, p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"apply": bool(torch.rand(()) < self.p)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        if x.dtype == torch.uint8:
            noisy = (x.float() + torch.randn(x.shape) * (self.std * 255)).round_().clamp_(0, 255).to(torch.uint8)
        else:
            noisy = (x + torch.randn(x.shape, dtype=x.dtype) * self.std).clamp_(0, 1)
        return tv_tensors.wrap(noisy, like=inpt)


def normalize_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0-255) or float (0-1) ``(C, H, W)`` image -> float32 ``(image - mean) / std`` as a plain tensor.

    Args:
        image: the image after the transform.
        mean: per-channel mean in 0-1 units.
        std: per-channel standard deviation in 0-1 units.

    Returns:
        float32 ``(C, H, W)``.
    """
    x = image.as_subclass(torch.Tensor)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.is_floating_point():
        x = x.float()
    else:
        raise TypeError(f"expected a uint8 (0-255) or float (0-1) image, got dtype {x.dtype}")
    if x.shape[0] != len(mean) or len(mean) != len(std):
        raise ValueError(f"image has {x.shape[0]} channels but mean/std have {len(mean)}/{len(std)} values")
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


def _check_probability(name: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"{name} is a probability and must be in [0, 1], got {p}")


def build_transforms(
    train: bool,
    crop_size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] | None = (0.5, 2.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotate: float = 0.0,
    elastic: float = 0.0,
    color_jitter: float = 0.0,
    noise: float = 0.0,
    blur: float = 0.0,
    ignore_index: int = 255,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    elastic_alpha: float = 50.0,
    elastic_sigma: float = 5.0,
) -> v2.Transform:
    """The standard segmentation augmentation pipeline (geometric, then photometric).

    Training: random scale (cropped/padded back to the input size when ``crop_size`` is None, so batches stay
    stackable), random crop to ``crop_size`` (padding small samples), flips, rotation, elastic deformation,
    colour jitter, blur and noise as enabled. Evaluation (``train=False``): the identity; the dataset still
    converts and normalises the image.

    Args:
        train: training pipeline, or the identity for evaluation.
        crop_size: output size ``(H, W)`` (or int) of training samples; None keeps each sample's size.
        scale_range: ``(low, high)`` random scale factor; None or ``(1, 1)`` disables it.
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rotate: maximum rotation in degrees (uniform in ``[-rotate, rotate]``), 0 disables it.
        elastic: probability of an elastic deformation (``elastic_alpha``/``elastic_sigma`` in pixels).
        color_jitter: brightness/contrast/saturation strength (hue gets a quarter of it), 0 disables it.
        noise: Gaussian noise std in 0-1 units, 0 disables it.
        blur: probability of a Gaussian blur (kernel 5, sigma 0.1-2).
        ignore_index: mask fill of padded and rotated-in areas.
        interpolation: image interpolation of geometric ops (masks always use nearest).
        elastic_alpha: displacement magnitude of the elastic deformation.
        elastic_sigma: smoothness of the elastic displacement field.

    Returns:
        A callable on the raw sample dict.
    """
    if not train:
        return v2.Identity()
    for name, p in (("hflip", hflip), ("vflip", vflip), ("elastic", elastic), ("blur", blur)):
        _check_probability(name, p)
    if rotate < 0 or color_jitter < 0 or noise < 0:
        raise ValueError(f"rotate, color_jitter and noise must be >= 0, got {rotate}, {color_jitter}, {noise}")
    ops: list[v2.Transform] = []
    if scale_range is not None and tuple(float(s) for s in scale_range) != (1.0, 1.0):
        ops.append(
            RandomScale(
                scale_range, keep_size=crop_size is None, interpolation=interpolation, ignore_index=ignore_index
            )
        )
    if crop_size is not None:
        ops.append(RandomCrop(crop_size, ignore_index=ignore_index))
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if vflip > 0:
        ops.append(v2.RandomVerticalFlip(vflip))
    if rotate > 0:
        ops.append(v2.RandomRotation(rotate, interpolation=interpolation, fill=segmentation_fill(0, ignore_index)))
    if elastic > 0:
        ops.append(
            v2.RandomApply(
                [
                    v2.ElasticTransform(
                        elastic_alpha,
                        elastic_sigma,
                        interpolation=interpolation,
                        fill=segmentation_fill(0, ignore_index),
                    )
                ],
                p=elastic,
            )
        )
    if color_jitter > 0:
        s = color_jitter
        ops.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
    if blur > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=blur))
    if noise > 0:
        ops.append(GaussianNoise(noise))
    return v2.Compose(ops) if ops else v2.Identity()
