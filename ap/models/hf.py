"""AP for Hugging Face transformers models through their public attention extension point.

``attach_sites(model, max_len)`` gives every attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS``
(BERT, RoBERTa, ELECTRA, DistilBERT-style encoders, causal LMs such as Llama, Qwen2, Mistral, Gemma3 and GPT-2 in
transformers v5, ...) a child ``AttentionSite`` named ``ap_site`` and switches the model to the ``"ap"`` attention
implementation registered here. The registered function hands ``q, k, v`` to the module's site, which applies padding,
the model's sliding window and the AP mask at real token positions and records probabilities during calibration. No
model code is copied.

transformers facts this relies on (v5): the function is called as ``fn(module, q (B,H,q,d), k, v, attention_mask,
scaling=, dropout=, **kw)`` and returns ``(out (B,q,H,d), weights)``; a mask builder must be registered under the same
name, else ``attention_mask`` arrives as ``None`` and padding is silently ignored. The mask is the only padding
information the function gets, so the builder registered here (``ap_mask``) also blanks the rows of padded queries of
causal self-attention (``sdpa_mask`` lets a padded query after the real tokens see them): padding is then a query
that sees no key, or a key that no query sees, for every kind of site.

Sliding-window layers (Gemma3's ``layer_types``, Mistral's ``sliding_window``, Qwen2's ``use_sliding_window``): the
window reaches the attention function twice. The model passes ``sliding_window=W`` (``None`` for full layers) as a
keyword, and ``masking_utils.create_sliding_window_causal_mask`` builds the layer's mask with
``sliding_window_overlay(W)`` (``kv_idx > q_idx - W``: a query sees its own key and the ``W - 1`` before it) and calls
the builder with ``local_size=W``. For an unpadded batch ``sdpa_mask`` would return ``None`` (window and causality
left to the function), and a ``DynamicSlidingWindowLayer`` / ``StaticSlidingWindowLayer`` cache keeps only the last
``W - 1`` keys, so the keys start at token ``kv_offset > 0``. A window hides real keys from every query, so such a mask
no longer tells real keys from padding. Hence, for causal self-attention, ``ap_mask`` covers every token from the
first (the ``kv_offset`` keys a cache dropped included) with causality and padding only, and, where the model's own
mask differs (a window that cuts), stacks the model's mask before it along the batch: ``(B | 2B, 1, q, kv_offset +
kv_length)``. ``ap_attention`` reads padding and real positions from the causal mask; the site applies its window
(``AttentionSite.sliding_window``, set by ``attach_sites`` from the module or its config) in real positions, and every
call checks that causality, padding and that window give exactly the model's own mask (``MaskError`` otherwise, e.g.
chunked attention or a window the site does not know).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ap.core import AttentionSite, MaskError, SiteKind, real_positions

IMPLEMENTATION = "ap"


def ap_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                 scaling: Optional[float] = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function: ``query (B, H, q, d)``, ``key/value (B, Hkv, k, d)`` → ``(B, q, H, d)``."""
    site: Optional[AttentionSite] = getattr(module, "ap_site", None)
    if site is None:
        raise MaskError(f"{type(module).__name__} has no AP site: call ap.models.hf.attach_sites(model) first")
    if "sliding_window" in kwargs and kwargs["sliding_window"] != site.sliding_window:
        raise MaskError(f"site {site.name!r}: the model passes sliding_window={kwargs['sliding_window']} but the site "
                        f"has {site.sliding_window}; attach sites to the model as configured (attach_sites after "
                        f"changing config.sliding_window or layer_types)")
    for name in ("softcap", "s_aux"):  # logit soft-capping, attention sinks: computations a site does not have
        if kwargs.get(name) is not None:
            raise MaskError(f"site {site.name!r}: {type(module).__name__} passes {name}=..., which the 'ap' attention "
                            f"does not implement; this model cannot be pruned here")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat key/value heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    q_padding = k_padding = q_offset = k_offset = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise MaskError(f"expected a bool attention mask from the 'ap' mask builder, got {attention_mask.dtype}; "
                            f"pass a 2-D attention_mask (or a bool 4-D one) to a model switched by attach_sites")
        if site.kind is SiteKind.DEC_SELF:
            q_padding, k_padding, q_offset, k_offset = _cached_causal_positions(attention_mask, query.shape[0],
                                                                                key.shape[-2], site)
        else:
            see = attention_mask.any(dim=1)  # (B, q, k)
            k_padding = ~see.any(dim=1)  # (B, k): keys that no query may see = padding
            if site.kind is not SiteKind.CROSS:
                q_padding = ~see.any(dim=2)  # (B, q): queries that see no key = padding
                if q_padding.shape == k_padding.shape:
                    q_padding = q_padding | k_padding
            if not bool(k_padding.any()) and (q_padding is None or not bool(q_padding.any())):
                q_padding = k_padding = None  # nothing padded: the site's unpadded (fused / block-sparse) paths
    out = site(query, key, value, q_padding=q_padding, k_padding=k_padding, q_offset=q_offset, k_offset=k_offset,
               dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, q, H, d)


