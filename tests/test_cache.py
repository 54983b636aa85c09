"""The stage cache (ap/pipeline/cache.py) and the stages that use it (ap/pipeline/stages.py): keys, atomic entries,
one builder, corrupt entries, and results that never depend on hit or miss."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import pytest

from ap.pipeline.cache import StageCache, key_of, verify
from ap.config import pruning_config
from ap.core import APError
from ap.run import run
from ap.pipeline.keys import calibration_payload, dense_ft_payload, dense_identity
from conftest import write_tiny_wikitext


# --- keys -------------------------------------------------------------------------------------------------------
def keys(cfg) -> tuple[str, str, str]:
    """(dense, dense+ft, calibration) keys of a composed config."""
    pruning = pruning_config(cfg)
    dense = key_of(dense_identity(cfg, pruning))
    return dense, key_of(dense_ft_payload(cfg, dense)), key_of(calibration_payload(cfg, pruning, dense))


@pytest.mark.parametrize("override", ["model.d_model=48", "task.dense.max_steps=31", "seed=1", "data.block_len=16",
                                      "trainer.limit_train_batches=5", "task.dense.lr=0.01"])
def test_a_dense_relevant_change_changes_every_key(tiny_cfg, override):
    base, changed = keys(tiny_cfg()), keys(tiny_cfg(override))
    assert all(a != b for a, b in zip(base, changed))


@pytest.mark.parametrize("override", ["pruning=ap50", "pruning=random90", "pruning.scope=head", "pruning.block_size=8",
                                      "pruning.kinds=[dec_self]", "pruning.reinit=true", "logger=csv",
                                      "trainer.enable_progress_bar=true", "dense_finetune_baseline=false",
                                      "cache.enabled=false", "data.missing_hint=elsewhere"])
def test_a_pruning_or_display_change_keeps_every_key(tiny_cfg, override):
    assert keys(tiny_cfg()) == keys(tiny_cfg(override))


def test_fine_tune_settings_change_only_the_baseline_key(tiny_cfg):
    (d0, f0, c0), (d1, f1, c1) = keys(tiny_cfg()), keys(tiny_cfg("task.finetune.lr=0.05"))
    assert d0 == d1 and c0 == c1 and f0 != f1
    (d2, f2, c2) = keys(tiny_cfg("pruning.calibration_batches=3"))
    assert d0 == d2 and f0 == f2 and c0 != c2


def test_data_is_keyed_by_its_files_not_its_folder_name(tiny_cfg, tiny_data, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in tiny_data.iterdir():  # the same files elsewhere (modification times kept)
        (moved / f.name).write_bytes(f.read_bytes())
        os.utime(moved / f.name, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    assert keys(tiny_cfg())[0] == keys(tiny_cfg(f"data.dir={moved}"))[0]
    other = write_tiny_wikitext(tmp_path / "other", seed=1)  # other text: another dense model
    assert keys(tiny_cfg())[0] != keys(tiny_cfg(f"data.dir={other}"))[0]


# --- entries ----------------------------------------------------------------------------------------------------
def counting_build(log: Path, text: str = "product", pause: float = 0.0):
    def build(folder):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(pause)
        if folder is not None:
            (folder / "product.txt").write_text(text)
    return build


def builds(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def test_an_entry_is_built_once_then_reused(tmp_path):
    cache, log = StageCache(tmp_path / "cache", tmp_path / "run"), tmp_path / "builds"
    first = cache.fetch("dense", {"a": 1}, counting_build(log))
    second = cache.fetch("dense", {"a": 1}, counting_build(log))
    other = cache.fetch("dense", {"a": 2}, counting_build(log))
    assert (first.reused, second.reused, other.reused) == (False, True, False) and builds(log) == 2
    assert first.path == second.path != other.path and (first.path / "product.txt").read_text() == "product"
    marker = verify(first.path)
    assert marker["payload"] == {"a": 1} and set(marker["files"]) == {"product.txt"}
    assert first.record() == {"status": "ran", "key": key_of({"a": 1}), "entry": str(first.path)}


def test_a_failed_build_leaves_no_entry(tmp_path):
    cache = StageCache(tmp_path / "cache", tmp_path / "run")

    def broken(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.fetch("dense", {"a": 1}, broken)
    assert not (tmp_path / "cache/stages/dense" / key_of({"a": 1})).exists()
    assert not list((tmp_path / "cache/stages/dense/.tmp").iterdir())
    assert cache.fetch("dense", {"a": 1}, counting_build(tmp_path / "log")).reused is False


def _fetch_in_process(root: str, run_dir: str, log: str, pause: float, die: bool) -> None:
    def build(folder):
        counting_build(Path(log), pause=pause)(folder)
        if die:
            os._exit(9)  # killed mid-build: no cleanup, no rename
    StageCache(Path(root), Path(run_dir)).fetch("dense", {"a": 1}, build)


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_a_job_killed_while_building_leaves_no_entry_and_no_stuck_lock(tmp_path):
    args = (str(tmp_path / "cache"), str(tmp_path / "run"), str(tmp_path / "log"), 0.0)
    p = mp.get_context("spawn").Process(target=_fetch_in_process, args=(*args, True))
    p.start(), p.join(60)
    assert p.exitcode == 9 and builds(tmp_path / "log") == 1
    assert not (tmp_path / "cache/stages/dense" / key_of({"a": 1})).exists()
    entry = StageCache(tmp_path / "cache", tmp_path / "run").fetch("dense", {"a": 1}, counting_build(tmp_path / "log"))
    assert entry.reused is False and builds(tmp_path / "log") == 2  # the next job builds it


@pytest.mark.slow  # a subprocess (make test runs it, make test-fast does not)
def test_concurrent_jobs_build_a_missing_entry_once(tmp_path):
    ctx = mp.get_context("spawn")
    jobs = [ctx.Process(target=_fetch_in_process, args=(str(tmp_path / "cache"), str(tmp_path / f"run{i}"),
                                                       str(tmp_path / "log"), 1.0, False)) for i in range(3)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(120)
    assert [j.exitcode for j in jobs] == [0, 0, 0] and builds(tmp_path / "log") == 1


@pytest.mark.parametrize("damage", ["edit", "delete", "marker"])
def test_a_corrupt_entry_fails_naming_it_and_is_not_rebuilt(tmp_path, damage):
    cache, log = StageCache(tmp_path / "cache", tmp_path / "run"), tmp_path / "log"
    entry = cache.fetch("dense", {"a": 1}, counting_build(log))
    if damage == "edit":
        (entry.path / "product.txt").write_text("other")
    elif damage == "delete":
        (entry.path / "product.txt").unlink()
    else:
        (entry.path / "entry.json").write_text("{not json")
    with pytest.raises(APError, match=f"corrupt stage cache entry {entry.path}.*delete"):
        cache.fetch("dense", {"a": 1}, counting_build(log))
    assert builds(log) == 1


def test_other_ranks_follow_rank_zero_without_locking(tmp_path, monkeypatch):
    from filelock import FileLock

    root, run_dir, log = tmp_path / "cache", tmp_path / "run", tmp_path / "log"
    folders = []
    StageCache(root, run_dir).fetch("dense", {"a": 1}, counting_build(log))  # rank zero built it: decision "build"
    monkeypatch.setenv("LOCAL_RANK", "1")
    follower = StageCache(root, run_dir)
    lock = root / "stages/dense/.locks" / f"{key_of({'a': 1})}.lock"
    with FileLock(str(lock)):  # held (by rank zero, say): a follower must not wait on it
        built_along = follower.fetch("dense", {"a": 1}, lambda folder: folders.append(folder))
        assert folders == [None] and not built_along.reused  # took part in the build, wrote nothing
        monkeypatch.delenv("LOCAL_RANK")
        StageCache(root, run_dir).fetch("dense", {"a": 1}, counting_build(log))  # rank zero, next run: "reuse"
        monkeypatch.setenv("LOCAL_RANK", "1")
        reused = follower.fetch("dense", {"a": 1}, lambda folder: folders.append(folder))
    assert folders == [None] and reused.reused and builds(log) == 1
    assert reused.path == built_along.path == root / "stages/dense" / key_of({"a": 1})


def test_disabled_cache_builds_into_the_run_directory(tmp_path):
    cache, log = StageCache(None, tmp_path / "run"), tmp_path / "log"
    entry = cache.fetch("dense", {"a": 1}, counting_build(log))
    assert entry.path == tmp_path / "run/stages/dense" and not entry.reused and verify(entry.path)
    assert not (tmp_path / "cache").exists()


# --- the pipeline -----------------------------------------------------------------------------------------------
def test_reused_stages_give_the_same_results_as_computed_ones(tiny_cfg, tmp_path, stage_cache):
    computed = run(tiny_cfg("pruning=ap70", out=tmp_path / "a"))
    assert {k: v["status"] for k, v in computed["stages"].items()} == {"dense": "ran", "dense_eval": "ran",
                                                                        "dense_ft": "ran", "calibrate": "ran"}
    reused = run(tiny_cfg("pruning=ap70", out=tmp_path / "b"))
    assert {k: v["status"] for k, v in reused["stages"].items()} == {"dense": "reused", "dense_eval": "reused",
                                                                      "dense_ft": "reused", "calibrate": "reused"}
    assert {k: v["key"] for k, v in reused["stages"].items()} == {k: v["key"] for k, v in computed["stages"].items()}
    uncached = run(tiny_cfg("pruning=ap70", "cache.enabled=false", out=tmp_path / "c"))
    for key in ("dense_metrics", "dense_finetuned_metrics", "pruned_before_finetune_metrics", "metrics"):
        assert computed[key] == reused[key] == uncached[key], key  # bitwise
    assert (tmp_path / "c/stages/dense/model.pt").is_file() and (tmp_path / "b/stats.pt").is_file()
    assert "dense_s" in computed["timing"] and "dense_s" not in reused["timing"]
    assert reused["stages"]["dense"]["build_timing"]["dense_s"] == computed["timing"]["dense_s"]

    other = run(tiny_cfg("pruning=random50", "task.finetune.lr=0.002", out=tmp_path / "d"))
    status = {k: v["status"] for k, v in other["stages"].items()}
    assert status == {"dense": "reused", "dense_eval": "reused", "dense_ft": "ran", "calibrate": "reused"}
    assert other["dense_metrics"] == computed["dense_metrics"]
    assert len(list((stage_cache / "stages/dense").glob("[0-9a-f]*"))) == 1


@pytest.mark.parametrize("override,calibration", [
    (["trainer.limit_test_batches=1", "trainer.limit_val_batches=2"], "reused"),
    (["data.eval_batch_size=8"], "ran")])  # (calibration reads the evaluation batch size)
def test_evaluation_settings_reuse_the_dense_weights_and_results_equal_a_cold_run(tiny_cfg, tmp_path, override,
                                                                                  calibration):
    """A change that only evaluation reads reuses the dense weights (no retraining) and, unless calibration reads
    it, the calibration; the dense and dense+ft metrics are evaluated again; every result is bitwise a cold run's."""
    run(tiny_cfg("pruning=ap70", out=tmp_path / "a"))
    warm = run(tiny_cfg("pruning=ap70", *override, out=tmp_path / "b"))
    status = {k: v["status"] for k, v in warm["stages"].items()}
    assert status == {"dense": "reused", "dense_eval": "ran", "dense_ft": "ran", "calibrate": calibration}
    cold = run(tiny_cfg("pruning=ap70", *override, "cache.enabled=false", out=tmp_path / "c"))
    for key in ("dense_metrics", "dense_finetuned_metrics", "pruned_before_finetune_metrics", "metrics"):
        assert warm[key] == cold[key], key  # bitwise


