"""Test-time augmentation (TTA) for semantic segmentation.

Each augmentation is a small invertible transform: ``forward(x)`` changes the image, the model runs on it, and
``inverse(logits, size)`` maps the output back onto the pixel grid of the original image, so the per-transform
predictions can be averaged pixel by pixel. Flips and quarter turns are exact permutations of pixels (the
dihedral group D4, as used for mirroring TTA in nnU-Net, Isensee et al. 2021); scaling resizes the image by a
factor and the logits back to the input size (multi-scale inference, as in Chen et al. 2017, DeepLab, and the
``aug_test`` of mmsegmentation).

Probabilities are averaged by default (``activation="softmax"``); with ``activation=None`` the logits are
averaged. :func:`tta` is the function; :class:`TTAWrapper` is an ``nn.Module`` doing the same, so a TTA model
can go wherever a model goes (for example into a sliding-window function, giving TTA inside each window).

Presets (``transforms=`` a name):

* ``"identity"``: the plain prediction.
* ``"flip"``: identity and horizontal flip (2 passes).
* ``"mirror"``: identity, horizontal, vertical and both flips (4 passes; nnU-Net's 2D mirroring).
* ``"rot90"``: the four quarter turns (4 passes).
* ``"d4"`` / ``"flip4"``: the 8 symmetries of the square: the four quarter turns, each with and without a
  horizontal flip.
* ``"scales"``: scales 0.75, 1 and 1.25 (3 passes).
* ``"flip_scales"``: each of those scales with and without a horizontal flip (6 passes).
* ``"ms_flip"``: scales 0.5, 0.75, 1, 1.25, 1.5, 1.75 with and without a horizontal flip (12 passes; the
  multi-scale + flip test of mmsegmentation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.losses import split_outputs

__all__ = [
    "TTA_PRESETS",
    "Compose",
    "HFlip",
    "Identity",
    "Rot90",
    "Scale",
    "TTATransform",
    "TTAWrapper",
    "VFlip",
    "get_tta_transforms",
    "iter_tta",
    "tta",
]

_ACTIVATIONS = ("softmax", "sigmoid", None)
_MERGES = ("mean", "max")
_SIZE = tuple[int, int]


class TTATransform(ABC):
    """An invertible test-time transform of the last two (spatial) dimensions.

    Subclasses implement ``forward(x)`` for the image and ``inverse(logits, size)`` for the model output;
    ``size`` is the ``(H, W)`` of the original image (needed by transforms that change the size).
    """

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed image."""

    @abstractmethod
    def inverse(self, logits: torch.Tensor, size: _SIZE | None = None) -> torch.Tensor:
        """The model output mapped back onto the original image grid of spatial size ``size``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


@dataclass(frozen=True)
class Identity(TTATransform):
    """The image as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, logits: torch.Tensor, size: _SIZE | None = None) -> torch.Tensor:
        return logits


@dataclass(frozen=True)
class HFlip(TTATransform):
    """Mirror left-right (flip the last dimension); its own inverse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)

    def inverse(self, logits: torch.Tensor, size: _SIZE | None = None) -> torch.Tensor:
        return logits.flip(-1)


@dataclass(frozen=True)
class VFlip(TTATransform):
    """Mirror top-bottom (flip the second-to-last dimension); its own inverse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-2)

    def inverse(self, logits: torch.Tensor, size: _SIZE | None = None) -> torch.Tensor:
        return logits.flip(-2)