_LAST_POSITIONS: dict[str, Any] = {}  # the positions of the last causal mask seen (one entry)


def _cached_causal_positions(mask: Tensor, batch: int, n_keys: int, site: AttentionSite) -> tuple[Any, Any, Any, Any]:
    """``_causal_self_positions``, computed once per mask: transformers builds one mask per forward and hands the same
    tensor to every layer, so the other layers reuse the first one's reading (at 4,096 tokens reading and checking
    the (q, K) mask cost ~50 ms per layer, as much as block-sparse attention itself). Keyed by the tensor object (a
    weak reference: a new mask is a new object), its in-place version, and what else the reading depends on."""
    version = -1 if mask.is_inference() else mask._version  # (inference tensors keep no version counter)
    key = (batch, n_keys, site.sliding_window, version)
    last = _LAST_POSITIONS.get("mask")
    if last is not None and last[0]() is mask and last[1] == key:
        return last[2]
    result = _causal_self_positions(mask, batch, n_keys, site)
    _LAST_POSITIONS["mask"] = (weakref.ref(mask), key, result)
    return result


def _causal_self_positions(mask: Tensor, batch: int, n_keys: int, site: AttentionSite) -> tuple[Any, Any, Any, Any]:
    """``(q_padding, k_padding, q_offset, k_offset)`` of causal self-attention from the ``"ap"`` builder's mask.

    ``mask`` is ``(B|1, 1|H, q, K)`` (causality and padding; a bool 4-D mask of the user) or ``(2B, 1, q, K)`` (the
    model's own mask, then causality and padding), where ``K >= n_keys`` covers every token from the first: the
    first ``K - n_keys`` are keys a sliding-window cache dropped. Checks that causality, padding and the site's
    sliding window give the model's own mask. Nothing padded and one key offset for all rows: paddings and query
    offset None, ``k_offset`` an int (the site's unpadded paths).
    """
    own, see = (mask[:batch], mask[batch:]) if mask.shape[0] == 2 * batch else (None, mask)
    see = see.any(dim=1)  # (B, q, K)
    tq, tk = see.shape[-2:]
    dropped = tk - n_keys  # keys before the first one passed (dropped by a sliding-window cache)
    if dropped < 0:
        raise MaskError(f"site {site.name!r}: the attention mask covers {tk} keys but {n_keys} are passed; pass a "
                        f"2-D attention_mask (or a 4-D one over every key)")
    k_padding = ~see.any(dim=1)  # (B, K): keys that no query may see = padding
    q_padding, q_offset = _causal_query_positions(see, ~see.any(dim=2), k_padding)  # (B, q), (B, 1)
    if own is not None or (site.sliding_window is not None and tk > site.sliding_window):
        allowed = see
        if site.sliding_window is not None:  # the site's window at real positions
            q_pos, k_pos = real_positions(q_padding, tq, q_offset), real_positions(k_padding, tk)  # (B, q), (B, K)
            allowed = see & (q_pos[:, :, None] - k_pos[:, None, :] < site.sliding_window)  # (B, q, K)
        if not torch.equal(allowed, see if own is None else own.any(dim=1)):
            raise MaskError(f"site {site.name!r}: the model's attention mask is not causality, padding and the site's "
                            f"sliding window ({site.sliding_window}) at real positions; the 'ap' attention supports "
                            f"causal and sliding-window causal masks of padded batches (not chunked attention or "
                            f"packed sequences)")
    k_offset = (~k_padding[:, :dropped]).sum(dim=1, keepdim=True)  # (B, 1) real keys dropped
    k_padding = k_padding[:, dropped:]  # (B, k)
    if not bool(q_padding.any()) and not bool(k_padding.any()) and bool((k_offset == k_offset[0]).all()):
        return None, None, None, int(k_offset[0, 0])  # the site places the queries after the keys
    return q_padding, k_padding, q_offset, k_offset


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
    """The ``"ap"`` mask builder: ``sdpa_mask`` never skipped; causal masks from token 0, padded queries blanked.

    Arguments as transformers' mask builders get them (``masking_utils.create_causal_mask``): query ``i`` is token
    ``q_offset + i``, key ``j`` is token ``kv_offset + j``, ``attention_mask (B, tokens)`` bool is the 2-D padding mask.
    A mask is causal when its pattern (``mask_function``, no padding) keeps no key after its query. Causal masks cover
    tokens ``0 .. kv_offset + kv_length - 1`` (keys a sliding-window cache dropped too) and are ``(B, 1, q, K)``
    causality and padding, or ``(2B, 1, q, K)``: the model's own mask (e.g. with its sliding window), then causality and
    padding, where the two differ (module docstring). Cross-attention masks (decoder queries, encoder padding) are
    bidirectional and left as ``sdpa_mask`` builds them, ``(B, 1, q, kv_length)``.
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    # Never skip the mask: an unpadded batch would get None (a static cache's empty slots would then count as keys).
    # create_causal_mask passes allow_is_causal_skip itself, so it must be overridden here, not preset by a partial.
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    n_keys = kv_offset + kv_length  # every token from the first

    def build(**changes: Any) -> Tensor:  # (B, 1, q, n_keys) over tokens 0 .. n_keys - 1
        return sdpa_mask(batch_size, q_length, n_keys, q_offset, 0, **{**kwargs, **changes})

    pattern = build(attention_mask=None)
    q_tok = torch.arange(q_length, device=pattern.device) + q_offset  # (q,)
    k_tok = torch.arange(n_keys, device=pattern.device)  # (K,)
    causal = k_tok[None, :] <= q_tok[:, None]  # (q, K)
    if bool((pattern & ~causal).any()):  # a key after its query: not causal self-attention
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)
    see = build(attention_mask=attention_mask, mask_function=causal_mask_function)  # causality and padding only
    # the model's own mask where its pattern hides an earlier key (a sliding window that cuts, other overlays)
    own = build(attention_mask=attention_mask) if bool((causal & ~pattern).any()) else None
    padding = prepare_padding_mask(attention_mask, n_keys, 0)  # (B, >= n_keys)
    if padding is not None and int(q_offset + q_length) <= padding.shape[-1]:
        rows = padding[:, q_tok].to(see.device)[:, None, :, None]  # (B, 1, q, 1): real queries
        see = see & rows
        own = own & rows if own is not None else None
    return see if own is None or torch.equal(own, see) else torch.cat([own, see])  # (B | 2B, 1, q, K)


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


def _sliding_window(module: nn.Module) -> Optional[int]:
    """The module's own sliding window: its ``sliding_window`` attribute (Gemma3, Qwen2: None for full layers), else
    its config's for the layer (``layer_types[layer_idx] == "sliding_attention"``; Mistral: every layer)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types, layer_idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if window is not None and layer_types is not None and layer_idx is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def attach_sites(model: nn.Module, max_len: int, backend: str = "auto") -> dict[str, AttentionSite]:
    """Give each attention module of ``model`` an ``ap_site`` child and switch the model to the ``"ap"`` implementation.

    Attention modules are those with a ``scaling`` attribute and a head count (how transformers v5 attention modules
    call ``ALL_ATTENTION_FUNCTIONS``); a causal one with a sliding window gets a site with that window. Raises
    ``MaskError`` if none is found (such a model cannot be pruned here) or for bidirectional local attention.
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
        window = _sliding_window(module) if kind is SiteKind.DEC_SELF else getattr(module, "sliding_window", None)
        if window is not None and kind is not SiteKind.DEC_SELF:
            raise MaskError(f"{name} ({type(module).__name__}) is bidirectional local attention (sliding_window="
                            f"{window}); ap supports sliding windows of causal self-attention only")
        module.ap_site = AttentionSite(kind, heads, max_len, max_len, backend=backend, sliding_window=window)
        module.ap_site.name = f"{name}.ap_site"
        found[module.ap_site.name] = module.ap_site
    if not found:
        raise MaskError(f"no attention modules found in {type(model).__name__}: ap supports transformers models whose "
                        f"attention modules dispatch through ALL_ATTENTION_FUNCTIONS (BERT family in transformers v5)")
    model.set_attn_implementation(IMPLEMENTATION)
    return found
