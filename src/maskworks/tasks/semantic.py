"""Semantic segmentation: logits ``(B, K, H, W)`` in, a loss on ``(B, H, W)`` class ids, confusion-matrix metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from maskworks.data import collate_samples
from maskworks.losses import CrossEntropyLoss, split_outputs
from maskworks.metrics import ConfusionMatrix
from maskworks.metrics.confusion import check_finite
from maskworks.tasks.base import Task

__all__ = ["SemanticTask", "SemanticEvaluator"]


class SemanticEvaluator:
    """Confusion-matrix metrics of semantic logits (mIoU, pixel / mean accuracy, Dice ...).

    Args:
        num_classes: classes of the matrix; by default ``max(2, K)`` of the first logits seen.
        ignore_index: label value left out of the matrix.
        class_names: optional names for per-class results.
    """

    def __init__(
        self, num_classes: int | None = None, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ):
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        self.confusion: ConfusionMatrix | None = None

    def __len__(self) -> int:
        return 0 if self.confusion is None else 1

    def reset(self) -> None:
        self.confusion = None

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        logits = outputs
        if self.confusion is None:
            k = self.num_classes or max(2, logits.shape[1])
            kwargs = {"class_names": list(self.class_names)} if self.class_names else {}
            self.confusion = ConfusionMatrix(k, ignore_index=self.ignore_index, device=logits.device, **kwargs)
        check_finite(logits, "validation logits")  # argmax would count NaN as class 0
        pred = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
        self.confusion.update(pred, batch["mask"].to(logits.device))

    def all_reduce(self) -> SemanticEvaluator:
        if self.confusion is not None:
            self.confusion.all_reduce()
        return self

    def compute(self) -> dict[str, Any]:
        if self.confusion is None:
            raise ValueError("nothing to evaluate: no batch was seen")
        return self.confusion.compute()


class SemanticTask(Task):
    """Per-pixel classification: models return logits ``(B, K, H, W)`` (or ``{"out", "aux"}`` in training).

    Args:
        loss_fn: ``loss_fn(output, target)``; default cross-entropy with ``ignore_index``.
        num_classes: classes of the validation confusion matrix (default: from the logits, at least 2).
        ignore_index: label value ignored by the loss and the metrics.
        class_names: names for per-class results.
    """

    kind = "semantic"
    headline = "miou"
    headline_label = "mIoU"

    def __init__(
        self,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ):
        self.loss_fn = loss_fn if loss_fn is not None else CrossEntropyLoss(ignore_index=ignore_index)
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names

    def __repr__(self) -> str:
        return f"SemanticTask(loss_fn={self.loss_fn!r}, num_classes={self.num_classes})"

    def to(self, device: torch.device) -> SemanticTask:
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn = self.loss_fn.to(device)
        return self

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)

    def to_device(
        self, batch: dict[str, Any], device: torch.device, channels_last: bool = False, non_blocking: bool = False
    ) -> dict[str, Any]:
        out = dict(batch)
        image = batch["image"]
        layout = {"memory_format": torch.channels_last} if channels_last and image.ndim == 4 else {}
        out["image"] = image.to(device, non_blocking=non_blocking, **layout)
        if "mask" in batch:
            out["mask"] = batch["mask"].to(device, non_blocking=non_blocking)
        return out

    def num_images(self, batch: dict[str, Any]) -> int:
        return int(batch["image"].shape[0])

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if getattr(getattr(model, "module", model), "set_prediction", False):
            # a set-prediction model (Mask2Former) matches its own segments: it gets the maps and returns its losses
            losses = model(batch["image"], [{"semantic": m} for m in batch["mask"]])
            return {"loss": sum(losses.values()), **losses}
        output = model(batch["image"])
        return {"loss": self.loss_fn(output, batch["mask"])}

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        logits, _ = split_outputs(model(batch["image"]))
        return logits

    def evaluator(self) -> SemanticEvaluator:
        return SemanticEvaluator(self.num_classes, self.ignore_index, self.class_names)

    def history_row(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {
            "val_miou": metrics["miou"],
            "val_pixel_acc": metrics["pixel_acc"],
            "val_mean_acc": metrics["mean_acc"],
            "val_mdice": metrics["mdice"],
        }

    def postprocess(self, outputs: torch.Tensor, batch: dict[str, Any] | None = None) -> list[np.ndarray]:
        """Label maps ``(H, W)`` int64 per image (argmax; a one-channel binary output thresholds at logit 0)."""
        check_finite(outputs, "the logits")
        pred = outputs.argmax(1) if outputs.shape[1] > 1 else (outputs[:, 0] > 0).long()
        return [p.cpu().numpy() for p in pred]

    def write(
        self,
        results: Sequence[np.ndarray],
        out_dir: str | Path,
        names: Sequence[str | Path],
        images: Sequence[np.ndarray] | None = None,
        meta: dict[str, Any] | None = None,
        overlay: bool = True,
        alpha: float = 0.5,
    ) -> list[Path]:
        """``<name>_label.png`` (palette PNG of class ids) and, with ``images`` (uint8 RGB) and ``overlay``,
        ``<name>_overlay.png`` per result."""
        from maskworks.viz import default_palette, save_label_png, save_rgb_png
        from maskworks.viz import overlay as blend

        meta = meta or {}
        k = int(meta.get("num_classes") or max(2, max((int(r.max()) + 1 for r in results), default=2)))
        palette = [tuple(c) for c in meta.get("palette") or default_palette(max(k, 2))]
        written = []
        for i, (pred, name) in enumerate(zip(results, names)):
            target = Path(out_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(save_label_png(pred, target.with_name(f"{target.name}_label.png"), palette))
            if overlay and images is not None:
                path = target.with_name(f"{target.name}_overlay.png")
                written.append(save_rgb_png(blend(images[i], pred, palette, alpha=alpha), path))
        return written
