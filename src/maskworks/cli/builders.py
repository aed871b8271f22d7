"""Turn a resolved CLI config into datasets, a model and a loss (keyword arguments only)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from maskworks.cli.config import ConfigError

log = logging.getLogger(__name__)

DATASETS = ("synthetic", "folder", "camvid", "isbi2012")
_TRANSFORM_KEYS = ("crop_size", "scale_range", "hflip", "vflip", "rotate", "elastic", "color_jitter")


def default_data_root(name: str) -> Path:
    """``../shared/data/<name>`` relative to the current directory, the usual place next to a checkout."""
    return Path("..") / "shared" / "data" / name


def build_split(data: dict[str, Any], split: str):
    """One split (``train``/``val``/``test``) of the configured dataset, for evaluation or prediction."""
    from maskworks.data import ISBI2012, CamVid, SyntheticShapes, build_transforms

    name = data["name"]
    if name in ("camvid", "isbi2012"):
        cls = CamVid if name == "camvid" else ISBI2012
        return cls(data.get("root") or default_data_root(name), split=split, transform=build_transforms(train=False))
    if name == "synthetic" and split in ("train", "val"):
        n = data["num_train"] if split == "train" else data["num_val"]
        return SyntheticShapes(
            num_samples=n, image_size=data["image_size"], split=split, transform=build_transforms(train=False)
        )
    if split not in ("train", "val"):
        raise ConfigError(f"split {split!r} is not available for data.name={name!r}; use train or val")
    train, val = build_datasets(data, with_train=split == "train", augment=False)
    return train if split == "train" else val


def _tf_kwargs(data: dict[str, Any]) -> dict:
    # None is meaningful here (no crop, no scaling), so present keys are passed through as they are.
    return {k: data[k] for k in _TRANSFORM_KEYS if k in data}


def build_datasets(data: dict[str, Any], with_train: bool = True, augment: bool = True) -> tuple[Any, Any]:
    """``(train_set, val_set)`` for a data config section (train_set is None if not ``with_train``)."""
    from maskworks.data import ISBI2012, CamVid, FolderDataset, SyntheticShapes, build_transforms

    name = data["name"]
    if name not in DATASETS:
        raise ConfigError(f"unknown data.name {name!r}; expected one of {DATASETS}")
    train_tf = build_transforms(train=True, **_tf_kwargs(data)) if augment else build_transforms(train=False)
    val_tf = build_transforms(train=False)
    if name == "synthetic":
        size = data["image_size"]
        train = (
            SyntheticShapes(num_samples=data["num_train"], image_size=size, split="train", transform=train_tf)
            if with_train
            else None
        )
        val = SyntheticShapes(num_samples=data["num_val"], image_size=size, split="val", transform=val_tf)
        return train, val
    if name in ("camvid", "isbi2012"):
        root = data.get("root") or default_data_root(name)
        cls = CamVid if name == "camvid" else ISBI2012
        train = cls(root, split="train", transform=train_tf) if with_train else None
        return train, cls(root, split="val", transform=val_tf)
    # folder
    if not data.get("root"):
        raise ConfigError("data.name=folder needs data.root (a folder with images/ and masks/)")
    if data.get("val_root"):
        train = FolderDataset(data["root"], transform=train_tf) if with_train else None
        return train, FolderDataset(data["val_root"], transform=val_tf)
    full_train = FolderDataset(data["root"], transform=train_tf)
    full_val = FolderDataset(data["root"], transform=val_tf)
    n = len(full_train)
    n_val = max(1, int(round(n * float(data.get("val_fraction", 0.1))))) if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    val_idx, train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])
    if not train_idx:
        raise ConfigError(f"{data['root']} holds {n} sample(s): too few to split into train and validation")
    log.info("folder dataset %s: %d train / %d val samples", data["root"], len(train_idx), len(val_idx))
    return (Subset(full_train, train_idx) if with_train else None), (Subset(full_val, val_idx) if val_idx else None)


def add_copy_paste(train_set, spec, progress: bool = True):
    """Prepend rare-class copy-paste (``data.copy_paste``: a list of classes or a dict of options) to the
    training transform; the object bank comes from the training samples only."""
    from torchvision.transforms import v2

    from maskworks.data import RareClassCopyPaste

    opts = {"classes": spec} if isinstance(spec, (list, tuple)) else dict(spec)
    if "classes" not in opts or not isinstance(opts["classes"], (list, tuple)):
        raise ConfigError(f"data.copy_paste={spec!r}: expected a list of class ids or a dict with 'classes'")
    allowed = {"classes", "p", "max_objects", "max_per_class", "min_area", "hflip", "class_probs", "seed"}
    unknown = set(opts) - allowed
    if unknown:
        raise ConfigError(f"data.copy_paste has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    base = base_dataset(train_set)
    indices = getattr(train_set, "indices", None)
    try:
        paste = RareClassCopyPaste.from_dataset(base, progress=progress, indices=indices, **opts)
    except ValueError as e:
        raise ConfigError(f"data.copy_paste: {e}") from e
    base.transform = v2.Compose([paste, base.transform]) if base.transform is not None else paste
    log.info("copy-paste: %r", paste)
    return paste


def base_dataset(ds):
    return getattr(ds, "dataset", ds)


def build_model(model_cfg: dict, num_classes: int, in_channels: int):
    from maskworks.registry import create_model, model_entry

    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_channels", in_channels)
    if model_entry(model_cfg["name"]).kind == "backbone":
        raise ConfigError(f"{model_cfg['name']!r} is a backbone, not a segmentation model; use it as model.encoder")
    try:
        return create_model(model_cfg["name"], **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {model_cfg['name']!r} does not accept these arguments {kwargs}: {e}") from e


def build_loss(train_cfg: dict, train_set=None, ignore_index: int = 255):
    """The loss from ``train.loss`` (e.g. ``"ce+0.5*dice"``), ``train.class_weights`` (a list, or an estimator
    name: inverse | median | effective | log, computed from the training masks) and ``train.label_smoothing``."""
    from maskworks.losses import build_loss as _build_loss
    from maskworks.losses import class_weights as _class_weights

    weights = train_cfg.get("class_weights")
    if isinstance(weights, str):
        if train_set is None:
            raise ConfigError(f"train.class_weights={weights!r} needs the training set to estimate weights")
        log.info("estimating %s class weights from %d training masks", weights, len(train_set))
        weights = _class_weights(train_set, base_dataset(train_set).num_classes, method=weights, progress=True)
        log.info("class weights: %s", ", ".join(f"{w:.3f}" for w in weights.tolist()))
    smoothing = float(train_cfg.get("label_smoothing") or 0.0)
    options = {"ce": {"label_smoothing": smoothing}} if smoothing else None
    try:
        return _build_loss(
            train_cfg.get("loss", "ce"), ignore_index=ignore_index, class_weights=weights, options=options
        )
    except ValueError as e:
        raise ConfigError(f"train.loss: {e}") from e


TRAINER_KEYS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "schedule",
    "warmup_epochs",
    "amp",
    "grad_clip",
    "seed",
    "deterministic",
    "num_workers",
    "device",
    "eval_every",
    "eval_batch_size",
    "log_every",
)


def trainer_kwargs(train_cfg: dict) -> dict:
    return {k: train_cfg[k] for k in TRAINER_KEYS if k in train_cfg}
