"""Model checkpoints: safetensors weights plus a JSON file that says how to rebuild the model.

``save_model(model, "run/best")`` writes ``run/best.safetensors`` and ``run/best.json``; the JSON
holds the registered model name, its constructor kwargs and free-form metadata (class names,
palette, normalisation) so ``load_model("run/best.safetensors")`` returns a ready model. A trainer's
``last.pt`` is another kind of file, a training state (model, optimizer, epoch, ...) for resuming; it is
read by :func:`load_training_state`, not by :func:`load_model`.

Writing: every file is written to a hidden temporary ``.<name>.<random>.tmp`` in the target folder,
flushed to disk and renamed over the target, so a crash never leaves half a file and the previous
version stays intact until the new one is complete. The two files of :func:`save_model` are both
written before either is renamed. The files get the permissions of an ordinary new file
(``0o666 & ~umask``). A process killed mid-save leaves its temporary behind; the next save of the same
target removes ``.<name>.*.tmp`` leftovers first (so two processes must not write the same target at
the same time; that is not supported). Disk full (``ENOSPC`` / quota exceeded) raises
:class:`CheckpointWriteError`, which names the target and says "no space left on device".

Reading: a file that is not what it should be (truncated or foreign ``.safetensors``, corrupt ``.pt``,
malformed JSON recipe, weights that do not fit the recipe's model) raises :class:`CheckpointError`
(a ``ValueError``) with a one-line message naming the file and what was expected.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "save_model",
    "load_model",
    "load_training_state",
    "read_model_meta",
    "read_safetensors",
    "torch_load_weights_only",
    "atomic_write_bytes",
    "atomic_torch_save",
    "unwrap_model",
]

# suffixes of files read with torch.load
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
TRAINING_STATE_KEYS = ("model", "optimizer", "epoch")


class CheckpointError(ValueError):
    """A checkpoint, weights or recipe file that cannot be used: truncated, corrupt, another format, or weights
    that do not fit the model. The message is one line naming the file and what was expected."""


class CheckpointWriteError(OSError, CheckpointError):
    """Writing a checkpoint failed because the disk (or the quota) is full.

    It is an ``OSError`` (``errno`` is ``ENOSPC`` or ``EDQUOT``) and a :class:`CheckpointError` (so a
    ``ValueError``); the message names the target file and says that the previous version is unchanged.
    """

    def __str__(self) -> str:
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model behind DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------- writing
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# Writers implemented outside Python report the errno only in their message (safetensors: "(os error 28)").
_DISK_FULL_TEXT = (
    (errno.ENOSPC, ("no space left on device", f"(os error {errno.ENOSPC})")),
    (errno.EDQUOT, ("disk quota exceeded", f"(os error {errno.EDQUOT})")),
)


def _disk_full_errno(exc: BaseException) -> int | None:
    """``ENOSPC`` / ``EDQUOT`` when ``exc`` or an exception it was raised from says the disk is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc.errno
        text = str(exc).lower()
        for code, needles in _DISK_FULL_TEXT:
            if any(n in text for n in needles):
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.<random>.tmp`` files that an interrupted save of ``path`` left in its folder."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]+\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace_many(targets: list[tuple[Path, Callable[[str], None]]]) -> None:
    """Write every ``(path, write)`` pair to a temporary beside ``path`` (``write(tmp)`` fills it), then rename all.

    Nothing is renamed unless every temporary was written and flushed; on any failure the temporaries are removed
    and the previous files stay as they were. A full disk raises :class:`CheckpointWriteError`.
    """
    mode = 0o666 & ~_umask()
    temporaries: list[tuple[str, Path]] = []
    current = targets[0][0]
    try:
        for path, _ in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(path)
        for path, write in targets:
            current = path
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temporaries.append((tmp, path))
            write(tmp)
            # after writing: some writers (safetensors) replace the file by their own 0600 temporary
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in temporaries:
            current = path
            os.replace(tmp, path)
        for folder in {path.parent for _, path in temporaries}:
            _fsync_dir(folder)
    except BaseException as e:
        for tmp, _ in temporaries:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        code = _disk_full_errno(e) if isinstance(e, Exception) else None
        if code is not None:
            raise CheckpointWriteError(
                code,
                f"{_DISK_FULL[code]}: could not write {current}; the previous file (if any) is unchanged and the "
                "temporary file was removed. Free some space and save again",
            ) from e
        raise


