"""The :class:`Task` interface: what differs between kinds of segmentation output.

The trainer (:class:`maskworks.engine.Trainer`), ``maskworks train / eval / predict`` and the benchmarks never branch
on the kind of output. They hand batches to a task, which

* batches samples (:meth:`Task.collate`) and moves a batch to a device (:meth:`Task.to_device`),
* runs one training forward pass and returns its losses (:meth:`Task.training_step`: ``{"loss": total, parts...}``),
* runs one inference forward pass (:meth:`Task.forward`) whose outputs a streaming evaluator
  (:meth:`Task.evaluator`: ``update(outputs, batch) / compute() / reset() / all_reduce()``) scores, with one
  headline metric (:attr:`Task.headline`) that picks the best checkpoint,
* turns outputs into per-image results (:meth:`Task.postprocess`) and writes them (:meth:`Task.write`).

Everything else (optimizer, schedule, mixed precision, DDP, checkpoints, resume, NaN guard, logging, progress)
belongs to the trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

__all__ = ["Task", "Evaluator", "ImageListTask"]


class Evaluator(Protocol):
    """A streaming metric over a task's inference outputs."""

    def update(self, outputs: Any, batch: dict[str, Any]) -> None: ...

    def compute(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...

    def all_reduce(self) -> Evaluator: ...

    def __len__(self) -> int: ...


class Task(ABC):
    """Base class of the tasks (see the module docstring).

    Attributes:
        kind: ``"semantic"``, ``"instance"``, ... (the ``task`` of a model's registry entry).
        headline: key of :meth:`Evaluator.compute`'s result that chooses the best checkpoint (higher is better).
        headline_label: how logs print it (``"mIoU"``, ``"mask AP"``).
        channels_last: whether the trainer may run the model in ``torch.channels_last`` memory format.
    """

    kind: str = ""
    headline: str = ""
    headline_label: str = ""
    channels_last: bool = True

    # ------------------------------------------------------------------ batches
    @abstractmethod
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """DataLoader ``collate_fn``: a list of dataset samples -> one batch."""

    @abstractmethod
    def to_device(
        self, batch: dict[str, Any], device: torch.device, channels_last: bool = False, non_blocking: bool = False
    ) -> dict[str, Any]:
        """The batch with its tensors on ``device`` (images in ``channels_last`` layout when asked)."""

    @abstractmethod
    def num_images(self, batch: dict[str, Any]) -> int:
        """Number of images in a batch (for images-per-second)."""

    def to(self, device: torch.device) -> Task:
        """Move whatever the task holds (loss modules) to ``device``; returns ``self``."""
        return self

    # ------------------------------------------------------------------ model calls
    @abstractmethod
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One training forward pass: ``{"loss": total}`` plus named parts (logged as ``train_<name>``)."""

    @abstractmethod
    def forward(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """One inference forward pass on a batch (the model is in eval mode)."""

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def evaluator(self) -> Evaluator:
        """A fresh streaming evaluator of :meth:`forward`'s outputs."""

    @abstractmethod
    def history_row(self, metrics: dict[str, Any]) -> dict[str, float]:
        """The validation numbers of one epoch's log row (``val_*`` keys)."""

    # ------------------------------------------------------------------ results
    @abstractmethod
    def postprocess(self, outputs: Any, batch: dict[str, Any]) -> list[Any]:
        """Per-image results in the DESIGN.md output contract of the task."""

    @abstractmethod
    def write(
        self,
        results: Sequence[Any],
        out_dir: str | Path,
        names: Sequence[str | Path],
        images: Sequence[Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> list[Path]:
        """Write per-image results under ``out_dir`` (``names`` are relative output stems); returns the paths."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ImageListTask(Task):
    """A task whose batches hold images of any sizes as a list, with one dict of target tensors per image
    (``{"images": [...], "targets": [{...}], ...}``): instance and panoptic segmentation."""

    def to_device(
        self, batch: dict[str, Any], device: torch.device, channels_last: bool = False, non_blocking: bool = False
    ) -> dict[str, Any]:
        return {
            **batch,
            "images": [im.to(device, non_blocking=non_blocking) for im in batch["images"]],
            "targets": [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in batch["targets"]],
        }

    def num_images(self, batch: dict[str, Any]) -> int:
        return len(batch["images"])
