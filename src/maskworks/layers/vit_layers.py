"""Vision Transformer layers (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021).

Model-agnostic pieces with timm's parameter names, so timm checkpoints load without renaming:

* :class:`PatchEmbed` (``proj``, ``norm``): a convolution with kernel = stride = patch, i.e. one linear map
  applied to every flattened ``(C, p_h, p_w)`` patch.
* :class:`Attention` (``qkv``, ``q_norm``, ``k_norm``, ``proj``): multi-head self-attention through
  ``F.scaled_dot_product_attention`` (``fused_attn=True``) or an explicit ``softmax(q k^T * scale) v`` path
  that can hand back the attention probabilities; :func:`capture_attention` switches a whole model to it.
* :class:`Mlp` (``fc1``, ``fc2``), :class:`LayerScale` (``gamma``, Touvron et al., CaiT, ICCV 2021),
  :class:`DropPath` (stochastic depth, Huang et al., ECCV 2016) and the pre-norm :class:`Block`
  (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``).
* Position embeddings: :func:`resample_abs_pos_embed` (bicubic resampling of a learned table, any grid, any
  number of prefix tokens), :func:`resample_patch_embed` (FlexiViT's pseudo-inverse kernel resize, Beyer et
  al., CVPR 2023) and the fixed sin-cos tables :func:`get_1d_sincos_pos_embed` /
  :func:`get_2d_sincos_pos_embed` of MAE (He et al., CVPR 2022), value for value as its ``util/pos_embed.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PatchEmbed",
    "Attention",
    "capture_attention",
    "Mlp",
    "LayerScale",
    "DropPath",
    "drop_path",
    "Block",
    "resample_abs_pos_embed",
    "resample_patch_embed",
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "to_2tuple",
]

log = logging.getLogger(__name__)

LayerFactory = Callable[..., nn.Module]


def to_2tuple(value: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """``7 -> (7, 7)``, ``(7, 9) -> (7, 9)``; anything else is a ``ValueError`` naming ``name``.

    Pair entries are passed through unchanged, so sizes traced by ``torch.jit.trace`` / ``torch.export`` work.
    """
    if isinstance(value, (int, np.integer, torch.SymInt)) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2 and not any(isinstance(v, (bool, float)) for v in value):
        return value[0], value[1]
    raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Patch embedding
# ---------------------------------------------------------------------------------------------------------------


class _PatchGrid(nn.Module):
    """Token-grid bookkeeping of a patch embedding (one token per ``patch_size`` cell of the input, the input
    optionally padded): ``img_size``, ``grid_size``, ``num_patches``, :meth:`feat_ratio`, :meth:`dynamic_feat_size`.
    Subclasses set ``patch_size`` and ``dynamic_img_pad``."""

    patch_size: tuple[int, int]
    dynamic_img_pad: bool

    def _set_img_size(self, img_size: int | tuple[int, int] | None) -> None:
        """Set ``img_size``, ``grid_size`` and ``num_patches`` (all ``None`` when ``img_size`` is ``None``)."""
        if img_size is None:
            self.img_size = self.grid_size = self.num_patches = None
        else:
            self.img_size = to_2tuple(img_size, "img_size")
            self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            if self.num_patches == 0:
                raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Reduction of the token grid w.r.t. the image: ``max(patch_size)``, or the pair when not ``as_scalar``."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(H', W')`` produced for an input of size ``img_size = (H, W)`` (rounded up when padding)."""
        (h, w), (ph, pw) = img_size, self.patch_size
        if self.dynamic_img_pad:
            return math.ceil(h / ph), math.ceil(w / pw)
        return h // ph, w // pw


