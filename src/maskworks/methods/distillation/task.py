"""Training a semantic student with a frozen teacher: :class:`DistillationTask`, the semantic task plus a
distillation term, run by the one trainer (``maskworks train --set distill.teacher=CHECKPOINT --set
distill.kind=cwd``).

``loss = (1 - alpha) * task_loss(student, labels) + alpha * kd`` where ``kd`` is one of

- ``"pixel"``: :class:`~maskworks.methods.distillation.PixelKD` on the logits (``T^2`` KL per pixel, ignored pixels
  left out);
- ``"cwd"``: :class:`~maskworks.methods.distillation.ChannelWiseKD` on the logits (per-class spatial softmax);
- ``"pairwise"``: :class:`~maskworks.methods.distillation.PairwiseKD` on the encoders' last feature maps;
- ``"feature"``: :class:`~maskworks.methods.distillation.FeatureKD` on the encoders' last feature maps, through a
  1x1 adapter that is trained with the student (the task's :meth:`parameters`, which the trainer optimises and
  checkpoints).

The teacher runs in eval mode under ``torch.no_grad()`` on the same (augmented) batch, is never a registered module
of anything the optimizer sees, and its parameters are frozen. Features are taken with forward hooks in the same
forward pass as the logits (no second pass).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from maskworks.losses import split_outputs
from maskworks.methods.distillation.deit import _FrozenHolder
from maskworks.methods.distillation.segmentation import distillation_loss
from maskworks.tasks.semantic import SemanticTask

__all__ = ["KINDS", "DistillationTask"]

KINDS = ("pixel", "cwd", "pairwise", "feature")
_FEATURE_KINDS = ("pairwise", "feature")


def _feature_module(model: nn.Module, role: str) -> nn.Module:
    """The module whose output is the distilled feature map: the last stage of the model's ``encoder`` (or
    ``backbone``; its ``feature_info``), the encoder itself, or for an encoder kept as a list of stages (the original
    U-Net) its ``bottleneck``."""
    for name in ("encoder", "backbone", "bottleneck"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            info = getattr(module, "feature_info", None)  # backbones run by forward_intermediates: hook the stage
            if isinstance(info, (list, tuple)) and info and isinstance(info[-1], dict) and info[-1].get("module"):
                return module.get_submodule(info[-1]["module"])
            return module
    raise ValueError(
        f"feature distillation needs the {role} to have an `encoder`, `backbone` or `bottleneck` submodule whose "
        f"last feature map is distilled; {type(model).__name__} has none (use distill.kind=pixel or cwd)"
    )


def _last_map(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        maps = [t for t in output if isinstance(t, torch.Tensor) and t.ndim == 4]
        if maps:
            return maps[-1]
    raise TypeError(f"cannot find a (B, C, H, W) feature map in the encoder's output {type(output).__name__}")


class _Capture:
    """Keeps the last output of a module (a forward hook), for the duration of a ``with`` block."""

    def __init__(self, module: nn.Module):
        self.module, self.value, self.handle = module, None, None

    def __enter__(self) -> _Capture:
        self.handle = self.module.register_forward_hook(lambda _m, _i, out: setattr(self, "value", _last_map(out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class DistillationTask(SemanticTask):
    """The semantic task with knowledge distillation from a frozen teacher (see the module docstring).

    Args:
        teacher: the teacher network (same classes as the student for the logit kinds); frozen here.
        kind: ``"pixel"``, ``"cwd"``, ``"pairwise"`` or ``"feature"``.
        alpha: weight of the distillation term in ``[0, 1]``.
        temperature: ``T`` of ``pixel`` / ``cwd``.
        student: the student, needed for ``"feature"`` (the adapter's channels come from one dry forward pass).
        example_input: the dry pass's input (default ``(1, 3, 64, 64)`` noise).
        loss_fn, num_classes, ignore_index, class_names: as :class:`~maskworks.tasks.SemanticTask`.

    Raises:
        ValueError: an unknown kind, ``alpha`` outside ``[0, 1]``, ``"feature"`` without a student, or a model
            without an encoder for the feature kinds.
    """

    def __init__(
        self,
        teacher: nn.Module,
        kind: str = "pixel",
        alpha: float = 0.5,
        temperature: float = 4.0,
        student: nn.Module | None = None,
        example_input: torch.Tensor | None = None,
        loss_fn: Any = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names: Any = None,
    ):
        super().__init__(loss_fn, num_classes=num_classes, ignore_index=ignore_index, class_names=class_names)
        if kind not in KINDS:
            raise ValueError(f"distill.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        self.kind, self.alpha = kind, float(alpha)
        teacher.requires_grad_(False)
        teacher.eval()
        self._teacher = _FrozenHolder(teacher)
        if kind == "pixel":
            self.kd = distillation_loss("pixel", temperature=temperature, ignore_index=ignore_index)
        elif kind == "cwd":
            self.kd = distillation_loss("cwd", temperature=temperature)
        elif kind == "pairwise":
            self.kd = distillation_loss("pairwise")
            _feature_module(teacher, "teacher")
        else:
            if student is None:
                raise ValueError("distill.kind=feature needs the student to size its 1x1 adapter")
            x = example_input if example_input is not None else torch.randn(1, 3, 64, 64)
            channels = []
            for model, role in ((student, "student"), (teacher, "teacher")):
                was = model.training
                model.eval()
                try:
                    with torch.no_grad(), _Capture(_feature_module(model, role)) as cap:
                        model(x.to(next(model.parameters()).device))
                finally:
                    model.train(was)
                channels.append(cap.value.shape[1])
            self.kd = distillation_loss("feature", student_channels=channels[0], teacher_channels=channels[1])

    def __repr__(self) -> str:
        return f"DistillationTask(kind={self.kind!r}, alpha={self.alpha}, kd={self.kd!r})"

    @property
    def teacher(self) -> nn.Module:
        return self._teacher.module

    # the task's own trainable state (FeatureKD's adapters): optimised and checkpointed by the trainer
    def parameters(self):
        return self.kd.parameters()

    def state_dict(self) -> dict[str, Any]:
        return self.kd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kd.load_state_dict(state)

    def to(self, device: torch.device) -> DistillationTask:
        super().to(device)
        self.kd.to(device)
        self.teacher.to(device)
        return self

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, mask = batch["image"], batch["mask"]
        features = self.kind in _FEATURE_KINDS
        plain = getattr(model, "module", model)  # under DDP the hook goes on the wrapped model
        teacher = self.teacher
        teacher.eval()  # the trainer's model.train() never reaches it; keep BatchNorm statistics fixed
        if features:
            with _Capture(_feature_module(plain, "student")) as s_cap:
                output = model(image)
            with torch.no_grad(), _Capture(_feature_module(teacher, "teacher")) as t_cap:
                t_logits, _ = split_outputs(teacher(image))
            kd = self.kd(s_cap.value, t_cap.value)
        else:
            output = model(image)
            with torch.no_grad():
                t_logits, _ = split_outputs(teacher(image))
            s_logits, _ = split_outputs(output)
            kd = self.kd(s_logits, t_logits, mask) if self.kind == "pixel" else self.kd(s_logits, t_logits)
        task_loss = self.loss_fn(output, mask)
        loss = (1.0 - self.alpha) * task_loss + self.alpha * kd
        return {"loss": loss, "task": task_loss.detach(), "kd": kd.detach()}
