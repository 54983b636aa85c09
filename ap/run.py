"""``run.py``'s entry points: ``run`` (one job, every stage it asks for) and ``cli_main`` (the command line)."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ap.core import APError
from ap.pipeline import finish_wandb, run_stages

# One Trainer per stage would repeat Lightning's banner (accelerator, tips) four times; keep its warnings.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning 2.6 + torch 2.13


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
    names = cfg.task.optimized_metric or next((k for k in results["metrics"] if k.startswith("val/")), None)
    if OmegaConf.is_list(names):
        return [objective(results, n) for n in names]
    return objective(results, names)


def objective(results: dict[str, Any], name: Optional[str]) -> float:
    value = results["metrics"].get(name, results.get(name)) if name else None
    return float("nan") if value is None else float(value)


log = logging.getLogger(__name__)
