"""GLUE: loaders and metrics on fixtures in each task's format, the HF attention adapter, and a tiny end-to-end run."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers  # the hf extra (make test installs it)

import ap.tasks.glue as glue_tasks
from ap.core import PruningSpec, MaskError, calibrate, make_maskset
from ap.core.errors import APError
from ap.data import glue
from ap.models.hf import ap_attention, attach_sites
from ap.run import run
from ap.tasks.glue import GlueDataModule, GlueTask
from conftest import compose_cfg
from test_attention import reference

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
EXPECTED = {"cola": (3, [1, 0, 1]), "sst2": (3, [1, 0, 1]), "mrpc": (2, [1, 0]), "qqp": (2, [0, 1]),
            "stsb": (2, [5.0, 3.8]), "mnli": (3, [2, 1, 0]), "qnli": (2, [1, 0]), "rte": (2, [1, 0]),
            "wnli": (2, [1, 0])}


@pytest.mark.parametrize("task", sorted(glue.TASKS))
def test_each_task_format_reads(task):
    spec = glue.TASKS[task]
    n, labels = EXPECTED[task]
    for name in ("train.tsv", *spec.dev_files.values()):
        texts, got = glue.read_split(FIXTURES / spec.folder / name, spec, strict=name != "train.tsv")
        assert len(texts) == n and got == labels  # QQP's malformed training line is skipped
        assert all(len(t) == len(spec.text_columns) and all(t) for t in texts)


def test_wrong_file_names_the_column():
    with pytest.raises(APError, match="no column 'question1'"):
        glue.read_split(FIXTURES / "SST-2/train.tsv", glue.TASKS["qqp"])


def test_metrics_match_their_definitions():
    y, p = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    tp, tn, fp, fn = 2, 1, 1, 1
    m = glue.compute_metrics(("acc", "f1", "mcc"), p, y)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    r = glue.compute_metrics(("pearson", "spearman"), np.array([1.0, 2.0, 4.0]), np.array([2.0, 4.0, 8.5]))
    assert r["spearman"] == pytest.approx(1.0) and 0.99 < r["pearson"] < 1.0


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with a 2-way head (labels LABEL_0/1) and a WordPiece vocabulary of the
    fixture words, saved as a checkpoint dir."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w.lower().strip(".,?!'\"") for f in FIXTURES.rglob("*.tsv") for w in f.read_text().split()} - {""})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # transformers 5 takes the vocabulary as ``vocab=`` (a ``vocab_file=`` argument is ignored: every word -> [UNK])
    tok = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    assert tok.unk_token_id not in tok("the acting is good")["input_ids"]
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # segments that matter: sentence B read as sentence A changes the logits clearly
        model.bert.embeddings.token_type_embeddings.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    return folder


def tiny_checkpoint(tiny_bert: Path, folder: Path, head: bool = True, **config: object) -> Path:
    """A checkpoint like ``tiny_bert`` (same tokenizer and encoder weights), with or without a classification head;
    ``config`` overrides its config (``num_labels``, ``id2label``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in tiny_bert.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            shutil.copy(f, folder)
    model = transformers.BertForSequenceClassification.from_pretrained(tiny_bert, ignore_mismatched_sizes=True,
                                                                       **config)
    (model if head else model.bert).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tiny_bert, tmp_path_factory) -> Path:
    """``tiny_bert`` without a classification head (as the MiniLM checkpoint: a plain ``BertModel``)."""
    return tiny_checkpoint(tiny_bert, tmp_path_factory.mktemp("tiny_encoder"), head=False)


def batch_of(tiny_bert: Path, sentences: list[str]) -> dict[str, torch.Tensor]:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    return dict(tok(sentences, padding=True, return_tensors="pt"))


SENTENCES = ["the acting is good", "unflinchingly bleak and desperate", "it is a charming and often affecting journey"]


