"""``AttentionStats``: running mean of attention probabilities per site × head × query position × key position.

Entries are accumulated at *real token positions* (padding removed, whatever its side); padding queries/keys,
causal-future entries and, at a sliding-window site, keys outside the window (``i - j >= window``) add nothing: their
count stays 0, so thresholding (which weighs entries by count) and achieved sparsity ignore them. Each entry keeps its
own count, so ``mean = sum / count`` divides by how often that entry was valid, not by the number of batches. The
count is the same for every head of a site, so it is stored once per site as ``(Q, K)``. Sums are float64 so that
merging and all-reducing do not depend on summation order in practice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .errors import APError, MaskError
from .files import load_user_file
from .masks import signature_difference
from .sites import AttentionSite, SiteKind, model_signature


class AttentionStats:
    """Per-site ``sum (H, Q, K)`` and ``count (Q, K)`` of attention probabilities over valid entries."""

    def __init__(self) -> None:
        self.sum: dict[str, Tensor] = {}  # (H, Q, K) float64
        self.count: dict[str, Tensor] = {}  # (Q, K) float64
        self.kinds: dict[str, str] = {}
        self.batches = 0
        self.tokens = 0

    def add_site(self, name: str, kind: SiteKind | str, n_heads: int, max_q: int, max_k: int) -> None:
        if name not in self.sum:
            self.sum[name] = torch.zeros(n_heads, max_q, max_k, dtype=torch.float64)
            self.count[name] = torch.zeros(max_q, max_k, dtype=torch.float64)
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
        causal = SiteKind(self.kinds[name]).causal
        n_heads, max_q, max_k = total.shape
        if int(q_pos.max()) >= max_q or int(k_pos.max()) >= max_k:
            raise APError(f"site {name!r}: positions up to {int(q_pos.max())}x{int(k_pos.max())} exceed the "
                          f"statistics size {max_q}x{max_k}")
        probs = probs.detach().to(torch.float64)
        if q_pos.shape[0] == 1 and k_pos.shape[0] == 1 and int(q_pos[0, 0]) == 0 and int(k_pos[0, 0]) == 0:
            # Fast path: no padding, positions 0..T-1.
            tq, tk = q_pos.shape[1], k_pos.shape[1]
            valid = torch.ones(tq, tk, dtype=torch.bool, device=probs.device)  # (Tq, Tk)
            if causal:
                valid = torch.tril(valid)
            if window is not None:
                valid = torch.triu(valid, diagonal=1 - window)  # key j >= i - window + 1
            w = valid.to(torch.float64)
            total[:, :tq, :tk] += (probs.sum(dim=0) * w).cpu()  # (H, Tq, Tk)
            count[:tq, :tk] += (w * probs.shape[0]).cpu()
            return
        b = probs.shape[0]
        qp, kp = q_pos.expand(b, -1), k_pos.expand(b, -1)  # (B, Tq), (B, Tk)
        valid = (qp >= 0)[:, :, None] & (kp >= 0)[:, None, :]  # (B, Tq, Tk)
        if causal:
            valid &= kp[:, None, :] <= qp[:, :, None]
        if window is not None:
            valid &= qp[:, :, None] - kp[:, None, :] < window
        bi, qi, ki = valid.nonzero(as_tuple=True)  # (N,) each
        flat = (qp[bi, qi] * max_k + kp[bi, ki]).cpu()  # (N,) index into (Q*K)
        vals = probs[bi, :, qi, ki].cpu()  # (N, H)
        total.view(n_heads, -1).index_add_(1, flat, vals.T)
        count.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def mean(self, name: str) -> Tensor:
        """``(H, Q, K)`` mean probability per entry (0 where the entry was never valid)."""
        return self.sum[name] / self.count[name].clamp(min=1)

    def merge(self, other: "AttentionStats") -> "AttentionStats":
        """Add ``other`` into ``self`` (e.g. statistics from another data shard)."""
        for name in other.sum:
            if name in self.sum:
                self.sum[name] += other.sum[name]
                self.count[name] += other.count[name]
            else:
                self.sum[name], self.count[name] = other.sum[name].clone(), other.count[name].clone()
                self.kinds[name] = other.kinds[name]
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
        return {"format": "ap-stats", "version": 1, "sum": self.sum, "count": self.count, "kinds": self.kinds,
                "batches": self.batches, "tokens": self.tokens}

    @classmethod
    def from_state_dict(cls, state: Any, source: str = "statistics data") -> "AttentionStats":
        """Statistics from ``state_dict()`` output, checked whole (``APError`` naming ``source`` if malformed)."""
        expected = "expected format 'ap-stats'; pass the stats.pt of a calibration run"
        if not isinstance(state, dict) or state.get("format") != "ap-stats":
            hint = ("; it is an ap mask file: pass it as pruning.masks_path"
                    if isinstance(state, dict) and state.get("format") == "ap-masks" else "")
            raise APError(f"{source} is not an ap statistics file ({expected}){hint}")
        if state.get("version") != 1:
            raise APError(f"{source} has statistics version {state.get('version')}; this ap reads version 1")
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
        stats = cls()
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
        return {n: [self.kinds[n], *self.sum[n].shape] for n in self.sum}
