"""task=clm: a pretrained HF causal LM (here a tiny random Llama with grouped-query heads saved to a folder, with a
word-level tokenizer) pruned training-free and with fine-tuning, through the real configs and pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from ap.core import APError
from ap.data.wikitext import read_tokens
from ap.run import run
from ap.tasks.clm import CLMDataModule
from conftest import compose_cfg


@pytest.fixture(scope="module")
def tiny_llama(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tiny Llama (GQA: 4 heads, 2 KV heads) and a word-level tokenizer of the tiny corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(read_tokens(tiny_data / "wiki.train.tokens")) - {"<eos>"})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("tiny_llama")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def clm_cfg(tiny_data: Path, model: Path, out: Path, *overrides: str):
    return compose_cfg(["task=clm", f"model.name_or_path={model}", "data=lm_sample", f"data.dir={tiny_data}",
                        "task.data.seq_len=24", "task.data.max_train_sequences=12", "task.data.max_eval_sequences=6",
                        "task.finetune.max_steps=3", "task.module.warmup_steps=1", "logger=none",
                        "trainer.enable_progress_bar=false", "pruning.heatmaps=false", f"paths.output_dir={out}",
                        *overrides])


def test_data_is_the_corpus_in_the_models_tokens(tiny_data, tiny_llama):
    dm = CLMDataModule(str(tiny_data), str(tiny_llama), seq_len=24, max_train_sequences=5, seed=0)
    dm.setup()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer((tiny_data / "wiki.valid.tokens").read_text(), add_special_tokens=False)["input_ids"]
    assert torch.equal(dm.data["valid"].seqs.flatten(), torch.tensor(ids[: len(ids) // 24 * 24]))
    assert len(dm.data["train"]) == 5 and (dm.data["train"].seqs != 0).float().mean() > 0.99  # words are known
    other = CLMDataModule(str(tiny_data), str(tiny_llama), seq_len=24, max_train_sequences=5, seed=1)
    other.setup()
    assert not torch.equal(other.data["train"].seqs, dm.data["train"].seqs)  # a seeded sample of the split


def test_an_evaluation_split_shorter_than_a_sequence_is_one_shorter_sequence(tiny_data, tiny_llama, tmp_path):
    """At long sequence lengths a small validation split is evaluated whole (one shorter sequence); a train split
    shorter than one sequence is an error naming the key."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    n_valid = len(tokenizer((tiny_data / "wiki.valid.tokens").read_text(), add_special_tokens=False)["input_ids"])
    dm = CLMDataModule(str(tiny_data), str(tiny_llama), seq_len=n_valid + 10)
    dm.setup()
    assert dm.data["valid"].seqs.shape == (1, n_valid) and dm.data["train"].seqs.shape[1] == n_valid + 10
    with pytest.raises(APError, match="lower task.data.seq_len"):
        CLMDataModule(str(tiny_data), str(tiny_llama), seq_len=10**6).setup()


def test_training_free_ap_evaluates_the_masked_pretrained_model(tiny_data, tiny_llama, tmp_path):
    dense = run(clm_cfg(tiny_data, tiny_llama, tmp_path / "none", "pruning=none"))
    free = run(clm_cfg(tiny_data, tiny_llama, tmp_path / "ap", "pruning=ap50", "pruning.finetune=false"))
    assert free["stages"]["dense"]["status"] == "reused"  # the pretrained model's evaluation, from the none run
    assert free["dense_metrics"]["val/ppl"] == dense["metrics"]["val/ppl"]
    assert free["finetune"] is False and free["baseline"] == "dense"
    assert abs(free["sparsity_achieved"] - 0.5) < 0.01 and free["metrics"]["val/ppl"] != dense["metrics"]["val/ppl"]
    assert math.isclose(free["metrics"]["val/ppl"], math.exp(free["metrics"]["val/loss"]), rel_tol=1e-5)
    assert free["metrics"]["val/tokens_per_s"] > 0 and "test/ppl" in free["metrics"]
    meta = torch.load(tmp_path / "ap/masks.pt", weights_only=True)["meta"]
    assert meta["calibration"]["tokens"] == 12 * 24  # the capped train sample, every position real
    assert len(meta["model"]["sites"]) == 2 and all(s[1:] == ["dec_self", 4, 24, 24][1:]
                                                    for s in meta["model"]["sites"].values())


def test_fine_tuning_with_masks_and_the_baselines(tiny_data, tiny_llama, tmp_path):
    tuned = run(clm_cfg(tiny_data, tiny_llama, tmp_path / "ft", "pruning=sink_window50"))
    assert tuned["finetune"] is True and tuned["baseline"] == "dense+ft"
    assert tuned["metrics"]["val/ppl"] != tuned["pruned_before_finetune_metrics"]["val/ppl"]
    assert abs(tuned["sparsity_achieved"] - 0.5) < 0.05
    with pytest.raises(APError, match="reinitialize"):
        run(clm_cfg(tiny_data, tiny_llama, tmp_path / "re", "pruning=ap50", "pruning.reinit=true"))


def test_a_missing_model_folder_names_the_prepare_command(tiny_data, tmp_path):
    with pytest.raises(APError, match="prepare_data.py smollm2"):
        run(clm_cfg(tiny_data, tmp_path / "data/smollm2", tmp_path / "x", "pruning=ap50"))


