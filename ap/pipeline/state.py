"""``RunState``: what the stages share (config, data, module, pruning callback, cache) and what they found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from omegaconf import DictConfig

from ap.callback import AttentionPruning
from ap.config import PruningConfig

from .cache import StageCache


THROUGHPUT = "tokens_per_s"  # metric names ending so are speeds: only comparable when measured in one process


@dataclass
class RunState:
    """What the stages share: config, data, module, the pruning callback, and what the run has found so far."""

    cfg: DictConfig
    pruning: PruningConfig
    dm: pl.LightningDataModule
    module: pl.LightningModule
    callback: Optional[AttentionPruning]
    cache: StageCache
    results: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: ran / reused / given / ...
    dense_key: str = ""  # identifies the dense weights the later stages start from

    @property
    def out(self) -> Path:
        return Path(self.cfg.paths.output_dir)


# results of the stages before fine-tuning, kept in fine-tune checkpoints so that a resumed run reports them too
CARRIED = ("dense_metrics", "dense_finetuned_metrics", "pruned_before_finetune_metrics")
