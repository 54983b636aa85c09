"""The translation task (fairseq Transformers): fairseq owns model, data, loss and beam search; Lightning owns the loop.

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

import math
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from ap.core.errors import APError
from ap.models import fairseq_mt

from .. import optim
from ..base import PrunableTask
from .bleu import BLEU_MODES, corpus_bleu, moses_detokenize, read_references
from .data import Batch, TranslationDataModule



class TranslationTask(PrunableTask):
    """A fairseq encoder-decoder Transformer trained with label smoothing and evaluated with beam search + BLEU."""

    def __init__(self, fairseq_task: Any, arch: str = "transformer", args: Optional[dict[str, Any]] = None,
                 checkpoint: Optional[str] = None, checkpoint_trusted: bool = False, max_source_positions: int = 256,
                 max_target_positions: int = 256,
                 backend: str = "auto", post_process: str = "sentencepiece", label_smoothing: float = 0.1,
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

    @classmethod
    def build(cls, cfg: DictConfig) -> tuple[pl.LightningDataModule, PrunableTask]:
        """fairseq is imported here, after the config is composed (``ap.models.fairseq_mt``)."""
        dm = instantiate(cfg.data, seed=cfg.seed)
        if not isinstance(dm, TranslationDataModule):
            raise APError(f"task=wmt needs a translation data config (data=wmt_sample|wmt14_en_de|...), "
                          f"got {cfg.data._target_}")
        dm.setup()  # the model needs the dictionaries
        m = cfg.model
        module = instantiate(cfg.task.module, fairseq_task=dm.task, arch=m.arch, args=m.args, checkpoint=m.checkpoint,
                             checkpoint_trusted=m.get("checkpoint_trusted", False),
                             max_source_positions=cfg.data.max_source_positions,
                             max_target_positions=cfg.data.max_target_positions, backend=m.backend,
                             post_process=cfg.data.post_process, target_lang=cfg.data.target_lang, _convert_="all")
        return dm, module

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
        h = self.hparams
        opt = optim.adam(self.parameters(), lr=self.lr, betas=h.betas, weight_decay=h.weight_decay)
        return optim.per_step(opt, optim.inverse_sqrt(h.warmup_updates, h.warmup_init_lr, self.lr))

    # --- evaluation --------------------------------------------------------------------------------------------
    def _bleu_wanted(self) -> bool:
        return self.trainer.state.fn != TrainerFn.FITTING  # beam search only in evaluation runs, not inside fit

    def eval_start(self, split: str) -> None:
        self._sums = {"loss": 0.0, "nll": 0.0, "tokens": 0}
        self._text = {}

    def eval_step(self, batch: Batch, split: str) -> None:
        loss, nll, ntokens = self._losses(batch)
        self._sums["loss"] += float(loss)
        self._sums["nll"] += float(nll)
        self._sums["tokens"] += ntokens
        if self._bleu_wanted():
            for sid, hyp, ref in self.translate(batch):
                self._text[sid] = (hyp, ref)

    def eval_end(self, split: str) -> None:
        dataset_size = len(self.fairseq_task.dataset("valid" if split == "val" else "test"))
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
    """Is evaluation of ``split`` capped (``limit_val_batches``/``limit_test_batches``), so a partial split is
    expected?"""
    value = getattr(trainer, "limit_test_batches" if split == "test" else "limit_val_batches", 1.0)
    return isinstance(value, int) or (isinstance(value, float) and value < 1.0)  # int = batches, float = fraction
