"""The pipeline's stages, one function each, over a small ``RunState`` (``ap.run`` calls them in order, DESIGN §1):

    dense ─► dense_finetune_baseline ─► finetune (calibrate ─► threshold ─► evaluate pruned ─► train with masks)
          ─► final_evaluate ─► write_results

The expensive products that many runs share come from the stage cache (``ap.cache``): the dense weights and metrics
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
import functools
import hashlib
import inspect
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities.model_helpers import is_overridden

import ap
from ap.cache import (CALIBRATION_READS, Entry, StageCache, dense_payload, file_settings, fingerprint, key_of,
                      split_eval)
from ap.callback import AttentionPruning
from ap.config import PruningConfig, resolved
from ap.core import APError, AttentionStats
from ap.core.files import load_user_file

log = logging.getLogger(__name__)
THROUGHPUT = "tokens_per_s"  # metric names ending so are speeds: only comparable when measured in one process


@dataclass
class RunState:
    """What the stages share: config, data, module, the pruning callback, and what the run has found so far."""

    cfg: DictConfig
    pruning: PruningConfig
    dm: pl.LightningDataModule
    module: pl.LightningModule
    callback: Optional[AttentionPruning]
    cache: StageCache
    results: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: ran / reused / given / ...
    dense_key: str = ""  # identifies the dense weights the later stages start from

    @property
    def out(self) -> Path:
        return Path(self.cfg.paths.output_dir)


# --- trainers and evaluation --------------------------------------------------------------------------------------
def stage_loggers(cfg: DictConfig, stage: str) -> list[Logger]:
    """The loggers of ``cfg.logger`` for one stage: a CSV logger writes ``csv/<stage>/``; wandb starts one run per
    stage (``job_type`` = the stage, runs of a job and of a sweep share ``group``); others prefix metric names."""
    loggers = []
    for node in cfg.logger.values():
        cls = get_class(node._target_)
        if issubclass(cls, CSVLogger) and node.get("version") is None:
            loggers.append(instantiate(node, version=stage))
        elif cls.__name__ == "WandbLogger":
            finish_wandb()  # the previous stage's run
            loggers.append(instantiate(node, name=f"{node.name}/{stage}", job_type=stage))
        elif "prefix" in inspect.signature(cls).parameters:
            loggers.append(instantiate(node, prefix=stage))
        else:
            raise APError(f"logger {node._target_} takes no `prefix`: ap cannot keep its stages apart; use logger=csv "
                          f"or logger=wandb")
    return loggers


def finish_wandb(exit_code: Optional[int] = None) -> None:
    """End the current wandb run, if any (the next stage or job starts its own); ``exit_code=1`` marks it failed."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def log_results_to_wandb(s: RunState) -> None:
    """``logger=wandb``: one more run of the job's group (``job_type=results``) with the results as its summary, the
    results table, masks.pt as an artifact (type ``ap-masks``) and the mask heatmaps as images."""
    node = s.cfg.logger.get("wandb")
    if node is None:
        return
    import wandb

    finish_wandb()
    skip = ("name", "save_dir", "offline", "log_model", "prefix", "job_type")  # WandbLogger's own, or set here
    kwargs = {k: v for k, v in resolved(node).items() if not k.startswith("_") and k not in skip}
    run = wandb.init(**kwargs, name=f"{node.name}/results", job_type="results", dir=node.save_dir,
                     mode="offline" if node.get("offline") else None, config=resolved(s.cfg))
    flat = {f"{group}/{k}": v for group in ("dense_metrics", "dense_finetuned_metrics",
                                            "pruned_before_finetune_metrics", "metrics")
            for k, v in s.results.get(group, {}).items()}
    run.summary.update({**flat, "sparsity_achieved": s.results.get("sparsity_achieved", 0.0)})
    masks = s.out / "masks.pt"
    if masks.is_file():
        artifact = wandb.Artifact(f"masks-{s.cfg.task.name}-{s.pruning.name}", type="ap-masks",
                                  metadata={"sparsity_achieved": s.results.get("sparsity_achieved")})
        artifact.add_file(str(masks))
        run.log_artifact(artifact)
    heatmaps = sorted((s.out / "heatmaps").glob("*.png"))
    if heatmaps:
        run.log({"heatmaps": [wandb.Image(str(p), caption=p.stem) for p in heatmaps]})
    run.finish()


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


def evaluate(cfg: DictConfig, module: pl.LightningModule, dm: pl.LightningDataModule, stage: str,
             callbacks: Optional[list] = None) -> dict[str, float]:
    """Validation (and test, where the task has labelled test data) metrics, on the trainer's devices (DDP: each
    rank evaluates its share of the examples, reduced over ranks)."""
    trainer = make_trainer(cfg, stage, callbacks)
    metrics: dict[str, float] = {}
    outputs = trainer.validate(module, dm, verbose=False)
    if is_overridden("test_step", module):  # GLUE test sets have no labels: validation only
        outputs += trainer.test(module, dm, verbose=False)
    for out in outputs:
        metrics.update({k: float(v) for k, v in out.items()})
    return metrics


CKPT = ("a Lightning checkpoint of an ap run (<run_dir>/checkpoints/<stage>/last.ckpt) or the model.pt of a dense "
        "stage cache entry")


def load_checkpoint(path: str, key: str, module: pl.LightningModule) -> dict[str, Any]:
    """A checkpoint a user named (``key``), checked against ``module`` before anything runs."""
    ckpt = load_user_file(path, key, CKPT)
    if key == "pruning.dense_ckpt" and isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}  # a bare state_dict: the model.pt of a dense stage cache entry
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise APError(f"{key}={path} is not {CKPT}: it has no state_dict")
    check_state_dict(ckpt["state_dict"], module, f"{key}={path}")
    return ckpt


