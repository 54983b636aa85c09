"""The experiment pipeline behind ``run.py`` (DESIGN §1):

    dense ─► evaluate dense ─► [dense+ft baseline] ─► calibrate ─► threshold ─► evaluate pruned (no fine-tuning)
          ─► finetune with masks ─► evaluate ─► results.json

``pruning=none`` stops after the dense stage. ``ckpt_path`` resumes the training stage (the fine-tune stage when pruning,
with the masks restored from the checkpoint); ``pruning.dense_ckpt`` starts from saved dense weights.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.model_helpers import is_overridden

from ap.callback import AttentionPruning
from ap.config import PruningConfig, check, pruning_config, resolved
from ap.core import APError, AttentionStats, MaskSet
from ap.report import results_table
from ap.tasks import build

log = logging.getLogger(__name__)
# One Trainer per stage would repeat Lightning's banner (accelerator, tips) four times; keep its warnings.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning 2.6 + torch 2.13


def make_trainer(cfg: DictConfig, stage: str, loggers: list, callbacks: Optional[list] = None,
                 ckpt_dir: Optional[str] = None) -> pl.Trainer:
    """A Trainer from ``cfg.trainer`` with the stage's length (``cfg.task.<stage>``); checkpoints in
    ``<run_dir>/checkpoints/<ckpt_dir or stage>/`` (``last.ckpt`` resumes)."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    callbacks = list(callbacks or [])
    if stage in ("dense", "finetune"):
        spec = cfg.task[stage]
        kwargs.update(max_epochs=spec.max_epochs, max_steps=spec.max_steps)
        callbacks.append(ModelCheckpoint(dirpath=Path(cfg.paths.output_dir) / "checkpoints" / (ckpt_dir or stage),
                                         save_last=True,
                                         save_top_k=0))
    else:  # evaluation only
        kwargs.pop("strategy", None)  # evaluate on one device: every sample exactly once, no sampler padding
        kwargs["devices"] = 1
    return pl.Trainer(logger=loggers or False, callbacks=callbacks, default_root_dir=cfg.paths.output_dir,
                      enable_checkpointing=stage != "evaluate", **kwargs)


def evaluate(cfg: DictConfig, module: pl.LightningModule, dm: pl.LightningDataModule, loggers: list) -> dict[str, float]:
    trainer = make_trainer(cfg, "evaluate", loggers)
    metrics: dict[str, float] = {}
    outputs = trainer.validate(module, dm, verbose=False)
    if is_overridden("test_step", module):  # GLUE test sets have no labels: validation only
        outputs += trainer.test(module, dm, verbose=False)
    for out in outputs:
        metrics.update({k: float(v) for k, v in out.items()})
    return metrics


