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

import numpy as np
import pandas as pd
import yaml

from ap.collect import (BadPaperResults, load_paper_results, load_runs, markdown, paper_for, plot_curves,
                        summarize, write_report)

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
                        "stats_path": None, "heatmaps": seed == 0},
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
    assert len(lm) == 3, "seeds averaged; heatmaps and the random seed are no setting"
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



def test_kept_runs_collect_again_to_the_same_tables(sweep, tmp_path):
    """--keep-runs copies what collecting reads (no weights), the tables come from the copies, collecting the copies
    again gives the same tables, and a second --keep-runs into the same folder is refused without touching it."""
    (sweep / "0_lm_sample_ap50" / "masks.pt").write_bytes(b"x" * 100)
    out = tmp_path / "kept"
    proc = run_cli(str(sweep), "--out", str(out), "--keep-runs", "--paper", "none")
    assert proc.returncode == 0, proc.stderr
    kept = sorted(p.relative_to(out / "runs") for p in (out / "runs").rglob("*") if p.is_file())
    assert Path(sweep.name, "0_lm_sample_ap50", "results.json") in kept
    assert Path(sweep.name, "0_lm_sample_ap50", ".hydra", "overrides.yaml") in kept
    assert not any(p.name == "masks.pt" for p in kept)
    first = (out / "summary.md").read_text()
    assert re.search(r"\|\s*n\s*\|", first) and "random50" in first
    again = run_cli(str(out / "runs"), "--out", str(tmp_path / "again"), "--paper", "none")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "summary.md").read_text() == first
    before = sorted((out / "runs").rglob("*"))
    refused = run_cli(str(sweep), "--out", str(out), "--keep-runs")
    assert refused.returncode == 2 and "already holds runs" in refused.stderr
    assert sorted((out / "runs").rglob("*")) == before

# --- the paper's numbers beside ours --------------------------------------------------------------------------------

# val/ppl after fine-tuning (before it) per label; dense+ft is 50.0: ap50 is within 2 %, ap90 is not
PRESET_PPL = {"ap50": (50.5, 52.0), "ap90": (51.5, 58.0), "random50": (60.0, 75.0)}
FIXTURE_PAPER = {
    "paper": "a fixture paper",
    "claims": [{"task": "lm", "sparsity": 0.9, "metric": ["val/bleu", "val/ppl"], "tolerance": 0.02,
                "text": "saves 90 %", "source": "abstract", "presets": ["sweep_fixture"]}],
    "points": [{"task": "lm", "metric": "val/ppl", "policy": "ap", "sparsity": 0.9, "value": 31.25,
                "source": "Table 9, printed", "presets": ["sweep_fixture"]},
               {"task": "lm", "metric": "val/ppl", "policy": "none", "sparsity": 0.0, "value": 30.5,
                "source": "Table 9, printed", "presets": ["sweep_fixture"]},
               {"task": "wmt", "metric": "val/bleu", "policy": "ap", "sparsity": 0.5, "value": 27.0,
                "source": "Table 8", "presets": ["sweep_fixture"]}]}


def preset_sweep(root: Path, experiment: str) -> Path:
    """A sweep of ``experiment`` (its choice in .hydra/hydra.yaml, as Hydra writes it): ap50, ap90, random50."""
    for n, (label, (ppl, pre)) in enumerate(PRESET_PPL.items()):
        results = lm_results("ap50" if label == "ap50" else "ap90", 0)
        policy, sparsity = label.rstrip("0123456789"), int(label[-2:]) / 100
        results.update(pruning=label, sparsity_achieved=sparsity, config=config("lm", "lm_sample", policy, sparsity, 0))
        results["metrics"] = {"val/ppl": ppl, "test/ppl": ppl + 1}
        results["pruned_before_finetune_metrics"] = {"val/ppl": pre}
        results["dense_finetuned_metrics"] = {"val/ppl": 50.0, "test/ppl": 51.0}
        run = write_run(root / f"{n}_lm_sample_{label}", results, [f"pruning={label}"])
        hydra = {"hydra": {"runtime": {"choices": {"experiment": experiment, "pruning": label}}}}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    return root