class PatchEmbed(_PatchGrid):
    """Image to patch tokens: ``Conv2d(in_channels, embed_dim, kernel_size=patch, stride=patch)``.

    The convolution is the paper's linear projection ``z_i = p_i W_E + b_E`` of every flattened patch, with the
    patch flattened in ``(C, p_h, p_w)`` order (the conv weight layout; timm and torchvision use the same).

    Args:
        img_size: expected input size, an int or ``(H, W)``; ``None`` accepts any size (no ``grid_size``).
        patch_size: patch size, an int or ``(p_h, p_w)``.
        in_channels: channels of the input image.
        embed_dim: token dimension.
        norm_layer: normalisation class called with ``embed_dim`` and applied to the tokens, or ``None``.
        flatten: return tokens ``(B, N, C)``; otherwise the map ``(B, C, H / p_h, W / p_w)``.
        bias: bias of the projection.
        strict_img_size: inputs must be exactly ``img_size``; otherwise any multiple of the patch size is accepted.
        dynamic_img_pad: pad the input right / bottom to the next multiple of the patch size (any size accepted).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int | tuple[int, int] = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        norm_layer: LayerFactory | None = None,
        flatten: bool = True,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size, "patch_size")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self._set_img_size(img_size)
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None and self.strict_img_size:
            if (h, w) != self.img_size:
                raise ValueError(
                    f"input size {(h, w)} does not match img_size {self.img_size}; build the model with "
                    "dynamic_img_size=True (or PatchEmbed(strict_img_size=False)) for other sizes"
                )
        elif not self.dynamic_img_pad and (h % ph or w % pw):
            raise ValueError(
                f"input size {(h, w)} must be divisible by patch_size {self.patch_size} (or use dynamic_img_pad=True)"
            )
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        x = self.proj(x)  # (B, C, H', W')
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, N, C)
            return self.norm(x)
        if not isinstance(self.norm, nn.Identity):
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # norm over C in (B, H', W', C) -> (B, C, H', W')
        return x


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


class _QKVProjections(nn.Module):
    """The layers of multi-head self-attention under timm's names and their head split / merge, shared by
    :class:`Attention` and the variants of :mod:`maskworks.layers.efficient_attention`: ``qkv``
    (``Linear(dim, 3 dim)``), ``q_norm`` / ``k_norm`` (per head, or ``Identity``), ``attn_drop`` (when given),
    ``proj`` (``Linear(dim, dim)``) and ``proj_drop``, registered in that order. Subclasses check the arguments.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        qk_norm: bool,
        proj_drop: float,
        norm_layer: LayerFactory,
        attn_drop: float | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        if attn_drop is not None:
            self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N, C)`` tokens -> normalised ``q, k, v`` of shape ``(B, h, N, d)`` each."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each
        return self.q_norm(q), self.k_norm(k), v

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, N, d)`` -> projected ``(B, N, C)``."""
        b, _, n, _ = x.shape
        x = x.transpose(1, 2).reshape(b, n, self.dim)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class Attention(_QKVProjections):
    """Multi-head self-attention with a packed ``qkv`` projection (timm's ``Attention``).

    ``fused_attn=True`` (default) calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
    where available). ``fused_attn=False`` computes ``softmax(q k^T * scale) v`` explicitly; it is also taken
    whenever the probabilities are asked for (``return_attention=True`` or ``capture_attention=True``), so
    asking never returns nothing. The probabilities are those before attention dropout: every row sums to 1.

    Args:
        dim: token dimension.
        num_heads: number of heads; must divide ``dim``.
        qkv_bias: bias of the ``qkv`` projection.
        qk_norm: normalise queries and keys per head (``q_norm`` / ``k_norm``).
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class for ``qk_norm``, called with the head dimension.

    Attributes:
        fused_attn: use SDPA when no probabilities are wanted.
        capture_attention: store the probabilities ``(B, heads, N, N)`` of every forward in ``attn_probs``.
        attn_probs: the last captured probabilities, or ``None``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: LayerFactory = nn.LayerNorm,
    ) -> None:
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer, attn_drop=attn_drop)
        self.fused_attn = True
        self.capture_attention = False
        self.attn_probs: torch.Tensor | None = None
        self._attn_sink: list[torch.Tensor] | None = None  # set by capture_attention()
        self._detach_probs = True

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend over the tokens ``x`` ``(B, N, dim)``.

        Args:
            x: tokens.
            return_attention: also return the probabilities ``(B, heads, N, N)`` (explicit path).

        Returns:
            The output tokens ``(B, N, dim)``, or ``(output, probabilities)`` when ``return_attention``.
        """
        q, k, v = self._split_heads(x)  # (B, h, N, d) each

        attn = None
        if self.fused_attn and not (return_attention or self.capture_attention):
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
            if self.capture_attention:
                kept = attn.detach() if self._detach_probs else attn
                self.attn_probs = kept
                if self._attn_sink is not None:
                    self._attn_sink.append(kept)
            x = self.attn_drop(attn) @ v  # (B, h, N, d)
        x = self._merge_heads(x)  # (B, N, dim)
        return (x, attn) if return_attention else x


@contextlib.contextmanager
def capture_attention(model: nn.Module, detach: bool = True) -> Iterator[list[torch.Tensor]]:
    """Run every :class:`Attention` of ``model`` on the explicit path and collect its probabilities.

    Inside the block each attention call appends its probabilities ``(B, heads, N, N)`` (before attention
    dropout; rows sum to 1) to the yielded list, in call order: one forward of a ViT gives ``depth`` maps,
    block 0 first. On exit the ``fused_attn`` / ``capture_attention`` flags of every module are restored (also
    after an exception) and ``attn_probs`` is cleared. The outputs of the model are those of the fused path up to
    float rounding.

    Args:
        model: any module containing :class:`Attention` modules.
        detach: store detached maps (for inspection, rollout); ``False`` keeps them in the autograd graph
            (gradient-weighted explanations).

    Yields:
        The list the maps are appended to.

    Example:
        >>> with capture_attention(vit) as maps:
        ...     logits = vit(images)
        >>> len(maps) == len(vit.blocks)
    """
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no maskworks Attention modules to capture")
    maps: list[torch.Tensor] = []
    saved = [(m.fused_attn, m.capture_attention, m._attn_sink, m._detach_probs) for m in modules]
    try:
        for m in modules:
            m.fused_attn, m.capture_attention, m._attn_sink, m._detach_probs = False, True, maps, detach
        yield maps
    finally:
        for m, (fused, capture, sink, det) in zip(modules, saved):
            m.fused_attn, m.capture_attention, m._attn_sink, m._detach_probs = fused, capture, sink, det
            m.attn_probs = None


# ---------------------------------------------------------------------------------------------------------------
# MLP, LayerScale, DropPath, Block
# ---------------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """``fc1 -> act -> drop -> norm -> fc2 -> drop``, the transformer feed-forward network (timm's ``Mlp``).

    Args:
        in_features: input dimension.
        hidden_features: hidden dimension (default ``in_features``).
        out_features: output dimension (default ``in_features``).
        act_layer: activation class (exact ``nn.GELU`` as in ViT).
        drop: dropout after the activation and after ``fc2``.
        bias: biases of ``fc1`` and ``fc2``.
        norm_layer: optional normalisation of the hidden features (``norm``), ``None`` for none.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: LayerFactory = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
        norm_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` on channels-last tensors, ``gamma`` initialised to ``init_values``.

    Args:
        dim: channels (last dimension).
        init_values: initial value of every ``gamma`` entry.
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(
    x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``.

    Kept samples are scaled by ``1 / (1 - drop_prob)`` (when ``scale_by_keep``), so the expectation is unchanged.
    The identity outside training or when ``drop_prob == 0``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample, broadcast over the rest
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (identity in eval mode).

    Args:
        drop_prob: probability of dropping a sample's branch, in ``[0, 1]``.
        scale_by_keep: rescale kept samples by ``1 / (1 - drop_prob)``.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob!r}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block``):
    ``x = x + drop_path1(ls1(attn(norm1(x))))``; ``x = x + drop_path2(ls2(mlp(norm2(x))))``.

    Args:
        dim: token dimension.
        num_heads: attention heads.
        mlp_ratio: hidden dimension of the MLP as a multiple of ``dim``.
        qkv_bias: bias of the ``qkv`` projection.
        qk_norm: normalise queries and keys.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention probabilities.
        init_values: LayerScale initial value, ``None`` for no LayerScale (``ls1`` / ``ls2`` are identities).
        drop_path: stochastic depth probability of both residual branches.
        act_layer: MLP activation class.
        norm_layer: normalisation class called with ``dim`` (ViT models pass ``LayerNorm(eps=1e-6)``).
        mlp_layer: MLP class.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: LayerFactory = nn.GELU,
        norm_layer: LayerFactory = nn.LayerNorm,
        mlp_layer: LayerFactory = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# ---------------------------------------------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------------------------------------------


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: int | Sequence[int],
    old_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a learned absolute position table ``(1, prefix + H*W, C)`` to a new grid (timm's function).

    The prefix tokens (class, distillation, registers) are kept bit-exactly; the grid part is interpolated in
    float32 (``F.interpolate``, ``align_corners=False``) and cast back. Resampling to the same grid returns
    ``posemb`` itself.

    Args:
        posemb: the table, ``(1, num_prefix_tokens + old_h * old_w, C)``.
        new_size: target grid ``(new_h, new_w)`` (an int for square).
        old_size: grid of ``posemb``; ``None`` means square, which must then be exact.
        num_prefix_tokens: leading tokens that are not on the grid (0 when the table has none, e.g.
            ``no_embed_class`` models).
        interpolation: ``F.interpolate`` mode (``"bicubic"``, ``"bilinear"``, ...).
        antialias: anti-aliasing when downsampling (bilinear / bicubic only), as timm's default.

    Returns:
        The table ``(1, num_prefix_tokens + new_h * new_w, C)``.
    """
    if posemb.ndim != 3:
        raise ValueError(f"posemb must be (1, N, C), got shape {tuple(posemb.shape)}")
    if num_prefix_tokens < 0 or num_prefix_tokens > posemb.shape[1]:
        raise ValueError(f"num_prefix_tokens must be in [0, {posemb.shape[1]}], got {num_prefix_tokens}")
    new_size = to_2tuple(new_size, "new_size")
    num_grid = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"posemb has {num_grid} grid tokens, not a square number: pass old_size=(h, w) "
                f"(num_prefix_tokens={num_prefix_tokens})"
            )
        old_size = (side, side)
    else:
        old_size = to_2tuple(old_size, "old_size")
        if old_size[0] * old_size[1] != num_grid:
            raise ValueError(f"old_size {old_size} does not match the {num_grid} grid tokens of posemb")
    if old_size == new_size:
        return posemb

    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim, dtype = posemb.shape[-1], posemb.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)  # (1, C, h, w)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)  # (1, C, h', w')
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)  # (1, h' * w', C)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def resample_patch_embed(
    weight: torch.Tensor, new_size: int | Sequence[int], interpolation: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """Resize a patch-embedding kernel ``(O, I, p_h, p_w)`` to a new patch size, FlexiViT style.

    The new kernel ``w'`` solves ``<x, w> = <resize(x), w'>`` in the least-squares sense: with ``B`` the matrix
    of ``resize`` (old patch -> new patch), ``w' = pinv(B)^T w``. A B/8 kernel loaded into a B/16 model thus
    gives the same tokens on a 2x larger image. Equal to ``timm.layers.resample_patch_embed``.

    Args:
        weight: the kernel.
        new_size: new ``(p_h, p_w)`` (an int for square).
        interpolation: ``F.interpolate`` mode used to build the resize matrix.
        antialias: anti-aliasing of that resize.

    Returns:
        The kernel ``(O, I, new_p_h, new_p_w)``, in the dtype of ``weight`` (computed in float32).
    """
    if weight.ndim != 4:
        raise ValueError(f"weight must be (out, in, p_h, p_w), got shape {tuple(weight.shape)}")
    new_size = to_2tuple(new_size, "new_size")
    old_size = (weight.shape[-2], weight.shape[-1])
    if old_size == new_size:
        return weight
    n_old, n_new = old_size[0] * old_size[1], new_size[0] * new_size[1]
    basis = torch.eye(n_old, device=weight.device, dtype=torch.float32).reshape(n_old, 1, *old_size)  # (n_old,1,h,w)
    resized = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias)  # (n_old, 1, h', w')
    resize_mat = resized.reshape(n_old, n_new).T  # (n_new, n_old): column j = resize(e_j)
    pinv = torch.linalg.pinv(resize_mat)  # (n_old, n_new)
    out, inp = weight.shape[:2]
    kernel = weight.reshape(out, inp, n_old).float() @ pinv  # (O, I, n_new)
    return kernel.reshape(out, inp, *new_size).to(weight.dtype)  # (O, I, h', w')


def get_1d_sincos_pos_embed(embed_dim: int, positions: np.ndarray | Sequence[float] | torch.Tensor) -> np.ndarray:
    """MAE's ``get_1d_sincos_pos_embed_from_grid``: ``[sin(pos * omega) | cos(pos * omega)]``.

    ``omega_i = 1 / 10000^(2i / D)`` for ``i < D / 2``. Computed in float64 with numpy, as MAE does.

    Args:
        embed_dim: output dimension ``D``; must be even.
        positions: positions of any shape (flattened to ``M``).

    Returns:
        ``(M, D)`` float64 array.
    """
    if embed_dim <= 0 or embed_dim % 2:
        raise ValueError(f"embed_dim must be a positive even number, got {embed_dim}")
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int], cls_token: bool = False) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table, value for value (``util/pos_embed.py::get_2d_sincos_pos_embed``).

    Half of the channels encode one grid axis and half the other, each with :func:`get_1d_sincos_pos_embed`.
    As in MAE (``np.meshgrid(grid_w, grid_h)``), the **first** half encodes the column (w) index and the second
    the row (h) index; tokens are in row-major order. MAE checkpoints depend on this layout.

    Args:
        embed_dim: output dimension; must be divisible by 4.
        grid_size: ``g`` for a ``g x g`` grid, or ``(h, w)``.
        cls_token: prepend a zero row for a class token.

    Returns:
        ``(h * w, D)`` float64 array, or ``(1 + h * w, D)`` with ``cls_token``.
    """
    if embed_dim <= 0 or embed_dim % 4:
        raise ValueError(f"embed_dim must be a positive multiple of 4, got {embed_dim}")
    gh, gw = to_2tuple(grid_size, "grid_size")
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # w goes first, as MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)  # (2, 1, h, w): [w index, h index]
    emb_a = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])  # (h*w, D/2), encodes w
    emb_b = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])  # (h*w, D/2), encodes h
    pos_embed = np.concatenate([emb_a, emb_b], axis=1)  # (h*w, D)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)  # (1 + h*w, D)
    return pos_embed
