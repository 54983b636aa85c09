"""The whole pipeline on a tiny LM, composed from the real configs: files, contracts, reuse, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ap.core import APError, MaskSet, find_sites
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
    return out, run(cfg)


def test_full_pipeline_writes_every_contract_field(ap_run, tiny_data):
    out, results = ap_run
    saved = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= saved.keys() and saved["task"] == "lm" and saved["pruning"] == "ap70"
    assert saved["task_name"] == "lm_sample" and saved["baseline"] == "dense+ft"  # the data set's name
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
    out, _ = ap_run
    results = run(tiny_cfg("pruning=ap50", f"pruning.stats_path={out / 'stats.pt'}", "task.dense.max_steps=2",
                           "dense_finetune_baseline=false", out=tmp_path / "r"))
    assert abs(results["sparsity_achieved"] - 0.5) < 0.005
    assert "calibrate_s" not in results["timing"] and not (tmp_path / "r/stats.pt").exists()


def test_masks_path_reuses_masks_exactly(ap_run, tiny_cfg, tmp_path):
    out, _ = ap_run
    run(tiny_cfg("pruning=ap90", f"pruning.masks_path={out / 'masks.pt'}", "task.dense.max_steps=2",
                 "dense_finetune_baseline=false", out=tmp_path / "r"))
    a, b = MaskSet.load(out / "masks.pt"), MaskSet.load(tmp_path / "r/masks.pt")
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_dense_baseline_runs_through_the_same_pipeline(tiny_cfg, tmp_path):
    results = run(tiny_cfg("pruning=none", "task.dense.max_steps=5", out=tmp_path / "r"))
    assert results["sparsity_achieved"] == 0.0 and results["metrics"] == results["dense_metrics"]
    assert not (tmp_path / "r/masks.pt").exists()


def test_resume_restores_masks_and_continues_training(tiny_cfg, tmp_path):
    one_epoch = ["task.finetune.max_epochs=1", "task.finetune.max_steps=-1", "task.dense.max_steps=3",
                 "trainer.limit_train_batches=4"]
    before = run(tiny_cfg("pruning=ap80", *one_epoch, out=tmp_path / "first"))
    ckpt = tmp_path / "first/checkpoints/finetune/last.ckpt"
    first = torch.load(ckpt, weights_only=True)  # Lightning checkpoints of ap hold plain data only
    assert first["global_step"] == 4
    resumed = run(tiny_cfg("pruning=ap80", *one_epoch, "task.finetune.max_epochs=2", f"ckpt_path={ckpt}",
                           out=tmp_path / "second"))
    state = torch.load(tmp_path / "second/checkpoints/finetune/last.ckpt", weights_only=True)
    assert state["global_step"] == 8 and state["epoch"] == first["epoch"] + 1  # continued: one more epoch on top
    a, b = MaskSet.load(tmp_path / "first/masks.pt"), MaskSet.load(tmp_path / "second/masks.pt")
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert not (tmp_path / "second/checkpoints/dense").exists()  # the dense stage did not run again ...
    for key in ("dense_metrics", "dense_finetuned_metrics", "pruned_before_finetune_metrics"):
        assert resumed[key] == before[key], key  # ... but its metrics (and the baseline's) came with the checkpoint
    assert resumed["timing"]["dense_s"] == before["timing"]["dense_s"] and resumed["baseline"] == "dense+ft"


def test_resume_with_other_pruning_settings_fails_naming_both(tiny_cfg, tmp_path):
    common = ["task.dense.max_steps=2", "task.finetune.max_steps=2", "dense_finetune_baseline=false"]
    run(tiny_cfg("pruning=ap80", *common, out=tmp_path / "first"))
    ckpt = tmp_path / "first/checkpoints/finetune/last.ckpt"
    for override, message in (("pruning=ap50", "sparsity=0.8, this run asks for sparsity=0.5"),
                              ("pruning.scope=head", "scope=layer, this run asks for scope=head"),
                              ("pruning.block_size=16", "block_size=0, this run asks for block_size=16")):
        with pytest.raises(APError, match=message):
            run(tiny_cfg("pruning=ap80", *common, override, f"ckpt_path={ckpt}", out=tmp_path / "second"))
        assert not (tmp_path / "second").exists()  # failed before writing anything
    with pytest.raises(APError, match="fine-tune checkpoint of a pruning run"):
        run(tiny_cfg("pruning=none", *common, f"ckpt_path={ckpt}", out=tmp_path / "second"))
    dense = tmp_path / "first/checkpoints/dense/last.ckpt"
    with pytest.raises(APError, match="holds no AP masks"):
        run(tiny_cfg("pruning=ap80", *common, f"ckpt_path={dense}", out=tmp_path / "second"))


def test_block_backend_runs_the_pipeline_like_sdpa(ap_run, tiny_cfg, tmp_path):
    """Fine-tuning and evaluation with the masks through the block backend (CPU flash path: forward and backward)
    give the metrics SDPA with the same masks gives: the backends are exact, only float rounding differs."""
    out, _ = ap_run
    common = ["pruning=ap70", f"pruning.masks_path={out / 'masks.pt'}", "task.dense.max_steps=3",
              "dense_finetune_baseline=false", "pruning.block_size=16"]
    ref = run(tiny_cfg(*common, out=tmp_path / "sdpa"))
    blk = run(tiny_cfg(*common, "model.backend=block", out=tmp_path / "block"))
    for key in ("val/ppl", "test/ppl"):
        assert blk["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4)
    assert blk["metrics"]["test/ppl"] != pytest.approx(blk["dense_metrics"]["test/ppl"], rel=1e-3)  # fine-tuned


def test_reinit_trains_from_fresh_weights(tiny_cfg, tmp_path):
    results = run(tiny_cfg("pruning=ap50", "pruning.reinit=true", "task.finetune.max_steps=1", "task.finetune.lr=1e-9",
                           out=tmp_path / "r"))
    # a re-initialised model barely trained is much worse than the dense one it replaced
    assert results["metrics"]["val/ppl"] > 1.5 * results["dense_metrics"]["val/ppl"]
    # its baseline is the dense model itself: no dense+ft baseline ran (dense_finetune_baseline=true by default)
    assert results["baseline"] == "dense" and "dense_finetuned_metrics" not in results
    assert not (tmp_path / "r/checkpoints/dense_ft").exists() and "dense_finetune_baseline_s" not in results["timing"]


def run_cli(*overrides: str, cwd: Path = ROOT, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_cli_missing_data_names_the_prepare_command(tmp_path):
    proc = run_cli(*TINY, f"paths.data_dir={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "python scripts/prepare_data.py lm_sample" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_cli_bad_sparsity_fails_before_running(tmp_path):
    proc = run_cli("pruning.sparsity=1.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0 and "pruning.sparsity=1.5 is outside [0, 1)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_cli_masks_of_another_model_name_the_site(ap_run, tiny_data, tmp_path):
    out, _ = ap_run
    proc = run_cli(*TINY, f"data.dir={tiny_data}", "model.n_heads=4", f"pruning.masks_path={out / 'masks.pt'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "blocks.0.attn.site" in last and "n_heads 2 (masks) vs 4 (model)" in last
    assert not (tmp_path / "run" / "checkpoints").exists(), "failed before training"


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_cli_never_overwrites_results(ap_run):
    out, _ = ap_run
    before = (out / "results.json").read_text()
    proc = run_cli(*TINY, f"hydra.run.dir={out}")
    assert proc.returncode != 0 and "already holds results.json" in proc.stderr
    assert (out / "results.json").read_text() == before


def test_collect_results_tabulates_runs(ap_run, tmp_path):
    out, results = ap_run
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), str(out), "--csv",
                           str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ap70" in proc.stdout and f"{results['metrics']['test/ppl']:.3f}" in proc.stdout
    assert "ap70" in (tmp_path / "t.csv").read_text()
    empty = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), str(tmp_path / "none")],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "no results.json" in empty.stderr


def test_each_stage_logs_to_its_own_csv(tiny_cfg, tmp_path):
    """Stages restart their step counts: one CSV per stage keeps their train/loss curves apart."""
    run(tiny_cfg("pruning=ap50", "logger=csv", "task.dense.max_steps=4", "task.finetune.max_steps=3",
                 "trainer.log_every_n_steps=1", out=tmp_path / "r"))
    stages = {p.parent.name: p.read_text() for p in (tmp_path / "r/csv").glob("*/metrics.csv")}
    assert set(stages) == {"dense", "dense_eval", "dense_ft", "dense_ft_eval", "finetune", "final_eval"}
    for stage, max_step in (("dense", 4), ("dense_ft", 3), ("finetune", 3)):
        rows = [r.split(",") for r in stages[stage].splitlines()]
        col = rows[0].index("train/loss")
        assert sum(1 for r in rows[1:] if r[col]) == max_step, stage  # only this stage's steps
    assert "val/ppl" in stages["final_eval"].splitlines()[0] and "train/loss" not in stages["final_eval"]


def test_debug_trainer_is_a_few_steps_per_stage(tiny_cfg, tmp_path):
    results = run(tiny_cfg("trainer=debug", "pruning=ap50", "pruning.calibration_batches=null",
                           "task.dense.max_steps=30", "task.finetune.max_steps=-1", "task.finetune.max_epochs=5",
                           out=tmp_path / "r"))
    for stage in ("dense", "dense_ft", "finetune"):
        assert torch.load(tmp_path / f"r/checkpoints/{stage}/last.ckpt", weights_only=True)["global_step"] == 3, stage
    calibration = MaskSet.load(tmp_path / "r/masks.pt").meta["calibration"]
    assert calibration["batches"] == 4 and calibration["tokens"] == 4 * 16 * 32  # limit_train_batches x eval batch
    assert results["metrics"]["val/ppl"] > 0


def test_lm_data_shards_evaluation_over_ranks_without_repeats_and_calibrates_in_a_seeded_order(tiny_data):
    from types import SimpleNamespace

    from ap.tasks.lm import LMDataModule

    dm = LMDataModule(str(tiny_data), block_len=32, eval_batch_size=8, seed=0)
    dm.setup()
    every = torch.cat([x for x, _ in dm.val_dataloader()])  # (N, 32)
    shards = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=3)
        shards.append(torch.cat([x for x, _ in dm.val_dataloader()]))
    assert sum(len(s) for s in shards) == len(every)  # none repeated, none dropped
    assert sorted(map(tuple, torch.cat(shards).tolist())) == sorted(map(tuple, every.tolist()))
    dm.trainer = None
    in_file_order = torch.stack([dm._blocks("train")[i][0] for i in range(8)])  # (8, 32)
    first = next(iter(dm.calibration_dataloader()))[0]  # (8, 32)
    assert not torch.equal(first, in_file_order)  # a cap of N batches samples the whole split ...
    assert torch.equal(first, next(iter(dm.calibration_dataloader()))[0])  # ... in one fixed order
    other = LMDataModule(str(tiny_data), block_len=32, eval_batch_size=8, seed=1)
    other.setup()
    assert not torch.equal(first, next(iter(other.calibration_dataloader()))[0])  # the run's seed picks the order


def test_masks_are_not_module_buffers(ap_run, tiny_cfg):
    """DDP broadcasts buffers every step; masks are the same on every rank and must not travel that way."""
    from ap.tasks import build

    out, _ = ap_run
    _, module = build(tiny_cfg())
    MaskSet.load(out / "masks.pt").install(module.model)
    assert all(s.mask is not None for s in find_sites(module.model).values())
    assert not [n for n, _ in module.named_buffers() if "mask" in n]
    assert not [n for n in module.state_dict() if "mask" in n]


def test_unreadable_or_foreign_checkpoints_fail_naming_the_key(ap_run, tiny_cfg, tmp_path):
    out, _ = ap_run
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    for key in ("pruning.dense_ckpt", "ckpt_path"):
        with pytest.raises(APError, match=f"{key}={garbage} could not be read as a Lightning checkpoint"):
            run(tiny_cfg(f"{key}={garbage}", out=tmp_path / "r"))
    with pytest.raises(APError, match=r"pruning.dense_ckpt=.* was saved from another model: .*\(64, 32\) there, "
                                      r"\(48, 32\) here"):
        run(tiny_cfg(f"pruning.dense_ckpt={out / 'checkpoints/dense/last.ckpt'}", "model.d_ff=48",
                     out=tmp_path / "r"))
    masks_as_ckpt = out / "masks.pt"
    with pytest.raises(APError, match="has no state_dict"):
        run(tiny_cfg(f"pruning.dense_ckpt={masks_as_ckpt}", out=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_cli_corrupt_file_is_one_error_line_with_exit_code_2(tmp_path, tiny_data):
    garbage = tmp_path / "masks.pt"
    garbage.write_bytes(b"\x80\x02garbage")
    proc = run_cli(*TINY, f"data.dir={tiny_data}", f"pruning.masks_path={garbage}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pruning.masks_path=") and str(garbage) in last and "weights_only" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_stages_are_runs_of_their_own(tiny_cfg, tmp_path):
    """wandb keeps stages apart as runs of one group (job_type = stage); prefix-only loggers get the stage prefix."""
    from pytorch_lightning.loggers import WandbLogger

    from ap.pipeline import stage_loggers

    cfg = tiny_cfg("logger=wandb", "logger.wandb.offline=true", out=tmp_path / "r")
    (dense,), (final,) = stage_loggers(cfg, "dense"), stage_loggers(cfg, "final_eval")
    assert isinstance(dense, WandbLogger) and dense._prefix == "" and final._prefix == ""
    assert dense._wandb_init["job_type"] == "dense" and final._wandb_init["job_type"] == "final_eval"
    assert dense._wandb_init["group"] == final._wandb_init["group"] and dense._wandb_init["name"].endswith("/dense")


@pytest.mark.parametrize("reinit", [False, True])
def test_reused_statistics_train_exactly_like_computed_ones(tiny_cfg, tmp_path, reinit):
    """Calibrating advances the global RNG; the callback re-seeds once the masks exist, so a run that reuses stats.pt
    fine-tunes (or re-initialises and trains) exactly like the run that computed them."""
    common = ["pruning=ap50", "task.dense.max_steps=4", "task.finetune.max_steps=4", "dense_finetune_baseline=false",
              f"pruning.reinit={reinit}", "data.batch_size=4"]
    computed = run(tiny_cfg(*common, out=tmp_path / "computed"))
    reused = run(tiny_cfg(*common, f"pruning.stats_path={tmp_path / 'computed/stats.pt'}", out=tmp_path / "reused"))
    assert "calibrate_s" in computed["timing"] and "calibrate_s" not in reused["timing"]
    assert reused["metrics"] == computed["metrics"]  # bitwise


def test_pruned_model_and_dense_ft_baseline_train_on_the_same_batches(tiny_cfg, tmp_path):
    """With nothing pruned the fine-tune stage repeats the dense+ft baseline step for step: both start from the same
    random state (the callback re-seeds once the masks exist), whatever calibration and validation drew before."""
    import csv

    run(tiny_cfg("pruning=ap50", "pruning.sparsity=0.0", "task.finetune.max_steps=5", "logger=csv",
                 "trainer.log_every_n_steps=1", out=tmp_path / "r"))
    losses = {stage: [float(row["train/loss"]) for row in csv.DictReader(open(tmp_path / f"r/csv/{stage}/metrics.csv"))
                      if row.get("train/loss")] for stage in ("dense_ft", "finetune")}
    assert len(losses["finetune"]) == 5
    assert losses["finetune"] == pytest.approx(losses["dense_ft"], rel=1e-5)


def test_the_run_seed_picks_the_training_order(tiny_cfg):
    """The run's ``seed`` picks the order of training blocks as the pipeline seeds it (``seed_everything`` before the
    data and model are built; DDP samplers take the data module's seed): the same seed gives the same order, another
    seed another order (a seed sweep's runs see their data in different orders)."""
    import pytorch_lightning as pl

    from ap.tasks import build

    def first_batch(seed: int) -> torch.Tensor:
        cfg = tiny_cfg(f"seed={seed}")
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm, _ = build(cfg)
        dm.setup()
        assert dm.seed == seed
        return next(iter(dm.train_dataloader()))[0]  # (B, T)

    zero = first_batch(0)
    assert torch.equal(zero, first_batch(0))
    assert not torch.equal(zero, first_batch(1))
