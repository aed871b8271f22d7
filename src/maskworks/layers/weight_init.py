"""Weight initialisation of conv / norm networks: one loop for the schemes the models use.

``init_conv_norm`` visits every ``nn.Conv2d`` (subclasses included) and every norm layer of the given types, in
``modules()`` order; the schemes differ only in the conv initialiser and the norm types, so the random draws (one
per conv weight) come in the same order whichever model calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn as nn

__all__ = ["init_conv_norm", "init_kaiming"]


def init_conv_norm(
    modules: nn.Module | Iterable[nn.Module],
    conv_init: Callable[[torch.Tensor], object],
    norm_types: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,),
    zero_bias: bool = True,
) -> None:
    """Initialise the convolutions and norm layers of ``modules``.

    Args:
        modules: a module, or several (each visited with its submodules, in order).
        conv_init: in-place initialiser of a conv weight (``nn.init.kaiming_normal_`` with its options, ...).
        norm_types: norm classes whose weight is set to 1 and bias to 0; ``()`` leaves the norms alone.
        zero_bias: set conv biases to 0 (otherwise they keep their PyTorch default).
    """
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                conv_init(m.weight)
                if zero_bias and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, norm_types):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def init_kaiming(
    modules: nn.Module | Iterable[nn.Module],
    norm_types: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,),
    zero_bias: bool = True,
) -> None:
    """Kaiming-normal convs (``fan_out``, ReLU gain) with zero bias, norm weight 1 and bias 0 (the torchvision /
    timm / mmseg initialisation of ResNets, BiSeNet, Fast-SCNN); see :func:`init_conv_norm` for the arguments."""
    init_conv_norm(
        modules, partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu"), norm_types, zero_bias
    )
