"""Loading dense weights and checkpoints, and checking user files (masks, statistics, checkpoints) before any stage runs."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ap.callback import AttentionPruning
from ap.config import PruningConfig
from ap.core import APError, AttentionStats, MaskSet
from ap.core.files import load_user_file


CKPT = ("a Lightning checkpoint of an ap run (<run_dir>/checkpoints/<stage>/last.ckpt) or the model.pt of a dense "
        "stage cache entry")


def load_checkpoint(path: str, key: str, module: pl.LightningModule) -> dict[str, Any]:
    """A checkpoint a user named (``key``), checked against ``module`` before anything runs."""
    ckpt = load_user_file(path, key, CKPT)
    if key == "pruning.dense_ckpt" and isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}  # a bare state_dict: the model.pt of a dense stage cache entry
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise APError(f"{key}={path} is not {CKPT}: it has no state_dict")
    check_state_dict(ckpt["state_dict"], module, f"{key}={path}")
    return ckpt


def check_state_dict(state: dict[str, Any], module: pl.LightningModule, source: str) -> None:
    """Raise ``APError`` naming the first difference if ``state`` was not saved from a model like ``module``'s."""
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise APError(f"{source} was saved from another model: it lacks {name!r}")
        got = state[name]
        if getattr(got, "shape", None) != tensor.shape:
            raise APError(f"{source} was saved from another model: {name!r} is {tuple(getattr(got, 'shape', ()))} "
                          f"there, {tuple(tensor.shape)} here (model or data config differ)")
    extra = [n for n in state if n not in expected]
    if extra:
        raise APError(f"{source} was saved from another model: it has {extra[0]!r}, this model has not")


def check_user_files(cfg: DictConfig, pruning: PruningConfig, module: pl.LightningModule,
                     callback: Optional[AttentionPruning]) -> None:
    """Fail before any training if a file the config names cannot be read or was made for another model/config."""
    if pruning.masks_path:
        MaskSet.load(pruning.masks_path).validate(module.model)
    if pruning.stats_path:
        AttentionStats.load(pruning.stats_path).validate(module.model, source=f"statistics {pruning.stats_path}")
    if cfg.ckpt_path:  # (pruning.dense_ckpt is loaded, and so checked, before any stage runs)
        state = restored_callback_state(load_checkpoint(cfg.ckpt_path, "ckpt_path", module))
        if callback is None and state:
            raise APError(f"ckpt_path={cfg.ckpt_path} is a fine-tune checkpoint of a pruning run "
                          f"({state['masks']['meta'].get('policy')}); resume it with its pruning config")
        if callback is not None:
            if not state:
                raise APError(f"ckpt_path={cfg.ckpt_path} holds no AP masks: resume a pruning run from its "
                              f"checkpoints/finetune/last.ckpt, or start from dense weights with pruning.dense_ckpt")
            callback.load_state_dict(state)  # checks the masks' pruning settings against this run's
            callback.masks.validate(module.model)


def restored_callback_state(ckpt: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``AttentionPruning`` state saved in a Lightning checkpoint (None if it has none)."""
    return next((s for k, s in (ckpt.get("callbacks") or {}).items()
                 if k.startswith(AttentionPruning.__qualname__) and s), None)
