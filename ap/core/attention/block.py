"""The ``block`` backend: block-sparse attention planned once per mask (``BlockPlan``) from fused kernels."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import MaskError
from .common import keep_with_causal, needs_grad
from .registry import register_backend

BLOCK_TILE = 64  # query/key tile of the block backend (matches FLEX_BLOCK_SIZE and pruning.block_size=64)
_NEG_INF = float("-inf")


@dataclass
class BlockPart:
    """One fused attention call of the block backend: ``c`` (head, query tile) pairs, each with all its ``n`` kept key
    tiles gathered (ascending), so every query row's softmax lives in exactly one call."""

    q_rows: Tensor  # (c,) head * Qb + query tile: rows of the (B, H*Qb, bs, D) tiled queries
    k_flat: Tensor  # (c*n*bs,) head * Kp + key position: rows of the (B, H*Kp, D) keys gathered for the call
    n: int  # key tiles per query tile
    causal: bool = False  # n == 1 and each tile is the lower triangle: the kernel's causal mask, no bias
    bias: Optional[Tensor] = None  # (1, 1|c, bs, n*bs) float 0 / -inf (1: one pattern for all rows); None = all kept
    all_q: bool = False  # q_rows is every query tile in order: no query gather
    all_k: bool = False  # k_flat is every key position in order: no key/value gather
    score_index: Optional[Tensor] = None  # (c*bs*n*bs,) entries of a flattened (H*Qp*Kp) score bias, built on first use
    index: dict[tuple, Tensor] = field(default_factory=dict)  # rows read per input layout (``_part_index``), lazily


