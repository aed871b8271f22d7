"""Predictive uncertainty for semantic segmentation: MC dropout, deep ensembles, TTA spread, temperature scaling.

Sampling methods draw ``S`` probability maps ``p_1..p_S`` for each pixel (dropout masks, ensemble members or
test-time transforms) and report the standard decomposition (Houlsby et al. 2011, "BALD"; Depeweg et al. 2018;
Gal 2016, section 3.3):

* ``entropy`` (total): the predictive entropy ``H[mean_s p_s]``;
* ``expected_entropy`` (aleatoric): ``mean_s H[p_s]``;
* ``mutual_information`` (epistemic, BALD): ``H[mean_s p_s] - mean_s H[p_s] >= 0``;
* ``variance``: the variance of the probabilities across samples (divided by ``S``), averaged over classes.

Entropies use the natural log, with ``0 log 0 = 0``. With ``activation="sigmoid"`` every channel is an
independent binary (or multi-label) prediction and the entropies are sums of per-channel binary entropies.

* :func:`mc_dropout` (Gal & Ghahramani 2016) puts **only** the dropout modules in train mode; BatchNorm and every
  other module stay in eval mode, so running statistics are never touched, and each module's mode is restored
  afterwards, also when the model raises.
* :func:`ensemble` (Lakshminarayanan et al. 2017) takes trained models or checkpoint paths, loaded one at a time.
* :func:`tta_uncertainty` uses the spread over test-time augmentations (Wang et al. 2019).
* :class:`TemperatureScaling` (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the logits
  by one positive temperature fitted by minimising the NLL on held-out pixels.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.checkpoint import load_model
from maskworks.inference.tta import (
    TTATransform,
    _activate,
    _check_activation,
    _check_image,
    _check_model_and_image,
    iter_tta,
)
from maskworks.losses import split_outputs

__all__ = [
    "DROPOUT_TYPES",
    "TemperatureScaling",
    "ensemble",
    "entropy_map",
    "mc_dropout",
    "mc_dropout_mode",
    "mutual_information",
    "tta_uncertainty",
]

logger = logging.getLogger(__name__)

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

_MISSING = ("warn", "raise", "ignore")


# --------------------------------------------------------------------------- entropy and mutual information


def _entropy(p: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Per-pixel entropy of probabilities ``p`` ``(B, K, *S)`` over dim 1, no input checks."""
    p = p.clamp(0, 1)
    if multilabel:
        q = 1 - p
        return -(torch.xlogy(p, p) + torch.xlogy(q, q)).sum(1)
    return -torch.xlogy(p, p).sum(1)


def _check_probs(probs: Any, name: str, multilabel: bool, class_dim: int = 1) -> None:
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of probabilities, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a float tensor of probabilities, got dtype {probs.dtype}")
    if probs.dim() < class_dim + 1:
        raise ValueError(f"{name} must have a class dimension at dim {class_dim}, got shape {tuple(probs.shape)}")
    if probs.numel() == 0:
        return
    lo, hi = probs.aminmax()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]; apply a "
            "softmax (or sigmoid with multilabel=True) to logits first"
        )
    if not multilabel and bool(((probs.sum(class_dim) - 1).abs() > 1e-3).any()):
        raise ValueError(
            f"{name} must sum to 1 over the class dimension (dim {class_dim}); pass multilabel=True for "
            "independent per-channel (sigmoid) probabilities"
        )


