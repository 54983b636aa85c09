"""The pipeline's stages, one function each, over a small ``RunState`` (``run_stages`` calls them in order, docs/design.md):

    dense ─► dense_finetune_baseline ─► finetune (calibrate ─► threshold ─► evaluate pruned ─► train with masks)
          ─► final_evaluate ─► write_results

The expensive products that many runs share come from the stage cache (``ap.pipeline.cache``): the dense weights and metrics
(``dense``), the dense+ft baseline's metrics (``dense_ft``) and the calibration statistics (``calibrate``). A stage
that finds its entry reuses it; one that misses builds it into the cache; either way the run then loads the product
from the entry, so its results never depend on hit or miss. ``results["stages"]`` records, per stage, ``ran``,
``reused`` (with the entry), ``given`` (a file the config names: ``pruning.dense_ckpt``/``stats_path``/``masks_path``),
``pretrained`` (``model.checkpoint``: evaluated, not trained) or ``resumed`` (restored from ``ckpt_path``).

Each stage logs to its own logger instance (CSV: ``csv/<stage>/metrics.csv``; other loggers: metric names prefixed
with the stage), so the step counts that every stage restarts never put two stages on one curve. Under DDP every
stage, evaluation included, runs on all ranks; the data modules give each rank its own examples (each once).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch

from ap.core import AttentionStats
from ap.core.files import load_user_file

from .cache import Entry, key_of
from .checkpoints import check_state_dict, load_checkpoint
from .keys import calibration_payload, dense_eval_payload, dense_ft_payload, dense_identity
from .state import CARRIED, RunState, THROUGHPUT
from .trainers import evaluate, make_trainer

log = logging.getLogger(__name__)


def _write_json(folder: Optional[Path], name: str, data: dict[str, Any]) -> None:
    if folder is not None:
        (folder / name).write_text(json.dumps(data, indent=1))


def _read_json(entry: Entry, name: str) -> dict[str, Any]:
    return json.loads((entry.path / name).read_text())


def _metrics_entry(s: RunState, stage: str, payload: dict[str, Any], build: Callable[[Optional[Path]], None],
                   into: str) -> tuple[Entry, dict[str, Any]]:
    """Fetch (or build) a stage whose product is metrics (``metrics.json``) into ``results[into]``."""
    entry = s.cache.fetch(stage, payload, build)
    built = _read_json(entry, "metrics.json")
    s.results[into] = built["metrics"]
    _record(s, entry, built)
    return entry, built


def _record(s: RunState, entry: Entry, built: dict[str, Any]) -> None:
    """Note in results and the log whether ``entry`` was built by this run or reused (and how long it took to build)."""
    s.stages[entry.stage] = {**entry.record(), "build_timing": built.get("timing", {})}
    if entry.reused:
        log.info(f"Stage {entry.stage}: reused from the stage cache ({entry.path})")


def dense(s: RunState) -> None:
    """Stage 1: train the dense model (or reuse / load / resume it), and evaluate it."""
    cfg, pruning, module, dm = s.cfg, s.pruning, s.module, s.dm
    if pruning.enabled and cfg.ckpt_path:  # resuming the fine-tune stage: the dense results come from the checkpoint
        s.stages["dense"] = {"status": "resumed"}
        return
    if cfg.ckpt_path:  # pruning=none: resume dense training itself (a run of its own, not shared)
        t0 = time.perf_counter()
        module.lr = cfg.task.dense.lr
        make_trainer(cfg, "dense", kind="dense").fit(module, dm, ckpt_path=cfg.ckpt_path)
        s.timing["dense_s"] = time.perf_counter() - t0
        s.stages["dense"] = {"status": "resumed"}
        s.results["dense_metrics"] = evaluate(cfg, module, dm, "dense_eval")
        return
    pretrained = bool(getattr(module, "pretrained", False))
    payload = dense_identity(cfg, pruning, pretrained)
    s.dense_key = key_of(payload)
    if pruning.dense_ckpt:
        log.info(f"Loading dense weights from {pruning.dense_ckpt}")
        module.load_state_dict(load_checkpoint(pruning.dense_ckpt, "pruning.dense_ckpt", module)["state_dict"])
        t0 = time.perf_counter()
        s.results["dense_metrics"] = evaluate(cfg, module, dm, "dense_eval")
        s.timing["evaluate_dense_s"] = time.perf_counter() - t0
        s.stages["dense"] = {"status": "given", "key": s.dense_key, "entry": pruning.dense_ckpt}
        return

    def build(folder: Optional[Path]) -> None:  # the weights (a pretrained model: nothing to train or store)
        timing = {}
        if pretrained:
            log.info("Stage dense: not trained (the model was loaded trained)")
        else:
            log.info("Stage dense: training")
            t0 = time.perf_counter()
            module.lr = cfg.task.dense.lr
            make_trainer(cfg, "dense", kind="dense").fit(module, dm)
            timing["dense_s"] = time.perf_counter() - t0
        if folder is not None:
            if not pretrained:
                torch.save(module.state_dict(), folder / "model.pt")
            _write_json(folder, "weights.json", {"timing": timing, "pretrained": pretrained})
        s.timing.update(timing)

    entry = s.cache.fetch("dense", payload, build)
    built = _read_json(entry, "weights.json")
    if not built.get("pretrained"):  # every job loads the weights from the entry, builder or not
        state = load_user_file(entry.path / "model.pt", "stage cache entry", "dense weights (model.pt)")
        check_state_dict(state, module, f"stage cache entry {entry.path}")
        module.load_state_dict(state)
    _record(s, entry, built)
    if pretrained and not entry.reused:
        s.stages["dense"]["status"] = "pretrained"
    dense_evaluation(s)


def dense_evaluation(s: RunState) -> None:
    """The dense weights' metrics, a product of their own: keyed on the weights and the evaluation settings, so a
    change of evaluation alone (beam, BLEU mode, batch sizes, limits, backend) reuses the weights."""
    cfg, module, dm = s.cfg, s.module, s.dm

    def build(folder: Optional[Path]) -> None:
        t0 = time.perf_counter()
        metrics = evaluate(cfg, module, dm, "dense_eval")
        timing = {"evaluate_dense_s": time.perf_counter() - t0}
        _write_json(folder, "metrics.json", {"metrics": metrics, "timing": timing})
        s.timing.update(timing)

    entry, built = _metrics_entry(s, "dense_eval", dense_eval_payload(cfg, s.dense_key), build, "dense_metrics")
    if entry.reused and any(k.endswith(THROUGHPUT) for k in built["metrics"]):
        # a throughput measured by another process (under other load) is no baseline for this run's: time it here
        t0 = time.perf_counter()
        again = evaluate(cfg, module, dm, "dense_eval")
        s.timing["evaluate_dense_s"] = time.perf_counter() - t0
        s.results["dense_metrics"].update({k: v for k, v in again.items() if k.endswith(THROUGHPUT)})
        s.stages["dense_eval"]["throughput"] = "re-timed in this run"


def dense_finetune_baseline(s: RunState) -> None:
    """Equal-compute baseline: the dense model fine-tuned for the fine-tune stage's steps without masks (its metrics;
    the weights go back to dense). With ``pruning.reinit`` the baseline is the dense model itself."""
    cfg, pruning, module, dm = s.cfg, s.pruning, s.module, s.dm
    if not pruning.enabled:
        return
    if pruning.reinit or not pruning.finetune:  # from scratch, or training-free: compared with the dense model
        s.results["baseline"] = "dense"
        if pruning.reinit and cfg.task.dense.max_steps != cfg.task.finetune.max_steps:
            log.warning(f"pruning.reinit=true trains the pruned model from scratch for {cfg.task.finetune.max_steps} "
                        f"steps, its dense baseline trained for {cfg.task.dense.max_steps}: set task.finetune.max_steps "
                        f"= task.dense.max_steps for a comparison at equal steps")
        return
    if not cfg.dense_finetune_baseline:
        return
    s.results["baseline"] = "dense+ft"
    if cfg.ckpt_path:  # resumed: carried in the checkpoint
        return

    def build(folder: Optional[Path]) -> None:
        log.info("Baseline: fine-tuning the dense model without masks (dense_finetune_baseline=true)")
        t0 = time.perf_counter()
        dense_state = copy.deepcopy(module.state_dict())
        module.lr = cfg.task.finetune.lr
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        make_trainer(cfg, "dense_ft", kind="finetune").fit(module, dm)
        metrics = evaluate(cfg, module, dm, "dense_ft_eval")
        module.load_state_dict(dense_state)
        timing = {"dense_finetune_baseline_s": time.perf_counter() - t0}
        _write_json(folder, "metrics.json", {"metrics": metrics, "timing": timing})
        s.timing.update(timing)

    _metrics_entry(s, "dense_ft", dense_ft_payload(cfg, s.dense_key), build, "dense_finetuned_metrics")


def calibration_provider(s: RunState) -> Callable[[Callable[[], AttentionStats]], AttentionStats]:
    """What the callback calls instead of calibrating itself: the statistics from the stage cache, computed by
    ``compute()`` (one epoch over the train split, all ranks) when missing."""
    payload = calibration_payload(s.cfg, s.pruning, s.dense_key)

    def provide(compute: Callable[[], AttentionStats]) -> AttentionStats:
        def build(folder: Optional[Path]) -> None:
            t0 = time.perf_counter()
            stats = compute()
            timing = {"calibrate_s": time.perf_counter() - t0}
            if folder is not None:
                stats.save(folder / "stats.pt")
                _write_json(folder, "metrics.json", {"timing": timing, "batches": stats.batches,
                                                     "tokens": stats.tokens})
            s.timing.update(timing)

        entry = s.cache.fetch("calibrate", payload, build)
        _record(s, entry, _read_json(entry, "metrics.json"))
        return AttentionStats.load(entry.path / "stats.pt", key="stage cache entry")

    return provide


def finetune(s: RunState) -> None:
    """Stages calibrate → threshold (the callback, at the start of the first trainer call) → evaluate the pruned
    model before fine-tuning → fine-tune with masks (or resume that from ``ckpt_path``)."""
    cfg, pruning, module, dm, callback = s.cfg, s.pruning, s.module, s.dm, s.callback
    if callback is None:
        return
    s.results["finetune"] = pruning.finetune
    if pruning.masks_path or pruning.stats_path:
        s.stages["calibrate"] = {"status": "given", "entry": pruning.masks_path or pruning.stats_path}
    elif cfg.ckpt_path:
        s.stages["calibrate"] = {"status": "resumed"}
    elif s.dense_key:
        callback.stats_provider = calibration_provider(s)
    if not pruning.finetune:  # training-free: the final evaluation makes the masks (the callback) and measures them
        log.info("Stage finetune: skipped (pruning.finetune=false: training-free)")
        return
    t0 = time.perf_counter()
    log.info("Stage finetune: calibrate, threshold, train with masks")
    module.lr = cfg.task.finetune.lr
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # (the callback re-seeds once the masks exist)
    trainer = make_trainer(cfg, "finetune", [callback], kind="finetune")
    before = dict(s.timing)
    if not (cfg.ckpt_path or pruning.reinit):  # the pruned model before fine-tuning (masks are made here)
        s.results["pruned_before_finetune_metrics"] = trainer.validate(module, dm, verbose=False)[0]
        s.timing["evaluate_pruned_s"] = _elapsed_apart(s, t0, before)
    # what a resumed run cannot recompute travels in the fine-tune checkpoints (the callback's state)
    callback.carried = {k: s.results[k] for k in CARRIED if k in s.results} | {"timing": dict(s.timing),
                                                                               "stages": dict(s.stages)}
    t1, before = time.perf_counter(), dict(s.timing)
    trainer.fit(module, dm, ckpt_path=cfg.ckpt_path)
    s.timing["finetune_s"] = _elapsed_apart(s, t1, before)
    if cfg.ckpt_path:  # restored from the checkpoint: the metrics of the stages before the interrupted one
        carried = dict(callback.carried)
        s.timing = {**carried.pop("timing", {}), **s.timing}
        s.stages = {**carried.pop("stages", {}), **s.stages}
        s.results.update({k: v for k, v in carried.items() if k not in s.results})


def _elapsed_apart(s: RunState, t0: float, before: dict[str, float]) -> float:
    """Seconds since ``t0`` minus the stages timed on their own meanwhile (calibration by the stage cache, the
    callback's calibration and thresholding: merged into ``s.timing`` here; ``before`` = ``s.timing`` at ``t0``)."""
    s.timing.update(s.callback.timing)
    if "calibrate" not in s.stages and "calibrate_s" in s.callback.timing:
        s.stages["calibrate"] = {"status": "ran"}  # calibrated by the callback itself (no stage cache: resumed)
    return time.perf_counter() - t0 - sum(v for k, v in s.timing.items() if k not in before)


def final_evaluate(s: RunState) -> None:
    """Stage 5: evaluate the final model (for ``pruning=none`` the dense model's metrics are the final ones; training-
    free, the callback calibrates and installs the masks at the start of this evaluation)."""
    if not s.pruning.enabled and "dense_metrics" in s.results:
        s.results["metrics"] = s.results["dense_metrics"]
        return
    training_free = s.callback is not None and not s.pruning.finetune
    t0, before = time.perf_counter(), dict(s.timing)
    s.results["metrics"] = evaluate(s.cfg, s.module, s.dm, "final_eval", [s.callback] if training_free else None)
    s.timing["evaluate_s"] = (_elapsed_apart(s, t0, before) if s.callback is not None
                              else time.perf_counter() - t0)