def test_adapter_equals_reference_masked_softmax():
    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.scaling, module.num_attention_heads = 0.5, 2
    sites = attach_sites(_Wrapper(module), 8)
    site = next(iter(sites.values()))
    mask = torch.rand(2, 8, 8, generator=g) > 0.5
    mask |= torch.eye(8, dtype=torch.bool)
    site.set_mask(mask)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # right padding
    hf_mask = (real[:, None, :] & torch.ones(6, 1, dtype=torch.bool))[:, None]  # (B, 1, q, k) as sdpa_mask builds it
    out, _ = ap_attention(module, q, k, v, hf_mask, scaling=1 / 2)
    keep = mask[None, :, :6, :6] & real[:, None, None, :]
    expected = reference(q, k, v, keep).transpose(1, 2)  # (B, q, H, d)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, :4], expected[1, :4])  # padded query rows are don't-care


class _Wrapper(torch.nn.Module):
    """A stand-in model with one attention module (``attach_sites`` needs ``set_attn_implementation``)."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def set_attn_implementation(self, name: str) -> None:
        self.impl = name


def test_all_true_masks_give_the_unpruned_logits_and_pruning_changes_them(tiny_bert):
    batch = batch_of(tiny_bert, SENTENCES)  # ragged: padded
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager")
    ref = ref_model.eval()(**batch).logits
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    sites = attach_sites(model, 32)
    assert list(sites) == [f"bert.encoder.layer.{i}.attention.self.ap_site" for i in range(2)]
    stats = calibrate(model, [batch], lambda b: model(**b))
    make_maskset(stats, model, PruningSpec(0.0)).install(model)
    torch.testing.assert_close(model(**batch).logits, ref)
    make_maskset(stats, model, PruningSpec(0.7)).install(model)
    assert not torch.allclose(model(**batch).logits, ref)


def test_calibration_equals_by_hand_mean_over_ragged_batches(tiny_bert):
    batches = [batch_of(tiny_bert, SENTENCES[:2]), batch_of(tiny_bert, SENTENCES[1:]), batch_of(tiny_bert, ["good"])]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    attach_sites(model, 32)
    stats = calibrate(model, batches, lambda b: model(**b))
    eager = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager")
    total, count = torch.zeros(4, 32, 32, dtype=torch.float64), torch.zeros(32, 32, dtype=torch.float64)
    for b in batches:
        probs = eager.eval()(**b, output_attentions=True).attentions[1]  # layer 1: (B, H, T, T)
        for row, real in zip(probs, b["attention_mask"].bool()):
            n = int(real.sum())
            total[:, :n, :n] += row[:, :n, :n].double()
            count[:n, :n] += 1
    name = "bert.encoder.layer.1.attention.self.ap_site"
    torch.testing.assert_close(stats.count[name], count)
    torch.testing.assert_close(stats.mean(name), total / count.clamp(min=1), atol=1e-6, rtol=1e-5)


def test_model_without_attention_sites_is_an_error():
    with pytest.raises(MaskError, match="no attention modules found"):
        attach_sites(_Wrapper(torch.nn.Linear(2, 2)), 8)


def test_tiny_glue_pipeline_mnli_matched_and_mismatched(tiny_encoder, tmp_path):
    cfg = compose_cfg(["task=glue", "task.name=mnli", f"data.dir={FIXTURES}", f"model.name_or_path={tiny_encoder}",
                       "data.max_seq_len=48", "data.batch_size=2", "task.dense.max_steps=2",
                       "task.finetune.max_steps=2",
                       "pruning=ap50", "pruning.heatmaps=false", "logger=none", "trainer.enable_progress_bar=false",
                       f"paths.output_dir={tmp_path}"])
    results = run(cfg)
    assert results["task"] == "glue" and results["task_name"] == "mnli"
    assert {"val/acc", "val_mm/acc"} <= results["metrics"].keys() <= {"val/acc", "val_mm/acc"}
    assert abs(results["sparsity_achieved"] - 0.5) < 0.05  # three tiny sentences: coarse granularity
    masks = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert masks["meta"]["model"]["sites"]["bert.encoder.layer.0.attention.self.ap_site"] == ["enc_self", 4, 48, 48]
    # padding never enters the statistics: the three training pairs have different lengths and are calibrated in one
    # padded batch, so an entry (q, k) must be counted once per pair that reaches both q and k, not once per batch row
    texts, _ = glue.read_split(FIXTURES / "MNLI/train.tsv", glue.TASKS["mnli"])
    tok = transformers.AutoTokenizer.from_pretrained(tiny_encoder)
    lengths = [len(ids) for ids in tok(*zip(*texts), truncation=True, max_length=48)["input_ids"]]
    assert len(set(lengths)) == 3 and max(lengths) < 48
    expected = torch.zeros(48, 48, dtype=torch.float64)
    for n in lengths:
        expected[:n, :n] += 1
    stats = torch.load(tmp_path / "stats.pt", weights_only=True)
    for i in range(2):
        torch.testing.assert_close(stats["count"][f"bert.encoder.layer.{i}.attention.self.ap_site"], expected)


def test_sst2_sample_from_rating_lines(tmp_path):
    src = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    src.write_text("1\t2.26\tA fine film.\r\n2\t-0.6\tEffective but too tepid biopic\r\n3\t0\tNeutral, dropped.\r\n"
                   "4\t1.5\tGood\tfun.\r\n5\t-2.0\tBad.\r\n")
    sizes = glue.write_sst2_sample(src, tmp_path / "out", n_dev=1)
    assert sizes == {"dev": 1, "train": 2}  # neutral (0) and malformed lines dropped
    rows = [glue.read_split(tmp_path / "out/SST-2" / f, glue.TASKS["sst2"]) for f in ("train.tsv", "dev.tsv")]
    pairs = {t[0]: y for texts, labels in rows for t, y in zip(texts, labels)}
    assert pairs == {"A fine film.": 1, "Effective but too tepid biopic": 0, "Bad.": 0}  # the 4-column line is skipped


# --- sentence pairs: every tokenizer output reaches the model ---------------------------------------------------------
@pytest.mark.parametrize("task", ["mrpc", "qnli", "rte"])
def test_pair_batches_carry_segment_ids_and_match_hf_sdpa(tiny_bert, task):
    spec = glue.TASKS[task]
    dm = GlueDataModule(str(FIXTURES), task, str(tiny_bert), max_seq_len=64, eval_batch_size=8)
    dm.setup()
    batch = next(iter(dm.val_dataloader()[0]))
    assert {"input_ids", "token_type_ids", "attention_mask", "labels"} == batch.keys()
    real = batch["attention_mask"].bool()
    assert len(set(real.sum(1).tolist())) == len(real) > 1  # rows of different lengths: padding is exercised
    sep = dm.tokenizer.sep_token_id
    for ids, segments, n in zip(batch["input_ids"], batch["token_type_ids"], real.sum(1).tolist()):
        first_sep = ids.tolist().index(sep)
        assert segments[:first_sep + 1].eq(0).all() and segments[n:].eq(0).all()
        assert first_sep + 1 < n and segments[first_sep + 1:n].eq(1).all()  # the second sentence is segment 1
    texts, labels = glue.read_split(FIXTURES / spec.folder / "dev.tsv", spec)
    assert batch["labels"].tolist() == labels
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(*zip(*texts), padding=True, truncation=True, max_length=64, return_tensors="pt")  # its full output
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="sdpa")
    expected = ref.eval()(**enc).logits
    module = GlueTask(str(tiny_bert), task, max_seq_len=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(module(batch), expected)


# --- the checkpoint's classification head -----------------------------------------------------------------------------
HF_MNLI = {0: "entailment", 1: "neutral", 2: "contradiction"}  # HF datasets' order; the TSV order is c, e, n


@pytest.mark.parametrize("task, id2label, order", [
    ("mnli", HF_MNLI, [2, 0, 1]),
    ("sst2", {0: "POSITIVE", 1: "NEGATIVE"}, [1, 0]),  # names, any case
    ("rte", {0: "not_entailment", 1: "entailment"}, [1, 0]),
    ("mrpc", {0: "LABEL_0", 1: "LABEL_1"}, [0, 1]),  # unnamed labels: the task's order
])
def test_checkpoint_head_labels_are_mapped_to_the_task(tiny_bert, tmp_path, caplog, task, id2label, order):
    path = tiny_checkpoint(tiny_bert, tmp_path / "ckpt", id2label=id2label)
    caplog.set_level(logging.INFO, logger="ap.tasks.glue")
    module = GlueTask(str(path), task).eval()
    assert "using the classification head" in caplog.text
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    torch.testing.assert_close(module.model.classifier.weight, reference.classifier.weight)  # the head is kept
    batch = batch_of(tiny_bert, SENTENCES)
    with torch.no_grad():
        logits, raw = module(batch), reference(**batch).logits
    torch.testing.assert_close(logits, raw[:, order])  # column i = the task's class i
    labels = torch.tensor([0, 1, 0])
    torch.testing.assert_close(module.loss(logits, labels), torch.nn.functional.cross_entropy(raw[:, order], labels))


@pytest.mark.parametrize("task, config, named", [
    ("sst2", {"id2label": {0: "positive", 1: "negative", 2: "neutral"}}, "positive, negative, neutral"),
    ("mnli", {"id2label": {0: "entailment", 1: "neutral", 2: "unrelated"}}, "entailment, neutral, unrelated"),
    ("mnli", {}, "LABEL_0, LABEL_1"),  # an unnamed head of another size
    ("stsb", {}, "LABEL_0, LABEL_1"),  # a classifier is no regressor
])
def test_head_with_other_labels_fails_naming_both(tiny_bert, tmp_path, task, config, named):
    path = tiny_checkpoint(tiny_bert, tmp_path / "ckpt", **config)
    with pytest.raises(APError, match="new_head=true") as err:
        GlueTask(str(path), task)
    assert named in str(err.value) and f"GLUE {task}" in str(err.value)
    task_labels = glue.TASKS[task].names or glue.TASKS[task].labels
    assert task_labels is None or ", ".join(task_labels) in str(err.value)
    module = GlueTask(str(path), task, new_head=True)  # the user asks for a new head
    assert module.model.config.num_labels == glue.TASKS[task].num_labels


def test_new_head_only_without_one_or_when_asked_and_logged(tiny_bert, tiny_encoder, caplog):
    caplog.set_level(logging.INFO, logger="ap.tasks.glue")
    encoder = transformers.AutoModel.from_pretrained(tiny_encoder)
    module = GlueTask(str(tiny_encoder), "mnli")
    assert f"new 3-output classification head, {tiny_encoder} has none" in caplog.text
    assert module.model.config.id2label == {0: "contradiction", 1: "entailment", 2: "neutral"}
    assert module.model.classifier.out_features == 3 and module.label_order.tolist() == [0, 1, 2]
    torch.testing.assert_close(module.model.bert.state_dict(), encoder.state_dict())  # the encoder is the checkpoint's
    caplog.clear()
    checkpoint = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    replaced = GlueTask(str(tiny_bert), "sst2", new_head=True)
    assert "replacing the checkpoint's (task.module.new_head=true)" in caplog.text
    assert not torch.allclose(replaced.model.classifier.weight, checkpoint.classifier.weight)
    torch.testing.assert_close(replaced.model.bert.state_dict(), checkpoint.bert.state_dict())


# --- calibration order, DDP sharding and gathering --------------------------------------------------------------------
def write_sst2(folder: Path, tiny_bert: Path, n_train: int, n_dev: int) -> Path:
    """``<folder>/SST-2/{train,dev}.tsv`` with distinct two-word sentences of the tiny vocabulary."""
    words = [w for w in (tiny_bert / "vocab.txt").read_text().split()[5:] if w.isalpha()]
    (folder / "SST-2").mkdir(parents=True)
    for name, n, start in (("train", n_train, 0), ("dev", n_dev, n_train)):
        rows = [f"{words[i]} {words[i + 1]}\t{i % 2}" for i in range(start, start + n)]
        (folder / "SST-2" / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


def rows_of(loader) -> list[tuple[int, ...]]:
    return [tuple(ids[m.bool()].tolist()) for b in loader for ids, m in zip(b["input_ids"], b["attention_mask"])]


def test_calibration_order_is_one_fixed_seed_shuffle(tiny_bert, tmp_path):
    folder = write_sst2(tmp_path, tiny_bert, n_train=24, n_dev=3)
    dm = GlueDataModule(str(folder), "sst2", str(tiny_bert), eval_batch_size=4, seed=0)
    dm.setup()
    in_file = [tuple(r["input_ids"]) for r in dm.data["train"]]
    order = rows_of(dm.calibration_dataloader())
    assert sorted(order) == sorted(in_file) and len(set(order)) == 24  # every example once
    assert order[:4] != in_file[:4] and order != in_file  # calibration_batches=1 is not the top of train.tsv
    assert rows_of(dm.calibration_dataloader()) == order  # the same on every pass (and every rank)
    other = GlueDataModule(str(folder), "sst2", str(tiny_bert), eval_batch_size=4, seed=1)
    other.setup()
    assert rows_of(other.calibration_dataloader()) != order  # the order follows the run's seed


def test_ddp_ranks_share_dev_exactly_once_and_train_equally(tiny_bert, tmp_path):
    folder = write_sst2(tmp_path, tiny_bert, n_train=21, n_dev=7)
    dm = GlueDataModule(str(folder), "sst2", str(tiny_bert), batch_size=2, eval_batch_size=2, seed=0)
    dm.setup()
    dev, train = [], []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dev.append(rows_of(dm.val_dataloader()[0]))
        train.append(rows_of(dm.train_dataloader()))
    assert sorted(dev[0] + dev[1]) == sorted(tuple(r["input_ids"]) for r in dm.data["val"])
    assert {len(d) for d in dev} == {3, 4}  # unequal shares, none repeated, none dropped
    assert len(train[0]) == len(train[1]) == 10 and not set(train[0]) & set(train[1])  # equal steps per rank


def epoch_end(module: GlueTask, outputs: list[tuple[list, list]], world: int = 1) -> dict[str, float]:
    """``on_validation_epoch_end`` after validation steps that produced ``outputs`` (preds, labels), what it logs."""
    module.trainer = SimpleNamespace(world_size=world, global_rank=0)
    module._outputs = {0: [(torch.tensor(p), torch.tensor(y)) for p, y in outputs]}
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module.on_validation_epoch_end()
    return logged


def test_validation_gathers_unequal_shares_of_every_rank(tiny_bert, monkeypatch):
    module = GlueTask(str(tiny_bert), "sst2")
    other_rank = iter([[1, 1], [1, 1]])  # rank 1's preds, then its labels: 2 examples where this rank has 3

    def gather(values: list, world: int, group=None) -> list:
        assert world == 2
        return list(values) + next(other_rank)

    monkeypatch.setattr(glue_tasks, "gather_lists", gather)
    logged = epoch_end(module, [([1, 0], [1, 1]), ([0], [0])], world=2)
    assert logged == {"val/acc": pytest.approx(4 / 5)}  # all 5 dev examples, each once


# --- metrics and bad input --------------------------------------------------------------------------------------------
def test_collapsed_regressor_reports_nan_with_a_warning(tiny_encoder):
    with pytest.warns(RuntimeWarning, match="(pearson|spearman) is NaN: the predictions or labels are constant"):
        m = glue.compute_metrics(("pearson", "spearman"), np.full(3, 2.5), np.array([1.0, 3.0, 4.0]))
    assert math.isnan(m["pearson"]) and math.isnan(m["spearman"])
    module = GlueTask(str(tiny_encoder), "stsb")
    with pytest.warns(RuntimeWarning, match="collapsed regressor"):
        logged = epoch_end(module, [([2.5, 2.5], [1.0, 3.0]), ([2.5], [4.0])])
    assert logged.keys() == {"val/pearson", "val/spearman"} and all(math.isnan(v) for v in logged.values())
    logged = epoch_end(module, [([1.0, 2.0], [1.0, 3.0]), ([3.0], [4.0])])  # a working regressor: a number
    assert logged["val/spearman"] == pytest.approx(1.0)


def copy_task(tmp_path: Path, folder: str) -> Path:
    shutil.copytree(FIXTURES / folder, tmp_path / folder)
    return tmp_path


def test_malformed_dev_row_fails_naming_its_line(tiny_bert, tmp_path):
    root = copy_task(tmp_path, "QQP")
    with open(root / "QQP/dev.tsv", "a") as f:
        f.write("999\tbroken line without enough columns\n")
    with pytest.raises(APError, match=r"QQP/dev\.tsv:4: malformed row, 2 columns where 6 tab-separated columns"):
        glue.read_split(root / "QQP/dev.tsv", glue.TASKS["qqp"])
    dm = GlueDataModule(str(root), "qqp", str(tiny_bert))
    with pytest.raises(APError, match=r"dev\.tsv:4"):
        dm.setup()
    with pytest.raises(APError, match=r"CoLA/dev\.tsv:2: malformed row, 3 columns where at least 4"):
        cola = copy_task(tmp_path, "CoLA") / "CoLA/dev.tsv"
        cola.write_text(cola.read_text().replace("gj04\t0\t*\t", "gj04\t0\t"))
        glue.read_split(cola, glue.TASKS["cola"])


def test_dropped_training_rows_are_counted_in_the_log(tiny_bert, caplog):
    caplog.set_level(logging.INFO, logger="ap.data.glue")
    dm = GlueDataModule(str(FIXTURES), "qqp", str(tiny_bert))
    dm.setup()
    assert len(dm.data["train"]) == 2 and len(dm.data["val"]) == 2
    drops = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(drops) == 1 and "QQP/train.tsv: skipped 1 malformed rows" in drops[0] and "line 4" in drops[0]


@pytest.mark.parametrize("content, message", [
    (b"sentence\tlabel\n\xff\xfe bad bytes\t1\n", "cannot read GLUE file .*dev.tsv: 'utf-8' codec can't decode"),
    (b"", "is empty"),
    (b"sentence\tlabel\nfine\tpositive\n", r"dev.tsv:2: label 'positive' is not one of \('0', '1'\)"),
    (None, "cannot read GLUE file .*dev.tsv: .*Is a directory"),
])
def test_unreadable_glue_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "dev.tsv"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(APError, match=message) as err:
        glue.read_split(path, glue.TASKS["sst2"])
    assert "\n" not in str(err.value)


def test_unreadable_regression_score_names_its_line(tmp_path):
    path = copy_task(tmp_path, "STS-B") / "STS-B/dev.tsv"
    path.write_text(path.read_text().replace("\t3.800", "\tn/a"))
    with pytest.raises(APError, match=r"STS-B/dev\.tsv:3: score 'n/a' is not a number"):
        glue.read_split(path, glue.TASKS["stsb"])


def test_paper_glue_preset_runs_with_the_debug_trainer(tiny_encoder, tmp_path):
    """experiment=paper_glue (BERT-base recipe: 3 epochs at 2e-5, batch 32, length 128) on the fixtures."""
    cfg = compose_cfg(["experiment=paper_glue", f"data.dir={FIXTURES}", f"model.name_or_path={tiny_encoder}",
                       "trainer=debug", "data.batch_size=2", "pruning.heatmaps=false", "logger=none",
                       "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path}"])
    assert (cfg.task.dense.lr, cfg.task.dense.max_epochs, cfg.data.max_seq_len) == (2e-5, 3, 128)
    results = run(cfg)
    assert results["task_name"] == "sst2" and "val/acc" in results["metrics"]
