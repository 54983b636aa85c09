"""``AttentionPruning``: the Lightning callback that turns a dense model into an AP-pruned one.

Attach it to the trainer of the fine-tune stage. At ``on_fit_start`` (or at the start of a ``trainer.validate`` run
before ``fit``, to measure the pruned model before fine-tuning) it
1. gets a ``MaskSet``: restored from a resumed checkpoint, loaded from ``masks_path``, thresholded from saved
   statistics (``stats_path``, or what ``stats_provider`` returns: ``ap.pipeline.stages`` serves them from the stage
   cache), or calibrated: one pass over the train split (eval mode, no gradients), statistics all-reduced across DDP ranks, then
   thresholded;
2. writes ``stats.pt``, ``masks.pt`` and heatmaps into ``output_dir`` (rank zero; existing files are never overwritten);
3. re-initialises the weights if ``reinit`` (the paper's LM/MT recipe), and installs the masks into every site.
Masks travel in Lightning checkpoints (``state_dict``, with ``carried``: whatever the caller wants a resumed run to get
back, e.g. metrics of earlier stages) and are re-installed on resume; restored masks made with another pruning config
(sparsity, kinds, scope, policy, block size) are an error naming both.

``train_seed``: re-seed (``seed_everything``) once the masks exist, right before training (and before ``reinit``), so
a run that calibrated and one that reused ``stats_path``/``masks_path`` train identically from identical masks
(iterating the calibration loader advances the global RNG).

Calibration is one epoch over the train split as the trainer defines it: ``limit_train_batches`` caps it like a
training epoch (``trainer=debug``), and so does ``calibration_batches``; the smaller wins.

The LightningModule must expose ``model`` (the ``nn.Module`` holding the ``AttentionSite``\\ s) and
``calibration_forward(batch)``; ``reinitialize()`` is needed for ``reinit=True``. The datamodule's
``calibration_dataloader()`` is used when present (a fixed-order train loader), else ``train_dataloader()``; under DDP
each rank takes every ``world``-th batch, unless the datamodule says ``calibration_shards_itself`` (its loader already
holds the rank's own share in order, e.g. Transformer-XL's streams, whose memory must see every segment).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from tqdm.auto import tqdm

from ap.core import APError, AttentionStats, MaskSet, PruningSpec, calibrate, find_sites, make_maskset

log = logging.getLogger(__name__)


class AttentionPruning(pl.Callback):
    def __init__(
        self,
        spec: PruningSpec,
        calibration_batches: Optional[int] = None,
        reinit: bool = False,
        masks_path: Optional[str] = None,
        stats_path: Optional[str] = None,
        output_dir: Optional[str] = None,
        heatmaps: bool = True,
        config: Optional[dict[str, Any]] = None,
        train_seed: Optional[int] = None,
    ) -> None:
        """``spec``: how masks are made (``tile > 0``: calibrate per tile); the rest: where masks come from and go."""
        self.spec = spec.validate()
        self.tile = spec.tile  # statistics and masks per tile (long sequences), 0 = per entry
        self.calibration_batches, self.reinit = calibration_batches, reinit
        self.masks_path, self.stats_path = masks_path, stats_path
        self.output_dir = Path(output_dir) if output_dir else None
        self.heatmaps, self.config, self.train_seed = heatmaps, config or {}, train_seed
        self.masks: Optional[MaskSet] = None
        self.stats: Optional[AttentionStats] = None
        self.timing: dict[str, float] = {}
        self.carried: dict[str, Any] = {}  # saved with the masks in checkpoints, restored on resume
        # optional: called with the calibration function, returns the statistics (ap.pipeline.stages: stage cache)
        self.stats_provider: Optional[Callable[[Callable[[], AttentionStats]], AttentionStats]] = None
        self._restored = self._reinitialized = self._written = False

    # --- stages ------------------------------------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``trainer.validate`` before ``fit`` measures the pruned model before fine-tuning (masks made here)."""
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.prepare(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(trainer, pl_module)
        if self.train_seed is not None:  # the same random stream whether the masks were computed or reused
            pl.seed_everything(self.train_seed, workers=True, verbose=False)
        if self.reinit and not self._restored and not self._reinitialized:
            _require(pl_module, "reinitialize", "pruning.reinit=true")
            pl_module.reinitialize()
            self._reinitialized = True
            log.info("AttentionPruning: weights re-initialised (training from scratch with masks)")

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MaskSet:
        """Get the masks once (restored, loaded, or calibrated + thresholded), write them, install them."""
        model = _pruned_model(pl_module)
        if self.masks is None:
            if self.masks_path:
                self.masks = MaskSet.load(self.masks_path)
                self.masks.validate(model)
                log.info(f"AttentionPruning: masks loaded from {self.masks_path}")
            else:
                if self.stats_path:
                    self.stats = AttentionStats.load(self.stats_path)
                    log.info(f"AttentionPruning: statistics loaded from {self.stats_path}")
                elif self.stats_provider is not None:
                    self.stats = self.stats_provider(lambda: self.calibrate(trainer, pl_module))
                else:
                    t0 = time.perf_counter()
                    self.stats = self.calibrate(trainer, pl_module)
                    self.timing["calibrate_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                self.masks = make_maskset(self.stats, model, self.spec, config=self.config)
                self.timing["threshold_s"] = time.perf_counter() - t0
            self._write(trainer)
            log.info(f"AttentionPruning: {self.masks.meta['achieved']['overall']:.1%} of valid attention pruned\n"
                     f"{self.masks.report()}")
        elif self._restored and not self._written:
            log.info("AttentionPruning: masks restored from the checkpoint")
            self._write(trainer)
        self.masks.install(model)
        return self.masks

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AttentionStats:
        """One pass over the train split; under DDP each rank takes every ``world_size``-th batch, then all-reduce."""
        _require(pl_module, "calibration_forward", "calibration")
        dm = trainer.datamodule
        if dm is None:
            raise APError("AttentionPruning calibrates on the datamodule's train split: pass a LightningDataModule to fit")
        loader = dm.calibration_dataloader() if hasattr(dm, "calibration_dataloader") else dm.train_dataloader()
        rank, world = trainer.global_rank, trainer.world_size
        n = min(len(loader), _epoch_batches(len(loader), trainer.limit_train_batches),
                len(loader) if self.calibration_batches is None else self.calibration_batches)
        if getattr(dm, "calibration_shards_itself", False):  # each rank's loader holds its own share, in order
            rank, world = 0, 1
        batches = (b for i, b in enumerate(itertools.islice(loader, n)) if i % world == rank)
        bar = tqdm(batches, total=len(range(rank, n, world)), desc="calibrate", leave=False,
                   disable=not trainer.is_global_zero or trainer.progress_bar_callback is None)
        model = _pruned_model(pl_module)
        check_stats_memory(model, self.tile)
        stats = calibrate(model, bar,
                          lambda batch: pl_module.calibration_forward(trainer.strategy.batch_to_device(batch)),
                          stats=AttentionStats(tile=self.tile))
        stats.all_reduce()
        log.info(f"AttentionPruning: calibrated on {stats.batches} train batches, {stats.tokens:,} tokens")
        return stats

    def _write(self, trainer: pl.Trainer) -> None:
        self._written = True
        if self.output_dir is None or not trainer.is_global_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.stats is not None and not self.stats_path:  # freshly calibrated
            _save_new(self.output_dir / "stats.pt", self.stats.save)
        _save_new(self.output_dir / "masks.pt", self.masks.save)
        if self.heatmaps:
            means = {n: self.stats.mean(n) for n in self.masks.masks} if self.stats is not None else None
            self.masks.heatmaps(self.output_dir / "heatmaps", means)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.to_dict(), "carried": self.carried} if self.masks is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("masks"):
            masks = MaskSet.from_dict(state_dict["masks"], source="checkpoint")
            if not self.masks_path:  # masks from a file define the pruning themselves
                self.check_made_like_this(masks.meta)
            self.masks, self.carried = masks, dict(state_dict.get("carried") or {})
            self._restored = True

    def check_made_like_this(self, meta: dict[str, Any]) -> None:
        """Raise ``APError`` naming both values if masks (``meta``) were made with other pruning settings."""
        diff = self.spec.difference(meta)
        if diff:
            key, theirs, ours = diff
            raise APError(f"the checkpoint's masks were made with {key}={theirs}, this run asks for {key}={ours}: "
                          f"resume with the pruning config of the interrupted run")


def check_stats_memory(model: Any, tile: int, limit: Optional[float] = None) -> None:
    """Raise ``APError`` before calibrating if the statistics would need more than ``limit`` bytes (default: half of
    this machine's memory): element-wise statistics grow with the square of the sequence length."""
    sites = find_sites(model).values()
    units = [(-(-s.max_q // tile), -(-s.max_k // tile)) if tile else (s.max_q, s.max_k) for s in sites]
    need = sum(8 * (s.n_heads + 1) * q * k for s, (q, k) in zip(sites, units))  # float64 sum (H, Q, K) + count (Q, K)
    if limit is None:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    if need > limit:
        fix = ("pruning.tiled=true pruning.block_size=64 (statistics and masks per 64x64 tile)" if not tile
               else "a larger pruning.block_size or a shorter sequence length")
        raise APError(f"calibration statistics of these {len(units)} attention sites would take {need / 2**30:.1f} GiB "
                      f"(limit {limit / 2**30:.1f} GiB, half of this machine's memory); use {fix}")


def _epoch_batches(n: int, limit: int | float | None) -> int:
    """How many of ``n`` batches one epoch takes under Lightning's ``limit_train_batches`` (int or fraction)."""
    if limit is None:
        return n
    return min(n, int(limit)) if isinstance(limit, int) else int(n * float(limit))


def _pruned_model(pl_module: pl.LightningModule) -> Any:
    model = getattr(pl_module, "model", None)
    if model is None or not find_sites(model):
        raise APError(f"{type(pl_module).__name__}.model has no AttentionSite modules: nothing can be pruned")
    return model


def _require(pl_module: pl.LightningModule, method: str, what: str) -> None:
    if not callable(getattr(pl_module, method, None)):
        raise APError(f"{type(pl_module).__name__} has no {method}() method, needed for {what}")


def _save_new(path: Path, save: Any) -> None:
    """Save with ``save(path)`` unless ``path`` exists (never overwrite earlier results)."""
    if path.exists():
        raise APError(f"{path} already exists; choose a new output directory (hydra.run.dir=...)")
    save(path)
