"""U-Net++ (Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image Segmentation", DLMIA 2018).

The skips of U-Net are replaced by nested, densely connected convolution nodes that close the
semantic gap between an encoder map and the decoder map it is concatenated with. In the paper's
notation, level ``i`` (0 = finest) and column ``j`` (0 = encoder)::

    X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})]),   i + j <= depth

with ``H`` two 3x3 conv-BN-ReLU. Deep supervision puts a head on each finest node ``X^{0,j}``;
because every ``X^{0,j}`` depends only on nodes with ``i + j <= j``, a model trained with deep
supervision can be *pruned* at inference: the depth-``L`` output needs only the nodes of the
sub-network UNet++ L (the paper's L1..L4).

:class:`UNetPlusPlus` (``unetplusplus``) has the module names and state-dict keys of
segmentation_models_pytorch's ``UnetPlusPlus`` (0.6), so an smp checkpoint loads strictly and gives
the same logits.

Mapping between smp's node keys and the paper's notation. With ``n`` encoder maps (5 for a ResNet:
/2, /4, /8, /16, /32) the nested grid has ``K = n - 1`` levels of skips. smp's block ``x_{d}_{l}``
(``0 <= d <= l < K``) sits at the resolution of encoder map ``K - 1 - l`` (``l = 0`` next to the
bottleneck, ``l = K - 1`` at the finest skip) and is the paper's ``X^{i,j}`` with::

    i = K - 1 - l,   j = l - d + 1

so the finest nodes ``X^{0,j}`` are ``x_{K-j}_{K-1}``: for a ResNet ``X^{0,1} = x_3_3``,
``X^{0,2} = x_2_3``, ``X^{0,3} = x_1_3``, ``X^{0,4} = x_0_3`` (all at 1/2 of the input, the
resolution of the ResNet stem). The extra block ``x_0_K`` upsamples ``X^{0,K}`` to the input
resolution before ``segmentation_head``. The nodes ``x_0_l`` (``d = 0``, the plain U-Net path)
have ``decoder_channels[l]`` channels; every other node has the channels of its level's encoder map.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn

from maskworks.models._utils import crop_to, init_like_smp, pad_to_multiple
from maskworks.models.semantic.unet import UnetDecoderBlock, _EncoderUNet
from maskworks.registry import register_model

__all__ = ["UNetPlusPlus", "UnetPlusPlusDecoder", "DeepSupervisionHead"]


class _EmptyNode(nn.Module):
    """A nested node of a level whose encoder map has no channels: a ``(B, 0, *size)`` map, no parameters."""

    def forward(self, x: torch.Tensor, size: Sequence[int], skip: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 0, *size)


class UnetPlusPlusDecoder(nn.Module):
    """smp's U-Net++ decoder: a ``ModuleDict`` of nested blocks ``x_{d}_{l}`` plus the final ``x_0_K``.

    Each block is a :class:`~maskworks.models.semantic.unet.UnetDecoderBlock` (nearest upsampling to
    the skip's size, concatenation ``[x, skips]``, two conv-norm-ReLU), the block smp uses too.

    Args:
        encoder_channels: channels of the encoder maps, highest resolution first (at least 2 maps).
        decoder_channels: one entry per encoder map, deepest first: the channels of the plain U-Net
            path ``x_0_0 .. x_0_K``.
        batch_norm: BatchNorm in the blocks (without it the convs get a bias).
    """

    def __init__(
        self, encoder_channels: Sequence[int], decoder_channels: Sequence[int], batch_norm: bool = True
    ) -> None:
        super().__init__()
        encoder_channels, decoder_channels = tuple(encoder_channels), tuple(decoder_channels)
        if len(encoder_channels) < 2:
            raise ValueError(f"encoder_channels needs at least 2 maps, got {encoder_channels!r}")
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                f"decoder_channels needs one entry per encoder map ({len(encoder_channels)}), got {decoder_channels!r}"
            )
        if not all(isinstance(c, int) and c > 0 for c in decoder_channels):
            raise ValueError(f"decoder_channels must be positive ints, got {decoder_channels!r}")
        deep_first = encoder_channels[::-1]
        self.depth = len(encoder_channels) - 1  # K: levels of the nested grid
        self.decoder_channels = decoder_channels
        # smp's bookkeeping: input of x_0_l, and the channels of level l's encoder map (= its nested nodes)
        in_chs = [deep_first[0], *decoder_channels[:-1]]
        level_chs = [*deep_first[1:], 0]

        blocks = {}
        for l in range(self.depth):  # noqa: E741 - smp's index name
            for d in range(l + 1):
                if d == 0:  # plain U-Net path; concatenates the l nested nodes of its level and the encoder map
                    in_ch, skip_ch, out_ch = in_chs[l], level_chs[l] * (l + 1), decoder_channels[l]
                else:  # x_d_l = X^{K-1-l, l-d+1}; upsamples x_d_{l-1} (or encoder map for d == l)
                    in_ch, skip_ch, out_ch = level_chs[l - 1], level_chs[l] * (l + 1 - d), level_chs[l]
                # nodes of an empty level (the stride-2 level of a stride-4-first encoder) are empty, as in smp
                block = UnetDecoderBlock(in_ch, skip_ch, out_ch, batch_norm) if out_ch else _EmptyNode()
                blocks[f"x_{d}_{l}"] = block
        blocks[f"x_0_{self.depth}"] = UnetDecoderBlock(in_chs[-1], 0, decoder_channels[-1], batch_norm)
        self.blocks = nn.ModuleDict(blocks)
        # channels of the finest nodes X^{0,1..K}
        self.finest_channels = tuple(
            decoder_channels[-2] if j == self.depth else level_chs[self.depth - 1] for j in range(1, self.depth + 1)
        )

    @staticmethod
    def finest_key(depth: int, j: int) -> str:
        """smp key of the paper's node ``X^{0,j}`` in a grid of ``depth`` levels: ``x_{depth-j}_{depth-1}``."""
        return f"x_{depth - j}_{depth - 1}"

    def forward_nested(self, features: Sequence[torch.Tensor], depth: int | None = None) -> dict[str, torch.Tensor]:
        """Compute the nested nodes that the finest node ``X^{0,depth}`` needs.

        Args:
            features: encoder maps, highest resolution first.
            depth: ``L`` in ``1..K``; ``None`` means ``K`` (every node). Only the nodes ``x_{d}_{l}``
                with ``d >= K - L`` (the paper's ``X^{i,j}`` with ``i + j <= L``) are run.

        Returns:
            The computed nodes by smp key (the final ``x_0_K`` is not included).
        """
        k = self.depth
        depth = k if depth is None else depth
        f = list(features)[::-1]  # deepest first, as in smp
        nodes: dict[str, torch.Tensor] = {}
        d_min = k - depth
        for l in range(d_min, k):  # noqa: E741
            skip = f[l + 1]
            for d in range(l, d_min - 1, -1):  # x_{d+1..l}_l are the dense inputs of x_d_l
                x = f[l] if d == l else nodes[f"x_{d}_{l - 1}"]
                dense = [nodes[f"x_{i}_{l}"] for i in range(d + 1, l + 1)]
                cat = torch.cat([*dense, skip], dim=1) if dense else skip  # (B, (l - d + 1) * C_l, H_l, W_l)
                nodes[f"x_{d}_{l}"] = self.blocks[f"x_{d}_{l}"](x, skip.shape[-2:], cat)
        return nodes

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Decode encoder maps (highest resolution first) to ``(B, decoder_channels[-1], *size)``."""
        nodes = self.forward_nested(features)
        return self.blocks[f"x_0_{self.depth}"](nodes[f"x_0_{self.depth - 1}"], size)


class DeepSupervisionHead(nn.Module):
    """Output stage for a finest node ``X^{0,j}``, built like the main path's final stage.

    ``block`` upsamples to the input resolution with two conv-norm-ReLU (like smp's ``x_0_K``) and
    ``head`` is a 3x3 conv to the classes (like ``segmentation_head``), so every pruned sub-network
    UNet++ L ends in the same kind of output stage as the full model.

    Args:
        in_ch: channels of the node.
        mid_ch: channels of the upsampling block (``decoder_channels[-1]``).
        num_classes: output channels.
        batch_norm: BatchNorm in the block.
    """

    def __init__(self, in_ch: int, mid_ch: int, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.block = UnetDecoderBlock(in_ch, 0, mid_ch, batch_norm)
        self.head = nn.Sequential(nn.Conv2d(mid_ch, num_classes, 3, padding=1))

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.head(self.block(x, size))


@register_model(name="unetplusplus")
class UNetPlusPlus(_EncoderUNet):
    """U-Net++ with a registered backbone as encoder; the layout and keys of ``smp.UnetPlusPlus``.

    With ``deep_supervision=True`` the finest nodes ``X^{0,1..K-1}`` get extra output stages
    (:class:`DeepSupervisionHead`, in ``aux_heads``; ``X^{0,K}`` uses the smp path ``x_0_K`` +
    ``segmentation_head``). In training the model then returns ``{"out": logits of X^{0,K},
    "aux": [logits of X^{0,1}, ..., X^{0,K-1}]}``, all at input resolution; in eval it returns the
    main logits. ``forward(x, depth=L)`` (or :meth:`prune`) runs only the sub-network UNet++ L and
    returns the logits of ``X^{0,L}``, in any mode. The encoder always runs in full (the backbone
    contract has no early exit) and the input is padded to the encoder's full reduction at every
    depth, so the pruned logits equal the full model's ``aux[L - 1]`` exactly.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``), e.g. ``"resnet34"``.
        num_classes: output channels (logits).
        in_channels: input image channels.
        decoder_channels: channels of the plain U-Net path ``x_0_0 .. x_0_K``, one per encoder map
            (5 for ResNet), deepest first.
        decoder_batch_norm: BatchNorm in the decoder.
        deep_supervision: add output stages on ``X^{0,1..K-1}`` (aux outputs and pruning).
        encoder_weights: ``\"imagenet\"`` / a published tag (``maskworks models --pretrained``), or a path of a local checkpoint for the encoder (see
            :func:`maskworks.convert.load_weights`), or ``None`` for random init.
    """

    decoder_cls = UnetPlusPlusDecoder

    def __init__(
        self,
        encoder: str = "resnet34",
        num_classes: int = 1,
        in_channels: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_batch_norm: bool = True,
        deep_supervision: bool = False,
        encoder_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(encoder, num_classes, in_channels, decoder_channels, decoder_batch_norm, encoder_weights)
        if not isinstance(deep_supervision, bool):
            raise TypeError(f"deep_supervision must be a bool, got {deep_supervision!r}")
        decoder_channels = tuple(decoder_channels)
        self.deep_supervision = deep_supervision
        self.inference_depth: int | None = None
        if deep_supervision and 0 in self.decoder.finest_channels[:-1]:
            raise ValueError(
                f"deep_supervision needs a map at every level; encoder {encoder!r} has none at stride 2, so the "
                "finest nested nodes are empty: pass one decoder channel per encoder map, e.g. "
                f"decoder_channels={tuple(decoder_channels)[:-1]!r}"
            )
        if deep_supervision:
            self.aux_heads = nn.ModuleList(
                DeepSupervisionHead(ch, decoder_channels[-1], num_classes, decoder_batch_norm)
                for ch in self.decoder.finest_channels[:-1]
            )
            for head in self.aux_heads:
                init_like_smp(head.block, head.head)

    @property
    def depth(self) -> int:
        """``K``, the number of nested levels (4 for a ResNet encoder); valid pruning depths are ``1..K``."""
        return self.decoder.depth

    def _check_depth(self, depth: int | None) -> int:
        if depth is None:
            return self.depth
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= self.depth:
            raise ValueError(f"depth must be an int in 1..{self.depth}, got {depth!r}")
        if depth < self.depth and not self.deep_supervision:
            raise ValueError(f"depth={depth} < {self.depth} needs the deep-supervision heads (deep_supervision=True)")
        return depth

    def prune(self, depth: int | None) -> UNetPlusPlus:
        """Make plain calls ``model(x)`` run only the sub-network UNet++ ``depth`` (``None``: full model).

        No weights are removed, so the state dict (and its checkpoints) stays that of the full model.

        Returns:
            The model itself.
        """
        self.inference_depth = None if depth is None else self._check_depth(depth)
        return self

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor | dict[str, torch.Tensor | list]:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size.

        Args:
            x: images.
            depth: run only UNet++ ``depth`` and return the logits of ``X^{0,depth}`` alone, in any
                mode; ``None`` uses :meth:`prune`'s setting, else the full model.

        Returns:
            Logits, or ``{"out": logits, "aux": [...]}`` in training with deep supervision when no
            depth is chosen.
        """
        depth = self.inference_depth if depth is None else depth
        single = depth is not None  # one head requested: return its logits only, in any mode
        depth = self._check_depth(depth)
        x, size = pad_to_multiple(x, self.encoder.feature_info[-1]["reduction"])
        features = self._encode(x)
        nodes = self.decoder.forward_nested(features, depth)
        k = self.depth
        if depth < k:
            node = nodes[self.decoder.finest_key(k, depth)]
            return crop_to(self.aux_heads[depth - 1](node, x.shape[-2:]), size)
        out = self.decoder.blocks[f"x_0_{k}"](nodes[f"x_0_{k - 1}"], x.shape[-2:])  # (B, C, H_pad, W_pad)
        out = crop_to(self.segmentation_head(out), size)
        if single or not (self.training and self.deep_supervision):
            return out
        aux = [
            crop_to(head(nodes[self.decoder.finest_key(k, j)], x.shape[-2:]), size)
            for j, head in enumerate(self.aux_heads, start=1)
        ]
        return {"out": out, "aux": aux}
