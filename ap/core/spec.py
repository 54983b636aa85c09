"""``PruningSpec``: everything that decides which attention entries a pruning run removes, in one checked value.

The same spec drives thresholding (``build_masks``), mask files (``meta["spec"]``) and the resume check (a checkpoint's
masks must have been made with an equal spec). ``PruningConfig.spec()`` builds it from ``cfg.pruning``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from .errors import APError
from .sites import SiteKind

KINDS = tuple(k.value for k in SiteKind)  # enc_self, dec_self, cross
SCOPES = ("layer", "head", "global")  # which entries share one threshold: a site, a site's head, every pruned site
SCORES = ("mean", "row")  # ap's ranking: mean probability (the paper), or it times the row's number of valid keys
# policies without a threshold step: "none" = no masks (dense baseline, or masks read from a file)
NO_MASKS = "none"


@dataclass(frozen=True)
class PruningSpec:
    """How to turn calibrated statistics into keep-masks.

    ``target``: the fraction of valid entries to prune, one float for every pruned kind, or ``{kind: fraction}`` (kinds
    left out stay dense). ``kinds``: the site kinds to prune (None = every kind; with a dict target, its keys).
    ``tile > 0``: the statistics are per ``tile × tile`` tile (``pruning.tiled=true``), so ``block_size == tile``.
    """

    target: float | Mapping[str, float] = 0.9
    kinds: Optional[tuple[str, ...]] = None
    scope: str = "layer"  # layer | head | global
    policy: str = "ap"  # a registered policy (ap.core.threshold.POLICIES) or "none"
    score: str = "mean"  # ap's ranking: mean | row
    seed: int = 0  # random policy
    block_size: int = 0  # 0 = entries; N = whole N x N tiles
    keep_sinks: int = 0  # N > 0: every row keeps its first N keys and (self-attention) its diagonal
    tile: int = 0  # statistics per tile (0 = per entry)

    def __post_init__(self) -> None:
        if self.kinds is not None and not isinstance(self.kinds, tuple):  # a list, a generator or one kind
            kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
            object.__setattr__(self, "kinds", kinds)
        if isinstance(self.target, Mapping):
            object.__setattr__(self, "target", {k: float(v) for k, v in self.target.items()})

    def validate(self, policies: Iterable[str] = ()) -> "PruningSpec":
        """Raise ``APError`` naming the ``pruning.`` key to fix; ``policies``: the registered policy names."""
        for s in self.targets().values():
            if not 0.0 <= s < 1.0:
                raise APError(f"sparsity must be in [0, 1), got {s}")
        if self.scope not in SCOPES:
            raise APError(f"unknown pruning scope {self.scope!r}; choose one of {SCOPES}")
        if self.score not in SCORES:
            raise APError(f"unknown pruning score {self.score!r}; choose one of {SCORES}")
        known = (*policies, NO_MASKS)
        if policies and self.policy not in known:
            raise APError(f"unknown pruning policy {self.policy!r}; choose one of {tuple(policies)}")
        if self.block_size < 0:
            raise APError(f"block_size must be >= 0 (0 = element-wise), got {self.block_size}")
        if self.keep_sinks < 0:
            raise APError(f"keep_sinks must be >= 0 (the first keys every query keeps), got {self.keep_sinks}")
        if self.tile and self.tile != self.block_size:
            raise APError(f"these statistics were accumulated per {self.tile}x{self.tile} tile: threshold them with "
                          f"pruning.block_size={self.tile} (got {self.block_size}), or calibrate again element-wise")
        if self.tile and self.policy == "ap" and self.score == "row":
            raise APError("pruning.score=row needs element-wise statistics (each row's valid keys); calibrate with "
                          "pruning.tiled=false or use pruning.score=mean")
        return self

    def targets(self) -> dict[str, float]:
        """``{kind: fraction}`` of every site kind that is pruned (raises ``APError`` for an unknown kind)."""
        chosen = list(KINDS if self.kinds is None else self.kinds)
        given = list(self.target) if isinstance(self.target, Mapping) else []
        for k in chosen + given:
            if k not in KINDS:
                raise APError(f"unknown site kind {k!r} in the pruning targets; use one of {list(KINDS)}")
        if isinstance(self.target, Mapping):
            return {k: s for k, s in self.target.items() if k in chosen}
        return {k: float(self.target) for k in chosen}

    def with_tile(self, tile: int) -> "PruningSpec":
        """This spec for statistics per ``tile`` (0 = per entry), checked."""
        return dataclasses.replace(self, tile=tile).validate()

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, no tuples) for mask-file meta and comparisons."""
        d = dataclasses.asdict(self)
        d["kinds"] = None if self.kinds is None else list(self.kinds)
        return d

    def difference(self, meta: Mapping[str, Any]) -> Optional[tuple[str, Any, Any]]:
        """The first setting where masks made with ``meta`` (a mask file's meta) differ from this spec, as
        ``(key, theirs, ours)``, or None. ``kinds`` compares the kinds the model has; settings that masks written by
        older versions do not record count as the paper's (``score=mean``, no sinks, entry statistics)."""
        kinds = sorted(self.target) if isinstance(self.target, Mapping) else self.kinds
        if kinds is not None:  # meta lists the kinds actually pruned: those of the model's sites
            present = {site[0] for site in meta.get("model", {}).get("sites", {}).values()}
            kinds = sorted(k for k in kinds if k in present)
        target = dict(self.target) if isinstance(self.target, Mapping) else self.target
        ours = {"sparsity": target, "kinds": kinds, "scope": self.scope, "policy": self.policy,
                "block_size": self.block_size, "score": self.score, "keep_sinks": self.keep_sinks, "tile": self.tile}
        defaults = {"score": "mean", "keep_sinks": 0, "tile": 0}
        for key, value in ours.items():
            theirs = meta.get(key, defaults.get(key))
            if key == "kinds" and (value is None or theirs is None):
                continue  # every kind, or masks written before kinds were recorded
            if theirs != value:
                return key, theirs, value
        return None
