"""Helpers shared by models: padding inputs to the multiple a network needs and cropping back, encoder
construction, argument checks and weight initialisation (:func:`init_kaiming` and :func:`init_conv_norm` live in
:mod:`maskworks.layers.weight_init`, importable by backbones too, and are re-exported here).

Models accept any ``H, W`` (see DESIGN.md): they pad the bottom and right edges up to their
required multiple, run, and crop the logits back to the input size, so the top-left pixel
grid is unchanged and cropping is a plain slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.convert import LoadResult, load_weights
from maskworks.layers.weight_init import init_conv_norm, init_kaiming
from maskworks.registry import model_entry

__all__ = [
    "pad_to_multiple",
    "resize_bilinear",
    "crop_to",
    "center_crop",
    "build_encoder",
    "build_dense_encoder",
    "load_encoder_weights",
    "check_positive_int",
    "check_positive_ints",
    "init_conv_norm",
    "init_kaiming",
    "init_like_smp",
]


def check_positive_int(name: str, value: object, *, allow_bool: bool = False) -> int:
    """``value`` if it is an int >= 1, else ``ValueError("{name} must be a positive int, got {value!r}")``.

    ``allow_bool=True`` lets ``True`` through as 1 (the lenient check some constructors have always made).
    """
    if not isinstance(value, int) or (isinstance(value, bool) and not allow_bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_ints(name: str, value: Sequence[int], length: int, *, allow_bool: bool = False) -> tuple[int, ...]:
    """``tuple(value)`` if it holds ``length`` ints >= 1, else ``ValueError("{name} must be {length} positive ints,
    got ...")``; ``allow_bool`` as in :func:`check_positive_int`."""
    value = tuple(value)
    if len(value) != length or not all(
        isinstance(c, int) and (allow_bool or not isinstance(c, bool)) and c > 0 for c in value
    ):
        raise ValueError(f"{name} must be {length} positive ints, got {value!r}")
    return value


def build_encoder(
    encoder: str, in_channels: int, encoder_weights: bool | str | os.PathLike | None = None, **kwargs
) -> nn.Module:
    """Build the registered backbone ``encoder`` and load ``encoder_weights`` when given.

    Args:
        encoder: name of a registered backbone (``kind="backbone"``).
        in_channels: input image channels.
        encoder_weights: see :func:`load_encoder_weights`; None for random init.
        **kwargs: further backbone arguments (e.g. ``output_stride``).

    Returns:
        The backbone; a final norm that only its ``forward_features`` uses (Swin) is replaced by an identity
        (``prune_final_norm``), as in timm's ``features_only`` models.
    """
    entry = model_entry(encoder)
    if entry.kind != "backbone":
        raise ValueError(f"encoder must be a registered backbone, got {encoder!r} (kind={entry.kind!r})")
    model = entry.fn(in_channels=in_channels, **kwargs)
    prune = getattr(model, "prune_final_norm", None)
    if callable(prune):  # a norm used only by forward_features (Swin): no parameter without a gradient
        prune()
    load_encoder_weights(model, encoder, encoder_weights)
    return model


# Backbone options for dense prediction, passed where the backbone takes them: per-stage output norms, and mmseg's
# window order for Swin.
_DENSE_OPTIONS = {"out_norms": True, "window_padding": "mmseg"}


def build_dense_encoder(
    encoder: str, in_channels: int, encoder_weights: bool | str | os.PathLike | None, out_norms: bool
) -> nn.Module:
    """:func:`build_encoder` for dense heads (UPerNet, Mask2Former): with one LayerNorm per stage map
    (``out_norms=True``, as mmseg's ``norm0..3`` and HF ``*Backbone``'s ``hidden_states_norms``) and mmseg's window
    order where the backbone takes those options (Swin); backbones without them (ResNet, MobileNet) are built
    plainly."""
    options = dict(_DENSE_OPTIONS) if out_norms else {"window_padding": "mmseg"}
    while True:
        try:
            return build_encoder(encoder, in_channels, encoder_weights, **options)
        except TypeError as err:  # a backbone without one of the options (ResNet, MobileNet, ConvNeXt's windows)
            unknown = next((k for k in options if f"'{k}'" in str(err)), None)
            if unknown is None:
                raise
            del options[unknown]


def load_encoder_weights(
    module: nn.Module, encoder: str, encoder_weights: bool | str | os.PathLike | None
) -> LoadResult | None:
    """Load ``encoder_weights`` into the backbone ``module`` (built as the registered backbone ``encoder``).

    ``encoder_weights`` is ``None`` (nothing to do), a tag of ``encoder``'s published weights (``"imagenet"`` or
    ``True``: its default ImageNet tag; ``"a1_in1k"``...: see ``maskworks models --pretrained``), fetched into the
    cache (``$MASKWORKS_HOME``) and loaded with the converter its row names, or a local checkpoint path
    (torchvision / timm / maskworks keys, format detected). Classifier heads are dropped and the first convolution
    adapted to the module's input channels; a file that fills less than half of the backbone is refused.

    Returns:
        What :func:`maskworks.load_weights` returns, or ``None`` when ``encoder_weights`` is ``None``.

    Raises:
        ValueError: an unknown tag (the message lists the encoder's tags) or a checkpoint that does not fit.
        maskworks.hub.WeightsUnavailable: (an ``OSError``) published weights could not be obtained.
    """
    if encoder_weights is None or encoder_weights is False:
        return None
    from maskworks.hub import resolve_weights

    resolved = resolve_weights(encoder, encoder_weights)
    return load_weights(module, resolved.path, source=resolved.source)


def init_like_smp(decoder: nn.Module, head: nn.Module) -> None:
    """smp's ``initialize_decoder`` / ``initialize_head``, so training from scratch behaves the same: Kaiming
    uniform convs and unit BatchNorm in the decoder, Xavier uniform convs in the head, zero biases."""
    init_conv_norm(decoder, partial(nn.init.kaiming_uniform_, mode="fan_in", nonlinearity="relu"))
    init_conv_norm(head, nn.init.xavier_uniform_, norm_types=())


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "constant", value: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom and right of ``x`` so that ``H`` and ``W`` are multiples of ``multiple``.

    Zeros (``mode="constant"``) are the default: inputs are mean/std normalised, so zero is the
    dataset mean, and it works for any size, where ``"reflect"`` needs the pad to be smaller
    than the image.

    Args:
        x: tensor ``(..., H, W)``.
        multiple: the required divisor of ``H`` and ``W``.
        mode: ``F.pad`` mode: ``"constant"``, ``"reflect"`` or ``"replicate"``.
        value: fill value for ``mode="constant"``.

    Returns:
        The padded tensor (``x`` itself when nothing is needed) and the original ``(H, W)``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple!r}")
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode, value=value if mode == "constant" else None)
    return x, (h, w)


def resize_bilinear(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize of logits / features ``(..., H, W)`` to ``size`` (``x`` itself when already there)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (H, W)`` of ``x``."""
    h, w = size
    if x.shape[-2:] == (h, w):
        return x
    return x[..., :h, :w]


def center_crop(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The central ``size = (H, W)`` window of ``x`` (U-Net's crop-and-concat for valid convs)."""
    h, w = x.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"cannot centre-crop a {h}x{w} map to {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]
