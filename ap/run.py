"""``run.py``'s entry points: ``run`` (one job, every stage it asks for) and ``cli_main`` (the command line)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ap.core import APError
from ap.pipeline import finish_wandb, run_stages

# One Trainer per stage would repeat Lightning's banner (accelerator, tips) four times; keep its warnings.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning 2.6 + torch 2.13
log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage the config asks for; returns (and writes) the results dict.

    The wandb run (``logger=wandb``) is finished at the end of the job, so the next job of a local multirun starts its
    own run instead of logging into this one.
    """
    try:
        results = run_stages(cfg)
    except BaseException:
        finish_wandb(exit_code=1)  # the stage that failed shows as failed
        raise
    finish_wandb()
    return results


def cli_main(cfg: DictConfig) -> float | list[float]:
    """``run`` for the command line: user errors become one line on stderr and exit code 2. Returns what Hydra
    sweepers optimise: ``task.optimized_metric``, a final metric (``val/ppl``) or a top-level number of the results
    (``sparsity_achieved``), or a list of them for a multi-objective search (``[val/ppl, sparsity_achieved]``)."""
    try:
        results = run(cfg)
    except APError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    link_latest()  # after the run: a command reading outputs/latest/... reads the run before it
    names = cfg.task.optimized_metric or next((k for k in results["metrics"] if k.startswith("val/")), None)
    if OmegaConf.is_list(names):
        return [objective(results, n) for n in names]
    return objective(results, names)


def link_latest() -> Optional[Path]:
    """Point ``outputs/latest`` at this finished run's folder (``multirun/latest`` at its sweep's), so the newest
    results are one path to paste. Only for relative run/sweep folders (the first folder of the path gets the link)
    and on rank zero; a ``latest`` that is not a link is left alone. Returns the link, or None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    hc = HydraConfig.get()
    folder = Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir)
    configured = Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)
    if configured.is_absolute() or len(configured.parts) < 2:
        return None
    return update_link(Path(configured.parts[0]) / "latest", folder)


def update_link(link: Path, target: Path) -> Optional[Path]:
    """Atomically make ``link`` a relative symlink to ``target``; None (and a log line) where that is not possible."""
    if link.exists() and not link.is_symlink():
        log.info("Not linking %s to this run: it exists and is not a link", link)
        return None
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()), target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:  # e.g. a file system without symlinks
        tmp.unlink(missing_ok=True)
        log.info("Could not link %s to this run: %s", link, e)
        return None
    return link


def objective(results: dict[str, Any], name: Optional[str]) -> float:
    value = results["metrics"].get(name, results.get(name)) if name else None
    return float("nan") if value is None else float(value)

