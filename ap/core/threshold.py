"""Thresholding policies: calibrated statistics → fixed boolean keep-masks.

For a target sparsity ``s`` the policy prunes the lowest-scoring *valid* entries until they make up ``s`` of the valid
entries, where each entry weighs as much as it was valid in the calibration data (its count). Fixed-length causal LM
blocks make every lower-triangle entry equally weighted; with variable lengths, positions that real inputs rarely reach
cannot buy sparsity. Scores: ``ap`` = the mean attention probability (the paper), ``random`` = a seeded random score
(the baseline with the same sparsity per scope). ``sink_window`` is a static, input-independent baseline (the pattern
of StreamingLLM): query ``i`` keeps key ``j`` iff ``j < sinks`` (attention sinks) or ``j`` is within a window of ``w``
keys of ``i``: ``i - w < j <= i`` for causal sites (``dec_self``), the band ``|i - j| < w`` for ``enc_self`` and
``cross`` (cross-attention around the aligned position ``j = i``). ``sinks`` is fixed (``SINKS``); the window ``w >= 1``
(the diagonal is always kept) is sized per scope so that the pruned, count-weighted fraction of valid entries is the
closest to the target (ties: the larger window), so it is met up to one window step (about one row's worth of
entries per site). A target above what sinks + diagonal allow gives ``w = 1``, and the achieved sparsity says so.
A row's best entry (kept below) is its nearest valid key, so a cross-attention row past the band keeps one.

Scopes (which entries share one threshold): ``layer`` (one per site — the paper's default), ``head`` (one per site and
head), ``global`` (one for every pruned site together, so sites with larger scores keep more; with per-kind targets
``{kind: sparsity}``, one per site kind).

For ``sink_window``, ``scope="head"`` sizes the window per head but, as counts are per site, gives every head the
same pattern; ``scope="global"`` is one window ``w`` for every pruned site together (one per kind with per-kind
targets), the analogue of one threshold: sites with longer sequences lose more.

Every query row that has valid entries keeps its best-scoring one (no all-masked softmax row); these forced entries
count as kept, and the remaining candidates are pruned until the target is met, so the target is still hit exactly
(up to the weight of one entry) as long as it is below ``1 - rows/entries``. Entries never valid in calibration stay
kept (True), except causal-future entries, which are False.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from .attention import empty_tiles, tile_sum
from .errors import APError
from .sites import SiteKind
from .spec import PruningSpec
from .stats import AttentionStats

SINKS = 4  # sink_window: the first SINKS keys every query keeps (StreamingLLM's attention sinks)


def _prune_lowest(scores: Tensor, weights: Tensor, protected: Tensor, sparsity: float) -> Tensor:
    """Bool of ``scores.shape``: True for the lowest scores whose weights sum closest to ``sparsity`` × total weight.

    Candidates are entries with ``weights > 0`` that are not ``protected``; the total counts every weighted entry.
    """
    flat_s, flat_w = scores.reshape(-1), weights.reshape(-1)
    target = sparsity * float(flat_w.sum())
    cand = ((flat_w > 0) & ~protected.reshape(-1)).nonzero(as_tuple=True)[0]  # (N,)
    order = cand[torch.argsort(flat_s[cand], stable=True)]  # candidates, ascending score
    cum = flat_w[order].cumsum(0)  # (N,)
    n = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))  # cum[n-1] < target <= cum[n]
    if n < len(cum) and abs(float(cum[n]) - target) < abs(target - (float(cum[n - 1]) if n else 0.0)):
        n += 1  # the closer of the two neighbouring cut points
    pruned = torch.zeros_like(flat_w, dtype=torch.bool)
    pruned[order[:n]] = True
    return pruned.view(scores.shape)


def _prune_beyond_window(dist: Tensor, weights: Tensor, protected: Tensor, sparsity: float) -> Tensor:
    """Bool of ``dist.shape``: True for the candidates with ``dist >= w``, the window ``w >= 1`` whose pruned weight is
    closest to ``sparsity`` × total weight (ties: the larger window, fewer pruned).

    ``dist`` holds integer distances to the diagonal; candidates are as in ``_prune_lowest``. Entries at one distance
    are pruned or kept together (a window, unlike a threshold, cannot split them).
    """
    flat_d, flat_w = dist.reshape(-1), weights.reshape(-1)
    target = sparsity * float(flat_w.sum())
    cand = (flat_w > 0) & ~protected.reshape(-1)
    hist = torch.bincount(flat_d[cand], flat_w[cand], minlength=2)  # (D,) candidate weight per distance
    beyond = hist.flip(0).cumsum(0).flip(0)  # (D,) beyond[w] = weight pruned by window w
    pruned_by = torch.cat([beyond[1:], beyond.new_zeros(1)])  # (D,) pruned by w = 1..D (w = D keeps everything)
    gap = (pruned_by - target).abs()  # (D,)
    w = 1 + int((gap == gap.min()).nonzero().max())  # the closest cut; on ties the larger window
    return (cand & (flat_d >= w)).view(dist.shape)


def _distances(kind: SiteKind, q: int, k: int, shift: int = 0) -> Tensor:
    """``(q, k)`` int64 distance of key ``j`` from query ``i``: ``i + shift - j`` (causal; the future is never valid;
    ``shift`` = the site's causal shift, in units) or ``|i - j|`` (a band, for ``enc_self`` and ``cross``)."""
    d = torch.arange(q)[:, None] + shift - torch.arange(k)[None, :]  # (q, k)
    return d.clamp(min=0) if kind.causal else d.abs()


def _diagonal_units(q: int, k: int, shift: int, unit: int) -> Tensor:
    """``(ceil(q/unit), ceil(k/unit))`` bool: the units (entries, or ``unit``-tiles) holding an entry ``j = i + shift``
    (each query's own key; ``shift`` = the causal shift of a site with memory keys, else 0)."""
    i = torch.arange(q)
    i = i[i + shift < k]  # (n,) queries whose own key exists
    out = torch.zeros(-(-q // unit), -(-k // unit), dtype=torch.bool)
    out[i // unit, (i + shift) // unit] = True
    return out


def _causal_units(q: int, k: int, shift: int, unit: int) -> Tensor:
    """``(ceil(q/unit), ceil(k/unit))`` bool: the units holding an entry some query may see (``j <= i + shift``)."""
    last_q = ((torch.arange(-(-q // unit)) + 1) * unit - 1).clamp(max=q - 1)  # (Qu,) last query of each unit row
    first_k = torch.arange(-(-k // unit)) * unit  # (Ku,)
    return first_k[None, :] <= last_q[:, None] + shift  # (Qu, Ku)


def block_sparsity(masks: dict[str, Tensor], stats: AttentionStats, block_size: int) -> dict[str, float]:
    """Fraction of tiles with valid entries whose valid entries are all pruned (what a block-sparse kernel skips).

    Tiled statistics (``stats.tile``) and their tile masks are counted per tile (``block_size`` must be the tile)."""
    if stats.tile and block_size != stats.tile:
        raise APError(f"statistics per {stats.tile}-tile report empty tiles of that size, not {block_size}")
    unit = 1 if stats.tile else block_size
    out: dict[str, float] = {}
    tot_p = tot_v = 0
    for n, keep in masks.items():
        p, v = empty_tiles(keep, (stats.count[n] > 0).expand_as(keep), unit)
        out[n] = p / v if v else 0.0
        tot_p, tot_v = tot_p + p, tot_v + v
    return {"overall": tot_p / tot_v if tot_v else 0.0, **out}


def _row_best(scores: Tensor, valid: Tensor) -> Tensor:
    """``(H, Q, K)`` bool: the highest-scoring valid entry of every row that has one."""
    best = scores.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)  # (H, Q, 1)
    return torch.zeros_like(valid).scatter_(-1, best, True) & valid



@dataclass
class Units:
    """What is pruned or kept as a whole, per site: entries ``(H, Q, K)`` or ``block_size``-tiles ``(H, Qb, Kb)``."""

    stats: AttentionStats
    spec: PruningSpec
    names: list[str]  # every site, in the statistics' order
    shapes: dict[str, tuple[int, int]]  # element (Q, K) of each site
    shift: dict[str, int]  # causal shift (memory keys before the segment), in entries; 0 for non-causal sites
    weights: dict[str, Tensor]  # (H, Qu, Ku) calibration count of each unit's valid entries

    @property
    def unit(self) -> int:
        return self.spec.block_size or 1

    @property
    def tiled(self) -> bool:
        """The statistics are already per tile: units are tiles, masks stay tiles."""
        return self.stats.tile > 0

    def kind(self, name: str) -> SiteKind:
        return SiteKind(self.stats.kinds[name])

    @classmethod
    def of(cls, stats: AttentionStats, spec: PruningSpec) -> "Units":
        names = list(stats.sum)
        shapes = {n: tuple(s[2:]) for n, s in stats.signature().items()}
        shift = {n: shapes[n][1] - shapes[n][0] if SiteKind(stats.kinds[n]).causal else 0 for n in names}
        weights = {n: stats.count[n].expand_as(stats.sum[n]) for n in names}  # (H, Q, K)
        if spec.block_size and not stats.tile:
            weights = {n: tile_sum(w, spec.block_size) for n, w in weights.items()}  # (H, Qb, Kb)
        return cls(stats, spec, names, shapes, shift, weights)


ScoreFn = Callable[[Units, torch.Generator], dict[str, Tensor]]


@dataclass(frozen=True)
class Policy:
    """A pruning policy: per-unit scores (higher = kept longer), cut per group by a threshold or, for ``window``
    policies whose scores are minus integer distances to the diagonal, by one window; ``sinks``: sink keys it keeps."""

    scores: ScoreFn
    window: bool = False
    sinks: int = 0


POLICIES: dict[str, Policy] = {}


def register_policy(name: str, window: bool = False, sinks: int = 0) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register ``scores(units, generator) -> {site: (H, Qu, Ku) scores}`` as ``pruning.policy=name``."""
    def add(fn: ScoreFn) -> ScoreFn:
        POLICIES[name] = Policy(fn, window, sinks)
        return fn
    return add


@register_policy("ap")
def _ap_scores(u: Units, gen: torch.Generator) -> dict[str, Tensor]:
    """The mean calibrated probability of each unit (``score=row``: times its row's number of valid keys)."""
    sums = dict(u.stats.sum)  # (H, Q, K)
    if u.spec.score == "row":  # relative to a uniform row: times the row's number of valid keys
        sums = {n: t * (u.stats.count[n] > 0).sum(-1, keepdim=True).to(t.dtype) for n, t in sums.items()}
    if u.spec.block_size and not u.tiled:
        sums = {n: tile_sum(t, u.spec.block_size) for n, t in sums.items()}  # (H, Qb, Kb)
    return {n: sums[n] / u.weights[n].clamp(min=1) for n in u.names}


@register_policy("random")
def _random_scores(u: Units, gen: torch.Generator) -> dict[str, Tensor]:
    """A seeded uniform score per unit: the baseline with the same sparsity per scope."""
    return {n: torch.rand(u.weights[n].shape, generator=gen, dtype=torch.float64) for n in u.names}


@register_policy("sink_window", window=True, sinks=SINKS)
def _window_scores(u: Units, gen: torch.Generator) -> dict[str, Tensor]:
    """Minus each unit's distance (in units) to the diagonal: the nearest unit is the best."""
    return {n: -_distances(u.kind(n), *u.weights[n].shape[1:], u.shift[n] // u.unit).expand_as(u.weights[n]).double()
            for n in u.names}


def _protected(u: Units, scores: dict[str, Tensor], sink_keys: int) -> dict[str, Tensor]:
    """``{site: (H, Qu, Ku) bool}``: units kept whatever the target (each row's best, diagonal tiles, sinks)."""
    protected = {n: _row_best(scores[n], u.weights[n] > 0) for n in u.names}  # each (block) row's best valid unit
    if u.spec.block_size:  # self-attention: the diagonal tiles instead
        for n in u.names:
            if u.kind(n) is not SiteKind.CROSS:
                diag = _diagonal_units(*u.shapes[n], u.shift[n], u.unit).expand_as(u.weights[n])  # (H, Qb, Kb)
                protected[n] = diag & (u.weights[n] > 0)
    memory = [n for n in u.names if u.shift[n] > 0]  # keys = memory slots, then the segment (Transformer-XL)
    if sink_keys and memory:
        # a key slot of a fixed mask is no fixed token there: slots 0..N-1 are the oldest memory slots (empty at a
        # stream's start), never the stream's first tokens, so "sinks" have no meaning on these sites
        what = "pruning=sink_window" if POLICIES[u.spec.policy].window else f"pruning.keep_sinks={u.spec.keep_sinks}"
        raise APError(f"{what} keeps each row's first keys, but site {memory[0]!r} has memory keys (its first "
                      f"{u.shift[memory[0]]} key slots are memory, oldest first, not the stream's first tokens): use "
                      f"pruning.keep_sinks=0 and another policy, or model.mem_len=0")
    if sink_keys:  # the sink keys (tiles holding one) are always kept
        n_sink = -(-sink_keys // u.unit)
        for n in u.names:
            sink = torch.arange(u.weights[n].shape[-1]) < n_sink  # (Ku,)
            protected[n] = protected[n] | (sink & (u.weights[n] > 0))
            if u.spec.keep_sinks and u.kind(n) is not SiteKind.CROSS:  # and the diagonal
                diag = _diagonal_units(*u.shapes[n], u.shift[n], u.unit)  # (Qu, Ku)
                protected[n] = protected[n] | (diag & (u.weights[n] > 0))
    return protected


Group = tuple[float, list[tuple[str, Optional[int]]]]  # (target, [(site, head or None = every head)])


def _groups(u: Units, selected: list[str]) -> list[Group]:
    """The units that share one threshold (or window), with their target, by ``spec.scope``."""
    per_kind, target = u.spec.targets(), u.spec.target
    if u.spec.scope == "global" and not isinstance(target, dict):  # one threshold over every pruned site
        return [(float(target), [(n, None) for n in selected])] if selected else []
    if u.spec.scope == "global":  # one threshold per kind
        members = {kind: [(n, None) for n in selected if u.stats.kinds[n] == kind] for kind in per_kind}
        return [(s, members[kind]) for kind, s in per_kind.items() if members[kind]]
    groups: list[Group] = []
    for n in selected:
        heads = [None] if u.spec.scope == "layer" else range(u.stats.sum[n].shape[0])
        groups += [(per_kind[u.stats.kinds[n]], [(n, h)]) for h in heads]
    return groups


def _cut(u: Units, groups: list[Group], scores: dict[str, Tensor], protected: dict[str, Tensor],
         window: bool) -> dict[str, Tensor]:
    """``{site: (H, Qu, Ku) bool}`` True = pruned: each group's lowest scores (or units beyond its window) up to its
    target, over the group's units together."""
    pruned = {n: torch.zeros_like(u.weights[n], dtype=torch.bool) for n in u.names}

    def part(t: dict[str, Tensor], n: str, h: Optional[int]) -> Tensor:
        return t[n] if h is None else t[n][h]

    for s, members in groups:
        cat_w = torch.cat([part(u.weights, n, h).reshape(-1) for n, h in members])
        cat_k = torch.cat([part(protected, n, h).reshape(-1) for n, h in members])
        cat_s = torch.cat([part(scores, n, h).reshape(-1) for n, h in members])
        if window:  # one window for the group; scores are minus integer distances
            cat_p = _prune_beyond_window((-cat_s).long(), cat_w, cat_k, s)
        else:  # one threshold for the group
            cat_p = _prune_lowest(cat_s, cat_w, cat_k, s)
        offset = 0
        for n, h in members:
            view = part(pruned, n, h)
            view.copy_(cat_p[offset:offset + view.numel()].view_as(view))
            offset += view.numel()
    return pruned


def build_masks(stats: AttentionStats, spec: PruningSpec, sites: Optional[Iterable[str]] = None,
                sinks: Optional[int] = None) -> dict[str, Tensor]:
    """Masks ``{site: (H, Q, K) bool, True = keep}`` pruning ``spec.target`` of each scope's valid entries.

    ``spec.kinds`` are the site kinds to prune (None = all); ``sites`` restricts pruning further to those site names.
    Sites not pruned get all-True masks (causal sites: the lower triangle). A float target is one target for every
    pruned site: with ``scope="global"`` one threshold across all of them. A dict ``{site_kind: float}`` (e.g.
    ``{"cross": 0.5, "enc_self": 0.9}``) gives per-kind targets, kinds not listed are not pruned: with
    ``scope="global"`` one threshold per kind.
    ``block_size > 0`` prunes whole ``block_size × block_size`` tiles instead of entries (what a block-sparse kernel can
    skip): a tile's ``ap`` score is its mean calibrated probability over its valid occurrences, its weight the count of
    its valid entries. Self-attention sites always keep their diagonal tiles (every query keeps its own and its
    nearest keys); cross-attention block rows keep their best tile. The target is met up to the weight of one tile,
    unless the kept diagonal alone exceeds ``1 - sparsity`` (short sequences, big tiles): then everything else is pruned.
    ``policy="sink_window"`` keeps the first ``sinks`` (default ``SINKS``) keys and a window sized per scope (see the
    module docstring); with ``block_size`` the same pattern on tiles: the first ``ceil(sinks / block_size)`` key tiles
    and a window of tiles around the diagonal tiles, sized on the tiles' weights.
    ``score`` (``ap`` only): ``mean`` ranks entries by their mean probability (the paper); ``row`` by the mean times the
    number of valid keys of the entry's query row, i.e. relative to a uniform row (causal row ``i`` has ``i + 1`` keys,
    so raw means, about ``1/(i+1)``, would rank whole early rows above late ones). Tiles: the count-weighted mean.
    ``keep_sinks > 0`` (any policy): every valid row also keeps its first ``keep_sinks`` keys (attention sinks) and,
    for self-attention, its diagonal entry (tiles holding them), counted as kept; ``sink_window`` keeps
    ``max(sinks, keep_sinks)`` sink keys.
    Tiled statistics (``stats.tile > 0``) need ``block_size == stats.tile`` and give tile masks ``(H, Qb, Kb)``
    (True = keep the tile; causality inside diagonal tiles is the site's), the same tiles as element-wise statistics
    thresholded with that ``block_size``; ``score="row"`` needs element-wise statistics.
    """
    spec = dataclasses.replace(spec, tile=stats.tile).validate(POLICIES)
    if spec.policy not in POLICIES:
        raise APError(f"unknown pruning policy {spec.policy!r}; choose one of {tuple(POLICIES)}")
    policy = POLICIES[spec.policy]
    if sinks is not None and sinks < 0:
        raise APError(f"sinks must be >= 0 (the first keys every query keeps under sink_window), got {sinks}")
    policy_sinks = policy.sinks if sinks is None or not policy.sinks else sinks
    u = Units.of(stats, spec)
    per_kind = spec.targets()
    only = None if sites is None else set(sites)
    selected = [n for n in u.names if (only is None or n in only) and stats.kinds[n] in per_kind]  # sites pruned
    scores = policy.scores(u, torch.Generator().manual_seed(spec.seed))
    protected = _protected(u, scores, max(policy_sinks, spec.keep_sinks))
    pruned = _cut(u, _groups(u, selected), scores, protected, policy.window)
    masks = {}
    for n in u.names:
        if spec.block_size and not u.tiled:  # tiles back to entries
            _, q, k = stats.sum[n].shape
            pruned[n] = pruned[n].repeat_interleave(spec.block_size, 1).repeat_interleave(spec.block_size, 2)[:, :q, :k]
        keep = ~pruned[n]  # (H, Q, K); tiled: (H, Qb, Kb)
        if u.kind(n).causal:  # causal-future entries (tiles holding none other) are never kept
            keep &= _causal_units(*u.shapes[n], u.shift[n], stats.tile or 1)
        masks[n] = keep
    return masks

def achieved_by_kind(masks: dict[str, Tensor], stats: AttentionStats) -> dict[str, float]:
    """Fraction of valid entries pruned per site kind (``enc_self``, ``dec_self``, ``cross``), count-weighted."""
    pruned: dict[str, float] = {}
    total: dict[str, float] = {}
    for n, keep in masks.items():
        w = stats.count[n].expand_as(keep)  # (H, Q, K)
        kind = stats.kinds[n]
        pruned[kind] = pruned.get(kind, 0.0) + float((w * ~keep).sum())
        total[kind] = total.get(kind, 0.0) + float(w.sum())
    return {k: pruned[k] / total[k] if total[k] else 0.0 for k in total}


def achieved_sparsity(masks: dict[str, Tensor], stats: AttentionStats) -> dict[str, float]:
    """Fraction of valid entries (weighted by their calibration count) pruned: ``{"overall": f, site: f, ...}``."""
    out: dict[str, float] = {}
    tot_p = tot_w = 0.0
    for n, keep in masks.items():
        w = stats.count[n].expand_as(keep)  # (H, Q, K)
        p, t = float((w * ~keep).sum()), float(w.sum())
        out[n] = p / t if t else 0.0
        tot_p, tot_w = tot_p + p, tot_w + t
    return {"overall": tot_p / tot_w if tot_w else 0.0, **out}
