"""ap/run.py: the command line's extras around run() (the ``latest`` links; cli_main's errors are in test_pipeline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from ap.run import link_latest, update_link


def test_update_link_points_at_the_newest_folder_relatively(tmp_path):
    first, second = tmp_path / "outputs/lm_sample/ap90/a", tmp_path / "outputs/lm_sample/ap50/b"
    first.mkdir(parents=True), second.mkdir(parents=True)
    link = tmp_path / "outputs/latest"
    assert update_link(link, first) == link and link.resolve() == first.resolve()
    assert update_link(link, second) == link and link.resolve() == second.resolve()
    assert not os.path.isabs(os.readlink(link))  # the tree can move
    assert not list(link.parent.glob(".latest.*"))  # no temporary link left


def test_a_latest_that_is_no_link_is_left_alone(tmp_path):
    (tmp_path / "outputs/latest").mkdir(parents=True)
    (tmp_path / "outputs/latest/mine.txt").write_text("keep")
    assert update_link(tmp_path / "outputs/latest", tmp_path) is None
    assert (tmp_path / "outputs/latest/mine.txt").read_text() == "keep"


@pytest.fixture
def hydra_config(monkeypatch, tmp_path):
    """HydraConfig as @hydra.main sets it, for a run (or sweep) folder below tmp_path (the working directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def set_config(mode: RunMode, run_dir: str, sweep_dir: str) -> None:
        out = tmp_path / (run_dir if mode == RunMode.RUN else f"{sweep_dir}/0_job")
        out.mkdir(parents=True)
        hydra = OmegaConf.structured(HydraConf)
        hydra.mode, hydra.run.dir, hydra.sweep.dir, hydra.runtime.output_dir = mode, run_dir, sweep_dir, str(out)
        HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra}))

    yield set_config
    HydraConfig.instance().cfg = None


def test_a_run_links_outputs_latest_and_a_sweep_multirun_latest(hydra_config, tmp_path, monkeypatch):
    hydra_config(RunMode.RUN, "outputs/lm_sample/ap90/t1", "multirun/t1")
    assert link_latest() == Path("outputs/latest")
    assert (tmp_path / "outputs/latest").resolve() == (tmp_path / "outputs/lm_sample/ap90/t1").resolve()
    HydraConfig.instance().cfg = None
    hydra_config(RunMode.MULTIRUN, "outputs/x/y/t2", "multirun/t2")
    assert link_latest() == Path("multirun/latest")
    assert (tmp_path / "multirun/latest").resolve() == (tmp_path / "multirun/t2").resolve()  # the sweep, not the job
    monkeypatch.setenv("LOCAL_RANK", "1")  # other DDP ranks leave the link to rank zero
    assert link_latest() is None


def test_an_absolute_run_folder_gets_no_link(hydra_config, tmp_path):
    hydra_config(RunMode.RUN, str(tmp_path / "somewhere/run"), "multirun/t")
    assert link_latest() is None and not (tmp_path / "somewhere/latest").exists()
