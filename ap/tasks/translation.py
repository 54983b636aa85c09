"""Translation with fairseq Transformers: fairseq owns model, data, loss and beam search; Lightning owns the loop.

- Data: a fairseq ``data-bin`` (``fairseq-preprocess`` output) read as ``LanguagePairDataset`` (source left-padded,
  batches by token count); raw subword text is binarized on first use (``ap.data.translation.ensure_data_bin``).
- Model: ``TransformerModel`` by architecture name (``model.arch``), or a user's fairseq checkpoint
  (``model.checkpoint``); every attention is an AP site (``ap.models.fairseq_mt``).
- Loss: fairseq's label-smoothed cross-entropy per target token; optimiser Adam with fairseq's inverse-sqrt warm-up.
- Metrics: ``{val,test}/loss`` (label-smoothed), ``/nll``, ``/ppl`` (token-weighted over the split) and ``/bleu`` of the
  beam-search output (computed in evaluation runs, not in the validations inside ``fit``), as papers report it
  (``bleu``): ``sacrebleu`` = sacreBLEU's own tokenization on detokenized hypotheses against raw references (the
  split's references from the data, or ``reference_files``; ``detokenize=moses`` undoes Moses tokenization first),
  with its signature in results.json; ``tokenized`` = BLEU on the data's own tokens with hyphenated compounds split
  (fairseq's WMT14 en-de convention, ``compound_split_bleu.sh``: what Vaswani et al. and the AP paper report).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from ap.core.errors import APError
from ap.data.translation import ensure_data_bin
from ap.models import fairseq_mt

log = logging.getLogger(__name__)
BLEU_MODES = ("sacrebleu", "tokenized")


def compound_split(line: str) -> str:
    """``a-b`` → ``a ##AT##-##AT## b`` (fairseq's scripts/compound_split_bleu.sh, non-overlapping like its perl)."""
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)


def corpus_bleu(hyps: list[str], refs: list[str], mode: str = "sacrebleu") -> tuple[float, str]:
    """``(BLEU, sacreBLEU signature)`` of ``hyps`` against one reference each: ``sacrebleu`` (its 13a tokenization of
    detokenized text) or ``tokenized`` (the given tokens, compound-split, no further tokenization)."""
    import sacrebleu

    if mode not in BLEU_MODES:
        raise APError(f"task.module.bleu={mode!r}: use one of {BLEU_MODES}")
    if mode == "tokenized":
        metric = sacrebleu.BLEU(tokenize="none", force=True)
        hyps, refs = [compound_split(h) for h in hyps], [compound_split(r) for r in refs]
    else:
        metric = sacrebleu.BLEU()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())
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
        self.missing_hint = missing_hint or "see README 'Translation' for preparing a data-bin"
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


