"""The whole pipeline on a tiny LM, composed from the real configs: files, contracts, reuse, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ap.core import MaskSet
from ap.data.wikitext import read_tokens
from ap.run import run
from conftest import ROOT, TINY, compose_cfg

RESULT_KEYS = {"task", "pruning", "sparsity_achieved", "metrics", "dense_metrics", "timing"}


@pytest.fixture(scope="module")
def ap_run(tiny_data, tmp_path_factory):
    """One full AP run (dense -> calibrate -> threshold -> finetune -> evaluate) shared by several tests."""
    out = tmp_path_factory.mktemp("ap_run")
    cfg = compose_cfg([*TINY, f"data.dir={tiny_data}", f"paths.output_dir={out}", "pruning=ap70",
                       "pruning.heatmaps=true", "pruning.calibration_batches=null"])
    t0 = time.perf_counter()
    results = run(cfg)
    return out, results, time.perf_counter() - t0


def test_full_pipeline_writes_every_contract_field(ap_run, tiny_data):
    out, results, seconds = ap_run
    assert seconds < 60
    saved = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= saved.keys() and saved["task"] == saved["task_name"] == "lm" and saved["pruning"] == "ap70"
    for metrics in (saved["metrics"], saved["dense_metrics"], saved["dense_finetuned_metrics"]):
        assert {"val/loss", "val/ppl", "test/loss", "test/ppl"} <= metrics.keys()
        assert metrics["test/ppl"] == pytest.approx(torch.tensor(metrics["test/loss"]).exp().item(), rel=1e-4)
    assert {"val/loss", "val/ppl"} <= saved["pruned_before_finetune_metrics"].keys()
    assert abs(saved["sparsity_achieved"] - 0.7) < 0.005
    assert {"dense_s", "calibrate_s", "threshold_s", "finetune_s", "evaluate_s"} <= saved["timing"].keys()

    raw = torch.load(out / "masks.pt", weights_only=True)
    meta = raw["meta"]
    assert raw["format"] == "ap-masks" and raw["version"] == 1
    assert meta["model"]["sites"] == {f"blocks.{i}.attn.site": ["dec_self", 2, 32, 32] for i in range(2)}
    assert meta["sparsity"] == 0.7 and meta["scope"] == "layer" and meta["policy"] == "ap" and meta["block_size"] == 0
    assert meta["achieved_blocks"]["block_size"] == 64 and 0 <= meta["achieved_blocks"]["overall"] < 0.7
    assert meta["achieved"]["overall"] == pytest.approx(saved["sparsity_achieved"])
    assert meta["calibration"]["split"] == "train"
    n_blocks = (len(read_tokens(tiny_data / "wiki.train.tokens")) - 1) // 32  # block_len 32
    assert meta["calibration"]["batches"] == -(-n_blocks // 16)  # one full epoch at eval_batch_size 16
    assert meta["calibration"]["tokens"] == n_blocks * 32
    assert meta["config"]["name"] == "ap70" and meta["created"]
    assert (out / "stats.pt").is_file() and len(list((out / "heatmaps").glob("*.png"))) == 2
    assert (out / "checkpoints/finetune/last.ckpt").is_file()


def test_stats_path_rethresholds_without_calibrating(ap_run, tiny_cfg, tmp_path):
    out, _, _ = ap_run
    results = run(tiny_cfg("pruning=ap50", f"pruning.stats_path={out / 'stats.pt'}", "task.dense.max_steps=2",
                           "dense_finetune_baseline=false", out=tmp_path / "r"))
    assert abs(results["sparsity_achieved"] - 0.5) < 0.005
    assert "calibrate_s" not in results["timing"] and not (tmp_path / "r/stats.pt").exists()


def test_masks_path_reuses_masks_exactly(ap_run, tiny_cfg, tmp_path):
    out, _, _ = ap_run
    run(tiny_cfg("pruning=ap90", f"pruning.masks_path={out / 'masks.pt'}", "task.dense.max_steps=2",
                 "dense_finetune_baseline=false", out=tmp_path / "r"))
    a, b = MaskSet.load(out / "masks.pt"), MaskSet.load(tmp_path / "r/masks.pt")
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_dense_baseline_runs_through_the_same_pipeline(tiny_cfg, tmp_path):
    results = run(tiny_cfg("pruning=none", "task.dense.max_steps=5", out=tmp_path / "r"))
    assert results["sparsity_achieved"] == 0.0 and results["metrics"] == results["dense_metrics"]
    assert not (tmp_path / "r/masks.pt").exists()


def test_resume_restores_masks_and_continues_training(tiny_cfg, tmp_path):
    one_epoch = ["task.finetune.max_epochs=1", "task.finetune.max_steps=-1", "dense_finetune_baseline=false",
                 "task.dense.max_steps=3", "trainer.limit_train_batches=4"]
    run(tiny_cfg("pruning=ap80", *one_epoch, out=tmp_path / "first"))
    ckpt = tmp_path / "first/checkpoints/finetune/last.ckpt"
    first = torch.load(ckpt, weights_only=True)  # Lightning checkpoints of ap hold plain data only
    assert first["global_step"] == 4
    resumed = run(tiny_cfg("pruning=ap80", *one_epoch, "task.finetune.max_epochs=2", f"ckpt_path={ckpt}",
                           out=tmp_path / "second"))
    state = torch.load(tmp_path / "second/checkpoints/finetune/last.ckpt", weights_only=True)
    assert state["global_step"] == 8 and state["epoch"] == first["epoch"] + 1  # continued: one more epoch on top
    a, b = MaskSet.load(tmp_path / "first/masks.pt"), MaskSet.load(tmp_path / "second/masks.pt")
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert "dense_s" not in resumed["timing"]


def test_block_backend_runs_the_pipeline_like_sdpa(ap_run, tiny_cfg, tmp_path):
    """Fine-tuning and evaluation with the masks through the block backend (CPU flash path: forward and backward)
    give the metrics SDPA with the same masks gives: the backends are exact, only float rounding differs."""
    out, _, _ = ap_run
    common = ["pruning=ap70", f"pruning.masks_path={out / 'masks.pt'}", "task.dense.max_steps=3",
              "dense_finetune_baseline=false", "pruning.block_size=16"]
    ref = run(tiny_cfg(*common, out=tmp_path / "sdpa"))
    blk = run(tiny_cfg(*common, "model.backend=block", out=tmp_path / "block"))
    for key in ("val/ppl", "test/ppl"):
        assert blk["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4)
    assert blk["metrics"]["test/ppl"] != pytest.approx(blk["dense_metrics"]["test/ppl"], rel=1e-3)  # fine-tuned


def test_reinit_trains_from_fresh_weights(tiny_cfg, tmp_path):
    results = run(tiny_cfg("pruning=ap50", "pruning.reinit=true", "dense_finetune_baseline=false",
                           "task.finetune.max_steps=1", "task.finetune.lr=1e-9", out=tmp_path / "r"))
    # a re-initialised model barely trained is much worse than the dense one it replaced
    assert results["metrics"]["val/ppl"] > 1.5 * results["dense_metrics"]["val/ppl"]


def run_cli(*overrides: str, cwd: Path = ROOT, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_missing_data_names_the_prepare_command(tmp_path):
    proc = run_cli(*TINY, f"paths.data_dir={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "python scripts/prepare_data.py lm_sample" in proc.stderr.strip().splitlines()[-1]


def test_cli_bad_sparsity_fails_before_running(tmp_path):
    proc = run_cli("pruning.sparsity=1.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0 and "pruning.sparsity=1.5 is outside [0, 1)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_masks_of_another_model_name_the_site(ap_run, tiny_data, tmp_path):
    out, _, _ = ap_run
    proc = run_cli(*TINY, f"data.dir={tiny_data}", "model.n_heads=4", f"pruning.masks_path={out / 'masks.pt'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "blocks.0.attn.site" in last and "n_heads 2 (masks) vs 4 (model)" in last
    assert not (tmp_path / "run" / "checkpoints").exists(), "failed before training"


def test_cli_never_overwrites_results(ap_run):
    out, _, _ = ap_run
    before = (out / "results.json").read_text()
    proc = run_cli(*TINY, f"hydra.run.dir={out}")
    assert proc.returncode != 0 and "already holds results.json" in proc.stderr
    assert (out / "results.json").read_text() == before


def test_collect_results_tabulates_runs(ap_run, tmp_path):
    out, results, _ = ap_run
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), str(out), "--csv",
                           str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ap70" in proc.stdout and f"{results['metrics']['test/ppl']:.3f}" in proc.stdout
    assert "ap70" in (tmp_path / "t.csv").read_text()
    empty = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), str(tmp_path / "none")],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "no results.json" in empty.stderr
