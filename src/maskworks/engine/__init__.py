"""Training engine: trainer, optimizers and schedules, distributed helpers."""

from maskworks.engine.distributed import DistInfo, ShardedSampler, init_distributed
from maskworks.engine.optim import build_optimizer, build_scheduler, find_encoder, param_groups
from maskworks.engine.perf import prefers_channels_last
from maskworks.engine.trainer import Trainer, TrainingDiverged, dataset_meta, resolve_device, seed_everything

__all__ = [
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "build_scheduler",
    "find_encoder",
    "param_groups",
    "prefers_channels_last",
    "DistInfo",
    "ShardedSampler",
    "init_distributed",
    "dataset_meta",
    "resolve_device",
    "seed_everything",
]