def test_given_files_skip_the_cache_for_what_they_replace(tiny_cfg, tmp_path):
    first = run(tiny_cfg("pruning=ap70", out=tmp_path / "a"))
    ckpt = tmp_path / "a/checkpoints/dense/last.ckpt"
    given = run(tiny_cfg("pruning=ap50", f"pruning.dense_ckpt={ckpt}", f"pruning.stats_path={tmp_path / 'a/stats.pt'}",
                         out=tmp_path / "b"))
    assert given["stages"]["dense"]["status"] == "given" and given["stages"]["calibrate"]["status"] == "given"
    assert given["dense_metrics"] == first["dense_metrics"]
    entry = Path(first["stages"]["dense"]["entry"]) / "model.pt"  # a cache entry's weights work as dense_ckpt too
    from_entry = run(tiny_cfg("pruning=ap50", f"pruning.dense_ckpt={entry}", out=tmp_path / "c"))
    assert from_entry["dense_metrics"] == first["dense_metrics"]


def test_pruning_none_reuses_the_dense_stage(tiny_cfg, tmp_path):
    pruned = run(tiny_cfg("pruning=ap70", out=tmp_path / "a"))
    dense = run(tiny_cfg("pruning=none", out=tmp_path / "b"))
    assert dense["stages"]["dense"]["status"] == "reused" and dense["metrics"] == pruned["dense_metrics"]
    saved = json.loads((tmp_path / "b/results.json").read_text())
    assert saved["stages"]["dense"]["entry"] == pruned["stages"]["dense"]["entry"]


