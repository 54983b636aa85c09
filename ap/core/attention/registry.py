"""The backend registry and ``attention()``, the one function every attention site calls."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import MaskError

# fn(q, k, v, mask, is_causal, dropout_p, scale, need_probs) -> (out, probs | None)
Backend = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], bool, float, float, bool], "tuple[Tensor, Optional[Tensor]]"]
BACKENDS: dict[str, Backend] = {}
PROB_BACKENDS: set[str] = set()
# backends that add a score ``bias`` (called with ``bias=`` only when one is given)
BIAS_BACKENDS = {"eager", "sdpa", "block"}


def register_backend(name: str, returns_probs: bool = False) -> Callable[[Backend], Backend]:
    """Register ``fn`` as attention backend ``name``; ``returns_probs`` marks backends usable for calibration."""

    def wrap(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        if returns_probs:
            PROB_BACKENDS.add(name)
        return fn

    return wrap



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
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Attention over ``q (B, H, Tq, D)``, ``k, v (B, H, Tk, D)`` → ``(out (B, H, Tq, D), probs (B, H, Tq, Tk) | None)``.

    ``mask``: bool, broadcastable to ``(B, H, Tq, Tk)``, True = keep (the flex backend also takes a prepared
    ``BlockMask``). ``need_probs`` requires a backend that computes them. ``bias``: float scores added to the scaled
    ``q·k`` (``BIAS_BACKENDS`` only).
    """
    if backend not in BACKENDS:
        raise MaskError(f"unknown attention backend {backend!r}; choose one of {sorted(BACKENDS)} (attention.backend=...)")
    if need_probs and backend not in PROB_BACKENDS:
        raise MaskError(f"backend {backend!r} does not return attention probabilities; use one of {sorted(PROB_BACKENDS)}")
    if isinstance(mask, Tensor) and mask.dtype != torch.bool:
        raise MaskError(f"attention masks must be bool (True = keep), got {mask.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if bias is not None:
        if backend not in BIAS_BACKENDS:
            raise MaskError(f"backend {backend!r} cannot add a score bias (e.g. Transformer-XL's relative positions); "
                            f"use one of {sorted(BIAS_BACKENDS)}")
        return BACKENDS[backend](q, k, v, mask, is_causal, dropout_p, scale, need_probs, bias=bias)
    return BACKENDS[backend](q, k, v, mask, is_causal, dropout_p, scale, need_probs)
