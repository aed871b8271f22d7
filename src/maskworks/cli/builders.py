"""Turn a resolved CLI config into datasets, a model and a loss (keyword arguments only)."""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from maskworks.cli.config import ConfigError

log = logging.getLogger(__name__)

DATASETS = (
    "synthetic",
    "folder",
    "camvid",
    "isbi2012",
    "isbi2012_instances",
    "voc",
    "cityscapes",
    "ade20k",
    "cocostuff",
    "coco",
    "coco_panoptic",
)
# Readers of a fixed public layout under data.root (default ../shared/data/<name>), with named splits.
STANDARD_DATASETS = (
    "camvid",
    "isbi2012",
    "isbi2012_instances",
    "voc",
    "cityscapes",
    "ade20k",
    "cocostuff",
    "coco",
    "coco_panoptic",
)
# Datasets read from another dataset's folder by default.
_DEFAULT_FOLDER = {"isbi2012_instances": "isbi2012", "coco_panoptic": "coco"}

_TRANSFORM_KEYS = ("crop_size", "scale_range", "hflip", "vflip", "rotate", "elastic", "color_jitter")


def default_data_root(name: str) -> Path:
    """``../shared/data/<name>`` relative to the current directory, the usual place next to a checkout."""
    return Path("..") / "shared" / "data" / _DEFAULT_FOLDER.get(name, name)


def reader_class(name: str):
    """The dataset class behind ``data.name``."""
    from maskworks.data import (
        ADE20K,
        ISBI2012,
        CamVid,
        Cityscapes,
        CocoInstances,
        CocoPanoptic,
        CocoStuff,
        FolderDataset,
        ISBI2012Instances,
        NiftiFolder,
        SyntheticShapes,
        SyntheticVolumes,
        VOCSegmentation,
    )

    readers = {
        "synthetic": SyntheticShapes,
        "synthetic_volumes": SyntheticVolumes,
        "nifti": NiftiFolder,
        "folder": FolderDataset,
        "camvid": CamVid,
        "isbi2012": ISBI2012,
        "isbi2012_instances": ISBI2012Instances,
        "voc": VOCSegmentation,
        "cityscapes": Cityscapes,
        "ade20k": ADE20K,
        "cocostuff": CocoStuff,
        "coco": CocoInstances,
        "coco_panoptic": CocoPanoptic,
    }
    if name not in readers:
        close = difflib.get_close_matches(str(name), list(readers), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown data.name {name!r}{hint}; expected one of {', '.join(readers)}")
    return readers[name]


# Keys of the data section read by the builder itself; every other key goes to the reader's constructor.
_BUILDER_KEYS = {
    "name",
    "root",
    "val_root",
    "val_fraction",
    "num_train",
    "num_val",
    "image_size",
    "validate",
    "copy_paste",
    "train_split",
    "patch_size",
}
_BUILDER_KEYS |= set(_TRANSFORM_KEYS)
_NOT_OPTIONS = {"self", "root", "split", "transform", "num_samples"}
VOLUME_DATASETS = ("synthetic_volumes", "nifti")


def reader_options(data: dict[str, Any]) -> dict[str, Any]:
    """Constructor keyword arguments of the configured reader: every ``data.<key>`` the builder does not use
    itself (``data.num_classes``, ``data.val_slices``, ``data.classes_file``, ...), checked against the reader's
    signature."""
    cls = reader_class(data["name"])
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in _NOT_OPTIONS]
    options = {k: v for k, v in data.items() if k not in _BUILDER_KEYS}
    if data.get("num_classes") is None or "num_classes" not in params:
        options.pop("num_classes", None)
    unknown = [k for k in options if k not in params]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, params + sorted(_BUILDER_KEYS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown config key 'data.{key}'{hint}; data.name={data['name']} ({cls.__name__}) takes "
            f"{', '.join(sorted(params)) or 'no options'} besides {', '.join(sorted(_BUILDER_KEYS - {'name'}))}"
        )
    if data["name"] == "synthetic":
        options.setdefault("image_size", data.get("image_size", 96))
    return options


