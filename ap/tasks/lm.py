"""Language modelling: WikiText-format DataModules and LightningModules around ``TransformerLM`` (independent blocks)
and ``TransformerXL`` (``model=transformer_xl``: ordered streams read in segments, with memory).

Metrics: ``train/loss``, ``val/loss``, ``val/ppl``, ``test/loss``, ``test/ppl`` (token-weighted over the whole split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import hydra.utils
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ap.core.errors import APError
from ap.data import loaders, wikitext
from ap.models.transformer_xl import XLOutput

from . import optim
from .base import PrunableTask


class LMDataModule(pl.LightningDataModule):
    """``wiki.{train,valid,test}.tokens`` from ``dir`` as contiguous blocks of ``block_len`` tokens.

    Under DDP each rank trains on its share of a seeded shuffle and evaluates every ``world``-th block
    (``ap.data.loaders``); calibration reads all training blocks in one ``seed``-shuffled order.
    """

    def __init__(self, dir: str, block_len: int = 128, batch_size: int = 32, eval_batch_size: int = 64,
                 max_vocab: Optional[int] = None, num_workers: int = 0, missing_hint: str = "", name: str = "",
                 seed: int = 0) -> None:
        super().__init__()
        self.dir, self.block_len, self.batch_size, self.eval_batch_size = Path(dir), block_len, batch_size, eval_batch_size
        self.max_vocab, self.num_workers, self.seed = max_vocab, num_workers, seed
        self.name = name or self.dir.name
        self.missing_hint = missing_hint or f"put WikiText-format files in {dir} (see scripts/prepare_data.py)"
        self.vocab: Optional[wikitext.Vocab] = None
        self.ids: dict[str, Tensor] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.vocab is not None:  # already set up (run.py needs the vocabulary before building the model)
            return
        wikitext.check_files(self.dir, self.missing_hint)
        tokens = {s: wikitext.read_tokens(wikitext.split_file(self.dir, s)) for s in wikitext.SPLITS}
        self.vocab = wikitext.Vocab(tokens["train"], self.max_vocab)
        self.ids = {s: self.vocab.encode(t) for s, t in tokens.items()}

    @property
    def vocab_size(self) -> int:
        self.setup()
        return len(self.vocab)

    def _blocks(self, split: str) -> wikitext.LMBlocks:
        return wikitext.LMBlocks(self.ids[split], self.block_len, keep_last=split != "train")

    def train_dataloader(self) -> DataLoader:
        return loaders.train_loader(self._blocks("train"), self.batch_size, *loaders.rank_world(self), seed=self.seed,
                                    num_workers=self.num_workers)

    def calibration_dataloader(self) -> DataLoader:
        """Every train block in one fixed shuffled order (a ``calibration_batches`` cap samples the whole split)."""
        return loaders.calibration_loader(self._blocks("train"), self.eval_batch_size, seed=self.seed,
                                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return loaders.eval_loader(self._blocks("valid"), self.eval_batch_size, *loaders.rank_world(self),
                                   num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return loaders.eval_loader(self._blocks("test"), self.eval_batch_size, *loaders.rank_world(self),
                                   num_workers=self.num_workers)


class LanguageModelTask(PrunableTask):
    """Next-token prediction with a causal ``TransformerLM``; AdamW with linear warm-up and cosine decay."""

    def __init__(self, model: dict[str, Any], vocab_size: int, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model, vocab_size)
        self.lr = lr
        self._eval_sums = torch.zeros(2, dtype=torch.float64)  # (sum of token NLL, tokens) of the running eval epoch

    @classmethod
    def build(cls, cfg: DictConfig) -> tuple[pl.LightningDataModule, PrunableTask]:
        """The model config's class (``model._target_``) decides how the data is read: independent blocks of
        ``data.block_len`` tokens, or, for a model with memory (``TransformerXLConfig``), ordered streams read in
        segments of ``model.tgt_len`` by a ``TransformerXLTask``."""
        model = OmegaConf.to_container(cfg.model, resolve=True)
        if not issubclass(hydra.utils.get_class(cfg.data._target_), LMDataModule):
            raise APError(f"task=lm needs a language-modelling data config (data=lm_sample|wikitext103|...), "
                          f"got {cfg.data._target_}")
        hparams = OmegaConf.to_container(cfg.task.module, resolve=True)
        module_cls = hydra.utils.get_class(hparams.pop("_target_"))  # (not instantiate: it would build the model
        if not hydra.utils.get_class(model["_target_"]).memory:      # config the task receives as hparams)
            dm = instantiate(cfg.data, seed=cfg.seed)
            return dm, module_cls(model=model, vocab_size=dm.vocab_size, **hparams)
        data = OmegaConf.to_container(cfg.data, resolve=True)
        data.pop("_target_")
        data["eval_batch_size"] = model.pop("eval_streams", data["eval_batch_size"])  # streams, not blocks, per batch
        dm = LMStreamDataModule(tgt_len=model["tgt_len"], seed=cfg.seed, **data)
        eval_memory = model.pop("eval_memory", True)
        return dm, TransformerXLTask(model=model, vocab_size=dm.vocab_size, eval_memory=eval_memory, **hparams)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[0]

    def calibration_forward(self, batch: tuple[Tensor, Tensor]) -> None:
        self.model(batch[0])

    def reinitialize(self) -> None:
        self.model.reset_parameters()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, T), (B, T)
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def eval_start(self, split: str) -> None:
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        n = (y != -100).sum()
        self._eval_sums += torch.stack([loss.detach() * n, n.to(loss.dtype)]).double()  # (nll sum, tokens)

    def eval_end(self, split: str) -> None:
        nll_sum, n = self.reduce_sum(self._eval_sums)  # token-weighted over all ranks
        nll = (nll_sum / n).float()
        self.log(f"{split}/loss", nll, sync_dist=False)  # already reduced
        self.log(f"{split}/ppl", torch.exp(nll), prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        opt = optim.adamw(optim.decay_groups(self, h.weight_decay), lr=self.lr, betas=(0.9, 0.98))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return optim.per_step(opt, optim.warmup_cosine(h.warmup_steps, total, h.min_lr_ratio))


def build_model(model: dict[str, Any], vocab_size: int) -> nn.Module:
    """The model its config names (``_target_``: a model config class with ``build()``), for ``vocab_size`` tokens."""
    fields = {k: v for k, v in model.items() if k != "_target_"}
    return hydra.utils.get_class(model["_target_"])(**fields, vocab_size=vocab_size).build()


class LMStreams(Dataset):
    """Transformer-XL's ordered iterator over one split: the token stream cut into ``rows`` contiguous streams (one per
    batch row; the tail that does not fill every row is dropped), read in consecutive segments of ``tgt_len`` tokens.
    Item ``s`` is ``(x (r, ≤T), y (r, ≤T), s)``, ``y`` the next tokens, ``r = rows / world`` this rank's streams (the
    last segment may be shorter)."""

    def __init__(self, ids: Tensor, rows: int, tgt_len: int, rank: int = 0, world: int = 1) -> None:
        n = (len(ids) - 1) // rows  # tokens per stream
        if n < 1 or rows % world:
            raise APError(f"{len(ids):,} tokens cannot make {rows} streams over {world} ranks: use a batch size that "
                          f"is a multiple of the number of devices and at most the number of tokens")
        self.x = ids[: n * rows].view(rows, n)[rank::world]  # (r, n)
        self.y = ids[1: n * rows + 1].view(rows, n)[rank::world]  # (r, n)
        self.tgt_len = tgt_len

    def __len__(self) -> int:
        return -(-self.x.shape[1] // self.tgt_len)

    def __getitem__(self, s: int) -> tuple[Tensor, Tensor, int]:
        seg = slice(s * self.tgt_len, (s + 1) * self.tgt_len)
        return self.x[:, seg], self.y[:, seg], s


class LMStreamDataModule(LMDataModule):
    """The WikiText-format splits as Transformer-XL reads them: ``batch_size`` (training) or ``eval_batch_size``
    (evaluation, calibration) contiguous streams in consecutive segments of ``tgt_len`` tokens, always in order, so a
    model with memory carries real context from one batch to the next. Under DDP each rank reads its own streams
    (``calibration_shards_itself``: the callback gives every rank all of its own calibration batches)."""

    calibration_shards_itself = True

    def __init__(self, tgt_len: int, block_len: Optional[int] = None, **kw: Any) -> None:
        super().__init__(block_len=tgt_len, **kw)  # (block_len of the data config is the plain LM's; unused here)
        self.tgt_len = tgt_len

    def _streams(self, split: str, rows: int) -> DataLoader:
        ds = LMStreams(self.ids[split], rows, self.tgt_len, *loaders.rank_world(self))
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers)  # items are batches

    def train_dataloader(self) -> DataLoader:
        return self._streams("train", self.batch_size)

    def calibration_dataloader(self) -> DataLoader:
        """The train streams in order with memory (a ``calibration_batches`` cap reads the first segments)."""
        return self._streams("train", self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._streams("valid", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._streams("test", self.eval_batch_size)


class TransformerXLTask(LanguageModelTask):
    """Language modelling with ``TransformerXL``. Batches are consecutive segments ``(x, y, s)`` of the same streams;
    training, evaluation and calibration each carry their own memory from one segment to the next and start empty at
    a stream's first segment (``s == 0``). ``eval_memory=false`` evaluates every segment without memory (the same
    model without recurrence at test time)."""

    def __init__(self, model: dict[str, Any], vocab_size: int, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, eval_memory: bool = True) -> None:
        super().__init__(model, vocab_size, lr, weight_decay, warmup_steps, min_lr_ratio)
        self.eval_memory = eval_memory
        self._mems: dict[str, Optional[list[Tensor]]] = {}

    def _forward(self, batch: tuple[Tensor, Tensor, int], loop: str) -> XLOutput:
        x, y, s = batch  # (B, T), (B, T), segment index
        if int(s) == 0 or (loop == "eval" and not self.eval_memory):
            self._mems[loop] = None  # a stream starts: empty memory
        out = self.model(x, y, mems=self._mems.get(loop))
        self._mems[loop] = out.mems
        return out

    def calibration_forward(self, batch: tuple[Tensor, Tensor, int]) -> None:
        self._forward(batch, "calibrate")

    def training_step(self, batch: tuple[Tensor, Tensor, int], batch_idx: int) -> Tensor:
        loss = self._forward(batch, "train").loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def eval_step(self, batch: tuple[Tensor, Tensor, int], split: str) -> None:
        out = self._forward(batch, "eval")
        n = (batch[1] != -100).sum()
        self._eval_sums += torch.stack([out.nll.sum().detach(), n.to(out.nll.dtype)]).double()  # (nll sum, tokens)
