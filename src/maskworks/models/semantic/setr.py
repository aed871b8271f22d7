"""SETR (Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with Transformers",
CVPR 2021): a plain ViT encoder (no CNN, no downsampling after the patch embedding) and three decoders.

A registered ViT (default ``vit_large_patch16_384``, the paper's ViT-L/16) turns the image into a ``H/16 x W/16``
token grid; the blocks' patch tokens are read back as maps ``(B, C, H/16, W/16)`` (class token dropped) with
:meth:`~maskworks.backbones.vit.VisionTransformer.forward_intermediates`. The layout, module names and parameter
counts follow mmseg 1.2.2's ``SETRUPHead`` / ``MLANeck`` / ``SETRMLAHead`` and its ADE20K configs
(``setr_vit-l_{naive,pup}_8xb2-160k_ade20k-512x512``, ``setr_vit-l-mla_8xb1-160k_ade20k-512x512``):

* ``setr_naive``: the last block's map -> LayerNorm (eps 1e-6) -> 1x1 conv-BN-ReLU (``channels`` = 256) ->
  1x1 classifier -> bilinear x4 -> bilinear to the input (mmseg ``SETRUPHead(num_convs=1, up_scale=4,
  kernel_size=1)``).
* ``setr_pup`` (progressive upsampling): LayerNorm, then 4 x (3x3 conv-BN-ReLU + bilinear x2), so the logits come out
  at the full (padded) input resolution; 1x1 classifier (``SETRUPHead(num_convs=4, up_scale=2, kernel_size=3)``).
* ``setr_mla`` (multi-level aggregation): four blocks' maps -> :class:`MLANeck` (per level LayerNorm, 1x1
  conv-BN-ReLU to 256; top-down cumulative sum from the deepest level; per level 3x3 conv-BN-ReLU) ->
  :class:`SETRMLAHead` (per level 2 x 3x3 conv-BN-ReLU to 128, bilinear x4, concatenation, 1x1 classifier) ->
  bilinear to the input.

The 1x1 classifier is applied *before* the last bilinear upsampling of each head, not after it as mmseg does: a 1x1
conv and bilinear interpolation (whose weights sum to 1) commute exactly, so the logits are the same while the
upsampling moves ``num_classes`` channels instead of 256 (PUP / naive) or 512 (MLA). The tests check the identity.

Taps (``out_indices``, zero-based block indices): naive / PUP read blocks (9, 14, 19, 23) of ViT-L (the decode
head the last one, the auxiliary heads the first three); MLA reads (5, 11, 17, 23). For another depth ``d`` the same
fractions of the depth are used: naive / PUP ``round_half_up(d * (10, 15, 20, 24) / 24) - 1`` ((4, 7, 9, 11) for
``d = 12``), MLA ``(k + 1) * d // 4 - 1`` ((2, 5, 8, 11) for ``d = 12``, the ViT's ``default_indices``). Shallow test ViTs repeat blocks (depth 2: naive / PUP (0, 0, 1, 1), MLA
(0, 0, 0, 1)); ``out_indices=`` overrides.

Auxiliary heads (``aux=True``, the default; mmseg's ADE20K configs, each with loss weight 0.4): naive: three
``SETRUPHead(num_convs=2, kernel_size=1, up_scale=4)`` on the first three taps; PUP: three
``SETRUPHead(num_convs=2, kernel_size=3, up_scale=4)`` on the first three taps; MLA: four ``FCNHead(num_convs=0)``
(a 1x1 classifier, :class:`MLAAuxHead`) on the four neck outputs. In training the model returns
``{"out": logits, "aux": [aux_logits, ...]}``, all at input size, in eval only the logits. The losses weight every
auxiliary output by one ``aux_weight`` (default 0.4), which is what all of mmseg's SETR configs use; per-head weights
are not supported by :class:`maskworks.losses.base.SegLoss`.

Any input size: the input is zero-padded at the bottom / right to a multiple of the patch size, the ViT's position
table is resampled to the token grid (the encoder is built with ``dynamic_img_size=True``; the table is built for
``img_size``, 512 as in mmseg's ADE20K configs) and the logits are cropped back.

Parameters (meta device, 150 classes, auxiliary heads, ViT-L/16 at ``img_size=512``): naive 305,558,616, PUP
317,291,096, MLA 309,570,286; mmseg 1.2.2's configs count 1,024 fewer (305,557,592 / 317,290,072 / 309,569,262)
because mmseg's ``VisionTransformer`` has no patch-embedding bias (``patch_bias=False``), where timm's ViT (and its
checkpoints) has one. ``patch_bias=False`` removes it and gives mmseg's counts exactly. The ViT's final norm
(timm ``norm``) is removed, as mmseg's ``final_norm=False``: the heads normalise their own inputs.

Differences from mmseg that do not change parameters: the class token stays in the sequence for MLA too (mmseg's MLA
config drops it after adding the position embedding, ``with_cls_token=False``), and
the position table is resampled bicubically with antialiasing (timm), where mmseg uses bilinear.

Module names: ``encoder.*`` (timm ViT keys), ``decode_head.{norm, up_convs.{i}.0.{conv, bn}, conv_seg}`` (naive /
PUP), ``neck.{norm.{i}, mla.channel_proj.{i}.{conv, bn}, mla.feat_extract.{i}.{conv, bn}}`` and
``decode_head.{up_convs.{i}.{0,1}.{conv, bn}, conv_seg}`` (MLA), ``auxiliary_head.{i}.*``: the heads and neck
have mmseg's keys; the encoder has timm's (mmseg's ``backbone.layers.{i}.attn.attn.in_proj_weight``... would need
a converter, which does not exist yet).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.backbones.vit import VisionTransformer, checkpoint_filter_fn
from maskworks.layers.conv import ConvBNReLU
from maskworks.models._utils import (
    build_encoder,
    check_positive_int,
    crop_to,
    init_conv_norm,
    load_encoder_weights,
    pad_to_multiple,
)
from maskworks.registry import register_model

__all__ = ["SETR", "SETRUPHead", "MLANeck", "SETRMLAHead", "MLAAuxHead", "setr_out_indices"]

NormFactory = Callable[[int], nn.Module]
_DECODERS = ("naive", "pup", "mla")
_LN_EPS = 1e-6  # mmseg's backbone_norm_cfg / the heads' norm_layer: LN, eps 1e-6


def _layer_norm_2d(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a map ``(B, C, H, W)``."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _init_mmseg(convs: nn.Module, classifier: nn.Conv2d) -> None:
    """mmcv's ``ConvModule`` init (Kaiming normal, ``fan_out``, ReLU gain; BN 1 / 0) and the decode heads'
    classifier init (``N(0, 0.01)``, zero bias)."""
    init_conv_norm(convs, partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu"))
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def setr_out_indices(decoder: str, depth: int) -> tuple[int, int, int, int]:
    """The four zero-based block indices SETR taps for a ViT of ``depth`` blocks (see the module docstring)."""
    if decoder not in _DECODERS:
        raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
    check_positive_int("depth", depth)
    if decoder == "mla":
        return tuple(max(0, (k + 1) * depth // 4 - 1) for k in range(4))  # ViT-L: (5, 11, 17, 23)
    return tuple(max(0, _round_half_up(depth * f / 24) - 1) for f in (10, 15, 20, 24))  # ViT-L: (9, 14, 19, 23)


class SETRUPHead(nn.Module):
    """mmseg's ``SETRUPHead``: LayerNorm, ``num_convs`` x (conv-BN-ReLU + bilinear x ``up_scale``), 1x1 classifier.

    Args:
        in_channels: channels of the input map (the ViT width).
        num_classes: output channels.
        channels: width of the convs.
        num_convs: number of conv + upsampling stages.
        up_scale: upsampling factor of each stage.
        kernel_size: 1 or 3.
        norm_layer: norm of the convs (BatchNorm; mmseg trains with SyncBN).
        dropout: ``Dropout2d`` probability before the classifier (0 in mmseg's SETR configs).

    Returns (forward): logits ``(B, num_classes, h * up_scale ** num_convs, w * up_scale ** num_convs)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        up_scale: int = 4,
        kernel_size: int = 1,
        norm_layer: NormFactory = nn.BatchNorm2d,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int("num_convs", num_convs)
        check_positive_int("up_scale", up_scale)
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size!r}")
        self.norm = nn.LayerNorm(in_channels, eps=_LN_EPS)
        self.up_convs = nn.ModuleList(
            nn.Sequential(
                ConvBNReLU(in_channels if i == 0 else channels, channels, kernel_size, norm_layer=norm_layer),
                nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False),
            )
            for i in range(num_convs)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        _init_mmseg(self.up_convs, self.conv_seg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _layer_norm_2d(self.norm, x)
        for stage in self.up_convs[:-1]:
            x = stage(x)
        conv, up = self.up_convs[-1]
        return up(self.conv_seg(self.dropout(conv(x))))  # classify, then the last upsampling (they commute)


class _MLAModule(nn.Module):
    """mmseg's ``MLAModule``: ``channel_proj`` (1x1) per level, top-down cumulative sum, ``feat_extract`` (3x3)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.channel_proj = nn.ModuleList(ConvBNReLU(c, out_channels, 1, norm_layer=norm_layer) for c in in_channels)
        self.feat_extract = nn.ModuleList(
            ConvBNReLU(out_channels, out_channels, 3, norm_layer=norm_layer) for _ in in_channels
        )

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        projected = [conv(x) for conv, x in zip(self.channel_proj, inputs)]  # [p2, p3, p4, p5], shallow first
        mids = []
        for p in reversed(projected):  # m5 = p5, m4 = m5 + p4, m3 = m4 + p3, m2 = m3 + p2
            mids.append(p if not mids else mids[-1] + p)
        return [conv(m) for conv, m in zip(self.feat_extract, mids)]  # [o5, o4, o3, o2], deepest first (mmseg)


class MLANeck(nn.Module):
    """mmseg's ``MLANeck``: LayerNorm (eps 1e-6) per level, then the multi-level aggregation.

    Args:
        in_channels: channels of the tapped maps, shallowest first.
        out_channels: width of every output level (``mla_channels``, 256).
        norm_layer: norm of the convs.

    Returns (forward): the aggregated maps, **deepest first** (mmseg's order): output ``i`` is ``feat_extract[i]``
    applied to the sum of the ``i + 1`` deepest projected levels.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, norm_layer: NormFactory = nn.BatchNorm2d):
        super().__init__()
        in_channels = tuple(in_channels)
        self.norm = nn.ModuleList(nn.LayerNorm(c, eps=_LN_EPS) for c in in_channels)
        self.mla = _MLAModule(in_channels, out_channels, norm_layer)
        init_conv_norm(self.mla, partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu"))

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.norm):
            raise ValueError(f"expected {len(self.norm)} maps, got {len(inputs)}")
        return self.mla([_layer_norm_2d(norm, x) for norm, x in zip(self.norm, inputs)])


class SETRMLAHead(nn.Module):
    """mmseg 1.x's ``SETRMLAHead``: per level 2 x 3x3 conv-BN-ReLU to ``mla_channels``, bilinear x ``up_scale``,
    concatenation (``channels = n * mla_channels``), 1x1 classifier.

    Returns (forward): logits at ``up_scale`` times the resolution of the (equal-size) input maps.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        mla_channels: int = 128,
        up_scale: int = 4,
        norm_layer: NormFactory = nn.BatchNorm2d,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels = tuple(in_channels)
        check_positive_int("mla_channels", mla_channels)
        check_positive_int("up_scale", up_scale)
        self.up_convs = nn.ModuleList(
            nn.Sequential(
                ConvBNReLU(c, mla_channels, 3, norm_layer=norm_layer),
                ConvBNReLU(mla_channels, mla_channels, 3, norm_layer=norm_layer),
            )
            for c in in_channels
        )
        # mmseg's per-level Upsample(x up_scale) runs after the 1x1 classifier here (identical logits, see module doc)
        self.up = nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(len(in_channels) * mla_channels, num_classes, kernel_size=1)
        _init_mmseg(self.up_convs, self.conv_seg)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([conv(x) for conv, x in zip(self.up_convs, inputs)], dim=1)
        return self.up(self.conv_seg(self.dropout(x)))


class MLAAuxHead(nn.Module):
    """mmseg's ``FCNHead(num_convs=0, concat_input=False)`` as SETR-MLA's auxiliary head: a 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class SETR(nn.Module):
    """SETR: a registered ViT encoder with the naive, PUP or MLA decoder (see the module docstring).

    Args:
        decoder: ``"naive"``, ``"pup"`` or ``"mla"``.
        encoder: name of a registered ViT backbone (with ``forward_intermediates`` and ``patch_embed``).
        num_classes: output channels (logits).
        in_channels: input image channels.
        encoder_weights: published encoder weights (a tag of ``maskworks models --pretrained``), a local
            checkpoint path, or ``None`` for random init.
        img_size: size the position table is built for (it is resampled for every other input size); ``None``
            keeps the encoder's own (384 for ``vit_large_patch16_384``). 512 is mmseg's ADE20K setting.
        out_indices: the four tapped block indices (zero-based); ``None``: :func:`setr_out_indices`.
        aux: add the auxiliary heads (returned in training only).
        channels: width of the naive / PUP heads and of their auxiliary heads.
        mla_channels: width of the MLA neck.
        mla_head_channels: per-level width of the MLA head.
        norm_layer: norm of all head convs (BatchNorm; convert to SyncBatchNorm for DDP as mmseg's SyncBN).
        dropout: ``Dropout2d`` before each classifier (0 in mmseg's configs).
        patch_bias: keep the patch embedding's bias (timm's ViT and checkpoints have one); ``False`` as mmseg.
    """

    def __init__(
        self,
        decoder: str = "pup",
        encoder: str = "vit_large_patch16_384",
        num_classes: int = 150,
        in_channels: int = 3,
        encoder_weights: str | os.PathLike | None = None,
        img_size: int | tuple[int, int] | None = 512,
        out_indices: Sequence[int] | None = None,
        aux: bool = True,
        channels: int = 256,
        mla_channels: int = 256,
        mla_head_channels: int = 128,
        norm_layer: NormFactory = nn.BatchNorm2d,
        dropout: float = 0.0,
        patch_bias: bool = True,
    ) -> None:
        super().__init__()
        if decoder not in _DECODERS:
            raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
        check_positive_int("num_classes", num_classes)
        check_positive_int("channels", channels)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.decoder = decoder
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.aux = bool(aux)

        self.encoder = _build_vit(encoder, in_channels, encoder_weights, img_size)
        enc = self.encoder
        if not (hasattr(enc, "forward_intermediates") and hasattr(enc, "patch_embed") and hasattr(enc, "blocks")):
            raise ValueError(f"encoder must be a ViT (forward_intermediates, patch_embed, blocks), got {encoder!r}")
        enc.norm = nn.Identity()  # mmseg's final_norm=False: the heads normalise their inputs themselves
        if not patch_bias:
            enc.patch_embed.proj.bias = None  # mmseg's VisionTransformer(patch_bias=False)
        ph, pw = enc.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"SETR needs a square patch, got {(ph, pw)}")
        self._pad_multiple = ph
        depth = len(enc.blocks)
        if out_indices is None:
            out_indices = setr_out_indices(decoder, depth)
        out_indices = tuple(out_indices)
        if len(out_indices) != 4 or not all(isinstance(i, int) and -depth <= i < depth for i in out_indices):
            raise ValueError(f"out_indices must be 4 block indices for depth {depth}, got {out_indices!r}")
        self.out_indices = tuple(i % depth for i in out_indices)
        width = enc.embed_dim

        if decoder == "mla":
            self.neck = MLANeck([width] * 4, mla_channels, norm_layer)
            self.decode_head = SETRMLAHead([mla_channels] * 4, num_classes, mla_head_channels, 4, norm_layer, dropout)
            aux_heads = [MLAAuxHead(mla_channels, num_classes, dropout) for _ in range(4)]
        else:
            self.neck = None
            pup = decoder == "pup"
            self.decode_head = SETRUPHead(
                width,
                num_classes,
                channels,
                num_convs=4 if pup else 1,
                up_scale=2 if pup else 4,
                kernel_size=3 if pup else 1,
                norm_layer=norm_layer,
                dropout=dropout,
            )
            aux_heads = [
                SETRUPHead(width, num_classes, channels, 2, 4, 3 if pup else 1, norm_layer, dropout) for _ in range(3)
            ]
        self.auxiliary_head = nn.ModuleList(aux_heads) if self.aux else None

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four tapped maps ``(B, C, H/p, W/p)`` for a padded input (block order of ``out_indices``)."""
        unique = sorted(set(self.out_indices))
        maps = dict(zip(unique, self.encoder.forward_intermediates(x, indices=unique)))
        return [maps[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)`` of any size.

        In training with ``aux=True``: ``{"out": logits, "aux": [aux_logits, ...]}``, all at input size.
        """
        x, size = pad_to_multiple(x, self._pad_multiple)
        padded = x.shape[-2:]
        features = self.forward_features(x)
        with_aux = self.aux and self.training
        if self.neck is not None:
            features = self.neck(features)  # deepest first
            out = self.decode_head(features)
            aux = [head(f) for head, f in zip(self.auxiliary_head, features)] if with_aux else []
        else:
            out = self.decode_head(features[-1])
            aux = [head(f) for head, f in zip(self.auxiliary_head, features[:3])] if with_aux else []
        out = crop_to(_resize(out, padded), size)
        if not with_aux:
            return out
        return {"out": out, "aux": [crop_to(_resize(a, padded), size) for a in aux]}


