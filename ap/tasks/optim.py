"""Optimizers and learning-rate schedules of every task, in one place.

Each schedule is a multiplier of the stage's learning rate per optimizer step (``LambdaLR``), stepped every step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

Schedule = Callable[[int], float]


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups: weight decay on matrices (``dim >= 2``), none on biases, norms and other vectors."""
    params = list(module.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def adamw(params: Iterable[Any], lr: float, weight_decay: float = 0.0,
          betas: Optional[tuple[float, float]] = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"betas": betas} if betas else {}))


def adam(params: Iterable[Any], lr: float, betas: tuple[float, float], weight_decay: float = 0.0) -> torch.optim.Adam:
    """fairseq's Adam (``eps`` 1e-8)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=1e-8, weight_decay=weight_decay)


def warmup_cosine(warmup: int, total: int, floor: float) -> Schedule:
    """Linear warm-up over ``min(warmup, total // 2)`` steps, then cosine decay to ``floor`` at ``total``."""
    warmup = min(warmup, total // 2)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def warmup_linear(warmup: int, total: int) -> Schedule:
    """Linear warm-up, then linear decay to 0 at ``total`` (the BERT fine-tuning recipe)."""

    def schedule(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

    return schedule


def warmup_constant(warmup: int) -> Schedule:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def inverse_sqrt(warmup: int, init_lr: float, lr: float) -> Schedule:
    """fairseq's ``inverse_sqrt``: linear warm-up from ``init_lr`` to ``lr``, then ``lr * sqrt(warmup / step)``."""
    warmup = max(1, warmup)

    def schedule(step: int) -> float:
        step += 1
        if step < warmup:
            return (init_lr + (lr - init_lr) * step / warmup) / lr
        return math.sqrt(warmup / step)

    return schedule


def per_step(optimizer: torch.optim.Optimizer, schedule: Schedule) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: the optimizer with ``schedule`` applied every step."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
