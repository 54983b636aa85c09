"""Behaviour equivalence: what `python run.py trainer=debug` produces for each task, and a small sweep, held fixed.

Not in `make test` yet (about 4 minutes on 2 cores, which would take the suite past 10 minutes): run it by hand,
`python -m pytest tests/behaviour_equivalence.py`, before and after the issue-22 redesign.

Each case runs the real pipeline on the test suite's tiny data and compares with ``golden/behaviour.json``: every
metric in results.json (dense, dense+ft, before and after fine-tuning, sparsity; not throughput or times) and a
sha256 of the mask tensors in masks.pt (the tensors only: the file's meta may change). A refactor must leave them
identical. Record new golden values only for an intended change of behaviour, and say so in the commit:

    AP_RECORD_BEHAVIOUR=1 python -m pytest tests/behaviour_equivalence.py

Floating-point results are bitwise reproducible on one CPU kind with one torch build; on another (golden ``platform``
differs) metrics are compared to 1e-4 relative and masks by their sparsity, since a last-bit difference in a
statistic can move an entry across the threshold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ap.run import run
from conftest import ROOT, compose_cfg
from test_clm import tiny_llama  # noqa: F401  (fixtures)
from test_glue import tiny_bert  # noqa: F401
from test_translation import WMT_TINY, data_bin  # noqa: F401

GOLDEN = Path(__file__).parent / "golden" / "behaviour.json"
RECORD = os.environ.get("AP_RECORD_BEHAVIOUR") == "1"
METRIC_GROUPS = ("metrics", "dense_metrics", "dense_finetuned_metrics", "pruned_before_finetune_metrics")
NOT_BEHAVIOUR = ("tokens_per_s", "_s", "time")  # metric names that measure the machine, not the model
# model.backend=sdpa: the golden values were recorded when sdpa was every model's default (auto now runs block on CPU:
# equal within float tolerance, tests/test_backend_defaults.py)
COMMON = ["trainer=debug", "logger=none", "pruning.heatmaps=false", "trainer.enable_progress_bar=false",
          "model.backend=sdpa"]


def platform() -> str:
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def mask_hashes(path: Path) -> dict[str, str]:
    """sha256 of each site's mask tensor (bool, as stored) and of their sparsity, by site name."""
    masks = torch.load(path, weights_only=True)["masks"]
    return {name: hashlib.sha256(m.contiguous().numpy().tobytes() + str(tuple(m.shape)).encode()).hexdigest()[:16]
            for name, m in sorted(masks.items())}


def mask_sparsity(path: Path) -> dict[str, float]:
    masks = torch.load(path, weights_only=True)["masks"]
    return {name: float((~m).float().mean()) for name, m in sorted(masks.items())}


def behaviour(run_dir: Path) -> dict:
    """What a run produced that a refactor must keep: numeric metrics and mask tensors."""
    results = json.loads((run_dir / "results.json").read_text())
    out: dict = {}
    for group in METRIC_GROUPS:
        for name, value in (results.get(group) or {}).items():
            if isinstance(value, (int, float)) and not name.endswith(NOT_BEHAVIOUR):
                out[f"{group}/{name}"] = value
    for key in ("sparsity_achieved", "sparsity_per_kind"):
        if key in results:
            out[key] = results[key]
    masks = run_dir / "masks.pt"
    if masks.is_file():
        out["masks"] = mask_hashes(masks)
        out["mask_sparsity"] = mask_sparsity(masks)
    return out


def check(case: str, got: dict) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"platform": platform(), "cases": {}}
    if RECORD:
        golden["platform"] = platform()
        golden["cases"][case] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert case in golden["cases"], f"no golden values for {case!r}: record them (module docstring)"
    want = golden["cases"][case]
    if golden["platform"] == platform():
        assert got == want  # bitwise: same CPU kind, same torch
    else:
        close(got, want, case)


def close(got, want, where: str) -> None:
    """``got`` equals ``want`` up to float rounding (another CPU kind or torch build): see the module docstring."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key, value in want.items():
            if not where.endswith("masks"):  # mask hashes are bitwise only; their sparsity is compared instead
                close(got[key], value, f"{where}/{key}")
    elif isinstance(want, str):
        assert got == want, where
    else:
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-3 if "sparsity" in where else 0.0), (where, got, want)


def run_case(overrides: list[str], out: Path) -> dict:
    run(compose_cfg([*COMMON, *overrides, f"paths.output_dir={out}"]))
    return behaviour(out)


@pytest.mark.slow
@pytest.mark.parametrize("case, overrides", [
    ("lm", []),
    ("lm_transformer_xl", ["model=transformer_xl", "model.cutoffs=[10,20]"]),  # the tiny vocabulary
    ("lm_ap50_head_block", ["pruning=ap50", "pruning.scope=head", "pruning.block_size=4", "pruning.keep_sinks=1"]),
])
def test_lm(case, overrides, tiny_data, tmp_path):
    check(case, run_case([f"data.dir={tiny_data}", *overrides], tmp_path / "run"))


@pytest.mark.slow
def test_glue(tiny_bert, tmp_path):  # noqa: F811
    fixtures = Path(__file__).parent / "fixtures" / "glue"
    check("glue", run_case(["task=glue", "task.name=sst2", f"data.dir={fixtures}", f"model.name_or_path={tiny_bert}",
                            "data.max_seq_len=48", "data.batch_size=2", "pruning=ap50"], tmp_path / "run"))


@pytest.mark.slow
def test_wmt(data_bin, tmp_path):  # noqa: F811
    check("wmt", run_case([*WMT_TINY, f"data.dir={data_bin}", "pruning.kind_sparsity.cross=0.3"], tmp_path / "run"))


@pytest.mark.slow
def test_clm(tiny_data, tiny_llama, tmp_path):  # noqa: F811
    check("clm", run_case(["task=clm", f"model.name_or_path={tiny_llama}", f"data.dir={tiny_data}",
                           "task.data.seq_len=24", "task.data.max_train_sequences=12", "task.data.max_eval_sequences=6",
                           "pruning=ap50", "pruning.keep_sinks=2"], tmp_path / "run"))


@pytest.mark.slow
def test_sweep(tiny_data, tmp_path):
    """A small sweep from the command line (Hydra multirun): one result per point, each as fixed as a single run."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", *COMMON, f"data.dir={tiny_data}", "pruning=ap50,random50", "seed=0,1",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(runs) == 4
    check("sweep", {p.name: behaviour(p) for p in runs})
