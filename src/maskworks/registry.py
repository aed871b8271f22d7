"""One registry of named models and backbones.

Every constructor that a user can reach by name is registered here with
:func:`register_model`; :func:`create_model` builds it from keyword arguments and
:func:`list_models` lists the names. Backbones share the registry and are tagged
``kind="backbone"`` so decoders can look them up by name too.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "model_entry", "is_model"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    kind: str  # "model" | "backbone"
    task: str  # "semantic" | "instance" | ... | "backbone": the default task
    tasks: tuple[str, ...] = ()  # every task the model serves (``--task`` picks one); () = just ``task``

    @property
    def all_tasks(self) -> tuple[str, ...]:
        """The tasks the model serves, its default :attr:`task` first."""
        return (self.task, *(t for t in self.tasks if t != self.task))


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    name: str | None = None,
    kind: str = "model",
    task: str = "semantic",
    tasks: tuple[str, ...] = (),
):
    """Register a model constructor under ``name`` (default: the function's name).

    Usable as ``@register_model`` or ``@register_model(name="x", kind="backbone")``. ``task`` is the model's
    default task; a model that serves several (Mask2Former) lists them in ``tasks`` and takes a ``task=`` keyword.
    Registering a name twice raises ``ValueError``.
    """

    def _register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model name {key!r} is already registered (by {_REGISTRY[key].fn.__module__})")
        _REGISTRY[key] = ModelEntry(key, f, kind, "backbone" if kind == "backbone" else task, tuple(tasks))
        return f

    return _register(fn) if fn is not None else _register


def _ensure_loaded() -> None:
    # Importing the families registers their constructors.
    import maskworks.backbones  # noqa: F401
    import maskworks.models  # noqa: F401


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(
            f"model name must be a string such as 'unet' or 'deeplabv3plus', got {name!r} ({type(name).__name__}); "
            "see `maskworks models` (or maskworks.list_models()) for the names"
        )
    return name


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a ``ValueError`` suggests close names for an unknown one."""
    _check_name(name)
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} `maskworks models` lists all {len(_REGISTRY)} names.")
    return _REGISTRY[name]


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model or backbone name (``False`` for a non-string)."""
    _ensure_loaded()
    return isinstance(name, str) and name in _REGISTRY


def _check_kwargs(entry: ModelEntry, kwargs: dict) -> None:
    """A ``TypeError`` naming the model and each argument its constructor does not take (with close names)."""
    try:
        params = inspect.signature(entry.fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: let the call report
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            if not close:  # e.g. smp's decoder_atrous_rates -> atrous_rates
                close = [a for a in accepted if key.endswith("_" + a) or a.endswith("_" + key)][:1]
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"model {entry.name!r} got unexpected argument(s) {', '.join(hints)}; it takes: {', '.join(accepted)}"
        )
    required = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs
    ]
    if required:
        raise TypeError(f"model {entry.name!r} needs argument(s) {', '.join(map(repr, required))}")


def create_model(name: str, pretrained: bool | str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``, optionally with published weights.

    The name and kwargs are remembered on the module (``model.maskworks_config``) so a
    checkpoint can rebuild it.

    Args:
        name: a registered model or backbone name (``list_models()``).
        pretrained: ``None`` / ``False``: random initialisation. ``True``: the model's default published weights;
            a tag (``"a1_in1k"``, ``"coco_voc"``...): those weights, downloaded into the cache
            (``$MASKWORKS_HOME``) once, checksummed, usable offline after that; a path: a local checkpoint, loaded
            by :func:`maskworks.load_weights` (format detected). A tag's row may set defaults for ``kwargs`` (the
            architecture the weights were trained with; see :mod:`maskworks.hub`); ``maskworks_config`` records
            the resulting arguments, and ``pretrained`` itself, which checkpoints do not store.
        **kwargs: constructor arguments (``encoder_weights`` too, for encoder-based models: a tag of the
            encoder, ``"imagenet"``, or a path).

    Raises:
        ValueError: ``name`` is not a string, or not a registered name (the message suggests close names);
            the constructor refuses a value; an unknown weights tag or a model without published weights
            (the message lists the tags); a checkpoint that does not fit the model.
        TypeError: an argument the constructor does not take (named, with the close names it does take).
        maskworks.hub.WeightsUnavailable: (an ``OSError``) published weights could not be obtained; the message
            names the URL or hub repository and where a file downloaded by hand is picked up.
    """
    entry = model_entry(name)
    _check_kwargs(entry, kwargs)
    if pretrained is None or pretrained is False:
        model = entry.fn(**kwargs)
        model.maskworks_config = {"name": name, "kwargs": dict(kwargs)}
        return model
    from maskworks.convert import load_weights
    from maskworks.hub import resolve_weights

    # resolve (and download) first: a missing file fails before an expensive build
    resolved = resolve_weights(name, pretrained, kwargs)
    kwargs = resolved.model_kwargs
    model = entry.fn(**kwargs)
    load_weights(model, resolved.path, source=resolved.source)
    recorded = os.fspath(pretrained) if isinstance(pretrained, os.PathLike) else pretrained
    model.maskworks_config = {"name": name, "kwargs": {**kwargs, "pretrained": recorded}}
    return model


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Sorted registered names matching the glob ``pattern`` (optionally only one ``kind``)."""
    _ensure_loaded()
    return sorted(n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (kind is None or e.kind == kind))
