"""Content-addressed cache of pipeline stages shared by runs (DESIGN §9).

A stage's product (dense weights and metrics, the dense+ft baseline's metrics, calibration statistics) lives in
``<cache_dir>/stages/<stage>/<key>/`` where ``<key>`` hashes exactly the resolved config that determines it, so any
job (a plain ``-m`` sweep, parallel joblib workers, SLURM array tasks, DDP ranks) that needs the same product reuses it.

- **Keys** are built by leaving out what cannot change the product (``dense_payload``): a forgotten key costs a miss,
  never a wrong hit. Data paths are replaced by a fingerprint of the files below them; versions of ap and torch are in.
- **Atomic entries**: an entry is built in ``<stage>/.tmp/``, gets ``entry.json`` (the payload it hashes and the
  sha256 of every file), and is renamed into place. A job killed while building leaves no entry.
- **One builder**: jobs that miss the same entry wait on a ``filelock.FileLock`` (``<stage>/.locks/<key>.lock``); the first builds it, the others
  reuse it. Every job, builder or not, then loads the product from the entry, so a result never depends on hit or miss.
- **DDP**: the rank-zero process decides (lock, hit or build) and writes its decision to the run directory; other
  ranks never lock (a child waiting on its parent's lock deadlocks): they follow that decision, taking part in the
  build (collectives) without writing, then load the entry.
- **Corrupt entries** fail loudly (``APError`` naming the folder to delete), never rebuilt over silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock

from ap.core.errors import APError

MARKER = "entry.json"
# Top-level config keys that never change a stage's product: pruning and fine-tuning settings are added back by the
# stages that depend on them (ap/stages.py), the rest is bookkeeping.
NOT_PRODUCT = ("pruning", "logger", "paths", "hydra", "ckpt_path", "dense_finetune_baseline", "cache",
               "optimized_metric")
TRAINER_DISPLAY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir")
WAIT_S = float(os.environ.get("AP_CACHE_WAIT_S", 24 * 3600))  # how long a DDP rank waits for rank zero's entry


def global_rank() -> int:
    """This process's global rank as launchers announce it in the environment (0 outside distributed runs):
    ``RANK`` (torchrun), ``SLURM_PROCID``, or Lightning's ``NODE_RANK``/``LOCAL_RANK`` for the ranks it starts."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    local, node = int(os.environ.get("LOCAL_RANK") or 0), int(os.environ.get("NODE_RANK") or 0)
    return local + node * 1000  # (only "zero or not" matters here)


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


def dense_payload(config: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
    """What determines the dense model: the resolved config minus ``NOT_PRODUCT``, ``task.finetune`` and display-only
    trainer keys, with data paths replaced by fingerprints of their files, plus ``versions``."""
    payload = {k: v for k, v in config.items() if k not in NOT_PRODUCT}
    payload["task"] = {k: v for k, v in payload.get("task", {}).items() if k not in ("finetune", "optimized_metric")}
    payload["trainer"] = {k: v for k, v in payload.get("trainer", {}).items() if k not in TRAINER_DISPLAY}
    data = {k: v for k, v in payload.get("data", {}).items() if k != "missing_hint"}
    for k, v in data.items():
        if isinstance(v, str) and v and Path(v).exists():
            data[k] = {"files": fingerprint(Path(v))}  # the location is not the content
    payload["data"] = data
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
        if (final / MARKER).is_file():
            entry = Entry(stage, key, final, reused=True)
        else:
            (final.parent / ".locks").mkdir(parents=True, exist_ok=True)
            with FileLock(str(final.parent / ".locks" / f"{key}.lock")):
                if (final / MARKER).is_file():  # another job built it while we waited
                    entry = Entry(stage, key, final, reused=True)
                else:
                    self._decide(stage, key, "build")
                    self._build(stage, key, payload, build, final)
                    entry = Entry(stage, key, final, reused=False)
        if entry.reused:
            self._decide(stage, key, "reuse")
        verify(final)
        return entry

    # --- internals ---------------------------------------------------------------------------------------------
    def _build(self, stage: str, key: str, payload: dict[str, Any], build: Callable[[Optional[Path]], None],
               final: Path) -> None:
        tmp = final.parent / ".tmp" / f"{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MARKER).write_text(json.dumps({"stage": stage, "key": key, "files": files, "payload": payload,
                                                  "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                  "run_dir": str(self.run_dir)}, indent=1, default=str))
            os.replace(tmp, final)  # atomic: the entry appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _decision_file(self, stage: str) -> Path:
        return self.run_dir / ".stage_decisions" / stage

    def _decide(self, stage: str, key: str, what: str) -> None:
        """Rank zero: record ``build``/``reuse`` of ``key`` for the other ranks of this run (if any)."""
        path = self._decision_file(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".part").write_text(f"{what} {key}")
        os.replace(path.with_suffix(".part"), path)

    def _follow(self, stage: str, key: str, final: Path, build: Callable[[Optional[Path]], None]) -> Entry:
        """Ranks > 0: wait for rank zero's decision on ``key``; build along (writing nothing) or reuse."""
        path, t0 = self._decision_file(stage), time.monotonic()
        while not (path.is_file() and path.read_text().split()[-1] == key):
            if time.monotonic() - t0 > WAIT_S:
                raise APError(f"rank {self.rank}: no decision from rank zero on the {stage} stage in {path}")
            time.sleep(0.05)
        what = path.read_text().split()[0]
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
