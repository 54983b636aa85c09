"""AP for Hugging Face transformers models through their public attention extension point.

``attach_sites(model, max_len)`` gives every attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS``
(BERT, RoBERTa, ELECTRA, DistilBERT-style encoders in transformers v5, ...) a child ``AttentionSite`` named ``ap_site``
and switches the model to the ``"ap"`` attention implementation registered here. The registered function hands
``q, k, v`` to the module's site, which applies padding and the AP mask at real token positions and records
probabilities during calibration. No model code is copied.

transformers facts this relies on (v5): the function is called as ``fn(module, q (B,H,q,d), k, v, attention_mask,
scaling=, dropout=, **kw)`` and returns ``(out (B,q,H,d), weights)``; a mask builder must be registered under the same
name, else ``attention_mask`` arrives as ``None`` and padding is silently ignored.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ap.core import AttentionSite, MaskError, SiteKind

IMPLEMENTATION = "ap"


def ap_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                 scaling: Optional[float] = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function: ``query (B, H, q, d)``, ``key/value (B, Hkv, k, d)`` → ``(B, q, H, d)``."""
    site: Optional[AttentionSite] = getattr(module, "ap_site", None)
    if site is None:
        raise MaskError(f"{type(module).__name__} has no AP site: call ap.models.hf.attach_sites(model) first")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat key/value heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    k_padding = q_padding = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise MaskError(f"expected a bool attention mask from the 'ap' mask builder, got {attention_mask.dtype}")
        k_padding = ~attention_mask.any(dim=-2).any(dim=1)  # (B, k): keys that no query may see = padding
        if site.kind is SiteKind.ENC_SELF:
            q_padding = k_padding
    out = site(query, key, value, q_padding=q_padding, k_padding=k_padding, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, q, H, d)


@functools.cache
def register() -> None:
    """Register the ``"ap"`` attention function and its mask builder with transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, ap_attention)
    # Never skip the mask (an unpadded batch would otherwise get None, and causal models would lose causality).
    AttentionMaskInterface.register(IMPLEMENTATION, functools.partial(
        sdpa_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False))


def _n_heads(module: nn.Module) -> Optional[int]:
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    config = getattr(module, "config", None)
    return getattr(config, "num_attention_heads", None) if config is not None else None


def attach_sites(model: nn.Module, max_len: int, backend: str = "sdpa") -> dict[str, AttentionSite]:
    """Give each attention module of ``model`` an ``ap_site`` child and switch the model to the ``"ap"`` implementation.

    Attention modules are those with a ``scaling`` attribute and a head count (how transformers v5 attention modules
    call ``ALL_ATTENTION_FUNCTIONS``). Raises ``MaskError`` if none is found: such a model cannot be pruned here.
    """
    register()
    found = {}
    for name, module in list(model.named_modules()):
        heads = _n_heads(module)
        if heads is None or not hasattr(module, "scaling") or isinstance(module, AttentionSite):
            continue
        if getattr(module, "is_cross_attention", False):
            kind = SiteKind.CROSS
        elif getattr(module, "is_causal", False):
            kind = SiteKind.DEC_SELF
        else:
            kind = SiteKind.ENC_SELF
        module.ap_site = AttentionSite(kind, heads, max_len, max_len, backend=backend)
        found[f"{name}.ap_site"] = module.ap_site
    if not found:
        raise MaskError(f"no attention modules found in {type(model).__name__}: ap supports transformers models whose "
                        f"attention modules dispatch through ALL_ATTENTION_FUNCTIONS (BERT family in transformers v5)")
    model.set_attn_implementation(IMPLEMENTATION)
    return found
