"""Parallel text for translation: subword tokenisation (sentencepiece) and fairseq ``data-bin`` folders.

A ``data-bin`` folder is what ``fairseq-preprocess`` writes: ``dict.{src,tgt}.txt`` and
``{train,valid,test}.{src}-{tgt}.{src,tgt}.{bin,idx}``. ``ensure_data_bin`` accepts such a folder, or a folder of
tokenised raw text (``train.{src}``, ``train.{tgt}``, ``valid.*``, ``test.*``: already subword-split, one sentence per
line), which it binarizes on first use into ``<folder>/data-bin``. fairseq is only needed here for binarizing and is
run as a subprocess (``python -m fairseq_cli.preprocess``), so this module imports without it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from ap.core.errors import APError

SPLITS = ("train", "valid", "test")


def is_data_bin(folder: Path, src: str, tgt: str, splits: Iterable[str] = SPLITS) -> bool:
    files = [f"dict.{src}.txt", f"dict.{tgt}.txt"]
    files += [f"{s}.{src}-{tgt}.{lang}.{ext}" for s in splits for lang in (src, tgt) for ext in ("bin", "idx")]
    return all((folder / f).is_file() for f in files)


def has_raw_text(folder: Path, src: str, tgt: str, splits: Iterable[str] = SPLITS) -> bool:
    return all((folder / f"{s}.{lang}").is_file() for s in splits for lang in (src, tgt))


def binarize(text_dir: Path, dest: Path, src: str, tgt: str, joined: bool = True, workers: int = 2,
             splits: Iterable[str] = SPLITS) -> Path:
    """``fairseq-preprocess`` of ``text_dir/{split}.{lang}`` into ``dest`` (written to ``dest.part`` then renamed)."""
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    prefixes = {s: str(text_dir / s) for s in splits}
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", src, "--target-lang", tgt,
           "--destdir", str(part), "--workers", str(workers)]
    cmd += [arg for s, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref"))
            if s in prefixes for arg in (flag, prefixes[s])]
    if joined:
        cmd.append("--joined-dictionary")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        hint = " (fairseq is not installed: run `make install-fairseq`)" if "No module named" in tail else ""
        raise APError(f"fairseq-preprocess failed on {text_dir}: {tail}{hint}")
    part.rename(dest)
    return dest


def ensure_data_bin(folder: Path, src: str, tgt: str, missing_hint: str, joined: bool = True) -> Path:
    """The ``data-bin`` folder for ``folder``: itself, ``folder/data-bin``, or raw text in ``folder`` binarized now."""
    for candidate in (folder, folder / "data-bin"):
        if is_data_bin(candidate, src, tgt):
            return candidate
    if has_raw_text(folder, src, tgt):
        if (folder / "data-bin").exists():
            raise APError(f"{folder / 'data-bin'} is incomplete (no {src}-{tgt} train/valid/test .bin/.idx or "
                          f"dictionaries); remove it to binarize {folder} again")
        return binarize(folder, folder / "data-bin", src, tgt, joined=joined)
    raise APError(f"no fairseq data-bin ({src}-{tgt}) or raw text (train.{src}, train.{tgt}, valid.*, test.*) in "
                  f"{folder}: {missing_hint}")


def train_sentencepiece(texts: list[Path], prefix: Path, vocab_size: int = 8000) -> Path:
    """A joint unigram sentencepiece model over ``texts`` → ``<prefix>.model`` (and ``.vocab``)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=",".join(str(t) for t in texts), model_prefix=str(prefix),
                                   vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
                                   num_threads=2, minloglevel=2)
    return Path(f"{prefix}.model")


def encode_sentencepiece(model: Path, src: Path, dst: Path) -> None:
    """Each line of ``src`` as space-separated sentencepiece pieces in ``dst`` (what fairseq binarizes)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("".join(" ".join(p) + "\n" for p in sp.encode(lines, out_type=str)), encoding="utf-8")
