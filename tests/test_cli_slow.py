"""End-to-end command-line runs in subprocesses: DDP, wandb offline, a Hydra sweep. Marked slow (`make test` runs them)."""

from __future__ import annotations

import json

import pytest
import torch

from ap.core import MaskSet
from ap.data.wikitext import read_tokens
from ap.pipeline import evaluate
from ap.tasks import build
from conftest import TINY, compose_cfg
from test_pipeline import run_cli

pytestmark = pytest.mark.slow


def test_ddp_two_processes_give_the_same_masks_and_metrics_as_one(tiny_data, tmp_path):
    """2 gloo processes: the same masks as 1 process, and every evaluation counts each example once (the pruned model
    before fine-tuning scores as in 1 process; the final metrics equal a 1-process evaluation of the final weights)."""
    common = [*TINY, f"data.dir={tiny_data}", "pruning=ap80", "pruning.calibration_batches=null",
              "dense_finetune_baseline=false", "task.finetune.max_steps=2"]
    n_val = -(-(len(read_tokens(tiny_data / "wiki.valid.tokens")) - 1) // 32)  # blocks of 32
    assert n_val % 2 == 1  # an odd count: a sampler that pads ranks would count one block twice
    single = run_cli(*common, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    dense = tmp_path / "single/checkpoints/dense/last.ckpt"
    ddp = run_cli(*common, "trainer=ddp", f"pruning.dense_ckpt={dense}", f"hydra.run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world_size: 2" in ddp.stderr or "MEMBER: 2/2" in ddp.stderr + ddp.stdout
    a, b = MaskSet.load(tmp_path / "single/masks.pt"), MaskSet.load(tmp_path / "ddp/masks.pt")
    assert a.meta["calibration"]["tokens"] == b.meta["calibration"]["tokens"]
    assert a.meta["calibration"]["batches"] == b.meta["calibration"]["batches"]
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name

    one, two = (json.loads((tmp_path / f"{d}/results.json").read_text()) for d in ("single", "ddp"))
    for key in ("dense_metrics", "pruned_before_finetune_metrics"):  # same weights and masks in both runs
        for metric, value in one[key].items():
            assert two[key][metric] == pytest.approx(value, rel=1e-5), (key, metric)

    cfg = compose_cfg([*common, "logger=none", f"paths.output_dir={tmp_path / 'eval'}"])
    dm, module = build(cfg)
    module.load_state_dict(torch.load(tmp_path / "ddp/checkpoints/finetune/last.ckpt", weights_only=True)["state_dict"])
    b.install(module.model)
    reference = evaluate(cfg, module, dm, "final_eval")
    assert set(reference) == set(two["metrics"])
    for metric, value in reference.items():
        assert two["metrics"][metric] == pytest.approx(value, rel=1e-5), metric


def test_wandb_logger_works_offline_without_account(tiny_data, tmp_path):
    proc = run_cli(*TINY, f"data.dir={tiny_data}", "logger=wandb", "task.dense.max_steps=3",
                   "task.finetune.max_steps=2", "dense_finetune_baseline=false", f"hydra.run.dir={tmp_path / 'run'}",
                   env_extra={"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "run/wandb").glob("offline-run-*"))
    # one run per stage (dense, dense_eval, finetune, final_eval) and one for the results
    assert len(runs) == 5 and all(any(r.rglob("*.wandb")) for r in runs)


def test_multirun_sweep_writes_one_result_per_point(tiny_data, tmp_path):
    proc = run_cli("-m", *TINY, f"data.dir={tiny_data}", "pruning=ap50,random50", "task.dense.max_steps=3",
                   "task.finetune.max_steps=2", "dense_finetune_baseline=false", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert sorted(r["pruning"] for r in results) == ["ap50", "random50"]
    assert all(abs(r["sparsity_achieved"] - 0.5) < 0.01 for r in results)


def test_wandb_runs_per_stage_share_the_group_and_each_job_gets_its_own(tiny_cfg, tmp_path, monkeypatch):
    """Two jobs in one process (a local multirun): every stage its own wandb run (job_type = stage) in the launch's
    group, never logging into an earlier job's run; masks.pt logged as an artifact by the results run."""
    import wandb
    from wandb.sdk.wandb_run import Run

    from ap.run import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("AP_LAUNCH", "sweep-x")
    inits, artifacts = [], []
    real_init, real_log_artifact = wandb.init, Run.log_artifact
    monkeypatch.setattr(wandb, "init", lambda *a, **kw: inits.append(kw) or real_init(*a, **kw))
    monkeypatch.setattr(Run, "log_artifact", lambda self, art, *a, **kw: artifacts.append(art.type)
                        or real_log_artifact(self, art, *a, **kw))
    ids = []
    for job in ("a", "b"):
        run(tiny_cfg("logger=wandb", "task.dense.max_steps=2", "task.finetune.max_steps=1", "pruning.heatmaps=true",
                     f"task.finetune.lr={0.001 if job == 'a' else 0.002}", out=tmp_path / job))
        assert wandb.run is None  # finished at the end of the job
        ids.append({d.name.rsplit("-", 1)[-1] for d in (tmp_path / job / "wandb").glob("offline-run-*")})
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert {kw.get("group") for kw in inits} == {"sweep-x"}
    jobs = [kw.get("job_type") for kw in inits]
    assert jobs[:6] == ["dense", "dense_eval", "dense_ft", "dense_ft_eval", "finetune", "final_eval"]
    assert jobs[6] == "results"
    assert jobs[7:] == ["dense_ft", "dense_ft_eval", "finetune", "final_eval", "results"]  # dense stage reused
    assert artifacts == ["ap-masks", "ap-masks"]
