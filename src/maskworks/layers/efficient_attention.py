"""Sub-quadratic self-attention variants with the call signature of :class:`maskworks.layers.vit_layers.Attention`.

Every class here maps tokens ``(B, N, C)`` to ``(B, N, C)`` and owns the same ``qkv`` (``Linear(C, 3C)``),
``q_norm`` / ``k_norm`` and ``proj`` (``Linear(C, C)``) layers as the standard attention, so the weights of a
trained :class:`~maskworks.layers.vit_layers.Attention` can be loaded as they are (``load_state_dict`` or
:meth:`from_attention`) and the variants compared on the same projections:

* :class:`LinearAttention`: Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with
  Linear Attention", ICML 2020. Kernel ``phi(x) = elu(x) + 1`` and the key-value summary ``phi(K)^T V``.
* :class:`WindowAttention2d`: full attention inside non-overlapping windows of the token grid (the W-MSA of Liu et
  al., "Swin Transformer", ICCV 2021, without shift and relative position bias). The grid is padded to a multiple
  of the window and the padded keys are masked out.
* :class:`PerformerAttention`: FAVOR+ of Choromanski et al., "Rethinking Attention with Performers", ICLR 2021:
  positive orthogonal random features whose inner products estimate the softmax kernel without bias.
* :class:`PooledKVAttention`: spatial-reduction attention of PVT (Wang et al., "Pyramid Vision Transformer",
  ICCV 2021) and SegFormer (Xie et al., NeurIPS 2021): keys and values come from the token grid reduced by a
  stride-``sr_ratio`` convolution (or average pooling).

Costs are multiply-accumulates (MACs) of one layer on ``N`` tokens of dimension ``D`` with ``h`` heads of
dimension ``d = D / h``; every variant pays ``4 N D^2`` for its projections (``qkv`` and ``proj``). Standard
attention adds ``2 N^2 D`` (scores and weighted sum) and stores ``h N^2`` probabilities when materialised.
:func:`maskworks.explain.complexity.attention_macs` evaluates the formulas quoted in each class.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.vit_layers import LayerFactory, _QKVProjections

__all__ = [
    "LinearAttention",
    "WindowAttention2d",
    "PerformerAttention",
    "PooledKVAttention",
    "elu_feature_map",
    "favor_positive_features",
    "gaussian_orthogonal_random_matrix",
    "infer_grid_size",
]

log = logging.getLogger(__name__)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def infer_grid_size(num_tokens: int, grid_size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """The token grid ``(H, W)`` of ``num_tokens`` tokens: ``grid_size`` checked against the count, or the square
    grid when ``grid_size`` is ``None``.

    Raises:
        ValueError: ``H * W != num_tokens``, or no ``grid_size`` and ``num_tokens`` is not a square number.
    """
    if grid_size is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens do not form a square grid; pass grid_size=(H, W)")
        return side, side
    h, w = _pair(grid_size, "grid_size")
    if h * w != num_tokens:
        raise ValueError(f"grid_size {(h, w)} holds {h * w} tokens, but the input has {num_tokens}")
    return h, w


class _QKVAttention(_QKVProjections):
    """Shared parameters of all variants: ``qkv``, ``q_norm``, ``k_norm``, ``proj``, ``proj_drop`` (the names and
    shapes of the standard attention, built by :class:`~maskworks.layers.vit_layers.Attention`'s base), plus
    :meth:`from_attention`."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        norm_layer: LayerFactory = nn.LayerNorm,
    ) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads!r})")
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer)

    @classmethod
    def from_attention(cls, attn: nn.Module, **kwargs):
        """Build this variant with the projections of a standard attention module (copied, not shared).

        Args:
            attn: a module with ``qkv``, ``proj`` (``Linear``), ``num_heads`` and optionally ``q_norm`` /
                ``k_norm``, e.g. :class:`maskworks.layers.vit_layers.Attention` or timm's ``Attention``.
            **kwargs: further constructor arguments of the variant (``window_size``, ``num_features``, ...).

        Returns:
            The new module on the device and dtype of ``attn``.
        """
        for name in ("qkv", "proj"):
            if not isinstance(getattr(attn, name, None), nn.Linear):
                raise TypeError(f"attn must have a Linear {name!r} (a standard Attention), got {type(attn).__name__}")
        q_norm = getattr(attn, "q_norm", None)
        qk_norm = q_norm is not None and not isinstance(q_norm, nn.Identity)
        module = cls(
            attn.qkv.in_features,
            num_heads=attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            qk_norm=qk_norm,
            **kwargs,
        )
        module.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        module.qkv.load_state_dict(attn.qkv.state_dict())
        module.proj.load_state_dict(attn.proj.state_dict())
        if qk_norm:  # copies keep the source's normalisation class and eps
            module.q_norm, module.k_norm = copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm)
        return module


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float16 / bfloat16 tensors in float32 (the kernel sums over all tokens and would overflow or lose bits)."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


