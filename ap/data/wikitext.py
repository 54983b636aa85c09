"""Word-level language-modelling data in the WikiText format (``wiki.{train,valid,test}.tokens``).

Each non-blank line is split on whitespace and ends with ``<eos>`` (Transformer-XL's preprocessing). The vocabulary is
built from the train split (most frequent first; ``max_vocab`` caps it, rarer words become ``<unk>``). The prepared
English Bible sample (``scripts/prepare_data.py lm_sample``) is written in this same format, so one loader reads both.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ap.core.errors import APError

SPLITS = ("train", "valid", "test")
UNK, EOS = "<unk>", "<eos>"


def split_file(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"wiki.{split}.tokens"


def check_files(data_dir: str | Path, hint: str) -> None:
    """Raise an ``APError`` naming ``hint`` (how to prepare the data) if any split file is missing."""
    missing = [str(split_file(data_dir, s)) for s in SPLITS if not split_file(data_dir, s).is_file()]
    if missing:
        raise APError(f"missing language-modelling data {missing[0]}: {hint}")


def read_tokens(path: str | Path) -> list[str]:
    tokens: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if words:
                tokens += words + [EOS]
    return tokens


class Vocab:
    """Token ↔ id mapping; id 0 is ``<unk>``, id 1 is ``<eos>``."""

    def __init__(self, tokens: Iterable[str], max_size: Optional[int] = None) -> None:
        counts = Counter(tokens)
        counts.pop(UNK, None), counts.pop(EOS, None)
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max(0, max_size - 2)]
        self.itos = [UNK, EOS] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Iterable[str]) -> Tensor:
        unk = self.stoi[UNK]
        return torch.tensor([self.stoi.get(t, unk) for t in tokens], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]


class LMBlocks(Dataset):
    """Contiguous, non-overlapping blocks: item ``i`` is ``(x, y)`` with ``x = ids[iL:(i+1)L]`` and ``y`` shifted by one.

    With ``keep_last=True`` the final partial block is padded (``y = -100`` at padding, ignored by the loss; causal
    attention keeps the padding from affecting real positions), so evaluation covers every token.
    """

    def __init__(self, ids: Tensor, block_len: int, keep_last: bool = False) -> None:
        self.ids, self.block_len = ids, block_len
        n_targets = len(ids) - 1
        self.n = n_targets // block_len + (1 if keep_last and n_targets % block_len else 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.block_len
        x = self.ids[start:start + self.block_len]  # (≤L,)
        y = self.ids[start + 1:start + 1 + self.block_len]  # (≤L,)
        if len(y) < self.block_len:  # final partial block
            x = torch.cat([x[: len(y)], x.new_zeros(self.block_len - len(y))])
            y = torch.cat([y, y.new_full((self.block_len - len(y),), -100)])
        return x, y
