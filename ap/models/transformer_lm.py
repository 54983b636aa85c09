"""A decoder-only Transformer language model, readable top to bottom (in the spirit of nanoGPT).

Every attention goes through an ``AttentionSite`` (kind ``dec_self``), so AP masks, calibration and backends apply
without touching this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ap.core import AttentionSite, SiteKind


@dataclass
class TransformerLMConfig:
    vocab_size: int = 10000
    block_len: int = 128  # longest sequence (positions); masks are (n_heads, block_len, block_len)
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    d_ff: int = 512
    dropout: float = 0.1
    backend: str = "auto"  # attention backend outside calibration (ap.core.attention.BACKENDS)
    tie_embeddings: bool = True
    memory: ClassVar[bool] = False  # no memory across batches: task=lm reads independent blocks

    def build(self) -> "TransformerLM":
        return TransformerLM(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerLMConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.site = AttentionSite(SiteKind.DEC_SELF, cfg.n_heads, cfg.block_len, cfg.block_len, backend=cfg.backend)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 × (B, T, C)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hs)
        y = self.site(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, cfg: TransformerLMConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(self, cfg: TransformerLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise all weights (GPT-2 style); used for the paper's retrain-from-scratch recipe."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm weights
                nn.init.ones_(p)

    def hidden(self, idx: Tensor) -> Tensor:
        """``idx (B, T)`` token ids → the final hidden states ``(B, T, C)`` (the stack without the output layer)."""
        b, t = idx.shape
        if t > self.cfg.block_len:
            raise ValueError(f"sequence length {t} exceeds model.block_len={self.cfg.block_len}")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """``idx (B, T)`` token ids → ``logits (B, T, V)`` and the mean cross-entropy over ``targets != -100``."""
        logits = self.head(self.hidden(idx))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss
