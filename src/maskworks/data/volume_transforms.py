"""3D augmentation and patch sampling on volume samples ``{"image": (C, D, H, W) float, "mask": (D, H, W) int64}``.

nnU-Net's training pipeline, in PyTorch: foreground-oversampled patches (:class:`RandomPatch`), rotation and
scaling (:class:`RandomAffine3D`), elastic deformation (:class:`RandomElastic3D`), gamma (:class:`RandomGamma`),
low-resolution simulation (:class:`SimulateLowResolution`) and mirroring (:class:`RandomMirror`). Spatial transforms
move image and mask together: images are interpolated (trilinear), masks take the nearest label, so no fractional
or invented labels appear; voxels pulled from outside the volume are background in the mask (0) and the image's
border value. Randomness comes from ``torch``'s global generator (DataLoader workers seed it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from maskworks.data.io import IGNORE_INDEX

__all__ = [
    "VolumeCompose",
    "RandomPatch",
    "RandomMirror",
    "RandomAffine3D",
    "RandomElastic3D",
    "RandomGamma",
    "SimulateLowResolution",
    "nnunet_augmentation",
]

Sample = dict[str, Any]


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    v = (value,) * 3 if isinstance(value, int) else tuple(int(x) for x in value)
    if len(v) != 3 or min(v) < 1:
        raise ValueError(f"{name} must be one positive int or three (D, H, W), got {value!r}")
    return v  # type: ignore[return-value]


class VolumeCompose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"VolumeCompose({self.transforms!r})"


class RandomPatch:
    """A random ``patch_size`` crop; a volume smaller than the patch is padded (images with 0, the mean after
    z-scoring, masks with background, as nnU-Net does).

    With probability ``foreground_prob`` (nnU-Net: 0.33) the patch is centred on a voxel of a random foreground
    class present in the volume, so small structures are seen often enough.

    Args:
        patch_size: ``(D, H, W)`` or one int.
        foreground_prob: probability of a foreground-centred patch.
        ignore_index: label never chosen as foreground.
    """

    def __init__(
        self, patch_size: int | Sequence[int], foreground_prob: float = 0.33, ignore_index: int = IGNORE_INDEX
    ):
        if not 0.0 <= foreground_prob <= 1.0:
            raise ValueError(f"foreground_prob must be in [0, 1], got {foreground_prob}")
        self.patch_size = _triple(patch_size, "patch_size")
        self.foreground_prob, self.ignore_index = foreground_prob, ignore_index

    def __repr__(self) -> str:
        return f"RandomPatch(patch_size={self.patch_size}, foreground_prob={self.foreground_prob})"

    def __call__(self, sample: Sample) -> Sample:
        image, mask = sample["image"], sample.get("mask")
        size = image.shape[1:]
        pad = [max(p - s, 0) for p, s in zip(self.patch_size, size)]
        if any(pad):
            spec = []
            for p in reversed(pad):
                spec += [p // 2, p - p // 2]
            image = F.pad(image, spec, value=0.0)
            if mask is not None:
                mask = F.pad(mask, spec, value=0)
            size = image.shape[1:]
        centre = None
        if mask is not None and float(torch.rand(())) < self.foreground_prob:
            classes = [int(c) for c in torch.unique(mask) if 0 < int(c) != self.ignore_index]
            if classes:
                cls = classes[int(torch.randint(len(classes), ()))]
                voxels = (mask == cls).nonzero()
                centre = voxels[int(torch.randint(len(voxels), ()))].tolist()
        starts = []
        for axis, (s, p) in enumerate(zip(size, self.patch_size)):
            hi = s - p
            if centre is None:
                starts.append(int(torch.randint(hi + 1, ())))
            else:
                starts.append(min(max(centre[axis] - p // 2, 0), hi))
        region = tuple(slice(a, a + p) for a, p in zip(starts, self.patch_size))
        out = dict(sample)
        out["image"] = image[(slice(None),) + region].contiguous()
        if mask is not None:
            out["mask"] = mask[region].contiguous()
        return out


class RandomMirror:
    """Flip each of ``axes`` (of ``(D, H, W)``: 0, 1, 2) with probability ``p`` (image and mask together)."""

    def __init__(self, axes: Sequence[int] = (0, 1, 2), p: float = 0.5):
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"axes must be among 0, 1, 2 (D, H, W), got {tuple(axes)}")
        self.axes, self.p = tuple(axes), p

    def __repr__(self) -> str:
        return f"RandomMirror(axes={self.axes}, p={self.p})"

    def __call__(self, sample: Sample) -> Sample:
        flip = [a for a in self.axes if float(torch.rand(())) < self.p]
        if not flip:
            return sample
        out = dict(sample)
        out["image"] = sample["image"].flip([a + 1 for a in flip])
        if "mask" in sample:
            out["mask"] = sample["mask"].flip(flip)
        return out


def _warp(sample: Sample, grid: torch.Tensor) -> Sample:
    """Resample image (trilinear, border values) and mask (nearest, background outside) on ``grid``
    ``(1, D, H, W, 3)`` in ``grid_sample``'s normalised ``(x, y, z)`` coordinates."""
    out = dict(sample)
    image = sample["image"]
    out["image"] = F.grid_sample(image[None], grid.to(image.dtype), mode="bilinear", padding_mode="border",
                                 align_corners=False)[0]  # fmt: skip
    if "mask" in sample:
        mask = sample["mask"]
        # nearest sampling of label + 1, so that 0 marks "outside" and becomes background
        warped = F.grid_sample((mask[None, None] + 1).float(), grid.float(), mode="nearest", padding_mode="zeros",
                               align_corners=False)[0, 0].long()  # fmt: skip
        out["mask"] = torch.where(warped == 0, torch.zeros_like(warped), warped - 1)
    return out