def volume_patch_size(data: dict[str, Any]) -> tuple[int, int, int]:
    """The training patch of a volume dataset: ``data.patch_size``, else the plan's (``data.plan``), else the
    synthetic volume size.

    Raises:
        ConfigError: none of them is there, or it is not three positive ints.
    """
    size = data.get("patch_size")
    if data.get("plan"):
        plan = _read_plan(data["plan"])
        if plan.get("dimension") == "2d":
            raise ConfigError(
                f"data.plan={data['plan']} chose the 2D configuration (the data are effectively 2D); volumetric "
                "training runs the 3D one: plan again with `maskworks plan DATA --dimension 3d`"
            )
        size = size if size is not None else plan.get("patch_size")
    if size is None and data["name"] == "synthetic_volumes":
        size = data.get("size") or (24, 48, 48)
    if size is None:
        raise ConfigError(f"data.name={data['name']} needs data.patch_size (D, H, W) or data.plan (maskworks plan)")
    size = [size] * 3 if isinstance(size, int) else list(size)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ConfigError(f"data.patch_size={size!r}: expected three positive ints (D, H, W)")
    return tuple(size)  # type: ignore[return-value]


def _read_plan(path: str) -> dict[str, Any]:
    import json

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(
            f"data.plan={path}: no such file (write one with `maskworks plan DATA --out plan.json`)"
        ) from e
    except ValueError as e:
        raise ConfigError(f"data.plan={path}: not a JSON plan ({e})") from e


def _volume_split(data: dict[str, Any], split: str, train: bool):
    """One split of a volume dataset, with nnU-Net's augmentation for training patches."""
    from maskworks.data import nnunet_augmentation

    cls = reader_class(data["name"])
    options = reader_options(data)
    patch = volume_patch_size(data)
    transform = None
    if train:
        spacing = None
        if data.get("plan"):
            spacing = _read_plan(data["plan"]).get("spacing")
        spacing = spacing or options.get("spacing") or (2.5, 1.0, 1.0)
        anisotropic = max(spacing) / min(spacing) > 3
        transform = nnunet_augmentation(patch, anisotropic=anisotropic)
    if data["name"] == "synthetic_volumes":
        if split not in ("train", "val"):
            raise ConfigError(f"split {split!r} is not available for data.name=synthetic_volumes; use train or val")
        n = data["num_train"] if split == "train" else data["num_val"]
        ds = _make(cls, num_samples=n, split=split, transform=transform, **options)
    else:
        if not data.get("root"):
            raise ConfigError("data.name=nifti needs data.root (a folder with imagesTr/ and labelsTr/)")
        ds = _make(cls, data["root"], split=split, transform=transform, **options)
    ds.patch_size = patch
    return ds


def _make(cls, *args, **kwargs):
    try:
        return cls(*args, **kwargs)
    except TypeError as e:  # a wrongly typed reader option
        raise ConfigError(f"{cls.__name__}: {e}") from e


def _check_class_count(dataset, data: dict[str, Any]) -> None:
    wanted = data.get("num_classes")
    base = base_dataset(dataset)
    if wanted is not None and base is not None and base.num_classes != wanted:
        raise ConfigError(
            f"data.num_classes={wanted} but data.name={data['name']} has {base.num_classes} classes "
            f"({', '.join(base.class_names)}); drop data.num_classes or set it to {base.num_classes}"
        )


def build_split(data: dict[str, Any], split: str):
    """One split of the configured dataset, for evaluation or prediction: ``train`` / ``val`` for every dataset,
    ``test`` for CamVid and Cityscapes, ``trainval`` / ``train_aug`` for VOC, ``train_extra`` for Cityscapes
    (``data.annotations=gtCoarse``), ``all`` for ISBI 2012 and folder datasets (every sample)."""
    from maskworks.data import build_transforms

    name = data["name"]
    if name in VOLUME_DATASETS:
        return _volume_split(data, split, train=False)
    cls = reader_class(name)
    options = reader_options(data)
    if name in STANDARD_DATASETS:
        ds = _make(
            cls,
            data.get("root") or default_data_root(name),
            split=split,
            transform=build_transforms(train=False),
            **options,
        )
        _check_class_count(ds, data)
        return ds
    if name == "synthetic" and split in ("train", "val"):
        n = data["num_train"] if split == "train" else data["num_val"]
        return _make(cls, num_samples=n, split=split, transform=build_transforms(train=False), **options)
    if name == "folder" and split == "all":
        if not data.get("root"):
            raise ConfigError("data.name=folder needs data.root (a folder with images/ and masks/)")
        return _make(cls, data["root"], transform=build_transforms(train=False), **options)
    if split not in ("train", "val"):
        extra = " or all" if name == "folder" else ""
        raise ConfigError(f"split {split!r} is not available for data.name={name!r}; use train or val{extra}")
    train, val = build_datasets(data, with_train=split == "train", augment=False)
    if split == "val" and val is None:
        raise ConfigError(f"data.root={data.get('root')} holds too few samples for a validation split; use --split all")
    return train if split == "train" else val


