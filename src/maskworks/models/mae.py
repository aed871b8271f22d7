"""Masked autoencoder pre-training for Vision Transformers (He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022).

:class:`MaskedAutoencoderViT` follows ``facebookresearch/mae`` ``models_mae.py`` module for module and key for key,
so official checkpoints load with ``strict=True``:

* encoder: ``patch_embed.proj``, ``cls_token``, a **fixed** 2-D sin-cos ``pos_embed`` ``(1, 1 + N, D)`` whose class
  row is zero (``requires_grad=False``), ``blocks.{i}`` (pre-norm, LayerNorm eps 1e-6, no dropout), ``norm``;
  it sees only the visible patches plus the class token, prepended *after* masking;
* :meth:`MaskedAutoencoderViT.random_masking`: per-sample shuffle by ``argsort(noise)``, keep the first
  ``len_keep``, binary ``mask`` (1 = removed) in the original patch order, ``ids_restore = argsort(ids_shuffle)``;
  ``noise`` can be passed for deterministic masking (as HF ``ViTMAEForPreTraining`` takes it);
* decoder: ``decoder_embed`` ``Linear(D, 512)``, ``mask_token``, fixed sin-cos ``decoder_pos_embed``,
  ``decoder_blocks`` (8 blocks, 16 heads, width 512 in the paper configs), ``decoder_norm`` and ``decoder_pred``
  ``Linear(512, p * p * C)``;
* loss: mean squared error per patch in :meth:`~MaskedAutoencoderViT.patchify` order (pixel row, pixel column,
  channel), averaged over the **removed** patches only; ``norm_pix_loss`` normalises every target patch by its own
  mean and ``sqrt(var + 1e-6)`` (unbiased variance, as the reference).

The pre-trained encoder becomes a :class:`~maskworks.backbones.vit.VisionTransformer` (classifier or segmentation
backbone) through :func:`mae_encoder_state_dict` or :func:`vit_from_mae`; HF ``ViTMAEForPreTraining`` checkpoints
convert with :func:`maskworks.convert.mae.convert_hf_vitmae`.

Deviations from the reference, all where it fails: ``len_keep`` is ``floor(N * (1 - mask_ratio))`` computed with a
1e-6 tolerance (``int(10 * (1 - 0.9))`` is 0 in floating point, which MAE would run with no visible patch), the
loss is 0 rather than NaN when nothing is masked (``mask_ratio=0``), and ``patchify`` accepts non-square images
whose sides are multiples of the patch size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from maskworks.convert._common import unwrap_state_dict
from maskworks.layers.vit_layers import Block, PatchEmbed, get_2d_sincos_pos_embed, to_2tuple
from maskworks.registry import register_model

__all__ = [
    "MaskedAutoencoderViT",
    "random_masking",
    "num_visible_patches",
    "mae_encoder_state_dict",
    "vit_from_mae",
    "MAE_ENCODER_NAMES",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_test_patch8",
]

log = logging.getLogger(__name__)

# registered MAE variant -> the registered VisionTransformer its encoder loads into
MAE_ENCODER_NAMES: dict[str, str] = {
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
    "mae_vit_test_patch8": "vit_test_patch8",
}

_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
_DECODER_PREFIXES = ("decoder_", "mask_token")


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches kept by :func:`random_masking`: ``floor(num_patches * (1 - mask_ratio))`` (MAE's ``int()``), with a
    1e-6 tolerance so float rounding never drops a patch (``10 * (1 - 0.9) = 0.9999999999999998``)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    len_keep = int(math.floor(num_patches * (1.0 - mask_ratio) + 1e-6))
    if len_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return len_keep


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise (MAE's ``random_masking``).

    Args:
        x: tokens ``(B, N, D)``.
        mask_ratio: fraction of tokens removed, in ``[0, 1)``.
        noise: ``(B, N)`` scores; the tokens with the smallest noise are kept. ``None`` draws ``torch.rand``.

    Returns:
        ``x_masked`` ``(B, len_keep, D)`` (kept tokens in order of increasing noise), ``mask`` ``(B, N)`` float with
        1 for removed tokens in the original order, and ``ids_restore`` ``(B, N)`` int64, the inverse permutation:
        ``cat([x_masked, fillers])`` gathered with ``ids_restore`` puts every kept token back at its index.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be tokens (B, N, D), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    len_keep = num_visible_patches(n, mask_ratio)
    if noise is None:
        noise = torch.rand(b, n, device=x.device)  # noise in [0, 1]
    elif tuple(noise.shape) != (b, n):
        raise ValueError(f"noise must have shape (B, N) = {(b, n)}, got {tuple(noise.shape)}")
    noise = noise.to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N): ascend, small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, len_keep)
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, len_keep, D)
    mask = torch.ones(b, n, device=x.device)  # float32 (exact counts under AMP too); 0 is keep, 1 is remove
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # (B, N) in the original order
    return x_masked, mask, ids_restore


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone (``models_mae.py::MaskedAutoencoderViT``).

    Args:
        img_size: input size, an int or ``(H, W)``.
        patch_size: patch size ``p``.
        in_channels: image channels ``C``.
        embed_dim: encoder width ``D``.
        depth: encoder blocks.
        num_heads: encoder heads.
        decoder_embed_dim: decoder width (512 in the paper).
        decoder_depth: decoder blocks (8).
        decoder_num_heads: decoder heads (16).
        mlp_ratio: MLP hidden size as a multiple of the width, encoder and decoder.
        norm_eps: LayerNorm epsilon (1e-6 in every MAE variant; HF configs may use 1e-12).
        norm_pix_loss: normalise each target patch by its mean / std before the loss.
        qkv_bias: bias of the ``qkv`` projections (True in MAE).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        norm_pix_loss: bool = False,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("decoder_embed_dim", decoder_embed_dim)):
            if not isinstance(value, int) or value <= 0 or value % 4:
                raise ValueError(f"{name} must be a positive multiple of 4 (2-D sin-cos table), got {value!r}")
        for name, value in (("depth", depth), ("decoder_depth", decoder_depth)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.img_size = to_2tuple(img_size, "img_size")
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.norm_eps = norm_eps
        self.qkv_bias = qkv_bias
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_channels, embed_dim)
        if self.patch_embed.grid_size[0] * patch_size != self.img_size[0] or (
            self.patch_embed.grid_size[1] * patch_size != self.img_size[1]
        ):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {patch_size}")
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_channels, bias=True)
        self.initialize_weights()

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def initialize_weights(self) -> None:
        """MAE's init: fixed sin-cos tables, xavier-uniform Linear weights (and the patch kernel viewed as a
        Linear), zero biases, LayerNorm 1 / 0, ``normal(std=.02)`` class and mask tokens."""
        grid = self.patch_embed.grid_size
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)  # (1 + N, D)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))  # (1, 1 + N, D)
        dec = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec).float().unsqueeze(0))

        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (D, C * p * p): like nn.Linear, not nn.Conv2d
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms: the class and mask tokens."""
        return {"cls_token", "mask_token"}

    # ------------------------------------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> patches ``(B, N, p * p * C)``, each flattened as (pixel row, pixel column,
        channel) like MAE's ``einsum('nchpwq->nhwpqc')``. ``H`` and ``W`` must be multiples of ``p``."""
        p = self.patch_size
        if imgs.ndim != 4:
            raise ValueError(f"imgs must be (B, C, H, W), got shape {tuple(imgs.shape)}")
        b, c, h, w = imgs.shape
        if c != self.in_channels:
            raise ValueError(f"imgs have {c} channels, expected in_channels={self.in_channels}")
        if h % p or w % p:
            raise ValueError(f"image size {(h, w)} must be divisible by patch_size {p}")
        gh, gw = h // p, w // p
        x = imgs.reshape(b, c, gh, p, gw, p)  # (B, C, h, p, w, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
        return x.reshape(b, gh * gw, p * p * c)  # (B, N, p * p * C)

    def unpatchify(self, x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Patches ``(B, N, p * p * C)`` -> images ``(B, C, h * p, w * p)``, the exact inverse of :meth:`patchify`.

        Args:
            x: patches.
            grid_size: patch grid ``(h, w)``; default the model's grid when ``N`` matches it, else square.
        """
        p, c = self.patch_size, self.in_channels
        if x.ndim != 3 or x.shape[-1] != p * p * c:
            raise ValueError(f"x must be patches (B, N, {p * p * c}), got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        if grid_size is not None:
            gh, gw = to_2tuple(grid_size, "grid_size")
        elif n == self.num_patches:
            gh, gw = self.patch_embed.grid_size
        else:
            gh = gw = math.isqrt(n)
        if gh * gw != n:
            raise ValueError(f"{n} patches do not form a grid {(gh, gw)}; pass grid_size=(h, w)")
        x = x.reshape(b, gh, gw, p, p, c)  # (B, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(b, c, gh * p, gw * p)  # (B, C, H, W)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :func:`random_masking`."""
        return random_masking(x, mask_ratio, noise)

    # ------------------------------------------------------------------------------------------------ forward
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches.

        Returns:
            ``latent`` ``(B, 1 + len_keep, D)`` (class token first, normalised), ``mask`` ``(B, N)`` and
            ``ids_restore`` ``(B, N)``.
        """
        x = self.patch_embed(imgs)  # (B, N, D)
        x = x + self.pos_embed[:, 1:, :]  # position first, then masking
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (B, len_keep, D)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]  # (1, 1, D)
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + len_keep, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reconstruct every patch from the latent tokens ``(B, 1 + len_keep, D)``.

        Returns:
            Predicted patches ``(B, N, p * p * C)`` (class token removed).
        """
        x = self.decoder_embed(x)  # (B, 1 + len_keep, D_dec)
        b, t, d = x.shape
        mask_tokens = self.mask_token.expand(b, ids_restore.shape[1] + 1 - t, -1)  # (B, N - len_keep, D_dec)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, N, D_dec), no class token, shuffled order
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, d))  # unshuffle, (B, N, D_dec)
        x = torch.cat([x[:, :1, :], x_], dim=1)  # (B, 1 + N, D_dec), class token back in front
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1 + N, p * p * C)
        return x[:, 1:, :]  # (B, N, p * p * C)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches.

        Args:
            imgs: images ``(B, C, H, W)``.
            pred: predicted patches ``(B, N, p * p * C)``.
            mask: ``(B, N)``, 1 for removed patches.

        Returns:
            Scalar loss: per-patch MSE averaged over the patches with ``mask == 1`` (0 when there are none).
        """
        target = self.patchify(imgs)  # (B, N, p * p * C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (B, N), mean loss per patch
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)  # mean loss on removed patches

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode and score.

        Args:
            imgs: normalised images ``(B, C, H, W)`` at ``img_size``.
            mask_ratio: fraction of patches removed.
            noise: optional ``(B, N)`` masking noise (deterministic masking).

        Returns:
            ``(loss, pred, mask)``: scalar loss, predicted patches ``(B, N, p * p * C)`` (normalised patch space
            with ``norm_pix_loss``), and the mask ``(B, N)`` (1 = removed).
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # ------------------------------------------------------------------------------------------------ encoder
    def encoder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a :class:`~maskworks.backbones.vit.VisionTransformer` with this encoder's
        architecture (JSON-serialisable unless ``norm_eps`` differs from the ViT default 1e-6)."""
        kwargs: dict[str, Any] = {
            "img_size": list(self.img_size),
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
        }
        if self.norm_eps != 1e-6:
            kwargs["norm_layer"] = partial(nn.LayerNorm, eps=self.norm_eps)
        return kwargs


