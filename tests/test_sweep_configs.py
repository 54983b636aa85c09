"""Sweep configs: launcher presets, Optuna searches and sweep presets compose, and their grids hold what they promise.

Everything here composes configs or expands sweeps without training, except the one `slow` test (a tiny Optuna search
run by the joblib launcher). Every composition leaves out the machine's own conf/local/default.yaml (`~local`), so the
tests check the repository's configs.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ap.config import check, pruning_config
from conftest import CONF, ROOT, TINY

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

PRESET_LAUNCHERS = sorted(p.stem for p in (CONF / "hydra/launcher").glob("*.yaml"))
PLUGIN_LAUNCHERS = {"joblib": JOBLIB, "submitit_local": LOCAL, "submitit_slurm": SLURM}
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF / "experiment").glob("sweep_*.yaml"))
# the sparsity-curve presets and the task they run
CURVES = {"sweep_lm_sample": ("lm", "lm_sample"), "sweep_txl_sample": ("lm", "lm_sample"),
          "sweep_glue_sample": ("glue", "glue_sample"),
          "sweep_wmt_sample": ("wmt", "wmt_sample")}


def compose_full(*overrides: str) -> DictConfig:
    """The real config tree with the `hydra` node (launcher, sweeper); conf/local/default.yaml only if chosen."""
    if not any(o.startswith("local=") for o in overrides):
        overrides = ("~local", *overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def expand(params: dict, cli: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for a grid (hydra.sweeper.params) and command-line overrides."""
    arguments = [f"{k}={v}" for k, v in params.items()] + cli
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]


def test_the_groups_hold_what_the_tests_expect():
    assert {"local_parallel", "slurm"} <= set(PRESET_LAUNCHERS)
    assert not set(PRESET_LAUNCHERS) & set(PLUGIN_LAUNCHERS), "a preset would shadow a plugin's own config"
    assert {"lm_finetune_lr", "lm_max_sparsity"} <= set(SEARCHES)
    assert set(CURVES) | {"sweep_wmt_kinds"} <= set(SWEEPS)


# ---------------------------------------------------------------------------------------------------------- launchers

@pytest.mark.parametrize("launcher", PRESET_LAUNCHERS + sorted(PLUGIN_LAUNCHERS))
def test_launcher_composes_and_instantiates(launcher, monkeypatch):
    monkeypatch.delenv("AP_N_JOBS", raising=False)
    cfg = compose_full(f"hydra/launcher={launcher}", "experiment=sweep_lm_sample")
    target = cfg.hydra.launcher._target_
    assert target == {"local_parallel": JOBLIB, "slurm": SLURM}.get(launcher, PLUGIN_LAUNCHERS.get(launcher)), target
    get_class(target)  # the plugin is installed
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # every interpolation resolves
    instantiate(cfg.hydra.launcher)  # the launcher accepts every key (submitting needs setup(), not done here)
    assert cfg.hydra.sweeper.params.pruning  # choosing a launcher keeps the preset's grid
    if launcher == "local_parallel":
        assert params["n_jobs"] == 2


def test_local_parallel_takes_the_number_of_jobs_from_the_environment(monkeypatch):
    monkeypatch.setenv("AP_N_JOBS", "3")
    n_jobs = compose_full("hydra/launcher=local_parallel").hydra.launcher.n_jobs
    assert n_jobs == 3 and isinstance(n_jobs, int)


