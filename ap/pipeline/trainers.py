"""The trainer of each stage (loggers per stage, checkpoints) and evaluation with one-time work left out."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities.model_helpers import is_overridden

from ap.core import APError

from .tracking import finish_wandb


def stage_loggers(cfg: DictConfig, stage: str) -> list[Logger]:
    """The loggers of ``cfg.logger`` for one stage: a CSV logger writes ``csv/<stage>/``; wandb starts one run per
    stage (``job_type`` = the stage, runs of a job and of a sweep share ``group``); others prefix metric names."""
    loggers = []
    for node in cfg.logger.values():
        cls = get_class(node._target_)
        if issubclass(cls, CSVLogger) and node.get("version") is None:
            loggers.append(instantiate(node, version=stage))
        elif cls.__name__ == "WandbLogger":
            finish_wandb()  # the previous stage's run
            loggers.append(instantiate(node, name=f"{node.name}/{stage}", job_type=stage))
        elif "prefix" in inspect.signature(cls).parameters:
            loggers.append(instantiate(node, prefix=stage))
        else:
            raise APError(f"logger {node._target_} takes no `prefix`: ap cannot keep its stages apart; use logger=csv "
                          f"or logger=wandb")
    return loggers


def make_trainer(cfg: DictConfig, stage: str, callbacks: Optional[list] = None, kind: str = "") -> pl.Trainer:
    """A Trainer from ``cfg.trainer`` for ``stage``, logging under that name. ``kind`` ``dense``/``finetune``: a
    training stage of that length (``cfg.task.<kind>``, capped by ``trainer.max_steps``), checkpoints in
    ``<run_dir>/checkpoints/<stage>/`` (``last.ckpt`` resumes); ``""``: evaluation only."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    cap = kwargs.pop("max_steps", None)
    callbacks = list(callbacks or [])
    if kind:
        spec = cfg.task[kind]
        steps = spec.max_steps if cap is None else (cap if spec.max_steps < 0 else min(spec.max_steps, cap))
        kwargs.update(max_epochs=spec.max_epochs, max_steps=steps)
        callbacks.append(ModelCheckpoint(dirpath=Path(cfg.paths.output_dir) / "checkpoints" / stage, save_last=True,
                                         save_top_k=0))
    return pl.Trainer(logger=stage_loggers(cfg, stage) or False, callbacks=callbacks,
                      default_root_dir=cfg.paths.output_dir, enable_checkpointing=bool(kind), **kwargs)


def evaluate(cfg: DictConfig, module: pl.LightningModule, dm: pl.LightningDataModule, stage: str,
             callbacks: Optional[list] = None) -> dict[str, float]:
    """Validation (and test, where the task has labelled test data) metrics, on the trainer's devices (DDP: each
    rank evaluates its share of the examples, reduced over ranks)."""
    trainer = make_trainer(cfg, stage, callbacks)
    metrics: dict[str, float] = {}
    outputs = trainer.validate(module, dm, verbose=False)
    if getattr(module, "test_split", is_overridden("test_step", module)):  # GLUE: no test labels, validation only
        outputs += trainer.test(module, dm, verbose=False)
    for out in outputs:
        metrics.update({k: float(v) for k, v in out.items()})
    return metrics
