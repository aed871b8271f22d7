"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021).

:class:`VisionTransformer` has the parameter names and semantics of timm's
``timm.models.vision_transformer.VisionTransformer`` (``cls_token``, ``reg_token``, ``pos_embed``,
``patch_embed.proj``, ``norm_pre``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}``,
``norm``, ``fc_norm``, ``head``), so a timm state dict of the standard variants loads with ``strict=True`` and
gives the same outputs. Register tokens follow Darcet et al., "Vision Transformers Need Registers", ICLR 2024.

Resolution transfer: ``dynamic_img_size=True`` resamples the position table at forward time for any input
size (cached in eval / no-grad use); :func:`checkpoint_filter_fn` resamples ``pos_embed`` and the patch kernel
of a checkpoint made at another resolution or patch size, as timm's function of the same name does.

The registered variants are named as in timm (``vit_base_patch16_224``, ...) and are backbones that also
classify: ``forward`` returns logits, ``forward_intermediates`` the patch-token maps of selected blocks.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from maskworks.layers.vit_layers import (
    Block,
    PatchEmbed,
    resample_abs_pos_embed,
    resample_patch_embed,
    to_2tuple,
)
from maskworks.registry import register_model

__all__ = ["VisionTransformer", "checkpoint_filter_fn"]

log = logging.getLogger(__name__)

LayerFactory = Callable[..., nn.Module]
_POOLS = ("token", "avg", "max", "avgmax", "")
_POS_CACHE_SIZE = 8


