"""The paper presets (experiment=paper_wt103 | paper_wmt14_en_de | paper_glue) compose with the paper's settings and
sweep grids; paper_wt103 runs with the debug trainer on tiny data (the WMT and GLUE presets run in their own test
files, next to their fixtures)."""

from __future__ import annotations

import pytest

from ap.run import run
from conftest import TINY, compose_cfg
from test_sweep_configs import compose_full, expand


def test_paper_wt103_is_the_base_transformer_xl_retrained_with_masks():
    cfg = compose_full("experiment=paper_wt103")
    m = cfg.model
    assert (m._target_, m.n_layers, m.d_model, m.n_heads, m.d_head, m.d_inner) == (
        "ap.models.transformer_xl.TransformerXLConfig", 16, 410, 10, 41, 2100)
    assert (m.tgt_len, m.mem_len, m.clamp_len, list(m.cutoffs)) == (150, 150, 400, [20000, 40000, 200000])
    assert cfg.pruning.reinit and cfg.task.dense.max_steps == 200000 and cfg.task.dense.lr == 2.5e-4
    assert cfg.data.name == "wikitext103" and cfg.data.batch_size == 60
    jobs = expand(dict(cfg.hydra.sweeper.params), [])
    assert [j[0] for j in jobs] == [f"pruning=ap{p}" for p in range(20, 100, 10)]


def test_paper_wmt_and_glue_presets_hold_the_papers_grids():
    wmt = compose_full("experiment=paper_wmt14_en_de")
    assert wmt.model.arch == "transformer_wmt_en_de" and wmt.data.name == "wmt14_en_de"
    kinds = [j[0] for j in expand(dict(wmt.hydra.sweeper.params), [])]
    assert kinds == ["pruning.kinds=[enc_self]", "pruning.kinds=[dec_self]", "pruning.kinds=[cross]",
                     "pruning.kinds=[enc_self,dec_self,cross]"]
    glue = compose_full("experiment=paper_glue")
    tasks = [j[0].split("=")[1] for j in expand(dict(glue.hydra.sweeper.params), [])]
    assert sorted(tasks) == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"])


def test_paper_wt103_preset_runs_with_the_debug_trainer(tiny_data, tmp_path):
    """The preset's recipe on tiny data: the model shrunk (and cutoffs below the tiny vocabulary), all else as set."""
    small = ["model.n_layers=2", "model.n_heads=2", "model.d_model=32", "model.d_head=16", "model.d_inner=64",
             "model.cutoffs=[20]", "data.batch_size=4", "model.eval_streams=2"]
    keep = [o for o in TINY if not o.startswith(("model.", "data.", "task."))]
    cfg = compose_cfg(["experiment=paper_wt103", *keep, *small, "trainer=debug", f"data.dir={tiny_data}",
                       f"paths.output_dir={tmp_path}"])
    results = run(cfg)
    assert results["baseline"] == "dense" and results["sparsity_achieved"] == pytest.approx(0.9, abs=0.01)
    assert results["config"]["model"]["mem_len"] == 150 and "test/ppl" in results["metrics"]