# ---------------------------------------------------------------------------------------------------------------
# Linear attention (Katharopoulos et al. 2020)
# ---------------------------------------------------------------------------------------------------------------


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1``: positive, so every similarity ``phi(q) . phi(k)`` is positive."""
    return F.elu(x) + 1.0


class LinearAttention(_QKVAttention):
    """Non-causal linear attention with the feature map ``phi(x) = elu(x) + 1`` (Katharopoulos et al., ICML 2020).

    Per head, ``out_i = phi(q_i)^T S / (phi(q_i)^T z)`` with the key-value summary ``S = sum_n phi(k_n) v_n^T``
    ``(d, d)`` and ``z = sum_n phi(k_n)``: the same numbers as the explicit form
    ``(phi(Q) phi(K)^T / rowsum) V`` with its ``N x N`` matrix, computed without it. There is no softmax and no
    ``1 / sqrt(d)`` scale (the kernel replaces ``exp(q . k / sqrt(d))``), so the outputs are not those of softmax
    attention with the same weights.

    Complexity: time ``4 N D^2 + 2 N D d + N D`` MACs (projections, summary ``phi(K)^T V`` and ``phi(Q) S``,
    normaliser), i.e. ``O(N D^2 / h)`` for the attention part, linear in ``N``; memory ``O(N D + h d^2)``.

    Args:
        dim: token dimension ``D``.
        num_heads: heads ``h``; must divide ``dim``.
        qkv_bias: bias of the ``qkv`` projection.
        qk_norm: normalise queries and keys per head before the feature map.
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class of ``qk_norm``.
        eps: added to the normaliser ``phi(q)^T z`` (guards half precision; the kernel runs in float32 anyway).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        norm_layer: LayerFactory = nn.LayerNorm,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` ``(B, N, C)``; returns ``(B, N, C)``."""
        q, k, v = self._split_heads(x)  # (B, h, N, d)
        dtype = v.dtype
        q, k, v = _upcast(elu_feature_map(q), elu_feature_map(k), v)
        kv = k.transpose(-2, -1) @ v  # (B, h, d, d): sum_n phi(k_n) v_n^T
        z = k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, d, 1): sum_n phi(k_n)
        denom = q @ z  # (B, h, N, 1)
        out = (q @ kv) / (denom + self.eps)  # (B, h, N, d)
        return self._merge_heads(out.to(dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------------------------
# Window attention on a token grid
# ---------------------------------------------------------------------------------------------------------------


class WindowAttention2d(_QKVAttention):
    """Softmax attention inside non-overlapping ``M_h x M_w`` windows of an ``H x W`` token grid.

    The grid is padded at the bottom / right to a multiple of the window, and the padded positions are masked as
    keys (they receive no attention weight), so a window at the border attends over its real tokens only; padded
    queries are cropped before the output projection. A window larger than the grid is clipped to it, so a window
    covering the whole grid is exactly global attention. No shift and no relative position bias (see the Swin
    blocks for those): tokens in different windows do not interact.

    Complexity: time ``4 N D^2 + 2 N_pad M_h M_w D`` MACs with ``N_pad = ceil(H / M_h) M_h ceil(W / M_w) M_w``
    (``O(N M^2 D)``, linear in ``N`` for a fixed window; Swin's ``4 hwC^2 + 2 M^2 hwC``); memory
    ``O(h N_pad M^2)`` for the scores when materialised.

    Args:
        dim: token dimension ``D``.
        num_heads: heads; must divide ``dim``.
        window_size: window ``M`` or ``(M_h, M_w)``.
        qkv_bias: bias of the ``qkv`` projection.
        qk_norm: normalise queries and keys per head.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class of ``qk_norm``.

    Attributes:
        fused_attn: use ``F.scaled_dot_product_attention``; ``False`` takes the explicit softmax path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: LayerFactory = nn.LayerNorm,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer)
        self.window_size = _pair(window_size, "window_size")
        self.attn_drop = nn.Dropout(attn_drop)
        self.fused_attn = True

    def effective_window(self, grid_size: tuple[int, int]) -> tuple[int, int]:
        """The window used on a grid: ``window_size`` clipped to the grid."""
        return min(self.window_size[0], grid_size[0]), min(self.window_size[1], grid_size[1])

    def forward(self, x: torch.Tensor, grid_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: tokens ``(B, H * W, C)`` in row-major grid order (no prefix tokens).
            grid_size: ``(H, W)``; ``None`` for a square grid.

        Returns:
            ``(B, H * W, C)``.
        """
        b, n, c = x.shape
        h, w = infer_grid_size(n, grid_size)
        mh, mw = self.effective_window((h, w))
        pad_h, pad_w = (-h) % mh, (-w) % mw
        hp, wp = h + pad_h, w + pad_w
        nh, nw = hp // mh, wp // mw

        qkv = self.qkv(x).view(b, h, w, 3 * c)  # (B, H, W, 3C)
        if pad_h or pad_w:
            qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, 3C)
        qkv = qkv.view(b, nh, mh, nw, mw, 3 * c).permute(0, 1, 3, 2, 4, 5)  # (B, nh, nw, mh, mw, 3C)
        qkv = qkv.reshape(b * nh * nw, mh * mw, 3, self.num_heads, self.head_dim)  # (B*nW, M, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, h, M, d) each
        q, k = self.q_norm(q), self.k_norm(k)

        mask = None
        if pad_h or pad_w:
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            valid = valid.view(nh, mh, nw, mw).permute(0, 2, 1, 3).reshape(nh * nw, mh * mw)  # (nW, M)
            # every window holds at least one real token (padding < window), so no row is fully masked
            mask = valid[None, :, None, None, :].expand(b, -1, 1, 1, -1).reshape(b * nh * nw, 1, 1, mh * mw)

        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )  # (B*nW, h, M, d)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, h, M, M)
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
            out = self.attn_drop(attn.softmax(dim=-1)) @ v  # (B*nW, h, M, d)

        out = out.transpose(1, 2).reshape(b, nh, nw, mh, mw, c)  # (B, nh, nw, mh, mw, C)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)  # (B, Hp, Wp, C)
        if pad_h or pad_w:
            out = out[:, :h, :w]  # (B, H, W, C)
        out = out.reshape(b, n, c)  # (B, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"


# ---------------------------------------------------------------------------------------------------------------
# Performer (FAVOR+, Choromanski et al. 2021)
# ---------------------------------------------------------------------------------------------------------------


def _orthogonal_block(cols: int, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    g = torch.randn(cols, cols, generator=generator, device=device, dtype=torch.float32)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix: Haar-distributed orthogonal matrix
    return q.T.to(dtype)  # rows orthonormal


def gaussian_orthogonal_random_matrix(
    num_rows: int,
    num_cols: int,
    scaling: str = "norm",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Orthogonal random features ``W`` ``(num_rows, num_cols)`` of FAVOR+.

    Rows come in blocks of ``num_cols`` mutually orthogonal directions (exactly orthogonal within a block,
    independent across blocks). With ``scaling="norm"`` row ``i`` gets the length of an independent Gaussian vector,
    so every row is marginally ``N(0, I)`` (the unbiased estimator of the paper); ``"sqrt_dim"`` gives every row the
    length ``sqrt(num_cols)`` (lower variance, slightly biased).

    Args:
        num_rows: number of features ``m``.
        num_cols: input dimension ``d``.
        scaling: ``"norm"`` or ``"sqrt_dim"``.
        generator: random generator (for reproducible features).
        device: device of the result.
        dtype: dtype of the result.
    """
    if num_rows < 1 or num_cols < 1:
        raise ValueError(f"num_rows and num_cols must be positive, got {num_rows}, {num_cols}")
    if scaling not in ("norm", "sqrt_dim"):
        raise ValueError(f"scaling must be 'norm' or 'sqrt_dim', got {scaling!r}")
    if generator is not None:
        device = generator.device
    blocks = [_orthogonal_block(num_cols, generator, device, dtype) for _ in range(math.ceil(num_rows / num_cols))]
    mat = torch.cat(blocks, dim=0)[:num_rows]  # (m, d)
    if scaling == "norm":
        lengths = torch.randn(num_rows, num_cols, generator=generator, device=device, dtype=torch.float32).norm(dim=1)
    else:
        lengths = torch.full((num_rows,), math.sqrt(num_cols), device=device)
    return lengths.to(dtype).unsqueeze(1) * mat  # (m, d)


def favor_positive_features(
    x: torch.Tensor, projection: torch.Tensor, is_query: bool, eps: float = 1e-4
) -> torch.Tensor:
    """Positive random features ``phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x / d^(1/4)``.

    ``E[phi(q)^T phi(k)] = exp(q . k / sqrt(d))``, the unnormalised softmax kernel. For stability a maximum is
    subtracted inside the exponential: per query row for queries, over all keys and features (per batch and head)
    for keys; both constants cancel in the normalisation of attention.

    Args:
        x: queries or keys ``(..., N, d)``.
        projection: random features ``(m, d)`` (see :func:`gaussian_orthogonal_random_matrix`).
        is_query: which stabiliser to use.
        eps: added to every feature so no normaliser is 0.

    Returns:
        ``(..., N, m)`` features.
    """
    d, m = x.shape[-1], projection.shape[0]
    x = x * d**-0.25
    proj = x @ projection.T.to(x.dtype)  # (..., N, m)
    sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (..., N, 1)
    if is_query:
        stab = proj.amax(dim=-1, keepdim=True).detach()  # (..., N, 1)
    else:
        stab = proj.amax(dim=(-1, -2), keepdim=True).detach()  # (..., 1, 1)
    return (torch.exp(proj - sq_norm - stab) + eps) * m**-0.5


class PerformerAttention(_QKVAttention):
    """FAVOR+ attention with positive orthogonal random features (Choromanski et al., ICLR 2021).

    ``softmax(Q K^T / sqrt(d)) V`` is approximated by ``D^-1 phi(Q) (phi(K)^T V)`` with
    ``D = diag(phi(Q) phi(K)^T 1)`` and the random features of :func:`favor_positive_features`; the estimate
    converges to softmax attention with the same weights as ``num_features`` grows (error ``~ 1 / sqrt(m)``).
    The features live in the buffer ``projection_matrix`` ``(m, d)``, shared by all heads. It is saved with the
    module; a state dict without it (a standard Attention's) loads too and keeps the current features.

    Complexity: time ``4 N D^2 + 4 N m D + N m h`` MACs (projections; feature maps of Q and K; ``phi(K)^T V`` and
    ``phi(Q) S``; normaliser), ``O(N m D)``, linear in ``N``; memory ``O(N m h + h m d)``.

    Args:
        dim: token dimension ``D``.
        num_heads: heads ``h``; must divide ``dim``.
        num_features: random features ``m`` per head; default ``int(d * ln d)`` (performer-pytorch's default).
        qkv_bias: bias of the ``qkv`` projection.
        qk_norm: normalise queries and keys per head.
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class of ``qk_norm``.
        redraw_interval: in training, draw new features after every ``redraw_interval`` forward passes
            (``None`` never: features fixed at construction; :meth:`redraw_features` redraws on demand).
        scaling: row lengths of the features, ``"norm"`` (unbiased) or ``"sqrt_dim"``.
        eps: added to every feature (keeps normalisers positive).
        seed: seed of the initial features (``None``: torch's global generator).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_features: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        norm_layer: LayerFactory = nn.LayerNorm,
        redraw_interval: int | None = None,
        scaling: str = "norm",
        eps: float = 1e-4,
        seed: int | None = 0,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer)
        if num_features is None:
            num_features = max(1, int(self.head_dim * math.log(self.head_dim)))
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if redraw_interval is not None and (not isinstance(redraw_interval, int) or redraw_interval < 1):
            raise ValueError(f"redraw_interval must be None or a positive int, got {redraw_interval!r}")
        if scaling not in ("norm", "sqrt_dim"):
            raise ValueError(f"scaling must be 'norm' or 'sqrt_dim', got {scaling!r}")
        self.num_features = num_features
        self.redraw_interval = redraw_interval
        self.scaling = scaling
        self.eps = eps
        self._calls_since_redraw = 0
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer(
            "projection_matrix", gaussian_orthogonal_random_matrix(num_features, self.head_dim, scaling, gen)
        )

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new ``projection_matrix`` in place (same device and dtype)."""
        p = self.projection_matrix
        device = generator.device if generator is not None else p.device
        new = gaussian_orthogonal_random_matrix(self.num_features, self.head_dim, self.scaling, generator, device)
        p.copy_(new)  # copy_ moves device and dtype
        self._calls_since_redraw = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "projection_matrix"
        if key not in state_dict:  # a standard Attention's weights: keep our features
            state_dict[key] = self.projection_matrix
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` ``(B, N, C)``; returns ``(B, N, C)``."""
        if self.training and self.redraw_interval is not None:
            if self._calls_since_redraw >= self.redraw_interval:
                self.redraw_features()
            self._calls_since_redraw += 1
        q, k, v = self._split_heads(x)  # (B, h, N, d)
        dtype = v.dtype
        q, k, v = _upcast(q, k, v)
        proj = self.projection_matrix.to(q.dtype)
        q = favor_positive_features(q, proj, is_query=True, eps=self.eps)  # (B, h, N, m)
        k = favor_positive_features(k, proj, is_query=False, eps=self.eps)  # (B, h, N, m)
        kv = k.transpose(-2, -1) @ v  # (B, h, m, d)
        z = k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, m, 1)
        out = (q @ kv) / (q @ z)  # (B, h, N, d)
        return self._merge_heads(out.to(dtype))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_features={self.num_features}, "
            f"redraw_interval={self.redraw_interval}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Pooled-KV / spatial-reduction attention (PVT, SegFormer)
# ---------------------------------------------------------------------------------------------------------------


class PooledKVAttention(_QKVAttention):
    """Spatial-reduction attention: full-resolution queries attend to keys / values of a reduced token grid.

    The ``H x W`` grid is reduced by ``sr_ratio = r``: a ``Conv2d(D, D, r, stride=r)`` (``pool="conv"``, PVT /
    SegFormer; the grid is zero-padded at the bottom / right to a multiple of ``r``) or an ``r x r`` average pool
    (``pool="avg"``, ceil mode, averaging real tokens only), followed by ``norm`` (LayerNorm). Keys and values are
    the ``k`` / ``v`` parts of ``qkv`` applied to the reduced tokens, queries the ``q`` part applied to all tokens,
    so the module holds a standard attention's ``qkv`` / ``proj`` weights; at ``sr_ratio=1`` there is no reduction
    and it *is* standard attention. Prefix tokens (class, registers) are kept as keys without reduction.

    Complexity: with ``N' = ceil(H / r) ceil(W / r)`` reduced tokens, time
    ``2 N D^2 + 2 N' D^2 + N' r^2 D^2 [conv] + 2 N N' D`` MACs (``O(N^2 D / r^2)``); memory ``O(h N N')``.

    Args:
        dim: token dimension ``D``.
        num_heads: heads; must divide ``dim``.
        sr_ratio: spatial reduction ``r`` (1 = none).
        pool: ``"conv"`` (learned, ``sr``) or ``"avg"``.
        qkv_bias: bias of the ``qkv`` projection.
        qk_norm: normalise queries and keys per head.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class of the reduced tokens and of ``qk_norm``.
        num_prefix_tokens: leading tokens that are not on the grid.

    Attributes:
        fused_attn: use ``F.scaled_dot_product_attention``; ``False`` takes the explicit softmax path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        sr_ratio: int = 1,
        pool: str = "conv",
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: LayerFactory = nn.LayerNorm,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer)
        if not isinstance(sr_ratio, int) or isinstance(sr_ratio, bool) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be a positive int, got {sr_ratio!r}")
        if pool not in ("conv", "avg"):
            raise ValueError(f"pool must be 'conv' or 'avg', got {pool!r}")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        self.sr_ratio = sr_ratio
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = nn.Dropout(attn_drop)
        self.fused_attn = True
        if sr_ratio > 1:
            if pool == "conv":
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            else:
                self.sr = nn.AvgPool2d(sr_ratio, stride=sr_ratio, ceil_mode=True, count_include_pad=False)
            self.norm = norm_layer(dim)
        else:
            self.sr = None
            self.norm = None

    def reduced_grid(self, grid_size: tuple[int, int]) -> tuple[int, int]:
        """Grid of the keys / values for a token grid ``(H, W)``."""
        r = self.sr_ratio
        return math.ceil(grid_size[0] / r), math.ceil(grid_size[1] / r)

    def forward(self, x: torch.Tensor, grid_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """Attend from all tokens to the reduced grid.

        Args:
            x: tokens ``(B, P + H * W, C)``: ``P = num_prefix_tokens`` prefix tokens, then the grid row-major.
            grid_size: ``(H, W)``; ``None`` for a square grid.

        Returns:
            ``(B, P + H * W, C)``.
        """
        b, n, c = x.shape
        p = self.num_prefix_tokens
        if n <= p:
            raise ValueError(f"input has {n} tokens, not more than num_prefix_tokens={p}")
        h, w = infer_grid_size(n - p, grid_size)
        w_q, w_kv = self.qkv.weight.split([c, 2 * c], dim=0)
        b_q, b_kv = self.qkv.bias.split([c, 2 * c]) if self.qkv.bias is not None else (None, None)

        q = F.linear(x, w_q, b_q).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        if self.sr is not None:
            grid = x[:, p:].transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
            if self.pool == "conv":
                r = self.sr_ratio
                grid = F.pad(grid, (0, (-w) % r, 0, (-h) % r))  # (B, C, Hp, Wp)
            grid = self.sr(grid)  # (B, C, H', W')
            kv_in = self.norm(grid.flatten(2).transpose(1, 2))  # (B, N', C)
            if p:
                kv_in = torch.cat([x[:, :p], kv_in], dim=1)  # (B, P + N', C)
        else:
            kv_in = x
        nk = kv_in.shape[1]
        kv = F.linear(kv_in, w_kv, b_kv).reshape(b, nk, 2, self.num_heads, self.head_dim)  # (B, Nk, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, Nk, d) each
        q, k = self.q_norm(q), self.k_norm(k)

        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, Nk)
            out = self.attn_drop(attn) @ v  # (B, h, N, d)
        return self._merge_heads(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, pool={self.pool!r}"
