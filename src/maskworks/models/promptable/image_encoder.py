"""SAM's image encoder: a plain ViT with windowed and global attention and a convolutional neck (Kirillov et al.,
"Segment Anything", ICCV 2023, appendix A; the backbone of Li et al., "Exploring Plain Vision Transformer
Backbones for Object Detection" (ViTDet), ECCV 2022).

A 1024 x 1024 input becomes a 64 x 64 grid of 16 x 16 patches plus a learned absolute position table. Most blocks
attend inside 14 x 14 windows (the grid zero-padded to 70 x 70, then cropped back); four evenly spaced blocks
attend globally. Every attention adds decomposed relative position embeddings (:mod:`maskworks.layers.rel_pos`),
sized for its window or for the whole grid. The neck maps the tokens to 256 channels with a 1x1 conv and a 3x3 conv,
each followed by a channel LayerNorm.

Parameter names are those of the official ``segment_anything`` ``ImageEncoderViT``, except ``mlp.fc1`` /
``mlp.fc2`` (the official ``mlp.lin1`` / ``mlp.lin2``): the blocks reuse :class:`maskworks.layers.Mlp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from maskworks.layers import LayerNorm2d, Mlp, PatchEmbed, RelPosAttention, pad_to_window, window_partition
from maskworks.layers.window import window_reverse

__all__ = ["ImageEncoderViT", "WindowedBlock"]


class WindowedBlock(nn.Module):
    """A pre-norm transformer block on a ``(B, H, W, C)`` map whose attention runs inside windows (padded to a
    multiple of the window and cropped back) or, with ``window_size=0``, over the whole map.

    Args:
        dim: channels.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim``.
        qkv_bias: bias of the ``qkv`` projection.
        norm_layer: normalisation class.
        act_layer: activation class of the MLP.
        use_rel_pos: decomposed relative positions in the attention.
        rel_pos_zero_init: start the relative tables at zero.
        window_size: window side, 0 for global attention.
        input_size: the token grid ``(H, W)`` (sizes the tables of global attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = RelPosAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            _, h, w, _ = x.shape
            x, _ = pad_to_window(x, self.window_size)  # (B, Hp, Wp, C)
            hp, wp = x.shape[1:3]
            x = self.attn(window_partition(x, self.window_size))  # (B * nW, M, M, C)
            x = window_reverse(x, self.window_size, hp, wp)[:, :h, :w].contiguous()  # (B, H, W, C)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """The SAM image encoder: ``(B, 3, S, S)`` normalised image -> ``(B, out_chans, S / p, S / p)`` embedding.

    Args:
        img_size: input side ``S`` (1024).
        patch_size: patch side ``p`` (16).
        in_chans: input channels.
        embed_dim: token width (768 / 1024 / 1280 for B / L / H).
        depth: blocks (12 / 24 / 32).
        num_heads: attention heads (12 / 16 / 16).
        mlp_ratio: MLP width over ``embed_dim``.
        out_chans: channels of the neck (256).
        qkv_bias: bias of the attention projections.
        norm_layer: normalisation class of the blocks.
        act_layer: activation class of the MLPs.
        use_abs_pos: add a learned absolute position table.
        use_rel_pos: decomposed relative positions in every attention.
        rel_pos_zero_init: start the relative tables at zero.
        window_size: window side of the windowed blocks (14), 0 for global attention everywhere.
        global_attn_indexes: blocks that attend globally.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are outside the {depth} blocks")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.out_chans = out_chans
        grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_channels=in_chans, embed_dim=embed_dim, flatten=False
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            WindowedBlock(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous channels-last tokens: a permuted view would make every residual add and linear layer strided
        x = self.patch_embed(x).permute(0, 2, 3, 1).contiguous()  # (B, H', W', C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, H', W')
