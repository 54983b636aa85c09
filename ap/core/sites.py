"""``AttentionSite``: the one attention module. Every attention call of an AP model goes through a site.

A site holds no parameters. A model computes ``q, k, v`` with its own projections and calls its site; the site
- applies the installed AP mask (if any), aligned to *real token positions* whatever the padding side,
- applies its sliding window (if any): a query at real position ``i`` sees only keys ``j`` with ``i - window < j <= i``
  (the model's own local attention, e.g. Gemma3's or Mistral's sliding-window layers),
- runs the configured backend (``ap.core.attention``),
- during calibration hands the attention probabilities to a recorder (``AttentionStats``).

A site's name is its dotted module path in the model (``blocks.0.attn.site``); ``find_sites`` binds the names.

Causal sites with fewer query than key positions (``max_q < max_k``: Transformer-XL, whose keys are ``mem_len``
memory slots followed by the segment) are aligned at the bottom-right: query ``i`` may see key ``j`` iff
``j <= i + causal_shift`` with ``causal_shift = max_k - max_q`` (0 for ordinary causal sites).
"""

from __future__ import annotations

import logging
import math
from enum import Enum
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (BLOCK_TILE, attention, block_plan, empty_tiles, flex_block_mask, flex_block_size,
                        needs_grad, tile_row_sums)
from .errors import MaskError


class SiteKind(str, Enum):
    ENC_SELF = "enc_self"  # bidirectional self-attention
    DEC_SELF = "dec_self"  # causal self-attention
    CROSS = "cross"  # decoder queries attend to encoder keys

    @property
    def causal(self) -> bool:
        return self is SiteKind.DEC_SELF


log = logging.getLogger(__name__)
# Backend auto on CPU runs every masked, unpadded call on block: the alternative is SDPA with a bool mask, which
# scripts/benchmark.py found slower at every sparsity and length it measured (2 CPU cores, forward: at L 1024 block
# 0.62x / 4.12x causal SDPA with 50 % / 90 % empty 64-tiles, masked SDPA 0.53x / 0.59x; fwd+bwd 0.84x / 2.67x against
# 0.73x / 0.70x).
# On CUDA flex needs this share of empty valid blocks:
AUTO_SPARSE_MIN_EMPTY = 0.75
# On CUDA flex runs 128-blocks and the fused dense kernels are strong: scripts/gpu_check.py on an H200 (bf16, B1 H16
# D64, 90 % of the valid 128-tiles empty) had flex 1.20-1.46x causal SDPA at 8k and 3.2-4.1x at 32k, but masks of
# 64-tiles (128-blocks mostly visited) 0.24-0.95x, and the block backend 0.05-0.32x everywhere: auto counts empty
# 128-blocks there, picks flex from 8k keys, never block (SDPA instead).
AUTO_SPARSE_MIN_LEN_CUDA = 8192

# scores per chunk of chunked (tiled) calibration: 8 MB in float32 (one 4k site of SmolLM2: 0.52 s per call with
# 2M, 0.90 s with 16M; larger buffers are page-faulted in afresh each chunk)
CHUNK_ELEMENTS = 1 << 21

# recorder(site, probs (B, H, Tq, Tk), q_pos (B|1, Tq), k_pos (B|1, Tk)); positions are -1 at padding.
Recorder = Callable[["AttentionSite", Tensor, Tensor, Tensor], None]


def real_positions(padding: Optional[Tensor], length: int, offset: int | Tensor = 0,
                   device: torch.device | None = None) -> Tensor:
    """Position of each token among the real tokens of its row: ``(B, T)`` long, -1 at padding (True in ``padding``).

    ``offset``: position of the first real token, an int or per row ``(B, 1)``. Without padding: ``(1|B, T)`` =
    ``offset + arange(T)``.
    """
    if padding is None:
        return torch.arange(length, device=device)[None, :] + offset  # (1|B, T)
    real = ~padding  # (B, T)
    pos = real.long().cumsum(dim=1) - 1 + offset  # (B, T)
    return pos.masked_fill(padding, -1)


