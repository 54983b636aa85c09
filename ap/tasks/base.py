"""The contract of a prunable task: what the pipeline and the pruning callback call on every task's LightningModule.

A task subclasses ``PrunableTask`` and writes its model's calibration forward and three evaluation hooks; the
validation and test loops are wired to those hooks here, once. Each task class also builds itself from the composed
config (``build``), so the class named by ``task.module._target_`` decides the data module and the model.
"""

from __future__ import annotations

import abc
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch import Tensor



class PrunableTask(pl.LightningModule, abc.ABC):
    """A LightningModule whose ``model`` holds attention sites.

    ``lr`` is set per stage by the pipeline; ``pretrained = True`` means the dense stage evaluates the model as
    loaded instead of training it. Metrics are logged as ``<split>/<name>`` (``val/ppl``, ``test/bleu``). A task that
    supports ``pruning.reinit=true`` (retrain from scratch with the masks) also defines ``reinitialize()``: fresh
    weights of the same model.
    """

    pretrained = False
    test_split = True  # the data has a labelled test split (GLUE: no; evaluation is validation only)

    @classmethod
    @abc.abstractmethod
    def build(cls, cfg: DictConfig) -> tuple[pl.LightningDataModule, "PrunableTask"]:
        """The data module and the task module of the composed config."""

    @abc.abstractmethod
    def calibration_forward(self, batch: Any) -> None:
        """Run the model on one calibration batch (eval mode and no_grad are the callback's)."""

    # --- evaluation: a task writes these three; the loops below call them ------------------------------------
    @abc.abstractmethod
    def eval_start(self, split: str) -> None:
        """Reset the running sums of an evaluation of ``split`` (``val`` or ``test``)."""

    @abc.abstractmethod
    def eval_step(self, batch: Any, split: str) -> None:
        """Add one batch to the running sums."""

    @abc.abstractmethod
    def eval_end(self, split: str) -> None:
        """Reduce the sums over ranks and log ``<split>/<metric>``."""

    def reduce_sum(self, sums: Tensor) -> Tensor:
        """``sums`` added over every DDP rank (each rank evaluated its own share of the split)."""
        return self.trainer.strategy.reduce(sums, reduce_op="sum")

    def on_validation_epoch_start(self) -> None:
        self.eval_start("val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.eval_end("val")

    def on_test_epoch_start(self) -> None:
        self.eval_start("test")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.eval_end("test")