def test_the_shipped_paper_file_loads_and_every_entry_has_a_source():
    paper = load_paper_results(ROOT / "experiments" / "paper_results.yaml")
    assert "2012.02030" in paper["paper"]
    presets = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    for entry in paper["claims"] + paper["points"]:
        assert entry["source"] and set(entry["presets"]) <= presets, entry
    assert {(c["task"], c["sparsity"]) for c in paper["claims"]} == {("lm", 0.9), ("wmt", 0.5), ("glue", 0.5)}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["points"][0].pop("source"), "points[0]: 'source' missing (every value needs its source"),
    (lambda d: d["claims"][0].update(sparsity=90), "claims[0]: sparsity 90 is not a fraction"),
    (lambda d: d["points"][1].update(value="about 30"), "points[1]: 'value' is 'about 30', not a number"),
    (lambda d: d.pop("paper"), "not a mapping with a 'paper' string"),
])
def test_a_bad_paper_file_is_refused_in_one_line(tmp_path, change, message):
    data = json.loads(json.dumps(FIXTURE_PAPER))
    change(data)
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadPaperResults, match=re.escape(message)) as info:
        load_paper_results(path)
    assert "\n" not in str(info.value)
    path.write_text("claims: [unclosed")
    with pytest.raises(BadPaperResults, match="unreadable"):
        load_paper_results(path)
    with pytest.raises(BadPaperResults, match="no such file"):
        load_paper_results(tmp_path / "missing.yaml")


@pytest.fixture()
def paper_file(tmp_path) -> Path:
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(FIXTURE_PAPER))
    return path


def test_paper_values_and_claim_print_beside_ours_for_a_paper_preset(tmp_path, paper_file):
    runs = load_runs([preset_sweep(tmp_path / "sweep", "sweep_fixture")])[0]
    assert set(runs["experiment"]) == {"sweep_fixture"}
    md = markdown(summarize(runs), runs.iloc[:0], load_paper_results(paper_file))
    assert "experiment=sweep_fixture" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    column = header.index("paper val/ppl")
    assert header[column - 1] == "val/ppl", "the paper's column sits beside ours"
    cells = {row.split("|")[2].strip(): row.strip("|").split("|")[column].strip() for row in table[2:5]}
    assert cells == {"ap50": "", "ap90": "31.25", "random50": ""}
    # the claim: val/bleu is not measured, so val/ppl; ap50 is within 2 % of dense+ft 50.0, ap90 (+3 %) is not
    claim = next(line for line in md.splitlines() if line.startswith("- **Paper**"))
    assert claim.startswith("- **Paper** (abstract, 90 % of attention pruned): saves 90 %.")
    assert "val/ppl within 2 % of dense+ft (50.000) up to a target of 50 % (ap50: 50.500" in claim
    assert claim.endswith("not within it above: ap90: 51.500, achieved sparsity 90.0 %.")
    assert ("Paper values (a fixture paper): val/ppl ap at 90 %: 31.25 (Table 9, printed); val/ppl dense: 30.5 "
            "(Table 9, printed)") in md and "27" not in md, "the wmt point is no lm value"


def test_runs_of_other_presets_or_without_a_preset_get_no_paper_values(tmp_path, paper_file):
    paper = load_paper_results(paper_file)
    other = load_runs([preset_sweep(tmp_path / "other", "sweep_lm_sample")])[0]
    assert paper_for(other, paper) == ([], [])
    md = markdown(summarize(other), other.iloc[:0], paper)
    assert "Paper" not in md and "paper" not in md
    plain = load_runs([write_run(tmp_path / "plain" / "0", lm_results("ap50", 0))])[0]
    assert "experiment" not in plain and paper_for(plain, paper) == ([], [])


