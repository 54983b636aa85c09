"""Lightning tasks: one LightningModule + LightningDataModule per task, built from the composed config.

``build(cfg)`` dispatches on ``cfg.task.type`` (``task.name`` is the data set / sub-task label); a task module exposes ``model`` (the ``nn.Module`` with the attention
sites), ``calibration_forward(batch)``, ``reinitialize()`` and a mutable ``lr`` (set per stage by ``ap.run``).
"""

from __future__ import annotations

from typing import Callable

import hydra.utils
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ap.core.errors import APError


def _build_lm(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """``model.arch``: ``transformer_lm`` (default; the data config's blocks) or ``transformer_xl`` (the same files
    read as ordered streams in segments of ``model.tgt_len``, ``ap.tasks.lm.TransformerXLTask``)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    arch = model.get("arch", "transformer_lm")
    if arch == "transformer_lm":
        dm = instantiate(cfg.data, seed=cfg.seed)
        module = instantiate(cfg.task.module, model=model, vocab_size=dm.vocab_size, _convert_="all")  # plain hparams
        return dm, module
    if arch != "transformer_xl":
        raise APError(f"unknown language model model.arch={arch!r}; use transformer_lm or transformer_xl")
    from ap.tasks.lm import LMDataModule, LMStreamDataModule

    data = OmegaConf.to_container(cfg.data, resolve=True)
    if not issubclass(hydra.utils.get_class(data.pop("_target_")), LMDataModule):
        raise APError(f"model=transformer_xl needs a language-modelling data config (data=lm_sample|wikitext103|...)")
    data["eval_batch_size"] = model.pop("eval_streams", data["eval_batch_size"])  # streams, not blocks, per batch
    dm = LMStreamDataModule(tgt_len=model["tgt_len"], seed=cfg.seed, **data)
    eval_memory = model.pop("eval_memory", True)
    module_cfg = OmegaConf.merge(cfg.task.module, {"_target_": "ap.tasks.lm.TransformerXLTask"})
    module = instantiate(module_cfg, model=model, vocab_size=dm.vocab_size, eval_memory=eval_memory, _convert_="all")
    return dm, module


def _build_glue(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    dm = instantiate(cfg.data, task=cfg.task.name, tokenizer=cfg.model.name_or_path, seed=cfg.seed)
    module = instantiate(cfg.task.module, name_or_path=cfg.model.name_or_path, task=cfg.task.name,
                         max_seq_len=cfg.data.max_seq_len, backend=cfg.model.backend, _convert_="all")
    return dm, module


def _build_wmt(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Translation with fairseq, imported only here (after the config is composed; see ap.models.fairseq_mt)."""
    from ap.tasks.translation import TranslationDataModule

    dm = instantiate(cfg.data, seed=cfg.seed)
    if not isinstance(dm, TranslationDataModule):
        raise APError(f"task=wmt needs a translation data config (data=wmt_sample|wmt14_en_de|...), got {cfg.data._target_}")
    dm.setup()  # the model needs the dictionaries
    m = cfg.model
    module = instantiate(cfg.task.module, fairseq_task=dm.task, arch=m.arch, args=m.args, checkpoint=m.checkpoint,
                         checkpoint_trusted=m.get("checkpoint_trusted", False),
                         max_source_positions=cfg.data.max_source_positions,
                         max_target_positions=cfg.data.max_target_positions, backend=m.backend,
                         post_process=cfg.data.post_process, target_lang=cfg.data.target_lang, _convert_="all")
    return dm, module


def _build_clm(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """A pretrained causal LM on a WikiText-format folder (any ``data=`` with a ``dir``), tokenized by the model."""
    from ap.tasks.clm import CLMDataModule, resolve_causal_lm

    resolve_causal_lm(cfg.model.name_or_path)  # a missing folder: one line naming the prepare command
    data = OmegaConf.to_container(cfg.task.data, resolve=True)
    dm = CLMDataModule(dir=cfg.data.dir, tokenizer=cfg.model.name_or_path, name=cfg.data.get("name") or "",
                       missing_hint=cfg.data.get("missing_hint") or "", seed=cfg.seed, **data)
    module = instantiate(cfg.task.module, name_or_path=cfg.model.name_or_path, max_seq_len=data["seq_len"],
                         backend=cfg.model.backend, _convert_="all")
    return dm, module


BUILDERS: dict[str, Callable[[DictConfig], tuple[pl.LightningDataModule, pl.LightningModule]]] = {
    "lm": _build_lm, "glue": _build_glue, "wmt": _build_wmt, "clm": _build_clm}


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    if cfg.task.type not in BUILDERS:
        raise APError(f"unknown task type {cfg.task.type!r}; available: {sorted(BUILDERS)}")
    return BUILDERS[cfg.task.type](cfg)
