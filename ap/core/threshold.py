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

from typing import Iterable, Optional

import torch
from torch import Tensor

from .attention import empty_tiles, tile_sum
from .errors import APError
from .sites import SiteKind
from .stats import AttentionStats

SCOPES = ("layer", "head", "global")
POLICIES = ("ap", "random", "sink_window")
SCORES = ("mean", "row")  # ap's score: the mean probability (the paper), or it times the row's number of valid keys
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


def kind_targets(sparsity: float | dict[str, float], kinds: Optional[Iterable[str]] = None) -> dict[str, float]:
    """The target of every site kind that is pruned: ``{kind: sparsity}`` (kinds left out stay dense).

    A float is one target for every kind in ``kinds`` (None = all kinds); a dict gives per-kind targets, restricted to
    ``kinds`` when given. Raises ``APError`` for unknown kinds or targets outside ``[0, 1)``.
    """
    valid = [k.value for k in SiteKind]
    chosen = valid if kinds is None else [kinds] if isinstance(kinds, str) else list(kinds)
    given = list(sparsity) if isinstance(sparsity, dict) else []
    for k in chosen + given:
        if k not in valid:
            raise APError(f"unknown site kind {k!r} in the pruning targets; use one of {valid}")
    if isinstance(sparsity, dict):
        targets = {k: float(s) for k, s in sparsity.items() if k in chosen}
    else:
        targets = {k: float(sparsity) for k in chosen}
    for s in targets.values():
        if not 0.0 <= s < 1.0:
            raise APError(f"sparsity must be in [0, 1), got {s}")
    return targets


