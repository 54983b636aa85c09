"""Transformer-XL (Dai et al., 2019, arXiv 1901.02860), readable top to bottom: the model the AP paper pruned.

- **Segment-level recurrence.** The text is read as contiguous streams in segments of ``tgt_len`` tokens; every layer
  also attends to a memory of the ``mem_len`` hidden states it was given for the previous segments (its input there),
  with no gradient through the memory.
- **Relative positional encoding.** The score of query ``i`` and key ``j`` is
  ``(q_i + u)·k_j + (q_i + v)·W_r R_{d(i,j)}`` (``u = r_w_bias``, ``v = r_r_bias``, ``R`` sinusoidal, ``d`` the
  distance of the key behind the query, clamped at ``clamp_len``): the first term goes to the ``AttentionSite`` as ``q·k``, the
  second as an additive score ``bias``. (The reference code computes the position term against every distance and
  realigns it with a "relative shift"; here it is gathered by distance, the same numbers.)
- **Adaptive softmax** (``torch.nn.AdaptiveLogSoftmaxWithLoss``) for large vocabularies when ``cutoffs`` are given.

AP sites (kind ``dec_self``) are ``tgt_len`` queries × ``mem_len + tgt_len`` keys: key slot ``j < mem_len`` is memory
(the most recent state in slot ``mem_len - 1``), ``j >= mem_len`` the current segment. Query ``i`` may see slots
``j <= mem_len + i``; at the start of a stream the memory holds ``m < mem_len`` states, in slots ``mem_len - m ..
mem_len - 1``, and the empty slots are never valid (calibration never counts them).
Differences from the reference implementation: input embeddings are a plain ``nn.Embedding`` (no adaptive input, no
tying with the adaptive softmax), ``r_w_bias``/``r_r_bias`` are per layer (its ``untie_r``), no ``same_length``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ap.core import AttentionSite, SiteKind


@dataclass
class TransformerXLConfig:
    vocab_size: int = 10000
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    d_head: int = 32
    d_inner: int = 512
    dropout: float = 0.1
    dropatt: float = 0.0  # attention dropout
    tgt_len: int = 64  # tokens per segment (queries of a site)
    mem_len: int = 64  # hidden states kept per layer (memory keys of a site); 0 = no recurrence
    clamp_len: int = -1  # relative distances beyond this use the embedding of clamp_len (-1 = no clamping)
    cutoffs: list[int] = field(default_factory=list)  # adaptive softmax cluster boundaries; [] = full softmax
    div_value: float = 4.0  # adaptive softmax: each tail cluster's projection is div_value times smaller
    pre_lnorm: bool = False  # LayerNorm before each sub-layer (the reference's default is after)
    backend: str = "auto"  # attention backend outside calibration: auto | sdpa | eager | block (the position term is a
    # score bias, which flex cannot add)
    memory: ClassVar[bool] = True  # memory across segments: task=lm reads ordered streams (ap.tasks.lm)

    def build(self) -> "TransformerXL":
        return TransformerXL(self)


class XLOutput(NamedTuple):
    loss: Optional[Tensor]  # mean NLL over targets != -100 (None without targets)
    nll: Optional[Tensor]  # (B, T) per-token NLL, 0 at ignored targets (None without targets)
    log_probs: Optional[Tensor]  # (B, T, V) without targets (generation / inspection), else None
    mems: list[Tensor]  # per layer (B, m', C): the memory for the next segment


def sinusoid(pos: Tensor, d: int) -> Tensor:
    """``pos (R,)`` → ``(R, d)`` sinusoidal embeddings ``[sin(pos·f), cos(pos·f)]`` (Vaswani et al.)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))  # (d/2,)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (R, d/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (R, d)


class RelMultiHeadAttention(nn.Module):
    """Relative multi-head attention over ``[memory, segment]`` keys (TXL's ``RelPartialLearnableMultiHeadAttn``)."""

    def __init__(self, cfg: TransformerXLConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.pre_lnorm = cfg.n_heads, cfg.d_head, cfg.pre_lnorm
        self.mem_len, self.dropatt = cfg.mem_len, cfg.dropatt
        inner = cfg.n_heads * cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.r_net = nn.Linear(cfg.d_model, inner, bias=False)  # W_r: position embeddings -> per-head keys
        self.r_w_bias = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head))  # u: content bias
        self.r_r_bias = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head))  # v: position bias
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.site = AttentionSite(SiteKind.DEC_SELF, cfg.n_heads, cfg.tgt_len, cfg.mem_len + cfg.tgt_len,
                                  backend=cfg.backend)

    def forward(self, h: Tensor, pos: Tensor, mem: Tensor, dist: Tensor) -> Tensor:
        """``h (B, T, C)`` segment, ``pos (R, C)`` embeddings of distances ``0..R-1``, ``mem (B, m, C)`` (m may be 0),
        ``dist (T, m+T)`` clamped distance of each key behind each query → ``(B, T, C)``."""
        b, t, _ = h.shape
        m = mem.shape[1]
        cat = torch.cat([mem, h], dim=1)  # (B, K, C), K = m + T
        x = self.ln(cat) if self.pre_lnorm else cat
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 × (B, K, H*Dh)
        q = q[:, m:]  # (B, T, H*Dh): queries of the segment only
        q, k, v = (z.view(b, -1, self.n_heads, self.d_head).transpose(1, 2) for z in (q, k, v))  # (B, H, ., Dh)
        r = self.r_net(pos).view(-1, self.n_heads, self.d_head)  # (R, H, Dh)
        scale = 1.0 / math.sqrt(self.d_head)
        # position term (q_i + v)·W_r R_d for every distance d, then each (query, key) pair's own distance
        by_dist = torch.einsum("bhtd,rhd->bhtr", q + self.r_r_bias[None, :, None], r)  # (B, H, T, R)
        bias = by_dist.gather(-1, dist.expand(b, self.n_heads, t, -1)) * scale  # (B, H, T, K)
        y = self.site(q + self.r_w_bias[None, :, None], k, v, bias=bias, q_offset=0, k_offset=self.mem_len - m,
                      dropout_p=self.dropatt if self.training else 0.0, scale=scale)  # (B, H, T, Dh)
        y = self.drop(self.out(y.transpose(1, 2).reshape(b, t, -1)))  # (B, T, C)
        return h + y if self.pre_lnorm else self.ln(h + y)


