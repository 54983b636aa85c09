"""fairseq Transformers with AP sites: every ``MultiheadAttention`` of a ``TransformerModel`` runs through an
``AttentionSite`` of kind ``enc_self`` (encoder), ``dec_self`` (decoder, causal) or ``cross`` (encoder-decoder).

``attach_sites(model)`` turns each fairseq ``MultiheadAttention`` into ``APMultiheadAttention`` in place (same
parameters, same incremental-state buffers, so fairseq checkpoints, ``SequenceGenerator`` and ``reorder_incremental_state``
keep working) and gives it a child site ``<path>.ap_site``. The subclass has one code path for training, validation and
incremental beam search (fairseq's fused fast path never sees masks), and it keeps mask positions aligned to real tokens:
source sentences are left-padded, targets right-padded, and in incremental decoding the query position is the step.

fairseq is imported lazily (``import_fairseq``): importing it registers ~29 entries in Hydra's ConfigStore that break
the composition of ``conf/`` (``Key 'lr' not in 'FairseqConfig'``); ``ap.config.forget_fairseq_configs`` removes them.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ap.core import AttentionSite, SiteKind
from ap.config import forget_fairseq_configs
from ap.core.errors import APError, MaskError


def import_fairseq() -> Any:
    """``import fairseq`` with a one-line fix on failure, leaving Hydra's ConfigStore as it was."""
    try:
        fairseq = importlib.import_module("fairseq")
        importlib.import_module("fairseq.models.transformer")
    except ImportError as e:
        raise APError(f"task=wmt needs fairseq ({e}): run `make install-fairseq` (see docs/translation.md)") from e
    forget_fairseq_configs()
    return fairseq


def _mha_class() -> type:
    return importlib.import_module("fairseq.modules.multihead_attention").MultiheadAttention


# tensors already checked (fairseq reuses one cached causal mask); holding them keeps their storage from being reused
# by another tensor with the same key
_FUTURE_MASKS_SEEN: dict[tuple, Tensor] = {}


def _is_future_mask(mask: Tensor, tgt_len: int, src_len: int) -> bool:
    """Is ``mask`` fairseq's additive causal mask (-inf above the diagonal, 0 elsewhere)?

    A tensor seen before, unchanged (same storage, shape, strides and version counter), is not compared again: in
    training the decoder passes the same buffered mask to every layer at every step.
    """
    if mask.dtype == torch.bool or mask.shape != (tgt_len, src_len):
        return False
    # inference tensors have no version counter: those are compared every time
    key = None if mask.is_inference() else (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask._version,
                                            mask.dtype, mask.device)
    if key is not None and key in _FUTURE_MASKS_SEEN:
        return True
    future = torch.ones(tgt_len, src_len, dtype=torch.bool, device=mask.device).triu(1)  # (T, S)
    ok = bool(torch.equal(torch.isneginf(mask), future)) and bool((mask[~future] == 0).all())
    if ok and key is not None:
        if len(_FUTURE_MASKS_SEEN) > 64:  # masks of many lengths: keep the set small
            _FUTURE_MASKS_SEEN.clear()
        _FUTURE_MASKS_SEEN[key] = mask
    return ok