def test_benchmark_times_whole_model_prefill_of_an_hf_folder(tiny_llama, tmp_path):
    """scripts/benchmark.py --model: the model's own SDPA, the attention-free bound, and the block backend with tile
    masks, on one sequence per length (times are not asserted)."""
    import csv
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark.py"), "--lengths", "--model", str(tiny_llama),
                           "--model-lengths", "48", "64", "--tile", "16", "--sparsity", "0.5", "0.9", "--repeats", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    assert [(r["length"], r["backend"], r["sparsity"]) for r in rows] == [
        (str(n), b, s) for n in (48, 64) for b, s in (("sdpa causal (dense)", "0.0"), ("skip (bound)", "1.0"),
                                                      ("block", "0.5"), ("block", "0.9"))]
    assert all(float(r["seconds"]) > 0 for r in rows) and rows[0]["what"] == f"{tiny_llama.name} prefill"
    # 64 positions in 16-wide tiles: 10 valid tiles, the 4 diagonal ones kept at 90 %: ideal 10/4
    assert float(rows[-1]["ideal"]) == 2.5


def test_tiled_masks_of_a_clm_run_drive_the_prefill_benchmark(tiny_data, tiny_llama, tmp_path):
    """A training-free tiled run (statistics and masks per 16-tile) and benchmark.py --masks on its masks.pt: the kept
    share of tiles it reports is the one of the element masks the tiles stand for."""
    import csv
    import subprocess
    import sys

    from ap.core import MaskSet
    from ap.core.attention import empty_tiles
    from conftest import ROOT

    run(clm_cfg(tiny_data, tiny_llama, tmp_path / "run", "pruning=ap70", "pruning.finetune=false",
                "task.data.seq_len=64", "pruning.block_size=16", "pruning.tiled=true"))
    masks = MaskSet.load(tmp_path / "run/masks.pt")
    assert masks.tile == 16 and next(iter(masks.masks.values())).shape == (4, 4, 4)
    valid = torch.ones(64, 64, dtype=torch.bool).tril()
    counts = [empty_tiles(masks.element_mask(n), valid.expand(4, 64, 64), 16) for n in masks.masks]
    kept = 1 - sum(e for e, _ in counts) / sum(t for _, t in counts)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark.py"), "--lengths", "--model", str(tiny_llama),
                           "--masks", str(tmp_path / "run/masks.pt"), "--tile", "16", "--repeats", "1",
                           "--out", str(tmp_path / "bench")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench/benchmark.csv")))
    assert [r["backend"] for r in rows] == ["sdpa causal (dense)", "skip (bound)", "block"]
    assert float(rows[-1]["ideal"]) == pytest.approx(1 / kept) and kept < 1


def test_evaluation_clocks_wait_for_cuda_kernels(monkeypatch):
    """CUDA runs kernels asynchronously: the tokens/s clock is read after torch.cuda.synchronize, before and after the
    forward (without it the GPU battery's first run timed kernel launches); each batch shape's first forward runs
    untimed before. No CUDA needed: the module's device is set and the calls are recorded in order."""
    from types import SimpleNamespace

    import pytorch_lightning as pl

    import ap.tasks.clm as clm

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(clm, "clock", lambda: events.append("clock") or float(len(events)))
    task = clm.CausalLMTask.__new__(clm.CausalLMTask)
    pl.LightningModule.__init__(task)
    task.model = lambda **kw: events.append("forward") or SimpleNamespace(loss=torch.tensor(2.0))
    task.eval_start("val")
    task.eval_step(torch.zeros(1, 8, dtype=torch.long), "val")
    assert events == ["forward", "clock", "forward", "clock"]  # CPU: nothing to wait for; the warm-up first
    events.clear()
    task._device = torch.device("cuda", 0)
    task.eval_step(torch.zeros(1, 8, dtype=torch.long), "val")
    assert events == ["sync", "clock", "forward", "sync", "clock"]  # a shape seen: no warm-up


def test_throughput_excludes_plan_builds_and_a_reused_dense_figure_is_retimed(tiny_data, tiny_llama, tmp_path,
                                                                              monkeypatch):
    """tokens/s of a masked evaluation on the block backend: every block plan is built outside the timed forwards
    (counted, no wall-clock assert). A dense evaluation reused from the stage cache (another process) is timed again
    in this run, so dense and pruned throughput come from one process."""
    import ap.core.sites as sites
    import ap.tasks.clm as clm

    events = []
    build = sites.block_plan
    monkeypatch.setattr(sites, "block_plan", lambda *a, **k: events.append("plan") or build(*a, **k))
    monkeypatch.setattr(clm, "clock", lambda: events.append("clock") or 0.0)
    run(clm_cfg(tiny_data, tiny_llama, tmp_path / "none", "pruning=none", "model.backend=block"))
    events.clear()
    res = run(clm_cfg(tiny_data, tiny_llama, tmp_path / "ap", "pruning=ap50", "pruning.finetune=false",
                      "model.backend=block"))
    assert events.count("plan") > 0
    clocks = [i for i, e in enumerate(events) if e == "clock"]  # (start, end) of each timed forward
    assert clocks and len(clocks) % 2 == 0
    timed = [events[a + 1:b] for a, b in zip(clocks[::2], clocks[1::2])]
    assert timed and all("plan" not in region for region in timed), "a plan was built inside a timed forward"
    assert res["stages"]["dense_eval"]["status"] == "reused"
    assert res["stages"]["dense_eval"]["throughput"] == "re-timed in this run"


