"""What the stage cache keys hold: the settings each product depends on, ap's source and library versions."""

from __future__ import annotations

import functools
import hashlib
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

import ap
from ap.config import PruningConfig, resolved

from .cache import CALIBRATION_READS, dense_payload, file_settings, fingerprint, split_eval


NOT_COMPUTING = ("collect/", "report.py")  # modules (packages: "x/") of ap that compute no stage product: not hashed


def versions(cfg: Optional[DictConfig] = None) -> dict[str, Any]:
    """What else determines every product: ap's own source (any edit of a module that computes products is a miss),
    the versions of the libraries that compute it, and, for a trainer that may use GPUs, how many there are."""
    from importlib import metadata

    libs = {}
    for name in ("torch", "pytorch-lightning", "transformers", "fairseq-fixed"):
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out = {"ap": ap.__version__, "ap_source": _source_hash(), **libs}
    if cfg is None or str(cfg.trainer.get("accelerator", "auto")) != "cpu":
        out["cuda_devices"] = torch.cuda.device_count()
    return out


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    h = hashlib.sha256()
    root = Path(ap.__file__).parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not any(rel == n or (n.endswith("/") and rel.startswith(n)) for n in NOT_COMPUTING):
            h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def model_source(name_or_path: str) -> dict[str, Any]:
    """What a model name stands for: a ``pkg://`` model's package version, a hub model's cached revision (none
    cached: a key that never repeats, so an unknown revision is a miss, never a wrong hit); local folders are
    fingerprinted with the rest of the model config."""
    from importlib import metadata

    if name_or_path.startswith("pkg://"):
        package = name_or_path.removeprefix("pkg://").split("/")[0]
        dists = metadata.packages_distributions().get(package, [package])
        try:
            return {"package": package, "version": metadata.version(dists[0])}
        except metadata.PackageNotFoundError:
            return {"package": package, "version": None}
    if Path(name_or_path).exists():
        return {}
    try:
        from huggingface_hub import snapshot_download

        return {"hub_revision": Path(snapshot_download(name_or_path, local_files_only=True)).name}
    except Exception:  # noqa: BLE001 (not installed, not cached, not a hub name)
        return {"hub_revision": f"unknown-{uuid.uuid4().hex}"}


def dense_identity(cfg: DictConfig, pruning: PruningConfig, pretrained: bool = False) -> dict[str, Any]:
    """The cache payload of the dense weights: the config that trains them (``cache.dense_payload``; a pretrained
    model is not trained, so its attention backend is an evaluation setting), with the fingerprint of
    ``pruning.dense_ckpt`` when weights are given, what the model name stands for (``model_source``) and, for GLUE,
    only the task's own folder of the data."""
    payload = dense_payload(resolved(cfg), versions(cfg), eval_only=("model.backend",) if pretrained else ())
    if pruning.dense_ckpt:
        payload["dense_ckpt"] = fingerprint(Path(pruning.dense_ckpt))
    if cfg.model.get("name_or_path"):
        payload["model_source"] = model_source(str(cfg.model.name_or_path))
    if cfg.task.type == "glue" and isinstance(payload["data"].get("dir"), dict):
        from ap.data.glue import TASKS

        folder = Path(cfg.data.dir) / TASKS[cfg.task.name].folder
        payload["data"]["dir"] = {"files": fingerprint(folder) if folder.exists() else None}
    return payload


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """What evaluation reads beyond the weights: the ``EVAL_ONLY`` settings (files by content) and the backend."""
    return file_settings(split_eval(resolved(cfg), ("model.backend",))[1])


def dense_eval_payload(cfg: DictConfig, dense_key: str) -> dict[str, Any]:
    """The dense model's metrics: its weights evaluated with this run's evaluation settings."""
    return {"dense": dense_key, "eval": eval_settings(cfg), "versions": versions(cfg)}


def dense_ft_payload(cfg: DictConfig, dense_key: str) -> dict[str, Any]:
    """The dense+ft baseline's metrics: the dense weights fine-tuned with ``task.finetune`` (seed, trainer: in the
    dense key; the backend: in the evaluation settings), evaluated with this run's evaluation settings."""
    return {"dense": dense_key, "finetune": resolved(cfg.task.finetune), "eval": eval_settings(cfg),
            "versions": versions(cfg)}


def calibration_payload(cfg: DictConfig, pruning: PruningConfig, dense_key: str) -> dict[str, Any]:
    """Calibration statistics: the dense weights, one (capped) epoch of the train split (data, order and trainer
    limits: in the dense key) in batches of the evaluation batch size (``CALIBRATION_READS``). Sparsity, policy,
    scope, kinds and block size only threshold them: not in the key; nor the backend (calibration runs eager)."""
    reads = {k: v for k, v in split_eval(resolved(cfg))[1].items() if k in CALIBRATION_READS}
    return {"dense": dense_key, "calibration_batches": pruning.calibration_batches, "reads": reads,
            "versions": versions(cfg), "tile": pruning.block_size if pruning.tiled else 0}