def _build_vit(
    encoder: str,
    in_channels: int,
    encoder_weights: str | os.PathLike | None,
    img_size: int | tuple[int, int] | None,
) -> nn.Module:
    """The ViT with a dynamic image size and no classifier, its position table built for ``img_size``.

    Weights made at another resolution (timm's ViT-L/16 at 384 for a 512 table) are loaded into the encoder at its
    own size and moved to ``img_size`` with :func:`~maskworks.backbones.vit.checkpoint_filter_fn` (timm's bicubic
    resampling of ``pos_embed``; mmseg resizes bilinearly when it loads the same checkpoint).
    """
    options: dict = {"num_classes": 0, "dynamic_img_size": True}
    if img_size is None:
        return build_encoder(encoder, in_channels, encoder_weights, **options)
    target = build_encoder(encoder, in_channels, None, img_size=img_size, **options)
    if encoder_weights is None or encoder_weights is False:
        return target
    if not isinstance(target, VisionTransformer):
        load_encoder_weights(target, encoder, encoder_weights)
        return target
    native = build_encoder(encoder, in_channels, encoder_weights, **options)
    if native.patch_embed.grid_size == target.patch_embed.grid_size:
        return native
    target.load_state_dict(checkpoint_filter_fn(native.state_dict(), target))
    return target


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _make_variant(decoder: str):
    name = f"setr_{decoder}"

    def fn(**kwargs) -> SETR:
        if "decoder" in kwargs:
            raise TypeError(f"{name} fixes decoder={decoder!r}; use another setr_* model for another decoder")
        return SETR(decoder=decoder, **kwargs)

    params = [p for p in inspect.signature(SETR).parameters.values() if p.name != "decoder"]
    fn.__signature__ = inspect.Signature([p.replace(kind=p.KEYWORD_ONLY) for p in params])
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"SETR-{decoder.upper() if decoder != 'naive' else 'Naive'} (keyword arguments as :class:`SETR`)."
    return fn


setr_naive = register_model(name="setr_naive")(_make_variant("naive"))
setr_pup = register_model(name="setr_pup")(_make_variant("pup"))
setr_mla = register_model(name="setr_mla")(_make_variant("mla"))
