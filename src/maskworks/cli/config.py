"""Run configuration for the CLI: defaults, YAML files and ``--set key=value`` overrides.

Only the command line reads configuration files; the library takes keyword arguments.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULTS",
    "RESUMABLE_KEYS",
    "load_config",
    "read_config_file",
    "apply_overrides",
    "merge",
    "check_config",
    "config_changes",
    "ConfigError",
]


class ConfigError(ValueError):
    """A configuration file or override is malformed."""


DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/train",
    "task": None,  # semantic | instance | panoptic for a model that serves several (--task); null = the model's own
    "model": {"name": "unet"},  # other keys are passed to the model constructor
    "data": {
        "name": "synthetic",  # synthetic | folder | camvid | isbi2012 | voc | cityscapes | ade20k | cocostuff
        "root": None,  # folder datasets; the named datasets default to ../shared/data/<name>
        "val_root": None,  # folder: a separate validation folder (default: val_fraction split)
        "val_fraction": 0.1,
        "num_train": 1024,  # synthetic only
        "num_val": 128,
        "image_size": 96,
        "crop_size": None,  # training crop (int or [h, w]); None = whole image
        "scale_range": None,  # e.g. [0.5, 2.0]
        "hflip": 0.5,
        "vflip": 0.0,
        "rotate": 0.0,
        "elastic": 0.0,
        "color_jitter": 0.0,
        "copy_paste": None,  # rare classes to copy-paste, e.g. [5, 9, 10] or {classes: [...], p: 0.5, max_objects: 3}
        "num_classes": None,  # K; default: the class file / the dataset's own count / inferred from the masks
        "validate": True,  # check every image and mask file before training or evaluating (cached)
        # data.train_split: the training split of a named dataset (default train; e.g. train_aug for voc).
        # Any other data.<key> is passed to the dataset reader's constructor (e.g. data.val_slices for isbi2012).
    },
    "train": {
        "epochs": 10,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "schedule": "poly",
        "warmup_epochs": 0.0,
        "amp": "auto",
        "grad_clip": None,
        "seed": 0,
        "deterministic": False,
        "num_workers": 0,
        "device": "auto",
        "eval_every": 1,
        "eval_batch_size": None,
        "log_every": 10,
        "loss": "ce",  # e.g. "ce+0.5*dice", "focal+lovasz"
        "class_weights": None,  # a list, or inverse | median | effective | log (estimated from the masks)
        "label_smoothing": 0.0,
        "rare_class_sampling": None,  # a threshold t in (0, 1]: repeat-factor sampling of images with rare classes
        # fine-tuning (the encoder is the model's `encoder`, else `backbone`, submodule)
        "freeze_encoder_epochs": 0,  # train decoder/heads only for this many epochs, then unfreeze the encoder
        "encoder_lr_mult": 1.0,  # learning-rate multiplier of the encoder's parameters
        "layer_decay": None,  # layer-wise LR decay of a ViT-family encoder, e.g. 0.75
        "freeze_bn": False,  # BatchNorm layers in eval mode with frozen affine parameters (small batches)
        # speed
        "channels_last": True,  # channels_last memory format for convolutional models
        "compile": False,  # torch.compile the model (falls back to eager mode with a warning if it fails)
    },
    # knowledge distillation of a semantic student from a frozen teacher checkpoint (maskworks.methods.distillation)
    "distill": {
        "teacher": None,  # a maskworks checkpoint (.safetensors); null = no distillation
        "kind": "pixel",  # pixel | cwd | pairwise | feature
        "alpha": 0.5,  # loss = (1 - alpha) * task loss + alpha * distillation
        "temperature": 4.0,  # pixel / cwd
    },
}

# Sections whose keys are fixed (model kwargs are free: they go to the model constructor; extra data keys go to
# the dataset reader's constructor and are checked against its signature when the dataset is built).
_CLOSED = ("train", "distill")

# Settings a resumed run may change (they do not alter what the saved state means); any other change is refused.
RESUMABLE_KEYS = (
    "run_dir",
    "data.root",
    "data.val_root",
    "data.validate",
    "train.epochs",
    "train.device",
    "train.num_workers",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.channels_last",
    "train.compile",
)


def merge(base: dict, update: dict, path: str = "") -> dict:
    """Recursive dict merge; keys in closed sections must already exist."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        full = f"{path}{key}"
        if path.rstrip(".") in _CLOSED and key not in base:
            close = difflib.get_close_matches(key, list(base), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; valid keys in {path.rstrip('.')!r}: {sorted(base)}")
        if path == "" and key not in base:
            raise ConfigError(f"unknown top-level config key {key!r}; expected one of {sorted(base)}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{full}.")
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict:
    """The mapping stored in a YAML config file, as written (not merged with the defaults)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} not found")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; expected a YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"config file {p} is not valid YAML: {' '.join(line.strip() for line in first)}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, base: dict | None = None) -> dict:
    """``base`` (default: the defaults) merged with a YAML file (if given)."""
    base = copy.deepcopy(DEFAULTS if base is None else base)
    if path is None:
        return base
    try:
        return merge(base, read_config_file(path))
    except ConfigError as e:
        if str(e).startswith("config file"):
            raise
        raise ConfigError(f"config file {path}: {e}") from e


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (numbers, lists, null...)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        update: dict = {}
        node = update
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set key {key!r} is malformed")
        for part in parts[:-1]:
            node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        cfg = merge(cfg, update)
    return cfg


# ----------------------------------------------------------------------------- value checks
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _size(v: Any) -> bool:
    return (_is_int(v) and v > 0) or (
        isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(s) and s > 0 for s in v)
    )


# key -> (accepts None, test, what was expected). Numbers given as strings ("1e-3") are converted first.
_CHECKS: dict[str, tuple[bool, Any, str]] = {
    "run_dir": (False, lambda v: isinstance(v, str) and v.strip() != "", "a folder path"),
    "task": (True, lambda v: v in ("semantic", "instance", "panoptic"), "semantic, instance, panoptic or null"),
    "data.name": (False, lambda v: isinstance(v, str), "a dataset name"),
    "data.root": (True, lambda v: isinstance(v, str), "a folder path"),
    "data.val_root": (True, lambda v: isinstance(v, str), "a folder path"),
    "data.val_fraction": (False, lambda v: _is_number(v) and 0 < v < 1, "a fraction in (0, 1)"),
    "data.num_train": (False, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.num_val": (False, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "data.image_size": (False, _size, "a positive integer or [height, width]"),
    "data.crop_size": (True, _size, "a positive integer or [height, width]"),
    "data.scale_range": (
        True,
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(s) and s > 0 for s in v),
        "[low, high] scale factors",
    ),
    "data.hflip": (False, lambda v: _is_number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "data.vflip": (False, lambda v: _is_number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "data.rotate": (False, lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "data.elastic": (False, lambda v: _is_number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "data.color_jitter": (False, lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "data.num_classes": (True, lambda v: _is_int(v) and 1 <= v <= 255, "an integer in 1..255"),
    "data.validate": (False, lambda v: isinstance(v, bool), "true or false"),
    "train.epochs": (False, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.batch_size": (False, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.optimizer": (False, lambda v: isinstance(v, str), "an optimizer name (adamw, adam, sgd)"),
    "train.lr": (False, lambda v: _is_number(v) and v > 0, "a number > 0"),
    "train.weight_decay": (False, lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "train.momentum": (False, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "train.schedule": (False, lambda v: isinstance(v, str), "a schedule name (poly, cosine, constant)"),
    "train.warmup_epochs": (False, lambda v: _is_number(v) and v >= 0, "a number of epochs >= 0"),
    "train.amp": (False, lambda v: v in ("auto", "off", "bf16", "fp16"), "one of auto, off, bf16, fp16"),
    "train.grad_clip": (True, lambda v: _is_number(v) and v > 0, "a number > 0 or null"),
    "train.seed": (False, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "train.deterministic": (False, lambda v: isinstance(v, bool), "true or false"),
    "train.num_workers": (False, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "train.device": (False, lambda v: isinstance(v, str), "auto, cpu, cuda or cuda:N"),
    "train.eval_every": (False, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.eval_batch_size": (True, lambda v: _is_int(v) and v >= 1, "an integer >= 1 or null"),
    "train.log_every": (False, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.loss": (False, lambda v: isinstance(v, str) and v.strip() != "", "a loss expression such as ce+0.5*dice"),
    "train.class_weights": (
        True,
        lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(_is_number(w) and w >= 0 for w in v)),
        "a list of weights >= 0 or an estimator name (inverse, median, effective, log)",
    ),
    "train.label_smoothing": (False, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "train.rare_class_sampling": (True, lambda v: _is_number(v) and 0 < v <= 1, "a threshold in (0, 1] or null"),
    "train.freeze_encoder_epochs": (False, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "train.encoder_lr_mult": (False, lambda v: _is_number(v) and v > 0, "a number > 0"),
    "train.layer_decay": (True, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1] or null"),
    "train.freeze_bn": (False, lambda v: isinstance(v, bool), "true or false"),
    "train.channels_last": (False, lambda v: isinstance(v, bool), "true or false"),
    "train.compile": (False, lambda v: isinstance(v, bool), "true or false"),
    "distill.teacher": (True, lambda v: isinstance(v, str) and v.strip() != "", "a checkpoint path or null"),
    "distill.kind": (False, lambda v: v in ("pixel", "cwd", "pairwise", "feature"), "pixel, cwd, pairwise or feature"),
    "distill.alpha": (False, lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "distill.temperature": (False, lambda v: _is_number(v) and v > 0, "a number > 0"),
}


def _get(cfg: dict, dotted: str) -> tuple[dict, str] | None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return None
    return (node, leaf) if leaf in node else None


def check_config(cfg: dict) -> dict:
    """Check the type and range of every known setting (in place; numeric strings such as ``"1e-3"`` become
    numbers) and return ``cfg``.

    Raises:
        ConfigError: naming the first bad key, its value and what was expected.
    """
    for section in ("model", "data", "train"):
        if not isinstance(cfg.get(section), dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {cfg.get(section)!r}")
    if not isinstance(cfg["model"].get("name"), str):
        raise ConfigError(f"model.name={cfg['model'].get('name')!r}: expected a model name (see `maskworks models`)")
    for key, (nullable, test, expected) in _CHECKS.items():
        found = _get(cfg, key)
        if found is None:
            continue
        node, leaf = found
        value = node[leaf]
        if value is None and nullable:
            continue
        if key == "train.amp" and isinstance(value, bool):  # YAML reads a bare off / on as false / true
            value = "off" if value is False else "auto"
        if isinstance(value, str) and expected.startswith(("a number", "an integer", "a fraction", "a probability")):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None:
                value = int(number) if expected.startswith("an integer") and number.is_integer() else number
        if value is None or not test(value):
            raise ConfigError(f"{key}={node[leaf]!r}: expected {expected}")
        node[leaf] = value
    return cfg


def _flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and key in ("model", "data", "train") and not prefix:
            out.update(_flatten(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every setting that differs between two configs."""
    a, b = _flatten(old), _flatten(new)
    changes = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va != vb:
            changes[key] = (va, vb)
    return changes