@dataclass
class BlockPlan:
    """Where the kept tiles of a fixed keep-mask are, as ``parts`` (one fused call each). Query tiles are grouped by
    their number of kept key tiles and, within a group, by mask pattern: all kept (no bias), kept tiles ending in the
    causal diagonal (one shared bias; alone: the kernel's causal flag) or anything else (a bias per row). Query tiles
    with no kept key are in no part (their output is 0)."""

    tq: int
    tk: int
    bs: int
    n_heads: int
    parts: list[BlockPart]
    uncovered: Tensor  # (U,) query-tile rows in no part

    @property
    def kept_tile_fraction(self) -> float:
        total = self.n_heads * -(-self.tq // self.bs) * -(-self.tk // self.bs)
        return sum(p.q_rows.numel() * p.n for p in self.parts) / max(1, total)


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
    with torch.inference_mode(False):  # a plan cached during evaluation is used in training too: normal tensors
        return _block_plan(keep, n_heads, bs)


def _tiles_with_any(keep: Tensor, h: int, qb: int, kb: int, bs: int) -> Tensor:
    """``(H, Qb, Kb)``: which ``bs × bs`` tiles of the contiguous bool ``keep (H, Qb*bs, Kb*bs)`` hold a True. Eight
    bools at a time as one int64 when ``bs % 8 == 0`` (bool ``any`` over strided tiles took 2.9 s for SmolLM2's 9 heads
    at 4,096 tokens, this 0.05 s)."""
    if bs % 8 == 0 and keep.is_contiguous():
        packed = keep.view(torch.int64).view(h, qb, bs, kb, bs // 8)  # (H, Qb, bs, Kb, bs/8): bytes are 0 or 1
        return packed.amax(dim=-1).ne(0).any(dim=2)
    return keep.view(h, qb, bs, kb, bs).any(dim=4).any(dim=2)


def _block_plan(keep: Tensor, n_heads: int, bs: int) -> BlockPlan:
    _, tq, tk = keep.shape
    qb, kb = -(-tq // bs), -(-tk // bs)
    kp = kb * bs
    keep = keep.expand(n_heads, tq, tk)
    if kp != tk or qb * bs != tq:
        keep = F.pad(keep, (0, kp - tk, 0, qb * bs - tq))  # (H, Qp, Kp), padding never kept
    keep = keep.contiguous()  # (no copy when already whole tiles of H heads)
    kept = _tiles_with_any(keep, n_heads, qb, kb, bs)  # (H, Qb, Kb) tiles with a kept entry
    ar = torch.arange(bs, device=keep.device)
    tril = torch.ones(bs, bs, dtype=torch.bool, device=keep.device).tril()
    parts, covered = [], torch.zeros(n_heads * qb, dtype=torch.bool, device=keep.device)
    for n, heads, qt, kt in _grouped(kept):
        k_idx = (kt[..., None] * bs + ar).flatten(1)  # (c, n*bs)
        m = keep[heads[:, None, None], (qt[:, None] * bs + ar)[:, :, None], k_idx[:, None, :]]  # (c, bs, n*bs)
        causal_last = torch.ones(bs, n * bs, dtype=torch.bool, device=keep.device)
        causal_last[:, -bs:] = tril  # full tiles, then the causal diagonal
        full = m.flatten(1).all(1)  # (c,)
        diag = (m == causal_last).flatten(1).all(1) & (kt[:, -1] == qt) & ~full  # (c,)
        for rows, kind in ((full, "full"), (diag, "diag"), (~full & ~diag, "other")):
            if not bool(rows.any()):
                continue
            q_rows, k_sel = heads[rows] * qb + qt[rows], k_idx[rows]  # (c',), (c', n*bs)
            part = BlockPart(q_rows, (heads[rows][:, None] * kp + k_sel).flatten(), n)
            if kind == "diag" and n == 1:
                part.causal = True
            elif kind != "full":
                if kind == "diag":
                    pattern = causal_last[None]  # (1, bs, n*bs)
                else:  # query rows past Tq (padding) see every gathered key: no row of -inf for kernels to trip on;
                    # their output is dropped and their gradient is zero
                    pattern = m[rows] | ((qt[rows, None] * bs + ar) >= tq)[:, :, None]  # (c', bs, n*bs)
                part.bias = torch.zeros(pattern.shape, device=keep.device).masked_fill(~pattern, _NEG_INF)[None]
            part.all_q = q_rows.numel() == n_heads * qb and bool((q_rows.diff() == 1).all())
            part.all_k = part.k_flat.numel() == n_heads * kp and bool((part.k_flat.diff() == 1).all())
            parts.append(part)
            covered[q_rows] = True
    return BlockPlan(tq, tk, bs, n_heads, parts, (~covered).nonzero()[:, 0])


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_scratch_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable buffer (per thread, name, device and dtype) viewed as ``shape``. Gathers write here: a fresh large CPU
    allocation is page-faulted in on first touch, which measured as slow as the attention itself."""
    bufs = _scratch_local.__dict__.setdefault("bufs", {})
    key, n = (name, like.device, like.dtype, torch.is_inference_mode_enabled()), math.prod(shape)  # inference tensors
    # cannot be written outside inference mode
    if key not in bufs or bufs[key].numel() < n:
        bufs[key] = torch.empty(n, device=like.device, dtype=like.dtype)
    return bufs[key][:n].view(shape)


@dataclass
class _Rows:
    """``x (B, H, T, D)`` as the rows of an ``(N, D)`` view ``rows``: (batch b, head h, position t) is row
    ``b*sb + h*sh + t*st`` (no copy for a strided view such as a fused QKV projection's; a copy when ``T`` is not
    whole tiles). Gathers index one 2-D tensor: ``index_select`` on a strided 3-D view measured 200x slower."""

    rows: Tensor
    sb: int
    sh: int
    st: int
    b: int
    h: int
    t: int  # positions (whole tiles)

    def index(self, heads: Tensor, pos: Tensor) -> Tensor:
        """Row indices ``(B * n,)`` of ``(heads, pos)`` (broadcast, ``n`` entries) in every batch row, batch-major."""
        within = (heads * self.sh + pos * self.st).flatten()  # (n,)
        return (torch.arange(self.b, device=within.device)[:, None] * self.sb + within).flatten()

    @property
    def tiled(self) -> bool:
        """Whether the rows are laid out tile after tile, head after head, batch row after batch row."""
        return self.st == 1 and self.sh == self.t and self.sb == self.h * self.t

    def tiles(self, bs: int) -> Optional[Tensor]:
        """``(B, H*T/bs, bs, D)`` as a view when ``tiled`` (else None)."""
        return self.rows.view(self.b, -1, bs, self.rows.shape[-1]) if self.tiled else None

    def batch_tiles(self, i: int, bs: int) -> Tensor:
        """Batch row ``i`` as ``(H, T/bs, bs, D)`` (a view)."""
        d = self.rows.shape[-1]
        return self.rows.as_strided((self.h, self.t // bs, bs, d), (self.sh * d, bs * self.st * d, self.st * d, 1),
                                    self.rows.storage_offset() + i * self.sb * d)


def _rows(x: Tensor, bs: int, name: Optional[str] = None, strided: bool = True) -> _Rows:
    """``x (B, H, T, D)`` as ``_Rows``: a view when ``T`` is whole tiles and ``x`` is contiguous or (``strided``) its
    strides are whole rows (e.g. a fused QKV projection's views, heads expanded with stride 0), else a zero-padded
    contiguous copy (into scratch buffer ``name``, new memory when None)."""
    b, h, t, d = x.shape
    sb, sh, st, sd = x.stride()
    if t % bs == 0 and x.is_contiguous():
        return _Rows(x.view(-1, d), h * t, t, 1, b, h, t)
    if strided and t % bs == 0 and sd == 1 and sb % d == 0 and sh % d == 0 and st % d == 0 and st > 0:
        n = ((b - 1) * sb + (h - 1) * sh + (t - 1) * st) // d + 1
        return _Rows(x.as_strided((n, d), (d, 1)), sb // d, sh // d, st // d, b, h, t)
    tp = -(-t // bs) * bs
    if name is None:
        out = F.pad(x, (0, 0, 0, tp - t)).contiguous()
    else:
        out = _scratch(name, (b, h, tp, d), x)
        out[:, :, :t].copy_(x)
        out[:, :, t:].zero_()
    return _Rows(out.view(-1, d), h * tp, tp, 1, b, h, tp)


def _part_index(part: BlockPart, plan: BlockPlan, r: _Rows, side: str) -> Tensor:
    """Rows of ``r`` that a part reads, batch-major (``side`` "q": its query tiles' rows, ``(B*c*bs,)``; "k": its
    gathered keys, ``(B*c*n*bs,)``), cached per layout."""
    key = (side, r.sb, r.sh, r.st, r.b, str(r.rows.device))
    if key not in part.index:
        with torch.inference_mode(False):  # a plan cached during evaluation is used in training too
            bs = plan.bs
            if side == "q":
                qb = -(-plan.tq // bs)
                rows = part.q_rows.to(r.rows.device)
                pos = (rows % qb)[:, None] * bs + torch.arange(bs, device=rows.device)  # (c, bs)
                part.index[key] = r.index((rows // qb)[:, None], pos)
            else:
                kp = -(-plan.tk // bs) * bs
                flat = part.k_flat.to(r.rows.device)
                part.index[key] = r.index(flat // kp, flat % kp)
    return part.index[key]


def _gather(r: _Rows, index: Tensor, shape: tuple[int, ...], name: Optional[str]) -> Tensor:
    """Rows ``index`` (``_part_index``) of ``r`` as ``(B, *shape, D)`` (into scratch buffer ``name``, new memory
    when None)."""
    d = r.rows.shape[-1]
    if name is None:
        return r.rows.index_select(0, index).view(r.b, *shape, d)
    out = _scratch(name, (index.numel(), d), r.rows)
    return torch.index_select(r.rows, 0, index, out=out).view(r.b, *shape, d)


def _part_inputs(part: BlockPart, plan: BlockPlan, qr: _Rows, kr: _Rows, vr: _Rows,
                 scratch: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gathered ``q (B, c, bs, D)``, ``k, v (B, c, n*bs, D)`` of a part (views where the rows are tile after tile and
    the part reads them all; into scratch buffers when ``scratch``: only where nothing keeps them)."""
    bs, c = plan.bs, part.q_rows.numel()
    qg = qr.tiles(bs) if part.all_q else None
    if qg is None:
        qg = _gather(qr, _part_index(part, plan, qr, "q"), (c, bs), "qg" if scratch else None)
    kv = []
    for r, name in ((kr, "kg"), (vr, "vg")):
        x = r.tiles(bs) if part.all_k else None
        if x is None:
            x = _gather(r, _part_index(part, plan, r, "k"), (c * part.n, bs), name if scratch else None)
        kv.append(x.view(x.shape[0], c, part.n * bs, x.shape[-1]))
    return qg, kv[0], kv[1]


def _flat_scores(scores: Optional[Tensor], plan: BlockPlan) -> Optional[Tensor]:
    """A score bias ``(B|1, H|1, Tq, Tk)`` as ``(B|1, H*Qp*Kp)`` (zero-padded to whole tiles) for ``_call_mask``."""
    if scores is None:
        return None
    qp, kp = -(-plan.tq // plan.bs) * plan.bs, -(-plan.tk // plan.bs) * plan.bs
    full = scores.expand(scores.shape[0], plan.n_heads, plan.tq, plan.tk)  # (B|1, H, Tq, Tk)
    return F.pad(full, (0, kp - plan.tk, 0, qp - plan.tq)).reshape(scores.shape[0], -1)


def _call_mask(part: BlockPart, plan: BlockPlan, like: Tensor, flat: Optional[Tensor]) -> tuple[Optional[Tensor], bool]:
    """A part's kernel arguments ``(attn_mask, is_causal)``: its 0/-inf pattern (``(1, 1|c, bs, n*bs)``) and causal
    flag, or with a score bias (``flat`` from ``_flat_scores``) that bias gathered at the part's kept tiles plus the
    pattern (``(B|1, c, bs, n*bs)``; a causal diagonal as -inf, since the kernel's causal flag takes no mask)."""
    pattern = None if part.bias is None else part.bias.to(device=like.device, dtype=like.dtype)
    if flat is None:
        return pattern, part.causal
    bs, n, c = plan.bs, part.n, part.q_rows.numel()
    if part.score_index is None or part.score_index.device != like.device:
        kp = -(-plan.tk // bs) * bs
        rows = part.q_rows[:, None] * bs + torch.arange(bs, device=like.device)  # (c, bs) rows of (H*Qp)
        keys = part.k_flat.view(c, n * bs) % kp  # (c, n*bs) key positions
        part.score_index = (rows[:, :, None] * kp + keys[:, None, :]).flatten()  # (c*bs*n*bs,)
    out = flat.index_select(1, part.score_index).view(-1, c, bs, n * bs).to(like.dtype)  # (B|1, c, bs, n*bs)
    if part.causal:  # a lone diagonal tile: its lower triangle
        pattern = torch.zeros(bs, bs, device=like.device, dtype=like.dtype).masked_fill(
            ~torch.ones(bs, bs, dtype=torch.bool, device=like.device).tril(), _NEG_INF)
    return (out if pattern is None else out + pattern), False


def _in_place(part: BlockPart, *rows: _Rows) -> bool:
    """Whether a part reading every query and key tile (e.g. each query tile with its own diagonal tile) runs on
    per-batch-row views of ``rows`` that are not laid out tile after tile (no gather)."""
    return part.all_q and part.all_k and not all(r.tiled for r in rows)


def _batch_mask(mask: Optional[Tensor], i: int, h: int) -> Optional[Tensor]:
    """A part's kernel mask ``(B|1, 1|H*Qb, bs, n*bs)`` for batch row ``i`` of an in-place call:
    ``(1|H, 1|Qb, bs, n*bs)``."""
    if mask is None:
        return None
    m = mask[i if mask.shape[0] > 1 else 0]  # (1|H*Qb, bs, n*bs)
    return m[None] if m.shape[0] == 1 else m.view(h, -1, *m.shape[1:])


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float, flat: Optional[Tensor] = None,
                   need_lse: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """The CPU flash path: ``out (B, Qp, H, D)`` (the layout a model's ``(B, L, H*D)`` reshape reads without a copy,
    as dense flash attention returns it) and, when ``need_lse``, ``logsumexp (B, H*Qb, bs)`` (0 where nothing is
    kept); ``flat``: a score bias from ``_flat_scores``. Inputs are read in place where their strides allow."""
    b, h, tq, d = q.shape
    bs, qb = plan.bs, -(-tq // plan.bs)
    qr, kr, vr = _rows(q, bs, "q"), _rows(k, bs, "k"), _rows(v, bs, "v")
    out = q.new_empty(b, qb * bs, h, d)
    outr = _rows(out.permute(0, 2, 1, 3), bs)  # (b, head, t) at row (b*Qp + t)*H + head
    lse = q.new_empty(b, h * qb, bs, dtype=torch.promote_types(q.dtype, torch.float32)) if need_lse else None
    if plan.uncovered.numel():
        u = plan.uncovered
        pos = (u % qb)[:, None] * bs + torch.arange(bs, device=u.device)  # (U, bs)
        outr.rows.index_fill_(0, outr.index((u // qb)[:, None], pos), 0.0)
        if lse is not None:
            lse.index_fill_(1, u, 0.0)
    for part in plan.parts:
        mask, causal = _call_mask(part, plan, q, flat)
        if _in_place(part, qr, kr, vr):
            for i in range(b):  # heads as the kernel's batch, query tiles as its heads: (H, Qb, bs|n*bs, D)
                o, l = _flash_cpu(qr.batch_tiles(i, bs), kr.batch_tiles(i, part.n * bs),
                                  vr.batch_tiles(i, part.n * bs), 0.0, causal, attn_mask=_batch_mask(mask, i, h),
                                  scale=scale)
                outr.batch_tiles(i, bs).copy_(o)
                if lse is not None:
                    lse[i].view(l.shape).copy_(l)
            continue
        qg, kg, vg = _part_inputs(part, plan, qr, kr, vr, scratch=True)
        o, l = _flash_cpu(qg, kg, vg, 0.0, causal, attn_mask=mask, scale=scale)  # (B, c, bs, D), (B, c, bs)
        outr.rows.index_put_((_part_index(part, plan, outr, "q"),), o.view(-1, d))
        if lse is not None:
            lse.index_copy_(1, part.q_rows, l)
    return out, lse


class _FlashBlockAttention(torch.autograd.Function):
    """The CPU flash path with its backward: the kernel's own flash backward per part, on the part's gathered tiles
    (saves only q, k, v, the output and its log-sum-exp, like dense flash attention)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float,
                scores: Optional[Tensor]) -> Tensor:
        flat = _flat_scores(scores, plan)  # (B|1, H*Qp*Kp) or None
        out, lse = _flash_forward(q, k, v, plan, scale, flat)  # (B, Qp, H, D), (B, H*Qb, bs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.flat = plan, scale, flat  # (a constant score bias: no gradient for it)
        return out.permute(0, 2, 1, 3)[:, :, :q.shape[2]]  # (B, H, Tq, D): a view, as dense flash attention returns

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, v, out, lse = ctx.saved_tensors
        plan, bs = ctx.plan, ctx.plan.bs
        b, h, tq, d = q.shape
        qr, kr, vr, gr = (_rows(x, bs, name) for x, name in ((q, "q"), (k, "k"), (v, "v"), (grad, "g")))
        outr = _rows(out.permute(0, 2, 1, 3), bs)  # (B, Qp, H, D) as rows, as in the forward
        dq = q.new_empty(b, h * qr.t // bs, bs, d)  # (B, H*Qb, bs, D): each query tile in one part or uncovered
        dq.index_fill_(1, plan.uncovered, 0.0)
        dk, dv = k.new_zeros(b, h * kr.t, d), v.new_zeros(b, h * kr.t, d)  # (B, H*Kp, D)
        for part in plan.parts:
            mask, causal = _call_mask(part, plan, q, ctx.flat)
            if _in_place(part, qr, kr, vr, gr):
                nbs = part.n * bs
                for i in range(b):  # as in the forward: (H, Qb, bs|n*bs, D)
                    gq, gk, gv = _flash_cpu_backward(
                        gr.batch_tiles(i, bs), qr.batch_tiles(i, bs), kr.batch_tiles(i, nbs), vr.batch_tiles(i, nbs),
                        outr.batch_tiles(i, bs), lse[i].view(h, -1, bs), 0.0, causal,
                        attn_mask=_batch_mask(mask, i, h), scale=ctx.scale)
                    dq[i].view(gq.shape).copy_(gq)
                    dk[i].view(gk.shape).add_(gk)
                    dv[i].view(gv.shape).add_(gv)
                continue
            qg, kg, vg = _part_inputs(part, plan, qr, kr, vr, scratch=True)
            c = part.q_rows.numel()
            gg = _gather(gr, _part_index(part, plan, gr, "q"), (c, bs), "gg")
            og = _gather(outr, _part_index(part, plan, outr, "q"), (c, bs), "og")
            lg = lse if part.all_q else lse.index_select(1, part.q_rows)
            gq, gk, gv = _flash_cpu_backward(gg, qg, kg, vg, og, lg, 0.0, causal, attn_mask=mask,
                                             scale=ctx.scale)  # (B, c, bs|n*bs, D)
            dq.index_copy_(1, part.q_rows, gq)
            dk.index_add_(1, part.k_flat, gk.flatten(1, 2))
            dv.index_add_(1, part.k_flat, gv.flatten(1, 2))
        tk = k.shape[2]
        return (dq.view(b, h, -1, d)[:, :, :tq], dk.view(b, h, -1, d)[:, :, :tk], dv.view(b, h, -1, d)[:, :, :tk],
                None, None, None)


def _sdpa_block(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, dropout_p: float, scale: float,
                scores: Optional[Tensor] = None) -> Tensor:
    """The SDPA path (any device, dropout, a score bias that needs a gradient; autograd through SDPA):
    ``(B, H, Tq, D)``."""
    b, h, tq, d = q.shape
    qr, kr, vr = (_rows(x, plan.bs, strided=False) for x in (q, k, v))  # views or padded copies autograd follows
    flat = _flat_scores(scores, plan)  # (B|1, H*Qp*Kp) or None
    outs = []
    for part in plan.parts:
        mask, causal = _call_mask(part, plan, q, flat)
        outs.append(F.scaled_dot_product_attention(*_part_inputs(part, plan, qr, kr, vr, scratch=False),
                                                   attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                                   scale=scale))  # (B, c, bs, D)
    # (B, H*Qb, bs, D): rows in no part stay 0; tied to q, k, v (exact zeros) so autograd sees them used
    tie = q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum() + (0 if scores is None else scores[..., :0].sum())
    out = q.new_zeros(b, h * (qr.t // plan.bs), plan.bs, d) + tie
    if outs:
        out = out.index_copy(1, torch.cat([p.q_rows for p in plan.parts]), torch.cat(outs, dim=1))
    return out.view(b, h, -1, d)[:, :, :tq]


@register_backend("block")
def block_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Any, is_causal: bool, dropout_p: float, scale: float, need_probs: bool,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Block-sparse attention from fused kernels: per ``BlockPart`` of a ``BlockPlan`` one attention call on the
    gathered kept tiles; pruned tiles are never computed.

    On CPU without dropout (the flash path) the calls are PyTorch's CPU flash-attention kernel with a backward of its
    own; otherwise (GPU, attention dropout, a score ``bias`` that needs a gradient) SDPA with autograd. ``mask``: a
    prepared ``BlockPlan`` (callers cache it per position window) or a bool keep-mask (planned per call). ``bias``
    ``(B|1, H|1, Tq, Tk)``: float scores added to the scaled ``q·k``, gathered per kept tile like the mask.
    """
    b, h, tq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[-1] != d:
        raise MaskError(f"the block backend needs q (B, H, Tq, D) and k, v (B, H, Tk, D) of one batch, head count and "
                        f"head dim; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (use sdpa or eager)")
    if isinstance(mask, BlockPlan):
        if is_causal:
            raise MaskError("pass causality inside the BlockPlan for the block backend")
        plan = mask
    else:
        keep = keep_with_causal(mask, is_causal, tq, k.shape[-2], q.device)
        keep = keep if keep is not None else torch.ones(tq, k.shape[-2], dtype=torch.bool, device=q.device)
        keep = keep.expand(*keep.shape[:-2], tq, k.shape[-2])  # a mask broadcast over queries or keys
        while keep.dim() < 3:
            keep = keep[None]
        if keep.dim() == 4 and keep.shape[0] > 1:  # per-row masks (padding): batch rows become heads of one row
            keep = keep.expand(b, h, tq, k.shape[-2]).flatten(0, 1)  # (B*H, Tq, Tk)
            fold = [t.reshape(1, b * h, t.shape[-2], t.shape[-1]) for t in (q, k, v)]  # (1, B*H, T, D)
            folded_bias = None if bias is None else bias.expand(b, h, tq, k.shape[-2]).reshape(1, b * h, tq, -1)
            out, _ = block_backend(*fold, keep, False, dropout_p, scale, need_probs, bias=folded_bias)
            return out.view(b, h, tq, -1), None
        if keep.dim() == 4:
            keep = keep[0]
        plan = block_plan(keep, h)
    if (plan.tq, plan.tk, plan.n_heads) != (tq, k.shape[-2], h):
        raise MaskError(f"BlockPlan for {plan.n_heads} heads x {plan.tq} x {plan.tk} used on {h} x {tq} x {k.shape[-2]}")
    if bias is not None and (bias.dim() != 4 or bias.shape[1] not in (1, h) or bias.shape[0] not in (1, b)
                             or bias.shape[2:] != (tq, k.shape[-2])):
        raise MaskError(f"a score bias for the block backend must be (B|1, H|1, Tq, Tk) = ({b}|1, {h}|1, {tq}, "
                        f"{k.shape[-2]}), got {tuple(bias.shape)}")
    if q.device.type == "cpu" and dropout_p == 0 and not (bias is not None and needs_grad(bias)):
        if needs_grad(q, k, v):
            return _FlashBlockAttention.apply(q, k, v, plan, scale, bias), None
        out, _ = _flash_forward(q, k, v, plan, scale, _flat_scores(bias, plan), need_lse=False)  # (B, Qp, H, D)
        return out.permute(0, 2, 1, 3)[:, :, :tq], None
    return _sdpa_block(q, k, v, plan, dropout_p, scale, bias), None
