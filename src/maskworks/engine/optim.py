"""Optimizers and learning-rate schedules (per-step, resumable through ``state_dict``).

Parameter groups (:func:`param_groups`):

* weight decay is applied to weights only: biases and normalisation parameters (tensors with at most one
  dimension) and the names a module lists in its ``no_weight_decay()`` (a ViT's ``pos_embed`` and prefix tokens)
  get none;
* ``encoder_lr_mult`` scales the learning rate of the encoder's parameters (see :func:`find_encoder` for which
  submodule that is) while the decoder and heads keep the base rate — the usual "lower LR for the pretrained
  part" of fine-tuning;
* ``layer_decay`` is layer-wise learning-rate decay (BEiT, MAE, timm's ``param_groups_layer_decay``) for a
  ViT-family encoder: the patch embedding and prefix tokens form layer 0, block ``i`` layer ``i + 1``, the final
  ``norm`` joins the last block, and everything else (``fc_norm``, a classification head, the whole decoder) is
  the top layer; layer ``l`` of ``L`` layers trains at ``layer_decay ** (L - 1 - l)`` times the rate.

Each group carries its ``lr_scale``; :func:`build_optimizer` sets the group's ``lr`` to ``lr * lr_scale``, and the
per-step :func:`build_scheduler` (a ``LambdaLR``) multiplies every group's initial rate by the same schedule
factor, so the ratios hold throughout training.
"""

from __future__ import annotations

import fnmatch
import math
import re

import torch
import torch.nn as nn

__all__ = [
    "base_lr",
    "build_optimizer",
    "build_scheduler",
    "find_encoder",
    "find_vit",
    "no_weight_decay_names",
    "param_groups",
    "vit_layer_ids",
]

OPTIMIZERS = ("adamw", "sgd", "adam")
SCHEDULES = ("poly", "cosine", "constant")
ENCODER_NAMES = ("encoder", "backbone")