class AttentionSite(nn.Module):
    """An attention call site of ``kind`` with ``n_heads`` heads over at most ``max_q`` queries × ``max_k`` keys.

    ``sliding_window`` (causal sites only): each query sees its own key and the ``sliding_window - 1`` keys before it,
    in real positions (transformers' ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``). Keys outside
    the window are never attended and never valid in calibration. None: every earlier key.
    """

    def __init__(self, kind: SiteKind | str, n_heads: int, max_q: int, max_k: int, backend: str = "sdpa",
                 sliding_window: Optional[int] = None) -> None:
        super().__init__()
        self.kind = SiteKind(kind)
        self.n_heads, self.max_q, self.max_k = n_heads, max_q, max_k
        self.backend = backend
        if sliding_window is not None and (not self.kind.causal or sliding_window < 1 or max_q != max_k):
            raise MaskError(f"a sliding window needs a causal (dec_self) site with as many queries as keys and a "
                            f"window of at least 1 key; got {self.kind.value} {max_q}x{max_k} with sliding_window="
                            f"{sliding_window}")
        if self.kind.causal and max_q > max_k:
            raise MaskError(f"a causal site needs at least as many key as query positions, got {max_q}x{max_k}")
        self.sliding_window = sliding_window
        self.name = ""  # bound by find_sites
        self.recorder: Optional[Recorder] = None
        # (H, Q, K) bool, True = keep. A plain attribute, not a buffer: DDP would re-broadcast buffers every step
        # (~150 MB for WMT at 1024 positions) although every rank holds the same masks. It follows the inputs' device
        # on first use; masks travel in MaskSet files and in the callback's checkpoint state.
        self.mask: Optional[Tensor] = None
        self.mask_tile = 0  # 0: ``mask`` is per entry (H, Q, K); t > 0: per t x t tile (H, ceil(Q/t), ceil(K/t))
        # BlockMask (flex) / BlockPlan (block) per (backend, heads, first query, first key, Tq, Tk, device)
        self._block_masks: dict[tuple, Any] = {}
        self._empty_tiles: dict[tuple, float] = {}  # share of valid tiles the mask empties, per window (backend auto)
        self._auto_logged: set[tuple[str, bool]] = set()
        self._auto_choice: dict[tuple, str] = {}  # backend auto's choice per (window, training, dropout, padded)

    @property
    def causal_shift(self) -> int:
        """Causal sites: query ``i`` may see keys ``j <= i + causal_shift`` (``max_k - max_q``); others: 0."""
        return self.max_k - self.max_q if self.kind.causal else 0

    # --- masks -------------------------------------------------------------------------------------------------
    def set_mask(self, mask: Optional[Tensor], tile: int = 0) -> None:
        """Install a bool keep-mask (``None`` removes it): ``(n_heads, Q, K)`` per entry, or with ``tile = t > 0``
        ``(n_heads, ceil(Q/t), ceil(K/t))`` per tile (True keeps the whole tile). Raises if it cannot be applied."""
        if mask is not None:
            if mask.dtype != torch.bool:
                raise MaskError(f"site {self.name!r}: mask must be bool (True = keep), got {mask.dtype}")
            if mask.dim() != 3 or mask.shape[0] != self.n_heads:
                raise MaskError(f"site {self.name!r}: mask shape {tuple(mask.shape)} does not fit "
                                f"({self.n_heads} heads, queries, keys)")
            if tile < 0:
                raise MaskError(f"site {self.name!r}: mask tile must be >= 0 (0 = per entry), got {tile}")
        self.mask, self.mask_tile = mask, (tile if mask is not None else 0)
        self._block_masks.clear()
        self._empty_tiles.clear()
        self._auto_choice.clear()

    def _aligned_mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """The installed mask at the given real positions, per entry: ``(1|B, H, Tq, Tk)``."""
        if self.mask.device != q_pos.device:
            self.mask = self.mask.to(q_pos.device)
        m, t = self.mask, max(self.mask_tile, 1)  # (H, Q/t, K/t)
        if int(q_pos.max()) >= m.shape[1] * t or int(k_pos.max()) >= m.shape[2] * t:
            raise MaskError(f"site {self.name!r}: input reaches query position {int(q_pos.max())} / key position "
                            f"{int(k_pos.max())} but the mask covers {m.shape[1] * t}x{m.shape[2] * t}; rebuild masks "
                            f"for a longer max length")
        one_row = q_pos.shape[0] == 1 and k_pos.shape[0] == 1
        q0, k0 = (int(q_pos[0, 0]), int(k_pos[0, 0])) if one_row else (-1, -1)
        if q0 >= 0 and k0 >= 0:  # one row of contiguous positions (a batch of one may be left-padded): a slice
            if t == 1:
                return m[:, q0:q0 + q_pos.shape[1], k0:k0 + k_pos.shape[1]][None]  # (1, H, Tq, Tk)
            rows = torch.arange(q0, q0 + q_pos.shape[1], device=m.device) // t  # (Tq,) tile of each query
            cols = torch.arange(k0, k0 + k_pos.shape[1], device=m.device) // t  # (Tk,)
            return m[:, rows[:, None], cols[None, :]][None]  # (1, H, Tq, Tk)
        qi = q_pos.clamp(min=0).expand(max(q_pos.shape[0], k_pos.shape[0]), -1) // t  # (B, Tq)
        ki = k_pos.clamp(min=0).expand(qi.shape[0], -1) // t  # (B, Tk)
        return m[:, qi[:, :, None], ki[:, None, :]].transpose(0, 1)  # (B, H, Tq, Tk)

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        q_padding: Optional[Tensor] = None,
        k_padding: Optional[Tensor] = None,
        q_offset: Optional[int | Tensor] = None,
        k_offset: Optional[int | Tensor] = None,
        dropout_p: float = 0.0,
        scale: Optional[float] = None,
        bias: Optional[Tensor] = None,
    ) -> Tensor:
        """``q (B, H, Tq, D)``, ``k, v (B, H, Tk, D)``, paddings ``(B, T)`` True = pad → ``(B, H, Tq, D)``.

        ``scale`` defaults to ``1/sqrt(D)``. ``q_offset``: real position of the first real query, an int or per row
        ``(B, 1)`` (a padded incremental step: the new queries follow each row's own real cached keys). Default for
        self-attention without query padding: the new queries follow the row's real cached keys; otherwise 0.
        ``k_offset``: real position of the first real key, an int or per row ``(B, 1)`` (a sliding-window cache that
        dropped its oldest keys); default 0. ``bias``: float scores ``(B|1, H, Tq, Tk)`` added to the scaled ``q·k``
        (backends eager, sdpa and block; ``auto`` on CUDA then runs sdpa), e.g. Transformer-XL's relative-position
        term.
        """
        tq, tk = q.shape[-2], k.shape[-2]
        q_pos, k_pos = self._positions(tq, tk, q_padding, k_padding, q_offset, k_offset, q.device)
        padded = q_padding is not None or k_padding is not None
        need_probs = self.recorder is not None
        if need_probs and getattr(self.recorder, "chunk_tile", 0) > 0 and self.mask is None:
            # tiled statistics: attention a chunk of query rows at a time, never holding (B, H, Tq, Tk)
            return self._calibrate_chunked(q, k, v, *self._call_mask(q_pos, k_pos, padded), dropout_p, scale, bias,
                                           q_pos, k_pos)
        backend = "eager" if need_probs else self.backend
        if bias is not None and backend == "auto" and q.device.type == "cuda":
            backend = "sdpa"  # flex adds no score bias and block is slower than SDPA on CUDA (on CPU block adds it)
        if backend in ("auto", "flex", "block"):  # (two host syncs: only for backends that cache per position window)
            window = (int(q_pos[0, 0]), int(k_pos[0, 0]), tq, tk, q.device)
        call: Optional[tuple[Optional[Tensor], bool]] = None  # this call's (mask, is_causal): built at most once
        if backend == "auto":
            training = needs_grad(q, k, v)
            choice = (window, training, dropout_p > 0, padded)
            if choice not in self._auto_choice:
                call = self._call_mask(q_pos, k_pos, padded)
                self._auto_choice[choice] = self.choose_backend(*call, padded, training, dropout_p, q_pos, k_pos,
                                                                window)
            backend = self._auto_choice[choice]
        # flex: one BlockMask, block: one BlockPlan (kept tiles grouped for fused calls) per position window and head
        # count, built once (masks and causality are input-independent); the element mask is only built for that
        plan_key = (backend, q.shape[1], *window) if backend in ("flex", "block") and not padded else None
        if plan_key is not None and plan_key in self._block_masks:
            mask, is_causal = self._block_masks[plan_key], False
        else:
            mask, is_causal = call or self._call_mask(q_pos, k_pos, padded)
            if plan_key is not None:
                keep = self._window_keep(mask, is_causal, q_pos, k_pos, window)  # (1, H|1, Tq, Tk)
                plan = flex_block_mask(keep) if backend == "flex" else block_plan(keep[0], q.shape[1], BLOCK_TILE)
                self._block_masks[plan_key] = plan
                mask, is_causal = plan, False
        out, probs = attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
                               backend=backend, need_probs=need_probs, bias=bias)
        if need_probs:
            self.recorder(self, probs, q_pos, k_pos)
        return out

    def _positions(self, tq: int, tk: int, q_padding: Optional[Tensor], k_padding: Optional[Tensor],
                   q_offset: Optional[int | Tensor], k_offset: Optional[int | Tensor],
                   device: torch.device) -> tuple[Tensor, Tensor]:
        """Real positions of the queries ``(1|B, Tq)`` and keys ``(1|B, Tk)`` of a call (see ``forward``)."""
        k_pos = real_positions(k_padding, tk, 0 if k_offset is None else k_offset, device)  # (1|B, Tk)
        if q_padding is None and q_offset is None and self.kind is not SiteKind.CROSS:
            # new queries follow the real (cached) keys of their own row: per-row offsets under key padding
            last = k_pos.max(dim=1, keepdim=True).values - self.causal_shift  # (1|B, 1) the last query's position
            q_pos = (last + 1 - tq) + torch.arange(tq, device=device)  # (1|B, Tq)
        else:
            q_pos = real_positions(q_padding, tq, 0 if q_offset is None else q_offset, device)  # (1|B, Tq)
        return q_pos, k_pos

    def _calibrate_chunked(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                           dropout_p: float, scale: Optional[float], bias: Optional[Tensor], q_pos: Tensor,
                           k_pos: Tensor) -> Tensor:
        """Eager attention a chunk of query rows at a time (rows start at multiples of the recorder's
        ``chunk_tile``; about ``CHUNK_ELEMENTS`` scores per chunk; causal chunks only over the keys they reach),
        handing the recorder each chunk's statistics: per-row tile sums for aligned calls (``row_tiles``: the
        probabilities are never normalised entry by entry), else the probabilities. The output and probabilities of
        the eager backend in O(B × H × chunk × Tk) memory, scores and softmax in float32 whatever ``q``'s dtype."""
        b, h, tq, d = q.shape
        tk, tile = k.shape[-2], self.recorder.chunk_tile
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        shift = tk - tq  # bottom-right causal: row i sees keys j <= i + shift
        by_tiles = (hasattr(self.recorder, "row_tiles") and self.recorder.aligned(q_pos, k_pos)
                    and (not is_causal or int(q_pos[0, 0]) + self.causal_shift == shift))  # index = real causality
        kf, vf = k.float().transpose(-2, -1), v.float()  # (B, H, D, Tk), (B, H, Tk, Dv)
        out = q.new_empty(b, h, tq, v.shape[-1])  # (B, H, Tq, Dv)
        rows = max(tile, CHUNK_ELEMENTS // max(1, b * h * tk) // tile * tile)
        for a in range(0, tq, rows):
            e = min(tq, a + rows)
            kend = min(tk, e + shift) if is_causal else tk
            s = (q[:, :, a:e].float() @ kf[..., :kend]).mul_(scale)  # (B, H, c, kend) scores
            if bias is not None:
                s.add_(bias[..., a:e, :kend].float())
            keep, lo = self._chunk_keep(mask, is_causal, a, e, kend, shift, q.device)  # (.., c, kend - lo)
            if keep is not None:  # finfo.min (not -inf): a row with no kept key stays finite, zeroed below
                s[..., lo:].masked_fill_(~keep, torch.finfo(s.dtype).min)
            s.sub_(s.amax(dim=-1, keepdim=True)).exp_()  # (B, H, c, kend) unnormalised probabilities
            inv = s.sum(dim=-1, keepdim=True).reciprocal_()  # (B, H, c, 1)
            if keep is not None and lo == 0:
                inv.mul_(keep.any(dim=-1, keepdim=True))  # rows with no kept key -> 0, like eager
            if dropout_p > 0:
                out[:, :, a:e] = F.dropout(s * inv, p=dropout_p) @ vf[:, :, :kend]
            else:
                out[:, :, a:e] = (s @ vf[:, :, :kend]).mul_(inv)  # (B, H, c, Dv)
            if by_tiles:
                self.recorder.row_tiles(self, tile_row_sums(s, tile).mul_(inv), q_pos[:, a:e], k_pos[:, :kend])
            else:
                self.recorder(self, s.mul_(inv), q_pos[:, a:e], k_pos[:, :kend])
        return out

    @staticmethod
    def _chunk_keep(mask: Optional[Tensor], is_causal: bool, a: int, e: int, kend: int, shift: int,
                    device: torch.device) -> tuple[Optional[Tensor], int]:
        """The keep-mask of query rows ``a:e`` over keys ``lo:kend``, where ``lo`` is the first key some row of the
        chunk does not keep (keys before it need no masking): ``((1|B, H|1, c, kend - lo) bool, lo)``, or
        ``(None, kend)`` when the chunk keeps every key it reaches."""
        lo = min(kend, a + shift + 1) if is_causal else kend
        m = None if mask is None else mask[..., a:e, :kend]  # (1|B, H|1, c, kend)
        if m is not None:
            cut = (~m).reshape(-1, kend).any(dim=0).nonzero()  # (n, 1) keys some row does not keep
            lo = min(lo, int(cut[0, 0])) if len(cut) else lo
        if lo >= kend:
            return None, kend
        keep = None if m is None else m[..., lo:]
        if is_causal:
            causal = torch.arange(lo, kend, device=device)[None, :] <= torch.arange(a, e, device=device)[:, None] \
                + shift  # (c, kend - lo)
            keep = causal if keep is None else keep & causal
        return keep, lo

    def _call_mask(self, q_pos: Tensor, k_pos: Tensor, padded: bool) -> tuple[Optional[Tensor], bool]:
        """This call's bool keep-mask ``(1|B, H|1, Tq, Tk)`` (installed mask, sliding window and, for padded calls,
        padding and causality in real positions) or None, and whether the backend must still apply causality."""
        mask = self._aligned_mask(q_pos, k_pos) if self.mask is not None else None  # (1|B, H, Tq, Tk)
        band = self._band(q_pos, k_pos)  # (1|B, 1, Tq, Tk) or None: the sliding window
        if band is not None:
            mask = band if mask is None else mask & band
        is_causal = self.kind.causal
        if padded:  # express padding and causality in real positions, as one bool mask
            keep = (k_pos >= 0)[:, None, None, :] & (q_pos >= 0)[:, None, :, None]  # (B, 1, Tq, Tk)
            if is_causal:
                keep = keep & (k_pos[:, None, None, :] <= q_pos[:, None, :, None] + self.causal_shift)
            mask = keep if mask is None else mask & keep
            is_causal = False
        return mask, is_causal

    def _band(self, q_pos: Tensor, k_pos: Tensor) -> Optional[Tensor]:
        """The sliding window at real positions, ``(1|B, 1, Tq, Tk)`` bool (True = inside), or None when it cuts no key.

        Queries of a causal site are among its keys, so no two real positions of a call are more than ``Tk - 1``
        apart: with ``Tk <= sliding_window`` the window cuts nothing (no mask, the fused causal kernel stays).
        """
        if self.sliding_window is None or k_pos.shape[-1] <= self.sliding_window:
            return None
        return q_pos[:, None, :, None] - k_pos[:, None, None, :] < self.sliding_window  # (1|B, 1, Tq, Tk)

    def _window_keep(self, mask: Optional[Tensor], is_causal: bool, q_pos: Tensor, k_pos: Tensor,
                     window: tuple) -> Tensor:
        """The window's keep-mask with causality folded in: ``(1, H|1, Tq, Tk)``."""
        _, _, tq, tk, device = window
        keep = mask if mask is not None else torch.ones(1, 1, tq, tk, dtype=torch.bool, device=device)
        return keep & (k_pos[0][None, :] <= q_pos[0][:, None] + self.causal_shift) if is_causal else keep

    def choose_backend(self, mask: Optional[Tensor], is_causal: bool, padded: bool, training: bool, dropout_p: float,
                       q_pos: Tensor, k_pos: Tensor, window: tuple) -> str:
        """What ``backend="auto"`` runs for this call (logged once per site and choice)."""
        device = window[4]
        if mask is None or padded:
            choice = "sdpa"  # dense: the fused kernel; padded batches: per-row masks, planned on every call
        elif device.type != "cuda":
            # on CPU block beats masked SDPA everywhere measured, and flex has no backward; a call of fewer queries
            # than a tile (an incremental decoding step, a new window each step) would plan per step: SDPA
            choice = "block" if window[2] >= BLOCK_TILE else "sdpa"
        elif dropout_p > 0:
            choice = "sdpa"  # CUDA with attention dropout: flex has none and block is slower than SDPA there
        else:
            if window not in self._empty_tiles:
                here = window[:4] + (mask.device,)  # counted where the mask is
                keep = self._window_keep(mask, is_causal, q_pos, k_pos, here)[0]  # (H|1, Tq, Tk)
                valid = self._window_keep(self._band(q_pos, k_pos), is_causal, q_pos, k_pos, here)[0]  # (1, Tq, Tk)
                empty, total = empty_tiles(keep, valid.expand_as(keep), flex_block_size(device))
                self._empty_tiles[window] = empty / total
            big = window[3] >= AUTO_SPARSE_MIN_LEN_CUDA and self._empty_tiles[window] >= AUTO_SPARSE_MIN_EMPTY
            choice = "flex" if big else "sdpa"
        if (choice, training) not in self._auto_logged:
            self._auto_logged.add((choice, training))
            log.info(f"site {self.name}: backend auto -> {choice} ({'training' if training else 'inference'} on "
                     f"{device.type})")
        return choice

    def extra_repr(self) -> str:
        masked = "masked" if self.mask is not None else "dense"
        window = f", sliding_window={self.sliding_window}" if self.sliding_window is not None else ""
        return (f"{self.kind.value}, heads={self.n_heads}, max={self.max_q}x{self.max_k}, backend={self.backend}"
                f"{window}, {masked}")


def find_sites(model: nn.Module) -> dict[str, AttentionSite]:
    """All ``AttentionSite`` modules of ``model`` by dotted path (and bind each site's ``name``)."""
    sites = {}
    for name, module in model.named_modules():
        if isinstance(module, AttentionSite):
            module.name = name
            sites[name] = module
    return sites


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What a mask file must match: the model class and each site's ``[kind, n_heads, max_q, max_k]``."""
    sites = find_sites(model)
    if not sites:
        raise MaskError(f"{type(model).__name__} has no AttentionSite modules: it cannot be pruned")
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sites": {n: [s.kind.value, s.n_heads, s.max_q, s.max_k] for n, s in sites.items()},
    }