def test_training_free_mode_evaluates_the_masked_dense_model(tiny_cfg, tmp_path):
    """pruning.finetune=false: dense -> calibrate -> masks -> evaluate; its metrics are those of the dense weights
    under the masks, i.e. what a fine-tuning run measures before fine-tuning (and it reuses that run's stages)."""
    tuned = run(tiny_cfg("pruning=ap70", out=tmp_path / "a"))
    free = run(tiny_cfg("pruning=ap70", "pruning.finetune=false", out=tmp_path / "b"))
    assert free["finetune"] is False and free["baseline"] == "dense" and "dense_finetuned_metrics" not in free
    assert "pruned_before_finetune_metrics" not in free and not (tmp_path / "b/checkpoints/finetune").exists()
    for metric, value in tuned["pruned_before_finetune_metrics"].items():
        assert free["metrics"][metric] == value, metric
    assert free["metrics"]["val/ppl"] != free["dense_metrics"]["val/ppl"]  # the masks were applied
    assert free["stages"]["calibrate"]["status"] == "reused" and (tmp_path / "b/masks.pt").is_file()
    with pytest.raises(APError, match="needs pruning.finetune=true"):
        run(tiny_cfg("pruning=ap70", "pruning.finetune=false", "pruning.reinit=true", out=tmp_path / "c"))


