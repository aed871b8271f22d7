"""Co-teaching for segmentation with noisy labels (Han et al., NeurIPS 2018; seed Q55).

Two networks are trained at once. In every step each network ranks the labelled pixels by its own
cross-entropy, keeps the ``1 - R(T)`` fraction with the smallest loss (the pixels most likely to be
correctly labelled) and hands that selection to its *peer*, which is updated on those pixels only.
Because the two networks make different mistakes, each filters label noise for the other.

Forget-rate schedule (Han et al., Eq. 1 and the official code): the fraction of pixels dropped rises
from 0 to ``forget_rate`` over the first ``num_gradual`` epochs,
``R(T) = forget_rate * min((T / num_gradual) ** exponent, 1)``; ``exponent=1`` is the paper's
linear ramp. ``forget_rate`` should be about the label-noise rate.

Segmentation specifics:

* Pixels with ``ignore_index`` (255) are never candidates: their loss is not 0-and-therefore-clean
  (the seed's defect), they are removed before ranking and never counted.
* ``select="batch"`` ranks all labelled pixels of the batch together (small-loss pixels of easy
  images dominate); ``select="image"`` keeps the same fraction in every image.
* Each network has its own optimizer (sharing one would couple their updates).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from maskworks.losses import split_outputs

__all__ = ["CoTeaching", "coteaching_forget_rate", "small_loss_selection"]


def coteaching_forget_rate(epoch: float, forget_rate: float, num_gradual: int = 10, exponent: float = 1.0) -> float:
    """``R(T)``: the fraction of labelled pixels dropped at (0-based) ``epoch``."""
    if not 0 <= forget_rate < 1:
        raise ValueError(f"forget_rate must be in [0, 1), got {forget_rate}")
    if num_gradual < 0 or exponent <= 0:
        raise ValueError(f"num_gradual must be >= 0 and exponent > 0, got {num_gradual} and {exponent}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if num_gradual == 0:
        return float(forget_rate)
    return float(forget_rate * min((epoch / num_gradual) ** exponent, 1.0))


def small_loss_selection(loss: torch.Tensor, valid: torch.Tensor, keep: float, per_image: bool = False) -> torch.Tensor:
    """Boolean mask of the ``keep`` fraction of ``valid`` pixels with the smallest ``loss``.

    Args:
        loss: per-pixel losses ``(B, H, W)``.
        valid: boolean ``(B, H, W)``, the labelled pixels (the only candidates).
        keep: fraction in ``[0, 1]`` to keep; the count is ``round(keep * n_valid)``, at least 1 when any
            pixel is valid and ``keep > 0``.
        per_image: rank within each image instead of over the whole batch.
    """
    if not 0 <= keep <= 1:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    if per_image:
        return torch.stack([small_loss_selection(lo, va, keep) for lo, va in zip(loss, valid)])
    flat_loss, flat_valid = loss.reshape(-1), valid.reshape(-1)
    n_valid = int(flat_valid.sum())
    k = min(n_valid, max(1, round(keep * n_valid))) if (n_valid and keep > 0) else 0
    selected = torch.zeros_like(flat_valid)
    if k:
        masked = flat_loss.detach().masked_fill(~flat_valid, math.inf)
        selected[torch.topk(masked, k, largest=False, sorted=False).indices] = True
    return selected.view_as(valid)


class CoTeaching:
    """Train two segmentation networks with co-teaching.

    Args:
        model1: first network (returns logits ``(B, K, H, W)`` or ``{"out": ...}``).
        model2: second network, same task (typically the same architecture, different initialisation).
        optimizer1: optimizer of ``model1`` only.
        optimizer2: optimizer of ``model2`` only.
        forget_rate: final fraction of labelled pixels dropped (about the noise rate).
        num_gradual: epochs over which the forget rate ramps up from 0 (Han et al.: 10).
        exponent: shape of the ramp (1 = linear).
        ignore_index: label of unlabelled pixels.
        select: ``"batch"`` or ``"image"`` (see the module docstring).

    Call :meth:`set_epoch` at the start of every epoch (``fit`` does), then :meth:`train_step` per batch.
    """

    def __init__(
        self,
        model1: nn.Module,
        model2: nn.Module,
        optimizer1: torch.optim.Optimizer,
        optimizer2: torch.optim.Optimizer,
        forget_rate: float = 0.2,
        num_gradual: int = 10,
        exponent: float = 1.0,
        ignore_index: int = 255,
        select: str = "batch",
    ) -> None:
        if model1 is model2:
            raise ValueError("model1 and model2 must be two different networks")
        if optimizer1 is optimizer2:
            raise ValueError("each network needs its own optimizer; got the same optimizer twice")
        if select not in ("batch", "image"):
            raise ValueError(f"select must be 'batch' or 'image', got {select!r}")
        ids1 = {id(p) for g in optimizer1.param_groups for p in g["params"]}
        ids2 = {id(p) for g in optimizer2.param_groups for p in g["params"]}
        if ids1 & {id(p) for p in model2.parameters()} or ids2 & {id(p) for p in model1.parameters()}:
            raise ValueError("optimizer1 must hold model1's parameters and optimizer2 model2's, not the peer's")
        coteaching_forget_rate(0, forget_rate, num_gradual, exponent)  # validates the schedule options
        self.model1, self.model2 = model1, model2
        self.optimizer1, self.optimizer2 = optimizer1, optimizer2
        self.forget_rate, self.num_gradual, self.exponent = float(forget_rate), int(num_gradual), float(exponent)
        self.ignore_index, self.select = int(ignore_index), select
        self.epoch = 0

    @property
    def current_forget_rate(self) -> float:
        return coteaching_forget_rate(self.epoch, self.forget_rate, self.num_gradual, self.exponent)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _pixel_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in size; the model must "
                f"return logits at the target resolution"
            )
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")

    def train_step(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """One co-teaching update of both networks; returns their losses and the kept fraction."""
        self.model1.train()
        self.model2.train()
        logits1, _ = split_outputs(self.model1(images))
        logits2, _ = split_outputs(self.model2(images))
        ce1, ce2 = self._pixel_ce(logits1, target), self._pixel_ce(logits2, target)
        valid = target != self.ignore_index
        keep = 1.0 - self.current_forget_rate
        per_image = self.select == "image"
        chosen_by_1 = small_loss_selection(ce1, valid, keep, per_image)  # model 1's clean pixels -> train model 2
        chosen_by_2 = small_loss_selection(ce2, valid, keep, per_image)
        loss1 = (ce1 * chosen_by_2).sum() / chosen_by_2.sum().clamp_min(1)
        loss2 = (ce2 * chosen_by_1).sum() / chosen_by_1.sum().clamp_min(1)
        for opt, loss in ((self.optimizer1, loss1), (self.optimizer2, loss2)):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        n_valid = int(valid.sum())
        return {
            "loss1": float(loss1.detach()),
            "loss2": float(loss2.detach()),
            "kept_fraction": float(chosen_by_1.sum()) / max(n_valid, 1),
            "selection_agreement": float((chosen_by_1 & chosen_by_2).sum()) / max(int(chosen_by_1.sum()), 1),
            "forget_rate": 1.0 - keep,
        }

    def fit(
        self, loader: Iterable[dict[str, Any]], epochs: int, device: str | torch.device = "cpu", progress: bool = True
    ) -> list[dict[str, float]]:
        """Train for ``epochs`` over batches ``{"image", "mask"}`` (a maskworks DataLoader); returns per-epoch means."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        device = torch.device(device)
        self.model1.to(device)
        self.model2.to(device)
        history = []
        for epoch in range(self.epoch, self.epoch + epochs):
            self.set_epoch(epoch)
            sums: dict[str, float] = {}
            n = 0
            bar = tqdm(loader, desc=f"co-teaching epoch {epoch}", disable=not progress, leave=False)
            for batch in bar:
                row = self.train_step(batch["image"].to(device), batch["mask"].to(device))
                for key, value in row.items():
                    sums[key] = sums.get(key, 0.0) + value
                n += 1
                bar.set_postfix(
                    loss1=f"{row['loss1']:.3f}", loss2=f"{row['loss2']:.3f}", keep=f"{row['kept_fraction']:.2f}"
                )
            if n == 0:
                raise ValueError("the loader yielded no batches")
            history.append({"epoch": epoch, **{k: v / n for k, v in sums.items()}})
        self.set_epoch(self.epoch + 1)  # a later fit() continues the schedule
        return history
