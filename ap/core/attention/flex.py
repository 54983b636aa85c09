"""The ``flex`` backend: FlexAttention with a cached ``BlockMask`` (tiles with no kept entry are skipped)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import MaskError
from .common import keep_with_causal, needs_grad
from .registry import register_backend

FLEX_BLOCK_SIZE = 64  # FlexAttention tile (queries x keys) on CPU: 64 beat 128 and 256 on 2 CPU cores
# On CUDA flex's Triton kernels tile 128 x 64 (forward) and 64 x 128 (backward) on Hopper: 64-blocks do not compile
# there ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N", torch 2.11 on an H200, scripts/gpu_check.py)
FLEX_BLOCK_SIZE_CUDA = 128
_flex_compiled: Optional[Callable[..., Tensor]] = None


def flex_block_size(device: torch.device | str) -> int:
    """The FlexAttention ``BlockMask`` tile on ``device``: 128 on CUDA, 64 elsewhere."""
    return FLEX_BLOCK_SIZE_CUDA if torch.device(device).type == "cuda" else FLEX_BLOCK_SIZE


def flex_block_mask(keep: Tensor, block_size: Optional[int] = None) -> Any:
    """A FlexAttention ``BlockMask`` for a bool ``keep`` broadcastable to ``(B, H, Tq, Tk)``, with ``block_size`` tiles
    (default: ``flex_block_size`` of the mask's device). Kept tiles apply the exact element mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_size = block_size or flex_block_size(keep.device)
    while keep.dim() < 4:
        keep = keep[None]
    b, h, tq, tk = keep.shape
    with torch.inference_mode(False):  # a BlockMask cached during evaluation is used in training too: normal tensors
        keep = keep.clone()

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
        raise MaskError("the flex backend has no attention dropout: use it in eval mode, with dropout 0 "
                        "(e.g. model.dropout=0.0) or with model.backend=auto (it picks another backend with dropout)")
    if q.device.type == "cpu" and needs_grad(q, k, v):
        raise MaskError("flex attention has no backward on CPU (torch 2.13): train with backend sdpa or eager, "
                        "use flex for inference or on a GPU")
    if mask is None or isinstance(mask, Tensor):
        tq, tk = q.shape[-2], k.shape[-2]
        keep = keep_with_causal(mask, is_causal, tq, tk, q.device)
        mask = flex_block_mask(keep if keep is not None else torch.ones(tq, tk, dtype=torch.bool, device=q.device))
    elif is_causal:
        raise MaskError("pass causality inside the BlockMask for the flex backend")
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=mask, scale=scale), None  # rows with no kept key give 0