@dataclass(frozen=True)
class Rot90(TTATransform):
    """Rotate by ``k`` quarter turns counter-clockwise; an ``(H, W)`` image becomes ``(W, H)`` for odd ``k``.

    Args:
        k: number of quarter turns, 1, 2 or 3.
    """

    k: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k not in (1, 2, 3):
            raise ValueError(f"k must be 1, 2 or 3 quarter turns (use Identity() for none), got {self.k!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, self.k, dims=(-2, -1))

    def inverse(self, logits: torch.Tensor, size: _SIZE | None = None) -> torch.Tensor:
        return torch.rot90(logits, -self.k, dims=(-2, -1))


@dataclass(frozen=True)
class Scale(TTATransform):
    """Resize the image by ``factor`` and the logits back to the original size.

    The resized side is ``round(side * factor)`` (at least 1), so sizes that do not divide evenly are fine; the
    inverse needs the original ``size``, since rounding cannot be undone from the resized side alone.

    Args:
        factor: scale factor (> 0); 1 leaves the image untouched.
        mode: ``F.interpolate`` mode for the image and the logits, ``"bilinear"`` or ``"bicubic"``
            (``align_corners=False``).
        antialias: low-pass the image when shrinking it (``F.interpolate(antialias=True)``).
    """

    factor: float
    mode: str = "bilinear"
    antialias: bool = False

    def __post_init__(self) -> None:
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"scale factor must be a finite number > 0, got {f!r}")
        if self.mode not in ("bilinear", "bicubic"):
            raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {self.mode!r}")

    def scaled_size(self, size: _SIZE) -> _SIZE:
        """The ``(H, W)`` the image of spatial size ``size`` is resized to."""
        h, w = size
        return max(1, math.floor(h * self.factor + 0.5)), max(1, math.floor(w * self.factor + 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"Scale expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        new = self.scaled_size(tuple(x.shape[-2:]))
        if new == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=new, mode=self.mode, align_corners=False, antialias=self.antialias)

    def inverse(self, logits: torch.Tensor, size: _SIZE | None = None) -> torch.Tensor:
        if size is None:
            raise ValueError("Scale.inverse needs size=(H, W), the spatial size of the original image")
        size = (int(size[0]), int(size[1]))
        if tuple(logits.shape[-2:]) == size:
            return logits
        if logits.dim() != 4:
            raise ValueError(f"Scale expects (B, K, H, W) logits, got shape {tuple(logits.shape)}")
        return F.interpolate(logits, size=size, mode=self.mode, align_corners=False)


class Compose(TTATransform):
    """Transforms applied in order; the inverse undoes them in reverse order.

    Args:
        *transforms: :class:`TTATransform` instances (or names of elementary transforms, e.g. ``"hflip"``).
    """

    def __init__(self, *transforms: TTATransform | str) -> None:
        if not transforms:
            raise ValueError("Compose needs at least one transform")
        self.transforms = tuple(_as_transform(t, f"transforms[{i}]") for i, t in enumerate(transforms))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t.forward(x)
        return x

    def inverse(self, logits: torch.Tensor, size: _SIZE | None = None) -> torch.Tensor:
        # Each inner inverse needs the size of *its* input: replay the sizes forward first.
        sizes = [None if size is None else (int(size[0]), int(size[1]))]
        for t in self.transforms[:-1]:
            sizes.append(_forward_size(t, sizes[-1]))
        for t, s in zip(reversed(self.transforms), reversed(sizes)):
            logits = t.inverse(logits, s)
        return logits

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compose) and self.transforms == other.transforms

    def __hash__(self) -> int:
        return hash(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


def _forward_size(t: TTATransform, size: _SIZE | None) -> _SIZE | None:
    """The spatial size after ``t.forward`` of an image of spatial size ``size``."""
    if size is None:
        return None
    if isinstance(t, Rot90) and t.k % 2:
        return size[1], size[0]
    if isinstance(t, Scale):
        return t.scaled_size(size)
    if isinstance(t, Compose):
        for inner in t.transforms:
            size = _forward_size(inner, size)
        return size
    if isinstance(t, (Identity, HFlip, VFlip)):
        return size
    # A user transform: find out by transforming an empty tensor of that size.
    return tuple(t.forward(torch.empty(1, 0, *size)).shape[-2:])


_ELEMENTARY: dict[str, Callable[[], TTATransform]] = {
    "identity": Identity,
    "hflip": HFlip,
    "vflip": VFlip,
    "rot90": lambda: Rot90(1),
    "rot180": lambda: Rot90(2),
    "rot270": lambda: Rot90(3),
}


def _as_transform(t: TTATransform | str, name: str) -> TTATransform:
    if isinstance(t, TTATransform):
        return t
    if isinstance(t, str):
        if t not in _ELEMENTARY:
            raise ValueError(f"{name} must be one of {sorted(_ELEMENTARY)} or a TTATransform, got {t!r}")
        return _ELEMENTARY[t]()
    raise TypeError(f"{name} must be a TTATransform or the name of one, got {type(t).__name__}")


def _rotations() -> list[TTATransform]:
    return [Identity(), Rot90(1), Rot90(2), Rot90(3)]


def _with_flip(ts: list[TTATransform]) -> list[TTATransform]:
    return ts + [HFlip() if isinstance(t, Identity) else Compose(t, HFlip()) for t in ts]


def _scales(factors: Sequence[float]) -> list[TTATransform]:
    return [Identity() if f == 1 else Scale(f) for f in factors]


_PRESETS: dict[str, Callable[[], list[TTATransform]]] = {
    "identity": lambda: [Identity()],
    "flip": lambda: [Identity(), HFlip()],
    "mirror": lambda: [Identity(), HFlip(), VFlip(), Compose(HFlip(), VFlip())],
    "rot90": _rotations,
    "d4": lambda: _with_flip(_rotations()),
    "flip4": lambda: _with_flip(_rotations()),
    "scales": lambda: _scales((0.75, 1.0, 1.25)),
    "flip_scales": lambda: _with_flip(_scales((0.75, 1.0, 1.25))),
    "ms_flip": lambda: _with_flip(_scales((0.5, 0.75, 1.0, 1.25, 1.5, 1.75))),
}
TTA_PRESETS: tuple[str, ...] = tuple(_PRESETS)


def get_tta_transforms(
    transforms: str | TTATransform | Sequence[TTATransform | str] = "flip",
) -> list[TTATransform]:
    """The list of transforms a ``transforms=`` argument stands for.

    Args:
        transforms: a preset name (see :data:`TTA_PRESETS`), one :class:`TTATransform`, or a sequence of
            transforms and names of elementary transforms (``"identity"``, ``"hflip"``, ``"vflip"``,
            ``"rot90"``, ``"rot180"``, ``"rot270"``).

    Returns:
        A non-empty list of :class:`TTATransform`.
    """
    if isinstance(transforms, str):
        if transforms not in _PRESETS:
            raise ValueError(f"transforms must be one of the presets {list(TTA_PRESETS)}, got {transforms!r}")
        return _PRESETS[transforms]()
    if isinstance(transforms, TTATransform):
        return [transforms]
    if not isinstance(transforms, Sequence):
        raise TypeError(
            f"transforms must be a preset name, a TTATransform or a sequence of them, got {type(transforms).__name__}"
        )
    if len(transforms) == 0:
        raise ValueError("transforms must not be empty")
    return [_as_transform(t, f"transforms[{i}]") for i, t in enumerate(transforms)]


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}")


