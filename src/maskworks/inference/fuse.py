"""Fold BatchNorm layers into the convolutions before them, for faster inference.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``; when
``x`` is the output of a ``Conv2d`` and nothing else reads it, the map can be folded into the convolution's
weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and the BatchNorm replaced by ``nn.Identity``: one
pass over the feature map less per pair, same outputs up to float rounding.

Which pairs are safe cannot be read from the module tree alone (a forward may use a ``conv1`` / ``bn1`` pair in any
order, or read the convolution's output twice), and ``torch.fx`` cannot trace models with data-dependent code. So
:func:`fuse_conv_bn` runs the model once on an example input with the autograd graph recorded and fuses a
BatchNorm only when

* every call of the BatchNorm reads a tensor that a plain ``nn.Conv2d`` produced (no op, in-place or not, between),
* that convolution's output has no other consumer in the graph and is not an output itself, and every call of
  the convolution feeds this BatchNorm,
* the BatchNorm is ``nn.BatchNorm2d`` (or ``SyncBatchNorm`` / :class:`~maskworks.layers.PooledBatchNorm2d`, the
  same map in eval mode) with running statistics, and the convolution is exactly ``nn.Conv2d`` (subclasses such
  as weight-standardised convolutions compute their weight at run time and are left alone).

Every other BatchNorm is left as it was, with the reason in the report. Uses of a convolution's output that
autograd does not see (a ``.detach()``-ed copy, a comparison) are not detected; such models are rare, and the
outputs of the fused model can be checked against the original's.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from maskworks.layers.norm import PooledBatchNorm2d

__all__ = ["FusionReport", "fuse_conv_bn", "prepare_for_inference"]

# BatchNorm classes whose eval-mode forward is the plain per-channel affine map
_FUSABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, PooledBatchNorm2d)
_PLAIN_FORWARDS = {cls.forward for cls in _FUSABLE_NORMS}


@dataclass
class FusionReport:
    """What :func:`fuse_conv_bn` did.

    Attributes:
        fused: names of the BatchNorm layers folded into their convolution (now ``nn.Identity``), each with the
            name of that convolution: ``{bn name: conv name}``.
        left: names of the BatchNorm layers left in place, with the reason: ``{bn name: reason}``.
    """

    fused: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    @property
    def num_left(self) -> int:
        return len(self.left)


def _default_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = getattr(model, "in_channels", None)
    if not isinstance(channels, int):
        channels = first.in_channels if first is not None else 3
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.randn(1, channels, 64, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _consumers(roots: list[torch.Tensor]) -> dict[object, int]:
    """How many times each autograd node is read: by other nodes of the graph, or as an output."""
    count: dict[object, int] = defaultdict(int)
    stack, seen = [], set()
    for t in roots:
        if t.grad_fn is not None:
            count[t.grad_fn] += 1
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                count[child] += 1
                stack.append(child)
    return count


def _check_eval(model: nn.Module) -> None:
    training = [
        name for name, m in model.named_modules() if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if model.training or training:
        where = f" (BatchNorm {training[0]} is in training mode)" if training else ""
        raise ValueError(
            f"fuse_conv_bn needs a model in eval mode{where}: folding uses the running statistics, which training "
            "mode would go on updating; call model.eval() first"
        )


@torch.no_grad()
def _replace(model: nn.Module, mapping: dict[int, nn.Module]) -> None:
    for module in list(model.modules()):
        for key, child in list(module._modules.items()):
            if child is not None and id(child) in mapping:
                module._modules[key] = mapping[id(child)]


def fuse_conv_bn(model: nn.Module, example_input: torch.Tensor | None = None, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a ``Conv2d`` into it (see the module docstring for the rules).

    Args:
        model: a model in eval mode (``model.eval()``); a model (or BatchNorm) in training mode is refused.
        example_input: an input the model accepts, used for one forward pass that records which convolution feeds
            which BatchNorm. Default: a random ``(1, C, 64, 64)`` image batch, ``C`` being ``model.in_channels`` or
            the input channels of the first ``Conv2d``.
        inplace: change ``model`` itself; by default a deep copy is fused and ``model`` is left untouched.

    Returns:
        The fused model (``model`` itself when ``inplace``), in eval mode, with a :class:`FusionReport` in its
        ``conv_bn_fusion`` attribute. Its state dict differs from the original's (fused convolutions gain a bias,
        the BatchNorm entries are gone): keep the original for checkpoints and training.

    Raises:
        ValueError: the model is in training mode.
    """
    _check_eval(model)
    target = model if inplace else copy.deepcopy(model)
    norms = {name: m for name, m in target.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    convs = {m: name for name, m in target.named_modules() if isinstance(m, nn.Conv2d)}
    report = FusionReport()

    conv_calls: dict[nn.Module, list] = defaultdict(list)  # conv -> output nodes, one per call
    node_conv: dict[object, nn.Module] = {}
    norm_calls: dict[nn.Module, list] = defaultdict(list)  # norm -> input nodes, one per call

    def conv_hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            conv_calls[module].append(output.grad_fn)
            node_conv[output.grad_fn] = module
        else:
            conv_calls[module].append(None)

    def norm_hook(module, args, output):
        x = args[0] if args else None
        norm_calls[module].append(x.grad_fn if isinstance(x, torch.Tensor) else None)

    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_hook(norm_hook) for m in norms.values()]
    x = _default_input(target) if example_input is None else example_input
    try:
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(x.is_floating_point())
            outputs = _tensors(target(leaf.clone() if leaf.requires_grad else leaf))  # a non-leaf: in-place ops work
    finally:
        for h in handles:
            h.remove()
    consumers = _consumers(outputs)

    pairs: list[tuple[str, nn.Module, nn.Module]] = []
    paired_convs: set[nn.Module] = set()
    for name, norm in norms.items():
        calls = norm_calls.get(norm, [])
        sources = {node_conv.get(node) for node in calls}
        conv = next(iter(sources)) if len(sources) == 1 else None
        if not isinstance(norm, _FUSABLE_NORMS) or type(norm).forward not in _PLAIN_FORWARDS:
            reason = f"{type(norm).__name__} is not a plain 2-D BatchNorm"
        elif not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
            reason = "no running statistics"
        elif not calls:
            reason = "not run by the example input"
        elif conv is None:
            reason = "its input is not the output of a Conv2d"
        elif type(conv) is not nn.Conv2d:
            reason = f"the convolution {convs[conv]} is a {type(conv).__name__}, which computes its weight at run time"
        elif len(conv_calls[conv]) != len(calls) or any(consumers.get(node, 0) != 1 for node in conv_calls[conv]):
            reason = f"the output of {convs[conv]} is also used elsewhere"
        elif conv in paired_convs:
            reason = f"{convs[conv]} already feeds another BatchNorm"
        else:
            pairs.append((name, conv, norm))
            paired_convs.add(conv)
            continue
        report.left[name] = reason

    mapping: dict[int, nn.Module] = {}
    for name, conv, norm in pairs:
        mapping[id(conv)] = fuse_conv_bn_eval(conv, norm)
        mapping[id(norm)] = nn.Identity()
        report.fused[name] = convs[conv]
    _replace(target, mapping)
    target.eval()
    target.conv_bn_fusion = report
    return target


def prepare_for_inference(
    model: nn.Module,
    *,
    fuse: bool = True,
    channels_last: bool = True,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """An eval-mode copy of ``model`` made for fast inference; ``model`` itself is not changed.

    Args:
        model: any model (training or eval mode).
        fuse: fold BatchNorm layers into their convolutions (:func:`fuse_conv_bn`).
        channels_last: convert convolutional models to ``torch.channels_last`` (the rule of
            :func:`maskworks.engine.perf.prefers_channels_last`); feed them batches in that layout too
            (``images.to(memory_format=torch.channels_last)``) for the speed-up.
        example_input: passed to :func:`fuse_conv_bn`.

    Returns:
        The prepared copy (with ``conv_bn_fusion`` when fused).
    """
    from maskworks.engine.perf import to_channels_last

    prepared = copy.deepcopy(model).eval()
    if fuse:
        prepared = fuse_conv_bn(prepared, example_input, inplace=True)
    if channels_last:
        to_channels_last(prepared)
    return prepared
