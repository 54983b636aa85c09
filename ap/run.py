"""The experiment pipeline behind ``run.py`` (DESIGN §1):

    dense ─► evaluate dense ─► [dense+ft baseline] ─► calibrate ─► threshold ─► evaluate pruned (no fine-tuning)
          ─► finetune with masks ─► evaluate ─► results.json

``pruning=none`` stops after the dense stage. ``ckpt_path`` resumes the training stage (the fine-tune stage when pruning,
with the masks and the metrics of the stages before it restored from the checkpoint); ``pruning.dense_ckpt`` starts
from saved dense weights. With ``pruning.reinit=true`` (train the pruned model from scratch) the baseline is the dense
model itself, trained for ``task.dense.max_steps``; otherwise the dense model fine-tuned without masks for the same
steps (``dense+ft``). results.json says which (``baseline``).

Each stage logs to its own logger instance (CSV: ``csv/<stage>/metrics.csv``; other loggers: metric names prefixed
with the stage), so the step counts that every stage restarts never put two stages on one curve. Under DDP every
stage, evaluation included, runs on all ranks; the data modules give each rank its own examples (each once).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities.model_helpers import is_overridden

from ap.callback import AttentionPruning
from ap.config import PruningConfig, check, pruning_config, resolved
from ap.core import APError, AttentionStats, MaskSet
from ap.core.files import load_user_file
from ap.report import results_table
from ap.tasks import build

log = logging.getLogger(__name__)
# One Trainer per stage would repeat Lightning's banner (accelerator, tips) four times; keep its warnings.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning 2.6 + torch 2.13


def stage_loggers(cfg: DictConfig, stage: str) -> list[Logger]:
    """The loggers of ``cfg.logger`` for one stage: a CSV logger writes ``csv/<stage>/``, others prefix metric names."""
    loggers = []
    for node in cfg.logger.values():
        cls = get_class(node._target_)
        if issubclass(cls, CSVLogger) and node.get("version") is None:
            loggers.append(instantiate(node, version=stage))
        elif "prefix" in inspect.signature(cls).parameters:
            loggers.append(instantiate(node, prefix=stage))
        else:
            raise APError(f"logger {node._target_} takes no `prefix`: ap cannot keep its stages apart; use logger=csv "
                          f"or logger=wandb")
    return loggers


def make_trainer(cfg: DictConfig, stage: str, callbacks: Optional[list] = None, kind: str = "") -> pl.Trainer:
    """A Trainer from ``cfg.trainer`` for ``stage``, logging under that name. ``kind`` ``dense``/``finetune``: a
    training stage of that length (``cfg.task.<kind>``, capped by ``trainer.max_steps``), checkpoints in
    ``<run_dir>/checkpoints/<stage>/`` (``last.ckpt`` resumes); ``""``: evaluation only."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    cap = kwargs.pop("max_steps", None)
    callbacks = list(callbacks or [])
    if kind:
        spec = cfg.task[kind]
        steps = spec.max_steps if cap is None else (cap if spec.max_steps < 0 else min(spec.max_steps, cap))
        kwargs.update(max_epochs=spec.max_epochs, max_steps=steps)
        callbacks.append(ModelCheckpoint(dirpath=Path(cfg.paths.output_dir) / "checkpoints" / stage, save_last=True,
                                         save_top_k=0))
    return pl.Trainer(logger=stage_loggers(cfg, stage) or False, callbacks=callbacks,
                      default_root_dir=cfg.paths.output_dir, enable_checkpointing=bool(kind), **kwargs)


def evaluate(cfg: DictConfig, module: pl.LightningModule, dm: pl.LightningDataModule, stage: str) -> dict[str, float]:
    """Validation (and test, where the task has labelled test data) metrics, on the trainer's devices (DDP: each
    rank evaluates its share of the examples, reduced over ranks)."""
    trainer = make_trainer(cfg, stage)
    metrics: dict[str, float] = {}
    outputs = trainer.validate(module, dm, verbose=False)
    if is_overridden("test_step", module):  # GLUE test sets have no labels: validation only
        outputs += trainer.test(module, dm, verbose=False)
    for out in outputs:
        metrics.update({k: float(v) for k, v in out.items()})
    return metrics


CKPT = "a Lightning checkpoint of an ap run (<run_dir>/checkpoints/<stage>/last.ckpt)"


