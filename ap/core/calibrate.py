"""The AP recipe as plain-PyTorch functions: calibrate a model, then turn statistics into a ``MaskSet``.

    stats = calibrate(model, train_batches, lambda batch: model(batch["input"]))
    masks = make_maskset(stats, model, PruningSpec(target=0.9))   # scope "layer", policy "ap"
    masks.install(model)                                         # every AttentionSite now applies its mask
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .masks import MaskSet
from .sites import AttentionSite, find_sites, model_signature
from .spec import PruningSpec
from .stats import AttentionStats
from .threshold import achieved_by_kind, achieved_sparsity, block_sparsity, build_masks


class StatsRecorder:
    """What ``recording`` installs on every site: called with probabilities ``(B, H, Tq, Tk)``; with tiled statistics
    also ``row_tiles`` (per-row tile sums of a call that is ``aligned``) and ``chunk_tile`` (sites then compute the
    attention a chunk of query rows at a time, never holding ``(B, H, Tq, Tk)``; 0 turns that off)."""

    def __init__(self, stats: AttentionStats, first: Optional[str]) -> None:
        self.stats, self.first = stats, first
        self.chunk_tile = stats.tile

    def __call__(self, site: AttentionSite, probs: Tensor, q_pos: Tensor, k_pos: Tensor) -> None:
        self.stats.record(site, probs, q_pos, k_pos)
        self._count(site, q_pos, probs.shape[0])

    def aligned(self, q_pos: Tensor, k_pos: Tensor) -> bool:
        """Whether a call at these positions may hand ``row_tiles`` (``AttentionStats.aligned``)."""
        return self.stats.aligned(q_pos, k_pos)

    def row_tiles(self, site: AttentionSite, rows: Tensor, q_pos: Tensor, k_pos: Tensor) -> None:
        """``rows (B, H, Tq, ceil(Tk/tile))``: see ``AttentionStats.update_row_tiles``."""
        self.stats.update_row_tiles(site.name, rows, q_pos, k_pos, window=site.sliding_window)
        self._count(site, q_pos, rows.shape[0])

    def _count(self, site: AttentionSite, q_pos: Tensor, batch: int) -> None:
        if site.name == self.first:  # calibration tokens = real queries seen by the first site
            self.stats.tokens += int((q_pos >= 0).sum()) * (batch if q_pos.shape[0] == 1 else 1)


@contextmanager
def recording(model: nn.Module, stats: AttentionStats) -> Iterator[AttentionStats]:
    """Make every site of ``model`` hand its attention probabilities to ``stats``."""
    sites = find_sites(model)
    record = StatsRecorder(stats, next(iter(sites), None))
    for site in sites.values():
        stats.add_site(site.name, site.kind, site.n_heads, site.max_q, site.max_k)
        site.recorder = record
    try:
        yield stats
    finally:
        for site in sites.values():
            site.recorder = None


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any], Any],
    max_batches: Optional[int] = None,
    stats: Optional[AttentionStats] = None,
) -> AttentionStats:
    """One pass of ``forward(batch)`` over ``batches`` in eval mode without gradients, recording attention statistics.

    Weights are untouched; every module's own previous train/eval mode is restored afterwards (also on error), so a
    frozen submodule kept in eval mode inside a training model stays in eval mode.
    """
    stats = stats if stats is not None else AttentionStats()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), recording(model, stats):
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                forward(batch)
                stats.batches += 1
    finally:
        for m, training in modes:
            m.training = training
    return stats


def make_maskset(
    stats: AttentionStats,
    model: nn.Module,
    spec: PruningSpec,
    split: str = "train",
    config: Optional[dict[str, Any]] = None,
    report_block_size: int = 64,
) -> MaskSet:
    """Threshold ``stats`` by ``spec`` into a ``MaskSet`` for ``model`` with the full mask-file metadata.

    ``meta["kinds"]`` lists the kinds pruned (sorted), ``meta["spec"]`` the spec (its ``tile`` that of ``stats``).
    A target that cannot be reached (every query row keeps its best entry or tile) warns with what was achieved.
    ``meta["achieved_blocks"]`` is the fraction of tiles (``block_size``, or ``report_block_size`` for element-wise
    masks) that are entirely pruned: the part of the work a block-sparse kernel can skip. Tiled statistics
    (``stats.tile``) give tile masks (``meta["tile"]``, mask-file version 2).
    """
    stats.validate(model)
    spec = dataclasses.replace(spec, tile=stats.tile)
    targets = spec.validate().targets()
    pruned_kinds = sorted(k for k in targets if k in stats.kinds.values())
    masks = build_masks(stats, spec)
    tile = stats.tile or spec.block_size or report_block_size
    achieved = achieved_sparsity(masks, stats)
    by_kind = achieved_by_kind(masks, stats)
    _warn_unreached(spec, targets, pruned_kinds, masks, stats, by_kind)
    meta = {
        "model": model_signature(model),
        "sparsity": spec.target,
        "kinds": pruned_kinds,
        "scope": spec.scope,
        "policy": spec.policy,
        "score": spec.score,
        "keep_sinks": spec.keep_sinks,
        "seed": spec.seed,
        "achieved": achieved,
        "achieved_kinds": by_kind,
        "calibration": {"split": split, "batches": stats.batches, "tokens": stats.tokens},
        "block_size": spec.block_size,
        "tile": stats.tile,  # 0: masks per entry; t: masks per t x t tile
        "achieved_blocks": {"block_size": tile, **block_sparsity(masks, stats, tile)},
        "spec": spec.to_dict(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config or {},
    }
    return MaskSet(masks, meta)


def _warn_unreached(spec: PruningSpec, targets: dict[str, float], pruned_kinds: list[str], masks: dict[str, Tensor],
                    stats: AttentionStats, by_kind: dict[str, float]) -> None:
    """Warn if no site has a pruned kind, or a target is out of reach (rows keep their best entry or tile)."""
    if not pruned_kinds:
        warnings.warn(f"the pruning targets name site kinds {sorted(targets)} but this model's sites are "
                      f"{sorted(set(stats.kinds.values()))}: nothing is pruned", stacklevel=3)
        reached = []
    elif isinstance(spec.target, dict):
        reached = [(f"{k} target sparsity {targets[k]:.1%}", targets[k], by_kind[k]) for k in pruned_kinds]
    else:  # one target over the pruned sites together
        sel = {n: m for n, m in masks.items() if stats.kinds[n] in targets}
        got = achieved_sparsity(sel, stats)["overall"]
        reached = [(f"target sparsity {float(spec.target):.1%}", float(spec.target), got)]
    # sink_window moves in whole diagonal stripes (one window step), the other policies entry by entry
    tolerance = 0.05 if spec.policy == "sink_window" else 0.005
    for what, target, got in reached:
        if got < target - tolerance:
            warnings.warn(f"{what} is out of reach: achieved {got:.1%} (every query row keeps its best "
                          f"{'tile' if spec.block_size else 'entry'}); use smaller pruning.block_size or longer "
                          f"sequences", stacklevel=3)
