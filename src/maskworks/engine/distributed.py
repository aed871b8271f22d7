"""Distributed data parallel through ``torchrun`` (gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node N -m maskworks.cli.main train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`init_distributed` joins the process group from them. Single-process
runs need nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "ShardedSampler", "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Seeded shuffle (or, with ``weights``, a seeded weighted draw with replacement), then the rank's share
    ``perm[rank::world]``.

    With ``drop_last`` every rank gets the same number of whole batches, and the union of the
    ranks' k-th batches is exactly the k-th global batch of a single-process run (with per-rank
    batch = global batch / world), so DDP reproduces single-process training.
    """

    def __init__(
        self,
        length: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        global_batch: int | None = None,
        weights: torch.Tensor | None = None,
    ):
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (length,) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"weights must be {length} non-negative numbers with a positive sum")
        self.weights = weights
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = global_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:  # e.g. repeat-factor sampling of images with rare classes
            perm = torch.multinomial(self.weights, self.length, replacement=True, generator=g).tolist()
        elif self.shuffle:
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        if self.global_batch:  # keep whole global batches only
            perm = perm[: len(perm) // self.global_batch * self.global_batch]
        return perm[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