def load_checkpoint(path: str, key: str, module: pl.LightningModule) -> dict[str, Any]:
    """A checkpoint a user named (``key``), checked against ``module`` before anything runs."""
    ckpt = load_user_file(path, key, CKPT)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise APError(f"{key}={path} is not {CKPT}: it has no state_dict")
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in ckpt["state_dict"]:
            raise APError(f"{key}={path} was saved from another model: it lacks {name!r}")
        got = ckpt["state_dict"][name]
        if getattr(got, "shape", None) != tensor.shape:
            raise APError(f"{key}={path} was saved from another model: {name!r} is {tuple(getattr(got, 'shape', ()))} "
                          f"there, {tuple(tensor.shape)} here (model or data config differ)")
    extra = [n for n in ckpt["state_dict"] if n not in expected]
    if extra:
        raise APError(f"{key}={path} was saved from another model: it has {extra[0]!r}, this model has not")
    return ckpt


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
        return run_stages(cfg)
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    check(cfg)
    pruning = pruning_config(cfg)
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    if (out / "results.json").exists():
        raise APError(f"{out} already holds results.json; choose a new output directory (hydra.run.dir=...)")
    log.info(f"Building task {cfg.task.type}/{cfg.task.name}: data <{cfg.data._target_}>, module <{cfg.task.module._target_}>")
    dm, module = build(cfg)
    callback: Optional[AttentionPruning] = None
    if pruning.enabled:
        callback = AttentionPruning(
            sparsity=pruning.target(), kinds=pruning.pruned_kinds(), scope=pruning.scope.value,
            block_size=pruning.block_size, policy=pruning.policy.value, seed=pruning.seed,
            calibration_batches=pruning.calibration_batches, reinit=pruning.reinit, masks_path=pruning.masks_path,
            stats_path=pruning.stats_path, output_dir=str(out), heatmaps=pruning.heatmaps,
            config=resolved(cfg.pruning), train_seed=cfg.seed)
    check_user_files(cfg, pruning, module, callback)
    timing: dict[str, float] = {}
    results: dict[str, Any] = {"task": cfg.task.type, "task_name": cfg.task.name, "pruning": pruning.name,
                               "run_dir": str(out)}
    resume_dense = cfg.ckpt_path if not pruning.enabled else None

    if not (pruning.enabled and cfg.ckpt_path):  # stage 1: dense (not when resuming the fine-tune stage)
        if getattr(module, "pretrained", False) and not pruning.dense_ckpt:
            log.info("Stage dense: skipped (the model was loaded trained: model.checkpoint)")
        elif pruning.dense_ckpt:
            log.info(f"Loading dense weights from {pruning.dense_ckpt}")
            module.load_state_dict(load_checkpoint(pruning.dense_ckpt, "pruning.dense_ckpt", module)["state_dict"])
        else:
            t0 = time.perf_counter()
            log.info("Stage dense: training")
            module.lr = cfg.task.dense.lr
            make_trainer(cfg, "dense", kind="dense").fit(module, dm, ckpt_path=resume_dense)
            timing["dense_s"] = time.perf_counter() - t0
        if pruning.enabled:
            t0 = time.perf_counter()
            results["dense_metrics"] = evaluate(cfg, module, dm, "dense_eval")
            timing["evaluate_dense_s"] = time.perf_counter() - t0

    if pruning.enabled and pruning.reinit:
        results["baseline"] = "dense"
        if cfg.task.dense.max_steps != cfg.task.finetune.max_steps:
            log.warning(f"pruning.reinit=true trains the pruned model from scratch for {cfg.task.finetune.max_steps} "
                        f"steps, its dense baseline trained for {cfg.task.dense.max_steps}: set task.finetune.max_steps "
                        f"= task.dense.max_steps for a comparison at equal steps")
    elif pruning.enabled and cfg.dense_finetune_baseline:
        results["baseline"] = "dense+ft"
        if not cfg.ckpt_path:
            # Equal-compute baseline: the dense model fine-tuned for the same steps without masks, then weights restored.
            t0 = time.perf_counter()
            log.info("Baseline: fine-tuning the dense model without masks (dense_finetune_baseline=true)")
            dense_state = copy.deepcopy(module.state_dict())
            module.lr = cfg.task.finetune.lr
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            make_trainer(cfg, "dense_ft", kind="finetune").fit(module, dm)
            results["dense_finetuned_metrics"] = evaluate(cfg, module, dm, "dense_ft_eval")
            module.load_state_dict(dense_state)
            timing["dense_finetune_baseline_s"] = time.perf_counter() - t0

    if callback is not None:  # stages 2-4: calibrate, threshold, fine-tune (the callback does 2-3 at fit start)
        t0 = time.perf_counter()
        log.info("Stage finetune: calibrate, threshold, train with masks")
        module.lr = cfg.task.finetune.lr
        pl.seed_everything(cfg.seed, workers=True, verbose=False)  # (the callback re-seeds once the masks exist)
        trainer = make_trainer(cfg, "finetune", [callback], kind="finetune")
        if not (cfg.ckpt_path or pruning.reinit):  # the pruned model before fine-tuning (masks are made here)
            results["pruned_before_finetune_metrics"] = trainer.validate(module, dm, verbose=False)[0]
            timing["evaluate_pruned_s"] = time.perf_counter() - t0 - sum(callback.timing.values())
        # what a resumed run cannot recompute travels in the fine-tune checkpoints (the callback's state)
        callback.carried = {k: results[k] for k in CARRIED if k in results} | {"timing": dict(timing)}
        t1 = time.perf_counter()
        trainer.fit(module, dm, ckpt_path=cfg.ckpt_path)
        timing.update(callback.timing)
        timing["finetune_s"] = time.perf_counter() - t1 - (0.0 if "evaluate_pruned_s" in timing
                                                          else sum(callback.timing.values()))
        if cfg.ckpt_path:  # restored from the checkpoint: the metrics of the stages before the interrupted one
            carried = dict(callback.carried)
            timing = {**carried.pop("timing", {}), **timing}
            results.update({k: v for k, v in carried.items() if k not in results})

    t0 = time.perf_counter()
    results["metrics"] = evaluate(cfg, module, dm, "final_eval")  # stage 5
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


# results of the stages before fine-tuning, kept in fine-tune checkpoints so that a resumed run reports them too
CARRIED = ("dense_metrics", "dense_finetuned_metrics", "pruned_before_finetune_metrics")


def cli_main(cfg: DictConfig) -> float:
    """``run`` for the command line: user errors become one line on stderr and exit code 2."""
    try:
        results = run(cfg)
    except APError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    name = cfg.task.optimized_metric or next((k for k in results["metrics"] if k.startswith("val/")), None)
    return results["metrics"].get(name, float("nan"))
