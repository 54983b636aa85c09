"""Dense backends: ``eager`` (explicit softmax; returns probabilities for calibration) and ``sdpa``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import keep_with_causal
from .registry import register_backend


@register_backend("eager", returns_probs=True)
def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, dropout_p: float, scale: float,
    need_probs: bool, bias: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    tq, tk = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if bias is not None:
        att = att + bias
    keep = keep_with_causal(mask, is_causal, tq, tk, q.device)
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
    need_probs: bool, bias: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    tq, tk = q.shape[-2], k.shape[-2]
    if bias is not None:  # a float mask: the bias, -inf where not kept; rows with no kept key give 0
        keep = keep_with_causal(mask, is_causal, tq, tk, q.device)
        scores = bias if keep is None else bias.masked_fill(~keep, float("-inf"))  # (B|1, H, Tq, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores.to(q.dtype), dropout_p=dropout_p, scale=scale)
        return (out if keep is None else torch.where(keep.any(-1, keepdim=True), out, 0.0)), None
    if mask is None and (not is_causal or tq == tk):
        # Fused path: SDPA's own is_causal is top-left aligned, which equals ours only when Tq == Tk.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    else:
        keep = keep_with_causal(mask, is_causal, tq, tk, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    return out, None