def _activate(logits: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "softmax":
        return logits.softmax(dim=1)
    if activation == "sigmoid":
        return logits.sigmoid()
    return logits


def _check_model_and_image(model: Callable, x: torch.Tensor) -> None:
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable returning logits, got {type(model).__name__}")
    _check_image(x)


def _check_image(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)}")


def iter_tta(
    model: Callable[[torch.Tensor], torch.Tensor | dict],
    x: torch.Tensor,
    transforms: str | TTATransform | Sequence[TTATransform | str] = "flip",
    activation: str | None = "softmax",
) -> Iterator[tuple[TTATransform, torch.Tensor]]:
    """Run the model on each transformed image, one at a time, and yield the output on the original grid.

    Args:
        model: maps ``(B, C, H, W)`` images to ``(B, K, H, W)`` logits (or ``{"out": logits, ...}``).
        x: ``(B, C, H, W)`` images.
        transforms: see :func:`get_tta_transforms`.
        activation: ``"softmax"`` (over dim 1), ``"sigmoid"`` or ``None`` (raw logits).

    Yields:
        ``(transform, output)`` with ``output`` of shape ``(B, K, H, W)``, activated as asked.
    """
    _check_model_and_image(model, x)
    _check_activation(activation)
    ts = get_tta_transforms(transforms)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    for t in ts:
        xt = t.forward(x)
        out = split_outputs(model(xt))[0]
        if out.dim() != 4 or out.shape[0] != x.shape[0] or out.shape[-2:] != xt.shape[-2:]:
            raise ValueError(
                f"under {t!r} the model returned shape {tuple(out.shape)} for an input of shape {tuple(xt.shape)}; "
                "expected logits (B, K, H, W) at the input resolution"
            )
        yield t, _activate(t.inverse(out, size), activation)


