"""One attention function with named backends.

``attention(q, k, v, mask=..., is_causal=..., backend=...)`` is the only place where attention is computed. Backends are
registered by name (like HF transformers' ``AttentionInterface``):

- ``eager``: explicit ``softmax(q kᵀ · scale + mask) v``; the reference for correctness and the only backend that returns
  the probabilities (used for calibration).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; with no mask and ``is_causal`` it is the fused causal
  kernel (the honest dense baseline), with a bool mask it is a masked dense kernel (correct, not faster).
- ``auto`` (resolved per call by ``AttentionSite``): ``flex`` to train on GPU without attention dropout; otherwise, when
  the mask empties at least ``AUTO_SPARSE_MIN_EMPTY`` of the valid tiles of a window of ``AUTO_SPARSE_MIN_LEN`` keys or
  more (where ``scripts/benchmark.py`` measured them ahead), ``block`` to train (or with dropout) and ``flex`` at
  inference; else ``sdpa``.
- ``block``: block-sparse attention from fused kernels (``BlockPlan``: kept tiles gathered per group of query tiles
  with the same number of kept tiles, one SDPA call per group). Forward and backward on CPU and GPU, with dropout:
  the CPU training path for block masks.
- ``flex``: FlexAttention (compiled once per shape with ``dynamic=False``) with a ``BlockMask`` built from the
  bool mask and cached, so tiles with no kept entry are skipped and kept tiles apply the exact element mask. Forward
  on CPU and GPU; backward only on GPU (torch 2.13 has no CPU backward: asking for it raises). No attention dropout.

Semantics shared by all backends:
- ``mask`` is bool, broadcastable to ``(B, H, Tq, Tk)``, True = keep.
- ``is_causal`` aligns the causal triangle to the bottom-right corner (query ``i`` sees keys ``j <= i + Tk - Tq``), so a
  single query step against a key cache of length ``Tk`` sees every cached key (incremental decoding).
- A query row with no kept key outputs zeros (and zero probabilities), never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MaskError

# fn(q, k, v, mask, is_causal, dropout_p, scale, need_probs) -> (out, probs | None)
Backend = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], bool, float, float, bool], "tuple[Tensor, Optional[Tensor]]"]
BACKENDS: dict[str, Backend] = {}
PROB_BACKENDS: set[str] = set()


def register_backend(name: str, returns_probs: bool = False) -> Callable[[Backend], Backend]:
    """Register ``fn`` as attention backend ``name``; ``returns_probs`` marks backends usable for calibration."""

    def wrap(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        if returns_probs:
            PROB_BACKENDS.add(name)
        return fn

    return wrap


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> Tensor:
    """Bool ``(Tq, Tk)``: True where query ``i`` may see key ``j`` (bottom-right aligned)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)  # (Tq, 1)
    j = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    return j <= i


def _keep(mask: Optional[Tensor], is_causal: bool, tq: int, tk: int, device: torch.device) -> Optional[Tensor]:
    """Combine an optional bool mask with the causal triangle into one bool keep-mask (or None if nothing is masked)."""
    if not is_causal:
        return mask
    causal = causal_mask(tq, tk, device)  # (Tq, Tk)
    return causal if mask is None else mask & causal


@register_backend("eager", returns_probs=True)
def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, dropout_p: float, scale: float,
    need_probs: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    tq, tk = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    keep = _keep(mask, is_causal, tq, tk, q.device)
    if keep is not None:
        # finfo.min (not -inf) keeps fully masked rows finite in forward and backward; they are zeroed below.
        att = att.masked_fill(~keep, torch.finfo(att.dtype).min)
    probs = att.softmax(dim=-1)  # (B, H, Tq, Tk)
    if keep is not None:
        probs = probs * keep.any(dim=-1, keepdim=True)  # rows with no kept key -> 0, like SDPA
    out = F.dropout(probs, p=dropout_p) @ v if dropout_p > 0 else probs @ v  # (B, H, Tq, D)
    return out, (probs if need_probs else None)