def _identity_grid(shape: Sequence[int]) -> torch.Tensor:
    """``(D, H, W, 3)`` normalised ``(x, y, z)`` voxel-centre coordinates (``align_corners=False``)."""
    axes = [(torch.arange(s, dtype=torch.float32) * 2 + 1) / s - 1 for s in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], -1)


class RandomAffine3D:
    """Rotation about each axis and isotropic scaling about the volume centre (nnU-Net: rotation in
    +-30 degrees, scaling 0.7-1.4, each with probability 0.2).

    Rotation happens in millimetres when ``spacing`` is in the sample's meta, so an anisotropic volume is not sheared.

    Args:
        degrees: largest rotation angle about each axis.
        scale: ``(lo, hi)`` scale factors (> 1 zooms in).
        p_rotate, p_scale: probabilities of rotating and of scaling.
        axes: rotation axes among 0, 1, 2 (D, H, W); ``(0,)`` rotates in-plane only (anisotropic data).
    """

    def __init__(
        self,
        degrees: float = 30.0,
        scale: tuple[float, float] = (0.7, 1.4),
        p_rotate: float = 0.2,
        p_scale: float = 0.2,
        axes: Sequence[int] = (0, 1, 2),
    ):
        if scale[0] <= 0 or scale[1] < scale[0]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {scale}")
        self.degrees, self.scale, self.p_rotate, self.p_scale, self.axes = (
            degrees,
            scale,
            p_rotate,
            p_scale,
            tuple(axes),
        )

    def __repr__(self) -> str:
        return f"RandomAffine3D(degrees={self.degrees}, scale={self.scale})"

    def __call__(self, sample: Sample) -> Sample:
        rotate = float(torch.rand(())) < self.p_rotate
        zoom = float(torch.rand(())) < self.p_scale
        if not (rotate or zoom):
            return sample
        shape = sample["image"].shape[1:]
        spacing = torch.tensor((sample.get("meta") or {}).get("spacing", (1.0, 1.0, 1.0)), dtype=torch.float32)
        extent = torch.tensor(shape, dtype=torch.float32) * spacing  # (D, H, W) in mm
        rot = torch.eye(3)
        if rotate:
            for axis in self.axes:  # rotation about axis `axis` of (D, H, W) acts on the other two
                a = math.radians(_uniform(-self.degrees, self.degrees))
                r = torch.eye(3)
                i, j = [k for k in range(3) if k != axis]
                r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
                rot = r @ rot
        s = _uniform(*self.scale) if zoom else 1.0
        grid = _identity_grid(shape)[..., [2, 1, 0]] * (extent / 2)  # (D, H, W, 3) as (d, h, w) in mm
        grid = (grid @ rot.T) / s / (extent / 2)
        return _warp(sample, grid[..., [2, 1, 0]][None])


class RandomElastic3D:
    """Elastic deformation: a random displacement field, Gaussian-smoothed (``sigma`` voxels) and scaled to at most
    about ``magnitude`` voxels (Simard et al.; nnU-Net keeps it off by default, with probability 0.2 when used).

    Args:
        magnitude: displacement scale in voxels.
        sigma: Gaussian smoothing of the field in voxels.
        p: probability.
    """

    def __init__(self, magnitude: float = 4.0, sigma: float = 4.0, p: float = 0.2):
        self.magnitude, self.sigma, self.p = magnitude, sigma, p

    def __repr__(self) -> str:
        return f"RandomElastic3D(magnitude={self.magnitude}, sigma={self.sigma}, p={self.p})"

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        shape = sample["image"].shape[1:]
        field = torch.randn(1, 3, *shape)
        radius = max(1, int(round(3 * self.sigma)))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (t / self.sigma) ** 2)
        kernel = kernel / kernel.sum()
        for axis in range(3):  # separable Gaussian, each of the three components alike
            k = kernel.view(1, 1, *[-1 if a == axis else 1 for a in range(3)]).repeat(3, 1, 1, 1, 1)
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            field = F.conv3d(F.pad(field, pad, mode="replicate"), k, groups=3)
        field = field / field.abs().amax().clamp_min(1e-8) * self.magnitude  # voxels
        scale = torch.tensor([2.0 / s for s in shape])  # voxels -> normalised units per (d, h, w)
        disp = field[0].permute(1, 2, 3, 0) * scale  # (D, H, W, 3) as (d, h, w)
        grid = _identity_grid(shape) + disp[..., [2, 1, 0]]
        return _warp(sample, grid[None])