@pytest.mark.parametrize("trainer,devices", [("gpu", 1), ("ddp", 2)])
def test_slurm_starts_one_task_per_device(trainer, devices, tmp_path, monkeypatch):
    """The sbatch script submitit writes from the preset (a stand-in `srun` on PATH; nothing is submitted)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_full("hydra/launcher=slurm", f"trainer={trainer}", "hydra.launcher.partition=gpu-long",
                       "hydra.launcher.setup=[module load cuda]")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["tasks_per_node"] == params["gpus_per_node"] == cfg.trainer.devices == devices
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path(sys.executable).parent}:/usr/bin:/bin")
    # as SlurmLauncher.launch hands the config to submitit
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in (f"#SBATCH --ntasks-per-node={devices}", f"#SBATCH --gpus-per-node={devices}",
                 "#SBATCH --partition=gpu-long", "#SBATCH --nodes=1", "module load cuda"):
        assert line in script.splitlines(), (line, script)


def test_local_example_chooses_slurm_and_the_command_line_still_wins():
    cfg = compose_full("local=example_slurm")
    assert cfg.hydra.launcher._target_ == SLURM and cfg.hydra.launcher.partition == "gpu"
    cfg = compose_full("local=example_slurm", "hydra/launcher=submitit_slurm")
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm" and cfg.hydra.launcher.partition == "gpu"
    # its hydra.launcher keys are the slurm launcher's: another launcher for one command leaves the file out (~local)
    with pytest.raises(ConfigCompositionException):
        compose_full("local=example_slurm", "hydra/launcher=local_parallel")


# ------------------------------------------------------------------------------------------------- Optuna searches

@pytest.mark.parametrize("search", SEARCHES)
def test_search_composes_with_a_seeded_sampler_and_a_real_search_space(search):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import BaseDistribution

    cfg = compose_full(f"hparams_search={search}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == OPTUNA and cfg.hydra.mode == RunMode.MULTIRUN
    objectives = list(cfg.task.optimized_metric) if OmegaConf.is_list(cfg.task.optimized_metric) else [
        cfg.task.optimized_metric]
    directions = list(sweeper.direction) if OmegaConf.is_list(sweeper.direction) else [sweeper.direction]
    assert all(objectives) and len(objectives) == len(directions)  # one direction per returned value
    assert set(map(str, directions)) <= {"minimize", "maximize"}
    assert sweeper.n_trials >= 10 and sweeper.sampler.seed is not None
    sampler = instantiate(sweeper.sampler)  # optuna 2.10 accepts every sampler key
    assert type(sampler).__name__ == sweeper.sampler._target_.rsplit(".", 1)[1]
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert space and not fixed and all(isinstance(d, BaseDistribution) for d in space.values())
    for key, dist in space.items():  # each searched key exists, and its bounds compose and pass the checks
        assert OmegaConf.select(cfg, key) is not None, key
        for value in (dist.low, dist.high):
            check(compose_full(f"hparams_search={search}", f"{key}={value}"))


def test_finetune_lr_search_is_log_scale_around_the_default():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import LogUniformDistribution

    cfg = compose_full("hparams_search=lm_finetune_lr")
    assert cfg.task.type == "lm" and cfg.task.optimized_metric == "val/ppl"
    assert cfg.hydra.sweeper.direction == "minimize"
    (space, _) = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    lr = space["task.finetune.lr"]
    assert isinstance(lr, LogUniformDistribution) and lr.low < cfg.task.finetune.lr < lr.high
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.sweeper.sampler.n_startup_trials < cfg.hydra.sweeper.n_trials  # TPE gets to model something


def test_max_sparsity_search_samples_ap_sparsities():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    cfg = compose_full("hparams_search=lm_max_sparsity")
    assert pruning_config(cfg).policy.value == "ap"
    (space, _) = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    s = space["pruning.sparsity"]
    assert 0.0 < s.low < s.high < 1.0
    labelled = compose_full("hparams_search=lm_max_sparsity", "pruning.sparsity=0.8317")
    assert labelled.pruning.name == "ap83.17"  # each trial gets its own folder label


# ------------------------------------------------------------------------------------------------- sweep presets

@functools.lru_cache(maxsize=None)
def job_configs(preset: str) -> list[DictConfig]:
    """The composed config of every job of a sweep preset, as each job composes it (cached: read, never change)."""
    return sweep_jobs(f"experiment={preset}")


def sweep_jobs(experiment: str, *cli: str) -> list[DictConfig]:
    """Every job `run.py <experiment> <cli>` launches (the preset's grid and the command line), composed."""
    params = compose_full(experiment).hydra.sweeper.params
    return [compose_full(experiment, *job) for job in expand(params, list(cli))]


@pytest.mark.parametrize("preset", SWEEPS)
def test_sweep_preset_composes_every_job(preset):
    cfg = compose_full(f"experiment={preset}")
    assert cfg.hydra.sweeper._target_ == BASIC and cfg.hydra.mode == RunMode.MULTIRUN
    jobs = job_configs(preset)
    assert len(jobs) >= 4
    for job in jobs:
        check(job)
    names = [(j.pruning.name, tuple(j.pruning.kinds), j.seed) for j in jobs]
    assert len(set(names)) == len(names), "two jobs of the grid run the same setting"


@pytest.mark.parametrize("preset", sorted(CURVES))
def test_curve_preset_spans_20_to_90_percent_with_random_beside_ap(preset):
    """AP from 20 % to at least 90 %, random at >= 3 of AP's sparsities (sweep_glue_sample: at each, to fit 30 min)."""
    jobs = job_configs(preset)
    task, data = CURVES[preset]
    assert {(j.task.type, j.hydra.runtime.choices.data) for j in jobs} == {(task, data)}
    assert len({j.seed for j in jobs}) == 1  # one seed by default: seed=0,1,2 on the command line adds more
    by_policy: dict[str, set[float]] = {}
    for job in jobs:
        p = pruning_config(job)
        by_policy.setdefault(p.policy.value, set()).add(round(p.sparsity, 4))
    ap, random = by_policy.pop("ap"), by_policy.pop("random")
    assert not by_policy, f"unexpected policies {sorted(by_policy)}"
    assert len(ap) >= 4 and min(ap) == pytest.approx(0.2) and max(ap) >= 0.9, sorted(ap)
    assert len(random) >= 3 and random <= ap, (sorted(random), sorted(ap))
    if preset == "sweep_glue_sample":
        assert random == ap == {0.2, 0.5, 0.7, 0.9}


def test_txl_curve_runs_transformer_xl_with_memory():
    assert {(j.model._target_, j.model.mem_len > 0, j.model.eval_memory) for j in job_configs("sweep_txl_sample")} == {
        ("ap.models.transformer_xl.TransformerXLConfig", True, True)}


def test_wmt_kinds_preset_prunes_each_kind_alone_and_all_together():
    """AP and random at 30/50/70/90 % on each kind alone and on all three: 32 runs of the 800-update dense model,
    greedy BLEU."""
    jobs = job_configs("sweep_wmt_kinds")
    assert {(j.task.dense.max_steps, j.task.finetune.max_steps, j.task.module.beam) for j in jobs} == {(800, 30, 1)}
    grid = sorted((pruning_config(j).policy.value, round(pruning_config(j).sparsity, 2),
                   tuple(pruning_config(j).pruned_kinds())) for j in jobs)
    kinds = [("enc_self",), ("dec_self",), ("cross",), ("cross", "dec_self", "enc_self")]
    assert grid == sorted((p, s, k) for p in ("ap", "random") for s in (0.3, 0.5, 0.7, 0.9) for k in kinds)
    assert {j.task.type for j in jobs} == {"wmt"}


# make reproduce-sample: each curve's preset and the runs its extra seeds repeat (the claim's sparsity, the next one up)
REPRODUCE = {"reproduce-lm": ("sweep_txl_sample", 0.9, 0.95), "reproduce-mt": ("sweep_wmt_kinds", 0.5, 0.7),
             "reproduce-glue": ("sweep_glue_sample", 0.5, 0.7)}


def make_commands(target: str, *variables: str) -> list[str]:
    """The run.py commands `make <target>` would run (make -n prints them without running anything)."""
    proc = subprocess.run(["make", "-n", target, *variables], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\\\n\s*", " ", proc.stdout)  # (continued lines joined)
    return [re.split(r"\s*(&&|;|\n)", command, maxsplit=1)[0] for command in text.split("run.py ")[1:]]


def command_overrides(command: str) -> list[str]:
    """A printed run.py command's overrides, shell quotes removed, without the `hydra.` ones (where runs go)."""
    return [o.strip("'") for o in command.split() if not o.startswith("hydra.")]


@pytest.mark.parametrize("target", sorted(REPRODUCE))
def test_reproduce_sample_reruns_the_claims_points_with_more_seeds(target):
    """Seed 0 runs the whole grid; seeds 1 and 2 rerun AP and random at the claim's sparsity and the next one up,
    settings of the grid (so collect averages them with seed 0's); REPRO_SEEDS=1 runs the grid alone."""
    preset, claim, above = REPRODUCE[target]
    grid, extra, *dense_beam = make_commands(target, "REPRO_SEEDS=3", "REPRO=out")
    assert len(dense_beam) == (target == "reproduce-mt")
    assert grid.split()[0] == extra.split()[0] == f"experiment={preset}" and "seed=" not in grid
    overrides = command_overrides(extra)
    assert "seed=1,2" in overrides
    jobs = sweep_jobs(*overrides)
    points = {(pruning_config(j).policy.value, round(pruning_config(j).sparsity, 2), tuple(j.pruning.kinds))
              for j in jobs}
    assert {(p, s) for p, s, _ in points} == {(p, s) for p in ("ap", "random") for s in (claim, above)}
    assert len(jobs) == 2 * len(points) and {j.seed for j in jobs} == {1, 2}
    in_grid = {(pruning_config(j).policy.value, round(pruning_config(j).sparsity, 2), tuple(j.pruning.kinds))
               for j in job_configs(preset)}
    assert points <= in_grid, points - in_grid
    if preset == "sweep_wmt_kinds":
        assert {k for _, _, k in points} == {("enc_self", "dec_self", "cross")}
    single = make_commands(target, "REPRO_SEEDS=1", "REPRO=out")
    assert single[0] == grid and len(single) == 1 + len(dense_beam), "one seed: the grid (and MT's dense decoding)"


def test_reproduce_mt_decodes_each_seeds_dense_model_with_beam_5():
    """The last MT sweep evaluates the grid's own dense models (the same dense stage key per seed, so the cache
    reuses them) with task=wmt's beam 5, once per seed, without pruning or a dense+ft baseline."""
    for seeds, variables in (({0, 1, 2}, ["REPRO_SEEDS=3"]), ({0}, ["REPRO_SEEDS=1"])):
        grid, *_, last = make_commands("reproduce-mt", *variables, "REPRO=out")
        jobs = sweep_jobs(*command_overrides(last))
        assert sorted(j.seed for j in jobs) == sorted(seeds), "one run per seed"
        assert {(j.task.module.beam, j.pruning.sparsity, j.dense_finetune_baseline) for j in jobs} == {(5, 0.0, False)}
        for job in jobs:
            dense = compose_full(grid.split()[0], f"seed={job.seed}", "pruning=ap50")
            assert dense_key(job) == dense_key(dense), "the grid's dense model, not another one"
        assert dense_key(jobs[0]) != dense_key(compose_full(grid.split()[0], "seed=9")), "the key can tell seeds apart"


def dense_key(cfg: DictConfig) -> str:
    """The stage-cache key of a composed job's dense weights (neither the `hydra` node nor paths are part of it)."""
    from ap.pipeline.cache import key_of
    from ap.pipeline.keys import dense_identity

    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = "run"  # (${hydra:runtime.output_dir} outside a Hydra app)
    return key_of(dense_identity(cfg, pruning_config(cfg)))


def test_command_line_replaces_a_grid_key_and_multiplies_by_new_ones():
    """Hydra's basic sweeper: a key swept in the preset and on the command line takes the command line's values."""
    params = compose_full("experiment=sweep_lm_sample").hydra.sweeper.params
    n = len(expand(params, []))
    assert n >= 10
    assert expand(params, ["pruning=ap50,random50"]) == [["pruning=ap50"], ["pruning=random50"]]
    assert len(expand(params, ["seed=0,1,2"])) == 3 * n
    assert len(expand(params, ["trainer=debug"])) == n


def test_cli_prints_a_sweep_with_its_launcher():
    """`--cfg` shows a sweep without running it (Hydra 1.3 rejects `-m` with `--cfg`; the preset sets hydra.mode)."""
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "~local", "experiment=sweep_lm_sample",
                           "hydra/launcher=local_parallel", "--cfg", "hydra"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in (JOBLIB, "pruning: ap20,ap30,", "mode: MULTIRUN", "experiment: sweep_lm_sample"):
        assert text in proc.stdout, text


@pytest.mark.slow
def test_optuna_search_runs_two_trials_in_parallel_processes(tiny_data, tmp_path):
    """A tiny lm_finetune_lr search: 2 trials at once under the joblib launcher; Optuna gets each run's val/ppl."""
    import yaml

    out = tmp_path / "search"
    search = ["hparams_search=lm_finetune_lr", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2",
              "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={out}"]
    tiny = [*TINY, f"data.dir={tiny_data}", "task.dense.max_steps=3", "task.finetune.max_steps=2",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "~local", *search, *tiny],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    assert len(results) == 2
    lrs = {r["config"]["task"]["finetune"]["lr"] for r in results}
    assert len(lrs) == 2  # two proposals
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["metrics"]["val/ppl"] for r in results))
    assert best["best_params"]["task.finetune.lr"] in lrs
