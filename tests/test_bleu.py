"""BLEU as papers report it (task.module.bleu): sacreBLEU on detokenized text with its signature, or tokenized BLEU
with compound splitting (fairseq's WMT14 en-de convention)."""

from __future__ import annotations

import pytest
import sacrebleu

from ap.core import APError
from ap.tasks.translation import compound_split, corpus_bleu, moses_detokenize, read_references


def test_compound_split_follows_fairseqs_perl_rule():
    assert compound_split("ein Know-how-Transfer") == "ein Know ##AT##-##AT## how ##AT##-##AT## Transfer"
    assert compound_split("a-b-c") == "a ##AT##-##AT## b-c"  # matches do not overlap, as perl's s///g
    assert compound_split("a - b") == "a - b" and compound_split("x-y z-1") == "x ##AT##-##AT## y z ##AT##-##AT## 1"


def test_tokenized_bleu_counts_compound_parts_and_sacrebleu_tokenizes_itself():
    hyps, refs = ["das ist ein Know-how Test"], ["das ist ein Know-what Test"]
    split, sig = corpus_bleu(hyps, refs, "tokenized")
    plain = sacrebleu.BLEU(tokenize="none").corpus_score(hyps, [refs]).score
    assert "tok:none" in sig and split > plain  # "Know" and "-" now match
    same, _ = corpus_bleu(["Hello , world !"], ["Hello , world !"], "tokenized")
    assert same == pytest.approx(100.0)
    detok, sig = corpus_bleu(["Hello, world!"], ["Hello , world !"], "sacrebleu")
    assert "tok:13a" in sig and detok == pytest.approx(100.0)  # 13a splits the punctuation of the hypothesis
    with pytest.raises(APError, match="use one of"):
        corpus_bleu(hyps, refs, "multi")


def test_moses_detokenization_and_reference_files(tmp_path):
    assert moses_detokenize(["Hello , world !", "it 's"], "en") == ["Hello, world!", "it's"]
    refs = tmp_path / "newstest.de"
    refs.write_text("eins\nzwei\n", encoding="utf-8")
    assert read_references(str(refs), 2, "task.module.reference_files.test") == ["eins", "zwei"]
    with pytest.raises(APError, match="has 2 lines but the split has 3"):
        read_references(str(refs), 3, "task.module.reference_files.test")
    with pytest.raises(APError, match="does not exist"):
        read_references(str(tmp_path / "missing"), 3, "task.module.reference_files.test")


def test_reference_files_are_used_raw_and_hypotheses_detokenized(tmp_path):
    """TranslationTask.bleu with detokenize=moses and a raw reference file: the hypotheses are detokenized, the raw
    references are not touched (the data's tokenized references are only used without a file)."""
    from types import SimpleNamespace

    from ap.tasks.translation import TranslationTask

    line = "we saw that it 's a fine day for a walk by the river"  # moses would join "it 's", sacreBLEU's 13a won't
    refs = tmp_path / "test.en"
    refs.write_text(f"{line}\n{line}\n", encoding="utf-8")
    hparams = SimpleNamespace(bleu="sacrebleu", detokenize="moses", target_lang="en",
                              reference_files={"test": str(refs)})
    task = SimpleNamespace(hparams=hparams, _text={0: (line, "x"), 1: (line, "y")}, bleu_info={}, trainer=None)
    score = TranslationTask.bleu(task, 2, "test")
    detok = line.replace("it 's", "it's")
    expected, _ = corpus_bleu([detok, detok], [line, line], "sacrebleu")
    assert score == pytest.approx(expected) and score < 99 and task.bleu_info["test"]["references"] == str(refs)
    task._text = {0: ("Hello , world !", "Hello , world !"), 1: ("it 's", "it 's")}
    hparams.reference_files = None  # the data's references, detokenized like the hypotheses: a perfect match
    assert TranslationTask.bleu(task, 2, "test") == pytest.approx(100.0)
    assert task.bleu_info["test"]["references"] == "data"


def test_the_documented_reference_file_override_composes():
    """README and paper_wmt14_en_de.yaml tell users `task.module.reference_files.test=<file>`: it composes (the key
    exists with null = the data's references) and reaches the task's hyperparameters."""
    from conftest import compose_cfg

    for preset in ([], ["experiment=paper_wmt14_en_de"]):
        cfg = compose_cfg(["task=wmt", *preset, "task.module.reference_files.test=/data/newstest2014.de"])
        assert cfg.task.module.reference_files.test == "/data/newstest2014.de"
        assert cfg.task.module.reference_files.valid is None