class TranslationTask(pl.LightningModule):
    """A fairseq encoder-decoder Transformer trained with label smoothing and evaluated with beam search + BLEU."""

    def __init__(self, fairseq_task: Any, arch: str = "transformer", args: Optional[dict[str, Any]] = None,
                 checkpoint: Optional[str] = None, checkpoint_trusted: bool = False, max_source_positions: int = 256,
                 max_target_positions: int = 256,
                 backend: str = "sdpa", post_process: str = "sentencepiece", label_smoothing: float = 0.1,
                 lr: float = 1e-3, warmup_updates: int = 4000, warmup_init_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.98), weight_decay: float = 0.0, beam: int = 5,
                 lenpen: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10, bleu: str = "sacrebleu",
                 detokenize: str = "none", reference_files: Optional[dict[str, str]] = None,
                 target_lang: str = "en") -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["fairseq_task"])
        if bleu not in BLEU_MODES:
            raise APError(f"task.module.bleu={bleu!r}: use one of {BLEU_MODES}")
        if detokenize not in ("none", "moses"):
            raise APError(f"task.module.detokenize={detokenize!r}: use none or moses")
        self.bleu_info: dict[str, Any] = {}  # per split: mode and sacreBLEU signature (results.json "bleu")
        self.fairseq_task = fairseq_task
        self.src_dict, self.tgt_dict = fairseq_task.source_dictionary, fairseq_task.target_dictionary
        positions = {"max_source_positions": max_source_positions, "max_target_positions": max_target_positions}
        if checkpoint:
            self.model, self.args = fairseq_mt.load_checkpoint(checkpoint, fairseq_task, trusted=checkpoint_trusted)
            self.pretrained = True  # run.py skips dense training
            for side, wanted in (("source", max_source_positions), ("target", max_target_positions)):
                has = getattr(self.args, f"max_{side}_positions")
                if wanted > has:
                    raise APError(f"data.max_{side}_positions={wanted} exceeds the checkpoint's max_{side}_positions="
                                  f"{has}; set data.max_{side}_positions<={has}")
        else:
            self.args = fairseq_mt.transformer_args(arch, {**positions, **(args or {})})
            self.model = fairseq_mt.build_transformer(self.args, fairseq_task)
            self.pretrained = False
        self.max_target = max_target_positions
        self.kinds = fairseq_mt.attach_sites(self.model, max_source_positions, max_target_positions, backend=backend)
        self.lr = lr
        self._sums: dict[str, float] = {}
        self._text: dict[int, tuple[str, str]] = {}

    # --- model -------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Tensor:
        """Log-probabilities ``(B, T, V)`` of the target tokens under teacher forcing."""
        net_output = self.model(**batch["net_input"])
        return self.model.get_normalized_probs(net_output, log_probs=True)

    def calibration_forward(self, batch: Batch) -> None:
        self.model(**batch["net_input"])

    def reinitialize(self) -> None:
        """Fresh random weights of the same architecture (the paper's retrain-from-scratch recipe); masks stay."""
        fresh = fairseq_mt.build_transformer(self.args, self.fairseq_task)
        self.model.load_state_dict(fresh.state_dict())

    def _losses(self, batch: Batch) -> tuple[Tensor, Tensor, int]:
        """Summed label-smoothed loss and NLL over real target tokens, and their count."""
        from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

        lprobs = self(batch)  # (B, T, V)
        loss, nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), batch["target"].view(-1),
                                            self.hparams.label_smoothing, ignore_index=self.tgt_dict.pad())
        return loss, nll, int(batch["ntokens"])

    # --- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, nll, ntokens = self._losses(batch)
        self.log("train/loss", loss / ntokens, prog_bar=True, batch_size=batch["nsentences"])
        self.log("train/nll", nll / ntokens, batch_size=batch["nsentences"])
        return loss / ntokens

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, betas=tuple(self.hparams.betas), eps=1e-8,
                               weight_decay=self.hparams.weight_decay)
        warmup, init = max(1, self.hparams.warmup_updates), self.hparams.warmup_init_lr

        def inverse_sqrt(step: int) -> float:  # fairseq's inverse_sqrt: linear warm-up, then lr * sqrt(warmup / step)
            step += 1
            if step < warmup:
                return (init + (self.lr - init) * step / warmup) / self.lr
            return math.sqrt(warmup / step)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation --------------------------------------------------------------------------------------------
    def _bleu_wanted(self) -> bool:
        return self.trainer.state.fn != TrainerFn.FITTING  # beam search only in evaluation runs, not inside fit

    def _eval_start(self) -> None:
        self._sums = {"loss": 0.0, "nll": 0.0, "tokens": 0}
        self._text = {}

    def _eval_step(self, batch: Batch) -> None:
        loss, nll, ntokens = self._losses(batch)
        self._sums["loss"] += float(loss)
        self._sums["nll"] += float(nll)
        self._sums["tokens"] += ntokens
        if self._bleu_wanted():
            for sid, hyp, ref in self.translate(batch):
                self._text[sid] = (hyp, ref)

    def _eval_end(self, split: str, dataset_size: int) -> None:
        sums = self._sums
        if self.trainer.world_size > 1:  # each rank evaluated its share of the batches
            t = self.all_gather(torch.tensor([sums["loss"], sums["nll"], sums["tokens"]], dtype=torch.float64,
                                             device=self.device))
            sums = dict(zip(("loss", "nll", "tokens"), t.reshape(-1, 3).sum(0).tolist()))
            if self._bleu_wanted():
                shares: list[Any] = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(shares, self._text)
                self._text = {k: v for share in shares for k, v in share.items()}
        tokens = max(1.0, float(sums["tokens"]))
        sync = self.trainer.world_size > 1  # values are already the same on every rank (gathered above)
        self.log(f"{split}/loss", sums["loss"] / tokens, prog_bar=True, sync_dist=sync)
        self.log(f"{split}/nll", sums["nll"] / tokens, sync_dist=sync)
        self.log(f"{split}/ppl", math.exp(min(50.0, sums["nll"] / tokens)), sync_dist=sync)
        if self._bleu_wanted():
            self.log(f"{split}/bleu", self.bleu(dataset_size, split), prog_bar=True, sync_dist=sync)

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val", len(self.fairseq_task.dataset("valid")))

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", len(self.fairseq_task.dataset("test")))

    def generator(self) -> Any:
        from fairseq.sequence_generator import SequenceGenerator

        h = self.hparams
        return SequenceGenerator([self.model], self.tgt_dict, beam_size=h.beam, len_penalty=h.lenpen,
                                 max_len_a=h.max_len_a, max_len_b=h.max_len_b,
                                 max_len=self.max_target - 2)  # + BOS/EOS steps stay inside the masks

    @torch.no_grad()
    def translate(self, batch: Batch) -> list[tuple[int, str, str]]:
        """Beam search on ``batch``: ``(sentence id, detokenized hypothesis, detokenized reference)`` per sentence."""
        from fairseq import utils

        was_training = self.model.training
        self.model.eval()
        hypos = self.generator().generate([self.model], batch)
        self.model.train(was_training)
        out = []
        for i, sid in enumerate(batch["id"].tolist()):
            ref = utils.strip_pad(batch["target"][i], self.tgt_dict.pad())
            hyp = hypos[i][0]["tokens"]
            out.append((sid, self.tgt_dict.string(hyp, self.hparams.post_process),
                        self.tgt_dict.string(ref, self.hparams.post_process, escape_unk=True)))
        return out

    def bleu(self, dataset_size: int, split: str) -> float:
        """BLEU over every sentence of the split, as ``task.module.bleu`` says (fails if any sentence got no
        hypothesis); the mode and sacreBLEU signature go to ``bleu_info``."""
        if len(self._text) != dataset_size and not _limited(self.trainer, split):
            raise APError(f"beam search translated {len(self._text)} of {dataset_size} sentences")
        h = self.hparams
        ids = sorted(self._text)
        hyps, refs = [self._text[i][0] for i in ids], [self._text[i][1] for i in ids]
        source = "data"
        if h.bleu == "sacrebleu":
            key = "valid" if split == "val" else split
            file = (h.reference_files or {}).get(key)
            if file:  # raw references: used as they are
                lines = read_references(file, dataset_size, f"task.module.reference_files.{key}")
                refs, source = [lines[i] for i in ids], file
            elif h.detokenize == "moses":  # the data's references are tokenized like the hypotheses
                refs = moses_detokenize(refs, h.target_lang)
            if h.detokenize == "moses":
                hyps = moses_detokenize(hyps, h.target_lang)
        score, signature = corpus_bleu(hyps, refs, h.bleu)
        self.bleu_info[split] = {"mode": h.bleu, "signature": signature, "references": source,
                                 "detokenize": h.detokenize}
        return score


