"""Supervised training loop for every kind of segmentation output.

One :class:`Trainer` runs single-process or under ``torchrun`` (DDP), on CPU or GPU:
AdamW/SGD with poly or warm-up-cosine schedules, optional mixed precision, gradient clipping,
an atomically written checkpoint after every epoch (``--resume`` continues from it), the best
model by the task's headline validation metric (mIoU, mask AP, ...), a clear stop on a NaN/inf
loss, a seeded deterministic mode and JSONL logs in the run folder.

What differs between semantic, instance and later kinds of output (batching, the loss, the evaluation) belongs to
a :class:`~maskworks.tasks.Task`; the default is :class:`~maskworks.tasks.SemanticTask` with the given ``loss_fn``.

Determinism across interruptions: every epoch reseeds torch's RNG, the shuffling and the
DataLoader workers from ``(seed, epoch)``, and a checkpoint holds everything else (weights,
optimizer, schedule, scaler), so a run resumed from the checkpoint of epoch ``e`` replays epoch
``e + 1`` exactly as the uninterrupted run does.

Fine-tuning: ``freeze_encoder_epochs`` trains only the decoder and heads for the first epochs (the encoder, see
:func:`~maskworks.engine.optim.find_encoder`, has ``requires_grad=False`` and runs in eval mode, so its weights and
BatchNorm statistics stay bit-identical), ``encoder_lr_mult`` and ``layer_decay`` set per-group learning rates
(:func:`~maskworks.engine.optim.param_groups`), ``freeze_bn`` keeps every BatchNorm in eval mode with fixed affine
parameters (small batches). Which epochs are frozen follows from the epoch number alone, so resumed runs match.

Speed: convolutional models and their batches use ``torch.channels_last`` (see :mod:`maskworks.engine.perf`);
``compile=True`` runs the training forward/backward through ``torch.compile`` and falls back to eager mode, with a
warning naming the reason, when compilation fails on the first step. Validation runs under ``torch.inference_mode``.

Progress: on a terminal, per-step bars; otherwise (a log file, a pipe, a batch job) no bars, only one log line
per epoch (loss, learning rate, images per second, the validation headline metric, time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from maskworks.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    load_training_state,
    save_model,
    unwrap_model,
)
from maskworks.engine.distributed import DistInfo, ShardedSampler, all_reduce_sum, init_distributed
from maskworks.engine.optim import base_lr, build_optimizer, build_scheduler, find_encoder
from maskworks.engine.perf import to_channels_last
from maskworks.tasks import SemanticTask, Task

__all__ = ["Trainer", "TrainingDiverged", "RunFolderExists", "resolve_device", "dataset_meta", "seed_everything"]

log = logging.getLogger(__name__)
AMP_MODES = ("auto", "off", "bf16", "fp16")


_FINE_TUNING_DEFAULTS = {"freeze_encoder_epochs": 0, "encoder_lr_mult": 1.0, "layer_decay": None, "freeze_bn": False}


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "maskworks_config", None)
    name = config.get("name") if isinstance(config, dict) else None
    return f"{type(model).__name__} ({name})" if name else type(model).__name__


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX tiles, Intel Sapphire Rapids and later): there
    ``amp="auto"`` trains convolutions and matmuls in bfloat16, about 3x faster than float32 (elsewhere it stays
    float32, where bfloat16 would be emulated and slower)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported()) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class RunFolderExists(FileExistsError):
    """A new run was started in a folder that already holds one (resume it, or overwrite it explicitly)."""


# What a run writes into its folder; a fresh run refuses a folder holding any of them unless told to overwrite.
RUN_OUTPUTS = (
    "checkpoints/last.pt",
    "history.jsonl",
    "steps.jsonl",
    "best.safetensors",
    "best.json",
    "final.safetensors",
    "final.json",
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive python/numpy seeds from it.
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def dataset_meta(ds: Dataset) -> dict:
    """What predict/eval need later, read from a dataset's attributes."""
    base = getattr(ds, "dataset", ds)  # unwrap Subset
    meta = {}
    for key in ("num_classes", "class_names", "palette", "mean", "std", "in_channels", "ignore_index"):
        if hasattr(base, key):
            v = getattr(base, key)
            meta[key] = [list(c) if isinstance(c, tuple) else c for c in v] if isinstance(v, (list, tuple)) else v
    meta["dataset"] = type(base).__name__
    return meta


