"""AP for Hugging Face transformers models through their public attention extension point.

``attach_sites(model, max_len)`` gives every attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS``
(BERT, RoBERTa, ELECTRA, DistilBERT-style encoders, causal LMs such as Llama and GPT-2 in transformers v5, ...) a child
``AttentionSite`` named ``ap_site`` and switches the model to the ``"ap"`` attention implementation registered here.
The registered function hands ``q, k, v`` to the module's site, which applies padding and the AP mask at real token
positions and records probabilities during calibration. No model code is copied.

transformers facts this relies on (v5): the function is called as ``fn(module, q (B,H,q,d), k, v, attention_mask,
scaling=, dropout=, **kw)`` and returns ``(out (B,q,H,d), weights)``; a mask builder must be registered under the same
name, else ``attention_mask`` arrives as ``None`` and padding is silently ignored. The mask is the only padding
information the function gets, so the builder registered here (``ap_mask``) also blanks the rows of padded queries of
causal self-attention (``sdpa_mask`` lets a padded query after the real tokens see them): padding is then a query
that sees no key, or a key that no query sees, for every kind of site.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

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
    q_padding = k_padding = q_offset = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise MaskError(f"expected a bool attention mask from the 'ap' mask builder, got {attention_mask.dtype}; "
                            f"pass a 2-D attention_mask (or a bool 4-D one) to a model switched by attach_sites")
        see = attention_mask.any(dim=1)  # (B, q, k)
        k_padding = ~see.any(dim=1)  # (B, k): keys that no query may see = padding
        if site.kind is not SiteKind.CROSS:
            q_padding = ~see.any(dim=2)  # (B, q): queries that see no key = padding (ap_mask blanks their rows)
            if site.kind is SiteKind.ENC_SELF and q_padding.shape == k_padding.shape:
                q_padding = q_padding | k_padding
        if not bool(k_padding.any()) and (q_padding is None or not bool(q_padding.any())):
            q_padding = k_padding = None  # nothing padded: the site's unpadded (fused causal / block-sparse) paths
        elif site.kind is SiteKind.DEC_SELF:
            q_padding, q_offset = _causal_query_positions(see, q_padding, k_padding)
    out = site(query, key, value, q_padding=q_padding, k_padding=k_padding, q_offset=q_offset, dropout_p=dropout,
               scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, q, H, d)


def _causal_query_positions(see: Tensor, q_padding: Tensor, k_padding: Tensor) -> tuple[Tensor, Tensor]:
    """Query padding and each row's real position of its first real query for causal self-attention.

    ``see (B, q, k)`` is the mask; the queries are keys ``first .. first + q - 1`` (the same for every row: after the
    cached keys, or inside a static cache). A real causal query sees its own key and none after it, so ``first`` is read
    off any real query row, and a query that does not see its own key is padding. Returns ``q_padding (B, q)`` and the
    number of real keys before ``first``, ``(B, 1)``: with a left-padded cache every row has its own count.
    """
    tq, tk = see.shape[-2:]
    q_idx, k_idx = torch.arange(tq, device=see.device), torch.arange(tk, device=see.device)
    last = torch.where(see, k_idx, -1).amax(dim=-1)  # (B, q): last key each query sees (its own if it is real)
    first = int((last - q_idx).masked_fill(q_padding, -1).max())  # key index of query 0; -1: every query is padding
    if first >= 0:
        own = (first + q_idx).clamp(max=tk - 1)  # (q,)
        q_padding = q_padding | ~see[:, q_idx, own]  # (B, q)
    before = (~k_padding[:, :max(first, 0)]).sum(dim=1, keepdim=True)  # (B, 1) real keys before the first query
    return q_padding, before


def ap_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor = 0, kv_offset: int = 0,
            mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
    """The ``"ap"`` mask builder: ``sdpa_mask`` never skipped, with padded queries of causal masks blanked.

    Arguments as transformers' mask builders get them (``masking_utils.create_causal_mask``): query ``i`` is token
    ``q_offset + i``, key ``j`` is token ``kv_offset + j``, ``attention_mask (B, tokens)`` bool is the 2-D padding mask.
    A mask is causal when its pattern (``mask_function``, no padding) keeps no key after its query; cross-attention
    masks (decoder queries, encoder padding) are bidirectional and left as they are. Returns ``(B, 1, q, k)`` bool.
    """
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    # Never skip the mask: an unpadded batch would get None (a static cache's empty slots would then count as keys).
    # create_causal_mask passes allow_is_causal_skip itself, so it must be overridden here, not preset by a partial.
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    mask = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, >= kv_offset + kv_length)
    if padding is None or int(q_offset + q_length) > padding.shape[-1]:
        return mask
    q_tok = torch.arange(q_length, device=mask.device) + q_offset  # (q,)
    k_tok = torch.arange(kv_length, device=mask.device) + kv_offset  # (k,)
    pattern = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=None, **kwargs)
    if bool((pattern & (k_tok[None, :] > q_tok[:, None])).any()):
        return mask  # a key after its query is kept: not causal self-attention
    return mask & padding[:, q_tok].to(mask.device)[:, None, :, None]  # (B, 1, q, k)


@functools.cache
def register() -> None:
    """Register the ``"ap"`` attention function and its mask builder with transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, ap_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ap_mask)


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