def _tf_kwargs(data: dict[str, Any]) -> dict:
    # None is meaningful here (no crop, no scaling), so present keys are passed through as they are.
    return {k: data[k] for k in _TRANSFORM_KEYS if k in data}


def build_datasets(data: dict[str, Any], with_train: bool = True, augment: bool = True) -> tuple[Any, Any]:
    """``(train_set, val_set)`` for a data config section (train_set is None if not ``with_train``).

    The standard datasets train on ``data.train_split`` (default ``"train"``; e.g. ``train_aug`` or ``trainval``
    for VOC) and validate on ``"val"``."""
    from maskworks.data import build_transforms

    name = data["name"]
    if name in VOLUME_DATASETS:
        train = _volume_split(data, "train", train=augment) if with_train else None
        return train, _volume_split(data, "val", train=False)
    cls = reader_class(name)
    options = reader_options(data)
    train_tf = build_transforms(train=True, **_tf_kwargs(data)) if augment else build_transforms(train=False)
    val_tf = build_transforms(train=False)
    if name not in STANDARD_DATASETS and data.get("train_split") not in (None, "train"):
        raise ConfigError(
            f"data.train_split={data['train_split']!r} is not available for data.name={name!r}; it chooses the "
            f"training split of {', '.join(STANDARD_DATASETS)}"
        )
    if name == "synthetic":
        train = (
            _make(cls, num_samples=data["num_train"], split="train", transform=train_tf, **options)
            if with_train
            else None
        )
        val = _make(cls, num_samples=data["num_val"], split="val", transform=val_tf, **options)
        return train, val
    if name in STANDARD_DATASETS:
        root = data.get("root") or default_data_root(name)
        train_split = data.get("train_split") or "train"
        train = _make(cls, root, split=train_split, transform=train_tf, **options) if with_train else None
        val = _make(cls, root, split="val", transform=val_tf, **options)
        _check_class_count(val, data)
        return train, val
    # folder
    if not data.get("root"):
        raise ConfigError("data.name=folder needs data.root (a folder with images/ and masks/)")
    if data.get("val_root"):
        train = _make(cls, data["root"], transform=train_tf, **options) if with_train else None
        return train, _make(cls, data["val_root"], transform=val_tf, **options)
    full_train = _make(cls, data["root"], transform=train_tf, **options)
    full_val = copy.copy(full_train)  # the same files, scanned once; only the transform differs
    full_val.transform = val_tf
    n = len(full_train)
    n_val = max(1, int(round(n * float(data.get("val_fraction", 0.1))))) if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    val_idx, train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])
    if not train_idx:
        raise ConfigError(f"{data['root']} holds {n} sample(s): too few to split into train and validation")
    log.info("folder dataset %s: %d train / %d val samples", data["root"], len(train_idx), len(val_idx))
    return (Subset(full_train, train_idx) if with_train else None), (Subset(full_val, val_idx) if val_idx else None)


def validate_datasets(data: dict[str, Any], *datasets, progress: bool = True) -> None:
    """Check every file of the given datasets up front (``data.validate``, default on; results are cached, so an
    unchanged dataset is read once)."""
    if not data.get("validate", True) or data.get("name") in VOLUME_DATASETS:
        return  # volume readers check each volume as they load it
    from maskworks.data import validate_dataset

    for ds in datasets:
        if ds is not None:
            validate_dataset(ds, progress=progress)


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