def build_masks(
    stats: AttentionStats,
    sparsity: float | dict[str, float],
    scope: str = "layer",
    policy: str = "ap",
    seed: int = 0,
    sites: Optional[Iterable[str]] = None,
    block_size: int = 0,
    kinds: Optional[Iterable[str]] = None,
    sinks: int = SINKS,
    score: str = "mean",
    keep_sinks: int = 0,
) -> dict[str, Tensor]:
    """Masks ``{site: (H, Q, K) bool, True = keep}`` pruning ``sparsity`` of each scope's valid entries.

    ``kinds`` are the site kinds to prune (None = all); ``sites`` restricts pruning further to those site names. Sites
    not pruned get all-True masks (causal sites: the lower triangle). A float ``sparsity`` is one target for every
    pruned site: with ``scope="global"`` one threshold across all of them. A dict ``{site_kind: float}`` (e.g.
    ``{"cross": 0.5, "enc_self": 0.9}``) gives per-kind targets, kinds not listed are not pruned: with
    ``scope="global"`` one threshold per kind.
    ``block_size > 0`` prunes whole ``block_size × block_size`` tiles instead of entries (what a block-sparse kernel can
    skip): a tile's ``ap`` score is its mean calibrated probability over its valid occurrences, its weight the count of
    its valid entries. Self-attention sites always keep their diagonal tiles (every query keeps its own and its
    nearest keys); cross-attention block rows keep their best tile. The target is met up to the weight of one tile,
    unless the kept diagonal alone exceeds ``1 - sparsity`` (short sequences, big tiles): then everything else is pruned.
    ``policy="sink_window"`` keeps the first ``sinks`` keys and a window sized per scope (see the module docstring);
    with ``block_size`` the same pattern on tiles: the first ``ceil(sinks / block_size)`` key tiles and a window of
    tiles around the diagonal tiles, sized on the tiles' weights.
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
    if score not in SCORES:
        raise APError(f"unknown pruning score {score!r}; choose one of {SCORES}")
    if scope not in SCOPES:
        raise APError(f"unknown pruning scope {scope!r}; choose one of {SCOPES}")
    if policy not in POLICIES:
        raise APError(f"unknown pruning policy {policy!r}; choose one of {POLICIES}")
    names = list(stats.sum)
    per_kind = kind_targets(sparsity, kinds)
    only = None if sites is None else set(sites)
    selected = [n for n in names if (only is None or n in only) and stats.kinds[n] in per_kind]  # sites pruned

    if block_size < 0:
        raise APError(f"block_size must be >= 0 (0 = element-wise), got {block_size}")
    tiled = stats.tile > 0  # the statistics are already per tile: units are tiles, masks stay tiles
    if tiled and block_size != stats.tile:
        raise APError(f"these statistics were accumulated per {stats.tile}x{stats.tile} tile: threshold them with "
                      f"pruning.block_size={stats.tile} (got {block_size}), or calibrate again element-wise")
    if tiled and policy == "ap" and score == "row":
        raise APError("pruning.score=row needs element-wise statistics (each row's valid keys); calibrate with "
                      "pruning.tiled=false or use pruning.score=mean")
    if sinks < 0:
        raise APError(f"sinks must be >= 0 (the first keys every query keeps under sink_window), got {sinks}")

    # Units that are pruned or kept as a whole: entries (H, Q, K), or tiles (H, Q/bs, K/bs) with block_size.
    gen = torch.Generator().manual_seed(seed)
    unit = block_size or 1  # entries or tiles
    shapes = {n: tuple(s[2:]) for n, s in stats.signature().items()}  # element (Q, K) of each site
    shift = {n: shapes[n][1] - shapes[n][0] if SiteKind(stats.kinds[n]).causal else 0 for n in names}
    weights = {n: stats.count[n].expand_as(stats.sum[n]) for n in names}  # (H, Q, K)
    if block_size and not tiled:
        weights = {n: tile_sum(w, block_size) for n, w in weights.items()}  # (H, Qb, Kb)
    dist: dict[str, Tensor] = {}  # sink_window: each unit's distance (in units) to the diagonal, (H, Qu, Ku)
    if policy == "ap":
        sums = dict(stats.sum)  # (H, Q, K)
        if score == "row":  # relative to a uniform row: times the row's number of valid keys
            sums = {n: t * (stats.count[n] > 0).sum(-1, keepdim=True).to(t.dtype) for n, t in sums.items()}
        if block_size and not tiled:
            sums = {n: tile_sum(t, block_size) for n, t in sums.items()}  # (H, Qb, Kb)
        scores = {n: sums[n] / weights[n].clamp(min=1) for n in names}
    elif policy == "random":
        scores = {n: torch.rand(weights[n].shape, generator=gen, dtype=torch.float64) for n in names}
    else:  # sink_window: the nearest unit is the best
        dist = {n: _distances(SiteKind(stats.kinds[n]), *weights[n].shape[1:], shift[n] // unit).expand_as(weights[n])
                for n in names}
        scores = {n: -d.double() for n, d in dist.items()}
    pruned = {n: torch.zeros_like(weights[n], dtype=torch.bool) for n in names}
    protected = {n: _row_best(scores[n], weights[n] > 0) for n in names}  # each (block) row's best valid unit
    if block_size:  # self-attention: the diagonal tiles instead
        for n in names:
            if SiteKind(stats.kinds[n]) is not SiteKind.CROSS:
                diag = _diagonal_units(*shapes[n], shift[n], unit).expand_as(weights[n])  # (H, Qb, Kb)
                protected[n] = diag & (weights[n] > 0)
    if keep_sinks < 0:
        raise APError(f"keep_sinks must be >= 0 (the first keys every query keeps), got {keep_sinks}")
    n_keys = max(sinks, keep_sinks) if policy == "sink_window" else keep_sinks
    memory = [n for n in names if shift[n] > 0]  # keys = memory slots, then the segment (Transformer-XL)
    if n_keys and memory:
        # a key slot of a fixed mask is no fixed token there: slots 0..N-1 are the oldest memory slots (empty at a
        # stream's start), never the stream's first tokens, so "sinks" have no meaning on these sites
        what = "pruning=sink_window" if policy == "sink_window" else f"pruning.keep_sinks={keep_sinks}"
        raise APError(f"{what} keeps each row's first keys, but site {memory[0]!r} has memory keys (its first "
                      f"{shift[memory[0]]} key slots are memory, oldest first, not the stream's first tokens): use "
                      f"pruning.keep_sinks=0 and another policy, or model.mem_len=0")
    if n_keys:  # the sink keys (tiles holding one) are always kept
        n_sink = -(-n_keys // block_size) if block_size else n_keys
        for n in names:
            sink = torch.arange(weights[n].shape[-1]) < n_sink  # (Ku,)
            protected[n] = protected[n] | (sink & (weights[n] > 0))
            if keep_sinks and SiteKind(stats.kinds[n]) is not SiteKind.CROSS:  # and the diagonal
                diag = _diagonal_units(*shapes[n], shift[n], unit)  # (Qu, Ku)
                protected[n] = protected[n] | (diag & (weights[n] > 0))

    # Group the entries that share a threshold.
    groups: list[tuple[float, list[tuple[str, Optional[int]]]]] = []
    if scope == "global" and not isinstance(sparsity, dict):  # one threshold over every pruned site
        if selected:
            groups.append((float(sparsity), [(n, None) for n in selected]))
    elif scope == "global":  # one threshold per kind
        for kind, s in per_kind.items():
            members = [(n, None) for n in selected if stats.kinds[n] == kind]
            if members:
                groups.append((s, members))
    else:
        for n in selected:
            heads = [None] if scope == "layer" else range(stats.sum[n].shape[0])
            groups += [(per_kind[stats.kinds[n]], [(n, h)]) for h in heads]

    def part(t: dict[str, Tensor], n: str, h: Optional[int]) -> Tensor:
        return t[n] if h is None else t[n][h]

    for s, members in groups:
        cat_w = torch.cat([part(weights, n, h).reshape(-1) for n, h in members])
        cat_k = torch.cat([part(protected, n, h).reshape(-1) for n, h in members])
        if policy == "sink_window":  # one window for the group
            cat_d = torch.cat([part(dist, n, h).reshape(-1) for n, h in members])
            cat_p = _prune_beyond_window(cat_d, cat_w, cat_k, s)
        else:  # one threshold for the group
            cat_s = torch.cat([part(scores, n, h).reshape(-1) for n, h in members])
            cat_p = _prune_lowest(cat_s, cat_w, cat_k, s)
        offset = 0
        for n, h in members:
            view = part(pruned, n, h)
            view.copy_(cat_p[offset:offset + view.numel()].view_as(view))
            offset += view.numel()

    masks = {}
    for n in names:
        if block_size and not tiled:  # tiles back to entries
            _, q, k = stats.sum[n].shape
            pruned[n] = pruned[n].repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :q, :k]
        keep = ~pruned[n]  # (H, Q, K); tiled: (H, Qb, Kb)
        if SiteKind(stats.kinds[n]).causal:  # causal-future entries (tiles holding none other) are never kept
            keep &= _causal_units(*shapes[n], shift[n], stats.tile or 1)
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