def test_the_curve_of_a_paper_preset_shows_the_paper(tmp_path, paper_file):
    runs = load_runs([preset_sweep(tmp_path / "sweep", "sweep_fixture")])[0]
    ours = plot_curves(runs, tmp_path / "ours")
    both = plot_curves(runs, tmp_path / "both", load_paper_results(paper_file))
    assert [p.name for p in ours] == [p.name for p in both]
    first, second = (matplotlib.image.imread(p[0]) for p in (ours, both))
    assert first.shape == second.shape and not np.allclose(first, second), "paper star and claim line drawn"


def test_ap_against_random_at_each_target(tmp_path):
    runs = load_runs([preset_sweep(tmp_path / "sweep", "sweep_fixture")])[0]
    md = markdown(summarize(runs), runs.iloc[:0])
    assert "AP against the other policies at each target" in md
    row = next(line for line in md.splitlines() if re.match(r"\| +50.0 % \|", line))
    assert re.search(r"50.500 \(52.000\) \| +60.000 \(75.000\) \| +51.500 \| +61.000 \|", row), row
    assert not re.search(r"\| +90.0 % \|.*\(58.000\)", md.split("AP against")[1]), "no random90: no ap90 row"


def test_cli_paper_option(tmp_path, paper_file):
    sweep = preset_sweep(tmp_path / "sweep", "sweep_fixture")
    shown = run_cli(str(sweep), "--out", str(tmp_path / "a"), "--paper", str(paper_file))
    assert shown.returncode == 0, shown.stderr
    assert "**Paper** (abstract, 90 %" in shown.stdout and "paper val/ppl" in shown.stdout
    left_out = run_cli(str(sweep), "--out", str(tmp_path / "b"), "--paper", "none")
    assert left_out.returncode == 0 and "Paper" not in left_out.stdout
    missing = run_cli(str(sweep), "--out", str(tmp_path / "c"), "--paper", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml: no such file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def _variant_run(folder: Path, seed: int, data_dir: str, dense_ckpt: str, ppl: float, **model: int) -> Path:
    r = lm_results("ap50", seed)
    r["config"]["data"]["dir"] = data_dir
    r["config"]["pruning"]["dense_ckpt"] = dense_ckpt
    r["config"]["model"].update(model)
    r["metrics"]["val/ppl"] = ppl
    return write_run(folder, r)


def test_paths_are_settings_and_runs_of_one_seed_are_never_averaged(tmp_path):
    """Two data folders x two dense checkpoints, all seed 0, are four settings of one run each (paths shown by a short
    stable label), never "mean over n=4"; two runs of one setting and seed are kept apart with a warning."""
    for i, (data, ckpt) in enumerate([(d, c) for d in ("/data/a/lm_sample", "/data/b/lm_sample")
                                      for c in ("/ckpt/x/last.ckpt", "/ckpt/y/last.ckpt")]):
        _variant_run(tmp_path / "paths" / str(i), 0, data, ckpt, 20.0 + i)
    runs, _ = load_runs([tmp_path / "paths"])
    summary = summarize(runs)
    assert len(summary) == 4 and set(summary["n"]) == {1} and set(summary["seeds"]) == {"0"}
    labels = set(summary["data.dir"])
    assert len(labels) == 2 and all(re.fullmatch(r"lm_sample~[0-9a-f]{6}", x) for x in labels)
    assert set(summary["pruning.dense_ckpt"]) == {f"last.ckpt~{h}" for h in
                                                  [summary["pruning.dense_ckpt"].iloc[0][-6:],
                                                   summary["pruning.dense_ckpt"].iloc[1][-6:]]}
    for i in range(3):  # the same setting twice with seed 0, once with seed 1
        _variant_run(tmp_path / "dup" / str(i), [0, 0, 1][i], "/data/a", "/c", 20.0 + i)
    with pytest.warns(UserWarning, match=r"2 runs share every setting and seed 0"):
        runs, _ = load_runs([tmp_path / "dup"])
    summary = summarize(runs)
    assert sorted(summary["seeds"]) == ["0", "0,1"] and sorted(summary["n"]) == [1, 2]  # no row holds seed 0 twice
    text = markdown(summary, pd.DataFrame(columns=["run", "status", "error", "overrides"]))
    assert re.search(r"\|\s*copy\s*\|", text) and re.search(r"\|\s*seeds\s*\|", text)


def test_dense_reference_lines_are_per_model_variant_and_kinds_are_the_models(tmp_path):
    """Transformer-XL with mem_len 0 and 128 are two dense models: two reference values, never their blend; the kinds
    column names the kinds the model has and were pruned (a causal LM: dec_self)."""
    from ap.collect.plots import _reference

    for seed in (0, 1):
        for mem, dense in ((0, 53.55), (128, 55.24)):
            r = _variant_run(tmp_path / f"m{mem}s{seed}", seed, "/d", "", 30.0, mem_len=mem)
            results = json.loads((r / "results.json").read_text())
            results["dense_metrics"]["val/ppl"] = dense + seed
            (r / "results.json").write_text(json.dumps(results))
    runs, _ = load_runs([tmp_path])
    assert _reference(runs, "dense/val/ppl") == {"model.mem_len=0": 53.55 + 0.5, "model.mem_len=128": 55.24 + 0.5}
    assert set(runs["kinds"]) == {"dec_self"}
    paths = plot_curves(runs, tmp_path / "curves")
    assert paths  # the curve draws both reference lines (checked through _reference above)


def test_curves_say_what_they_show(tmp_path, monkeypatch):
    """Training-free points are labelled so, a perplexity spanning 20 to 2,000 gets a log axis, the y-label says the
    direction, the title names the model and the seeds per point, single-seed points carry no error bars, and runs
    pruning different kinds put each run at the sparsity within the kinds it prunes."""
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    for i, (label, ppl) in enumerate((("ap50", 20.0), ("ap90", 2300.0), ("random50", 40.0))):
        r = lm_results(label, 0)
        r["finetune"] = False
        r["config"]["pruning"]["finetune"] = False
        r["metrics"]["val/ppl"] = ppl
        write_run(tmp_path / "free" / str(i), r)
    runs, _ = load_runs([tmp_path / "free"])
    text = markdown(summarize(runs), pd.DataFrame(columns=["run", "status", "error", "overrides"]))
    assert "at each target (training-free)" in text and "fine-tun" not in text
    plot_curves(runs, tmp_path / "curves")
    ax = next(f.axes[0] for f in figures if f.axes[0].get_ylabel().startswith("val/ppl"))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "ap (training-free)" in legend and not any("fine-tun" in t for t in legend)
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "val/ppl (lower is better)"
    assert "transformer_lm_L4_d128" in ax.get_title() and "1 seed per point" in ax.get_title()
    assert not ax.containers  # no error bars on single-seed points
    assert ax.get_xlabel().startswith("achieved sparsity")
    figures.clear()
    for i, (kinds, overall) in enumerate(((["enc_self"], 0.2), (["cross"], 0.25), (KINDS, 0.5))):  # per-kind MT runs
        r = lm_results("ap50", 0)
        r["config"]["pruning"]["kinds"] = kinds
        r["sparsity_achieved"] = overall
        r["sparsity_per_kind"] = {k: 0.5 if k in kinds else 0.0 for k in KINDS}
        write_run(tmp_path / "kinds" / str(i), r)
    plot_curves(load_runs([tmp_path / "kinds"])[0], tmp_path / "curves2")
    assert figures and all(f.axes[0].get_xlabel().startswith("sparsity of the pruned kinds") for f in figures)
    xs = [x for line in figures[0].axes[0].lines if line.get_marker() == "o" for x in line.get_xdata()]
    assert len(xs) == 3 and xs == pytest.approx([50.0] * 3), "x: each kind's own sparsity, not the overall one"
    figures.clear()
    r = lm_results("random50", 0)  # random on encoder self-attention: the AP line's colour, dashed
    r["config"]["pruning"]["kinds"] = ["enc_self"]
    r["sparsity_achieved"], r["sparsity_per_kind"] = 0.2, {"enc_self": 0.5, "dec_self": 0.0, "cross": 0.0}
    write_run(tmp_path / "kinds" / "3", r)
    plot_curves(load_runs([tmp_path / "kinds"])[0], tmp_path / "curves3")
    lines = {line.get_label(): line for line in figures[0].axes[0].lines if line.get_marker() == "o"}
    ap, rnd, cross = (lines[f"{p}, kinds={k} (fine-tuned)"] for p, k in
                      (("ap", "enc_self"), ("random", "enc_self"), ("ap", "cross")))
    assert ap.get_color() == rnd.get_color() != cross.get_color()
    assert (ap.get_linestyle(), rnd.get_linestyle(), cross.get_linestyle()) == ("-", "--", "-")


def test_the_claim_ranks_per_kind_runs_by_the_attention_they_prune_overall(tmp_path, paper_file):
    """AP90 on encoder self-attention alone prunes 36 % of all attention: the claim's point is AP50 on every kind
    (50 % overall), not the higher target."""
    runs = load_runs([preset_sweep(tmp_path / "sweep", "sweep_fixture")])[0].assign(kinds=",".join(KINDS))
    alone = runs[runs["pruning"] == "ap90"].assign(kinds="enc_self", sparsity=0.36, **{"val/ppl": 50.2})
    both = pd.concat([runs, alone], ignore_index=True)
    claim = next(line for line in markdown(summarize(both), both.iloc[:0], load_paper_results(paper_file))
                 .splitlines() if line.startswith("- **Paper**"))
    assert "up to an overall sparsity of 50.0 % (ap50, kinds=enc_self,dec_self,cross: 50.500" in claim, claim
    assert claim.endswith("not within it above: ap90, kinds=enc_self,dec_self,cross: 51.500, achieved sparsity "
                          "90.0 %."), claim


def test_comparisons_say_in_how_many_seeds_they_hold(sweep, tmp_path, paper_file):
    """Seed by seed, not on the means: AP against random at each target (k/n seeds where AP is the better one) and
    the claim's top point (k/n seeds within the tolerance of that seed's own dense+ft)."""
    runs, failed = load_runs([sweep])
    lm = runs[runs["task_name"] == "lm_sample"]

    def versus_row(frame: pd.DataFrame) -> dict[str, str]:
        text = markdown(summarize(frame), failed.iloc[:0], runs=frame).split("AP against")[1]
        table = [line for line in text.splitlines() if line.startswith("|")]
        header = [c.strip() for c in table[0].strip("|").split("|")]
        row = next(line for line in table if re.match(r"\| +50.0 % \|", line))
        return dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))

    assert versus_row(lm)["val/ppl: AP better than random"] == "2/2 seeds"  # ap50 20, 22 against random50 40, 44
    closer = lm.copy()
    closer.loc[(closer["pruning"] == "random50") & (closer["seed"] == 1), "val/ppl"] = 21.0  # random wins seed 1
    assert versus_row(closer)["val/ppl: AP better than random"] == "1/2 seeds"
    assert "AP better" not in markdown(summarize(lm), failed.iloc[:0])  # no runs: means only

    preset = load_runs([preset_sweep(tmp_path / "sweep", "sweep_fixture")])[0]
    second = preset.assign(seed=1)
    second.loc[second["pruning"] == "ap50", "val/ppl"] = 51.3  # +2.6 % of dense+ft 50: out of the 2 % alone
    both = pd.concat([preset, second], ignore_index=True)  # ap50's mean, 50.9, is still within 2 %
    claim = next(line for line in markdown(summarize(both), both.iloc[:0], load_paper_results(paper_file),
                                           both).splitlines() if line.startswith("- **Paper**"))
    assert "(ap50: 50.900, achieved sparsity 50.0 %, within it in 1/2 seeds against each seed's own dense+ft)" \
        in claim, claim
