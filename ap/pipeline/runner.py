"""``run_stages``: build the task, then the stages in order; ``write_results``: results.json and the table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ap.callback import AttentionPruning
from ap.config import check, pruning_config, resolved
from ap.core import APError
from ap.report import results_table
from ap.tasks import build

from . import stages
from .cache import StageCache
from .checkpoints import check_user_files
from .state import RunState
from .tracking import log_results_to_wandb

log = logging.getLogger(__name__)


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    """Check the config, build the task and its pruning callback, check the files it names, run every stage."""
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
        log_results_to_wandb(s)
    return results
