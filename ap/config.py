"""Typed schemas for the config groups that users edit most, registered in Hydra's ConfigStore.

A pruning config file starts with ``defaults: [schema, _self_]`` so Hydra checks it against ``PruningConfig``: a
misspelt key or an unknown ``scope``/``policy`` fails while composing. Value ranges (``sparsity`` in [0, 1)) are checked
by ``check(cfg)``, which ``run.py`` calls before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import hydra.utils
from hydra.core.config_store import ConfigStore
from omegaconf import II, DictConfig, OmegaConf

from ap.core.errors import APError
from ap.core.spec import KINDS, PruningSpec


# layer: one threshold per attention site (the paper's default); head: one per site and head; global: one for all sites.
# (Functional API because "global" is a Python keyword; OmegaConf matches enum members by name.)
Scope = Enum("Scope", {"layer": "layer", "head": "head", "global": "global"}, type=str)


class Score(str, Enum):
    mean = "mean"  # the mean calibrated probability of an entry (the paper)
    row = "row"  # the mean times the number of valid keys in its query row (relative to a uniform row)


class Policy(str, Enum):
    none = "none"  # dense baseline: no masks
    ap = "ap"  # prune the entries with the lowest mean calibrated attention probability
    random = "random"  # prune random entries, same sparsity per scope (baseline)
    sink_window = "sink_window"  # static pattern: the first keys (sinks) + a local window, same sparsity (baseline)


@dataclass
class PruningConfig:
    # label in results and run directories; by default derived from policy and sparsity (ap90, random50, none), so a
    # sweep over pruning.sparsity labels each point by its own value
    name: str = "${ap.pruning_name:${.policy},${.sparsity}}"
    policy: Policy = Policy.none
    sparsity: float = 0.0  # fraction of valid attention entries to prune, in [0, 1)
    # per site kind, e.g. `pruning.kind_sparsity.cross=0.3`; null = `sparsity`
    kind_sparsity: dict[str, Optional[float]] = field(default_factory=lambda: {k: None for k in KINDS})
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # site kinds to prune; the others stay dense
    scope: Scope = Scope.layer  # layer | head | global
    score: Score = Score.mean  # ap's ranking: mean probability (the paper) | row (x valid keys of its row)
    keep_sinks: int = 0  # N > 0: every policy keeps each row's first N keys and its diagonal (attention sinks)
    block_size: int = 0  # 0 = element-wise masks; N > 0 = prune whole N x N tiles (what block-sparse kernels skip)
    # true = calibrate per block_size tile: stats.pt and masks.pt per tile, 1/block_size² of the memory (long sequences)
    tiled: bool = False
    seed: int = II("seed")  # random policy; follows the run's `seed` (a seed sweep redraws the random baseline)
    calibration_batches: Optional[int] = None  # cap on calibration batches (null = one full train epoch, the paper)
    reinit: bool = False  # re-initialise weights and train from scratch with masks (the paper's LM/MT recipe)
    finetune: bool = True  # false = training-free: dense -> calibrate -> masks -> evaluate (no dense+ft either)
    masks_path: Optional[str] = None  # use a saved masks.pt: skips calibration and thresholding
    stats_path: Optional[str] = None  # threshold a saved stats.pt at this sparsity: skips calibration
    dense_ckpt: Optional[str] = None  # load dense weights from this Lightning checkpoint: skips dense training
    heatmaps: bool = True  # write heatmaps/<site>.png next to masks.pt

    def __post_init__(self) -> None:
        for key, given in (("kind_sparsity", list(self.kind_sparsity)), ("kinds", self.kinds)):
            bad = [k for k in given if k not in KINDS]
            if bad:
                raise APError(f"pruning.{key} has unknown site kind {bad[0]!r}; use enc_self, dec_self or cross")
        given = [(f"kind_sparsity.{k}", v) for k, v in self.kind_sparsity.items() if v is not None]
        for what, s in [("sparsity", self.sparsity)] + given:
            if not 0.0 <= s < 1.0:
                raise APError(f"pruning.{what}={s} is outside [0, 1): it is the fraction of attention entries pruned")
        if self.tiled and self.block_size == 0:
            raise APError("pruning.tiled=true calibrates per pruning.block_size tile: set pruning.block_size (e.g. 64)")
        self.spec()  # the remaining checks

    def spec(self) -> PruningSpec:
        """The checked ``PruningSpec`` of this config (``tile = block_size`` when ``tiled``)."""
        name = lambda e: getattr(e, "value", e)  # noqa: E731 (enum members, or strings given in Python)
        return PruningSpec(target=self.target(), kinds=tuple(self.pruned_kinds()), scope=name(self.scope),
                           policy=name(self.policy), score=name(self.score), seed=self.seed,
                           block_size=self.block_size, keep_sinks=self.keep_sinks,
                           tile=self.block_size if self.tiled else 0).validate()

    @property
    def enabled(self) -> bool:
        return self.policy is not Policy.none or self.masks_path is not None

    def target(self) -> float | dict[str, float]:
        """The sparsity argument for ``build_masks``: one float (one target over every pruned kind; ``scope=global``
        is then one threshold over all of them), or ``{kind: sparsity}`` when ``kind_sparsity`` gives any (one
        target, and for ``scope=global`` one threshold, per kind; kinds not in ``kinds`` are left out)."""
        per_kind = {k: v for k, v in self.kind_sparsity.items() if v is not None}
        if not per_kind:
            return self.sparsity
        return {k: per_kind.get(k, self.sparsity) for k in KINDS if k in self.kinds}

    def pruned_kinds(self) -> list[str]:
        """The site kinds to prune (``kinds``, minus kinds without a target), sorted as ``MaskSet`` meta records them."""
        target = self.target()
        return sorted(k for k in self.kinds if not isinstance(target, dict) or k in target)


def pruning_name(policy: Any, sparsity: float) -> str:
    """The default label of a pruning config: ``none``, or policy + percent pruned (``ap90``, ``random37.5``)."""
    policy = getattr(policy, "value", policy)
    return "none" if policy == "none" else f"{policy}{round(100 * float(sparsity), 2):g}"


def launch_stamp() -> str:
    """``<time>_<process id>`` of the ``run.py`` process that started this job (``AP_LAUNCH``, set by ``run.py`` and
    inherited by what it starts: joblib and submitit workers, the DDP ranks Lightning starts by re-running the command
    line), so they all find the same run and sweep folders; two commands started in the same second never share one.
    Outside ``run.py``: this process's own stamp, the same for every call."""
    global _STAMP
    _STAMP = _STAMP or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"
    return os.environ.get("AP_LAUNCH") or _STAMP