def check_class_count(model_classes: int, data_classes: int, where: str) -> None:
    """A model with K outputs fits data of K classes; a binary model (1 output, sigmoid) fits 2-class data.

    Raises:
        ConfigError: naming both counts.
    """
    if model_classes == data_classes or (model_classes == 1 and data_classes == 2):
        return
    if model_classes == 1:
        raise ConfigError(
            f"{where}: a binary model (num_classes=1, one sigmoid output) needs data of 2 classes "
            f"(0 = background, 1 = foreground), but the data has {data_classes}; use num_classes={data_classes}"
        )
    raise ConfigError(f"{where}: the model predicts {model_classes} classes but the data has {data_classes}")


def build_model(
    model_cfg: dict,
    num_classes: int,
    in_channels: int,
    task: str | None = None,
    thing_classes: list[int] | None = None,
):
    """The configured model for data of ``num_classes`` classes and ``in_channels`` channels. A model that serves
    several tasks (Mask2Former) gets ``task=`` (the task chosen by ``--task``); a panoptic model gets the data's
    ``thing_classes``."""
    from maskworks.registry import create_model, model_entry

    entry = model_entry(model_cfg["name"])
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_channels", in_channels)
    if entry.kind == "backbone":
        raise ConfigError(f"{model_cfg['name']!r} is a backbone, not a segmentation model; use it as model.encoder")
    if task is not None and len(entry.all_tasks) > 1:
        if kwargs.get("task", task) != task:
            raise ConfigError(
                f"model.task={kwargs['task']!r} disagrees with the task {task!r} (--task); give one of them"
            )
        kwargs["task"] = task
    if task == "panoptic" and thing_classes is not None:
        wanted = sorted(int(c) for c in thing_classes)
        given = kwargs.setdefault("thing_classes", wanted)
        if given is None or sorted(int(c) for c in given) != wanted:
            raise ConfigError(
                f"model.thing_classes={given!r} but the dataset's thing classes are {wanted}; drop "
                "model.thing_classes (it follows the data)"
            )
    if isinstance(kwargs["num_classes"], int) and not isinstance(kwargs["num_classes"], bool):
        check_class_count(kwargs["num_classes"], num_classes, f"model.num_classes={kwargs['num_classes']}")
    if kwargs["in_channels"] != in_channels:
        raise ConfigError(
            f"model.in_channels={kwargs['in_channels']} but the dataset's images have {in_channels} channel(s); "
            "drop model.in_channels (it follows the data)"
        )
    try:
        return create_model(model_cfg["name"], **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {model_cfg['name']!r} does not accept these arguments {kwargs}: {e}") from e


def model_task(name: str) -> str:
    """The task (``"semantic"``, ``"instance"``...) the registered model ``name`` declares.

    Raises:
        ConfigError: an unknown model name (with close names), a backbone, or a promptable model (``maskworks
            sam`` runs those).
    """
    from maskworks.registry import model_entry

    try:
        entry = model_entry(name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from e
    if entry.kind == "backbone":
        raise ConfigError(f"{name!r} is a backbone, not a segmentation model; use it as model.encoder")
    if entry.task == "promptable":
        raise ConfigError(
            f"{name} is a promptable (Segment Anything) model: run it with `maskworks sam IMAGE --point x,y` or "
            "`--auto`; train / eval / predict serve semantic, instance and panoptic models"
        )
    return entry.task


TASK_CHOICES = ("semantic", "instance", "panoptic")


def resolve_task(name: str, requested: str | None = None, current: str | None = None) -> str:
    """The task a run of the registered model ``name`` serves: ``requested`` (``--task``) when the model serves it,
    else ``current`` (a checkpoint's task) when the model serves that, else the model's default task.

    Raises:
        ConfigError: ``requested`` is a task the model does not serve (a model registered with one task serves
            only that one; ``--task`` chooses among the tasks of models that serve several, such as Mask2Former).
    """
    from maskworks.registry import model_entry

    model_task(name)  # unknown names and backbones: a ConfigError
    entry = model_entry(name)
    tasks = entry.all_tasks
    if requested is None:
        return current if current in tasks else entry.task
    if requested not in TASK_CHOICES:
        raise ConfigError(f"--task {requested!r}: expected one of {', '.join(TASK_CHOICES)}")
    if requested not in tasks:
        if len(tasks) == 1:
            raise ConfigError(
                f"--task {requested}: {name} is a {tasks[0]} model and serves no other task; --task chooses among "
                "the tasks of models that serve several (such as mask2former): drop --task"
            )
        raise ConfigError(f"--task {requested}: {name} serves {', '.join(tasks)}, not {requested}")
    return requested


def task_kwargs(kind: str, dataset=None, meta: dict | None = None, where: str = "the data") -> dict[str, Any]:
    """Keyword arguments of :func:`maskworks.tasks.build_task` for ``kind`` from a dataset (or, without one, a
    checkpoint's ``meta``): class names, and for panoptic tasks which classes are things and their category ids.

    Raises:
        ConfigError: a panoptic task on data that does not say which classes are things.
    """
    base = base_dataset(dataset) if dataset is not None else None
    meta = meta or {}

    def attr(key: str):
        value = getattr(base, key, None) if base is not None else None
        return value if value is not None else meta.get(key)

    names = attr("class_names")
    kwargs: dict[str, Any] = {"class_names": list(names) if names else None}
    if kind == "volumetric":
        patch = attr("patch_size") or meta.get("patch_size") or (meta.get("data_config") or {}).get("patch_size")
        if patch is None and (meta.get("data_config") or {}).get("name") in VOLUME_DATASETS:
            patch = volume_patch_size(meta["data_config"])
        if patch is not None:
            kwargs["patch_size"] = tuple(patch)
    if kind == "panoptic":
        isthing = attr("isthing")
        if isthing is None:
            raise ConfigError(
                f"a panoptic model needs panoptic data (which classes are things, which stuff), but {where} has "
                "none: use data.name=coco_panoptic, or data.name=synthetic with data.panoptic=true"
            )
        kwargs["isthing"] = [bool(t) for t in isthing]
        category_ids = attr("category_ids")
        if category_ids is not None:
            kwargs["category_ids"] = list(category_ids)
    return kwargs


# train.* / data.* settings that only a semantic model's training uses, with what they mean when unset.
SEMANTIC_ONLY = {
    "train.loss": "ce",
    "train.class_weights": None,
    "train.label_smoothing": None,
    "train.rare_class_sampling": None,
    "data.copy_paste": None,
}


def check_task_settings(cfg: dict, task: str) -> None:
    """Refuse settings that the model's task does not use (e.g. ``train.loss`` for an instance model, whose losses
    are part of the model).

    Raises:
        ConfigError: naming the setting and the task.
    """
    from maskworks.registry import model_entry

    set_prediction = len(model_entry(cfg["model"]["name"]).all_tasks) > 1  # Mask2Former: its own set loss
    if task == "semantic" and not set_prediction:
        return
    loss_keys = ("train.loss", "train.class_weights", "train.label_smoothing")  # a set-prediction model's own loss
    for key, unset in SEMANTIC_ONLY.items():
        if task == "semantic" and key not in loss_keys:
            continue
        section, name = key.split(".")
        value = cfg[section].get(name)
        if value not in (unset, None, 0, 0.0, False):
            if task == "semantic":  # a set-prediction model in the semantic task
                raise ConfigError(
                    f"{key}={value!r} applies to semantic models with a per-pixel loss; {cfg['model']['name']} "
                    f"computes its own set loss (matched segments): drop {key}"
                )
            raise ConfigError(
                f"{key}={value!r} applies to semantic models only; {cfg['model']['name']} is a {task} model "
                f"(its losses are part of the model): drop {key}"
            )


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


def trainer_kwargs(train_cfg: dict) -> dict:
    """The ``train.*`` settings that are :class:`~maskworks.engine.Trainer` arguments (the others — loss, class
    weights, sampling — are turned into objects by the builders above)."""
    from maskworks.engine import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    return {k: v for k, v in train_cfg.items() if k in params and k not in ("loss_fn", "sample_weights", "meta")}