def _atomic_replace(path: Path, write: Callable[[str], None]) -> None:
    _atomic_replace_many([(path, write)])


def _write_bytes(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


def _torch_save(obj: Any, tmp: str) -> None:
    # through a Python file object: torch's own file writer reports a full disk without the errno
    with open(tmp, "wb") as f:
        torch.save(obj, f)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    Raises:
        CheckpointWriteError: the disk is full; ``path`` is unchanged.
    """
    _atomic_replace(Path(path), lambda tmp: _write_bytes(tmp, data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename.

    Raises:
        CheckpointWriteError: the disk is full; ``path`` is unchanged.
    """
    _atomic_replace(Path(path), lambda tmp: _torch_save(obj, tmp))


# --------------------------------------------------------------------------- reading
def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def _describe_weight_files(folder: Path) -> str:
    """A clause naming the weight-like files (``.safetensors``, ``.pt``, ...) in ``folder``."""
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    try:
        names = sorted(p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    except OSError:
        names = []
    if not names:
        return f"{folder} holds no weights file ({', '.join(_WEIGHT_SUFFIXES)})"
    return f"weights files in {folder}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"


def _check_is_file(path: Path, what: str) -> None:
    """FileNotFoundError / CheckpointError (a folder) naming ``path`` and the weights files that are there."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a {what}; {_describe_weight_files(path)}")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}; {_describe_weight_files(path.parent)}")


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is a folder, or not a complete safetensors file (truncated, another format).
    """
    path = Path(path)
    _check_is_file(path, ".safetensors weights file")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({_one_line(e)}); expected a complete .safetensors checkpoint, "
            "the file may be truncated (an interrupted save, copy or download) or be in another format"
        ) from e


def _torch_load_reason(e: BaseException) -> str:
    """What went wrong in ``torch.load``, in a clause (torch's own messages run over many lines)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    detail = None
    if marker in text:
        detail = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
    elif text.startswith("Weights only load failed"):
        skip = ("Weights only load failed", "Check the documentation", "(1)", "(2)")
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        detail = next((line for line in lines if not line.startswith(skip)), "")
    if detail is not None:
        detail = detail.split(". Please", 1)[0]
        if "GLOBAL" in detail:
            return (
                f"it holds pickled Python objects other than tensors, which are never unpickled ({_one_line(detail)})"
            )
        return f"the file is corrupt or not a torch checkpoint ({_one_line(detail) or type(e).__name__})"
    if isinstance(e, EOFError):
        return "the file is empty or truncated"
    if "zip archive" in text or "central directory" in text:
        return "its zip archive is truncated or corrupt"
    return f"the file is corrupt or not a torch checkpoint ({type(e).__name__}: {_one_line(text, 120)})"


def torch_load_weights_only(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is a folder, a corrupt or truncated file, not a torch file, or one that holds
            pickled objects other than tensors and containers (which are refused, never unpickled).
    """
    path = Path(path)
    _check_is_file(path, "torch checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch.load raises many types on bad input: UnpicklingError, EOFError, RuntimeError, ...
        raise CheckpointError(
            f"{path} is not a weights-only torch checkpoint: {_torch_load_reason(e)}; expected a file written by "
            "torch.save holding tensors and containers only (read with torch.load(weights_only=True))"
        ) from e


def load_training_state(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a trainer's training state (``last.pt``: ``model``, ``optimizer``, ``epoch``, ...) for resuming.

    The file is read with ``torch.load(weights_only=True)``.

    Args:
        path: the ``.pt`` file written by the trainer.
        map_location: where tensors are loaded (as ``torch.load``'s argument).

    Returns:
        The state dict, with at least the keys ``model``, ``optimizer`` and ``epoch``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is truncated or corrupt, not a weights-only torch file, a model checkpoint
            (``.safetensors``) instead of a training state, or lacks one of ``model``, ``optimizer``, ``epoch``.
    """
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        raise CheckpointError(
            f"{path} is a model checkpoint (weights and recipe), not a training state; resuming needs the trainer's "
            f"last.pt, which holds the optimizer and epoch too; {_describe_checkpoints(path.parent)}"
        )
    state = torch_load_weights_only(path, map_location)
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path} is not a training state: it holds a {type(state).__name__}, expected a dict with keys "
            f"{list(TRAINING_STATE_KEYS)}"
        )
    missing = [k for k in TRAINING_STATE_KEYS if k not in state]
    if missing:
        have = sorted(map(str, state))
        shown = have[:6] + (["..."] if len(have) > 6 else [])
        raise CheckpointError(
            f"{path} is not a training state: missing {missing} (it has {shown}); expected the trainer's last.pt "
            f"with keys {list(TRAINING_STATE_KEYS)}"
        )
    if not isinstance(state["model"], Mapping):
        raise CheckpointError(f"{path} is not a training state: 'model' is a {type(state['model']).__name__}")
    return dict(state)


def _checkpoint_names(folder: Path) -> list[str]:
    """Names of the maskworks model checkpoints (``.safetensors`` with a ``.json`` recipe) in ``folder``."""
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    except OSError:
        return []
    return [p.name for p in files if _sibling(_stem(p), ".json").is_file()]


def _describe_checkpoints(folder: Path, inside: bool = False) -> str:
    """A clause saying which model checkpoints ``folder`` (or, when it has none, its parent: a trainer keeps
    ``last.pt`` in ``run/checkpoints/`` and ``best`` / ``final`` in ``run/``) holds."""
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    for where in (folder, folder.parent):
        names = _checkpoint_names(where)
        if names:
            shown = [n if where == folder else str(where / n) for n in names[:6]] + (["..."] if len(names) > 6 else [])
            lead = "pass one of its model checkpoints" if inside and where == folder else "the model checkpoints are"
            return f"{lead}: {', '.join(shown)}"
    return f"{folder} holds no model checkpoint (a .safetensors file with a .json recipe beside it)"


_INIT_WEIGHT_KWARGS = ("encoder_weights", "pretrained", "weights")
_UNSET = object()


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def _sibling(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` (``run/epoch.5`` -> ``run/epoch.5.safetensors``; ``with_suffix`` would drop ``.5``)."""
    return stem.with_name(stem.name + suffix)


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save weights to ``<path>.safetensors`` and the rebuild recipe to ``<path>.json``.

    Both files are written to temporaries first and renamed only when both are complete, so a failed save (a full
    disk included) leaves the previous pair as it was.

    Args:
        model: a model built by :func:`maskworks.create_model` (it carries ``maskworks_config``);
            DDP or compiled wrappers are unwrapped.
        path: target path, with or without the ``.safetensors`` suffix.
        meta: JSON-serialisable extra information (class names, palette, mean/std, metrics). For a model marked
            ``maskworks_pruned`` (see :mod:`maskworks.compress`), its shapes are added as
            ``meta["pruned_structure"]``.

    Returns:
        The path of the ``.safetensors`` file.

    Raises:
        ValueError: the model was not built by ``create_model``.
        TypeError: ``meta`` or the model's kwargs hold something JSON cannot store (nothing is written).
        CheckpointWriteError: the disk is full (nothing is replaced).
    """
    model = unwrap_model(model)
    config = getattr(model, "maskworks_config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} was not built with maskworks.create_model, so its checkpoint could not be "
            "rebuilt; build it with create_model(name, **kwargs)"
        )
    stem = _stem(path)
    # Initial-weight files are not part of the recipe: the checkpoint holds the trained weights.
    kwargs = {k: v for k, v in config["kwargs"].items() if k not in _INIT_WEIGHT_KWARGS}
    meta = meta or {}
    if getattr(model, "maskworks_pruned", False):  # pruned shapes differ from the constructor's: store them
        from maskworks.compress.pruning import pruned_structure

        meta = {**meta, "pruned_structure": pruned_structure(model)}
    recipe = {"model": config["name"], "kwargs": kwargs, "meta": meta}
    recipe_bytes = json.dumps(recipe, indent=2, default=_json_default).encode()  # fails before anything is written
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = _sibling(stem, ".safetensors")
    _atomic_replace_many(
        [
            (weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "model": config["name"]})),
            (_sibling(stem, ".json"), lambda tmp: _write_bytes(tmp, recipe_bytes)),
        ]
    )
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
    """The JSON recipe (``model``, ``kwargs``, ``meta``) stored beside a checkpoint.

    Raises:
        FileNotFoundError: there is no ``.json`` beside the checkpoint.
        CheckpointError: the recipe is not valid JSON, or not an object with ``model`` (a name) and ``kwargs``
            (an object).
    """
    recipe_path = _sibling(_stem(path), ".json")
    if recipe_path.is_dir():
        raise CheckpointError(f"checkpoint recipe {recipe_path} is a folder, expected a JSON file")
    if not recipe_path.exists():
        raise FileNotFoundError(
            f"checkpoint recipe {recipe_path} not found; a maskworks checkpoint is a .safetensors file with a .json "
            "file of the same name beside it"
        )
    try:
        recipe = json.loads(recipe_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint recipe {recipe_path} is not valid JSON ({_one_line(e, 120)}); expected an object with keys "
            "'model', 'kwargs', 'meta' as written by save_model"
        ) from e
    if not isinstance(recipe, dict):
        raise CheckpointError(
            f"checkpoint recipe {recipe_path} holds a JSON {type(recipe).__name__}; expected an object with keys "
            "'model', 'kwargs', 'meta'"
        )
    for key in ("model", "kwargs"):
        if key not in recipe:
            raise CheckpointError(f"{recipe_path} has no {key!r} entry; expected keys 'model', 'kwargs', 'meta'")
    if not isinstance(recipe["model"], str) or not isinstance(recipe["kwargs"], dict):
        raise CheckpointError(
            f"{recipe_path}: 'model' must be a model name and 'kwargs' an object, got "
            f"{type(recipe['model']).__name__} and {type(recipe['kwargs']).__name__}"
        )
    recipe.setdefault("meta", {})
    return recipe


def _peek_torch_file(path: Path) -> str | None:
    """``"training state"`` / ``"state dict"`` for a torch file whose contents say so (tensors are memory-mapped,
    not read), ``None`` when that cannot be told cheaply."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if isinstance(obj, Mapping) and all(k in obj for k in TRAINING_STATE_KEYS):
        return "training state"
    if isinstance(obj, Mapping):
        return "state dict"
    return None


def _torch_file_error(path: Path) -> Exception:
    """The error for ``load_model`` given a ``.pt`` / ``.pth`` file."""
    where = _describe_checkpoints(path.parent)
    if not path.exists():
        return FileNotFoundError(
            f"{path} not found; load_model reads a model checkpoint (a .safetensors file with a .json recipe), "
            f"not a torch file; {where}"
        )
    kind = _peek_torch_file(path) if path.is_file() else None
    if kind == "state dict":
        return CheckpointError(
            f"{path} is a plain state dict without a recipe, not a maskworks model checkpoint; load it into a model "
            f"with maskworks.load_weights(create_model(name, ...), {str(path)!r}); {where}"
        )
    what = "is a training state (model, optimizer and epoch, for resuming training)"
    if kind is None:
        what = "is a torch file (such as a trainer's last.pt, a training state for resuming)"
    return CheckpointError(
        f"{path} {what}, not a model checkpoint (load_model reads a .safetensors file with a .json recipe); {where}"
    )


def _default_of(name: str, key: str) -> Any:
    import inspect

    from maskworks.registry import model_entry

    try:
        param = inspect.signature(model_entry(name).fn).parameters.get(key)
    except (ValueError, TypeError):
        return _UNSET
    return _UNSET if param is None or param.default is inspect.Parameter.empty else param.default


def _override_hint(name: str, saved: Mapping[str, Any], overrides: Mapping[str, Any]) -> str:
    """'; the checkpoint was saved with num_classes=18 but loaded with num_classes=5 ...' for changed overrides."""

    def norm(v: Any) -> Any:
        try:
            return json.loads(json.dumps(v, default=_json_default))
        except (TypeError, ValueError):
            return v

    changed = []
    for key, value in overrides.items():
        before = saved.get(key, _UNSET)
        if before is _UNSET:
            before = _default_of(name, key)
        if before is _UNSET or norm(before) != norm(value):
            was = "the default" if before is _UNSET else f"{before!r}"
            changed.append(f"{key}={was} but loaded with {key}={value!r}")
    if not changed:
        return ""
    return f"; the checkpoint was saved with {'; '.join(changed)} (drop the override to load it as saved)"


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **override_kwargs) -> nn.Module:
    """Rebuild a model from ``<path>.json`` and load ``<path>.safetensors`` into it (strictly).

    The model is returned in eval mode; the recipe's ``meta`` dict is attached as ``model.maskworks_meta``.
    ``override_kwargs`` replace constructor kwargs of the recipe (e.g. ``dynamic_img_size=True``); the weights must
    still fit. A recipe whose meta holds ``pruned_structure`` (a pruned model, see :mod:`maskworks.compress`)
    gets those shapes applied to the freshly built model before the weights are loaded.

    Raises:
        FileNotFoundError: the ``.safetensors`` or its ``.json`` recipe does not exist (the message lists the model
            checkpoints that do exist in that folder).
        CheckpointError: ``path`` is a ``.pt`` / ``.pth`` file (a trainer's ``last.pt`` is a training state, read by
            :func:`load_training_state`; the message lists the model checkpoints beside it) or a folder; the weights
            are truncated or not safetensors; the recipe is malformed or names a model that cannot be built; or the
            weights do not fit the model (the message names a tensor, both shapes and any override that changed
            the model, e.g. both class counts).
    """
    from maskworks.registry import create_model

    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        raise _torch_file_error(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model checkpoint; {_describe_checkpoints(path, inside=True)}")
    stem = _stem(path)
    weights, recipe_path = _sibling(stem, ".safetensors"), _sibling(stem, ".json")
    if not weights.exists():
        raise FileNotFoundError(f"checkpoint weights {weights} not found; {_describe_checkpoints(weights.parent)}")
    recipe = read_model_meta(stem)
    name = recipe["model"]
    try:
        model = create_model(name, **{**recipe["kwargs"], **override_kwargs})
    except TypeError as e:
        if override_kwargs:  # most likely an argument of the caller's: keep its type
            raise
        raise CheckpointError(f"cannot rebuild the model of {recipe_path}: {_one_line(e, 300)}") from e
    except ValueError as e:
        given = f" with overrides {override_kwargs}" if override_kwargs else ""
        raise CheckpointError(f"cannot rebuild the model of {recipe_path}{given}: {_one_line(e, 300)}") from e
    structure = recipe["meta"].get("pruned_structure") if isinstance(recipe["meta"], dict) else None
    if structure is not None:  # a pruned model (maskworks.compress): rebuild its shapes before loading
        from maskworks.compress.pruning import apply_structure

        try:
            apply_structure(model, structure)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"cannot rebuild the pruned shapes of {recipe_path}: {_one_line(e, 300)}") from e
    state = read_safetensors(weights, device=map_location)
    own = model.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        key, saved_shape, model_shape = mismatched[0]
        raise CheckpointError(
            f"{weights} does not fit model {name!r} built from {recipe_path}: {len(mismatched)} tensor(s) differ in "
            f"shape, e.g. {key!r} is {saved_shape} in the checkpoint but {model_shape} in the model"
            + _override_hint(name, recipe["kwargs"], override_kwargs)
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not fit model {name!r} built from {recipe_path}: {_one_line(e)}") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{weights} does not fit model {name!r} built from {recipe_path}: {len(result.missing_keys)} model "
            f"tensor(s) missing from the checkpoint (e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} "
            f"checkpoint tensor(s) unused (e.g. {result.unexpected_keys[:3]})"
            + _override_hint(name, recipe["kwargs"], override_kwargs)
        )
    model.maskworks_meta = recipe["meta"]
    return model.to(map_location).eval()