class VisionTransformer(nn.Module):
    """ViT: patch embedding, prefix tokens + learned position table, ``depth`` pre-norm blocks, norm, head.

    Args:
        img_size: input size the position table is built for, an int or ``(H, W)``.
        patch_size: patch size, an int or ``(p_h, p_w)``.
        in_channels: channels of the input image.
        num_classes: classes of the linear head; 0 for no head (``forward`` returns pooled features).
        global_pool: ``"token"`` (class token), ``"avg"`` / ``"max"`` / ``"avgmax"`` over the patch tokens, or
            ``""`` (no pooling: ``forward_head`` gets all tokens).
        embed_dim: token dimension.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden dimension as a multiple of ``embed_dim``.
        qkv_bias: bias of the ``qkv`` projections.
        qk_norm: normalise queries and keys.
        init_values: LayerScale initial value (``None``: no LayerScale).
        class_token: prepend a learned class token.
        reg_tokens: number of learned register tokens, after the class token.
        no_embed_class: the position table covers the patches only (DeiT-III, registers); the prefix tokens
            get no position embedding.
        pre_norm: LayerNorm after the embedding (CLIP); the patch projection then has no bias.
        fc_norm: normalise after pooling instead of before (``None``: when ``global_pool`` averages / maxes).
        dynamic_img_size: accept any input size, resampling the position table to the token grid.
        dynamic_img_pad: pad inputs right / bottom to a multiple of the patch size.
        drop_rate: dropout before the head.
        pos_drop_rate: dropout after adding the position embedding.
        proj_drop_rate: dropout after the attention projection and in the MLPs.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, increasing linearly from 0 to this over the blocks.
        norm_layer: normalisation class (default ``LayerNorm(eps=1e-6)``).
        act_layer: MLP activation class (default exact ``GELU``).
        embed_layer: patch embedding class, called like :class:`~maskworks.layers.vit_layers.PatchEmbed`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_channels: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pre_norm: bool = False,
        fc_norm: bool | None = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
        embed_layer: LayerFactory = PatchEmbed,
    ) -> None:
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without one")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if not isinstance(reg_tokens, int) or reg_tokens < 0:
            raise ValueError(f"reg_tokens must be a non-negative int, got {reg_tokens!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate!r}")
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else fc_norm
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU

        self.num_classes = num_classes
        self.in_channels = in_channels
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = embed_layer(
            img_size=img_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=embed_dim,
            bias=not pre_norm,  # CLIP: the pre-norm replaces the projection bias
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    init_values=init_values,
                    drop_path=dpr[i],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            ]
        )
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": reduction, "module": f"blocks.{i}"} for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # resampled position tables for dynamic_img_size, valid for one pos_embed object and version
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._pos_cache_owner: tuple | None = None  # (weakref to pos_embed, (data_ptr, device, dtype))
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ("jax"-free) init: trunc-normal(.02) for ``pos_embed`` and Linear weights, zero Linear
        biases, normal(1e-6) prefix tokens; LayerNorm 1 / 0 and the patch conv keep PyTorch's init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------------ utilities
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that should not get weight decay (position table, prefix tokens)."""
        return {n for n in ("pos_embed", "cls_token", "reg_token") if getattr(self, n, None) is not None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30% more compute) when training."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a new one for ``num_classes`` (0: none), optionally changing ``global_pool``.

        The placement of the final norm (``norm`` vs ``fc_norm``) chosen at construction is kept.
        """
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token, and this model has none")
            self.global_pool = global_pool
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        self.num_classes = num_classes
        ref = self.pos_embed
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes else nn.Identity()
        )
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> VisionTransformer:
        self._pos_cache.clear()  # a table resampled before training must not survive optimiser steps
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = dict(state)
        state["_pos_cache"], state["_pos_cache_owner"] = {}, None  # derived data; weakrefs do not pickle
        return state

    # ------------------------------------------------------------------------------------------------ embedding
    def _resampled_pos_embed(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """The position table for a ``grid_size`` token grid: ``pos_embed`` itself at the built grid, otherwise
        resampled (bicubic, antialiased; timm's ``dynamic_img_size``). The resampled table is cached only where it
        cannot go stale in the autograd sense (eval mode, and no grad or a frozen table); the cache is keyed by the
        parameter object, its in-place version, storage, device and dtype, so in-place updates invalidate it."""
        pos_embed = self.pos_embed
        if grid_size == self.patch_embed.grid_size:
            return pos_embed
        if not self.dynamic_img_size:
            raise ValueError(
                f"token grid {grid_size} differs from the built grid {self.patch_embed.grid_size}; "
                "build with dynamic_img_size=True or convert the checkpoint with checkpoint_filter_fn"
            )
        resample = partial(
            resample_abs_pos_embed,
            new_size=grid_size,
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )
        cacheable = not self.training and not (torch.is_grad_enabled() and pos_embed.requires_grad)
        if cacheable and (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            cacheable = False
        if not cacheable:
            return resample(pos_embed)
        try:
            owner = (pos_embed.data_ptr(), pos_embed.device, pos_embed.dtype)
            key = (grid_size, pos_embed._version)
        except RuntimeError:  # e.g. inference tensors have no version counter
            return resample(pos_embed)
        ref = self._pos_cache_owner
        if ref is None or ref[0]() is not pos_embed or ref[1] != owner:  # another parameter, storage or device
            self._pos_cache.clear()
            self._pos_cache_owner = (weakref.ref(pos_embed), owner)
        table = self._pos_cache.get(key)
        if table is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
                table = resample(pos_embed)
            if len(self._pos_cache) >= _POS_CACHE_SIZE:
                self._pos_cache.clear()
            self._pos_cache[key] = table
        return table

    def _pos_embed(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Prepend the prefix tokens to the patch tokens ``(B, N, C)`` and add the position table."""
        pos_embed = self._resampled_pos_embed(grid_size)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))  # (B, 1, C)
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))  # (B, R, C)
        if self.no_embed_class:  # the table covers the patches only: add, then concatenate
            x = x + pos_embed
            if prefix:
                x = torch.cat([*prefix, x], dim=1)  # (B, prefix + N, C)
        else:  # original ViT / DeiT: the table has rows for the prefix tokens
            if prefix:
                x = torch.cat([*prefix, x], dim=1)  # (B, prefix + N, C)
            x = x + pos_embed
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``(B, C, H, W)`` -> tokens ``(B, prefix + H' * W', C)`` ready for the blocks, and ``(H', W')``."""
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        grid_size = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.patch_embed(x)  # (B, N, C)
        x = self._pos_embed(x, grid_size)
        return self.norm_pre(x), grid_size

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    # ------------------------------------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, ``(B, prefix + N, embed_dim)``."""
        x, _ = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Pool tokens ``(B, T, C)`` to ``(B, C)`` as ``global_pool`` says (``""`` returns them unchanged)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "":
            return x
        if pool_type == "token":
            return x[:, 0]  # (B, C)
        x = x[:, self.num_prefix_tokens :]  # (B, N, C) patch tokens only
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        raise ValueError(f"pool_type must be one of {_POOLS}, got {pool_type!r}")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from :meth:`forward_features` -> logits ``(B, num_classes)`` (or the pooled features)."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def default_indices(self, n: int = 4) -> list[int]:
        """``n`` evenly spaced block indices ending with the last block (``[2, 5, 8, 11]`` for depth 12)."""
        depth = len(self.blocks)
        n = min(n, depth)
        return [(i + 1) * depth // n - 1 for i in range(n)]

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        depth = len(self.blocks)
        if indices is None:
            return self.default_indices()
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices as last-n must be in 1..{depth}, got {indices}")
            return list(range(depth - indices, depth))
        take = []
        for i in indices:
            idx = depth + i if i < 0 else i
            if not 0 <= idx < depth:
                raise ValueError(f"block index {i} is out of range for depth {depth}")
            take.append(idx)
        if not take:
            raise ValueError("indices must select at least one block")
        return sorted(set(take))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch-token maps of selected blocks (timm's ``forward_intermediates``; prefix tokens removed).

        Args:
            x: images ``(B, C, H, W)``.
            indices: ``None``: 4 evenly spaced blocks ending with the last (:meth:`default_indices`); an int
                ``n``: the last ``n`` blocks; a sequence: those block indices (negative from the end).
                Maps come in block order.
            norm: apply the final norm to each map.
            output_fmt: ``"NCHW"`` maps ``(B, C, H / p, W / p)`` or ``"NLC"`` tokens ``(B, N, C)``.
            intermediates_only: return only the maps (blocks after the last selected one are skipped);
                otherwise also the final normed tokens, as ``(tokens, maps)``.

        Returns:
            The list of maps, or ``(tokens (B, prefix + N, C), maps)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self._take_indices(indices)
        b = x.shape[0]
        x, (gh, gw) = self._embed(x)
        last = take[-1] if intermediates_only else len(self.blocks) - 1
        maps = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x = self._run_block(block, x)
            if i in take:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens :]  # (B, N, C)
                if output_fmt == "NCHW":
                    y = y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, H', W')
                maps.append(y)
        if intermediates_only:
            return maps
        return self.norm(x), maps


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor],
    model: VisionTransformer,
    interpolation: str = "bicubic",
    antialias: bool = True,
    old_grid_size: int | tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Adapt a timm-layout ViT checkpoint to ``model``'s resolution and patch size (timm's function).

    * ``patch_embed.proj.weight`` of another patch size is resized with
      :func:`~maskworks.layers.vit_layers.resample_patch_embed` (a flat ``(O, C*p*p)`` kernel of early timm
      checkpoints is reshaped first).
    * ``pos_embed`` with another token count is resampled to ``model.patch_embed.grid_size`` with
      :func:`~maskworks.layers.vit_layers.resample_abs_pos_embed`, keeping the prefix rows (class + register
      tokens; none when ``model.no_embed_class``). The checkpoint grid is ``old_grid_size`` when given (needed
      for non-square grids, and to resample a same-length table of another shape), else the square root.
    * ``pre_logits.*`` (a layer removed from timm ViTs) is dropped; a ``{"model": ...}`` or
      ``{"state_dict": ...}`` wrapper is unwrapped.

    Args:
        state_dict: the checkpoint.
        model: the target model.
        interpolation: interpolation mode for both resamplings.
        antialias: anti-aliasing for both resamplings.
        old_grid_size: grid ``(h, w)`` of the checkpoint's position table.

    Returns:
        The adapted state dict.
    """
    for wrapper in ("model", "state_dict"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            state_dict = inner
    old_grid = to_2tuple(old_grid_size, "old_grid_size") if old_grid_size is not None else None
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "patch_embed.proj.weight":
            target = model.patch_embed.proj.weight
            o, _, h, w = target.shape
            if value.ndim < 4:  # early timm: linear patchify, (O, C * p * p)
                value = value.reshape(o, -1, h, w)
            if tuple(value.shape[-2:]) != (h, w):
                log.info("resampling patch_embed kernel %s -> %s", tuple(value.shape[-2:]), (h, w))
                value = resample_patch_embed(value, (h, w), interpolation=interpolation, antialias=antialias)
        elif key == "pos_embed" and getattr(model, "pos_embed", None) is not None:
            num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            new_grid = model.patch_embed.grid_size
            if value.shape[1] != model.pos_embed.shape[1] or (old_grid is not None and old_grid != new_grid):
                log.info("resampling pos_embed %s -> grid %s", tuple(value.shape), new_grid)
                value = resample_abs_pos_embed(
                    value,
                    new_size=new_grid,
                    old_size=old_grid,
                    num_prefix_tokens=num_prefix,
                    interpolation=interpolation,
                    antialias=antialias,
                )
        elif key.startswith("pre_logits."):
            continue
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Registered variants (names as in timm)
# ---------------------------------------------------------------------------------------------------------------


def _vit(arch: dict, **kwargs) -> VisionTransformer:
    """Build a variant: ``arch`` (patch, width, depth, heads, size) overridden by the caller's ``kwargs``."""
    return VisionTransformer(**{**arch, **kwargs})