def _swap_forward(cls_mha: type) -> type:
    class APMultiheadAttention(cls_mha):  # type: ignore[misc, valid-type]
        """fairseq ``MultiheadAttention`` whose attention is computed by ``self.ap_site`` (see the module doc).

        Returns ``(output, None)``: per-head weights are not computed (calibration records probabilities instead);
        fairseq's generator and decoder accept a missing alignment.
        """

        ap_site: AttentionSite
        _query_padding: Optional[Tensor] = None  # (B, T) target padding of the current full decoder pass

        def set_beam_size(self, beam_size: int) -> None:
            """Keep fairseq's plain beam path (no beam-folded cross-attention cache): one code path for masks."""
            self.beam_size = 1

        def reorder_incremental_state(self, incremental_state: dict[str, dict[str, Optional[Tensor]]],
                                      new_order: Tensor) -> dict[str, dict[str, Optional[Tensor]]]:
            """Every cached tensor (keys, values, padding, step) follows its beam: rows ``new_order``."""
            buffer = self._get_input_buffer(incremental_state)
            if buffer:
                for key, value in buffer.items():
                    if value is not None:
                        buffer[key] = value.index_select(0, new_order)
                incremental_state = self._set_input_buffer(incremental_state, buffer)
            return incremental_state

        def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                    key_padding_mask: Optional[Tensor] = None,
                    incremental_state: Optional[dict[str, dict[str, Optional[Tensor]]]] = None,
                    need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                    before_softmax: bool = False, need_head_weights: bool = False) -> tuple[Tensor, None]:
            site = self.ap_site
            tgt_len, bsz, embed_dim = query.shape  # (T, B, C)
            self._refuse_unsupported(tgt_len, attn_mask, incremental_state is not None, before_softmax)
            saved = self._get_input_buffer(incremental_state) if incremental_state is not None else None
            if saved is not None and "prev_key" in saved and static_kv:
                key = value = None  # cross-attention: encoder keys/values are cached
            q = self.q_proj(query)  # (T, B, C)
            if self.self_attention:
                k, v = self.k_proj(query), self.v_proj(query)  # (T, B, C)
            elif key is not None:
                k, v = self.k_proj(key), self.v_proj(value if value is not None else key)  # (S, B, C)
            else:
                k = v = None

            def heads(x: Tensor) -> Tensor:  # (L, B, C) -> (B, H, L, D)
                return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).permute(1, 2, 0, 3)

            q = heads(q)
            k, v = (heads(k), heads(v)) if k is not None else (None, None)
            step = 0  # real position of the first query (incremental decoding)
            if saved is not None:
                k, v, key_padding_mask, step = self._extend_cache(incremental_state, saved, k, v, key_padding_mask,
                                                                  static_kv, tgt_len)
            k_pad = key_padding_mask.bool() if key_padding_mask is not None else None  # (B, S) True = pad
            if k_pad is not None and not k_pad.any():
                k_pad = None
            q_pad, k_pad, q_offset = self._query_side(k_pad, bsz, tgt_len, step, incremental_state is not None)
            dropout = self.dropout_module.p if (self.training or self.dropout_module.apply_during_inference) else 0.0
            out = site(q, k, v, q_padding=q_pad, k_padding=k_pad, q_offset=q_offset, dropout_p=dropout,
                       scale=self.scaling)  # (B, H, T, D)
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)  # (T, B, C)
            return self.out_proj(out), None

        def _refuse_unsupported(self, tgt_len: int, attn_mask: Optional[Tensor], incremental: bool,
                                before_softmax: bool) -> None:
            """Raise for what an AP site cannot apply: fairseq's extras and any attn_mask but the causal one."""
            site = self.ap_site
            if before_softmax or self.bias_k is not None or self.add_zero_attn:
                raise MaskError(f"{site.name}: before_softmax, bias_kv and add_zero_attn are not supported by AP sites")
            if attn_mask is not None:  # only the decoder's causal mask is expected; causality is the site's kind
                src_len = tgt_len if not incremental else attn_mask.shape[-1]
                if not (site.kind is SiteKind.DEC_SELF and _is_future_mask(attn_mask, tgt_len, src_len)):
                    raise MaskError(f"{site.name}: attn_mask {tuple(attn_mask.shape)} {attn_mask.dtype} is not "
                                    f"fairseq's causal mask; extra masks must be AP masks (MaskSet), not attn_mask")

        def _extend_cache(self, incremental_state: dict[str, dict[str, Optional[Tensor]]],
                          saved: dict[str, Optional[Tensor]], k: Optional[Tensor], v: Optional[Tensor],
                          key_padding_mask: Optional[Tensor], static_kv: bool,
                          tgt_len: int) -> tuple[Tensor, Tensor, Optional[Tensor], int]:
            """Incremental decoding: this step's keys/values (B, H, S, D) appended to the cached ones (cross-attention:
            the cached encoder's), their padding, the step (real position of the first query); the cache updated."""
            step = 0
            if "prev_key" in saved:
                prev_k, prev_v = saved["prev_key"], saved["prev_value"]  # (B, H, S', D)
                k = prev_k if static_kv else torch.cat([prev_k, k], dim=2)
                v = prev_v if static_kv else torch.cat([prev_v, v], dim=2)
            if "ap_step" in saved:
                step = int(saved["ap_step"][0])
            bsz = k.shape[0]
            key_padding_mask = cls_mha._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask, prev_key_padding_mask=saved.get("prev_key_padding_mask"),
                batch_size=bsz, src_len=k.shape[2], static_kv=static_kv)
            saved["prev_key"], saved["prev_value"] = k, v  # (B, H, S, D), as fairseq stores them
            saved["prev_key_padding_mask"] = key_padding_mask
            saved["ap_step"] = torch.full((bsz,), step + tgt_len, dtype=torch.long, device=k.device)  # (B,)
            self._set_input_buffer(incremental_state, saved)
            return k, v, key_padding_mask, step

        def _query_side(self, k_pad: Optional[Tensor], bsz: int, tgt_len: int, step: int,
                        incremental: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[int]]:
            """(query padding, key padding, query offset) of this call, aligned to real tokens: encoder queries
            are its keys; a full decoder pass takes the (right-)padded targets; a cached cross step sits at ``step``."""
            q_pad, q_offset = None, None
            kind = self.ap_site.kind
            if kind is SiteKind.ENC_SELF:
                q_pad = k_pad  # queries are the keys
            elif not incremental:  # full decoder pass: targets may be (right-)padded
                q_pad = self._query_padding
                if q_pad is not None and (q_pad.shape != (bsz, tgt_len) or not q_pad.any()):
                    q_pad = None
                if kind is SiteKind.DEC_SELF:
                    q_pad = k_pad if k_pad is not None else q_pad
                    k_pad = q_pad
                q_offset = 0
            elif kind is SiteKind.CROSS:
                q_offset = step
            return q_pad, k_pad, q_offset

    APMultiheadAttention.__qualname__ = APMultiheadAttention.__name__ = "APMultiheadAttention"
    APMultiheadAttention.__module__ = __name__  # picklable as ap.models.fairseq_mt.APMultiheadAttention
    return APMultiheadAttention


