"""GLUE: loaders and metrics on fixtures in each task's format, the HF attention adapter, and a tiny end-to-end run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # the hf extra (make test installs it)

from ap.core import MaskError, calibrate, make_maskset
from ap.data import glue
from ap.models.hf import ap_attention, attach_sites
from ap.run import run
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
        texts, got = glue.read_split(FIXTURES / spec.folder / name, spec)
        assert len(texts) == n and got == labels  # QQP's malformed line is skipped
        assert all(len(t) == len(spec.text_columns) and all(t) for t in texts)


def test_wrong_file_names_the_column():
    with pytest.raises(Exception, match="no column 'question1'"):
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
    """A randomly initialised 2-layer BERT with a WordPiece vocabulary of the fixture words, saved as a checkpoint dir."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w.lower().strip(".,?!'\"") for f in FIXTURES.rglob("*.tsv") for w in f.read_text().split()} - {""})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


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
    make_maskset(stats, model, 0.0).install(model)
    torch.testing.assert_close(model(**batch).logits, ref)
    make_maskset(stats, model, 0.7).install(model)
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


def test_tiny_glue_pipeline_mnli_matched_and_mismatched(tiny_bert, tmp_path):
    cfg = compose_cfg(["task=glue", "task.name=mnli", f"data.dir={FIXTURES}", f"model.name_or_path={tiny_bert}",
                       "data.max_seq_len=48", "data.batch_size=2", "task.dense.max_steps=2", "task.finetune.max_steps=2",
                       "pruning=ap50", "pruning.heatmaps=false", "logger=none", "trainer.enable_progress_bar=false",
                       f"paths.output_dir={tmp_path}"])
    results = run(cfg)
    assert results["task"] == "glue" and results["task_name"] == "mnli"
    assert {"val/acc", "val_mm/acc"} <= results["metrics"].keys() <= {"val/acc", "val_mm/acc"}
    assert abs(results["sparsity_achieved"] - 0.5) < 0.05  # three tiny sentences: coarse granularity
    masks = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert masks["meta"]["model"]["sites"]["bert.encoder.layer.0.attention.self.ap_site"] == ["enc_self", 4, 48, 48]
    stats = torch.load(tmp_path / "stats.pt", weights_only=True)
    n_real = stats["count"]["bert.encoder.layer.0.attention.self.ap_site"]
    assert n_real[:, 40:].sum() == 0  # padding positions never enter the statistics


def test_sst2_sample_from_rating_lines(tmp_path):
    src = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    src.write_text("1\t2.26\tA fine film.\r\n2\t-0.6\tEffective but too tepid biopic\r\n3\t0\tNeutral, dropped.\r\n"
                   "4\t1.5\tGood\tfun.\r\n5\t-2.0\tBad.\r\n")
    sizes = glue.write_sst2_sample(src, tmp_path / "out", n_dev=1)
    assert sizes == {"dev": 1, "train": 2}  # neutral (0) and malformed lines dropped
    rows = [glue.read_split(tmp_path / "out/SST-2" / f, glue.TASKS["sst2"]) for f in ("train.tsv", "dev.tsv")]
    pairs = {t[0]: y for texts, labels in rows for t, y in zip(texts, labels)}
    assert pairs == {"A fine film.": 1, "Effective but too tepid biopic": 0, "Bad.": 0}  # the 4-column line is skipped