def _arch(patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int) -> dict:
    return {
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "img_size": img_size,
    }


@register_model(kind="backbone")
def vit_tiny_patch16_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-Ti/16 at 224 px (192-d, 12 blocks, 3 heads; 5.7 M parameters)."""
    return _vit(_arch(16, 192, 12, 3, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_tiny_patch16_384(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-Ti/16 at 384 px."""
    return _vit(_arch(16, 192, 12, 3, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_small_patch32_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-S/32 at 224 px (384-d, 12 blocks, 6 heads)."""
    return _vit(_arch(32, 384, 12, 6, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_small_patch16_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-S/16 at 224 px (22.1 M parameters)."""
    return _vit(_arch(16, 384, 12, 6, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_small_patch16_384(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-S/16 at 384 px."""
    return _vit(_arch(16, 384, 12, 6, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_small_patch8_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-S/8 at 224 px (784 patch tokens)."""
    return _vit(_arch(8, 384, 12, 6, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_base_patch32_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/32 at 224 px (768-d, 12 blocks, 12 heads)."""
    return _vit(_arch(32, 768, 12, 12, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_base_patch32_384(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/32 at 384 px."""
    return _vit(_arch(32, 768, 12, 12, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_base_patch16_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/16 at 224 px (86.6 M parameters)."""
    return _vit(_arch(16, 768, 12, 12, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_base_patch16_384(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/16 at 384 px."""
    return _vit(_arch(16, 768, 12, 12, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_base_patch8_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/8 at 224 px."""
    return _vit(_arch(8, 768, 12, 12, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_large_patch32_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-L/32 at 224 px (1024-d, 24 blocks, 16 heads)."""
    return _vit(_arch(32, 1024, 24, 16, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_large_patch32_384(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-L/32 at 384 px."""
    return _vit(_arch(32, 1024, 24, 16, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_large_patch16_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-L/16 at 224 px (304.3 M parameters)."""
    return _vit(_arch(16, 1024, 24, 16, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_large_patch16_384(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-L/16 at 384 px."""
    return _vit(_arch(16, 1024, 24, 16, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_large_patch14_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-L/14 at 224 px (256 patch tokens)."""
    return _vit(_arch(14, 1024, 24, 16, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_huge_patch14_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-H/14 at 224 px (1280-d, 32 blocks, 16 heads; 632.0 M parameters)."""
    return _vit(_arch(14, 1280, 32, 16, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_test_patch16(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """Tiny ViT for tests: 64 px, patch 16 (4 x 4 tokens), 64-d, 2 blocks, 2 heads."""
    return _vit(_arch(16, 64, 2, 2, 64), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def vit_test_patch8(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """Tiny ViT for tests: 32 px, patch 8 (4 x 4 tokens), 32-d, 2 blocks, 2 heads."""
    return _vit(_arch(8, 32, 2, 2, 32), in_channels=in_channels, num_classes=num_classes, **kwargs)
