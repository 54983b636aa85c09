"""Sweeps on real Hydra launchers share stages through the cache: each dense model trained once, whichever launcher
runs the jobs (sequential, joblib workers, submitit processes, DDP ranks); a killed job leaves no entry. Slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow

SHORT = [*TINY, "task.dense.max_steps=6", "task.finetune.max_steps=2", "pruning.calibration_batches=4"]


def sweep(tmp_path: Path, tiny_data: Path, *overrides: str, timeout: int = 600) -> tuple[list[dict], str]:
    """``run.py -m`` over ``overrides`` from ``tmp_path`` (sweep folder: the default ``multirun/<time>_<pid>``);
    the results.json of every job, and the log."""
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *SHORT, f"data.dir={tiny_data}", *overrides],
                          capture_output=True, text=True, cwd=tmp_path, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [folder] = [f for f in (tmp_path / "multirun").iterdir() if f.name != "latest"]
    assert (tmp_path / "multirun" / "latest").resolve() == folder.resolve()  # the link to the newest sweep
    results = [json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))]
    return results, proc.stdout + proc.stderr


def executions(results: list[dict], stage: str) -> Counter:
    """How often ``stage`` ran per seed (reused entries do not count)."""
    return Counter(r["config"]["seed"] for r in results if r["stages"][stage]["status"] == "ran")


def entries(cache: Path, stage: str) -> int:
    return sum(1 for p in (cache / "stages" / stage).iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_jobs_train_each_seeds_dense_model_once(launcher, tiny_data, tmp_path, stage_cache):
    extra = (["hydra.launcher.n_jobs=2"] if launcher == "joblib"
             else ["hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"])
    results, _ = sweep(tmp_path, tiny_data, f"hydra/launcher={launcher}", *extra, "seed=0,1",
                    "pruning=ap50,ap70,random50")
    assert len(results) == 6
    for stage in ("dense", "dense_ft", "calibrate"):
        assert executions(results, stage) == Counter({0: 1, 1: 1}), stage
        assert entries(stage_cache, stage) == 2, stage
    for seed in (0, 1):  # every job of a seed starts from the same dense model
        dense = {json.dumps(r["dense_metrics"], sort_keys=True) for r in results if r["config"]["seed"] == seed}
        assert len(dense) == 1


def test_seeds_change_the_dense_model_and_the_random_masks_and_only_seeds_are_averaged(tiny_data, tmp_path,
                                                                                       stage_cache):
    """A seed sweep: each seed trains its own dense model (other weights, other metrics) and draws other random masks;
    collect averages exactly the seeds of a setting, never two settings (ap50 and random50 stay two rows of n=2)."""
    import torch

    from ap.collect import load_runs, summarize
    from ap.core import MaskSet

    results, _ = sweep(tmp_path, tiny_data, "seed=0,1", "pruning=ap50,random50")
    by = {(r["pruning"], r["config"]["seed"]): r for r in results}
    assert len(by) == 4 and entries(stage_cache, "dense") == 2
    assert by["ap50", 0]["dense_metrics"] != by["ap50", 1]["dense_metrics"]  # two dense models ...
    first, second = (torch.load(p, map_location="cpu") for p in sorted((stage_cache / "stages" / "dense").glob(
        "*/model.pt")))
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    masks = [MaskSet.load(Path(by["random50", s]["run_dir"]) / "masks.pt").masks for s in (0, 1)]
    assert masks[0].keys() == masks[1].keys()
    assert all(masks[0][k].shape == masks[1][k].shape for k in masks[0])
    assert any(not torch.equal(masks[0][k], masks[1][k]) for k in masks[0])  # ... and two random draws
    runs, _ = load_runs([tmp_path / "multirun" / "latest"])
    summary = summarize(runs)
    assert sorted(summary["pruning"]) == ["ap50", "random50"] and list(summary["n"]) == [2, 2]
    assert set(summary["seeds"]) == {"0,1"}


def test_ddp_jobs_of_a_multirun_share_stages(tiny_data, tmp_path, stage_cache):
    """DDP inside -m: Lightning restarts each job's ranks from that job's config; rank zero decides cache use."""
    results, log = sweep(tmp_path, tiny_data, "trainer=ddp", "pruning=ap50,ap70", timeout=900)
    assert "MEMBER: 2/2" in log  # (the process group lives on from job to job)
    assert all((Path(r["run_dir"]) / "train_ddp_process_1.log").is_file() for r in results)  # rank 1: same folders
    assert [r["pruning"] for r in results] == ["ap50", "ap70"]
    first, second = results
    assert {s["status"] for s in first["stages"].values()} == {"ran"}
    assert {s["status"] for s in second["stages"].values()} == {"reused"}
    assert first["dense_metrics"] == second["dense_metrics"]
    assert entries(stage_cache, "dense") == 1
    assert "Stage calibrate: reused from the stage cache" in log


def test_a_job_killed_during_dense_training_leaves_no_entry(tiny_data, tmp_path, stage_cache):
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, f"data.dir={tiny_data}", "pruning=ap50",
           "task.dense.max_steps=100000", "task.finetune.max_steps=2"]
    job = subprocess.Popen([*cmd, f"hydra.run.dir={tmp_path / 'killed'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not list((stage_cache / "stages/dense/.tmp").glob("*")):  # building the dense entry
            assert time.monotonic() - t0 < 120 and job.poll() is None
            time.sleep(0.2)
        time.sleep(3)  # inside dense training
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait(30)
    assert entries(stage_cache, "dense") == 0
    proc = subprocess.run([*cmd[:-2], "task.dense.max_steps=4", "task.finetune.max_steps=2",
                           f"hydra.run.dir={tmp_path / 'next'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "next/results.json").read_text())
    assert results["stages"]["dense"]["status"] == "ran" and entries(stage_cache, "dense") == 1


def test_two_objective_search_returns_perplexity_and_sparsity(tiny_data, tmp_path):
    """hparams_search=lm_max_sparsity: Optuna gets [val/ppl, sparsity_achieved] from every trial and keeps the front."""
    import yaml

    results, _ = sweep(tmp_path, tiny_data, "hparams_search=lm_max_sparsity", "hydra.sweeper.n_trials=3",
                       "hydra.sweeper.sampler.n_startup_trials=2")
    assert len(results) == 3 and len({r["pruning"] for r in results}) == 3
    [folder] = [f for f in (tmp_path / "multirun").iterdir() if f.name != "latest"]
    assert (tmp_path / "multirun" / "latest").resolve() == folder.resolve()  # the link to the newest sweep
    front = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert front["name"] == "optuna" and front["solutions"]
    measured = {(r["metrics"]["val/ppl"], r["sparsity_achieved"]) for r in results}
    for solution in front["solutions"]:  # each point of the front is a trial's (val/ppl, sparsity_achieved)
        assert tuple(solution["values"]) in measured
