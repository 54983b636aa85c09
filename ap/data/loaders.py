"""DataLoaders shared by the data modules: training, evaluation and calibration order, and sharding over DDP ranks.

ap's data modules shard their data themselves (the trainers run with ``use_distributed_sampler=false``, conf/trainer/):
- training: each rank draws its share of a seeded shuffle (``DistributedSampler``; equal batch counts on every rank);
- evaluation: each rank takes every ``world``-th example, none repeated and none dropped, so a metric reduced over ranks
  counts each example exactly once (Lightning's own sampler pads ranks with repeated examples);
- calibration: one fixed-seed shuffled order, the same on every rank and every pass, so ``pruning.calibration_batches=N``
  sees a sample of the whole split (not its first files) and DDP ranks can split it by batch index.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset


def rank_world(datamodule: Any) -> tuple[int, int]:
    """``(global rank, world size)`` of the trainer the data module is attached to (``(0, 1)`` without one)."""
    trainer = getattr(datamodule, "trainer", None)
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def train_loader(ds: Dataset, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, **kw: Any) -> DataLoader:
    """Shuffled batches; under DDP this rank's share of a seeded shuffle (Lightning calls ``set_epoch``)."""
    if world == 1:
        return DataLoader(ds, batch_size=batch_size, shuffle=True, **kw)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, **kw)


def eval_loader(ds: Dataset, batch_size: int, rank: int = 0, world: int = 1, **kw: Any) -> DataLoader:
    """Batches in file order; under DDP examples ``rank, rank + world, ...`` (every example on exactly one rank)."""
    part = ds if world == 1 else Subset(ds, range(rank, len(ds), world))
    return DataLoader(part, batch_size=batch_size, shuffle=False, **kw)


def calibration_loader(ds: Dataset, batch_size: int, seed: int = 0, **kw: Any) -> DataLoader:
    """All examples in one fixed-seed shuffled order (the same on every rank and every pass)."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return DataLoader(Subset(ds, order), batch_size=batch_size, shuffle=False, **kw)


def gather_lists(values: list, world: int, group: Optional[Any] = None) -> list:
    """Concatenate ``values`` from every rank (``torch.distributed.all_gather_object``; as is when ``world == 1``)."""
    if world == 1:
        return list(values)
    shares: list[Any] = [None] * world
    torch.distributed.all_gather_object(shares, list(values), group=group)
    return [v for share in shares for v in share]
