"""Content-addressed cache of pipeline stages shared by runs (docs/design.md, "The stage cache").

A stage's product (dense weights and metrics, the dense+ft baseline's metrics, calibration statistics) lives in
``<cache_dir>/stages/<stage>/<key>/`` where ``<key>`` hashes exactly the resolved config that determines it, so any
job (a plain ``-m`` sweep, parallel joblib workers, SLURM array tasks, DDP ranks) that needs the same product reuses it.

- **Keys** are built by leaving out what cannot change the product (``dense_payload``): a forgotten key costs a miss,
  never a wrong hit. Data paths are replaced by a fingerprint of the files below them; versions of ap and torch are in.
  The dense weights' key leaves out what only evaluation reads (``EVAL_ONLY``); evaluation results are products of
  their own, keyed on the weights plus those settings, and calibration adds the ones it reads (``CALIBRATION_READS``).
- **Atomic entries**: an entry is built in ``<stage>/.tmp/<key>-<host>-<pid>-<random>``, gets ``entry.json`` (the
  payload it hashes and the sha256 of every file), and is renamed into place. A job killed while building leaves no
  entry; its folder is cleared by the next builder only when that builder runs on the same host and the owner's
  process is gone (a lock that does not span nodes must not let one node delete another's live build).
- **One builder**: jobs that miss the same entry wait on a ``filelock.FileLock`` (``<stage>/.locks/<key>.lock``);
  the first builds it, the others
  reuse it. Every job, builder or not, then loads the product from the entry, so a result never depends on hit or miss.
- **DDP**: the rank-zero process decides (lock, hit or build) and writes its decision to the run directory; other
  ranks never lock (a child waiting on its parent's lock deadlocks): they follow that decision, taking part in the
  build (collectives) without writing, then load the entry.
- **Corrupt entries** fail loudly (``APError`` naming the folder to delete), never rebuilt over silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock, Timeout

from ap.core.errors import APError

log = logging.getLogger(__name__)
MARKER = "entry.json"
# Top-level config keys that never change a stage's product: pruning and fine-tuning settings are added back by the
# stages that depend on them (ap/stages.py), the rest is bookkeeping.
NOT_PRODUCT = ("pruning", "logger", "paths", "hydra", "ckpt_path", "dense_finetune_baseline", "cache",
               "optimized_metric")
TRAINER_DISPLAY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir")
# Settings only evaluation reads (dotted paths): out of the dense weights' key, in the key of every product that holds
# evaluation results (the dense model's metrics, the dense+ft baseline's). trainer.limit_val_batches leaves only
# whether training validates at all (a validation loop draws from torch's RNG, which dropout then uses).
EVAL_ONLY = ("task.module.bleu", "task.module.beam", "task.module.lenpen", "task.module.max_len_a",
             "task.module.max_len_b", "task.module.detokenize", "task.module.reference_files", "data.eval_batch_size",
             "data.eval_max_tokens", "data.num_workers", "task.data.eval_batch_size", "task.data.max_eval_sequences",
             "task.data.num_workers", "trainer.limit_val_batches", "trainer.limit_test_batches", "model.eval_streams",
             "model.eval_memory")
# ... of which calibration reads these (the size of its batches): in the calibration key
CALIBRATION_READS = ("data.eval_batch_size", "data.eval_max_tokens", "task.data.eval_batch_size", "model.eval_streams")
WAIT_S = float(os.environ.get("AP_CACHE_WAIT_S", 24 * 3600))  # how long a DDP rank waits for rank zero's entry


def global_rank() -> int:
    """This process's global rank as launchers announce it in the environment (0 outside distributed runs): rank zero
    only if every one of ``RANK`` (torchrun), ``SLURM_PROCID``, and Lightning's ``NODE_RANK``/``LOCAL_RANK`` is 0 or
    unset (inside ``srun --pty`` Lightning's children inherit ``SLURM_PROCID=0`` but get ``LOCAL_RANK`` > 0)."""
    ranks = [int(os.environ.get(var) or 0) for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")]
    return next((r for r in ranks if r), 0)  # (only "zero or not" matters here)


def attempt_id() -> str:
    """Which attempt of a run a decision belongs to (a requeued SLURM job reuses its run folder)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("AP_LAUNCH") or "local"


def builder_is_dead(name: str, key: str) -> bool:
    """Whether the builder of the temporary folder ``name`` (``<key>-<host>-<pid>-<random>``) is known to be dead: it
    ran on this host and its process is gone. Builders on other hosts, and names without a host, count as alive."""
    host, _, pid = name[len(key) + 1:].rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of the files at/below ``path`` (a re-prepared data set is a miss)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(payload: dict[str, Any]) -> str:
    """The entry name for ``payload``: 20 hex digits of the sha256 of its canonical JSON."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def split_eval(config: dict[str, Any], extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config`` without the ``EVAL_ONLY`` (and ``extra``) settings, and those settings by dotted path."""
    config = json.loads(json.dumps(config, default=str))  # a deep copy
    settings = {}
    for dotted in (*EVAL_ONLY, *extra):
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            settings[dotted] = node.pop(leaf)
    return config, settings


def file_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with existing local files and folders (e.g. reference files) replaced by their fingerprints."""
    def content(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: content(x) for k, x in v.items()}
        return {"files": fingerprint(Path(v))} if isinstance(v, str) and v and Path(v).exists() else v
    return {k: content(v) for k, v in settings.items()}


def dense_payload(config: dict[str, Any], versions: dict[str, str], eval_only: tuple[str, ...] = ()) -> dict[str, Any]:
    """What determines the dense weights: the resolved config minus ``NOT_PRODUCT``, ``task.finetune``, display-only
    trainer keys and the settings only evaluation reads (``EVAL_ONLY`` and ``eval_only``; of
    ``trainer.limit_val_batches`` only whether training validates), with the local paths of ``data`` and ``model``
    (data folders, checkpoint folders) replaced by fingerprints of their files (the location is not the content),
    plus ``versions``."""
    config, settings = split_eval(config, eval_only)
    payload = {k: v for k, v in config.items() if k not in NOT_PRODUCT}
    if "trainer" in payload:
        payload["trainer"]["validates"] = settings.get("trainer.limit_val_batches") not in (0, 0.0)
    payload["task"] = {k: v for k, v in payload.get("task", {}).items() if k not in ("finetune", "optimized_metric")}
    payload["trainer"] = {k: v for k, v in payload.get("trainer", {}).items() if k not in TRAINER_DISPLAY}
    for group in ("data", "model"):
        payload[group] = {k: {"files": fingerprint(Path(v))} if isinstance(v, str) and v and Path(v).exists() else v
                          for k, v in payload.get(group, {}).items() if k != "missing_hint"}
    payload["versions"] = dict(versions)
    return payload


@dataclass
class Entry:
    """A stage product: ``path`` holds its files; ``reused`` is False when this job built it."""

    stage: str
    key: str
    path: Path
    reused: bool

    def record(self) -> dict[str, Any]:
        return {"status": "reused" if self.reused else "ran", "key": self.key, "entry": str(self.path)}


class StageCache:
    """``fetch(stage, payload, build)``: the entry for ``payload``, built by ``build(folder)`` when missing.

    ``root`` None (``cache.enabled=false``): nothing is shared; products are built into ``<run_dir>/stages/<stage>/``
    and loaded from there, the same way. ``run_dir`` holds the rank-zero decisions that other DDP ranks follow.
    """

    def __init__(self, root: Optional[Path], run_dir: Path) -> None:
        self.root = Path(root) / "stages" if root is not None else None
        self.run_dir = Path(run_dir)
        self.rank = global_rank()

    def fetch(self, stage: str, payload: dict[str, Any], build: Callable[[Optional[Path]], None]) -> Entry:
        """``build(folder)`` writes the product's files into ``folder`` (rank zero) or gets ``None`` (other ranks:
        take part in the computation, write nothing). Returns the entry every rank then loads from."""
        key = key_of(payload)
        if self.root is None:
            final = self.run_dir / "stages" / stage
            if self.rank == 0:
                if final.exists():
                    raise APError(f"{final} already exists; choose a new output directory (hydra.run.dir=...)")
                self._build(stage, key, payload, build, final)
            else:
                build(None)
                self._wait_for(final)
            return Entry(stage, key, final, reused=False)
        final = self.root / stage / key
        if self.rank != 0:
            return self._follow(stage, key, final, build)
        try:
            entry = self._fetch_as_rank_zero(stage, key, payload, build, final)
        except BaseException:
            self._decide(stage, key, "failed")  # the other ranks stop instead of waiting
            raise
        verify(final)
        return entry

    def _fetch_as_rank_zero(self, stage: str, key: str, payload: dict[str, Any],
                            build: Callable[[Optional[Path]], None], final: Path) -> Entry:
        if (final / MARKER).is_file():
            self._decide(stage, key, "reuse")
            return Entry(stage, key, final, reused=True)
        (final.parent / ".locks").mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(final.parent / ".locks" / f"{key}.lock"))
        try:
            lock.acquire(timeout=1)
        except Timeout:
            log.info(f"Stage {stage}: waiting for another job building {final}")
            lock.acquire()
        try:
            if (final / MARKER).is_file():  # another job built it while we waited
                self._decide(stage, key, "reuse")
                return Entry(stage, key, final, reused=True)
            for stale in (final.parent / ".tmp").glob(f"{key}-*"):  # of killed builders (we hold the lock)
                if builder_is_dead(stale.name, key):
                    shutil.rmtree(stale, ignore_errors=True)
                else:  # (a lock that does not span nodes: another node may be building it right now)
                    log.info(f"Stage {stage}: leaving {stale}, its builder may be alive on another node")
            if final.exists():
                raise APError(f"stage cache folder {final} exists without {MARKER} (an unfinished or foreign "
                              f"entry); delete it to recompute it")
            self._decide(stage, key, "build")
            self._build(stage, key, payload, build, final)
            return Entry(stage, key, final, reused=False)
        finally:
            lock.release()

    # --- internals ---------------------------------------------------------------------------------------------
    def _build(self, stage: str, key: str, payload: dict[str, Any], build: Callable[[Optional[Path]], None],
               final: Path) -> None:
        tmp = final.parent / ".tmp" / f"{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MARKER).write_text(json.dumps({"stage": stage, "key": key, "files": files, "payload": payload,
                                                  "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                  "run_dir": str(self.run_dir)}, indent=1, default=str))
            try:
                os.replace(tmp, final)  # atomic: the entry appears complete or not at all
            except OSError as e:
                if not (final / MARKER).is_file():  # (built twice: a file system whose locks do not span nodes)
                    raise APError(f"could not move the built {stage} entry to {final} ({e}); delete {final} if it "
                                  f"is incomplete") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _decision_file(self, stage: str) -> Path:
        return self.run_dir / ".stage_decisions" / stage

    def _decide(self, stage: str, key: str, what: str) -> None:
        """Rank zero: record ``build``/``reuse``/``failed`` of ``key`` for the other ranks of this attempt."""
        path = self._decision_file(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".part").write_text(f"{what} {key} {attempt_id()}")
        os.replace(path.with_suffix(".part"), path)

    def _follow(self, stage: str, key: str, final: Path, build: Callable[[Optional[Path]], None]) -> Entry:
        """Ranks > 0: wait for rank zero's decision of this attempt; build along (writing nothing) or reuse."""
        path, t0, attempt = self._decision_file(stage), time.monotonic(), attempt_id()
        while True:
            words = path.read_text().split() if path.is_file() else []
            if len(words) == 3 and words[2] == attempt:
                break
            if time.monotonic() - t0 > WAIT_S:
                raise APError(f"rank {self.rank}: no decision from rank zero on the {stage} stage in {path}")
            time.sleep(0.05)
        what, theirs = words[0], words[1]
        if what == "failed":
            raise APError(f"rank {self.rank}: rank zero failed in the {stage} stage")
        if theirs != key:
            raise APError(f"rank {self.rank}: its {stage} cache key {key} differs from rank zero's {theirs} (data or "
                          f"model files that differ between nodes?)")
        if what == "build":
            build(None)
        self._wait_for(final)
        verify(final)
        return Entry(stage, key, final, reused=what == "reuse")

    def _wait_for(self, final: Path) -> None:
        t0 = time.monotonic()
        while not (final / MARKER).is_file():
            if time.monotonic() - t0 > WAIT_S:
                raise APError(f"rank {self.rank}: rank zero did not complete {final}")
            time.sleep(0.05)


def verify(entry: Path) -> dict[str, Any]:
    """The entry's marker, after checking every file against its sha256 (``APError`` naming the folder if not)."""
    fix = f"delete {entry} to recompute it"
    try:
        marker = json.loads((entry / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError) as e:
        raise APError(f"corrupt stage cache entry {entry} (unreadable {MARKER}: {type(e).__name__}); {fix}") from None
    for name, digest in files.items():
        path = entry / name
        if not path.is_file():
            raise APError(f"corrupt stage cache entry {entry}: {name} is missing; {fix}")
        if sha256_file(path) != digest:
            raise APError(f"corrupt stage cache entry {entry}: {name} differs from when it was written; {fix}")
    return marker
