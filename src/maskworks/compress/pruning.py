"""Structured channel pruning (torch-pruning's DepGraph) and unstructured magnitude pruning.

Structured pruning (:func:`prune_channels`) removes whole output channels of convolutions and linear layers
and, with them, every tensor slice that depends on them: the BatchNorm entries, the input channels of the layers
that read them, the channels of the other branch of a residual addition, the matching slice of a U-Net
concatenation. The dependencies are found by `torch-pruning <https://github.com/VainF/Torch-Pruning>`_'s
dependency graph (DepGraph, Fang et al., CVPR 2023), traced from one forward pass; the convolutions really become
narrower, so parameters, memory and MACs drop and dense kernels run faster. ``torch-pruning`` is an optional
dependency (``pip install maskworks[compress]``), imported only by :func:`prune_channels`.

Unstructured pruning (:func:`magnitude_prune`) zeroes the individual weights of smallest magnitude and keeps
every shape: a baseline for how much of a network is redundant, not a speed-up (see its docstring).

A pruned model no longer has the shapes its constructor builds. :func:`pruned_structure` describes them and
:func:`apply_structure` rebuilds them on a freshly built model; :func:`maskworks.save_model` stores the
description in the checkpoint's ``meta["pruned_structure"]`` for models marked ``maskworks_pruned`` (which
:func:`prune_channels` does) and :func:`maskworks.load_model` applies it before loading the weights, so pruned
checkpoints load like any other.

Pruning costs accuracy; fine-tune afterwards with the ordinary trainer (a new :class:`~maskworks.engine.Trainer`,
so that its optimizer holds the new, smaller parameters)::

    from maskworks import load_model
    from maskworks.compress import prune_channels
    from maskworks.engine import Trainer

    model = load_model("runs/unet/best.safetensors")
    report = prune_channels(model, 0.5, criterion="l1")
    summary = report.summary()  # params / MACs before and after, per-layer channels
    Trainer(model, train_set, val_set, "runs/unet_pruned", epochs=10, lr=1e-4).fit()
    model = load_model("runs/unet_pruned/best.safetensors")  # the pruned shapes come back from the recipe
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

__all__ = [
    "CRITERIA",
    "PruneReport",
    "apply_structure",
    "magnitude_prune",
    "prune_channels",
    "pruned_structure",
]

CRITERIA = ("l1", "bn_scale")

# Layers whose output channels are their own (not those of their input): the walk back from the model's outputs
# stops at them. Norms, activations, resizing, dropout, additions and concatenations are passed through.
_CHANNEL_MAKERS = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase, nn.Embedding, nn.MultiheadAttention)

# Module attributes that describe tensor shapes, recorded by pruned_structure when a module has them.
_SHAPE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_groups",
    "num_channels",
    "normalized_shape",
    "num_parameters",
    "num_embeddings",
    "embedding_dim",
)


# --------------------------------------------------------------------------- report
@dataclass
class PruneReport:
    """What :func:`prune_channels` did.

    Attributes:
        ratio: the requested pruning ratio.
        criterion: ``"l1"`` or ``"bn_scale"``.
        achieved_ratio: fraction of the output channels removed, over the layers that could be pruned (traced
            Conv / Linear layers that are not in ``ignored``).
        params_before: parameters before pruning (all of the model's parameters, auxiliary heads included).
        params_after: parameters after pruning.
        macs_before: multiply-accumulates of one inference forward (eval mode, so without auxiliary heads) on an
            input of ``input_shape``, as counted by ``torch_pruning.utils.count_ops_and_params`` (convolutions,
            linear layers, norms, activations, pooling and upsampling).
        macs_after: the same after pruning.
        input_shape: shape of the example input used for tracing and counting.
        channels: per Conv / ConvTranspose / Linear layer name: ``(out channels before, out channels after)``.
        ignored: layers whose output channels were kept: the output layers found automatically (see
            :func:`prune_channels`) and the caller's ``ignored_layers``.
        unused: Conv / Linear layers that the forward pass never reached; they are neither pruned nor counted in
            the MACs, but their parameters are (e.g. encoder stages a decoder does not read).
    """

    ratio: float
    criterion: str
    achieved_ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    input_shape: tuple[int, ...]
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def params_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        """``macs_after / macs_before``."""
        return self.macs_after / max(self.macs_before, 1)

    def summary(self) -> str:
        """A few lines: channels removed, parameters and MACs before / after."""
        return "\n".join(
            [
                f"channel pruning ({self.criterion}, ratio {self.ratio:g}): {self.achieved_ratio:.1%} of the prunable "
                f"output channels removed, {len(self.ignored)} layer(s) kept whole",
                f"params: {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%})",
                f"MACs at {tuple(self.input_shape)}: {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.1%})",
            ]
        )


# --------------------------------------------------------------------------- structured pruning
def _unwrap(model: nn.Module) -> nn.Module:
    from maskworks.checkpoint import unwrap_model

    return unwrap_model(model)


def _default_input(model: nn.Module) -> torch.Tensor:
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        raise ValueError(
            f"{type(model).__name__} has no convolution to read its input channels from; pass example_input"
        )
    weight = conv.weight
    return torch.randn(1, conv.in_channels, 64, 64, device=weight.device, dtype=weight.dtype)


def _flatten(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flatten(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flatten(o)]
    return []


def _forward_with_aux(model: nn.Module, x: torch.Tensor) -> Any:
    """Forward with the top-level module in training mode and every submodule in eval mode.

    maskworks models return their auxiliary / deep-supervision outputs when ``model.training`` is set; with the
    submodules in eval mode, BatchNorm uses (and does not update) its running statistics and dropout is off.
    """
    was = model.training
    model.training = True
    try:
        return model(x)
    finally:
        model.training = was


def _output_shapes(model: nn.Module, x: torch.Tensor, with_aux: bool) -> list[tuple[int, ...]]:
    """Shapes of the model's outputs on ``x`` (eval mode, or with auxiliary outputs)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _forward_with_aux(model, x) if with_aux else model(x)
    finally:
        model.train(was)
    return [tuple(t.shape) for t in _flatten(out)]


def _output_layers(dg: Any, outputs: list[torch.Tensor]) -> list[nn.Module | nn.Parameter]:
    """The layers that make the model's ``outputs`` (the tensors of the forward ``dg`` traced): walking back from
    every output through channel-preserving operations, the first Conv / ConvTranspose / Linear (or other
    channel-making layer, or a bare parameter) met on each path."""
    by_grad_fn = {id(n.grad_fn): n for n in dg.module2node.values() if n.grad_fn is not None}
    stack = [by_grad_fn[id(t.grad_fn)] for t in outputs if t.grad_fn is not None and id(t.grad_fn) in by_grad_fn]
    found: list[nn.Module | nn.Parameter] = []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        module = node.module
        if isinstance(module, (*_CHANNEL_MAKERS, nn.Parameter)):
            if not any(module is f for f in found):
                found.append(module)
        else:
            stack.extend(node.inputs)
    return found


def _resolve_ignored(
    model: nn.Module, work: nn.Module, ignored_layers: Iterable[nn.Module | str] | None
) -> list[nn.Module]:
    """The caller's ignored layers (modules of ``model`` or their names) as modules of the copy ``work``."""
    if ignored_layers is None:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    work_modules = dict(work.named_modules())
    out = []
    for layer in ignored_layers:
        if isinstance(layer, str):
            name = layer
        elif isinstance(layer, nn.Module) and id(layer) in names:
            name = names[id(layer)]
        else:
            raise ValueError(
                f"ignored_layers must hold submodules of the model or their names, got {type(layer).__name__}"
            )
        if name not in work_modules:
            raise ValueError(f"ignored_layers: the model has no submodule {name!r}")
        out.append(work_modules[name])
    return out


def _out_channels(m: nn.Module) -> int | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return None


class _KeepSome:
    """Importance wrapper for global pruning: the strongest channel of every group gets infinite importance, so
    the global threshold never empties a layer."""

    def __init__(self, importance: Any) -> None:
        self.importance = importance

    def __call__(self, group: Any) -> torch.Tensor | None:
        imp = self.importance(group)
        if imp is not None and imp.numel() > 0:
            imp = imp.clone()
            imp[imp.argmax()] = float("inf")
        return imp


def _pruner_class(tp: Any) -> type:
    """torch-pruning's ``BasePruner`` whose ``round_to`` never empties a layer: a group rounded down below
    ``round_to`` channels keeps ``min(round_to, channels)`` of them instead of none."""

    class _Pruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            n_pruned = super()._round_to(n_pruned, current_channels, round_to)
            return min(n_pruned, current_channels - min(round_to, current_channels))

    return _Pruner


def prune_channels(
    model: nn.Module,
    ratio: float,
    criterion: str = "l1",
    example_input: torch.Tensor | None = None,
    ignored_layers: Iterable[nn.Module | str] | None = None,
    round_to: int | None = None,
    global_pruning: bool = False,
) -> PruneReport:
    """Remove a fraction of the output channels of the model's convolutions (structured pruning, in place).

    The channels are grouped by torch-pruning's dependency graph, traced from one forward pass: a group holds an
    output channel of a layer and everything coupled to it (its BatchNorm entry, the input channel of every layer
    that reads it, the same channel of every branch of a residual addition, the matching slice after a U-Net
    concatenation), and whole groups are removed. The trace runs the model with its top-level ``training`` flag
    set (submodules in eval mode), so auxiliary and deep-supervision heads are part of the graph and keep working.

    Output layers are never pruned, so the number of classes is unchanged: walking back from every output tensor
    (auxiliary outputs included) through channel-preserving operations (norms, activations, dropout, resizing,
    cropping, additions, concatenations), the first Conv / ConvTranspose / Linear met on each path is kept whole
    (its input channels are still pruned). For maskworks models these are the class-logit convolutions such as
    ``segmentation_head.0``, ``aux_classifier.4`` or ``classifier.conv.1``.

    The model is pruned on a copy first; only when the pruned copy runs and gives outputs of the original shapes
    does it replace the model's contents, so on any error the model is unchanged. Afterwards the model is marked
    ``model.maskworks_pruned = True`` (so :func:`maskworks.save_model` stores its shapes) and keeps its training /
    eval mode. Parameters are new tensors: build the optimizer (or :class:`~maskworks.engine.Trainer`) afterwards.

    Args:
        model: the network (DDP / compiled wrappers are unwrapped; the plain model is pruned).
        ratio: fraction of the channels to remove, in ``[0, 1)``. Local pruning (the default) removes
            ``c - floor(c * (1 - ratio))`` channels of every prunable group of ``c`` channels (grouped convolutions
            per group), so a convolution between two pruned layers keeps about ``(1 - ratio) ** 2`` of its weights.
        criterion: channel importance: ``"l1"``, the L1 norms of the channel's weights in every layer of its
            dependency group, averaged (``tp.importance.MagnitudeImportance(p=1)``: the producing conv's filter, the
            BatchNorm scale, the consuming convs' input slices), or ``"bn_scale"``, the absolute BatchNorm scale ``|gamma|``
            (network slimming, ``tp.importance.BNScaleImportance()``); groups without a BatchNorm are then left as
            they are.
        example_input: input for tracing and counting MACs; default ``torch.randn(1, C, 64, 64)`` with ``C`` the
            input channels of the first convolution, on its device and dtype. Models with a fixed input size need
            an input of that size.
        ignored_layers: further layers (modules of ``model`` or their qualified names) whose output channels are
            kept whole, with all their submodules.
        round_to: keep channel counts of each group at multiples of this number (e.g. 8 for tensor cores); the
            count is rounded down, so slightly more than ``ratio`` may be removed, but never below ``round_to``
            (a group of fewer channels is left as it is).
        global_pruning: rank the channels of all groups together, so layers lose different fractions and ``ratio``
            is the overall fraction of channels; the strongest channel of every group is always kept.

    Returns:
        A :class:`PruneReport`: parameters and MACs before / after, the achieved ratio, per-layer channel counts.

    Raises:
        ValueError: a bad ``ratio`` / ``criterion`` / ``round_to`` / ``ignored_layers``, or no input to trace with.
        ImportError: torch-pruning is not installed (``pip install maskworks[compress]``).
        RuntimeError: torch-pruning could not prune this architecture consistently (the pruned copy fails to run
            or changes an output's shape, e.g. attention blocks that reshape by a head count); the model is
            unchanged.

    Note:
        Models that torch-pruning 1.6 does not prune consistently are refused with the RuntimeError above; among
        the registered semantic models this holds for the transformer ones (``setr_*``, ``segformer_*``,
        ``transunet``: multi-head attention reshapes by a fixed head count) and ``bisenetv2`` (grouped
        convolutions with a channel multiplier). Leaving the problematic blocks out with ``ignored_layers`` may
        help; otherwise prune with torch-pruning directly (e.g. its ``num_heads`` option for attention).
    """
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "prune_channels needs torch-pruning: pip install 'maskworks[compress]' (or torch-pruning>=1.5)"
        ) from e

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")

    model = _unwrap(model)
    was_training = model.training
    x = _default_input(model) if example_input is None else example_input

    work = copy.deepcopy(model).eval()
    user_ignored = _resolve_ignored(model, work, ignored_layers)

    # outputs to compare with after pruning: the inference forward and, where it runs, the auxiliary one
    shapes_eval = _output_shapes(work, x, with_aux=False)
    try:
        shapes_aux: list[tuple[int, ...]] | None = _output_shapes(work, x, with_aux=True)
        forward_fn = _forward_with_aux
    except Exception:  # a model whose training forward needs more than an image (targets): trace the eval forward
        shapes_aux, forward_fn = None, None

    outputs: list[torch.Tensor] = []

    def capture(m: nn.Module, inp: torch.Tensor) -> Any:
        out = forward_fn(m, inp) if forward_fn is not None else m(inp)
        outputs.extend(_flatten(out))
        return out

    dg = tp.DependencyGraph().build_dependency(work, example_inputs=x, forward_fn=capture, verbose=False)
    heads = _output_layers(dg, outputs)
    del outputs[:]
    traced = set(dg.module2node)
    del dg
    names = {id(m): n for n, m in work.named_modules()}
    ignored_names = sorted(
        {names[id(m)] for m in [*heads, *user_ignored] if isinstance(m, nn.Module) and id(m) in names}
    )

    before_channels = {n: c for n, m in work.named_modules() if (c := _out_channels(m)) is not None}
    macs_before, params_before = tp.utils.count_ops_and_params(work, x)

    importance = tp.importance.MagnitudeImportance(p=1) if criterion == "l1" else tp.importance.BNScaleImportance()
    if global_pruning:
        importance = _KeepSome(importance)
    if ratio > 0:
        try:
            pruner = _pruner_class(tp)(
                work,
                x,
                importance=importance,
                pruning_ratio=float(ratio),
                global_pruning=global_pruning,
                ignored_layers=[*heads, *user_ignored],
                round_to=round_to,
                forward_fn=forward_fn,
            )
            pruner.step()
        except Exception as e:
            raise RuntimeError(
                f"torch-pruning could not prune {type(model).__name__} ({type(e).__name__}: {str(e)[:200]}); the "
                "model is unchanged. torch-pruning does not handle every layer pattern (e.g. grouped convolutions "
                "with a channel multiplier, attention blocks); leaving such blocks out with ignored_layers may help"
            ) from e
        del pruner
    work.eval()
    try:
        ok = _output_shapes(work, x, with_aux=False) == shapes_eval and (
            shapes_aux is None or _output_shapes(work, x, with_aux=True) == shapes_aux
        )
        problem = "changed the shape of an output"
    except Exception as e:
        ok, problem = False, f"left a model that fails to run ({type(e).__name__}: {str(e)[:200]})"
    if not ok:
        raise RuntimeError(
            f"torch-pruning {problem} for {type(model).__name__}; the model is unchanged. Its dependency graph "
            "misses a coupling (e.g. attention that reshapes by a fixed head count); leaving such blocks out with "
            "ignored_layers may help"
        )
    macs_after, params_after = tp.utils.count_ops_and_params(work, x)

    after_channels = {n: c for n, m in work.named_modules() if (c := _out_channels(m)) is not None}
    prunable = [
        n
        for n, m in work.named_modules()
        if n in before_channels and m in traced and not any(n == i or n.startswith(i + ".") for i in ignored_names)
    ]
    total = sum(before_channels[n] for n in prunable)
    achieved = 1 - sum(after_channels[n] for n in prunable) / total if total else 0.0
    unused = [n for n, m in work.named_modules() if n in before_channels and m not in traced]

    # hand the pruned modules to the caller's object (its references to the old submodules become stale)
    work.train(was_training)
    state = vars(model)
    state.clear()
    state.update(vars(work))
    model.maskworks_pruned = True

    return PruneReport(
        ratio=float(ratio),
        criterion=criterion,
        achieved_ratio=float(achieved),
        params_before=int(params_before),
        params_after=int(params_after),
        macs_before=int(macs_before),
        macs_after=int(macs_after),
        input_shape=tuple(x.shape),
        channels={n: (before_channels[n], after_channels.get(n, before_channels[n])) for n in before_channels},
        ignored=ignored_names,
        unused=unused,
    )