def _limited(trainer: pl.Trainer, split: str) -> bool:
    """Is evaluation of ``split`` capped (``limit_val_batches``/``limit_test_batches``), so a partial split is expected?"""
    value = getattr(trainer, "limit_test_batches" if split == "test" else "limit_val_batches", 1.0)
    return isinstance(value, int) or (isinstance(value, float) and value < 1.0)  # int = batches, float = fraction


def moses_detokenize(lines: list[str], lang: str) -> list[str]:
    """Undo Moses tokenization (sacremoses), e.g. for BPE'd WMT data-bins, before sacreBLEU."""
    try:
        from sacremoses import MosesDetokenizer
    except ImportError as e:
        raise APError("task.module.detokenize=moses needs sacremoses: pip install sacremoses") from e
    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split()) for line in lines]


def read_references(path: str, n: int, key: str) -> list[str]:
    """The raw reference lines of a split (line ``i`` = sentence id ``i``); one error line if missing or short."""
    file = Path(path)
    if not file.is_file():
        raise APError(f"{key}={path} does not exist: give the raw (untokenized) reference file of the split")
    lines = file.read_text(encoding="utf-8").splitlines()
    if len(lines) != n:
        raise APError(f"{key}={path} has {len(lines)} lines but the split has {n} sentences")
    return lines
