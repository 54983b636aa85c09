"""Lightning tasks: one ``PrunableTask`` (``ap/tasks/base.py``) and one LightningDataModule per task.

``build(cfg)`` asks the task class named by ``task.module._target_`` to build itself (``PrunableTask.build``): the
language model (``ap.tasks.lm``), GLUE (``ap.tasks.glue``), translation with fairseq (``ap.tasks.translation``) and
pretrained causal LMs (``ap.tasks.clm``). A new task is a ``PrunableTask`` subclass and a ``conf/task/`` file naming
it; ``task.type`` is its label in results.
"""

from __future__ import annotations

import hydra.utils
import pytorch_lightning as pl
from omegaconf import DictConfig

from ap.core.errors import APError

from .base import PrunableTask


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, PrunableTask]:
    """The data module and the task module of the composed config."""
    target = cfg.task.module.get("_target_")
    try:
        task_cls = hydra.utils.get_class(target)
    except Exception as e:  # (Hydra raises ImportError or ValueError with its own text)
        raise APError(f"task.module._target_={target!r} is not a class that can be imported: {e}") from None
    if not issubclass(task_cls, PrunableTask):
        raise APError(f"task.module._target_={target} is not a PrunableTask (ap/tasks/base.py): it needs build(), "
                      f"calibration_forward() and the evaluation hooks")
    return task_cls.build(cfg)