def mae_encoder_state_dict(
    mae_state_dict: Mapping[str, Any], drop_norm: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An MAE checkpoint -> the state dict of a :class:`~maskworks.backbones.vit.VisionTransformer` (timm keys).

    The encoder keys of MAE are already timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
    ``blocks.{i}.*``, ``norm.*``) and are kept; ``pos_embed`` stays the fixed sin-cos table, which timm's and MAE's
    fine-tuning use as the initial (then trainable) table. ``decoder_*`` and ``mask_token`` are dropped. Accepts an
    official ``{"model": ...}`` checkpoint, a DDP-prefixed one, or ``MaskedAutoencoderViT.state_dict()``.

    Loading the result:

    * feature extractor / segmentation backbone: ``create_model("vit_base_patch16_224", num_classes=0)`` loads it
      with ``strict=True``;
    * classifier as in MAE fine-tuning (``global_pool="avg"``: the class token is not used, the final ``norm`` is
      removed and a fresh ``fc_norm`` follows the average pool): pass ``drop_norm=True`` and load into
      ``create_model("vit_base_patch16_224", num_classes=K, global_pool="avg")`` with ``strict=False``; the missing
      keys are then exactly ``fc_norm.{weight,bias}`` and ``head.{weight,bias}`` (initialised by the model).
      With ``global_pool="token"`` only ``head.*`` is missing and ``norm`` is kept.

    Args:
        mae_state_dict: the MAE checkpoint.
        drop_norm: drop the encoder's final ``norm.*`` too (for ``global_pool="avg"`` + ``fc_norm`` models).

    Returns:
        The ViT state dict and the sorted dropped keys.
    """
    state = unwrap_state_dict(mae_state_dict)
    out, dropped = {}, []
    for key, value in state.items():
        if key.startswith(_ENCODER_PREFIXES) and not (drop_norm and key.startswith("norm.")):
            out[key] = value
        else:
            if not key.startswith(_DECODER_PREFIXES + ("norm.",)):
                log.warning("dropping %s: not an MAE encoder key", key)
            dropped.append(key)
    if "patch_embed.proj.weight" not in out or "pos_embed" not in out:
        raise ValueError(
            "mae_state_dict has no 'patch_embed.proj.weight' / 'pos_embed': expected an MAE checkpoint with "
            f"encoder keys {_ENCODER_PREFIXES}, got keys like {sorted(state)[:5]}"
        )
    return out, sorted(dropped)


def vit_from_mae(
    mae: MaskedAutoencoderViT, num_classes: int = 0, global_pool: str = "token", **kwargs: Any
) -> nn.Module:
    """A :class:`~maskworks.backbones.vit.VisionTransformer` with the encoder weights of ``mae``.

    Args:
        mae: a (pre-trained) masked autoencoder.
        num_classes: classes of a new head (0: none, ``forward`` returns pooled features).
        global_pool: ``"token"`` keeps the encoder's final ``norm``; ``"avg"`` is MAE fine-tuning (average of the
            patch tokens, new ``fc_norm``, the final ``norm`` dropped).
        **kwargs: further :class:`~maskworks.backbones.vit.VisionTransformer` arguments (``drop_path_rate``,
            ``dynamic_img_size``, ...).

    Returns:
        The ViT on the device / dtype of ``mae``; only ``head`` and (for ``"avg"``) ``fc_norm`` are freshly
        initialised.
    """
    from maskworks.backbones.vit import VisionTransformer

    vit = VisionTransformer(num_classes=num_classes, global_pool=global_pool, **{**mae.encoder_kwargs(), **kwargs})
    ref = mae.pos_embed
    vit.to(device=ref.device, dtype=ref.dtype)
    state, _ = mae_encoder_state_dict(mae.state_dict(), drop_norm=isinstance(vit.norm, nn.Identity))
    result = vit.load_state_dict(state, strict=False)
    allowed = ("head.", "fc_norm.")
    bad = [k for k in result.missing_keys if not k.startswith(allowed)] + list(result.unexpected_keys)
    if bad:
        raise ValueError(f"MAE encoder does not fit the ViT: missing/unexpected {bad[:8]}")
    return vit


# ---------------------------------------------------------------------------------------------------------------
# Registered variants (the paper's decoder: 512 wide, 8 blocks, 16 heads)
# ---------------------------------------------------------------------------------------------------------------


def _mae(arch: dict, **kwargs: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**arch, **kwargs})


_DEC512D8B = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, "mlp_ratio": 4.0}


@register_model(kind="model", task="pretraining")
def mae_vit_base_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE ViT-B/16, decoder 512-d x 8 blocks (``mae_vit_base_patch16_dec512d8b``; 111.9 M parameters)."""
    return _mae({"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **_DEC512D8B}, **kwargs)


@register_model(kind="model", task="pretraining")
def mae_vit_large_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE ViT-L/16, decoder 512-d x 8 blocks (``mae_vit_large_patch16_dec512d8b``)."""
    return _mae({"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, **_DEC512D8B}, **kwargs)


@register_model(kind="model", task="pretraining")
def mae_vit_huge_patch14(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE ViT-H/14, decoder 512-d x 8 blocks (``mae_vit_huge_patch14_dec512d8b``)."""
    return _mae({"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, **_DEC512D8B}, **kwargs)


@register_model(kind="model", task="pretraining")
def mae_vit_test_patch8(**kwargs: Any) -> MaskedAutoencoderViT:
    """Tiny MAE for tests: 32 px, patch 8 (4 x 4 patches), encoder 32-d x 2 blocks x 2 heads, decoder 32-d x 1 x 2."""
    arch = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "decoder_embed_dim": 32,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
    }
    return _mae(arch, **kwargs)
