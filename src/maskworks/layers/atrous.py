"""Atrous (dilated) convolution arithmetic and the hybrid-dilated-convolution gridding check.

An atrous convolution with rate ``r`` samples its ``K`` taps ``r`` pixels apart,
``y[i] = sum_k x[i + r * k] * w[k]`` (Chen et al., "DeepLab", TPAMI 2018): the kernel covers
``K + (K - 1)(r - 1)`` pixels per side with the same ``K * K`` weights, so context grows without
extra parameters or loss of resolution. A 3x3 kernel spans 3x3 at ``r = 1``, 5x5 at ``r = 2`` and
9x9 at ``r = 4`` (not "2x / 4x the receptive field").

Stacking atrous convolutions can leave holes ("gridding", Wang et al., "Understanding
Convolution for Semantic Segmentation", WACV 2018): with rates that share a factor, or that
grow too fast, the stacked receptive field only touches a sparse lattice of input pixels. Hybrid
dilated convolution (HDC) avoids it when the rates have no common factor > 1 and
``M_2 <= K``, where ``M_n = r_n`` and
``M_i = max(M_{i+1} - 2 r_i, M_{i+1} - 2 (M_{i+1} - r_i), r_i)`` is the largest distance
between two non-zero taps seen by layer ``i``. Examples for ``K = 3``: (1, 2, 4) and (1, 2, 5)
are fine; (2, 4, 8), (1, 2, 9) and (6, 12, 18) grid when stacked. The ASPP rates 6/12/18 are
safe only because ASPP's branches are *parallel*: each looks at the input directly, and none is
stacked on another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "GriddingReport",
    "check_gridding",
    "effective_kernel_size",
    "hdc_max_distance",
    "receptive_field",
    "receptive_field_mask",
]


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_kernel(kernel_size: object, name: str = "kernel_size") -> int:
    _check_positive_int(kernel_size, name)
    if kernel_size % 2 == 0:
        # an even kernel has no centre: padding dilation * (k - 1) // 2 cannot keep the size
        raise ValueError(f"{name} must be odd, got {kernel_size!r}")
    return kernel_size


def _as_ints(values: int | Sequence[int], name: str, length: int | None = None) -> tuple[int, ...]:
    """A positive-int sequence (an int is repeated ``length`` times)."""
    if isinstance(values, int) and not isinstance(values, bool):
        if length is None:
            raise TypeError(f"{name} must be a sequence of positive ints, got {values!r}")
        values = (values,) * length
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{name} must be a positive int or a sequence of them, got {values!r}")
    values = tuple(values)
    for v in values:
        _check_positive_int(v, f"every entry of {name}")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} needs {length} entries (one per layer), got {len(values)}: {values!r}")
    return values


def effective_kernel_size(kernel_size: int, dilation: int) -> int:
    """Side of the window a dilated kernel covers: ``k + (k - 1)(r - 1)`` (= ``(k - 1) r + 1``).

    Args:
        kernel_size: kernel side ``k`` (odd).
        dilation: atrous rate ``r``.

    Returns:
        The covered side length, e.g. 5 for ``k = 3, r = 2`` and 9 for ``k = 3, r = 4``.
    """
    k = _check_kernel(kernel_size)
    r = _check_positive_int(dilation, "dilation")
    return k + (k - 1) * (r - 1)


def receptive_field(
    kernel_sizes: int | Sequence[int],
    dilations: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
) -> int:
    """Receptive field (side, in input pixels) of stacked convolutions.

    ``RF = 1 + sum_i (K_i - 1) * r_i * jump_i`` with ``jump_i`` the product of the strides of the
    layers before ``i``. Three stacked 3x3 convolutions with rates (1, 2, 4) see 15 pixels.

    Args:
        kernel_sizes: kernel side of each layer, or one int for all layers.
        dilations: atrous rate of each layer, or one int for all layers.
        strides: stride of each layer, one int for all, or ``None`` for stride 1 everywhere.

    Returns:
        The receptive field side length.
    """
    lengths = [len(v) for v in (kernel_sizes, dilations, strides) if isinstance(v, Sequence)]
    if not lengths:
        raise TypeError("give the kernel sizes or the dilations as a sequence (one entry per layer)")
    n = lengths[0]
    ks = _as_ints(kernel_sizes, "kernel_sizes", n)
    for k in ks:
        _check_kernel(k, "every entry of kernel_sizes")
    rs = _as_ints(dilations, "dilations", n)
    ss = _as_ints(1 if strides is None else strides, "strides", n)
    rf, jump = 1, 1
    for k, r, s in zip(ks, rs, ss):
        rf += (k - 1) * r * jump
        jump *= s
    return rf


def hdc_max_distance(rates: Sequence[int], kernel_size: int = 3) -> int:
    """``M_2`` of hybrid dilated convolution: the largest gap between non-zero taps after layer 2.

    ``M_n = r_n``; ``M_i = max(M_{i+1} - 2 r_i, M_{i+1} - 2 (M_{i+1} - r_i), r_i)``. A stack of
    ``K x K`` atrous convolutions covers its receptive field without holes when ``M_2 <= K`` (and
    the rates share no factor > 1; see :func:`check_gridding`).

    Args:
        rates: atrous rates of the stacked layers, first layer first (at least two).
        kernel_size: kernel side ``K`` (odd); it does not enter the recursion, only the check.

    Returns:
        ``M_2``, e.g. 2 for (1, 2, 4), 4 for (2, 4, 8), 12 for (6, 12, 18).
    """
    _check_kernel(kernel_size)
    rs = _as_ints(rates, "rates")
    if len(rs) < 2:
        raise ValueError(f"rates must name at least two stacked layers (M_2 is defined from layer 2), got {rs!r}")
    m = rs[-1]
    for r in reversed(rs[1:-1]):
        m = max(m - 2 * r, m - 2 * (m - r), r)
    return m


class GriddingReport(NamedTuple):
    """Result of :func:`check_gridding`.

    Attributes:
        ok: True when the stacked rates cover their receptive field without holes.
        m2: HDC's ``M_2`` (``None`` for a single layer).
        common_factor: greatest common divisor of the rates (1 is required).
        message: a human-readable verdict that names the failing condition.
    """

    ok: bool
    m2: int | None
    common_factor: int
    message: str


def check_gridding(rates: Sequence[int], kernel_size: int = 3) -> GriddingReport:
    """Check stacked atrous rates against the HDC rule (Wang et al. 2018).

    The rates pass when they share no common factor > 1 and ``M_2 <= K``
    (:func:`hdc_max_distance`). The verdict applies to *stacked* (sequential) layers; parallel
    branches such as ASPP's each see the input directly and do not grid this way.

    Args:
        rates: atrous rates of the stacked layers, first layer first.
        kernel_size: kernel side ``K`` (odd).

    Returns:
        A :class:`GriddingReport`; e.g. ``ok`` for (1, 2, 4) and (1, 2, 5), not for (2, 4, 8),
        (1, 2, 9) or (6, 12, 18).
    """
    k = _check_kernel(kernel_size)
    rs = _as_ints(rates, "rates")
    if not rs:
        raise ValueError("rates must name at least one layer, got an empty sequence")
    g = math.gcd(*rs)
    shown = ", ".join(map(str, rs))
    if len(rs) == 1:
        ok = rs[0] == 1
        verdict = "covers its window densely" if ok else f"samples only every {rs[0]}th pixel (holes)"
        return GriddingReport(ok, None, g, f"a single {k}x{k} layer at rate {rs[0]} {verdict}")
    m2 = hdc_max_distance(rs, k)
    if g == 1 and m2 <= k:
        return GriddingReport(
            True, m2, g, f"rates ({shown}) satisfy HDC: no common factor and M_2 = {m2} <= {k} (kernel size)"
        )
    reasons = []
    if g > 1:
        reasons.append(f"they share the factor {g}")
    if m2 > k:
        reasons.append(f"M_2 = {m2} > {k} (kernel size)")
    message = (
        f"stacking rates ({shown}) grids: {' and '.join(reasons)}, so the stacked receptive field has holes; "
        "such rates are fine only as PARALLEL branches (as in ASPP), not stacked; "
        "use rates without a common factor and with M_2 <= K, e.g. (1, 2, 5)"
    )
    return GriddingReport(False, m2, g, message)


def receptive_field_mask(kernel_size: int, dilation: int) -> torch.Tensor:
    """The input pixels one dilated ``K x K`` kernel reads: ones at ``(i r, j r)``, zeros elsewhere.

    Args:
        kernel_size: kernel side ``K`` (odd).
        dilation: atrous rate ``r``.

    Returns:
        A float tensor ``(E, E)`` with ``E = effective_kernel_size(K, r)`` and ``K * K`` ones.
    """
    side = effective_kernel_size(kernel_size, dilation)
    mask = torch.zeros(side, side)
    mask[::dilation, ::dilation] = 1.0  # taps at 0, r, ..., (K - 1) r
    return mask