class RandomGamma:
    """Gamma on the intensity range of each channel: ``x -> (x - min) / range) ** gamma * range + min`` with
    ``gamma`` in ``gamma_range``, mean and std kept (nnU-Net: 0.7-1.5, probability 0.3, and 0.1 on the inverted
    image)."""

    def __init__(self, gamma_range: tuple[float, float] = (0.7, 1.5), p: float = 0.3, p_invert: float = 0.1):
        if gamma_range[0] <= 0 or gamma_range[1] < gamma_range[0]:
            raise ValueError(f"gamma_range must be (lo, hi) with 0 < lo <= hi, got {gamma_range}")
        self.gamma_range, self.p, self.p_invert = gamma_range, p, p_invert

    def __repr__(self) -> str:
        return f"RandomGamma(gamma_range={self.gamma_range}, p={self.p})"

    def _apply(self, x: torch.Tensor, gamma: float) -> torch.Tensor:
        mean, std = x.mean(), x.std(unbiased=False)
        lo, hi = x.amin(), x.amax()
        rng = (hi - lo).clamp_min(1e-7)
        y = ((x - lo) / rng) ** gamma * rng + lo
        return (y - y.mean()) / y.std(unbiased=False).clamp_min(1e-8) * std + mean

    def __call__(self, sample: Sample) -> Sample:
        invert = float(torch.rand(())) < self.p_invert
        apply = invert or float(torch.rand(())) < self.p
        if not apply:
            return sample
        image = sample["image"].clone()
        for c in range(image.shape[0]):
            lo, hi = self.gamma_range
            gamma = _uniform(lo, 1.0) if float(torch.rand(())) < 0.5 and lo < 1 else _uniform(max(lo, 1.0), hi)
            x = -image[c] if invert else image[c]
            y = self._apply(x, gamma)
            image[c] = -y if invert else y
        return {**sample, "image": image}


class SimulateLowResolution:
    """Downsample the image by a random factor in ``zoom_range`` (nearest) and upsample it back (cubic in
    nnU-Net; trilinear here), simulating thicker slices or a coarser scanner; the mask is unchanged."""

    def __init__(self, zoom_range: tuple[float, float] = (0.5, 1.0), p: float = 0.25, axes: Sequence[int] = (0, 1, 2)):
        if not 0 < zoom_range[0] <= zoom_range[1] <= 1:
            raise ValueError(f"zoom_range must be (lo, hi) in (0, 1], got {zoom_range}")
        self.zoom_range, self.p, self.axes = zoom_range, p, tuple(axes)

    def __repr__(self) -> str:
        return f"SimulateLowResolution(zoom_range={self.zoom_range}, p={self.p})"

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        image = sample["image"]
        shape = image.shape[1:]
        zoom = _uniform(*self.zoom_range)
        small = [max(1, round(s * zoom)) if a in self.axes else s for a, s in enumerate(shape)]
        low = F.interpolate(image[None], size=small, mode="nearest-exact")
        back = F.interpolate(low, size=tuple(shape), mode="trilinear", align_corners=False)[0]
        return {**sample, "image": back}


def nnunet_augmentation(
    patch_size: int | Sequence[int], anisotropic: bool = False, elastic: bool = False, foreground_prob: float = 0.33
) -> VolumeCompose:
    """The training pipeline of nnU-Net's defaults: patch (foreground-oversampled), rotation / scaling (in-plane
    only when ``anisotropic``), optional elastic deformation, low-resolution simulation, gamma, mirroring."""
    steps: list[Callable[[Sample], Sample]] = [
        RandomPatch(patch_size, foreground_prob),
        RandomAffine3D(axes=(0,) if anisotropic else (0, 1, 2)),
    ]
    if elastic:
        steps.append(RandomElastic3D())
    steps += [SimulateLowResolution(axes=(1, 2) if anisotropic else (0, 1, 2)), RandomGamma(), RandomMirror()]
    return VolumeCompose(steps)