def entropy_map(probs: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Predictive entropy per pixel, in nats.

    ``H = -sum_k p_k log p_k`` with ``0 log 0 = 0`` (``torch.xlogy``), so one-hot probabilities give exactly 0
    and never NaN; uniform probabilities over ``K`` classes give ``log K``.

    Args:
        probs: ``(B, K, H, W)`` (or ``(B, K, *spatial)``) class probabilities summing to 1 over dim 1.
        multilabel: ``probs`` are independent per-channel (sigmoid) probabilities; the result is the sum of the
            binary entropies ``-p log p - (1 - p) log(1 - p)`` over channels (at most ``K log 2``).

    Returns:
        ``(B, H, W)`` entropy.
    """
    _check_probs(probs, "probs", multilabel)
    return _entropy(probs, multilabel)


def mutual_information(samples: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Mutual information between the prediction and the sample (BALD), per pixel, in nats.

    ``MI = H[mean_s p_s] - mean_s H[p_s]``, clamped at 0 (it is >= 0 by Jensen's inequality; the clamp only
    removes rounding noise). It is 0 when all samples agree and at most ``H[mean_s p_s]``.

    Args:
        samples: ``(S, B, K, H, W)`` probabilities of ``S`` samples (dropout masks, ensemble members, ...).
        multilabel: the probabilities are independent per-channel (sigmoid) probabilities.

    Returns:
        ``(B, H, W)`` mutual information.
    """
    if isinstance(samples, torch.Tensor) and (samples.dim() < 4 or samples.shape[0] == 0):
        raise ValueError(f"samples must have shape (S, B, K, H, W) with S >= 1, got {tuple(samples.shape)}")
    _check_probs(samples, "samples", multilabel, class_dim=2)
    stats = _SampleStats(multilabel)
    for p in samples:
        stats.add(p)
    return stats.result()["mutual_information"]


class _SampleStats:
    """Streaming mean, variance and mean entropy of probability samples (Welford's update).

    Welford's form keeps the mean bit-exact when all samples are equal, so identical samples give a variance and
    a mutual information of exactly 0.
    """

    def __init__(self, multilabel: bool, keep_samples: bool = False) -> None:
        self.multilabel = multilabel
        self.keep_samples = keep_samples
        self.n = 0
        self.samples: list[torch.Tensor] = []
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.mean_entropy: torch.Tensor | None = None
        self.dtype = torch.float32

    def add(self, p: torch.Tensor) -> None:
        if self.keep_samples:
            self.samples.append(p)
        self.dtype = p.dtype
        p = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        ent = _entropy(p, self.multilabel)
        self.n += 1
        if self.mean is None:
            self.mean, self.m2, self.mean_entropy = p.clone(), torch.zeros_like(p), ent
            return
        if p.shape != self.mean.shape:
            raise ValueError(f"sample {self.n - 1} has shape {tuple(p.shape)}, expected {tuple(self.mean.shape)}")
        delta = p - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (p - self.mean)
        self.mean_entropy += (ent - self.mean_entropy) / self.n

    def result(self) -> dict[str, torch.Tensor]:
        assert self.mean is not None and self.m2 is not None and self.mean_entropy is not None
        entropy = _entropy(self.mean, self.multilabel)
        out = {
            "mean": self.mean.to(self.dtype),
            "entropy": entropy,
            "expected_entropy": self.mean_entropy,
            "mutual_information": (entropy - self.mean_entropy).clamp_min(0),
            "variance": (self.m2 / self.n).mean(1),
        }
        if self.keep_samples:
            out["samples"] = torch.stack(self.samples)
        return out


def _summarise(
    probs: Iterable[torch.Tensor], activation: str | None, return_samples: bool, name: str
) -> dict[str, torch.Tensor]:
    multilabel = activation == "sigmoid"
    stats = _SampleStats(multilabel, return_samples)
    for i, p in enumerate(probs):
        if activation is None and i == 0:
            _check_probs(p, f"the output of {name} (activation=None means the model returns probabilities)", False)
        stats.add(p)
    return stats.result()


# --------------------------------------------------------------------------- mode and RNG handling


@contextlib.contextmanager
def _restore_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit (set one by one, not through the recursive ``train``)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    if not isinstance(model, nn.Module):
        yield
        return
    with _restore_modes(model):
        model.eval()
        yield


@contextlib.contextmanager
def mc_dropout_mode(
    model: nn.Module, dropout_types: Sequence[type[nn.Module]] = DROPOUT_TYPES
) -> Iterator[list[nn.Module]]:
    """Eval mode for the whole model except its dropout modules, which are put in train mode.

    On exit (also on an exception) every module gets back the mode it had before, one by one.

    Args:
        model: the model.
        dropout_types: module classes to put in train mode (add e.g. a drop-path class to sample stochastic
            depth too).

    Yields:
        The list of modules switched to train mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = tuple(dropout_types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"dropout_types must be a non-empty sequence of nn.Module classes, got {dropout_types!r}")
    with _restore_modes(model):
        model.eval()
        dropouts = [m for m in model.modules() if isinstance(m, types)]
        for m in dropouts:
            m.training = True
        yield dropouts


@contextlib.contextmanager
def _seeded(seed: int | None, generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs (dropout modules draw from them) and restore their state on exit."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_common(samples_name: str, samples: int, activation: str | None) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{samples_name} must be a positive int, got {samples!r}")
    _check_activation(activation)


def _run(model: Callable, x: torch.Tensor, activation: str | None, name: str) -> torch.Tensor:
    out = split_outputs(model(x))[0]
    if out.dim() != 4 or out.shape[0] != x.shape[0] or out.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"{name} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; expected logits "
            "(B, K, H, W) at the input resolution"
        )
    return _activate(out, activation)


# --------------------------------------------------------------------------- sampling methods


def mc_dropout(
    model: nn.Module,
    x: torch.Tensor,
    samples: int = 10,
    activation: str | None = "softmax",
    return_samples: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    missing_dropout: str = "warn",
    dropout_types: Sequence[type[nn.Module]] = DROPOUT_TYPES,
) -> dict[str, torch.Tensor]:
    """Monte Carlo dropout: ``samples`` stochastic forward passes with only the dropout modules active.

    The model runs under ``torch.no_grad()`` in eval mode except for its dropout modules (``nn.Dropout``,
    ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``); BatchNorm keeps using and never updates its
    running statistics. Every module's mode is restored afterwards, also when the model raises. Dropout called
    functionally inside a module's forward (``F.dropout(..., training=self.training)``) is not switched on.

    Args:
        model: a segmentation model returning ``(B, K, H, W)`` logits (or a dict with ``"out"``).
        x: ``(B, C, H, W)`` images.
        samples: number of forward passes ``S``.
        activation: ``"softmax"``, ``"sigmoid"`` (binary / multi-label) or ``None`` (the model returns
            probabilities).
        return_samples: also return all ``(S, B, K, H, W)`` probabilities (memory grows with ``S``).
        seed: seed the global RNGs for reproducible masks; their previous state is restored afterwards.
        generator: alternatively, a ``torch.Generator`` from which the seed is drawn.
        missing_dropout: what to do when the model has no dropout module (all samples would be equal):
            ``"warn"``, ``"raise"`` (ValueError) or ``"ignore"``.
        dropout_types: module classes treated as dropout.

    Returns:
        A dict with ``mean`` ``(B, K, H, W)`` probabilities and ``(B, H, W)`` maps ``entropy``,
        ``expected_entropy``, ``mutual_information`` and ``variance`` (see the module docstring), plus
        ``samples`` when asked.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_model_and_image(model, x)
    _check_common("samples", samples, activation)
    if missing_dropout not in _MISSING:
        raise ValueError(f"missing_dropout must be one of {list(_MISSING)}, got {missing_dropout!r}")
    with mc_dropout_mode(model, dropout_types) as dropouts, _seeded(seed, generator, x.device), torch.no_grad():
        if not dropouts:
            msg = (
                f"{type(model).__name__} has no dropout module ({', '.join(t.__name__ for t in dropout_types)}), so "
                "all MC dropout samples are equal and the mutual information is 0"
            )
            if missing_dropout == "raise":
                raise ValueError(msg)
            if missing_dropout == "warn":
                warnings.warn(msg, UserWarning, stacklevel=2)
        probs = (_run(model, x, activation, "model") for _ in range(samples))
        return _summarise(probs, activation, return_samples, "model")


def ensemble(
    models: Sequence[nn.Module | str | os.PathLike],
    x: torch.Tensor,
    activation: str | None = "softmax",
    return_samples: bool = False,
    map_location: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Deep ensemble: the prediction and uncertainty from several trained models.

    Members run one at a time under ``torch.no_grad()`` in eval mode (each module's previous mode is restored
    afterwards). Checkpoint paths are loaded with :func:`maskworks.checkpoint.load_model` when their turn comes
    and dropped afterwards, so only one loaded member is in memory at a time.

    Args:
        models: members: ``nn.Module`` instances and/or paths of maskworks checkpoints (``.safetensors`` with
            its ``.json`` recipe).
        x: ``(B, C, H, W)`` images.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (members return probabilities).
        return_samples: also return the ``(M, B, K, H, W)`` member probabilities.
        map_location: device for loaded checkpoints; by default the device of ``x``.

    Returns:
        The same dict as :func:`mc_dropout`, over the ``M`` members.
    """
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        raise TypeError("models must be a sequence of models or checkpoint paths, got a single nn.Module")
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, (Sequence, nn.ModuleList)):
        raise TypeError(f"models must be a sequence of nn.Module or checkpoint paths, got {type(models).__name__}")
    members = list(models)
    if not members:
        raise ValueError("models must hold at least one model or checkpoint path")
    for i, m in enumerate(members):
        if not isinstance(m, (nn.Module, str, os.PathLike)):
            raise TypeError(f"models[{i}] must be an nn.Module or a checkpoint path, got {type(m).__name__}")
    _check_image(x)
    _check_activation(activation)
    location = x.device if map_location is None else map_location

    def member_outputs() -> Iterator[torch.Tensor]:
        for i, m in enumerate(members):
            model = m if isinstance(m, nn.Module) else load_model(m, map_location=location)
            with _eval_mode(model):
                yield _run(model, x, activation, f"models[{i}]")

    with torch.no_grad():
        return _summarise(member_outputs(), activation, return_samples, "the ensemble members")


def tta_uncertainty(
    model: nn.Module,
    x: torch.Tensor,
    transforms: str | TTATransform | Sequence[TTATransform | str] = "d4",
    activation: str | None = "softmax",
    return_samples: bool = False,
) -> dict[str, torch.Tensor]:
    """Uncertainty from the spread of predictions over test-time augmentations.

    Runs :func:`maskworks.inference.tta.iter_tta` under ``torch.no_grad()`` with the model in eval mode (each
    module's previous mode is restored afterwards).

    Args:
        model: a segmentation model returning ``(B, K, H, W)`` logits (or a dict with ``"out"``).
        x: ``(B, C, H, W)`` images.
        transforms: preset name, transform or sequence of them (see
            :func:`maskworks.inference.tta.get_tta_transforms`); at least two transforms for a non-zero spread.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (the model returns probabilities).
        return_samples: also return the ``(T, B, K, H, W)`` per-transform probabilities.

    Returns:
        The same dict as :func:`mc_dropout`, over the transforms.
    """
    _check_model_and_image(model, x)
    _check_activation(activation)
    with _eval_mode(model), torch.no_grad():
        probs = (p for _, p in iter_tta(model, x, transforms, activation))
        return _summarise(probs, activation, return_samples, "model")


# --------------------------------------------------------------------------- temperature scaling


class _PixelReservoir:
    """A uniform random subset of at most ``max_pixels`` of all pixels added (random keys, keep the smallest)."""

    def __init__(self, max_pixels: int | None, generator: torch.Generator) -> None:
        self.max_pixels = max_pixels
        self.generator = generator
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.keys: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        # logits (N, K), targets (N,)
        self.logits.append(logits)
        self.targets.append(targets)
        if self.max_pixels is None:
            return
        keys = torch.rand(targets.shape[0], generator=self.generator)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys])
        if self.keys.shape[0] > self.max_pixels:
            self.keys, idx = self.keys.topk(self.max_pixels, largest=False, sorted=False)
            all_logits, all_targets = torch.cat(self.logits), torch.cat(self.targets)
            idx = idx.to(all_targets.device)
            self.logits, self.targets = [all_logits[idx]], [all_targets[idx]]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.targets:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
        return torch.cat(self.logits), torch.cat(self.targets)


def _valid_pixels(
    logits: Any, targets: Any, ignore_index: int | None, logits_name: str, targets_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of ``(B, K, *S)`` logits / ``(B, *S)`` targets (or ``(N, K)`` / ``(N,)``) as ``(N, K)``, ``(N,)``."""
    logits = split_outputs(logits)[0] if isinstance(logits, dict) else logits
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = f"dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{logits_name} must be a float tensor of logits, got {got}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        got = f"dtype {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"{targets_name} must be an integer tensor of class ids, got {got}")
    if logits.dim() < 2 or logits.dim() != targets.dim() + 1 or logits.shape[:1] + logits.shape[2:] != targets.shape:
        raise ValueError(
            f"{logits_name} {tuple(logits.shape)} and {targets_name} {tuple(targets.shape)} do not match; expected "
            "(B, K, H, W) and (B, H, W), or (N, K) and (N,)"
        )
    k = logits.shape[1]
    flat = logits.movedim(1, -1).reshape(-1, k)  # (N, K)
    t = targets.reshape(-1).to(flat.device).long()  # (N,)
    if ignore_index is not None:
        keep = t != ignore_index
        flat, t = flat[keep], t[keep]
    if t.numel():
        hi = 1 if k == 1 else k - 1
        if int(t.min()) < 0 or int(t.max()) > hi:
            raise ValueError(
                f"{targets_name} holds labels outside 0..{hi} that are not ignore_index={ignore_index} "
                f"(logits have K={k} channels{'; one channel means binary 0/1 targets' if k == 1 else ''})"
            )
    return flat.detach(), t


def _batch_parts(batch: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        if "image" not in batch or "mask" not in batch:
            raise ValueError(f"dataloader batch {i} is a dict without 'image' and 'mask' keys: {sorted(batch)}")
        return batch["image"], batch["mask"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"dataloader batch {i} must be a dict with 'image' and 'mask' or a tuple (image, mask), got "
        f"{type(batch).__name__}"
    )


class TemperatureScaling(nn.Module):
    """Temperature scaling: ``logits / T`` with one learned temperature ``T > 0`` (Guo et al. 2017).

    ``T`` is stored as ``log_temperature`` so it stays positive during optimisation. Dividing by ``T`` does not
    change the argmax, so accuracy and IoU are unchanged while confidences are calibrated.

    Args:
        temperature: initial ``T``.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        t = temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.log_temperature = nn.Parameter(torch.tensor(math.log(t), dtype=torch.float32))

    @property
    def temperature(self) -> float:
        """The current temperature ``T``."""
        return float(self.log_temperature.detach().exp())

    def forward(self, logits: torch.Tensor | dict) -> torch.Tensor:
        """Calibrated logits ``logits / T`` (from a logits tensor or a dict with ``"out"``)."""
        logits = split_outputs(logits)[0]
        return logits / self.log_temperature.exp().to(logits.dtype)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}"

    def fit(
        self,
        logits: torch.Tensor | nn.Module,
        targets: torch.Tensor | Iterable,
        ignore_index: int | None = 255,
        max_iter: int = 50,
        max_pixels: int | None = 1_000_000,
        seed: int = 0,
    ) -> TemperatureScaling:
        """Fit ``T`` by minimising the mean NLL over the non-ignored pixels with L-BFGS (over ``log T``).

        Either pass held-out ``logits`` and ``targets`` tensors, or a ``(model, dataloader)`` pair: the model then
        runs in eval mode under ``torch.no_grad()`` (modes restored afterwards) and only a uniform random subset
        of at most ``max_pixels`` non-ignored pixels is kept while the loader is consumed, so memory stays bounded.
        With one logit channel the NLL is the binary cross-entropy against 0/1 targets.

        Args:
            logits: ``(B, K, H, W)`` (or ``(N, K)``) logits of held-out data, or the model.
            targets: ``(B, H, W)`` (or ``(N,)``) class ids, or a dataloader yielding dicts with ``"image"`` and
                ``"mask"`` (or ``(image, mask)`` tuples).
            ignore_index: target value of pixels left out of the fit; ``None`` counts every pixel.
            max_iter: L-BFGS iterations.
            max_pixels: at most this many pixels (a uniform random subset) are used; ``None`` uses all.
            seed: seed of the pixel subsampling.

        Returns:
            ``self``, with the fitted temperature.
        """
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if max_pixels is not None and (
            isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
        ):
            raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
        reservoir = _PixelReservoir(max_pixels, torch.Generator().manual_seed(seed))
        if isinstance(logits, nn.Module):
            self._collect(logits, targets, ignore_index, reservoir)
        elif isinstance(logits, (torch.Tensor, dict)):
            reservoir.add(*_valid_pixels(logits, targets, ignore_index, "logits", "targets"))
        else:
            raise TypeError(
                f"logits must be a logits tensor or an nn.Module (with a dataloader as targets), got "
                f"{type(logits).__name__}"
            )
        flat, t = reservoir.result()
        if t.numel() == 0:
            raise ValueError(f"no pixel to fit the temperature on: every target is ignore_index={ignore_index}")
        self._optimise(flat, t, max_iter)
        return self

    def _collect(self, model: nn.Module, loader: Any, ignore_index: int | None, reservoir: _PixelReservoir) -> None:
        if isinstance(loader, (torch.Tensor, str)) or not isinstance(loader, Iterable):
            raise TypeError(
                f"targets must be a dataloader (an iterable of batches) when logits is a model, got "
                f"{type(loader).__name__}"
            )
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with _eval_mode(model), torch.no_grad():
            for i, batch in enumerate(loader):
                image, mask = _batch_parts(batch, i)
                if not isinstance(image, torch.Tensor) or image.dim() != 4:
                    raise ValueError(f"dataloader batch {i}: image must be a (B, C, H, W) tensor")
                out = split_outputs(model(image.to(device)))[0]
                reservoir.add(*_valid_pixels(out, torch.as_tensor(mask), ignore_index, "model output", "mask"))

    def _optimise(self, flat: torch.Tensor, t: torch.Tensor, max_iter: int) -> None:
        param = self.log_temperature
        flat = flat.to(device=param.device, dtype=torch.float32)  # (N, K)
        t = t.to(param.device)
        binary = flat.shape[1] == 1
        if binary:
            flat, target = flat[:, 0], t.float()

            def nll(z: torch.Tensor) -> torch.Tensor:
                return F.binary_cross_entropy_with_logits(z, target)
        else:

            def nll(z: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(z, t)

        optimizer = torch.optim.LBFGS([param], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nll(flat / param.exp())
            loss.backward()
            return loss

        with torch.enable_grad():
            before = float(nll(flat / param.detach().exp()))
            optimizer.step(closure)
            after = float(nll(flat / param.detach().exp()))
        if not math.isfinite(float(param.detach())):
            raise RuntimeError("temperature fit diverged (non-finite log temperature); check the logits for NaN/inf")
        logger.info(
            "temperature scaling on %d pixels: T = %.4g, NLL %.4g -> %.4g", t.numel(), self.temperature, before, after
        )
