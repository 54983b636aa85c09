"""Every option of every config group composes; typed checks reject bad values at compose/check time."""

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import OmegaConfBaseException

from ap.config import check, pruning_config
from ap.core import APError
from conftest import CONF, compose_cfg

# task_trainer/ holds settings for one task with one trainer, chosen by conf/config.yaml (composed in its own test)
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "task_trainer"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {"task", "model", "data", "pruning", "trainer", "logger", "paths", "experiment"} <= set(GROUPS)
    assert len(OPTIONS) >= 25


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}", "paths.output_dir=/tmp/x"])
    check(cfg)
    assert cfg.task.type and cfg.task.name and cfg.pruning.name
    if group == "pruning":
        p = pruning_config(cfg)
        assert p.name == option
        assert p.policy.value == ("none" if option == "none" else option.rstrip("0123456789"))
        if option != "none":
            assert p.sparsity == int(option[len(p.policy.value):]) / 100


def test_sparsity_out_of_range_is_a_config_error():
    cfg = compose_cfg(["pruning.sparsity=1.5", "paths.output_dir=/tmp/x"])
    with pytest.raises(APError, match=r"pruning.sparsity=1.5 is outside \[0, 1\)"):
        check(cfg)


@pytest.mark.parametrize("override", ["pruning.scope=row", "pruning.sparsty=0.5", "pruning.policy=magic",
                                      "pruning.sparsity=high"])
def test_unknown_values_and_misspelt_keys_fail_at_compose(override):
    with pytest.raises((ConfigCompositionException, HydraException, OmegaConfBaseException)):
        compose_cfg([override])


def test_sweep_values_compose():
    for p in ("ap50", "random90"):
        for scope in ("layer", "head", "global"):
            check(compose_cfg([f"pruning={p}", f"pruning.scope={scope}", "paths.output_dir=/tmp/x"]))


def test_resume_and_dense_checkpoint_are_exclusive():
    cfg = compose_cfg(["ckpt_path=a.ckpt", "pruning.dense_ckpt=b.ckpt", "paths.output_dir=/tmp/x"])
    with pytest.raises(APError, match="not both"):
        check(cfg)


@pytest.mark.parametrize("data", ["wikitext2", "wikitext103"])
def test_wikitext_configs_read_a_folder_in_that_format(data, tiny_data):
    from hydra.utils import instantiate

    dm = instantiate(compose_cfg([f"data={data}", f"data.dir={tiny_data}", "paths.output_dir=/tmp/x"]).data)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape and x.shape[1] == dm.block_len and 0 < x.shape[0] <= dm.batch_size
    assert dm.vocab.itos[:2] == ["<unk>", "<eos>"] and "name0" in dm.vocab.stoi
    missing = instantiate(compose_cfg([f"data={data}", "data.dir=/nonexistent", "paths.output_dir=/tmp/x"]).data)
    with pytest.raises(APError, match=f"prepare_data.py {data} --src"):
        missing.setup()


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_core_lm_and_glue_run_without_fairseq(tmp_path):
    """fairseq is only imported by task=wmt; without it, that task names the install command."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fairseq'] = None\n"  # `import fairseq` now raises ImportError
            "import ap.core, ap.callback, ap.run, ap.tasks.lm, ap.tasks.glue, ap.tasks.translation\n"
            "from ap.models.fairseq_mt import import_fairseq\n"
            "try:\n    import_fairseq()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(CONF.parent))
    assert proc.returncode == 0, proc.stderr
    assert "APError" in proc.stdout and "make install-fairseq" in proc.stdout


def test_seed_sweeps_redraw_the_random_baseline():
    assert pruning_config(compose_cfg(["pruning=random90", "seed=7", "paths.output_dir=/tmp/x"])).seed == 7
    assert pruning_config(compose_cfg(["pruning=random90", "seed=7", "pruning.seed=3",
                                       "paths.output_dir=/tmp/x"])).seed == 3


@pytest.mark.parametrize("data,name", [("lm_sample", "lm_sample"), ("wikitext103", "wikitext103"),
                                       ("wikitext2", "wikitext2")])
def test_lm_task_name_says_the_data_set(data, name):
    assert compose_cfg([f"data={data}", "paths.output_dir=/tmp/x"]).task.name == name


def test_run_directories_of_jobs_started_in_the_same_second_differ():
    """The run and sweep folder names carry the process id (jobs in one second used to share a folder)."""
    import os

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose(config_name="config", return_hydra_config=True).hydra
    for key in ("run.dir", "sweep.dir"):
        value = OmegaConf.select(hydra_cfg, key)
        assert value.endswith(f"_{os.getpid()}"), (key, value)


def test_debug_trainer_picks_task_specific_smoke_settings():
    """trainer=debug shrinks every stage; for translation conf/task_trainer/wmt_debug.yaml also makes evaluation
    greedy on small batches (beam search of an untrained model runs to the length limit)."""
    debug = compose_cfg(["task=wmt", "trainer=debug", "paths.output_dir=/tmp/x"])
    assert debug.trainer.max_steps == 3 and debug.task.module.beam == 1 and debug.data.eval_max_tokens == 1024
    full = compose_cfg(["task=wmt", "paths.output_dir=/tmp/x"])
    assert full.trainer.max_steps is None and full.task.module.beam == 5 and full.data.eval_max_tokens == 8192
    assert compose_cfg(["trainer=debug", "paths.output_dir=/tmp/x"]).data.get("eval_max_tokens") is None  # lm


@pytest.mark.parametrize("overrides,name", [(["pruning=ap90"], "ap90"), (["pruning=ap90", "pruning.sparsity=0.3"], "ap30"),
                                            (["pruning=random50", "pruning.sparsity=0.375"], "random37.5"),
                                            (["pruning=none"], "none"), (["pruning=ap90", "pruning.name=mine"], "mine")])
def test_pruning_label_follows_policy_and_sparsity_unless_set(overrides, name):
    """`-m pruning.sparsity=0.3,0.6` used to label every point ap90 (folders and results)."""
    cfg = compose_cfg([*overrides, "paths.output_dir=/tmp/x"])
    assert cfg.pruning.name == pruning_config(cfg).name == name
