"""One attention function with named backends.

``attention(q, k, v, mask=..., is_causal=..., backend=...)`` is the only place where attention is computed. Backends are
registered by name (like HF transformers' ``AttentionInterface``):

- ``eager``: explicit ``softmax(q kᵀ · scale + mask) v``; the reference for correctness and the only backend that returns
  the probabilities (used for calibration).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; with no mask and ``is_causal`` it is the fused causal
  kernel (the honest dense baseline), with a bool mask it is a masked dense kernel (correct, not faster).
- ``auto`` (resolved per call by ``AttentionSite``): ``sdpa`` to train on CPU, ``flex`` to train on GPU, and at
  inference ``flex`` when the mask empties at least ``AUTO_FLEX_MIN_EMPTY`` of the valid tiles of a window of
  ``AUTO_FLEX_MIN_LEN`` keys or more (where ``scripts/benchmark.py`` measured flex ahead), else ``sdpa``.
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
