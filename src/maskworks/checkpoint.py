"""Model checkpoints: safetensors weights plus a JSON file that says how to rebuild the model.

``save_model(model, "run/best")`` writes ``run/best.safetensors`` and ``run/best.json``; the JSON
holds the registered model name, its constructor kwargs and free-form metadata (class names,
palette, normalisation) so ``load_model("run/best.safetensors")`` returns a ready model. Both
files are written to a temporary name first and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = ["save_model", "load_model", "read_model_meta", "atomic_write_bytes", "atomic_torch_save", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model behind DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""

    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_replace(Path(path), _w)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    _atomic_replace(Path(path), lambda tmp: torch.save(obj, tmp))


_INIT_WEIGHT_KWARGS = ("encoder_weights", "pretrained", "weights")


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save weights to ``<path>.safetensors`` and the rebuild recipe to ``<path>.json``.

    Args:
        model: a model built by :func:`maskworks.create_model` (it carries ``maskworks_config``);
            DDP or compiled wrappers are unwrapped.
        path: target path, with or without the ``.safetensors`` suffix.
        meta: JSON-serialisable extra information (class names, palette, mean/std, metrics).

    Returns:
        The path of the ``.safetensors`` file.
    """
    model = unwrap_model(model)
    config = getattr(model, "maskworks_config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} was not built with maskworks.create_model, so its checkpoint could not be "
            "rebuilt; build it with create_model(name, **kwargs)"
        )
    stem = _stem(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = stem.with_suffix(".safetensors")
    _atomic_replace(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "model": config["name"]}))
    # Initial-weight files are not part of the recipe: the checkpoint holds the trained weights.
    kwargs = {k: v for k, v in config["kwargs"].items() if k not in _INIT_WEIGHT_KWARGS}
    recipe = {"model": config["name"], "kwargs": kwargs, "meta": meta or {}}
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(recipe, indent=2, default=_json_default).encode())
    return weights


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint's JSON recipe")


def read_model_meta(path: str | os.PathLike) -> dict:
    """The JSON recipe (``model``, ``kwargs``, ``meta``) stored beside a checkpoint."""
    stem = _stem(path)
    recipe_path = stem.with_suffix(".json")
    if not recipe_path.exists():
        raise FileNotFoundError(
            f"checkpoint recipe {recipe_path} not found; a maskworks checkpoint is a .safetensors file with a .json "
            "file of the same name beside it"
        )
    with open(recipe_path) as f:
        recipe = json.load(f)
    for key in ("model", "kwargs"):
        if key not in recipe:
            raise ValueError(f"{recipe_path} has no {key!r} entry; expected keys 'model', 'kwargs', 'meta'")
    recipe.setdefault("meta", {})
    return recipe


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **override_kwargs) -> nn.Module:
    """Rebuild a model from ``<path>.json`` and load ``<path>.safetensors`` into it (strictly).

    The model is returned in eval mode; the recipe's ``meta`` dict is attached as ``model.maskworks_meta``.
    """
    from maskworks.registry import create_model

    stem = _stem(path)
    weights = stem.with_suffix(".safetensors")
    if not weights.exists():
        raise FileNotFoundError(f"checkpoint weights {weights} not found")
    recipe = read_model_meta(stem)
    model = create_model(recipe["model"], **{**recipe["kwargs"], **override_kwargs})
    state = load_file(str(weights), device=str(map_location))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(
            f"{weights} does not match model {recipe['model']!r} built from {stem.with_suffix('.json')}: {e}"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not match model {recipe['model']!r}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.maskworks_meta = recipe["meta"]
    return model.to(map_location).eval()