def tta(
    model: Callable[[torch.Tensor], torch.Tensor | dict],
    x: torch.Tensor,
    transforms: str | TTATransform | Sequence[TTATransform | str] = "flip",
    merge: str = "mean",
    activation: str | None = "softmax",
    return_all: bool = False,
    as_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Test-time augmentation: average the model's predictions over transformed copies of the image.

    Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for inference) and leaves the model's
    train/eval mode alone. The transformed images go through the model one at a time, so memory is that of one
    forward pass plus the running merge (and all outputs when ``return_all=True``).

    Args:
        model: maps ``(B, C, H, W)`` images to ``(B, K, H, W)`` logits at input resolution (or a dict with
            ``"out"``).
        x: ``(B, C, H, W)`` images.
        transforms: a preset name (``"flip"``, ``"mirror"``, ``"rot90"``, ``"d4"``, ``"scales"``, ...), a
            :class:`TTATransform`, or a sequence of them; see :func:`get_tta_transforms`.
        merge: ``"mean"`` or ``"max"`` (pixel-wise maximum) over the transforms.
        activation: ``"softmax"`` (average probabilities), ``"sigmoid"`` (average per-channel probabilities of
            binary / multi-label models) or ``None`` (average logits).
        return_all: also return the per-transform outputs.
        as_logits: turn the merged probabilities back into logits (``log p`` after softmax, ``logit p`` after
            sigmoid), so that applying the activation again gives exactly the merged probabilities; ignored
            when ``activation`` is None.

    Returns:
        The merged ``(B, K, H, W)`` output, and with ``return_all=True`` a tuple ``(merged, outputs)`` where
        ``outputs`` is ``(T, B, K, H, W)`` in the order of the transforms (activated, never converted by
        ``as_logits``).
    """
    if merge not in _MERGES:
        raise ValueError(f"merge must be one of {list(_MERGES)}, got {merge!r}")
    acc: torch.Tensor | None = None
    outs: list[torch.Tensor] = []
    n = 0
    out_dtype = x.dtype
    for _, out in iter_tta(model, x, transforms, activation):
        out_dtype = out.dtype
        if return_all:
            outs.append(out)
        work = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        if acc is None:
            acc = work.clone()
        elif acc.shape != work.shape:
            raise ValueError(
                f"model outputs differ in shape across transforms: {tuple(acc.shape)} vs {tuple(work.shape)}"
            )
        elif merge == "mean":
            acc += work
        else:
            torch.maximum(acc, work, out=acc)
        n += 1
    assert acc is not None  # get_tta_transforms never returns an empty list
    merged = acc / n if merge == "mean" else acc
    if as_logits:
        merged = _to_logits(merged, activation)
    merged = merged.to(out_dtype)
    if return_all:
        return merged, torch.stack(outs)
    return merged


def _to_logits(probs: torch.Tensor, activation: str | None) -> torch.Tensor:
    tiny = torch.finfo(probs.dtype).tiny
    if activation == "softmax":
        return probs.clamp_min(tiny).log()
    if activation == "sigmoid":
        return probs.clamp_min(tiny).log() - (1 - probs).clamp_min(tiny).log()
    return probs


class TTAWrapper(nn.Module):
    """A model whose forward is :func:`tta` of the wrapped model; it can go wherever a model goes.

    For a drop-in replacement that keeps the "models return logits" contract (losses, metrics with
    ``from_logits``, sliding-window stitching of logits), pass ``as_logits=True``: the output is then
    ``log`` of the averaged probabilities, whose softmax is exactly the TTA average.

    Args:
        model: the segmentation model (a submodule, so ``.to()``, ``.eval()`` and ``state_dict`` reach it).
        transforms: preset name, transform or sequence of them (see :func:`get_tta_transforms`); resolved now.
        merge: ``"mean"`` or ``"max"``.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None``.
        as_logits: return logits of the merged probabilities instead of the probabilities.
    """

    def __init__(
        self,
        model: nn.Module,
        transforms: str | TTATransform | Sequence[TTATransform | str] = "flip",
        merge: str = "mean",
        activation: str | None = "softmax",
        as_logits: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if merge not in _MERGES:
            raise ValueError(f"merge must be one of {list(_MERGES)}, got {merge!r}")
        _check_activation(activation)
        self.model = model
        self.transforms = get_tta_transforms(transforms)
        self.merge = merge
        self.activation = activation
        self.as_logits = bool(as_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The merged ``(B, K, H, W)`` prediction for ``(B, C, H, W)`` images."""
        return tta(self.model, x, self.transforms, self.merge, self.activation, as_logits=self.as_logits)

    def extra_repr(self) -> str:
        return f"transforms={self.transforms}, merge={self.merge!r}, activation={self.activation!r}"
