"""``AttentionStats``: running mean of attention probabilities per site × head × query position × key position.

Entries are accumulated at *real token positions* (padding removed, whatever its side); padding queries/keys,
causal-future entries and, at a sliding-window site, keys outside the window (``i - j >= window``) add nothing: their
count stays 0, so thresholding (which weighs entries by count) and achieved sparsity ignore them. Each entry keeps its
own count, so ``mean = sum / count`` divides by how often that entry was valid, not by the number of batches. The
count is the same for every head of a site, so it is stored once per site as ``(Q, K)``. Sums are float64 so that
merging and all-reducing do not depend on summation order in practice.

``tile > 0`` accumulates per ``tile × tile`` tile instead of per entry: ``sum (H, Qb, Kb)`` adds the probabilities
of a tile's valid entries, ``count (Qb, Kb)`` counts them (``Qb = ceil(Q / tile)``), so ``sum / count`` is the tile's
count-weighted mean probability, exactly what ``build_masks(..., PruningSpec(block_size=tile))`` scores tiles by from
element-wise statistics. Memory falls by ``tile²``: element-wise statistics of SmolLM2 (30 sites × 9 heads) at 4,096
positions would take 36 GB, per 64-tile 9 MB. Files: version 1 = element-wise, version 2 = tiled (``tile`` and each
site's ``shapes`` ``[H, Q, K]`` added).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import tile_sum
from .errors import APError, MaskError
from .files import load_user_file
from .masks import signature_difference
from .sites import AttentionSite, SiteKind, model_signature


class AttentionStats:
    """Per-site ``sum (H, Q, K)`` and ``count (Q, K)`` of attention probabilities over valid entries (with ``tile``:
    per tile, ``(H, Qb, Kb)`` and ``(Qb, Kb)``)."""

    def __init__(self, tile: int = 0) -> None:
        if tile < 0:
            raise APError(f"statistics tile must be >= 0 (0 = per entry), got {tile}")
        self.tile = tile
        self.sum: dict[str, Tensor] = {}  # (H, Q, K) float64; tiled: (H, Qb, Kb)
        self.count: dict[str, Tensor] = {}  # (Q, K) float64; tiled: (Qb, Kb)
        self.shapes: dict[str, tuple[int, int, int]] = {}  # the site's (n_heads, max_q, max_k)
        self.kinds: dict[str, str] = {}
        self.batches = 0
        self.tokens = 0

    def add_site(self, name: str, kind: SiteKind | str, n_heads: int, max_q: int, max_k: int) -> None:
        if name not in self.sum:
            q, k = (-(-max_q // self.tile), -(-max_k // self.tile)) if self.tile else (max_q, max_k)
            self.sum[name] = torch.zeros(n_heads, q, k, dtype=torch.float64)
            self.count[name] = torch.zeros(q, k, dtype=torch.float64)
            self.shapes[name] = (n_heads, max_q, max_k)
            self.kinds[name] = SiteKind(kind).value

    def record(self, site: AttentionSite, probs: Tensor, q_pos: Tensor, k_pos: Tensor) -> None:
        """Recorder for ``AttentionSite``: add one batch of ``probs (B, H, Tq, Tk)`` at positions ``(1|B, T)``."""
        self.add_site(site.name, site.kind, site.n_heads, site.max_q, site.max_k)
        self.update(site.name, probs, q_pos, k_pos, window=site.sliding_window)

    @torch.no_grad()
    def update(self, name: str, probs: Tensor, q_pos: Tensor, k_pos: Tensor, window: Optional[int] = None) -> None:
        """Accumulate ``probs (B, H, Tq, Tk)``; ``q_pos (1|B, Tq)``, ``k_pos (1|B, Tk)`` are real positions, -1 = pad.

        ``window``: the site's sliding window; an entry is valid only if ``q_pos - k_pos < window``.
        """
        total, count = self.sum[name], self.count[name]
        t = self.tile
        n_heads, max_q, max_k = self.shapes[name]
        self._check_range(name, int(q_pos.max()), int(k_pos.max()))
        q0 = int(q_pos[0, 0])
        if self.aligned(q_pos, k_pos):
            # Fast path: no padding, keys at positions 0..Tk-1, queries at q0..q0+Tq-1 (q0 = 0, or where a chunk of
            # the rows starts: a whole number of tiles)
            tq, tk = q_pos.shape[1], k_pos.shape[1]
            valid = self._valid(name, q0, tq, tk, window, probs.device)  # (Tq, Tk)
            if t:  # accumulated in float64 like the element path (bf16 tile sums were off by up to 0.4 %), without
                # a float64 copy of the probabilities; invalid entries zeroed in their own dtype (exact)
                x = probs.detach() if bool(valid.all()) else probs.detach() * valid  # (B, H, Tq, Tk)
                p = tile_sum(x, t, dtype=torch.float64).sum(dim=0)  # (H, Tq/t, Tk/t)
                self._add_tiles(name, p, valid, probs.shape[0], q0)
                return
            w = valid.to(torch.float64)
            total[:, q0:q0 + tq, :tk] += (probs.detach().to(torch.float64).sum(dim=0) * w).cpu()  # (H, Tq, Tk)
            count[q0:q0 + tq, :tk] += (w * probs.shape[0]).cpu()
            return
        probs = probs.detach().to(torch.float64)
        b = probs.shape[0]
        qp, kp = q_pos.expand(b, -1), k_pos.expand(b, -1)  # (B, Tq), (B, Tk)
        valid = (qp >= 0)[:, :, None] & (kp >= 0)[:, None, :]  # (B, Tq, Tk)
        if SiteKind(self.kinds[name]).causal:  # key j is valid for query i iff j <= i + max_k - max_q
            valid &= kp[:, None, :] <= qp[:, :, None] + max_k - max_q
        if window is not None:
            valid &= qp[:, :, None] - kp[:, None, :] < window
        bi, qi, ki = valid.nonzero(as_tuple=True)  # (N,) each
        q_unit, k_unit = (qp[bi, qi] // t, kp[bi, ki] // t) if t else (qp[bi, qi], kp[bi, ki])  # (N,) entry or tile
        flat = (q_unit * total.shape[2] + k_unit).cpu()  # (N,) index into (Q*K) or (Qb*Kb)
        vals = probs[bi, :, qi, ki].cpu()  # (N, H)
        total.view(n_heads, -1).index_add_(1, flat, vals.T)
        count.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def aligned(self, q_pos: Tensor, k_pos: Tensor) -> bool:
        """Whether a call at these positions takes the fast path: no padding, keys at 0..Tk-1, queries from a
        position that starts a tile (tiled statistics)."""
        q0 = int(q_pos[0, 0])
        return (q_pos.shape[0] == 1 and k_pos.shape[0] == 1 and int(k_pos[0, 0]) == 0 and q0 >= 0
                and q0 % max(self.tile, 1) == 0)

    @torch.no_grad()
    def update_row_tiles(self, name: str, rows: Tensor, q_pos: Tensor, k_pos: Tensor,
                         window: Optional[int] = None) -> None:
        """Tiled statistics from per-row tile sums: ``rows (B, H, Tq, ceil(Tk/tile))`` sums each query row's
        probabilities over each tile of keys, with every invalid entry exactly 0 (masked before the softmax); the
        call must be ``aligned``. Summed into tiles in float64 with the same counts as ``update``."""
        t = self.tile
        if not t or not self.aligned(q_pos, k_pos):
            raise APError(f"site {name!r}: per-row tile sums need tiled statistics and an unpadded call whose rows "
                          f"start a tile; hand the probabilities to update() instead")
        q0, tq, tk = int(q_pos[0, 0]), q_pos.shape[1], k_pos.shape[1]
        self._check_range(name, q0 + tq - 1, tk - 1)
        if tq % t:
            rows = F.pad(rows, (0, 0, 0, -tq % t))  # (B, H, Qc*t, Kc)
        p = rows.detach().unflatten(2, (-1, t)).sum(dim=(0, 3), dtype=torch.float64)  # (H, Qc, Kc)
        self._add_tiles(name, p, self._valid(name, q0, tq, tk, window, rows.device), rows.shape[0], q0)

    def _valid(self, name: str, q0: int, tq: int, tk: int, window: Optional[int], device: torch.device) -> Tensor:
        """Which entries of an aligned call are valid: ``(Tq, Tk)`` bool (causality in real positions, window)."""
        valid = torch.ones(tq, tk, dtype=torch.bool, device=device)  # (Tq, Tk)
        if SiteKind(self.kinds[name]).causal:
            _, max_q, max_k = self.shapes[name]
            valid = torch.tril(valid, diagonal=max_k - max_q + q0)  # key j is valid for query i iff j <= i + shift
        if window is not None:
            valid = torch.triu(valid, diagonal=q0 + 1 - window)  # key j >= i - window + 1
        return valid

    def _add_tiles(self, name: str, sums: Tensor, valid: Tensor, batch: int, q0: int) -> None:
        """Add tile sums ``(H, Qc, Kc)`` and the tile counts of ``valid (Tq, Tk)`` × ``batch`` at query row ``q0``."""
        t, r = self.tile, q0 // self.tile
        c = tile_sum(valid.to(torch.float64), t) * batch  # (Qc, Kc)
        self.sum[name][:, r:r + sums.shape[1], :sums.shape[2]] += sums.cpu()
        self.count[name][r:r + c.shape[0], :c.shape[1]] += c.cpu()

    def _check_range(self, name: str, q_max: int, k_max: int) -> None:
        _, max_q, max_k = self.shapes[name]
        if q_max >= max_q or k_max >= max_k:
            raise APError(f"site {name!r}: positions up to {q_max}x{k_max} exceed the statistics size {max_q}x{max_k}")

    def mean(self, name: str) -> Tensor:
        """``(H, Q, K)`` mean probability per entry (0 where the entry was never valid); tiled: per tile."""
        return self.sum[name] / self.count[name].clamp(min=1)

    def merge(self, other: "AttentionStats") -> "AttentionStats":
        """Add ``other`` into ``self`` (e.g. statistics from another data shard)."""
        if other.tile != self.tile:
            raise APError(f"cannot merge statistics per {other.tile or 'entry'} tile into statistics per "
                          f"{self.tile or 'entry'} tile; calibrate both with the same pruning.block_size/tiled")
        for name in other.sum:
            if name in self.sum:
                self.sum[name] += other.sum[name]
                self.count[name] += other.count[name]
            else:
                self.sum[name], self.count[name] = other.sum[name].clone(), other.count[name].clone()
                self.kinds[name], self.shapes[name] = other.kinds[name], other.shapes[name]
        self.batches += other.batches
        self.tokens += other.tokens
        return self

    def all_reduce(self) -> None:
        """Sum statistics over all ranks of ``torch.distributed`` (no-op when not initialised).

        Every rank must have seen every site (one forward per rank suffices, as all sites run on every batch).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        backend_device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        for name in sorted(self.sum):
            for store in (self.sum, self.count):
                t = store[name].to(backend_device)
                dist.all_reduce(t)
                store[name] = t.cpu()
        n = torch.tensor([self.batches, self.tokens], dtype=torch.float64, device=backend_device)
        dist.all_reduce(n)
        self.batches, self.tokens = int(n[0]), int(n[1])

    # --- persistence -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"format": "ap-stats", "version": 1, "sum": self.sum, "count": self.count, "kinds": self.kinds,
                 "batches": self.batches, "tokens": self.tokens}
        if self.tile:  # version 2: tiled
            state.update(version=2, tile=self.tile, shapes={n: list(s) for n, s in self.shapes.items()})
        return state

    @classmethod
    def from_state_dict(cls, state: Any, source: str = "statistics data") -> "AttentionStats":
        """Statistics from ``state_dict()`` output, checked whole (``APError`` naming ``source`` if malformed)."""
        expected = "expected format 'ap-stats'; pass the stats.pt of a calibration run"
        if not isinstance(state, dict) or state.get("format") != "ap-stats":
            hint = ("; it is an ap mask file: pass it as pruning.masks_path"
                    if isinstance(state, dict) and state.get("format") == "ap-masks" else "")
            raise APError(f"{source} is not an ap statistics file ({expected}){hint}")
        if state.get("version") not in (1, 2):
            raise APError(f"{source} has statistics version {state.get('version')}; this ap reads versions 1 and 2")
        tile = state.get("tile", 0) if state["version"] == 2 else 0
        shapes = state.get("shapes") if state["version"] == 2 else None
        if state["version"] == 2 and not (isinstance(tile, int) and tile > 0 and isinstance(shapes, dict)):
            raise APError(f"{source} is damaged: version 2 (tiled) statistics need an int 'tile' > 0 and a dict "
                          f"'shapes' ({expected})")
        total, count, kinds = state.get("sum"), state.get("count"), state.get("kinds")
        batches, tokens = state.get("batches"), state.get("tokens")
        if not all(isinstance(d, dict) for d in (total, count, kinds)) or not all(
                isinstance(x, int) for x in (batches, tokens)):
            raise APError(f"{source} is damaged: it needs dicts 'sum', 'count', 'kinds' and ints 'batches', 'tokens' "
                          f"({expected})")
        if not total.keys() == count.keys() == kinds.keys():
            odd = sorted(set(total) ^ set(count) | set(total) ^ set(kinds))
            raise APError(f"{source} is damaged: site {odd[0]!r} lacks 'sum', 'count' or 'kind' ({expected})")
        valid_kinds = [k.value for k in SiteKind]
        for name in total:
            s, c = total[name], count[name]
            if kinds[name] not in valid_kinds:
                raise APError(f"{source} is damaged: site {name!r} has kind {kinds[name]!r}, not one of {valid_kinds}")
            if not (isinstance(s, Tensor) and isinstance(c, Tensor) and s.dim() == 3 and c.dim() == 2
                    and s.shape[1:] == c.shape and s.is_floating_point() and c.is_floating_point()):
                shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (s, c)]
                raise APError(f"{source} is damaged: site {name!r} needs float sum (H, Q, K) and count (Q, K), got "
                              f"{shapes[0]} and {shapes[1]} ({expected})")
            if tile:
                shape = shapes.get(name)
                units = [s.shape[0], -(-shape[1] // tile), -(-shape[2] // tile)] if isinstance(shape, list) and len(
                    shape) == 3 and all(isinstance(x, int) for x in shape) else None
                if units != list(s.shape):
                    raise APError(f"{source} is damaged: site {name!r} has shape {shape} in 'shapes', which does not "
                                  f"tile ({tile}) to its sum {tuple(s.shape)} ({expected})")
        stats = cls(tile)
        stats.shapes = {n: (tuple(shapes[n]) if tile else tuple(total[n].shape)) for n in total}
        stats.sum = {n: t.to(torch.float64) for n, t in total.items()}
        stats.count = {n: t.to(torch.float64) for n, t in count.items()}
        stats.kinds = dict(kinds)
        stats.batches, stats.tokens = batches, tokens
        return stats

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, key: str = "pruning.stats_path") -> "AttentionStats":
        """Read and check a statistics file; any problem is one ``APError`` naming ``key`` (config key) and ``path``."""
        state = load_user_file(path, key, "an ap statistics file (stats.pt of a calibration run)")
        return cls.from_state_dict(state, source=f"{key}={path}")

    def validate(self, model: nn.Module, source: str = "statistics") -> None:
        """Raise ``MaskError`` naming the first difference if these statistics were not taken on ``model``'s sites."""
        diff = signature_difference(self.signature(), model_signature(model)["sites"])
        if diff:
            raise MaskError(f"{source} do not fit this model: {diff}")

    def signature(self) -> dict[str, list]:
        """``{site: [kind, n_heads, max_q, max_k]}``, comparable with ``model_signature(model)["sites"]``."""
        return {n: [self.kinds[n], *(self.shapes[n] if self.tile else self.sum[n].shape)] for n in self.sum}