def test_followers_stop_when_rank_zero_fails_or_disagrees(tmp_path, monkeypatch):
    root, run_dir = tmp_path / "cache", tmp_path / "run"

    def broken(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        StageCache(root, run_dir).fetch("dense", {"a": 1}, broken)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(APError, match="rank zero failed in the dense stage"):
        StageCache(root, run_dir).fetch("dense", {"a": 1}, counting_build(tmp_path / "log"))
    monkeypatch.delenv("LOCAL_RANK")
    StageCache(root, run_dir).fetch("dense", {"a": 1}, counting_build(tmp_path / "log"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(APError, match="differs from rank zero's"):  # e.g. data files that differ between nodes
        StageCache(root, run_dir).fetch("dense", {"a": 2}, counting_build(tmp_path / "log"))
    monkeypatch.setenv("AP_LAUNCH", "a later attempt")  # a decision of an earlier attempt is not followed
    monkeypatch.setattr("ap.pipeline.cache.WAIT_S", 0.3)
    with pytest.raises(APError, match="no decision from rank zero"):
        StageCache(root, run_dir).fetch("dense", {"a": 1}, counting_build(tmp_path / "log"))


def test_lanes_of_killed_builders_are_cleared_and_a_foreign_folder_is_an_error(tmp_path):
    """A build folder is cleared only when its owner (host and pid in its name) is known dead: on this host with no
    such process. A live owner here, one on another node (a lock that does not span nodes) or a name without a host
    keep theirs."""
    import socket
    import subprocess
    import sys

    cache, log = StageCache(tmp_path / "cache", tmp_path / "run"), tmp_path / "log"
    key = key_of({"a": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    lanes = {"dead here": f"{key}-{host}-{int(dead.stdout)}-deadbeef", "live here": f"{key}-{host}-{os.getpid()}-1",
             "other node": f"{key}-node-07.cluster-{int(dead.stdout)}-2", "no host": f"{key}-{int(dead.stdout)}-3"}
    for name in lanes.values():
        (tmp_path / "cache/stages/dense/.tmp" / name).mkdir(parents=True)
        (tmp_path / "cache/stages/dense/.tmp" / name / "half.pt").write_text("half")
    cache.fetch("dense", {"a": 1}, counting_build(log))
    left = {what for what, name in lanes.items() if (tmp_path / "cache/stages/dense/.tmp" / name).exists()}
    assert left == {"live here", "other node", "no host"}
    foreign = tmp_path / "cache/stages/dense" / key_of({"a": 2})
    foreign.mkdir()
    with pytest.raises(APError, match=f"{foreign} exists without entry.json"):
        cache.fetch("dense", {"a": 2}, counting_build(log))
    assert builds(log) == 1


# --- what the keys hold -------------------------------------------------------------------------------------------
def all_keys(cfg, pretrained: bool = False) -> dict[str, str]:
    from ap.pipeline.keys import dense_eval_payload

    pruning = pruning_config(cfg)
    dense = key_of(dense_identity(cfg, pruning, pretrained))
    return {"dense": dense, "dense_eval": key_of(dense_eval_payload(cfg, dense)),
            "dense_ft": key_of(dense_ft_payload(cfg, dense)), "calibrate": key_of(calibration_payload(cfg, pruning,
                                                                                                     dense))}


@pytest.mark.parametrize("task,override", [
    ("lm", "trainer.limit_val_batches=3"), ("lm", "trainer.limit_test_batches=3"), ("lm", "data.num_workers=1"),
    ("lm", "data.eval_batch_size=8"), ("txl", "model.eval_streams=3"), ("txl", "model.eval_memory=false"),
    ("wmt", "task.module.bleu=tokenized"), ("wmt", "task.module.beam=2"), ("wmt", "task.module.lenpen=0.6"),
    ("wmt", "data.eval_max_tokens=1000"), ("wmt", "task.module.reference_files.test=/refs/test.en"),
    ("clm", "task.data.max_eval_sequences=3"), ("clm", "model.backend=block"), ("clm", "task.data.eval_batch_size=2")])
def test_evaluation_settings_stay_out_of_the_weights_key(tiny_cfg, tmp_path, task, override):
    """Evaluation-only settings change the keys of what holds evaluation results (dense_eval, dense_ft), never the
    dense weights'; calibration's only where it reads them (its batch size)."""
    from ap.pipeline.cache import CALIBRATION_READS

    from conftest import compose_cfg

    base = {"lm": [], "txl": ["model=transformer_xl"], "wmt": ["task=wmt"],
            "clm": ["task=clm", f"model.name_or_path={tmp_path}"]}[task]  # (a local model: a name that is no
    # folder here would be a hub model of unknown revision, never a hit)
    make = tiny_cfg if task == "lm" else (lambda *o: compose_cfg([*o, "paths.output_dir=/run"]))
    pretrained = task == "clm"
    a, b = all_keys(make(*base), pretrained), all_keys(make(*base, override), pretrained)
    assert a["dense"] == b["dense"] and a["dense_eval"] != b["dense_eval"] and a["dense_ft"] != b["dense_ft"]
    reads = override.split("=")[0] in CALIBRATION_READS
    assert (a["calibrate"] != b["calibrate"]) == reads


def test_what_can_change_a_product_stays_in_the_keys(tiny_cfg, tmp_path):
    """Whether training validates (its loop draws from the RNG) and a trained model's backend (numerics) stay in
    the weights key; GPUs count only for trainers that may use them; reference files count by content; a pkg://
    model by its package version; a hub name without a known revision is never a hit; GLUE keys read only the task's
    own folder."""
    from conftest import compose_cfg

    from ap.pipeline.keys import model_source, versions

    base = all_keys(tiny_cfg())
    assert all_keys(tiny_cfg("trainer.limit_val_batches=0"))["dense"] != base["dense"]
    assert all_keys(tiny_cfg("model.backend=eager"))["dense"] != base["dense"]
    assert "cuda_devices" not in versions(tiny_cfg()) and "cuda_devices" in versions(tiny_cfg("trainer=gpu"))
    refs = tmp_path / "test.en"
    refs.write_text("a\n")
    one = all_keys(compose_cfg(["task=wmt", f"task.module.reference_files.test={refs}", "paths.output_dir=/run"]))
    refs.write_text("b b\n")
    two = all_keys(compose_cfg(["task=wmt", f"task.module.reference_files.test={refs}", "paths.output_dir=/run"]))
    assert two["dense_eval"] != one["dense_eval"]
    from importlib import metadata

    assert model_source("pkg://omegaconf/x") == {"package": "omegaconf", "version": metadata.version("omegaconf")}
    assert model_source("nobody/no-such-model") != model_source("nobody/no-such-model")
    glue = tmp_path / "glue"
    for task in ("SST-2", "CoLA"):
        (glue / task).mkdir(parents=True)
        (glue / task / "train.tsv").write_text("sentence\tlabel\nx\t1\n")
    (tmp_path / "bert").mkdir()
    cfg = ["task=glue", f"data.dir={glue}", f"model.name_or_path={tmp_path / 'bert'}", "paths.output_dir=/run"]
    sst2 = all_keys(compose_cfg(cfg))["dense"]
    (glue / "CoLA" / "train.tsv").write_text("sentence\tlabel\nother\t0\n")
    assert all_keys(compose_cfg(cfg))["dense"] == sst2  # a sibling task's files
    (glue / "SST-2" / "train.tsv").write_text("sentence\tlabel\nother\t0\n")
    assert all_keys(compose_cfg(cfg))["dense"] != sst2


def test_the_source_hash_covers_computing_modules_only(tmp_path, monkeypatch):
    import ap
    from ap.pipeline import keys as stages

    copy = tmp_path / "ap"
    shutil.copytree(Path(ap.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(ap, "__file__", str(copy / "__init__.py"))

    def source_hash() -> str:
        stages._source_hash.cache_clear()
        return stages._source_hash()

    try:
        before = source_hash()
        for path in ("collect/plots.py", "report.py"):  # tables and plots of finished runs: no stage product
            (copy / path).write_text((copy / path).read_text() + "\n# edited\n")
            assert source_hash() == before, path
        (copy / "core/attention/block.py").write_text((copy / "core/attention/block.py").read_text() + "\n# edited\n")
        assert source_hash() != before
    finally:
        stages._source_hash.cache_clear()
