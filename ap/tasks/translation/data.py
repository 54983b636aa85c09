"""Translation data: a fairseq ``data-bin`` (``fairseq-preprocess`` output) read as ``LanguagePairDataset`` (source
left-padded, batches by token count); raw subword text is binarized on first use (``ap.data.translation``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from ap.core.errors import APError
from ap.data.translation import ensure_data_bin
from ap.models import fairseq_mt

log = logging.getLogger(__name__)

Batch = dict[str, Any]  # fairseq's collated sample: id, nsentences, ntokens, net_input{src_tokens, ...}, target


class Batches(Sampler[list[int]]):
    """fairseq's token-budget batches (lists of indices); ``shuffle``: a new seeded order at every pass.

    ``rank``/``world``: this process takes every ``world``-th batch (training under DDP: the trainer's rank; with
    ``drop_uneven`` every rank gets the same number of batches so no rank waits on another in a gradient sync).
    """

    def __init__(self, batches: list[Any], shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 drop_uneven: bool = False) -> None:
        self.batches, self.shuffle, self.seed = [list(b) for b in batches], shuffle, seed
        self.rank, self.world, self.drop_uneven = rank, world, drop_uneven
        self.epoch = 0  # advanced by every pass (Lightning calls set_epoch only on samplers, not batch samplers)

    def _order(self, epoch: int) -> list[int]:
        n = len(self.batches)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        if self.drop_uneven:
            order = order[: n - n % self.world]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(self.epoch)
        self.epoch += 1
        return (self.batches[i] for i in order)

    def __len__(self) -> int:
        n = len(self.batches) - (len(self.batches) % self.world if self.drop_uneven else 0)
        return len(range(self.rank, n, self.world))


class TranslationDataModule(pl.LightningDataModule):
    """A fairseq ``data-bin`` (or raw subword text, binarized on first use) for ``source_lang`` → ``target_lang``."""

    def __init__(self, dir: str, source_lang: str = "de", target_lang: str = "en", max_tokens: int = 4096,
                 eval_max_tokens: Optional[int] = None, max_source_positions: int = 256,
                 max_target_positions: int = 256, post_process: str = "sentencepiece", joined_dictionary: bool = True,
                 num_workers: int = 0, seed: int = 0, missing_hint: str = "", name: str = "") -> None:
        super().__init__()
        self.name = name or Path(dir).name
        self.dir, self.src, self.tgt = Path(dir), source_lang, target_lang
        self.max_tokens, self.eval_max_tokens = max_tokens, eval_max_tokens or max_tokens
        self.max_positions = (max_source_positions, max_target_positions)
        self.post_process, self.joined, self.num_workers, self.seed = post_process, joined_dictionary, num_workers, seed
        self.missing_hint = missing_hint or "see docs/translation.md for preparing a data-bin"
        self.task: Any = None  # fairseq TranslationTask: dictionaries + datasets

    def setup(self, stage: Optional[str] = None) -> None:
        if self.task is not None:
            return
        fairseq_mt.import_fairseq()
        from fairseq.tasks.translation import TranslationConfig, TranslationTask

        path = ensure_data_bin(self.dir, self.src, self.tgt, self.missing_hint, joined=self.joined)
        cfg = TranslationConfig(data=str(path), source_lang=self.src, target_lang=self.tgt, left_pad_source=True,
                                left_pad_target=False, max_source_positions=self.max_positions[0],
                                max_target_positions=self.max_positions[1], dataset_impl=None,  # None = infer
                                train_subset="train", required_seq_len_multiple=1)
        task = TranslationTask.setup_task(cfg)
        for split in ("train", "valid", "test"):
            task.load_dataset(split)
        self.task = task

    def _batches(self, split: str, max_tokens: int, drop_long: bool, rank: int = 0, world: int = 1) -> list[Any]:
        """Token-budget batches of ``split`` (of every ``world``-th sentence from ``rank``, in length order)."""
        from fairseq.data import data_utils

        ds = self.task.dataset(split)
        with data_utils.numpy_seed(self.seed):  # ordered_indices breaks length ties with numpy's global RNG
            indices = ds.ordered_indices()
        indices, ignored = ds.filter_indices_by_size(indices, self.max_positions)
        if len(ignored) and not drop_long:
            raise APError(f"{len(ignored)} {split} sentence pair(s) exceed data.max_source_positions/"
                          f"max_target_positions={self.max_positions}; raise them (data.max_source_positions=...)")
        if len(ignored):
            log.warning(f"{len(ignored)} {split} pairs longer than {self.max_positions} tokens are skipped")
        return ds.batch_by_size(indices[rank::world], max_tokens=max_tokens, required_batch_size_multiple=1)

    def _loader(self, split: str, shuffle: bool, max_tokens: int, drop_long: bool, shard: str = "") -> DataLoader:
        """Batches of ``split``. Under DDP (the trainer must not inject a sampler: ``use_distributed_sampler=false``,
        set by conf/task/wmt.yaml) ``shard="batches"`` gives each rank every ``world``-th batch, the same number on
        every rank (training); ``shard="sentences"`` every ``world``-th sentence, none dropped (evaluation)."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if shard and self.trainer else (0, 1)
        if shard == "sentences":
            batches = self._batches(split, max_tokens, drop_long, rank, world)
            sampler = Batches(batches, shuffle=shuffle, seed=self.seed)
        else:
            sampler = Batches(self._batches(split, max_tokens, drop_long), shuffle=shuffle, seed=self.seed,
                              rank=rank, world=world, drop_uneven=True)
        return DataLoader(self.task.dataset(split), batch_sampler=sampler, collate_fn=self.task.dataset(split).collater,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.max_tokens, drop_long=True, shard="batches")

    def calibration_dataloader(self) -> DataLoader:
        """Every train batch, in one fixed shuffled order (not sorted by length: a ``calibration_batches`` cap must
        not see only the shortest sentences). Not sharded: the callback shards it by batch index under DDP."""
        return self._loader("train", True, self.eval_max_tokens, drop_long=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False, self.eval_max_tokens, drop_long=False, shard="sentences")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_max_tokens, drop_long=False, shard="sentences")