@register_backend("sdpa")
def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, dropout_p: float, scale: float,
    need_probs: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    tq, tk = q.shape[-2], k.shape[-2]
    if mask is None and (not is_causal or tq == tk):
        # Fused path: SDPA's own is_causal is top-left aligned, which equals ours only when Tq == Tk.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    else:
        keep = _keep(mask, is_causal, tq, tk, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    return out, None


def tile_sum(x: Tensor, bs: int) -> Tensor:
    """``(..., Q, K)`` → ``(..., ceil(Q/bs), ceil(K/bs))``: sums over ``bs × bs`` tiles (edges zero-padded)."""
    q, k = x.shape[-2:]
    x = F.pad(x, (0, -k % bs, 0, -q % bs))  # (..., Qb*bs, Kb*bs)
    return x.unflatten(-1, (-1, bs)).unflatten(-3, (-1, bs)).sum(dim=(-3, -1))


def empty_tiles(keep: Tensor, valid: Tensor, bs: int) -> tuple[int, int]:
    """``(tiles whose valid entries are all pruned, tiles with a valid entry)`` for bool ``keep``/``valid (..., Q, K)``."""
    has_valid = tile_sum(valid.double(), bs) > 0  # (..., Qb, Kb)
    has_kept = tile_sum((keep & valid).double(), bs) > 0
    return int((has_valid & ~has_kept).sum()), int(has_valid.expand_as(has_kept).sum())


FLEX_BLOCK_SIZE = 64  # FlexAttention tile (queries x keys): 64 beat 128 and 256 on 2 CPU cores; pair with pruning.block_size=64
_flex_compiled: Optional[Callable[..., Tensor]] = None


def flex_block_mask(keep: Tensor, block_size: int = FLEX_BLOCK_SIZE) -> Any:
    """A FlexAttention ``BlockMask`` with ``block_size`` tiles for a bool ``keep`` broadcastable to ``(B, H, Tq, Tk)``."""
    from torch.nn.attention.flex_attention import create_block_mask

    while keep.dim() < 4:
        keep = keep[None]
    b, h, tq, tk = keep.shape

    def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return keep[bi if b > 1 else 0, hi if h > 1 else 0, qi, ki]

    return create_block_mask(mask_mod, b if b > 1 else None, h if h > 1 else None, tq, tk, device=keep.device,
                             BLOCK_SIZE=block_size)


@register_backend("flex")
def flex_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Any, is_causal: bool, dropout_p: float, scale: float, need_probs: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """``mask``: a bool tensor (a ``BlockMask`` is built per call) or a prepared ``BlockMask`` (callers cache it)."""
    global _flex_compiled
    if dropout_p > 0:
        raise MaskError("the flex backend has no attention dropout: use it in eval mode or with dropout 0")
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise MaskError("flex attention has no backward on CPU (torch 2.13): train with backend sdpa or eager, "
                        "use flex for inference or on a GPU")
    if mask is None or isinstance(mask, Tensor):
        tq, tk = q.shape[-2], k.shape[-2]
        keep = _keep(mask, is_causal, tq, tk, q.device)
        mask = flex_block_mask(keep if keep is not None else torch.ones(tq, tk, dtype=torch.bool, device=q.device))
    elif is_causal:
        raise MaskError("pass causality inside the BlockMask for the flex backend")
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=mask, scale=scale), None  # rows with no kept key give 0


BLOCK_TILE = 64  # query/key tile of the block backend (matches FLEX_BLOCK_SIZE and pruning.block_size=64)


