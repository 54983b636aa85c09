"""Collect the ``results.json`` of many runs (a sweep's ``multirun/<time>/``, or single runs under ``outputs/``) into
tables and plots.

    python scripts/collect_results.py multirun/2026-11-25_17-00-00 [more folders] [--out DIR] [--paper FILE|none]
    python -m ap.collect ...                                                  # the same

Writes to ``--out`` (default ``<first folder>/collected``), overwriting an earlier collect there:

``runs.csv``
    one row per run: ``task``, ``task_name``, ``model``, ``seed``, ``policy``, ``pruning`` (label), ``target``
    (pruning.sparsity) and ``target/<kind>`` (pruning.kind_sparsity), ``kinds``, ``scope``, ``block_size``, ``reinit``,
    ``experiment`` (the preset, from the run's ``.hydra/hydra.yaml``; left out when no run has one);
    the achieved ``sparsity`` and ``sparsity/<kind>``; metrics after fine-tuning (``val/ppl``), before it
    (``pre/val/ppl``), of the dense model (``dense/val/ppl``) and of the dense+ft baseline (``dense_ft/val/ppl``);
    seconds per stage (``time/<stage>``); ``stage/<name>`` = ran | reused | given | skipped; any other config key that
    differs between runs which would otherwise be averaged together (dotted, e.g. ``model.n_layers``; input files and
    folders such as ``data.dir`` or ``pruning.dense_ckpt`` as ``<name>~<6 hex of the path>``); ``copy`` when runs
    share every setting and a seed (never averaged: a row each, with a warning); overrides; run.
``failed.csv``
    run folders (``.hydra/config.yaml``, written when a job starts) without a readable ``results.json``: ``status``,
    ``error``, the job's ``overrides`` and the last line of its ``run.log``.
``summary.csv``
    mean, std and n over seeds of every value column per setting (the ``runs.csv`` columns above that are no
    measurement, except seed and run): ``<column>_mean``, ``<column>_std``, ``n``, ``seeds``.
``summary.md``
    the same as "mean ± std" tables, one per ``task_name`` (loss and time columns left out), each followed by AP
    against the other policies at each target sparsity and, for runs of a preset ``experiments/paper_results.yaml``
    names, the paper's values (a ``paper <metric>`` column, a list with sources) and claims (with the highest target
    at which our AP keeps the claim's quality); then the runs without results. The CLI prints it.
``curve_<task_name>_<metric>.png``
    each metric (not loss) against achieved sparsity: one line per policy (mean ± std over seeds), solid after
    fine-tuning, dashed before it; dense and dense+ft as horizontal lines per model variant; the paper's points as
    stars and its
    claimed sparsity as a vertical line (paper presets).
"""

from .cli import log_to_wandb, main, write_report
from .paper import PAPER_RESULTS, BadPaperResults, load_paper_results, paper_for
from .plots import plot_curves
from .runs import NoResults, load_runs, path_label, setting_columns, value_columns
from .summary import markdown, summarize

__all__ = [
    "PAPER_RESULTS", "BadPaperResults", "NoResults", "load_paper_results", "load_runs", "log_to_wandb", "main",
    "markdown", "paper_for", "path_label", "plot_curves", "setting_columns", "summarize", "value_columns",
    "write_report",
]
