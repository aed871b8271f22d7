"""The base of every loss module: logits or ``{"out", "aux"}`` deep-supervision outputs in, one loss out."""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn as nn

from maskworks.losses._utils import check_reduction

__all__ = ["SegLoss", "split_outputs"]


def split_outputs(output: torch.Tensor | dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(main_logits, aux_logits_list)`` from a tensor or an ``{"out", "aux"}`` dict."""
    if isinstance(output, torch.Tensor):
        return output, []
    if isinstance(output, dict) and "out" in output:
        return output["out"], list(output.get("aux", []))
    raise TypeError(f"expected logits tensor or dict with 'out' (and 'aux'), got {type(output).__name__}")


class SegLoss(nn.Module):
    """Subclasses implement ``loss(logits, target, **kwargs)``; ``forward`` adds ``aux_weight`` times the loss of
    each auxiliary output to the loss of the main output (extra keyword arguments reach every call).

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``"none"`` cannot combine auxiliary outputs).
        aux_weight: weight of each auxiliary output's loss.
    """

    def __init__(self, reduction: str = "mean", aux_weight: float = 0.4):
        super().__init__()
        self.reduction = check_reduction(reduction)
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self.aux_weight = aux_weight

    def register_class_weight(self, weight) -> None:
        """Store optional per-class weights as the (float32) buffer ``self.weight``; it follows ``.to(device)``."""
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    @abstractmethod
    def loss(self, logits: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        """The loss of one logits tensor."""

    def forward(self, output: torch.Tensor | dict, target: torch.Tensor, **kwargs) -> torch.Tensor:
        """Loss of the main output plus ``aux_weight`` times the loss of each auxiliary output.

        Args:
            output: logits ``(B, K, *spatial)`` or ``{"out": logits, "aux": [logits, ...]}``.
            target: the target of the main output.
            **kwargs: passed to :meth:`loss` (precomputed distance maps, weight maps, confidences...).

        Returns:
            The loss.
        """
        main, aux = split_outputs(output)
        if aux and self.reduction == "none":
            raise ValueError("reduction='none' cannot combine auxiliary outputs; use 'mean' or 'sum'")
        value = self.loss(main, target, **kwargs)
        for a in aux:
            value = value + self.aux_weight * self.loss(a, target, **kwargs)
        return value
