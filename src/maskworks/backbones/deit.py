"""DeiT: data-efficient image transformers (Touvron et al., "Training data-efficient image transformers &
distillation through attention", ICML 2021).

A DeiT is a ViT trained on ImageNet-1k alone with a strong recipe; the plain variants (``deit_tiny_patch16_224``
...) are :class:`~maskworks.backbones.vit.VisionTransformer` with DeiT's widths. The distilled variants add a
**distillation token** that, like the class token, attends to every patch through all blocks; a second head
``head_dist`` reads it and is trained to reproduce a teacher's predictions
(:class:`maskworks.methods.distillation.DistillationLoss`).

:class:`VisionTransformerDistilled` matches ``timm.models.deit.VisionTransformerDistilled``:

* tokens ``[CLS][DIST][P_1]...[P_N]`` (198 at 224 px / patch 16); ``pos_embed`` ``(1, N + 2, D)`` covers both
  prefix tokens; ``dist_token`` ``(1, 1, D)``; a final ``norm`` before the heads;
* ``head`` reads token 0 and ``head_dist`` token 1;
* ``forward`` returns ``(cls_logits, dist_logits)`` in training mode with ``set_distilled_training(True)``
  (what the distillation loss needs) and the average ``(cls + dist) / 2`` otherwise (evaluation, or plain
  fine-tuning); :meth:`VisionTransformerDistilled.forward_heads` gives both heads in any mode, for analysis.

Parameter names equal timm's and the official DeiT release (``dist_token``, ``head_dist``, ...), so those
checkpoints load with ``strict=True``; HF ``DeiTForImageClassificationWithTeacher`` checkpoints convert with
:func:`maskworks.convert.deit.convert_hf_deit`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from maskworks.backbones.vit import VisionTransformer, _arch
from maskworks.registry import register_model

__all__ = ["VisionTransformerDistilled"]


class VisionTransformerDistilled(VisionTransformer):
    """ViT with a distillation token and a distillation head (DeiT).

    Args:
        **kwargs: the arguments of :class:`~maskworks.backbones.vit.VisionTransformer` (``img_size``,
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``num_classes``, ``in_channels``,
            ``drop_path_rate``, ``norm_layer``, ``dynamic_img_size``, ...). The heads read the class and
            distillation tokens, so ``global_pool`` must be ``"token"``, and ``class_token=True``,
            ``reg_tokens=0`` and ``fc_norm`` not set are required.

    Attributes:
        distilled_training: when ``True`` and in training mode, ``forward`` returns both heads' logits.
    """

    def __init__(self, **kwargs) -> None:
        if kwargs.get("global_pool", "token") != "token":
            raise ValueError(
                f"global_pool must be 'token' (the heads read the class and distillation tokens), "
                f"got {kwargs['global_pool']!r}"
            )
        if not kwargs.get("class_token", True):
            raise ValueError("class_token must be True: the distilled model has a class and a distillation token")
        if kwargs.get("reg_tokens", 0):
            raise ValueError(f"reg_tokens is not supported with a distillation token, got {kwargs['reg_tokens']!r}")
        if kwargs.get("fc_norm"):
            raise ValueError("fc_norm=True is not supported: the distilled heads read normed tokens (norm)")
        super().__init__(**kwargs)
        self.num_prefix_tokens = 2
        num_patches = self.patch_embed.num_patches
        embed_len = num_patches if self.no_embed_class else num_patches + self.num_prefix_tokens
        ref = self.cls_token
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=ref.device, dtype=ref.dtype))
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, self.embed_dim, device=ref.device, dtype=ref.dtype))
        self._pos_cache.clear()
        self.head_dist = self._new_head(self.num_classes)
        self.distilled_training = False
        self.init_weights()

    def _new_head(self, num_classes: int) -> nn.Module:
        ref = self.cls_token
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def init_weights(self) -> None:
        """The ViT initialisation, plus ``trunc_normal(.02)`` for ``dist_token`` (timm / DeiT)."""
        super().init_weights()
        dist_token = getattr(self, "dist_token", None)  # absent while the parent constructor runs
        if dist_token is not None:
            nn.init.trunc_normal_(dist_token, std=0.02)

    # ------------------------------------------------------------------------------------------------ utilities
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(cls_logits, dist_logits)`` from ``forward`` (for distillation)."""
        self.distilled_training = bool(enable)

    def get_classifier(self) -> nn.ModuleList:
        """Both heads, ``[head, head_dist]`` (unpacks like timm's tuple and has ``.parameters()``)."""
        return nn.ModuleList([self.head, self.head_dist])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace both heads by new ones for ``num_classes`` (0: none); ``global_pool`` can only be ``"token"``."""
        if global_pool not in (None, "token"):
            raise ValueError(f"global_pool must be 'token' (or None) for the distilled model, got {global_pool!r}")
        was_training = self.head.training
        super().reset_classifier(num_classes)
        self.head_dist = self._new_head(num_classes)
        self.head.train(was_training)
        self.head_dist.train(was_training)

    # ------------------------------------------------------------------------------------------------ forward
    def _pos_embed(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Prepend the class and distillation tokens to the patch tokens ``(B, N, C)`` and add ``pos_embed``."""
        pos_embed = self._resampled_pos_embed(grid_size)
        b = x.shape[0]
        prefix = (self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1))  # (B, 1, C) each
        if self.no_embed_class:  # DeiT-III style table: patches only
            x = torch.cat([*prefix, x + pos_embed], dim=1)  # (B, 2 + N, C)
        else:  # DeiT: the table has rows for [CLS] and [DIST]
            x = torch.cat([*prefix, x], dim=1) + pos_embed  # (B, 2 + N, C)
        return self.pos_drop(x)

    def _head_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_cls, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])  # (B, C) each
        return self.head(x_cls), self.head_dist(x_dist)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, 2 + N, D)`` -> logits.

        Args:
            x: the output of :meth:`forward_features`.
            pre_logits: return the average of the two normed prefix tokens ``(B, D)``.

        Returns:
            ``(cls_logits, dist_logits)`` when training with ``distilled_training``; otherwise their average
            ``(B, num_classes)``.
        """
        if pre_logits:
            return (self.head_drop(x[:, 0]) + self.head_drop(x[:, 1])) / 2
        x_cls, x_dist = self._head_pair(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x_cls, x_dist
        return (x_cls + x_dist) / 2

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads' logits for images ``x`` ``(B, C, H, W)``, in any mode: ``(cls_logits, dist_logits)``."""
        return self._head_pair(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------
# Registered variants (names as in timm)
# ---------------------------------------------------------------------------------------------------------------


def _deit(distilled: bool, arch: dict, **kwargs) -> VisionTransformer:
    """Build a variant: ``arch`` (patch, width, depth, heads, size) overridden by the caller's ``kwargs``."""
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(**{**arch, **kwargs})


@register_model(kind="backbone")
def deit_tiny_patch16_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """DeiT-Ti at 224 px (192-d, 12 blocks, 3 heads; 72.2% ImageNet top-1)."""
    return _deit(False, _arch(16, 192, 12, 3, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_small_patch16_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """DeiT-S at 224 px (384-d, 12 blocks, 6 heads; 79.8%)."""
    return _deit(False, _arch(16, 384, 12, 6, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_base_patch16_224(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """DeiT-B at 224 px (768-d, 12 blocks, 12 heads; 81.8%)."""
    return _deit(False, _arch(16, 768, 12, 12, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_base_patch16_384(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """DeiT-B at 384 px (83.1%)."""
    return _deit(False, _arch(16, 768, 12, 12, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_tiny_distilled_patch16_224(
    in_channels: int = 3, num_classes: int = 1000, **kwargs
) -> VisionTransformerDistilled:
    """DeiT-Ti distilled at 224 px (5,910,800 parameters; 74.5%)."""
    return _deit(True, _arch(16, 192, 12, 3, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_small_distilled_patch16_224(
    in_channels: int = 3, num_classes: int = 1000, **kwargs
) -> VisionTransformerDistilled:
    """DeiT-S distilled at 224 px (22,436,432 parameters; 81.2%)."""
    return _deit(True, _arch(16, 384, 12, 6, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_base_distilled_patch16_224(
    in_channels: int = 3, num_classes: int = 1000, **kwargs
) -> VisionTransformerDistilled:
    """DeiT-B distilled at 224 px (87,338,192 parameters; 83.4% with a RegNetY-16GF teacher)."""
    return _deit(True, _arch(16, 768, 12, 12, 224), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_base_distilled_patch16_384(
    in_channels: int = 3, num_classes: int = 1000, **kwargs
) -> VisionTransformerDistilled:
    """DeiT-B distilled at 384 px (85.2%)."""
    return _deit(True, _arch(16, 768, 12, 12, 384), in_channels=in_channels, num_classes=num_classes, **kwargs)


@register_model(kind="backbone")
def deit_test_distilled_patch16(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> VisionTransformerDistilled:
    """Tiny distilled DeiT for tests: 64 px, patch 16 (4 x 4 tokens + 2 prefix), 64-d, 2 blocks, 2 heads."""
    return _deit(True, _arch(16, 64, 2, 2, 64), in_channels=in_channels, num_classes=num_classes, **kwargs)