class PositionwiseFF(nn.Module):
    def __init__(self, cfg: TransformerXLConfig) -> None:
        super().__init__()
        self.pre_lnorm = cfg.pre_lnorm
        self.net = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_inner), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.d_inner, cfg.d_model), nn.Dropout(cfg.dropout))
        self.ln = nn.LayerNorm(cfg.d_model)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(self.ln(h)) if self.pre_lnorm else self.ln(h + self.net(h))


class XLLayer(nn.Module):
    def __init__(self, cfg: TransformerXLConfig) -> None:
        super().__init__()
        self.attn = RelMultiHeadAttention(cfg)
        self.ff = PositionwiseFF(cfg)

    def forward(self, h: Tensor, pos: Tensor, mem: Tensor, dist: Tensor) -> Tensor:
        return self.ff(self.attn(h, pos, mem, dist))


class TransformerXL(nn.Module):
    def __init__(self, cfg: TransformerXLConfig) -> None:
        super().__init__()
        if cfg.d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal positions), got {cfg.d_model}")
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(XLLayer(cfg) for _ in range(cfg.n_layers))
        if cfg.cutoffs:
            self.crit = nn.AdaptiveLogSoftmaxWithLoss(cfg.d_model, cfg.vocab_size, list(cfg.cutoffs),
                                                      div_value=cfg.div_value)
            self.head = None
        else:
            self.crit, self.head = None, nn.Linear(cfg.d_model, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise every weight (the reference's ``normal`` init, std 0.02); for ``pruning.reinit``."""
        for name, p in self.named_parameters():
            if name.endswith("ln.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias") and not name.endswith(("r_w_bias", "r_r_bias")):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                mems: Optional[list[Tensor]] = None) -> XLOutput:
        """``idx (B, T)`` token ids of a segment, ``targets (B, T)`` (-100 = ignore), ``mems`` from the previous segment
        of the same streams (None at a stream's start) → loss, per-token NLL and the memory for the next segment."""
        cfg = self.cfg
        b, t = idx.shape
        if t > cfg.tgt_len:
            raise ValueError(f"segment length {t} exceeds model.tgt_len={cfg.tgt_len}")
        h = self.drop(self.emb(idx) * math.sqrt(cfg.d_model))  # (B, T, C)
        if mems is None:
            mems = [h.new_zeros(b, 0, cfg.d_model) for _ in self.layers]
        m = mems[0].shape[1]
        # distance of key j (of m + T) behind query i, clamped; future keys (masked anyway) get 0
        i = torch.arange(t, device=idx.device)[:, None] + m  # (T, 1) query slot among the keys
        dist = (i - torch.arange(m + t, device=idx.device)[None, :]).clamp(min=0)  # (T, K)
        if cfg.clamp_len >= 0:
            dist = dist.clamp(max=cfg.clamp_len)
        pos = self.drop(sinusoid(torch.arange(int(dist.max()) + 1, device=idx.device), cfg.d_model))  # (R, C)
        hids = [h]
        for layer, mem in zip(self.layers, mems):
            h = layer(h, pos, mem, dist)  # (B, T, C)
            hids.append(h)
        h = self.drop(h)
        with torch.no_grad():  # each layer's memory: its inputs of the last mem_len positions, no gradient
            new_mems = [torch.cat([mem, x], dim=1)[:, max(0, m + t - cfg.mem_len):].detach()
                        for mem, x in zip(mems, hids[:-1])]
        if targets is None:
            flat = h.reshape(b * t, -1)
            log_probs = self.crit.log_prob(flat) if self.crit is not None else F.log_softmax(self.head(flat), -1)
            return XLOutput(None, None, log_probs.view(b, t, -1), new_mems)
        valid = targets != -100  # (B, T)
        nll = h.new_zeros(b, t)
        if self.crit is not None:
            nll[valid] = -self.crit(h[valid], targets[valid]).output  # (N,) log-prob of each target
        else:
            nll[valid] = F.cross_entropy(self.head(h[valid]), targets[valid], reduction="none")
        return XLOutput(nll.sum() / valid.sum().clamp(min=1), nll, None, new_mems)
