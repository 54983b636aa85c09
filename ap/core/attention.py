"""One attention function with named backends.

``attention(q, k, v, mask=..., is_causal=..., backend=...)`` is the only place where attention is computed. Backends are
registered by name (like HF transformers' ``AttentionInterface``):

- ``eager``: explicit ``softmax(q kᵀ · scale + mask) v``; the reference for correctness and the only backend that returns
  the probabilities (used for calibration).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; with no mask and ``is_causal`` it is the fused causal
  kernel (the honest dense baseline), with a bool mask it is a masked dense kernel (correct, not faster).
- ``auto`` (resolved per call by ``AttentionSite``): ``flex`` to train on GPU without attention dropout; otherwise, when
  the mask empties at least ``AUTO_SPARSE_MIN_EMPTY`` of the valid tiles of a window of ``AUTO_SPARSE_MIN_LEN`` keys or
  more (where ``scripts/benchmark.py`` measured them ahead), ``block`` on CPU (training and inference) and ``flex`` on
  GPU (``block`` with attention dropout); else ``sdpa``.
- ``block``: block-sparse attention from fused kernels, planned once per mask (``BlockPlan``). On CPU without dropout
  (the merged path): each query tile's kept key tiles are split into full tiles, the causal diagonal tile and partial
  tiles; each kind is one flash-attention call per group of query tiles with the same tile count, and the parts are
  merged exactly by their log-sum-exp; the backward runs the kernel's flash backward per part with the merged output and
  log-sum-exp. Otherwise (GPU, attention dropout; the gathered path): one SDPA call per group with all kept tiles and
  the element mask. Forward and backward everywhere; the fastest CPU path for block masks.
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
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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
_NEG_INF = float("-inf")


@dataclass
class BlockPart:
    """One fused flash-attention call of the merged block path: ``c`` (head, query tile) pairs with ``n`` key tiles each.

    The calls of a plan split every query row's kept keys into disjoint parts: full tiles (no mask), the causal diagonal
    tile (the kernel's own causal mask) and partial tiles (an additive bias); per-part outputs are merged exactly by their
    log-sum-exp.
    """

    q_rows: Tensor  # (c,) head * Qb + query tile: rows of the (B, H*Qb, bs, D) tiled queries
    k_flat: Tensor  # (c*n*bs,) head * Kp + key position: rows of the (B, H*Kp, D) keys gathered for the call
    n: int  # key tiles per query tile
    causal: bool  # n == 1 and each tile is the lower triangle: is_causal, no bias
    bias: Optional[Tensor] = None  # (1, c, bs, n*bs) float 0 / -inf; None = every gathered entry is kept
    dead: Optional[Tensor] = None  # (c, bs) rows with no kept entry in this part; None = none
    all_q: bool = False  # q_rows is every query tile in order: no query gather
    all_k: bool = False  # k_flat is every key position in order: no key/value gather


@dataclass
class BlockPlan:
    """Where the kept tiles of a fixed keep-mask are, grouped for fused calls.

    ``parts`` drive the merged path (CPU, no dropout: full / causal-diagonal / partial tiles as separate flash calls
    merged by log-sum-exp). ``groups`` drive the gathered path (GPU or attention dropout): every (head, query tile)
    with ``n`` kept key tiles joins group ``n``; a group holds its heads ``(c,)``, query positions ``(c, bs)``, gathered
    key positions ``(c, n*bs)`` and the element mask on them ``(c, bs, n*bs)`` (None when all gathered entries are
    kept). Query tiles with no kept key are in no group or part (their output is 0).
    """

    tq: int
    tk: int
    bs: int
    n_heads: int
    groups: list[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]
    rows: Tensor  # (R,) flat (head * Tq_padded + query) positions written by the groups, in group order
    parts: list[BlockPart]
    part_rows: Tensor  # (P,) q_rows of all parts, in part order

    @property
    def kept_tile_fraction(self) -> float:
        total = self.n_heads * -(-self.tq // self.bs) * -(-self.tk // self.bs)
        return sum(int(g[2].numel()) // self.bs for g in self.groups) / max(1, total)  # k_idx: (c, n*bs)


def _grouped(tiles: Tensor) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """``(n, heads (c,), query tiles (c,), key tiles (c, n))`` per number ``n`` of True tiles in a row of
    ``tiles (H, Qb, Kb)``."""
    counts = tiles.sum(-1)  # (H, Qb)
    out = []
    for n in sorted(set(counts[counts > 0].tolist())):
        heads, qt = (counts == n).nonzero(as_tuple=True)  # (c,), (c,)
        out.append((n, heads, qt, tiles[heads, qt].nonzero()[:, 1].view(-1, n)))  # key tiles ascending
    return out


def block_plan(keep: Tensor, n_heads: int, bs: int = BLOCK_TILE) -> BlockPlan:
    """The ``BlockPlan`` of a bool ``keep`` ``(H|1, Tq, Tk)`` (causality folded in) for ``n_heads`` heads."""
    _, tq, tk = keep.shape
    qb, kb = -(-tq // bs), -(-tk // bs)
    qp, kp = qb * bs, kb * bs
    keep = F.pad(keep.expand(n_heads, tq, tk), (0, kp - tk, 0, qp - tq))  # (H, Qp, Kp), padding never kept
    t = keep.view(n_heads, qb, bs, kb, bs)
    kept = t.any(dim=4).any(dim=2)  # (H, Qb, Kb) tiles with a kept entry
    ar = torch.arange(bs, device=keep.device)

    groups, rows = [], []
    for n, heads, qt, kt in _grouped(kept):
        k_idx = (kt[..., None] * bs + ar).flatten(1)  # (c, n*bs)
        q_idx = qt[:, None] * bs + ar  # (c, bs)
        m = keep[heads[:, None, None], q_idx[:, :, None], k_idx[:, None, :]]  # (c, bs, n*bs)
        groups.append((heads, q_idx, k_idx, None if bool(m.all()) else m))
        rows.append((heads[:, None] * qp + q_idx).flatten())

    full = t.all(dim=4).all(dim=2)  # (H, Qb, Kb) tiles kept entirely
    causal = torch.zeros_like(kept)
    if qb == kb:  # diagonal tiles that are exactly the lower triangle run with the kernel's causal mask
        diag = t.diagonal(dim1=1, dim2=3)  # (H, bs, bs, Qb)
        tril = torch.ones(bs, bs, dtype=torch.bool, device=keep.device).tril()
        causal.diagonal(dim1=1, dim2=2).copy_((diag == tril[..., None]).all(1).all(1))  # (H, Qb)
    partial = kept & ~full & ~causal
    parts = []
    for tiles, kind in ((full, "full"), (causal, "causal"), (partial, "partial")):
        for n, heads, qt, kt in _grouped(tiles):
            k_idx = (kt[..., None] * bs + ar).flatten(1)  # (c, n*bs)
            part = BlockPart(heads * qb + qt, (heads[:, None] * kp + k_idx).flatten(), n, kind == "causal")
            part.all_q = part.q_rows.numel() == n_heads * qb and bool((part.q_rows.diff() == 1).all())
            part.all_k = part.k_flat.numel() == n_heads * kp and bool((part.k_flat.diff() == 1).all())
            if kind == "partial":
                m = keep[heads[:, None, None], (qt[:, None] * bs + ar)[:, :, None], k_idx[:, None, :]]  # (c, bs, n*bs)
                part.bias = torch.zeros(m.shape, device=keep.device).masked_fill(~m, _NEG_INF)[None]
                dead = ~m.any(-1)  # (c, bs)
                part.dead = dead if bool(dead.any()) else None
            parts.append(part)
    empty = torch.zeros(0, dtype=torch.long, device=keep.device)
    return BlockPlan(tq, tk, bs, n_heads, groups, torch.cat(rows) if rows else empty,
                     parts, torch.cat([p.q_rows for p in parts]) if parts else empty)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_scratch_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable buffer (per thread, name, device and dtype) viewed as ``shape``. Gathers write here: a fresh large CPU
    allocation is page-faulted in on first touch, which measured as slow as the attention itself."""
    bufs = _scratch_local.__dict__.setdefault("bufs", {})
    key, n = (name, like.device, like.dtype), math.prod(shape)
    if key not in bufs or bufs[key].numel() < n:
        bufs[key] = torch.empty(n, device=like.device, dtype=like.dtype)
    return bufs[key][:n].view(shape)


def _tiles(x: Tensor, name: str, bs: int) -> Tensor:
    """``x (B, H, T, D)`` → contiguous ``(B, H*ceil(T/bs), bs, D)``, zero rows past ``T`` (a view when possible)."""
    b, h, t, d = x.shape
    tp = -(-t // bs) * bs
    if t == tp and x.is_contiguous():
        return x.view(b, h * tp // bs, bs, d)
    out = _scratch(name, (b, h, tp, d), x)
    out[:, :, :t].copy_(x)
    out[:, :, t:].zero_()
    return out.view(b, h * tp // bs, bs, d)


def _gather(x: Tensor, index: Tensor, name: str) -> Tensor:
    """``x.index_select(1, index)`` into a scratch buffer."""
    return torch.index_select(x, 1, index, out=_scratch(name, (x.shape[0], index.numel(), *x.shape[2:]), x))


def _part_inputs(part: BlockPart, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gathered ``q (B, c, bs, D)``, ``k, v (B, c, n*bs, D)`` of a part from tiled ``q_t (B, H*Qb, bs, D)`` and
    ``k_t, v_t (B, H*Kb, bs, D)``."""
    b, _, bs, d = q_t.shape
    c = part.q_rows.numel()
    qg = q_t if part.all_q else _gather(q_t, part.q_rows, "qg")
    k_f, v_f = k_t.view(b, -1, d), v_t.view(b, -1, d)  # (B, H*Kp, D)
    if not part.all_k:
        k_f, v_f = _gather(k_f, part.k_flat, "kg"), _gather(v_f, part.k_flat, "vg")
    return qg, k_f.view(b, c, part.n * bs, d), v_f.view(b, c, part.n * bs, d)


def _merged_forward(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float) -> tuple[Tensor, Tensor]:
    """Padded ``out (B, H, Qp, D)`` and ``logsumexp (B, H, Qp)`` (-inf for rows with no kept key) of the merged path."""
    b, h, tq, d = q.shape
    bs, rows = plan.bs, h * -(-tq // plan.bs)
    q_t, k_t, v_t = _tiles(q, "q", bs), _tiles(k, "k", bs), _tiles(v, "v", bs)  # (B, H*Qb|H*Kb, bs, D)
    outs, lses = [], []
    for part in plan.parts:
        qg, kg, vg = _part_inputs(part, q_t, k_t, v_t)
        bias = None if part.bias is None else part.bias.to(q.dtype)
        o, lse = _flash_cpu(qg, kg, vg, 0.0, part.causal, attn_mask=bias, scale=scale)  # (B, c, bs, D), (B, c, bs)
        if part.dead is not None:
            lse = lse.masked_fill(part.dead, _NEG_INF)  # the kernel reports 0 for rows with nothing kept
        outs.append(o)
        lses.append(lse)
    # the row's log-sum-exp over all its parts, then each part's output weighted by its share of the softmax
    top = q.new_full((b, rows, bs), _NEG_INF, dtype=torch.float32)  # (B, H*Qb, bs) largest part log-sum-exp
    for part, lse in zip(plan.parts, lses):
        top.index_copy_(1, part.q_rows, torch.maximum(top.index_select(1, part.q_rows), lse))
    top.masked_fill_(top == _NEG_INF, 0.0)
    den = torch.zeros_like(top)
    for part, lse in zip(plan.parts, lses):
        den.index_add_(1, part.q_rows, (lse - top.index_select(1, part.q_rows)).exp())
    lse_all = top + den.log()  # (B, H*Qb, bs); -inf: no kept key
    ref = lse_all.masked_fill(den == 0, 0.0)
    # accumulate into the output of a part that covers every query tile (the causal diagonal), else into zeros
    weight = lambda i: (lses[i] - ref.index_select(1, plan.parts[i].q_rows)).exp()[..., None]  # noqa: E731  (B, c, bs, 1)
    base = next((i for i, p in enumerate(plan.parts) if p.all_q), None)
    if base is None:
        out = q.new_zeros(b, rows, bs, d, dtype=torch.float32)  # (B, H*Qb, bs, D): rows with nothing kept stay 0
    else:
        out = outs[base].float().mul_(weight(base))
    for i, (part, o) in enumerate(zip(plan.parts, outs)):
        if i != base:
            out.index_add_(1, part.q_rows, o.float().mul_(weight(i)))
    return out.to(q.dtype).view(b, h, -1, d), lse_all.view(b, h, -1)


class _MergedBlockAttention(torch.autograd.Function):
    """The merged path with a backward made of the kernel's own flash backward per part: with the merged output and
    log-sum-exp, each part's backward gives exactly its tiles' share of the gradients."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float) -> Tensor:
        out, lse = _merged_forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out[:, :, : q.shape[2]].clone()  # (B, H, Tq, D)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, v, out, lse = ctx.saved_tensors
        plan, bs = ctx.plan, ctx.plan.bs
        b, h, tq, d = q.shape
        q_t, k_t, v_t, g_t = _tiles(q, "q", bs), _tiles(k, "k", bs), _tiles(v, "v", bs), _tiles(grad, "g", bs)
        o_t = out.view(b, -1, bs, d)  # (B, H*Qb, bs, D)
        lse_t = lse.masked_fill(lse == _NEG_INF, float("inf")).view(b, -1, bs)  # nothing kept: zero weights
        dq, dk, dv = torch.zeros_like(q_t), torch.zeros_like(k_t).view(b, -1, d), torch.zeros_like(v_t).view(b, -1, d)
        for part in plan.parts:
            qg, kg, vg = _part_inputs(part, q_t, k_t, v_t)
            sel = (lambda x: x) if part.all_q else (lambda x: x.index_select(1, part.q_rows))  # noqa: E731
            bias = None if part.bias is None else part.bias.to(q.dtype)
            gq, gk, gv = _flash_cpu_backward(sel(g_t), qg, kg, vg, sel(o_t), sel(lse_t), 0.0, part.causal,
                                             attn_mask=bias, scale=ctx.scale)  # (B, c, bs|n*bs, D)
            dq.index_add_(1, part.q_rows, gq)
            dk.index_add_(1, part.k_flat, gk.flatten(1, 2))
            dv.index_add_(1, part.k_flat, gv.flatten(1, 2))
        tk = k.shape[2]
        return (dq.view(b, h, -1, d)[:, :, :tq], dk.view(b, h, -1, d)[:, :, :tk], dv.view(b, h, -1, d)[:, :, :tk],
                None, None)


@register_backend("block")
def block_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Any, is_causal: bool, dropout_p: float, scale: float, need_probs: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """Block-sparse attention from fused kernels; pruned tiles are never computed.

    On CPU without dropout (the merged path): per ``BlockPart`` one flash-attention call (forward and backward) on
    the gathered tiles, merged by log-sum-exp. Otherwise (GPU, or attention dropout; the gathered path): per group of a
    ``BlockPlan``, gather all kept key/value tiles of its query tiles and call SDPA with the element mask.
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
    if q.device.type == "cpu" and dropout_p == 0:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _MergedBlockAttention.apply(q, k, v, plan, scale), None
        return _merged_forward(q, k, v, plan, scale)[0][:, :, :tq], None
    return _gathered_block(q, k, v, plan, dropout_p, scale), None


def _gathered_block(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, dropout_p: float, scale: float) -> Tensor:
    """The gathered path of the block backend (any device, dropout): ``(B, H, Tq, D)``."""
    b, h, tq, d = q.shape
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
    return out.view(b, h, qp, d)[:, :, :tq]


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
