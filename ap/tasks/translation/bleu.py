"""BLEU as papers report it: sacreBLEU on detokenized text, or tokenized BLEU with compound splitting (fairseq's WMT14
en-de convention), and the raw references and Moses detokenizing that the sacreBLEU mode may need."""

from __future__ import annotations

import re
from pathlib import Path

from ap.core.errors import APError

BLEU_MODES = ("sacrebleu", "tokenized")


def compound_split(line: str) -> str:
    """``a-b`` → ``a ##AT##-##AT## b`` (fairseq's scripts/compound_split_bleu.sh, non-overlapping like its perl)."""
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)


def corpus_bleu(hyps: list[str], refs: list[str], mode: str = "sacrebleu") -> tuple[float, str]:
    """``(BLEU, sacreBLEU signature)`` of ``hyps`` against one reference each: ``sacrebleu`` (its 13a tokenization of
    detokenized text) or ``tokenized`` (the given tokens, compound-split, no further tokenization)."""
    import sacrebleu

    if mode not in BLEU_MODES:
        raise APError(f"task.module.bleu={mode!r}: use one of {BLEU_MODES}")
    if mode == "tokenized":
        metric = sacrebleu.BLEU(tokenize="none", force=True)
        hyps, refs = [compound_split(h) for h in hyps], [compound_split(r) for r in refs]
    else:
        metric = sacrebleu.BLEU()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def moses_detokenize(lines: list[str], lang: str) -> list[str]:
    """Undo Moses tokenization (sacremoses), e.g. for BPE'd WMT data-bins, before sacreBLEU."""
    try:
        from sacremoses import MosesDetokenizer
    except ImportError as e:
        raise APError("task.module.detokenize=moses needs sacremoses: pip install sacremoses") from e
    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split()) for line in lines]


def read_references(path: str, n: int, key: str) -> list[str]:
    """The raw reference lines of a split (line ``i`` = sentence id ``i``); one error line if missing or short."""
    file = Path(path)
    if not file.is_file():
        raise APError(f"{key}={path} does not exist: give the raw (untokenized) reference file of the split")
    lines = file.read_text(encoding="utf-8").splitlines()
    if len(lines) != n:
        raise APError(f"{key}={path} has {len(lines)} lines but the split has {n} sentences")
    return lines
