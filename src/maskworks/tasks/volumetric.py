"""Volumetric segmentation: logits ``(B, K, D, H, W)``, Dice + cross-entropy with nnU-Net's deep supervision,
sliding-window inference with Gaussian blending (and mirroring TTA), per-case Dice, NIfTI output.

Training batches are fixed-size patches (:class:`~maskworks.data.volume_transforms.RandomPatch`); validation and
prediction run on whole volumes, one at a time, window by window (:func:`~maskworks.inference.sliding_window`,
window = the training patch, overlap 0.5, Gaussian importance as nnU-Net).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from maskworks.data.volumes import collate_volumes
from maskworks.losses import split_outputs
from maskworks.metrics.confusion import check_finite
from maskworks.models.volumetric.dynunet import nnunet_ds_weights
from maskworks.tasks.base import Task

__all__ = ["VolumetricTask", "VolumetricEvaluator", "DiceCELoss", "dice_ce_loss", "mirror_tta"]


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    smooth: float = 1e-5,
    batch_dice: bool = True,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """nnU-Net's ``DC_and_CE_loss``: cross-entropy plus (1 - soft Dice) over the foreground classes.

    Soft Dice of the softmax with ``smooth`` added to numerator and denominator, over the batch as one volume
    (``batch_dice``, nnU-Net's default for 3D) or per volume then averaged; background excluded; ignored voxels
    count nowhere. nnU-Net adds ``-dice``; we add ``1 - dice`` (the same gradients, a loss that is 0 when perfect).
    """
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    k = logits.shape[1]
    probs = logits.float().softmax(1) * valid[:, None]
    onehot = F.one_hot(safe, k).movedim(-1, 1).float() * valid[:, None]
    dims = tuple(range(2, logits.ndim))
    if batch_dice:
        dims = (0,) + dims
    tp = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * tp + smooth) / (denom + smooth).clamp_min(1e-8)
    fg = dice[..., 1:] if k > 1 else dice
    return ce_weight * ce + dice_weight * (1.0 - fg.mean())


def _resize_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(target.shape[1:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


class DiceCELoss(nn.Module):
    """Dice + CE (:func:`dice_ce_loss`) on the main logits and, with deep supervision, on each lower-resolution
    output against the target downsampled (nearest) to its size, weighted by nnU-Net's
    :func:`~maskworks.models.volumetric.dynunet.nnunet_ds_weights` (``1/2**i``, the lowest resolution dropped,
    normalised)."""

    def __init__(
        self, ignore_index: int = 255, batch_dice: bool = True, dice_weight: float = 1.0, ce_weight: float = 1.0
    ):
        super().__init__()
        self.ignore_index, self.batch_dice = ignore_index, batch_dice
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def __repr__(self) -> str:
        return f"DiceCELoss(batch_dice={self.batch_dice}, dice_weight={self.dice_weight}, ce_weight={self.ce_weight})"

    def forward(self, output: torch.Tensor | dict, target: torch.Tensor) -> torch.Tensor:
        main, aux = split_outputs(output)
        outputs = [main, *aux]
        weights = nnunet_ds_weights(len(outputs))
        total = main.new_zeros((), dtype=torch.float32)
        for w, logits in zip(weights, outputs):
            if w == 0:
                continue
            t = _resize_target(target, logits.shape[2:])
            total = total + w * dice_ce_loss(
                logits, t, self.ignore_index, batch_dice=self.batch_dice,
                dice_weight=self.dice_weight, ce_weight=self.ce_weight,
            )  # fmt: skip
        return total


def mirror_tta(model: nn.Module, axes: Sequence[int] = (0, 1, 2)) -> Any:
    """nnU-Net's mirroring test-time augmentation: the mean of the logits over every combination of flips of
    ``axes`` (of ``(D, H, W)``; 8 passes for three axes), each flipped back."""
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def run(x: torch.Tensor) -> torch.Tensor:
        total = None
        for combo in combos:
            dims = [a + 2 for a in combo]
            y, _ = split_outputs(model(x.flip(dims) if dims else x))
            y = y.flip(dims) if dims else y
            total = y if total is None else total + y
        return total / len(combos)

    return run


class VolumetricEvaluator:
    """Per-case Dice of each foreground class (nnU-Net's validation numbers), averaged over the cases where the class
    is in the target or the prediction (a class absent from both is skipped for that case, not counted as 1).

    ``compute()`` -> ``{"dice": mean over classes, "dice_per_class": [...], "cases": n, "class_names": [...]}``.
    """

    def __init__(
        self, num_classes: int | None = None, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ):
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        self.rows: list[list[float]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def reset(self) -> None:
        self.rows = []

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        check_finite(outputs, "validation logits")
        k = self.num_classes or outputs.shape[1]
        self.num_classes = k
        pred = outputs.argmax(1)
        target = batch["mask"].to(pred.device)
        for p, t in zip(pred, target):
            valid = t != self.ignore_index
            row = []
            for c in range(1, k):
                pc, tc = (p == c) & valid, (t == c) & valid
                denom = int(pc.sum()) + int(tc.sum())
                row.append(float("nan") if denom == 0 else 2.0 * int((pc & tc).sum()) / denom)
            self.rows.append(row)

    def all_reduce(self) -> VolumetricEvaluator:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.rows)
            self.rows = [r for g in gathered for r in g]
        return self

    def compute(self) -> dict[str, Any]:
        if not self.rows:
            raise ValueError("nothing to evaluate: no volume was seen")
        table = np.array(self.rows, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            per_class = [float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in table.T]
        present = [d for d in per_class if np.isfinite(d)]
        names = list(self.class_names)[1:] if self.class_names else [f"class_{c}" for c in range(1, len(per_class) + 1)]
        return {
            "dice": float(np.mean(present)) if present else 0.0,
            "dice_per_class": per_class,
            "class_names": names,
            "cases": len(self.rows),
        }


class VolumetricTask(Task):
    """3D segmentation (see the module docstring).

    Args:
        patch_size: training patch ``(D, H, W)``; validation windows have this size.
        loss_fn: ``loss_fn(output, target)``; default :class:`DiceCELoss` (deep supervision aware).
        num_classes, ignore_index, class_names: the class space.
        overlap: sliding-window overlap at validation / prediction (nnU-Net: 0.5).
        mirror_axes: axes for mirroring TTA at prediction (``()`` none; nnU-Net mirrors all three).
        tta_in_validation: mirror during validation too (8x slower; nnU-Net's final validation does).
        window_batch: windows per forward pass.
    """

    kind = "volumetric"
    headline = "dice"
    headline_label = "Dice"
    channels_last = False

    def __init__(
        self,
        patch_size: Sequence[int] = (64, 64, 64),
        loss_fn: Any = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        overlap: float = 0.5,
        mirror_axes: Sequence[int] = (),
        tta_in_validation: bool = False,
        window_batch: int = 2,
    ):
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (D, H, W), got {tuple(patch_size)}")
        self.loss_fn = loss_fn if loss_fn is not None else DiceCELoss(ignore_index)
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        self.overlap, self.mirror_axes = overlap, tuple(mirror_axes)
        self.tta_in_validation, self.window_batch = tta_in_validation, window_batch

    def __repr__(self) -> str:
        return f"VolumetricTask(patch_size={self.patch_size}, loss_fn={self.loss_fn!r}, num_classes={self.num_classes})"

    def to(self, device: torch.device) -> VolumetricTask:
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn = self.loss_fn.to(device)
        return self

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_volumes(samples)

    def to_device(
        self, batch: dict[str, Any], device: torch.device, channels_last: bool = False, non_blocking: bool = False
    ) -> dict[str, Any]:
        out = dict(batch)
        out["image"] = batch["image"].to(device, non_blocking=non_blocking)
        if "mask" in batch:
            out["mask"] = batch["mask"].to(device, non_blocking=non_blocking)
        return out

    def num_images(self, batch: dict[str, Any]) -> int:
        return int(batch["image"].shape[0])

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_fn(model(batch["image"]), batch["mask"])}

    def predict_volume(self, model: nn.Module, image: torch.Tensor, mirror: bool | None = None, progress: bool = False):
        """Logits ``(B, K, D, H, W)`` of whole volumes by sliding window (Gaussian blending), mirrored when
        ``mirror`` (default: when ``mirror_axes`` is set)."""
        from maskworks.inference import sliding_window

        mirror = bool(self.mirror_axes) if mirror is None else mirror
        fn = mirror_tta(model, self.mirror_axes or (0, 1, 2)) if mirror else model
        return sliding_window(
            fn, image, self.patch_size, overlap=self.overlap, blend="gaussian", batch_size=self.window_batch,
            padding_mode="constant", channels_last=False, device=image.device, progress=progress,
        )  # fmt: skip

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.predict_volume(model, batch["image"], mirror=self.tta_in_validation and bool(self.mirror_axes))

    def evaluator(self) -> VolumetricEvaluator:
        return VolumetricEvaluator(self.num_classes, self.ignore_index, self.class_names)

    def history_row(self, metrics: dict[str, Any]) -> dict[str, float]:
        row = {"val_dice": metrics["dice"]}
        for name, d in zip(metrics["class_names"], metrics["dice_per_class"]):
            row[f"val_dice_{name}"] = d
        return row

    def postprocess(self, outputs: torch.Tensor, batch: dict[str, Any] | None = None) -> list[np.ndarray]:
        """Label volumes ``(D, H, W)`` (argmax) per volume."""
        check_finite(outputs, "the logits")
        return [p.cpu().numpy() for p in outputs.argmax(1)]

    def write(
        self,
        results: Sequence[np.ndarray],
        out_dir: str | Path,
        names: Sequence[str | Path],
        images: Sequence[Any] | None = None,
        meta: dict[str, Any] | None = None,
        infos: Sequence[Any] | None = None,
    ) -> list[Path]:
        """``<name>.nii.gz`` label volumes with the input's affine and header (``infos``: one
        :class:`~maskworks.data.volumes.VolumeInfo` per result; without it, the spacing in ``meta`` or 1 mm)."""
        from maskworks.data.volumes import VolumeInfo, write_nifti

        written = []
        for i, (pred, name) in enumerate(zip(results, names)):
            info = infos[i] if infos is not None else None
            if info is None:
                spacing = (meta or {}).get("spacing", (1.0, 1.0, 1.0))
                info = VolumeInfo.from_spacing(spacing, pred.shape)
            target = (
                Path(out_dir) / f"{Path(name).name}.nii.gz"
                if not str(name).endswith(".nii.gz")
                else Path(out_dir) / name
            )
            written.append(write_nifti(target, pred.astype(np.uint8 if pred.max() < 256 else np.int16), info))
        return written
