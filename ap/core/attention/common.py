"""Mask helpers shared by the backends, the thresholding and the statistics: causal triangles and tile sums."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def needs_grad(*tensors: Tensor) -> bool:
    """Whether this call builds an autograd graph through any of ``tensors`` (training, as the backends see it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> Tensor:
    """Bool ``(Tq, Tk)``: True where query ``i`` may see key ``j`` (bottom-right aligned)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)  # (Tq, 1)
    j = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    return j <= i


def keep_with_causal(mask: Optional[Tensor], is_causal: bool, tq: int, tk: int, device: torch.device) -> Optional[Tensor]:
    """Combine an optional bool mask with the causal triangle into one bool keep-mask (or None if nothing is masked)."""
    if not is_causal:
        return mask
    causal = causal_mask(tq, tk, device)  # (Tq, Tk)
    return causal if mask is None else mask & causal



def tile_sum(x: Tensor, bs: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(..., Q, K)`` → ``(..., ceil(Q/bs), ceil(K/bs))``: sums over ``bs × bs`` tiles (edges zero-padded),
    accumulated in ``dtype`` (default: ``x``'s)."""
    q, k = x.shape[-2:]
    if k % bs or q % bs:
        x = F.pad(x, (0, -k % bs, 0, -q % bs))  # (..., Qb*bs, Kb*bs)
    return x.unflatten(-1, (-1, bs)).unflatten(-3, (-1, bs)).sum(dim=(-3, -1), dtype=dtype)


def tile_row_sums(x: Tensor, bs: int) -> Tensor:
    """``(..., Q, K)`` → ``(..., Q, ceil(K/bs))``: each row's sums over groups of ``bs`` keys (edge zero-padded), in
    ``x``'s dtype (a contiguous reduction: the cheap half of a tile sum)."""
    k = x.shape[-1]
    if k % bs:
        x = F.pad(x, (0, -k % bs))  # (..., Q, Kb*bs)
    return x.unflatten(-1, (-1, bs)).sum(dim=-1)


def empty_tiles(keep: Tensor, valid: Tensor, bs: int) -> tuple[int, int]:
    """``(tiles whose valid entries are all pruned, tiles with a valid entry)`` for bool ``keep``/``valid (..., Q, K)``."""
    has_valid = tile_sum(valid.double(), bs) > 0  # (..., Qb, Kb)
    has_kept = tile_sum((keep & valid).double(), bs) > 0
    return int((has_valid & ~has_kept).sum()), int(has_valid.expand_as(has_kept).sum())

