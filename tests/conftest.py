"""Shared fixtures: real configs composed with Hydra and shrunk to a tiny LM on generated WikiText-format data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ap.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def write_tiny_wikitext(folder: Path, n_train_lines: int = 600, seed: int = 0) -> Path:
    """WikiText-format splits of a small synthetic language with long-range structure (names recur across a line)."""
    rng = random.Random(seed)
    names = [f"name{i}" for i in range(12)]
    verbs = ["saw", "met", "told", "helped", "followed", "answered"]
    fillers = ["the", "a", "old", "young", "city", "field", "house", "river", "and", "then", "there"]

    def line() -> str:
        a, b = rng.sample(names, 2)
        words = [a, rng.choice(verbs), b, ","] + rng.sample(fillers, 4) + [",", b, rng.choice(verbs), a, "."]
        return " " + " ".join(words) + " "

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train_lines), ("valid", 60), ("test", 60)):
        (folder / f"wiki.{split}.tokens").write_text(" = Heading = \n" + "\n".join(line() for _ in range(n)) + "\n")
    return folder


TINY = [
    "data.block_len=32", "data.batch_size=8", "data.eval_batch_size=16",
    "model.n_layers=2", "model.n_heads=2", "model.d_model=32", "model.d_ff=64", "model.dropout=0.0",
    "task.dense.max_steps=30", "task.finetune.max_steps=10", "task.module.warmup_steps=5",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=5", "logger=none",
    "pruning.calibration_batches=8", "pruning.heatmaps=false",
]


def compose_cfg(overrides: list[str]):
    """The real config tree (conf/) with ``overrides`` applied."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session", autouse=True)
def session_stage_cache(tmp_path_factory: pytest.TempPathFactory):
    """The stage cache (paths.cache_dir, via AP_CACHE_DIR) of module-scoped fixtures: never the repository's data/."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AP_CACHE_DIR", str(tmp_path_factory.mktemp("stage_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def stage_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts with an empty stage cache of its own (subprocesses inherit it through AP_CACHE_DIR)."""
    path = tmp_path / "stage_cache"
    monkeypatch.setenv("AP_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_wikitext(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def tiny_cfg(tiny_data: Path, tmp_path: Path):
    """Compose the tiny LM config; extra overrides go last."""

    def make(*overrides: str, out: Path | None = None):
        out = out or tmp_path / "run"
        return compose_cfg([*TINY, f"data.dir={tiny_data}", f"paths.output_dir={out}", *overrides])

    return make
