"""GLUE in its standard directory layout (``<dir>/SST-2/train.tsv``, ``<dir>/MNLI/dev_matched.tsv``, ...).

Each task's TSV columns, labels, validation files and official metrics are described by a ``GlueTask`` spec. Training
rows whose column count does not match the header (a few in QQP) are skipped and counted in the log, as in the usual
GLUE readers; such a row in a dev file is an error naming its line (every dev example must count). Metrics come from
scikit-learn (accuracy, F1, Matthews correlation) and SciPy (Pearson, Spearman); a correlation of constant predictions
(a collapsed STS-B regressor) is NaN with a warning, never a made-up 0.

The offline sample (``scripts/prepare_data.py glue_sample``) is the Rotten Tomatoes sentences of the vaderSentiment
sdist written as ``SST-2/{train,dev}.tsv``, so the same loader reads the real SST-2.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import numpy as np

from ap.core.errors import APError
from ap.data.packages import cached_from_package

log = logging.getLogger(__name__)
REDOWNLOAD = "re-download the GLUE files (UTF-8, tab-separated, as the GLUE download script writes them)"


@dataclass(frozen=True)
class GlueTask:
    folder: str
    text_columns: tuple[str | int, ...]  # header names, or indices for header-less files (CoLA)
    label_column: str | int
    labels: Optional[tuple[str, ...]]  # the label column's values, in class-id order; None = regression (STS-B)
    metrics: tuple[str, ...]
    dev_files: dict[str, str]  # metric prefix -> file name
    header: bool = True
    names: Optional[tuple[str, ...]] = None  # the classes' names (HF datasets' ClassLabel names) where labels are ids

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def label_order(self, checkpoint_labels: Sequence[str]) -> Optional[list[int]]:
        """For each class of this task, the index of the checkpoint's label naming it (its value in the TSV or its
        name, case and ``-``/``_``/space insensitive); None when the two label sets do not match one to one."""
        if self.labels is None or len(checkpoint_labels) != len(self.labels):
            return None
        norm = [str(label).lower().replace("-", "_").replace(" ", "_") for label in checkpoint_labels]
        names = self.names or self.labels
        order = []
        for value, name in zip(self.labels, names):
            hits = [j for j, label in enumerate(norm) if label in (value.lower(), name.lower())]
            if len(hits) != 1:
                return None
            order.append(hits[0])
        return order if len(set(order)) == len(order) else None


_NLI = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", (3,), 1, ("0", "1"), ("mcc", "acc"), {"val": "dev.tsv"}, header=False,
                     names=("unacceptable", "acceptable")),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1"), ("acc",), {"val": "dev.tsv"},
                     names=("negative", "positive")),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "acc"), {"val": "dev.tsv"},
                     names=("not_equivalent", "equivalent")),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("f1", "acc"), {"val": "dev.tsv"},
                    names=("not_duplicate", "duplicate")),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), {"val": "dev.tsv"}),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
                     ("acc",), {"val": "dev_matched.tsv", "val_mm": "dev_mismatched.tsv"}),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", _NLI, ("acc",), {"val": "dev.tsv"}),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", _NLI, ("acc",), {"val": "dev.tsv"}),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("acc",), {"val": "dev.tsv"},
                     names=("not_entailment", "entailment")),
}


def task_spec(name: str) -> GlueTask:
    if name not in TASKS:
        raise APError(f"unknown GLUE task {name!r}; choose task.name from {sorted(TASKS)}")
    return TASKS[name]


def read_split(path: str | Path, spec: GlueTask,
               strict: bool = True) -> tuple[list[tuple[str, ...]], list[float | int]]:
    """``(texts, labels)`` of one TSV: texts are 1- or 2-tuples, labels are class ids (or floats for regression).

    A row with the wrong column count is an ``APError`` naming its line when ``strict`` (dev files), else skipped and
    counted in one log line (training files). Any other problem reading the file is a one-line ``APError``.
    """
    path, reader = Path(path), None
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(reader.line_num, row) for row in reader if row]  # (line number, columns); blank lines hold nothing
    except csv.Error as e:
        raise APError(f"cannot read GLUE file {path}:{reader.line_num}: {_one_line(e)}; {REDOWNLOAD}") from None
    except (OSError, UnicodeError) as e:
        raise APError(f"cannot read GLUE file {path}: {_one_line(e)}; {REDOWNLOAD}") from None
    if spec.header:
        if not rows:
            raise APError(f"GLUE file {path} is empty (expected a header line); {REDOWNLOAD}")
        header, rows = rows[0][1], rows[1:]
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
        if missing:
            raise APError(f"{path}: no column {missing[0]!r} in header {header}; is this the {spec.folder} file?")
        cols = [header.index(c) for c in spec.text_columns]
        label_col, width, exact = header.index(spec.label_column), len(header), True
        expected = f"{width} tab-separated columns (as the header)"
    else:
        cols, label_col = list(spec.text_columns), int(spec.label_column)
        width, exact = max(*cols, label_col) + 1, False
        expected = f"at least {width} tab-separated columns"
    texts, labels, skipped = [], [], []
    for line, row in rows:
        if (len(row) != width) if exact else (len(row) < width):
            if strict:
                raise APError(f"{path}:{line}: malformed row, {len(row)} columns where {expected} are expected; "
                              f"fix or delete that line ({REDOWNLOAD})")
            skipped.append(line)  # a malformed training line (QQP has a few)
            continue
        label = row[label_col]
        if spec.labels is None:
            try:
                labels.append(float(label))
            except ValueError:
                raise APError(f"{path}:{line}: score {label!r} is not a number; fix or delete that line") from None
        elif label in spec.labels:
            labels.append(spec.labels.index(label))
        else:
            raise APError(f"{path}:{line}: label {label!r} is not one of {spec.labels}; "
                          f"is this the {spec.folder} file?")
        texts.append(tuple(row[c] for c in cols))
    if skipped:
        log.warning(f"{path}: skipped {len(skipped)} malformed rows (wrong column count; first at line {skipped[0]})")
    return texts, labels


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def compute_metrics(names: Sequence[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's official metrics by name: acc, f1 (positive class 1), mcc, pearson, spearman.

    A correlation that is undefined (constant predictions: a collapsed regressor) is NaN and warns (``RuntimeWarning``).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    fns = {"acc": lambda: accuracy_score(labels, preds), "f1": lambda: f1_score(labels, preds),
           "mcc": lambda: matthews_corrcoef(labels, preds), "pearson": lambda: pearsonr(preds, labels)[0],
           "spearman": lambda: spearmanr(preds, labels)[0]}
    out = {}
    for n in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SciPy's ConstantInputWarning; ours below says what it means here
            out[n] = float(fns[n]())
        if math.isnan(out[n]):
            warnings.warn(f"{n} is NaN: the predictions or labels are constant (a collapsed regressor predicts the "
                          f"same score for every example), so there is no correlation to report", RuntimeWarning)
    return out


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