# --------------------------------------------------------------------------- unstructured pruning
def magnitude_prune(
    model: nn.Module,
    amount: float,
    layers: type[nn.Module] | Sequence[type[nn.Module]] = (nn.Conv2d, nn.Linear),
    global_: bool = True,
) -> float:
    """Zero the weights of smallest absolute value (unstructured L1 magnitude pruning, in place).

    Uses :mod:`torch.nn.utils.prune` (``global_unstructured`` with ``L1Unstructured``, or ``l1_unstructured`` per
    layer) and makes the result permanent with ``prune.remove``: the weights hold the zeros, and no
    ``weight_orig`` / ``weight_mask`` or forward pre-hook is left behind. Biases and norms are not touched.

    Zeros do not make the model smaller or faster: the tensors keep their shapes and dense convolution / matmul
    kernels multiply the zeros like any other value. The savings need sparse storage (a compressed file shrinks)
    or sparse kernels; for a real speed-up use :func:`prune_channels`. Training on afterwards lets the zeros grow
    back, since no mask is kept.

    Args:
        model: the network.
        amount: fraction of the weights to zero, in ``[0, 1]``: of all the selected layers' weights together
            (``global_=True``, so layers lose different fractions) or of each layer's weights.
        layers: layer types whose ``weight`` is pruned.
        global_: rank all selected weights together instead of layer by layer.

    Returns:
        The achieved sparsity: the fraction of zeros among the selected layers' weights (zeros that were there
        before count too).

    Raises:
        ValueError: ``amount`` outside ``[0, 1]``, or the model has no layer of the given types.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount <= 1:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount!r}")
    types = (layers,) if isinstance(layers, type) else tuple(layers)
    model = _unwrap(model)
    targets, seen = [], set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, types) and isinstance(w, torch.Tensor) and id(w) not in seen:
            seen.add(id(w))
            targets.append((m, "weight"))
    if not targets:
        raise ValueError(f"{type(model).__name__} has no layer of type {[t.__name__ for t in types]} to prune")
    if global_:
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=float(amount))
    else:
        for m, name in targets:
            torch_prune.l1_unstructured(m, name, amount=float(amount))
    for m, name in targets:
        torch_prune.remove(m, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    return zeros / total


# --------------------------------------------------------------------------- pruned shapes in checkpoints
def pruned_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The shapes of a (pruned) model, as JSON-serialisable data for :func:`apply_structure`.

    Every module that holds parameters or buffers of its own gets an entry, pruned or not, so the description does
    not depend on how the model was pruned (torch-pruning directly, or by hand):
    ``{"attrs": {...}, "shapes": {...}}`` with the shape attributes it has (Conv / ConvTranspose ``in_channels``,
    ``out_channels``, ``groups``; Linear ``in_features``, ``out_features``; BatchNorm / InstanceNorm
    ``num_features``; GroupNorm ``num_groups``, ``num_channels``; LayerNorm ``normalized_shape``; PReLU
    ``num_parameters``; Embedding ``num_embeddings``, ``embedding_dim``) and the shape of each of its parameters
    and buffers (``weight``, ``bias``, ``running_mean``, ...).

    Args:
        model: the model (DDP / compiled wrappers are unwrapped).

    Returns:
        ``{module name: {"attrs": {...}, "shapes": {tensor name: [sizes]}}}``; the root module is ``""``.
    """
    model = _unwrap(model)
    structure: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        tensors = {
            **{k: v for k, v in module._parameters.items() if v is not None},
            **{k: v for k, v in module._buffers.items() if v is not None},
        }
        if not tensors:
            continue
        attrs = {}
        for attr in _SHAPE_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, bool):
                continue
            if isinstance(value, int):
                attrs[attr] = value
            elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
                attrs[attr] = list(value)
        structure[name] = {"attrs": attrs, "shapes": {k: list(v.shape) for k, v in tensors.items()}}
    return structure


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Give a freshly built model the shapes described by :func:`pruned_structure`, so a pruned state dict loads.

    Each listed module gets the stored shape attributes and, for every parameter or buffer whose shape differs,
    a new uninitialised tensor of the stored shape (same dtype, device and ``requires_grad``); the values come
    from ``load_state_dict`` afterwards. The model is marked ``maskworks_pruned = True``.

    Args:
        model: a model built like the pruned one (same registry name and constructor arguments).
        structure: the output of :func:`pruned_structure` (or its JSON round trip).

    Returns:
        ``model`` (changed in place).

    Raises:
        ValueError: the structure is malformed, or names a module or tensor the model does not have.
    """
    model = _unwrap(model)
    if not isinstance(structure, dict):
        raise ValueError(f"a pruned structure must be a dict of module entries, got {type(structure).__name__}")
    modules = dict(model.named_modules())
    for name, entry in structure.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"pruned structure names module {name!r}, which {type(model).__name__} does not have")
        if not isinstance(entry, dict) or not isinstance(entry.get("shapes", {}), dict):
            raise ValueError(f"pruned structure entry {name!r} is not {{'attrs': {{...}}, 'shapes': {{...}}}}")
        for attr, value in (entry.get("attrs") or {}).items():
            if attr not in _SHAPE_ATTRS or not hasattr(module, attr):
                raise ValueError(f"pruned structure sets {attr!r} on {name!r} ({type(module).__name__}), unknown")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for key, shape in (entry.get("shapes") or {}).items():
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"pruned structure: shape of {name}.{key} is not a list of sizes: {shape!r}")
            if key in module._parameters and module._parameters[key] is not None:
                old = module._parameters[key]
                if list(old.shape) != shape:
                    new = torch.empty(shape, dtype=old.dtype, device=old.device)
                    module._parameters[key] = nn.Parameter(new, requires_grad=old.requires_grad)
            elif key in module._buffers and module._buffers[key] is not None:
                old = module._buffers[key]
                if list(old.shape) != shape:
                    module._buffers[key] = torch.empty(shape, dtype=old.dtype, device=old.device)
            else:
                raise ValueError(f"pruned structure names tensor {name}.{key}, which the model does not have")
    model.maskworks_pruned = True
    return model
