"""The experiment pipeline behind ``run.py`` (DESIGN §1), one function per stage in ``ap.stages``:

    dense ─► evaluate dense ─► [dense+ft baseline] ─► calibrate ─► threshold ─► evaluate pruned (no fine-tuning)
          ─► finetune with masks ─► evaluate ─► results.json

``pruning=none`` stops after the dense stage. The dense weights, the dense+ft baseline and the calibration statistics
come from the stage cache (``ap.cache``, ``cache.enabled``) when another run made them with the same settings.
``ckpt_path`` resumes the training stage (the fine-tune stage when pruning, with the masks and the metrics of the
stages before it restored from the checkpoint); ``pruning.dense_ckpt`` starts from saved dense weights. With
``pruning.reinit=true`` (train the pruned model from scratch) the baseline is the dense model itself, trained for
``task.dense.max_steps``; otherwise the dense model fine-tuned without masks for the same steps (``dense+ft``).
results.json says which (``baseline``).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ap import stages
from ap.cache import StageCache
from ap.callback import AttentionPruning
from ap.config import PruningConfig, check, pruning_config, resolved
from ap.core import APError, AttentionStats, MaskSet
from ap.report import results_table
from ap.stages import (CARRIED, RunState, evaluate, load_checkpoint, make_trainer,  # noqa: F401 (re-exported)
                       stage_loggers)
from ap.tasks import build

log = logging.getLogger(__name__)
# One Trainer per stage would repeat Lightning's banner (accelerator, tips) four times; keep its warnings.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning 2.6 + torch 2.13


def check_user_files(cfg: DictConfig, pruning: PruningConfig, module: pl.LightningModule,
                     callback: Optional[AttentionPruning]) -> None:
    """Fail before any training if a file the config names cannot be read or was made for another model/config."""
    if pruning.masks_path:
        MaskSet.load(pruning.masks_path).validate(module.model)
    if pruning.stats_path:
        AttentionStats.load(pruning.stats_path).validate(module.model, source=f"statistics {pruning.stats_path}")
    if cfg.ckpt_path:  # (pruning.dense_ckpt is loaded, and so checked, before any stage runs)
        state = restored_callback_state(load_checkpoint(cfg.ckpt_path, "ckpt_path", module))
        if callback is None and state:
            raise APError(f"ckpt_path={cfg.ckpt_path} is a fine-tune checkpoint of a pruning run "
                          f"({state['masks']['meta'].get('policy')}); resume it with its pruning config")
        if callback is not None:
            if not state:
                raise APError(f"ckpt_path={cfg.ckpt_path} holds no AP masks: resume a pruning run from its "
                              f"checkpoints/finetune/last.ckpt, or start from dense weights with pruning.dense_ckpt")
            callback.load_state_dict(state)  # checks the masks' pruning settings against this run's
            callback.masks.validate(module.model)


def restored_callback_state(ckpt: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``AttentionPruning`` state saved in a Lightning checkpoint (None if it has none)."""
    return next((s for k, s in (ckpt.get("callbacks") or {}).items()
                 if k.startswith(AttentionPruning.__qualname__) and s), None)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage the config asks for; returns (and writes) the results dict.

    The wandb run (``logger=wandb``) is finished at the end of the job, so the next job of a local multirun starts its
    own run instead of logging into this one.
    """
    try:
        results = run_stages(cfg)
    except BaseException:
        stages.finish_wandb(exit_code=1)  # the stage that failed shows as failed
        raise
    stages.finish_wandb()
    return results


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    check(cfg)
    pruning = pruning_config(cfg)
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    if (out / "results.json").exists():
        raise APError(f"{out} already holds results.json; choose a new output directory (hydra.run.dir=...)")
    dm, module = build(cfg)
    log.info(f"Built task {cfg.task.type}/{cfg.task.name}: data <{type(dm).__module__}.{type(dm).__qualname__}>, "
             f"module <{type(module).__module__}.{type(module).__qualname__}>")
    callback: Optional[AttentionPruning] = None
    if pruning.enabled:
        callback = AttentionPruning(
            pruning.spec(), calibration_batches=pruning.calibration_batches, reinit=pruning.reinit,
            masks_path=pruning.masks_path, stats_path=pruning.stats_path, output_dir=str(out),
            heatmaps=pruning.heatmaps, config=resolved(cfg.pruning), train_seed=cfg.seed)
    check_user_files(cfg, pruning, module, callback)
    cache = StageCache(Path(cfg.paths.cache_dir) if cfg.cache.enabled else None, out)
    state = RunState(cfg, pruning, dm, module, callback, cache,
                     results={"task": cfg.task.type, "task_name": cfg.task.name, "pruning": pruning.name,
                              "run_dir": str(out)})
    stages.dense(state)
    stages.dense_finetune_baseline(state)
    stages.finetune(state)
    stages.final_evaluate(state)
    return write_results(state)


def write_results(s: RunState) -> dict[str, Any]:
    """results.json (rank zero) and the summary table on stdout."""
    results, callback = s.results, s.callback
    achieved = callback.masks.meta["achieved"] if callback else {"overall": 0.0}
    results.update(sparsity_achieved=achieved["overall"],
                   sparsity_per_kind=callback.masks.meta.get("achieved_kinds", {}) if callback else {},
                   sparsity_per_site={k: v for k, v in achieved.items() if k != "overall"}, timing=s.timing,
                   stages=s.stages, config=resolved(s.cfg))
    if getattr(s.module, "bleu_info", None):  # translation: how BLEU was computed (mode, sacreBLEU signature)
        results["bleu"] = s.module.bleu_info
    # one writer under DDP (ranks a launcher started may have run no trainer: no process group)
    if s.cache.rank == 0 and not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / "results.json").write_text(json.dumps(results, indent=2))
        print(results_table(results))
        print(f"results: {s.out / 'results.json'}")
        stages.log_results_to_wandb(s)
    return results


def cli_main(cfg: DictConfig) -> float | list[float]:
    """``run`` for the command line: user errors become one line on stderr and exit code 2. Returns what Hydra
    sweepers optimise: ``task.optimized_metric``, a final metric (``val/ppl``) or a top-level number of the results
    (``sparsity_achieved``), or a list of them for a multi-objective search (``[val/ppl, sparsity_achieved]``)."""
    try:
        results = run(cfg)
    except APError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    names = cfg.task.optimized_metric or next((k for k in results["metrics"] if k.startswith("val/")), None)
    if OmegaConf.is_list(names):
        return [objective(results, n) for n in names]
    return objective(results, names)


def objective(results: dict[str, Any], name: Optional[str]) -> float:
    value = results["metrics"].get(name, results.get(name)) if name else None
    return float("nan") if value is None else float(value)
