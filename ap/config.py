"""Typed schemas for the config groups that users edit most, registered in Hydra's ConfigStore.

A pruning config file starts with ``defaults: [schema, _self_]`` so Hydra checks it against ``PruningConfig``: a
misspelt key or an unknown ``scope``/``policy`` fails while composing. Value ranges (``sparsity`` in [0, 1)) are checked
by ``check(cfg)``, which ``run.py`` calls before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ap.core.errors import APError


# layer: one threshold per attention site (the paper's default); head: one per site and head; global: one for all sites.
# (Functional API because "global" is a Python keyword; OmegaConf matches enum members by name.)
Scope = Enum("Scope", {"layer": "layer", "head": "head", "global": "global"}, type=str)


class Policy(str, Enum):
    none = "none"  # dense baseline: no masks
    ap = "ap"  # prune the entries with the lowest mean calibrated attention probability
    random = "random"  # prune random entries, same sparsity per scope (baseline)


@dataclass
class PruningConfig:
    name: str = "none"  # label in results and output paths
    policy: Policy = Policy.none
    sparsity: float = 0.0  # fraction of valid attention entries to prune, in [0, 1)
    kind_sparsity: dict[str, float] = field(default_factory=dict)  # per site kind, e.g. {cross: 0.5}; overrides sparsity
    scope: Scope = Scope.layer  # layer | head | global
    block_size: int = 0  # 0 = element-wise masks; N > 0 = prune whole N x N tiles (what block-sparse kernels skip)
    seed: int = 0  # random policy
    calibration_batches: Optional[int] = None  # cap on calibration batches (null = one full train epoch, the paper)
    reinit: bool = False  # re-initialise weights and train from scratch with masks (the paper's LM/MT recipe)
    masks_path: Optional[str] = None  # use a saved masks.pt: skips calibration and thresholding
    stats_path: Optional[str] = None  # threshold a saved stats.pt at this sparsity: skips calibration
    dense_ckpt: Optional[str] = None  # load dense weights from this Lightning checkpoint: skips dense training
    heatmaps: bool = True  # write heatmaps/<site>.png next to masks.pt

    def __post_init__(self) -> None:
        for what, s in [("sparsity", self.sparsity)] + [(f"kind_sparsity.{k}", v) for k, v in self.kind_sparsity.items()]:
            if not 0.0 <= s < 1.0:
                raise APError(f"pruning.{what}={s} is outside [0, 1): it is the fraction of attention entries pruned")
        if self.block_size < 0:
            raise APError(f"pruning.block_size={self.block_size} must be >= 0 (0 = element-wise masks)")
        bad = [k for k in self.kind_sparsity if k not in ("enc_self", "dec_self", "cross")]
        if bad:
            raise APError(f"pruning.kind_sparsity has unknown site kind {bad[0]!r}; use enc_self, dec_self or cross")

    @property
    def enabled(self) -> bool:
        return self.policy is not Policy.none or self.masks_path is not None

    def target(self) -> float | dict[str, float]:
        """The sparsity argument for ``build_masks``: one float, or per kind when ``kind_sparsity`` is set."""
        if not self.kind_sparsity:
            return self.sparsity
        return {k: self.kind_sparsity.get(k, self.sparsity) for k in ("enc_self", "dec_self", "cross")}


def register_configs() -> None:
    ConfigStore.instance().store(group="pruning", name="schema", node=PruningConfig)


def pruning_config(cfg: DictConfig) -> PruningConfig:
    """``cfg.pruning`` as a checked ``PruningConfig`` (raises ``APError`` on out-of-range values)."""
    return OmegaConf.to_object(cfg.pruning)


def check(cfg: DictConfig) -> None:
    """Checks that Hydra's type system cannot express; raises ``APError`` with the key to fix."""
    pruning_config(cfg)
    if cfg.get("ckpt_path") and cfg.pruning.get("dense_ckpt"):
        raise APError("give either ckpt_path (resume a run) or pruning.dense_ckpt (start from dense weights), not both")


def resolved(cfg: Any) -> dict[str, Any]:
    """A plain, JSON- and weights_only-safe dict of ``cfg`` (enums as strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