_STAMP = ""


def register_configs() -> None:
    ConfigStore.instance().store(group="pruning", name="schema", node=PruningConfig)
    # `${ap.launch:}` in run and sweep directory names (conf/hydra/default.yaml)
    OmegaConf.register_new_resolver("ap.launch", launch_stamp, replace=True)
    OmegaConf.register_new_resolver("ap.pruning_name", pruning_name, replace=True)
    forget_fairseq_configs()


def forget_fairseq_configs() -> None:
    """Remove what ``import fairseq`` stored in Hydra's global ConfigStore (a primary ``config`` and groups such as
    ``model/`` and ``task/``), which breaks composing ``conf/`` (``Key 'lr' not in 'FairseqConfig'``).

    A no-op unless fairseq is imported; ours and Hydra's own entries stay.
    """
    configs = sys.modules.get("fairseq.dataclass.configs")
    if configs is None:
        return
    top = {"config.yaml"} | {f"{f.name}.yaml" for f in dataclasses.fields(configs.FairseqConfig)}

    def prune(node: dict, depth: int) -> None:
        for key in list(node):
            value = node[key]
            if isinstance(value, dict):
                prune(value, depth + 1)
                if not value:
                    del node[key]
            elif getattr(value, "provider", None) == "fairseq" or (depth == 0 and key in top):
                del node[key]

    prune(ConfigStore.instance().repo, 0)


def pruning_config(cfg: DictConfig) -> PruningConfig:
    """``cfg.pruning`` as a checked ``PruningConfig`` (raises ``APError`` on out-of-range values)."""
    return OmegaConf.to_object(cfg.pruning)


def check(cfg: DictConfig) -> None:
    """Checks that Hydra's type system cannot express; raises ``APError`` with the key to fix."""
    spec = pruning_config(cfg)
    pruning = cfg.pruning
    if not pruning.get("finetune", True) and pruning.get("reinit"):
        raise APError("pruning.reinit=true trains the pruned model from scratch: it needs pruning.finetune=true")
    if cfg.get("ckpt_path") and cfg.pruning.get("dense_ckpt"):
        raise APError("give either ckpt_path (resume a run) or pruning.dense_ckpt (start from dense weights), not both")
    sinks = spec.keep_sinks or spec.policy.value == "sink_window"
    if sinks and has_memory(cfg.get("model") or {}) and (cfg.model.get("mem_len") or 0) > 0:
        raise APError("pruning.keep_sinks / pruning=sink_window keep each row's first keys, but Transformer-XL's first "
                      "key slots are its memory (oldest first), not the stream's first tokens: use "
                      "pruning.keep_sinks=0 and another policy, or model.mem_len=0")


def has_memory(model: Any) -> bool:
    """Does the model config (``_target_``: a model config class) describe a model with memory across segments?"""
    target = model.get("_target_") if hasattr(model, "get") else None
    return bool(target) and bool(getattr(hydra.utils.get_class(target), "memory", False))


def resolved(cfg: Any) -> dict[str, Any]:
    """A plain, JSON- and weights_only-safe dict of ``cfg`` (enums as strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
