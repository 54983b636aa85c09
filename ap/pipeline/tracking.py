"""The wandb lifecycle: one wandb run per job, finished at the end of the job; results as a summary."""

from __future__ import annotations

import sys
from typing import Optional

from ap.config import resolved

from .state import RunState


def finish_wandb(exit_code: Optional[int] = None) -> None:
    """End the current wandb run, if any (the next stage or job starts its own); ``exit_code=1`` marks it failed."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def log_results_to_wandb(s: RunState) -> None:
    """``logger=wandb``: one more run of the job's group (``job_type=results``) with the results as its summary, the
    results table, masks.pt as an artifact (type ``ap-masks``) and the mask heatmaps as images."""
    node = s.cfg.logger.get("wandb")
    if node is None:
        return
    import wandb

    finish_wandb()
    skip = ("name", "save_dir", "offline", "log_model", "prefix", "job_type")  # WandbLogger's own, or set here
    kwargs = {k: v for k, v in resolved(node).items() if not k.startswith("_") and k not in skip}
    run = wandb.init(**kwargs, name=f"{node.name}/results", job_type="results", dir=node.save_dir,
                     mode="offline" if node.get("offline") else None, config=resolved(s.cfg))
    flat = {f"{group}/{k}": v for group in ("dense_metrics", "dense_finetuned_metrics",
                                            "pruned_before_finetune_metrics", "metrics")
            for k, v in s.results.get(group, {}).items()}
    run.summary.update({**flat, "sparsity_achieved": s.results.get("sparsity_achieved", 0.0)})
    masks = s.out / "masks.pt"
    if masks.is_file():
        artifact = wandb.Artifact(f"masks-{s.cfg.task.name}-{s.pruning.name}", type="ap-masks",
                                  metadata={"sparsity_achieved": s.results.get("sparsity_achieved")})
        artifact.add_file(str(masks))
        run.log_artifact(artifact)
    heatmaps = sorted((s.out / "heatmaps").glob("*.png"))
    if heatmaps:
        run.log({"heatmaps": [wandb.Image(str(p), caption=p.stem) for p in heatmaps]})
    run.finish()