_AP_MHA: Optional[type] = None


def ap_mha_class() -> type:
    """``APMultiheadAttention`` (built on first use: it subclasses fairseq's class, and fairseq is imported lazily)."""
    global _AP_MHA
    if _AP_MHA is None:
        _AP_MHA = _swap_forward(_mha_class())
    return _AP_MHA


def __getattr__(name: str) -> Any:  # PEP 562: `ap.models.fairseq_mt.APMultiheadAttention` (pickle, imports)
    if name == "APMultiheadAttention":
        return ap_mha_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _set_query_padding(decoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Decoder forward pre-hook: hand the target padding of a full pass to the decoder's AP attentions."""
    tokens = args[0] if args else kwargs.get("prev_output_tokens")
    full = kwargs.get("incremental_state") is None and (len(args) < 3 or args[2] is None)
    pad = tokens.eq(decoder.padding_idx) if full and tokens is not None else None  # (B, T)
    _hand_query_padding(decoder, pad)


def _clear_query_padding(decoder: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    _hand_query_padding(decoder, None)


def _hand_query_padding(decoder: nn.Module, pad: Optional[Tensor]) -> None:
    ap_mha = ap_mha_class()
    for m in decoder.modules():
        if isinstance(m, ap_mha):
            m._query_padding = pad


def attach_sites(model: nn.Module, max_source: int, max_target: int, backend: str = "auto") -> dict[str, str]:
    """Make every fairseq attention of an encoder-decoder ``model`` an AP site; returns ``{site name: kind}``.

    Masks are ``(heads, max_target|max_source, max_source|max_target)`` per kind; inputs longer than that raise.
    """
    mha, ap_mha = _mha_class(), ap_mha_class()
    encoder = getattr(model, "encoder", None)
    if encoder is None or getattr(model, "decoder", None) is None:
        raise MaskError(f"{type(model).__name__} is not a fairseq encoder-decoder model (no .encoder / .decoder)")
    in_encoder = {id(m) for m in encoder.modules()}
    kinds: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, mha):
            continue
        if module.self_attention:
            kind = SiteKind.ENC_SELF if id(module) in in_encoder else SiteKind.DEC_SELF
        elif module.encoder_decoder_attention:
            kind = SiteKind.CROSS
        else:
            raise MaskError(f"{name}: attention that is neither self- nor encoder-decoder attention")
        q_len = max_source if kind is SiteKind.ENC_SELF else max_target
        k_len = max_target if kind is SiteKind.DEC_SELF else max_source
        if not isinstance(module, ap_mha):
            module.__class__ = ap_mha  # same parameters and buffers; only forward() and set_beam_size() change
            module.beam_size = 1
        module.ap_site = AttentionSite(kind, module.num_heads, q_len, k_len, backend=backend)
        kinds[f"{name}.ap_site"] = kind.value
    if not kinds:
        raise MaskError(f"{type(model).__name__} has no fairseq MultiheadAttention: it cannot be pruned")
    decoder = model.decoder
    if not getattr(decoder, "_ap_hooked", False):
        decoder.register_forward_pre_hook(_set_query_padding, with_kwargs=True)
        decoder.register_forward_hook(_clear_query_padding, with_kwargs=True)
        decoder._ap_hooked = True
    return kinds


def transformer_args(arch: str, overrides: Optional[dict[str, Any]] = None) -> argparse.Namespace:
    """fairseq's argument namespace for a registered Transformer ``arch`` with ``overrides`` applied."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    if arch not in ARCH_MODEL_REGISTRY:
        raise APError(f"unknown fairseq architecture model.arch={arch!r}; e.g. transformer_wmt_en_de, "
                      f"transformer_iwslt_de_en, transformer")
    args = argparse.Namespace(**{**(overrides or {}), "arch": arch})
    ARCH_CONFIG_REGISTRY[arch](args)  # fills the architecture's defaults for keys not set
    return args


def build_transformer(args: argparse.Namespace, task: Any) -> nn.Module:
    from fairseq.models import ARCH_MODEL_REGISTRY

    return ARCH_MODEL_REGISTRY[args.arch].build_model(args, task)


def checkpoint_globals() -> list[Any]:
    """What fairseq checkpoints hold besides tensors and plain containers: their config as an ``argparse.Namespace``
    (fairseq-train) or OmegaConf containers (older fairseq-hydra-train), allowed when unpickling with
    ``weights_only=True``."""
    import collections
    import typing

    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    builtins = [dict, list, tuple, set, int, float, str, bool, collections.defaultdict]  # OmegaConf's pickles build
    # these by calling them
    return [argparse.Namespace, DictConfig, ListConfig, ContainerMetadata, Metadata, typing.Any, nodes.AnyNode,
            nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, nodes.EnumNode, *builtins]


def read_checkpoint(path: Path, trusted: bool = False) -> Any:
    """``torch.load`` of a fairseq checkpoint: ``weights_only=True`` with ``checkpoint_globals`` allowed, so loading
    runs no code from the file; a file that needs more is refused naming ``model.checkpoint_trusted=true``, which
    unpickles it whole (only for files you trust)."""
    with torch.serialization.safe_globals(checkpoint_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            if trusted or "Weights only load failed" not in str(e):
                raise
            raise APError(f"model.checkpoint={path} holds {found.group(1) if found else 'objects'} besides tensors "
                          f"and configs, which loading would have to run; if you trust the file, set "
                          f"model.checkpoint_trusted=true") from None


def load_checkpoint(path: str | Path, task: Any, trusted: bool = False) -> tuple[nn.Module, argparse.Namespace]:
    """A fairseq checkpoint (``checkpoint_best.pt`` of fairseq-train) as a model for ``task``'s dictionaries (read by
    ``read_checkpoint``: ``trusted`` unpickles everything the file holds)."""
    path = Path(path)
    if not path.is_file():
        raise APError(f"model.checkpoint={path} does not exist; point it at a fairseq checkpoint (.pt)")
    try:
        state = read_checkpoint(path, trusted)
    except APError:
        raise
    except Exception as e:  # truncated, corrupt or not a torch file
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise APError(f"model.checkpoint={path} could not be read as a fairseq checkpoint ({type(e).__name__}: "
                      f"{why}); point it at a checkpoint of fairseq-train") from None
    if not isinstance(state, dict):
        raise APError(f"model.checkpoint={path} is not a fairseq checkpoint (a {type(state).__name__}, not a dict)")
    cfg = state.get("cfg") or {}
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
    if model_cfg is None and state.get("args") is not None:
        model_cfg = state["args"]
    if model_cfg is None or "model" not in state:
        raise APError(f"{path} is not a fairseq checkpoint (no cfg.model / args and model weights)")
    if not isinstance(model_cfg, argparse.Namespace):
        model_cfg = argparse.Namespace(**{k: v for k, v in dict(model_cfg).items()})
    arch = getattr(model_cfg, "arch", None) or getattr(model_cfg, "_name", None)
    if getattr(model_cfg, "max_positions", None) and not getattr(model_cfg, "max_source_positions", None):
        model_cfg.max_source_positions = model_cfg.max_target_positions = model_cfg.max_positions  # old checkpoints
    args = transformer_args(arch, vars(model_cfg))
    model = build_transformer(args, task)
    own = model.state_dict()
    for key, tensor in state["model"].items():
        if key in own and own[key].shape != tensor.shape:
            vocab = "embed_tokens" in key or "output_projection" in key
            fix = ("does not fit the data's dictionaries", "use the data-bin (dict.*.txt) it was trained with") \
                if vocab else ("does not fit the model built from its arguments", "check model.arch/args")
            raise APError(f"{path} {fix[0]}: {key} is {tuple(tensor.shape)} in the checkpoint but "
                          f"{tuple(own[key].shape)} here; {fix[1]}")
    model.load_state_dict(state["model"], strict=True)
    return model, args
