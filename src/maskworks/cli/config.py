"""Run configuration for the CLI: defaults, YAML files and ``--set key=value`` overrides.

Only the command line reads configuration files; the library takes keyword arguments.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULTS", "load_config", "apply_overrides", "merge", "ConfigError"]


class ConfigError(ValueError):
    """A configuration file or override is malformed."""


DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/train",
    "model": {"name": "unet"},  # other keys are passed to the model constructor
    "data": {
        "name": "synthetic",  # synthetic | folder | camvid | isbi2012
        "root": None,  # folder datasets; camvid/isbi2012 default to ../shared/data/<name>
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
    },
}

# Sections whose keys are fixed (model kwargs are free: they go to the model constructor).
_CLOSED = ("data", "train")


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


def load_config(path: str | Path | None) -> dict:
    """Defaults merged with a YAML file (if given)."""
    if path is None:
        return copy.deepcopy(DEFAULTS)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return merge(DEFAULTS, data)


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