@dataclass
class BlockPlan:
    """Where the kept tiles of a fixed keep-mask are, grouped so that each group is one fused SDPA call.

    Every (head, query tile) with ``n`` kept key tiles joins group ``n``; a group holds its heads ``(c,)``, query
    positions ``(c, bs)``, gathered key positions ``(c, n*bs)`` and the element mask on them ``(c, bs, n*bs)`` (None
    when all gathered entries are kept). Query tiles with no kept key are in no group (their output is 0).
    """

    tq: int
    tk: int
    bs: int
    n_heads: int
    groups: list[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]
    rows: Tensor  # (R,) flat (head * Tq_padded + query) positions written by the groups, in group order

    @property
    def kept_tile_fraction(self) -> float:
        total = self.n_heads * -(-self.tq // self.bs) * -(-self.tk // self.bs)
        return sum(int(g[2].numel()) // self.bs for g in self.groups) / max(1, total)  # k_idx: (c, n*bs)


def block_plan(keep: Tensor, n_heads: int, bs: int = BLOCK_TILE) -> BlockPlan:
    """The ``BlockPlan`` of a bool ``keep`` ``(H|1, Tq, Tk)`` (causality folded in) for ``n_heads`` heads."""
    _, tq, tk = keep.shape
    qp, kp = -(-tq // bs) * bs, -(-tk // bs) * bs
    keep = F.pad(keep.expand(n_heads, tq, tk), (0, kp - tk, 0, qp - tq))  # (H, Qp, Kp), padding never kept
    tiles = keep.unflatten(2, (-1, bs)).unflatten(1, (-1, bs)).any(dim=4).any(dim=2)  # (H, Qb, Kb)
    counts = tiles.sum(-1)  # (H, Qb)
    ar = torch.arange(bs, device=keep.device)
    groups, rows = [], []
    for n in sorted(set(counts[counts > 0].tolist())):
        heads, qt = (counts == n).nonzero(as_tuple=True)  # (c,), (c,)
        kt = tiles[heads, qt].nonzero()[:, 1].view(-1, n)  # (c, n) kept key tiles, ascending
        k_idx = (kt[..., None] * bs + ar).flatten(1)  # (c, n*bs)
        q_idx = qt[:, None] * bs + ar  # (c, bs)
        m = keep[heads[:, None, None], q_idx[:, :, None], k_idx[:, None, :]]  # (c, bs, n*bs)
        groups.append((heads, q_idx, k_idx, None if bool(m.all()) else m))
        rows.append((heads[:, None] * qp + q_idx).flatten())
    rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=keep.device)
    return BlockPlan(tq, tk, bs, n_heads, groups, rows_t)


@register_backend("block")
def block_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Any, is_causal: bool, dropout_p: float, scale: float, need_probs: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """Block-sparse attention from fused kernels (CPU and GPU, forward and backward, dropout): per group of a
    ``BlockPlan``, gather the kept key/value tiles and call SDPA on them; pruned tiles are never computed.

    ``mask``: a prepared ``BlockPlan`` (callers cache it per position window) or a bool keep-mask (planned per call).
    """
    b, h, tq, d = q.shape
    if isinstance(mask, BlockPlan):
        if is_causal:
            raise MaskError("pass causality inside the BlockPlan for the block backend")
        plan = mask
    else:
        keep = _keep(mask, is_causal, tq, k.shape[-2], q.device)
        keep = keep if keep is not None else torch.ones(tq, k.shape[-2], dtype=torch.bool, device=q.device)
        while keep.dim() < 3:
            keep = keep[None]
        if keep.dim() == 4 and keep.shape[0] > 1:  # per-row masks (padding): batch rows become heads of one row
            keep = keep.expand(b, h, tq, k.shape[-2]).flatten(0, 1)  # (B*H, Tq, Tk)
            fold = [t.reshape(1, b * h, t.shape[-2], t.shape[-1]) for t in (q, k, v)]  # (1, B*H, T, D)
            out, _ = block_backend(*fold, keep, False, dropout_p, scale, need_probs)
            return out.view(b, h, tq, -1), None
        if keep.dim() == 4:
            keep = keep[0]
        plan = block_plan(keep, h)
    if (plan.tq, plan.tk, plan.n_heads) != (tq, k.shape[-2], h):
        raise MaskError(f"BlockPlan for {plan.n_heads} heads x {plan.tq} x {plan.tk} used on {h} x {tq} x {k.shape[-2]}")
    qp = -(-tq // plan.bs) * plan.bs
    kp = -(-plan.tk // plan.bs) * plan.bs
    q_ = F.pad(q, (0, 0, 0, qp - tq))  # (B, H, Qp, D)
    k_, v_ = F.pad(k, (0, 0, 0, kp - plan.tk)), F.pad(v, (0, 0, 0, kp - plan.tk))  # (B, H, Kp, D)
    outs = []
    for heads, q_idx, k_idx, m in plan.groups:
        hq = heads[:, None]  # (c, 1)
        og = F.scaled_dot_product_attention(q_[:, hq, q_idx], k_[:, hq, k_idx], v_[:, hq, k_idx], attn_mask=m,
                                            dropout_p=dropout_p, scale=scale)  # (B, c, bs, D)
        outs.append(og.flatten(1, 2))  # (B, c*bs, D)
    out = q.new_zeros(b, h * qp, d)  # (B, H*Qp, D): rows in no group stay 0
    if outs:
        out = out.index_copy(1, plan.rows, torch.cat(outs, dim=1))
    return out.view(b, h, qp, d)[:, :, :tq], None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Optional[Tensor | Any] = None,
    is_causal: bool = False,
    backend: str = "sdpa",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    need_probs: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Attention over ``q (B, H, Tq, D)``, ``k, v (B, H, Tk, D)`` → ``(out (B, H, Tq, D), probs (B, H, Tq, Tk) | None)``.

    ``mask``: bool, broadcastable to ``(B, H, Tq, Tk)``, True = keep (the flex backend also takes a prepared
    ``BlockMask``). ``need_probs`` requires a backend that computes them.
    """
    if backend not in BACKENDS:
        raise MaskError(f"unknown attention backend {backend!r}; choose one of {sorted(BACKENDS)} (attention.backend=...)")
    if need_probs and backend not in PROB_BACKENDS:
        raise MaskError(f"backend {backend!r} does not return attention probabilities; use one of {sorted(PROB_BACKENDS)}")
    if isinstance(mask, Tensor) and mask.dtype != torch.bool:
        raise MaskError(f"attention masks must be bool (True = keep), got {mask.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return BACKENDS[backend](q, k, v, mask, is_causal, dropout_p, scale, need_probs)
