"""Compound losses from a string (``"ce+0.5*dice"``) and deep supervision over ``{"out", "aux"}`` outputs."""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.losses.cross_entropy import split_outputs

__all__ = ["LOSS_NAMES", "CompoundLoss", "DeepSupervisionLoss", "build_loss", "parse_loss_spec"]

# Short names usable in a loss spec -> class names in maskworks.losses.
LOSS_NAMES = {
    "ce": "CrossEntropyLoss",
    "soft_ce": "SoftCrossEntropyLoss",
    "dice": "DiceLoss",
    "gdice": "GeneralizedDiceLoss",
    "jaccard": "JaccardLoss",
    "focal": "FocalLoss",
    "tversky": "TverskyLoss",
    "focal_tversky": "FocalTverskyLoss",
    "lovasz": "LovaszSoftmaxLoss",
    "lovasz_hinge": "LovaszHingeLoss",
    "boundary": "BoundaryLoss",
    "hausdorff": "HausdorffDTLoss",
    "cldice": "ClDiceLoss",
    "ohem": "OhemCrossEntropyLoss",
    "topk": "TopKCrossEntropyLoss",
    "boundary_ce": "BoundaryWeightedCrossEntropyLoss",
    "sce": "SymmetricCrossEntropyLoss",
    "gce": "GeneralizedCrossEntropyLoss",
    "bootstrap": "BootstrappedCrossEntropyLoss",
}

_TERM = re.compile(r"^\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([a-z_]+)\s*$")


def parse_loss_spec(spec: str | Sequence) -> list[tuple[float, str]]:
    """``"ce+0.5*dice"`` -> ``[(1.0, "ce"), (0.5, "dice")]``; a list of names or ``(weight, name)`` also works."""
    if isinstance(spec, str):
        terms = []
        for part in spec.split("+"):
            m = _TERM.match(part)
            if not m:
                raise ValueError(f"cannot parse loss term {part!r} in {spec!r}; expected e.g. 'ce+0.5*dice'")
            terms.append((float(m.group(1) or 1.0), m.group(2)))
    else:
        terms = [(1.0, t) if isinstance(t, str) else (float(t[0]), str(t[1])) for t in spec]
    for _, name in terms:
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSS_NAMES))}")
    if not terms:
        raise ValueError("empty loss spec")
    return terms


class CompoundLoss(nn.Module):
    """Weighted sum of losses applied to the same logits and target."""

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(losses) != len(weights) or not losses:
            raise ValueError(f"need as many weights as losses, got {len(weights)} and {len(losses)}")
        self.losses = nn.ModuleList(losses)
        self.weights = [float(w) for w in weights]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses))


def _resize_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer target (ignore labels stay ignore labels)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to the main output and to each auxiliary output.

    Args:
        loss: the loss for one logits tensor.
        aux_weights: weight of each auxiliary output (a float applies to all of them).
        resize: ``"target"`` resizes the target to each auxiliary output (nearest), ``"logits"`` upsamples
            auxiliary logits bilinearly to the target size.
    """

    def __init__(self, loss: nn.Module, aux_weights: float | Sequence[float] = 0.4, resize: str = "target"):
        super().__init__()
        if resize not in ("target", "logits"):
            raise ValueError(f"resize must be 'target' or 'logits', got {resize!r}")
        self.loss, self.aux_weights, self.resize = loss, aux_weights, resize

    def forward(self, output: torch.Tensor | dict, target: torch.Tensor) -> torch.Tensor:
        main, aux = split_outputs(output)
        weights = [self.aux_weights] * len(aux) if isinstance(self.aux_weights, (int, float)) else self.aux_weights
        if len(weights) != len(aux):
            raise ValueError(f"{len(aux)} auxiliary outputs but {len(weights)} aux_weights")
        total = self.loss(main, target)
        for w, a in zip(weights, aux):
            if self.resize == "logits":
                a = F.interpolate(a, size=target.shape[-2:], mode="bilinear", align_corners=False)
                total = total + w * self.loss(a, target)
            else:
                total = total + w * self.loss(a, _resize_target(target, a.shape[-2:]))
        return total


def _init_params(cls: type) -> set[str]:
    """Keyword arguments a loss class accepts, following ``**kwargs`` up to the base classes' ``__init__``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {"self"}


def _construct(cls: type, common: dict, extra: dict) -> nn.Module:
    params = _init_params(cls)
    kwargs = {k: v for k, v in common.items() if k in params and v is not None}
    unknown = set(extra) - set(params)
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {sorted(unknown)}; it takes {sorted(params)}")
    return cls(**kwargs, **extra)


def build_loss(
    spec: str | Sequence = "ce",
    mode: str = "multiclass",
    ignore_index: int = 255,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    aux_weight: float | Sequence[float] = 0.4,
    options: dict[str, dict] | None = None,
) -> DeepSupervisionLoss:
    """Build a (compound) loss from a spec such as ``"ce+0.5*dice"`` or ``"focal+lovasz"``.

    Args:
        spec: ``+``-separated terms ``[weight*]name`` (names in :data:`LOSS_NAMES`), or a list.
        mode: passed to every loss that takes ``mode``.
        ignore_index: passed to every loss that takes it.
        class_weights: passed as ``weight`` to the losses that take per-class weights.
        aux_weight: weight of auxiliary (deep-supervision) outputs.
        options: per-term keyword arguments, e.g. ``{"dice": {"smooth": 1.0}}``.

    Returns:
        A module taking logits (or ``{"out", "aux"}``) and the target.
    """
    import maskworks.losses as losses_pkg

    options = options or {}
    unknown = set(options) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"options given for unknown losses {sorted(unknown)}")
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    common = {"mode": mode, "ignore_index": ignore_index, "weight": weight}
    modules, coefs = [], []
    for coef, name in parse_loss_spec(spec):
        cls = getattr(losses_pkg, LOSS_NAMES[name], None)
        if cls is None:
            raise ValueError(f"loss {name!r} ({LOSS_NAMES[name]}) is not available in this version")
        modules.append(_construct(cls, common, options.get(name, {})))
        coefs.append(coef)
    core = modules[0] if len(modules) == 1 and coefs[0] == 1.0 else CompoundLoss(modules, coefs)
    return DeepSupervisionLoss(core, aux_weights=aux_weight)