def check_state_dict(state: dict[str, Any], module: pl.LightningModule, source: str) -> None:
    """Raise ``APError`` naming the first difference if ``state`` was not saved from a model like ``module``'s."""
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise APError(f"{source} was saved from another model: it lacks {name!r}")
        got = state[name]
        if getattr(got, "shape", None) != tensor.shape:
            raise APError(f"{source} was saved from another model: {name!r} is {tuple(getattr(got, 'shape', ()))} "
                          f"there, {tuple(tensor.shape)} here (model or data config differ)")
    extra = [n for n in state if n not in expected]
    if extra:
        raise APError(f"{source} was saved from another model: it has {extra[0]!r}, this model has not")


# --- stage cache helpers ------------------------------------------------------------------------------------------
NOT_COMPUTING = ("collect/", "report.py")  # modules (packages: "x/") of ap that compute no stage product: not hashed


def versions(cfg: Optional[DictConfig] = None) -> dict[str, Any]:
    """What else determines every product: ap's own source (any edit of a module that computes products is a miss),
    the versions of the libraries that compute it, and, for a trainer that may use GPUs, how many there are."""
    from importlib import metadata

    libs = {}
    for name in ("torch", "pytorch-lightning", "transformers", "fairseq-fixed"):
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out = {"ap": ap.__version__, "ap_source": _source_hash(), **libs}
    if cfg is None or str(cfg.trainer.get("accelerator", "auto")) != "cpu":
        out["cuda_devices"] = torch.cuda.device_count()
    return out


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    h = hashlib.sha256()
    root = Path(ap.__file__).parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not any(rel == n or (n.endswith("/") and rel.startswith(n)) for n in NOT_COMPUTING):
            h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def model_source(name_or_path: str) -> dict[str, Any]:
    """What a model name stands for: a ``pkg://`` model's package version, a hub model's cached revision (none
    cached: a key that never repeats, so an unknown revision is a miss, never a wrong hit); local folders are
    fingerprinted with the rest of the model config."""
    from importlib import metadata

    if name_or_path.startswith("pkg://"):
        package = name_or_path.removeprefix("pkg://").split("/")[0]
        dists = metadata.packages_distributions().get(package, [package])
        try:
            return {"package": package, "version": metadata.version(dists[0])}
        except metadata.PackageNotFoundError:
            return {"package": package, "version": None}
    if Path(name_or_path).exists():
        return {}
    try:
        from huggingface_hub import snapshot_download

        return {"hub_revision": Path(snapshot_download(name_or_path, local_files_only=True)).name}
    except Exception:  # noqa: BLE001 (not installed, not cached, not a hub name)
        return {"hub_revision": f"unknown-{uuid.uuid4().hex}"}


def dense_identity(cfg: DictConfig, pruning: PruningConfig, pretrained: bool = False) -> dict[str, Any]:
    """The cache payload of the dense weights: the config that trains them (``ap.cache.dense_payload``; a pretrained
    model is not trained, so its attention backend is an evaluation setting), with the fingerprint of
    ``pruning.dense_ckpt`` when weights are given, what the model name stands for (``model_source``) and, for GLUE,
    only the task's own folder of the data."""
    payload = dense_payload(resolved(cfg), versions(cfg), eval_only=("model.backend",) if pretrained else ())
    if pruning.dense_ckpt:
        payload["dense_ckpt"] = fingerprint(Path(pruning.dense_ckpt))
    if cfg.model.get("name_or_path"):
        payload["model_source"] = model_source(str(cfg.model.name_or_path))
    if cfg.task.type == "glue" and isinstance(payload["data"].get("dir"), dict):
        from ap.data.glue import TASKS

        folder = Path(cfg.data.dir) / TASKS[cfg.task.name].folder
        payload["data"]["dir"] = {"files": fingerprint(folder) if folder.exists() else None}
    return payload


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """What evaluation reads beyond the weights: the ``EVAL_ONLY`` settings (files by content) and the backend."""
    return file_settings(split_eval(resolved(cfg), ("model.backend",))[1])


def dense_eval_payload(cfg: DictConfig, dense_key: str) -> dict[str, Any]:
    """The dense model's metrics: its weights evaluated with this run's evaluation settings."""
    return {"dense": dense_key, "eval": eval_settings(cfg), "versions": versions(cfg)}


def dense_ft_payload(cfg: DictConfig, dense_key: str) -> dict[str, Any]:
    """The dense+ft baseline's metrics: the dense weights fine-tuned with ``task.finetune`` (seed, trainer: in the
    dense key; the backend: in the evaluation settings), evaluated with this run's evaluation settings."""
    return {"dense": dense_key, "finetune": resolved(cfg.task.finetune), "eval": eval_settings(cfg),
            "versions": versions(cfg)}


def calibration_payload(cfg: DictConfig, pruning: PruningConfig, dense_key: str) -> dict[str, Any]:
    """Calibration statistics: the dense weights, one (capped) epoch of the train split (data, order and trainer
    limits: in the dense key) in batches of the evaluation batch size (``CALIBRATION_READS``). Sparsity, policy,
    scope, kinds and block size only threshold them: not in the key; nor the backend (calibration runs eager)."""
    reads = {k: v for k, v in split_eval(resolved(cfg))[1].items() if k in CALIBRATION_READS}
    return {"dense": dense_key, "calibration_batches": pruning.calibration_batches, "reads": reads,
            "versions": versions(cfg), "tile": pruning.block_size if pruning.tiled else 0}


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


# --- the stages ---------------------------------------------------------------------------------------------------
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


# results of the stages before fine-tuning, kept in fine-tune checkpoints so that a resumed run reports them too
CARRIED = ("dense_metrics", "dense_finetuned_metrics", "pruned_before_finetune_metrics")


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