class EpochSeededDataset(Dataset):
    """Makes each sample's augmentation a function of ``(seed, epoch, index)`` only.

    Transforms draw from torch's global RNG; reseeding it (in a forked RNG scope) per sample
    means the same sample gets the same augmentation whatever the process, worker, rank or
    order reads it, which is what makes DDP runs equal single-process runs and resumed runs
    equal uninterrupted ones.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.dataset[index]

    def __getattr__(self, name: str):  # dataset attributes (num_classes, palette...) pass through
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class Trainer:
    """Train a segmentation model; what the model returns and how it is scored is the ``task``'s business.

    Args:
        model: for the default semantic task, a module returning logits ``(B, K, H, W)`` (or ``{"out", "aux"}``
            in training) on ``{"image", "mask"}`` samples; for other tasks, what the task expects (instance
            models: torchvision's detection convention).
        train_set: training dataset.
        val_set: optional validation dataset (evaluated every ``eval_every`` epochs).
        run_dir: folder for checkpoints and logs.
        task: a :class:`~maskworks.tasks.Task`; default :class:`~maskworks.tasks.SemanticTask` with ``loss_fn``,
            ``num_classes`` and ``ignore_index``. The best checkpoint follows its headline metric.
        loss_fn: ``loss_fn(output, target)`` of the default semantic task; default cross-entropy with
            ``ignore_index`` (a task brings its own losses).
        epochs: number of epochs.
        batch_size: global batch size (split evenly over DDP ranks).
        optimizer: ``"adamw" | "adam" | "sgd"``.
        lr: base learning rate.
        weight_decay: decoupled weight decay (not applied to biases and norms).
        momentum: SGD momentum.
        schedule: ``"poly" | "cosine" | "constant"`` per-step schedule.
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        amp: ``"auto"`` (bf16/fp16 on CUDA; bf16 on CPUs with AMX, see :func:`cpu_has_native_bf16`; float32
            elsewhere), ``"off"``, ``"bf16"`` or ``"fp16"``.
        grad_clip: max global gradient norm, or None.
        seed: base seed of weights-independent randomness (shuffle, augmentation, dropout).
        deterministic: use deterministic algorithms.
        num_workers: DataLoader workers.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        eval_every: validate every this many epochs (and always after the last).
        eval_batch_size: validation batch size per rank (default: the training per-rank batch).
        log_every: write a step row to ``steps.jsonl`` every this many steps.
        progress: show progress bars (main process only).
        meta: extra JSON metadata stored with the model (class names, palette, mean/std...).
        num_classes: number of classes for the semantic metrics (default: ``train_set.num_classes`` or model
            output).
        ignore_index: label value ignored by the semantic loss and metrics.
        sample_weights: per-sample drawing weights (e.g. :func:`maskworks.data.repeat_factors` for rare-class
            sampling); each epoch then draws ``len(train_set)`` samples with replacement.
        freeze_encoder_epochs: train with the encoder frozen for this many epochs, then unfreeze it. The encoder
            is the model's ``encoder`` submodule, or else its ``backbone`` submodule; while frozen its parameters
            have ``requires_grad=False`` (the optimizer skips them, weight decay included) and it runs in eval
            mode (BatchNorm statistics and dropout fixed). Parameters frozen by the caller stay frozen.
        encoder_lr_mult: learning-rate multiplier of the encoder's parameters (decoder and heads at ``lr``).
        layer_decay: layer-wise learning-rate decay of a ViT-family encoder (timm / BEiT grouping), or None;
            combines multiplicatively with ``encoder_lr_mult``.
        freeze_bn: keep every BatchNorm layer in eval mode (running statistics fixed) with its affine parameters
            frozen, for fine-tuning with small batches.
        channels_last: run convolutional models and their input batches in ``torch.channels_last`` memory format
            (models without a convolution other than a ViT patch projection are left as they are).
        compile: ``torch.compile`` the model for training; if compilation fails on the first step, training goes
            on uncompiled with a warning naming the reason.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset | None = None,
        run_dir: str | os.PathLike = "runs/train",
        *,
        task: Task | None = None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        epochs: int = 10,
        batch_size: int = 8,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        schedule: str = "poly",
        warmup_epochs: float = 0.0,
        amp: str = "auto",
        grad_clip: float | None = None,
        seed: int = 0,
        deterministic: bool = False,
        num_workers: int = 0,
        device: str | torch.device = "auto",
        eval_every: int = 1,
        eval_batch_size: int | None = None,
        log_every: int = 10,
        progress: bool = True,
        meta: dict | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        sample_weights: torch.Tensor | None = None,
        freeze_encoder_epochs: int = 0,
        encoder_lr_mult: float = 1.0,
        layer_decay: float | None = None,
        freeze_bn: bool = False,
        channels_last: bool = True,
        compile: bool = False,
    ):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if task is not None and loss_fn is not None:
            raise ValueError(f"pass loss_fn to the task, not to the Trainer: {task!r} computes its own losses")
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        if (
            not isinstance(freeze_encoder_epochs, int)
            or isinstance(freeze_encoder_epochs, bool)
            or freeze_encoder_epochs < 0
        ):
            raise ValueError(f"freeze_encoder_epochs must be an integer >= 0, got {freeze_encoder_epochs!r}")
        if not encoder_lr_mult > 0:
            raise ValueError(f"encoder_lr_mult must be > 0, got {encoder_lr_mult}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] or None, got {layer_decay}")
        encoder = find_encoder(model)
        if encoder is None and (freeze_encoder_epochs > 0 or encoder_lr_mult != 1.0):
            option = (
                f"freeze_encoder_epochs={freeze_encoder_epochs}"
                if freeze_encoder_epochs > 0
                else f"encoder_lr_mult={encoder_lr_mult}"
            )
            raise ValueError(
                f"{option} needs a model with an 'encoder' or 'backbone' submodule; {_model_name(model)} has neither"
            )
        self.device = resolve_device(device)
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if batch_size < 1 or batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of the number of processes ({self.dist.world_size})"
            )
        if len(train_set) < batch_size:
            raise ValueError(f"training set has {len(train_set)} samples, fewer than batch_size={batch_size}")
        self.run_dir = Path(run_dir)
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.deterministic, self.eval_every, self.log_every = deterministic, eval_every, log_every
        self.progress = progress and self.dist.is_main
        self.ignore_index = ignore_index
        self.grad_clip = grad_clip
        self.train_set, self.val_set = train_set, val_set
        self.meta = {**dataset_meta(train_set), **(meta or {})}
        self.num_classes = num_classes or getattr(getattr(train_set, "dataset", train_set), "num_classes", None)
        if task is None:
            task = SemanticTask(loss_fn, num_classes=self.num_classes, ignore_index=ignore_index)
        self.task = task
        self.meta.setdefault("task", task.kind)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.module = model.to(self.device)  # the plain model; self.model is what runs (DDP / compiled wrappers)
        self.freeze_encoder_epochs, self.freeze_bn = freeze_encoder_epochs, freeze_bn
        self.encoder_lr_mult, self.layer_decay = encoder_lr_mult, layer_decay
        self.frozen_norms: list[nn.Module] = []
        if freeze_bn:
            self.frozen_norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if not self.frozen_norms:
                log.warning("freeze_bn: %s has no BatchNorm layer; nothing to freeze", _model_name(self.module))
            for m in self.frozen_norms:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
        self.encoder = encoder[1] if encoder is not None else None
        # what freezing toggles: the encoder parameters trainable now (ones the caller froze are left alone)
        self._encoder_params = [p for p in self.encoder.parameters() if p.requires_grad] if self.encoder else []
        self._encoder_frozen = False
        self.channels_last = bool(channels_last) and task.channels_last and to_channels_last(self.module)
        self.compile = compile
        self.compile_error: str | None = None
        self._compile_pending = False
        self._wrap()
        self.task.to(self.device)

        per_rank = batch_size // self.dist.world_size
        self.sampler = ShardedSampler(
            len(train_set),
            shuffle=True,
            seed=seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            global_batch=batch_size,
            weights=sample_weights,
        )
        self.loader_generator = torch.Generator()
        self.seeded_train_set = EpochSeededDataset(train_set, seed)
        self.train_loader = DataLoader(
            self.seeded_train_set,
            batch_size=per_rank,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=self.task.collate,
            drop_last=True,
            worker_init_fn=_worker_init,
            generator=self.loader_generator,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        self.val_loader = None
        if val_set is not None:
            vs = ShardedSampler(len(val_set), shuffle=False, rank=self.dist.rank, world_size=self.dist.world_size)
            self.val_loader = DataLoader(
                val_set,
                batch_size=eval_batch_size or per_rank,
                sampler=vs,
                num_workers=num_workers,
                collate_fn=self.task.collate,
            )
        self.steps_per_epoch = len(self.train_loader)
        total = self.steps_per_epoch * epochs
        self.optimizer = build_optimizer(
            self.module,
            optimizer,
            lr,
            weight_decay,
            momentum,
            encoder_lr_mult=encoder_lr_mult,
            layer_decay=layer_decay,
        )
        # a task may own trainable parameters (a distillation adapter): one more group, same settings
        self._task_params = [p for p in getattr(task, "parameters", lambda: ())() if p.requires_grad]
        if self._task_params:
            self.optimizer.add_param_group({"params": self._task_params})
        warmup = min(int(round(warmup_epochs * self.steps_per_epoch)), total - 1)
        self.scheduler = build_scheduler(self.optimizer, total, schedule, warmup)
        self.amp_dtype = self._amp_dtype(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch, self.best_metric, self.history = 0, -math.inf, []

    # ------------------------------------------------------------------ setup helpers
    def _wrap(self) -> None:
        """(Re)build the wrappers around ``self.module``: DDP under torchrun, then ``torch.compile`` if asked.

        DDP registers the parameters that need gradients when it is built, so it is rebuilt whenever freezing
        changes that set.
        """
        model: nn.Module = self.module
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self._eager_model = model
        if self.compile and self.compile_error is None:
            model = torch.compile(model)
            self._compile_pending = True
        self.model = model

    def _set_encoder_frozen(self, frozen: bool) -> None:
        if frozen == self._encoder_frozen:
            return
        for p in self._encoder_params:
            p.requires_grad_(not frozen)
        self._encoder_frozen = frozen
        if self.dist.enabled:
            self._wrap()
        elif self.compile and self.compile_error is None:
            self._compile_pending = True  # the compiled graph is rebuilt for the new set of trainable parameters

    def _train_mode(self, epoch: int) -> None:
        """Training mode for ``epoch``: the encoder frozen (and in eval mode) during the first
        ``freeze_encoder_epochs`` epochs; frozen BatchNorm layers in eval mode."""
        if self.encoder is not None and self.freeze_encoder_epochs > 0:
            frozen = epoch < self.freeze_encoder_epochs
            if frozen != self._encoder_frozen and self.dist.is_main:
                log.info("epoch %d: encoder %s", epoch + 1, "frozen" if frozen else "unfrozen")
            self._set_encoder_frozen(frozen)
        self.model.train()
        if self._encoder_frozen:
            self.encoder.eval()
        for m in self.frozen_norms:
            m.eval()

    def _fine_tuning_settings(self) -> dict:
        return {
            "freeze_encoder_epochs": self.freeze_encoder_epochs,
            "encoder_lr_mult": self.encoder_lr_mult,
            "layer_decay": self.layer_decay,
            "freeze_bn": self.freeze_bn,
        }

    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        if amp == "off":
            return None
        if amp == "auto" and self.device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        if amp == "auto" and self.device.type != "cuda":
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' or 'off' on CPU")
        return torch.bfloat16 if amp == "bf16" else torch.float16

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    # ------------------------------------------------------------------ checkpoints
    def _state(self, epoch: int) -> dict:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_metric": self.best_metric,
            "metric": self.task.headline,
            "history": self.history,
            "fine_tuning": self._fine_tuning_settings(),
            **({"task": self.task.state_dict()} if self._task_params else {}),
        }

    def save_checkpoint(self, epoch: int) -> None:
        if self.dist.is_main:
            atomic_torch_save(self._state(epoch), self.checkpoint_path)

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> int:
        """Restore the training state; returns the number of completed epochs.

        Raises:
            FileNotFoundError: no checkpoint at ``path``.
            CheckpointError: the file is not a readable training state, or does not fit this model / optimizer.
            ValueError: the checkpoint already completed ``epochs`` (or more) epochs: nothing is left to run.
        """
        path = Path(path) if path else self.checkpoint_path
        if not path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
        state = load_training_state(path, map_location=self.device)
        done = int(state["epoch"])
        if done >= self.epochs:
            raise ValueError(
                f"cannot resume {path}: the run already finished {done} epoch(s) and epochs={self.epochs}; "
                f"set epochs above {done} to train further"
            )
        saved = {**_FINE_TUNING_DEFAULTS, **state.get("fine_tuning", {})}
        changed = [k for k, v in self._fine_tuning_settings().items() if saved.get(k) != v]
        if changed:
            raise CheckpointError(
                f"{path} was trained with "
                + ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
                + " but this trainer has "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in changed)
                + "; resume with the settings the run was started with"
            )
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self._task_params:
                self.task.load_state_dict(state["task"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path} does not fit this model and optimizer ({first}); resume with the settings the run was "
                "started with"
            ) from e
        # checkpoints written before tasks existed hold the semantic headline as "best_miou"
        self.best_metric = state.get("best_metric", state.get("best_miou", -math.inf))
        self.history = list(state.get("history", []))
        self.start_epoch = done
        self._resumed_from = path
        log.info("resumed from %s after epoch %d of %d", path, self.start_epoch, self.epochs)
        return self.start_epoch

    def existing_outputs(self) -> list[Path]:
        """Files of an earlier run in the run folder."""
        return [self.run_dir / name for name in RUN_OUTPUTS if (self.run_dir / name).exists()]

    def _rewrite_logs(self) -> None:
        """After a resume, keep only log rows of completed epochs."""
        if not self.dist.is_main:
            return
        atomic_write_bytes(self.run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in self.history).encode())
        steps = self.run_dir / "steps.jsonl"
        if steps.exists():
            rows = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("epoch", 0) <= self.start_epoch]
            atomic_write_bytes(steps, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _append(self, name: str, row: dict) -> None:
        if self.dist.is_main:
            with open(self.run_dir / name, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Train for the configured epochs (continuing from the last checkpoint if ``resume``).

        Args:
            resume: continue from ``run_dir/checkpoints/last.pt`` (loaded here unless :meth:`load_checkpoint` ran).
            overwrite: start afresh in a folder that holds an earlier run, deleting its checkpoints and logs.
                Without it, such a folder is refused (:class:`RunFolderExists`) and nothing in it is touched.

        Returns:
            Summary dict: ``metric`` (the task's headline metric, e.g. ``"miou"`` or ``"mask_ap"``),
            ``best_metric`` (its best validation value, None without validation), ``final`` (last epoch's log
            row), ``history``, ``run_dir``; semantic runs also give ``best_miou`` (= ``best_metric``).
        """
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"run folder {self.run_dir} is a file; expected a folder")
        if resume:
            if getattr(self, "_resumed_from", None) is None:
                self.load_checkpoint()
            self._rewrite_logs()
        else:
            earlier = self.existing_outputs()
            if earlier and not overwrite:
                raise RunFolderExists(
                    f"run folder {self.run_dir} already holds a run ({', '.join(p.name for p in earlier[:3])}); "
                    "resume it, choose another folder, or overwrite it explicitly"
                )
            if self.dist.is_main:
                for path in earlier:
                    path.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for epoch in range(self.start_epoch, self.epochs):
            row = {"epoch": epoch + 1, **self.train_one_epoch(epoch)}
            if self.val_loader is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs):
                metrics = self.evaluate()
                row.update(self.task.history_row(metrics))
                value = metrics[self.task.headline]
                if value > self.best_metric or not math.isfinite(self.best_metric):
                    self.best_metric = value
                    if self.dist.is_main:
                        save_model(
                            self.model,
                            self.run_dir / "best",
                            {**self.meta, "epoch": epoch + 1, f"val_{self.task.headline}": value},
                        )
            self.history.append(row)
            self.save_checkpoint(epoch + 1)
            self._append("history.jsonl", row)
            if self.dist.is_main:
                log.info("%s", self._epoch_line(row))
        if self.dist.is_main:
            save_model(self.model, self.run_dir / "final", {**self.meta, "epoch": self.epochs})
        best = self.best_metric if math.isfinite(self.best_metric) else None
        return {
            "metric": self.task.headline,
            "best_metric": best,
            **({"best_miou": best} if self.task.headline == "miou" else {}),
            "final": self.history[-1] if self.history else None,
            "history": self.history,
            "run_dir": str(self.run_dir),
        }

    def _epoch_line(self, row: dict) -> str:
        """One readable line per epoch: ``epoch 3/10 loss=0.4123 lr=8.10e-04 img/s=45.2 val_mIoU=0.5123 time=12.3s``
        (the task's headline metric: ``val_mask_AP=...`` for instances)."""
        parts = [f"epoch {row['epoch']}/{self.epochs}", f"loss={row['train_loss']:.4f}", f"lr={row['lr']:.3g}"]
        parts.append(f"img/s={row['img_per_s']:.1f}")
        key = f"val_{self.task.headline}"
        if key in row:
            parts.append(f"val_{self.task.headline_label.replace(' ', '_')}={row[key]:.4f}")
        parts.append(f"time={row['epoch_time_s']:.1f}s")
        return " ".join(parts)

    def _bars(self) -> bool:
        """Per-step progress bars only on an interactive terminal; logs and pipes get one line per epoch."""
        if not self.progress:
            return False
        try:
            return bool(sys.stderr.isatty())
        except (AttributeError, ValueError):  # replaced or closed stream
            return False

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_one_epoch(self, epoch: int) -> dict:
        # Everything random in this epoch derives from (seed, epoch): see the module docstring.
        torch.manual_seed(self.seed * 1_000_003 + epoch)
        random.seed(self.seed * 1_000_003 + epoch)
        np.random.seed((self.seed * 1_000_003 + epoch) % 2**32)
        self.sampler.set_epoch(epoch)
        self.seeded_train_set.set_epoch(epoch)
        self.loader_generator.manual_seed(self.seed * 1_000_003 + epoch)
        self._train_mode(epoch)
        total_loss, n_steps, n_images, t0 = 0.0, 0, 0, time.perf_counter()
        part_sums: dict[str, float] = {}
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not self._bars(),
            dynamic_ncols=True,
            leave=False,
        )
        for step, batch in enumerate(self.train_loader):
            batch = self.task.to_device(batch, self.device, self.channels_last, non_blocking=True)
            if self._compile_pending:
                loss_value, parts = self._first_compiled_step(batch, epoch, step, bar)
            else:
                loss_value, parts = self._forward_backward(batch, epoch, step, bar)
            if self._task_params and self.dist.world_size > 1:  # not in DDP's model: average their gradients here
                for p in self._task_params:
                    if p.grad is not None:
                        p.grad.copy_(all_reduce_sum(p.grad) / self.dist.world_size)
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            lv = loss_value.item()
            total_loss += lv
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value
            n_steps += 1
            n_images += self.task.num_images(batch) * self.dist.world_size
            ips = n_images / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}", img_s=f"{ips:.1f}")
            if (step + 1) % self.log_every == 0:
                self._append(
                    "steps.jsonl",
                    {
                        "epoch": epoch + 1,
                        "step": epoch * self.steps_per_epoch + step + 1,
                        "loss": lv,
                        "lr": base_lr(self.optimizer),
                        "img_per_s": ips,
                    },
                )
        bar.close()
        return {
            "train_loss": total_loss / max(n_steps, 1),
            **{f"train_{name}": value / max(n_steps, 1) for name, value in part_sums.items()},
            "lr": base_lr(self.optimizer),
            "epoch_time_s": time.perf_counter() - t0,
            "img_per_s": n_images / max(time.perf_counter() - t0, 1e-9),
        }

    def _forward_backward(self, batch: dict, epoch: int, step: int, bar) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward, loss, NaN check and backward of one step; returns the loss averaged over ranks and this rank's
        named loss parts (the task's losses other than the total)."""
        with self._autocast():
            losses = self.task.training_step(self.model, batch)
            loss = losses["loss"]
        loss_value = all_reduce_sum(loss.detach().float().clone()) / self.dist.world_size
        if not torch.isfinite(loss_value):
            bar.close()
            bad = [name for name, v in losses.items() if name != "loss" and not torch.isfinite(v.detach()).all()]
            which = f" ({', '.join(bad)} non-finite)" if bad and len(bad) < len(losses) - 1 else ""
            raise TrainingDiverged(
                f"loss became {loss_value.item()}{which} at epoch {epoch + 1}, step {step + 1}; stopped. The last good "
                f"checkpoint is {self.checkpoint_path if self.checkpoint_path.exists() else 'not written yet'}. "
                "Lower the learning rate, enable grad_clip, or check the data for bad values."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        parts = {name: float(v.detach()) for name, v in losses.items() if name != "loss"}
        return loss_value, parts

    def _first_compiled_step(self, batch: dict, epoch: int, step: int, bar) -> tuple[torch.Tensor, dict[str, float]]:
        """The first step through a new ``torch.compile`` wrapper; when compilation fails, warn, go back to the
        eager model and redo the step from the same random state."""
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        try:
            return self._forward_backward(batch, epoch, step, bar)
        except TrainingDiverged:
            raise
        except Exception as e:  # compilation errors come in many types (dynamo, inductor, a missing compiler...)
            lines = str(e).strip().splitlines()
            self.compile_error = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
            message = f"torch.compile failed ({self.compile_error}); training without compilation"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning("%s", message)
            self.model = self._eager_model
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self.optimizer.zero_grad(set_to_none=True)
            return self._forward_backward(batch, epoch, step, bar)
        finally:
            self._compile_pending = False

    @torch.inference_mode()
    def evaluate(self, loader: DataLoader | None = None) -> dict:
        """The task's validation metrics (gathered over DDP ranks), under ``torch.inference_mode``: confusion-matrix
        metrics for semantic models (the matrix is kept as ``last_confusion``), COCO mask / box AP for instance
        models. The evaluator is kept as ``last_evaluator``."""
        loader = loader or self.val_loader
        if loader is None:
            raise ValueError("no validation set was given")
        model = unwrap_model(self.model)  # eager, unwrapped (also a model the caller put in self.model)
        model.eval()
        evaluator = self.task.evaluator()
        seen = 0
        for batch in tqdm(loader, desc="eval", disable=not self._bars(), leave=False, dynamic_ncols=True):
            batch = self.task.to_device(batch, self.device, self.channels_last)
            with self._autocast():
                outputs = self.task.forward(model, batch)
            evaluator.update(outputs, batch)
            seen += 1
        if not seen:
            raise ValueError("validation set is empty")
        evaluator.all_reduce()
        self.last_evaluator = evaluator
        confusion = getattr(evaluator, "confusion", None)
        if confusion is not None:
            self.last_confusion = confusion
        return evaluator.compute()