def check_reused_files(pruning: PruningConfig, module: pl.LightningModule) -> None:
    """Fail before any training if ``masks_path``/``stats_path`` were made for another model."""
    if pruning.masks_path:
        MaskSet.load(pruning.masks_path).validate(module.model)
    if pruning.stats_path:
        AttentionStats.load(pruning.stats_path).validate(module.model, source=f"statistics {pruning.stats_path}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage the config asks for; returns (and writes) the results dict."""
    check(cfg)
    pruning = pruning_config(cfg)
    out = Path(cfg.paths.output_dir)
    for path, what in ((cfg.ckpt_path, "ckpt_path"), (pruning.dense_ckpt, "pruning.dense_ckpt")):
        if path and not Path(path).is_file():
            raise APError(f"{what}={path} does not exist; point it at a .ckpt file (runs save them in checkpoints/)")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    if (out / "results.json").exists():
        raise APError(f"{out} already holds results.json; choose a new output directory (hydra.run.dir=...)")
    log.info(f"Building task {cfg.task.type}/{cfg.task.name}: data <{cfg.data._target_}>, module <{cfg.task.module._target_}>")
    dm, module = build(cfg)
    check_reused_files(pruning, module)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    timing: dict[str, float] = {}
    results: dict[str, Any] = {"task": cfg.task.type, "task_name": cfg.task.name, "pruning": pruning.name,
                               "run_dir": str(out)}
    resume_dense = cfg.ckpt_path if not pruning.enabled else None
    callback: Optional[AttentionPruning] = None

    if not (pruning.enabled and cfg.ckpt_path):  # stage 1: dense (not when resuming the fine-tune stage)
        if getattr(module, "pretrained", False) and not pruning.dense_ckpt:
            log.info("Stage dense: skipped (the model was loaded trained: model.checkpoint)")
        elif pruning.dense_ckpt:
            log.info(f"Loading dense weights from {pruning.dense_ckpt}")
            state = torch.load(pruning.dense_ckpt, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        else:
            t0 = time.perf_counter()
            log.info("Stage dense: training")
            module.lr = cfg.task.dense.lr
            make_trainer(cfg, "dense", loggers).fit(module, dm, ckpt_path=resume_dense)
            timing["dense_s"] = time.perf_counter() - t0
        if pruning.enabled:
            t0 = time.perf_counter()
            results["dense_metrics"] = evaluate(cfg, module, dm, loggers)
            timing["evaluate_dense_s"] = time.perf_counter() - t0

    if pruning.enabled and cfg.dense_finetune_baseline and not cfg.ckpt_path:
        # Equal-compute baseline: the dense model fine-tuned for the same steps without masks, then weights restored.
        t0 = time.perf_counter()
        log.info("Baseline: fine-tuning the dense model without masks (dense_finetune_baseline=true)")
        dense_state = copy.deepcopy(module.state_dict())
        module.lr = cfg.task.finetune.lr
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        make_trainer(cfg, "finetune", loggers, ckpt_dir="finetune_dense").fit(module, dm)
        results["dense_finetuned_metrics"] = evaluate(cfg, module, dm, loggers)
        module.load_state_dict(dense_state)
        timing["dense_finetune_baseline_s"] = time.perf_counter() - t0

    if pruning.enabled:  # stages 2-4: calibrate, threshold, fine-tune (the callback does 2-3 at fit start)
        callback = AttentionPruning(
            sparsity=pruning.target(), scope=pruning.scope.value, block_size=pruning.block_size,
            policy=pruning.policy.value, seed=pruning.seed,
            calibration_batches=pruning.calibration_batches, reinit=pruning.reinit, masks_path=pruning.masks_path,
            stats_path=pruning.stats_path, output_dir=str(out), heatmaps=pruning.heatmaps,
            config=resolved(cfg.pruning))
        t0 = time.perf_counter()
        log.info("Stage finetune: calibrate, threshold, train with masks")
        module.lr = cfg.task.finetune.lr
        pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same batches as the baseline
        trainer = make_trainer(cfg, "finetune", loggers, [callback])
        if not (cfg.ckpt_path or pruning.reinit):  # the pruned model before fine-tuning (masks are made here)
            results["pruned_before_finetune_metrics"] = trainer.validate(module, dm, verbose=False)[0]
            timing["evaluate_pruned_s"] = time.perf_counter() - t0 - sum(callback.timing.values())
        t1 = time.perf_counter()
        trainer.fit(module, dm, ckpt_path=cfg.ckpt_path)
        timing.update(callback.timing)
        timing["finetune_s"] = time.perf_counter() - t1 - (0.0 if "evaluate_pruned_s" in timing
                                                          else sum(callback.timing.values()))

    t0 = time.perf_counter()
    results["metrics"] = evaluate(cfg, module, dm, loggers)  # stage 5
    timing["evaluate_s"] = time.perf_counter() - t0
    if not pruning.enabled:
        results["dense_metrics"] = results["metrics"]
    achieved = callback.masks.meta["achieved"] if callback else {"overall": 0.0}
    results.update(sparsity_achieved=achieved["overall"],
                   sparsity_per_kind=callback.masks.meta.get("achieved_kinds", {}) if callback else {},
                   sparsity_per_site={k: v for k, v in achieved.items() if k != "overall"}, timing=timing,
                   config=resolved(cfg))
    if not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):  # one writer under DDP
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(results_table(results))
        print(f"results: {out / 'results.json'}")
    return results


def cli_main(cfg: DictConfig) -> float:
    """``run`` for the command line: user errors become one line on stderr and exit code 2."""
    try:
        results = run(cfg)
    except APError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    name = cfg.task.optimized_metric or next((k for k in results["metrics"] if k.startswith("val/")), None)
    return results["metrics"].get(name, float("nan"))
