"""The experiment pipeline behind ``run.py`` (docs/design.md), one function per stage in ``stages``:

    dense ─► evaluate dense ─► [dense+ft baseline] ─► calibrate ─► threshold ─► evaluate pruned (no fine-tuning)
          ─► finetune with masks ─► evaluate ─► results.json

``pruning=none`` stops after the dense stage. The dense weights, the dense+ft baseline and the calibration statistics
come from the stage cache (``cache``, ``cache.enabled``) when another run made them with the same settings.
``ckpt_path`` resumes the training stage (the fine-tune stage when pruning, with the masks and the metrics of the
stages before it restored from the checkpoint); ``pruning.dense_ckpt`` starts from saved dense weights. With
``pruning.reinit=true`` (train the pruned model from scratch) the baseline is the dense model itself, trained for
``task.dense.max_steps``; otherwise the dense model fine-tuned without masks for the same steps (``dense+ft``).
results.json says which (``baseline``).
"""

from .cache import StageCache
from .checkpoints import check_user_files, load_checkpoint
from .keys import versions
from .runner import run_stages, write_results
from .state import CARRIED, RunState
from .tracking import finish_wandb
from .trainers import evaluate, make_trainer, stage_loggers

__all__ = [
    "CARRIED", "RunState", "StageCache", "check_user_files", "evaluate", "finish_wandb", "load_checkpoint",
    "make_trainer", "run_stages", "stage_loggers", "versions", "write_results",
]