def find_encoder(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The pretrained feature extractor of a segmentation model: its ``encoder`` child module, or else its
    ``backbone`` child module; ``None`` when it has neither (e.g. BiSeNetV2, Fast-SCNN).

    Returns:
        ``(attribute name, module)`` or ``None``.
    """
    for name in ENCODER_NAMES:
        module = model._modules.get(name)
        if isinstance(module, nn.Module):
            return name, module
    return None


def _is_vit(module: nn.Module) -> bool:
    return isinstance(getattr(module, "patch_embed", None), nn.Module) and isinstance(
        getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList)
    )


def find_vit(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The ViT-family network inside ``model``: the model itself, or the first module under its encoder (the whole
    model when it has no encoder), that has a ``patch_embed`` module and a ``blocks`` sequence (ViT, DeiT, hybrid
    ViT).

    Returns:
        ``(name prefix ending with "." or "", module)`` or ``None``.
    """
    if _is_vit(model):
        return "", model
    found = find_encoder(model)
    root, prefix = (found[1], found[0] + ".") if found else (model, "")
    for name, module in root.named_modules():
        if _is_vit(module):
            return (prefix + name + "." if name else prefix), module
    return None


# timm's ViT group matcher: stem -> 0, blocks.i -> (1, i), the final norm merged into the last block, the rest on top
_STEM = re.compile(r"^cls_token|reg_token|dist_token|pos_embed|patch_embed|norm_pre")
_BLOCK = re.compile(r"^blocks\.(\d+)")
_FINAL_NORM = re.compile(r"^norm")
_MERGE = 99999


def vit_layer_ids(model: nn.Module) -> dict[str, int]:
    """Layer id of every parameter of ``model`` for layer-wise LR decay (see the module docstring).

    The grouping equals timm's ``param_groups_layer_decay`` on a timm ViT (its ``group_matcher``): ids are
    consecutive over the layers that have parameters, so a ViT without a head has its last block on top.

    Raises:
        ValueError: ``model`` contains no ViT-family network.
    """
    found = find_vit(model)
    if found is None:
        raise ValueError(
            f"layer_decay needs a ViT-family encoder (a module with patch_embed and blocks); "
            f"{type(model).__name__} has none — use encoder_lr_mult for a convolutional encoder"
        )
    prefix = found[0]

    def ordinal(name: str) -> tuple[float, ...]:
        if not name.startswith(prefix):
            return (math.inf,)
        rel = name[len(prefix) :]
        if _STEM.match(rel):
            return (0.0,)
        m = _BLOCK.match(rel)
        if m:
            return (1.0, float(m.group(1)))
        if _FINAL_NORM.match(rel):
            return (1.0, float(_MERGE))
        return (math.inf,)

    ordinals = {name: ordinal(name) for name, _ in model.named_parameters()}
    ids: dict[tuple[float, ...], int] = {}
    lid = -1
    for key in sorted(set(ordinals.values())):
        if lid < 0 or key[-1] != _MERGE:
            lid += 1
        ids[key] = lid
    return {name: ids[key] for name, key in ordinals.items()}


def no_weight_decay_names(model: nn.Module) -> list[str]:
    """Name patterns (``fnmatch``) of parameters that a module of ``model`` excludes from weight decay through its
    ``no_weight_decay()`` method, prefixed with the module's name."""
    patterns: list[str] = []
    for name, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            prefix = name + "." if name else ""
            patterns.extend(prefix + n for n in fn())
    return patterns


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    encoder_lr_mult: float = 1.0,
    layer_decay: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters of ``model``.

    With the defaults: two groups, weights with decay and biases / norms / ``no_weight_decay()`` names without.
    With ``encoder_lr_mult != 1`` or ``layer_decay``: one group per (encoder or not, layer, decay or not), each with
    ``lr_scale`` (``encoder_lr_mult`` for encoder parameters, times ``layer_decay ** (L - 1 - layer)``) and a
    ``name`` such as ``"encoder.layer_3.decay"``; groups appear in the order of their first parameter.

    Raises:
        ValueError: ``encoder_lr_mult`` is not positive, ``layer_decay`` is not in (0, 1], or the option needs an
            encoder (a ViT-family one for ``layer_decay``) that ``model`` does not have.
    """
    if not encoder_lr_mult > 0:
        raise ValueError(f"encoder_lr_mult must be > 0, got {encoder_lr_mult}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] or None, got {layer_decay}")
    skip = no_weight_decay_names(model)

    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim > 1 and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)

    if encoder_lr_mult == 1.0 and layer_decay is None:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if decays(name, p) else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    encoder = find_encoder(model)
    if encoder_lr_mult != 1.0 and encoder is None:
        raise ValueError(
            f"encoder_lr_mult={encoder_lr_mult} needs a model with an 'encoder' or 'backbone' submodule; "
            f"{type(model).__name__} has neither"
        )
    enc_prefix = encoder[0] + "." if encoder else None
    layer_ids = vit_layer_ids(model) if layer_decay is not None else {}
    top = max(layer_ids.values(), default=0)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_encoder = enc_prefix is not None and name.startswith(enc_prefix)
        layer = layer_ids.get(name, top)
        scale = encoder_lr_mult if in_encoder else 1.0
        if layer_decay is not None:
            scale *= layer_decay ** (top - layer)
        wd = decays(name, p)
        key = (in_encoder, layer, wd)
        if key not in groups:
            label = ("encoder" if in_encoder else "head") + (f".layer_{layer}" if layer_decay is not None else "")
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if wd else 0.0,
                "lr_scale": scale,
                "name": f"{label}.{'decay' if wd else 'no_decay'}",
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    *,
    encoder_lr_mult: float = 1.0,
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (Nesterov momentum) over :func:`param_groups`; each group's ``lr`` is ``lr * lr_scale``.

    Parameters without a gradient in a step (e.g. a frozen encoder's, ``requires_grad=False``) are skipped by the
    update, weight decay included, so they stay bit-identical.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(model, weight_decay, encoder_lr_mult=encoder_lr_mult, layer_decay=layer_decay)
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate of the base (scale 1) parameters: the first group's rate over its ``lr_scale``."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def lr_factor(
    step: int, total_steps: int, schedule: str, warmup_steps: int = 0, power: float = 0.9, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        f = (1.0 - t) ** power
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    schedule: str = "poly",
    warmup_steps: int = 0,
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``: linear warm-up, then poly (``(1-t)^power``), cosine or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, schedule, warmup_steps, power, min_lr_ratio)
    )
