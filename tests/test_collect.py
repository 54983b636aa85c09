"""ap.collect and scripts/collect_results.py on results.json files written here (no training)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from ap.collect import load_runs, plot_curves, summarize, write_report

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["enc_self", "dec_self", "cross"]
# val/ppl after fine-tuning, per (label, seed): the numbers the aggregates are checked against
LM_PPL = {("ap50", 0): 20.0, ("ap50", 1): 22.0, ("ap90", 0): 30.0, ("ap90", 1): 35.0,
          ("random50", 0): 40.0, ("random50", 1): 44.0}


def config(task: str, name: str, policy: str, sparsity: float | None, seed: int, kind_sparsity=None) -> dict:
    model = ({"arch": "transformer", "args": {"encoder_layers": 3}} if task == "wmt" else
             {"block_len": 32, "n_layers": 4, "n_heads": 4, "d_model": 128, "backend": "sdpa"})
    return {"seed": seed, "model": model, "data": {"name": name, "batch_size": 8},
            "pruning": {"name": f"{policy}{int(100 * sparsity)}" if sparsity else policy, "policy": policy,
                        "sparsity": sparsity, "kind_sparsity": {k: (kind_sparsity or {}).get(k) for k in KINDS},
                        "kinds": KINDS, "scope": "layer", "block_size": 0, "seed": seed, "reinit": False,
                        "stats_path": f"/somewhere/seed{seed}/stats.pt", "heatmaps": seed == 0},
            "task": {"type": task, "name": name, "optimized_metric": "val/ppl"},
            "paths": {"output_dir": f"/runs/{seed}"}}


def write_run(folder: Path, results: dict, overrides: list[str] = ()) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def lm_results(label: str, seed: int) -> dict:
    policy, sparsity = label.rstrip("0123456789"), int(label[-2:]) / 100
    ppl = LM_PPL[(label, seed)]
    dense = {"val/ppl": 16.0 + seed, "val/loss": 2.8, "test/ppl": 17.0 + seed}
    return {"task": "lm", "task_name": "lm_sample", "pruning": label, "run_dir": "x", "baseline": "dense+ft",
            "dense_metrics": dense, "dense_finetuned_metrics": {"val/ppl": 15.0 + seed, "test/ppl": 15.5},
            "pruned_before_finetune_metrics": {"val/ppl": 2 * ppl, "val/loss": 4.0},
            "metrics": {"val/ppl": ppl, "val/loss": 3.0, "test/ppl": ppl + 1},
            "sparsity_achieved": sparsity - 0.001 * seed, "sparsity_per_kind": {"dec_self": sparsity - 0.001 * seed},
            "sparsity_per_site": {"layer0": sparsity},
            "timing": {"dense_s": 160.0, "calibrate_s": 47.0, "finetune_s": 53.0 + seed},
            "stages": {"dense": {"status": "ran" if label == "ap50" else "reused", "key": "ab12", "entry": "/c"},
                       "calibrate": {"status": "ran", "key": None, "entry": None}},
            "config": config("lm", "lm_sample", policy, sparsity, seed)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """multirun/<time>/: an LM sweep (2 seeds x ap50, ap90, random50), a wmt run, a failed and a corrupt run; and an
    old-format single run in outputs/."""
    root = tmp_path_factory.mktemp("multirun") / "2026-01-01_00-00-00_1"
    n = 0
    for label in ("ap50", "ap90", "random50"):
        for seed in (0, 1):
            write_run(root / f"{n}_lm_sample_{label}", lm_results(label, seed), [f"pruning={label}", f"seed={seed}"])
            n += 1
    wmt = {"task": "wmt", "task_name": "wmt_sample", "pruning": "ap50", "baseline": "dense+ft",
           "dense_metrics": {"val/bleu": 20.0, "val/loss": 3.0}, "metrics": {"val/bleu": 18.5, "val/loss": 3.2},
           "pruned_before_finetune_metrics": {"val/bleu": 12.0},
           "sparsity_achieved": 0.45, "sparsity_per_kind": {"enc_self": 0.5, "dec_self": 0.5, "cross": 0.3},
           "timing": {"dense_s": 500.0}, "config": config("wmt", "wmt_sample", "ap", 0.5, 0, {"cross": 0.3})}
    write_run(root / f"{n}_wmt_sample_ap50", wmt, ["task=wmt", "pruning=ap50", "pruning.kind_sparsity.cross=0.3"])
    write_run(root / f"{n + 1}_lm_sample_ap70", None, ["pruning=ap70", "seed=3"])
    (root / f"{n + 1}_lm_sample_ap70" / "run.log").write_text("[INFO] Stage dense: training\nKilled\n")
    write_run(root / f"{n + 2}_lm_sample_ap80", None, ["pruning=ap80"])
    (root / f"{n + 2}_lm_sample_ap80" / "results.json").write_text('{"task": "lm", "metr')
    # an older results.json: no stages, no pre-fine-tune metrics, no per-kind sparsity, no timing; single run folder
    old = lm_results("ap90", 0)
    for key in ("stages", "pruned_before_finetune_metrics", "sparsity_per_kind", "timing", "baseline",
                "dense_finetuned_metrics"):
        old.pop(key)
    old["config"]["seed"] = 2
    old["metrics"]["val/ppl"] = 40.0
    out = root.parent.parent / "outputs" / "lm_sample" / "ap90" / "old"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(old))
    return root


def test_load_runs_one_row_per_readable_results(sweep):
    runs, failed = load_runs([sweep, sweep.parent.parent / "outputs"])
    assert len(runs) == 6 + 1 + 1
    lm = runs[runs["task_name"] == "lm_sample"]
    assert set(lm["policy"]) == {"ap", "random"} and set(lm["model"]) == {"transformer_lm_L4_d128"}
    first = lm[(lm["pruning"] == "ap50") & (lm["seed"] == 0)].iloc[0]
    assert first["val/ppl"] == 20.0 and first["pre/val/ppl"] == 40.0 and first["dense/val/ppl"] == 16.0
    assert first["dense_ft/val/ppl"] == 15.0 and first["time/finetune"] == 53.0 and first["stage/dense"] == "ran"
    assert first["overrides"] == "pruning=ap50 seed=0" and first["target"] == 0.5
    # per-kind sparsity and targets (wmt)
    wmt = runs[runs["task"] == "wmt"].iloc[0]
    assert wmt["sparsity/cross"] == 0.3 and wmt["sparsity/enc_self"] == 0.5 and wmt["target/cross"] == 0.3
    assert wmt["model"] == "transformer" and wmt["val/bleu"] == 18.5
    # the old format: missing keys are empty, not errors
    old = runs[runs["seed"] == 2].iloc[0]
    assert old["val/ppl"] == 40.0 and str(old["pre/val/ppl"]) == "nan" and str(old["stage/dense"]) in ("nan", "None")
    # runs without results: the folder without results.json and the corrupt one, with their overrides
    assert len(failed) == 2
    missing = failed[failed["run"].str.endswith("lm_sample_ap70")].iloc[0]
    assert missing["status"] == "no results.json" and missing["overrides"] == "pruning=ap70 seed=3"
    assert missing["log_tail"] == "Killed"
    corrupt = failed[failed["run"].str.endswith("lm_sample_ap80")].iloc[0]
    assert corrupt["status"] == "unreadable results.json" and "JSONDecodeError" in corrupt["error"]


def test_summarize_means_over_seeds(sweep):
    runs, _ = load_runs([sweep])
    summary = summarize(runs)
    lm = summary[summary["task_name"] == "lm_sample"]
    assert len(lm) == 3, "seeds averaged; paths, heatmaps and the random seed are no setting"
    ap90 = lm[lm["pruning"] == "ap90"].iloc[0]
    ppl = [LM_PPL[("ap90", 0)], LM_PPL[("ap90", 1)]]
    assert ap90["n"] == 2 and ap90["seeds"] == "0,1"
    assert ap90["val/ppl_mean"] == pytest.approx(statistics.mean(ppl))
    assert ap90["val/ppl_std"] == pytest.approx(statistics.stdev(ppl))
    assert ap90["sparsity_mean"] == pytest.approx(0.8995)
    assert ap90["pre/val/ppl_mean"] == pytest.approx(2 * statistics.mean(ppl))


def test_a_config_difference_other_than_the_seed_is_kept_apart(sweep, tmp_path):
    a, b = lm_results("ap50", 0), lm_results("ap50", 1)
    b["config"]["data"]["batch_size"] = 16
    write_run(tmp_path / "a", a), write_run(tmp_path / "b", b)
    runs = load_runs([tmp_path])[0]
    assert sorted(runs["data.batch_size"]) == [8, 16] and "data.name" not in runs
    assert len(summarize(runs)) == 2


def test_plot_curves_writes_valid_pngs(sweep, tmp_path):
    runs, _ = load_runs([sweep])
    paths = plot_curves(runs, tmp_path)
    names = {p.name for p in paths}
    assert names == {"curve_lm_sample_val_ppl.png", "curve_lm_sample_test_ppl.png", "curve_wmt_sample_val_bleu.png"}
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        assert image.std() > 0.01, "not a blank image"


def test_write_report_files(sweep, tmp_path):
    paths = write_report([sweep], tmp_path / "out")
    assert {"runs", "failed", "summary_csv", "summary_md", "curve_lm_sample_val_ppl"} <= set(paths)
    assert all(p.exists() for p in paths.values())
    md = paths["summary_md"].read_text()
    assert re.search(r"\| ap90 +\| +90.0 % \| +90.0 ± 0.1 % \| +32.500 ± 3.536 \|", md), md  # val/ppl over 2 seeds
    assert "## Runs without results" in md and "pruning=ap70 seed=3" in md
    assert "ap80" in paths["failed"].read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli(sweep, tmp_path):
    proc = run_cli(str(sweep), "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert "| policy" in proc.stdout and "|:--" in proc.stdout and "random50" in proc.stdout
    assert "Runs without results" in proc.stdout and (tmp_path / "c" / "summary.md").exists()
    (tmp_path / "empty").mkdir()
    empty = run_cli(str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no results.json" in empty.stderr and not (tmp_path / "empty/collected").exists()
    assert len(empty.stderr.strip().splitlines()) == 1
