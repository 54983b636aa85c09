"""Run folders → one ``runs.csv`` row per run (``load_runs``) and the columns that make a setting."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd
import yaml


# columns that say which setting a run belongs to (with the seed and the run, the rest are measurements)
SETTING = ["task", "task_name", "experiment", "model", "policy", "pruning", "target", "kinds", "scope", "block_size",
           "reinit", "finetune"]


# metric dicts of results.json -> column prefix
METRIC_SOURCES = {"metrics": "", "pruned_before_finetune_metrics": "pre/", "dense_metrics": "dense/",
                  "dense_finetuned_metrics": "dense_ft/"}


VALUE_PREFIXES = ("pre/", "dense/", "dense_ft/", "sparsity", "time/")


# config keys that never make two runs different settings: the seed, where this run's files go, logging, the stage
# cache. Input files and folders (data, checkpoints, masks, statistics, models) are settings: PATH_CONFIG values are
# shown by a short, stable label (``path_label``).
IGNORED_CONFIG = re.compile(r"^(seed|ckpt_path|dense_finetune_baseline|pruning\.(seed|name|heatmaps)|paths\..*|"
                            r"logger\..*|cache\..*|trainer\.(enable_progress_bar|log_every_n_steps)|"
                            r"data\.num_workers)$")


PATH_CONFIG = re.compile(r"(_path|_ckpt|_dir|\.dir|\.checkpoint|_files\.\w+)$")


class NoResults(Exception):
    """No results.json below the folders."""


def load_runs(folders: Iterable[Path | str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every run below ``folders``: (one row per readable ``results.json``, one row per run without one).

    A run folder is one holding ``results.json`` or ``.hydra/config.yaml``; an unreadable ``results.json`` is listed
    with the failed runs, with its error.
    """
    rows, failed, configs = [], [], []
    for run_dir in run_dirs(folders):
        path = run_dir / "results.json"
        info = {"run": _shown(run_dir), "overrides": _overrides(run_dir)}
        if not path.exists():
            failed.append({**info, "status": "no results.json", "error": "", "log_tail": _log_tail(run_dir)})
            continue
        try:
            results = json.loads(path.read_text())
            if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
                raise ValueError("no 'metrics' dict in it")
            row, config = _row(results), _flatten(results.get("config") or {})
        except (OSError, ValueError, TypeError, AttributeError) as e:  # (JSONDecodeError is a ValueError)
            failed.append({**info, "status": "unreadable results.json", "error": f"{type(e).__name__}: {e}",
                           "log_tail": _log_tail(run_dir)})
            continue
        rows.append({**row, "experiment": _experiment(run_dir), **info})
        configs.append(config)
    runs = pd.DataFrame(rows)
    if not runs.empty and runs["experiment"].isna().all():
        runs = runs.drop(columns="experiment")
    if not runs.empty:
        runs = _with_differing_config(runs, pd.DataFrame(configs, index=runs.index))
        runs = _copies_of_a_seed(runs)
        runs = runs[ordered_columns(runs.columns)].sort_values(["task", "task_name", "model", "policy", "target", "pruning",
                                                         "seed"], na_position="first", kind="stable")
    failed = pd.DataFrame(failed, columns=["run", "status", "error", "overrides", "log_tail"])
    return runs.reset_index(drop=True), failed


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """The columns that identify a setting (everything a mean over seeds keeps apart)."""
    return [c for c in runs.columns if c in SETTING or c == "copy" or c.startswith("target/")
            or "." in c and "/" not in c]


def value_columns(runs: pd.DataFrame) -> list[str]:
    """The measured columns: achieved sparsity, metrics, stage times."""
    keys = setting_columns(runs)
    return [c for c in runs.columns if c not in keys and c not in ("seed", "baseline", "run", "overrides")
            and not c.startswith("stage/") and pd.api.types.is_numeric_dtype(runs[c])]


def path_label(value: Any) -> Any:
    """A file or folder setting as ``<name>~<6 hex of the whole path>``: short, and the same path always gives the
    same label (two folders of one name stay apart)."""
    if not isinstance(value, str) or not value:
        return value
    return f"{Path(value.rstrip('/')).name or value}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def run_dirs(folders: Iterable[Path | str]) -> list[Path]:
    found: dict[Path, None] = {}
    for folder in map(Path, folders):
        for path in [*folder.rglob("results.json"), *folder.rglob(".hydra/config.yaml")]:
            run_dir = path.parent if path.name == "results.json" else path.parent.parent
            found.setdefault(run_dir.resolve(), None)
    return sorted(found)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    """The runs.csv row of one results.json (older files lack some keys)."""
    cfg = r.get("config") or {}
    pruning_cfg, label = cfg.get("pruning") or {}, r.get("pruning")
    policy = pruning_cfg.get("policy") or (re.sub(r"\d+$", "", label) if label else None)
    row: dict[str, Any] = {
        "task": r.get("task") or (cfg.get("task") or {}).get("type"),
        "task_name": r.get("task_name") or (cfg.get("task") or {}).get("name") or (cfg.get("data") or {}).get("name"),
        "model": _model_name(cfg.get("model") or {}), "seed": cfg.get("seed"), "policy": policy, "pruning": label,
        "target": 0.0 if policy == "none" else pruning_cfg.get("sparsity"),
        "kinds": _kinds(pruning_cfg.get("kinds"), r.get("sparsity_per_kind")) if policy != "none" else None,
        "scope": pruning_cfg.get("scope") if policy != "none" else None,
        "block_size": pruning_cfg.get("block_size") if policy != "none" else None,
        "reinit": pruning_cfg.get("reinit") if policy != "none" else None,
        "finetune": r.get("finetune", pruning_cfg.get("finetune", True)) if policy != "none" else None,
        "baseline": r.get("baseline"),
    }
    row.update({f"target/{k}": v for k, v in (pruning_cfg.get("kind_sparsity") or {}).items() if v is not None})
    row["sparsity"] = r.get("sparsity_achieved")
    row.update({f"sparsity/{k}": v for k, v in (r.get("sparsity_per_kind") or {}).items()})
    for source, prefix in METRIC_SOURCES.items():
        row.update({prefix + k: v for k, v in (r.get(source) or {}).items()})
    row.update({f"time/{k.removesuffix('_s')}": v for k, v in (r.get("timing") or {}).items()})
    row.update({f"stage/{k}": (v or {}).get("status") for k, v in (r.get("stages") or {}).items()})
    return row


def _kinds(pruned: Optional[list[str]], present: Optional[dict[str, float]]) -> Optional[str]:
    """The attention kinds a run pruned that its model has (a causal LM has dec_self only, whatever the config
    lists); older results without per-kind sparsity: the config's list."""
    if not pruned:
        return None
    return ",".join(k for k in pruned if not present or k in present) or None


def _model_name(model: dict[str, Any]) -> Optional[str]:
    """A short readable name: an HF checkpoint's folder or package, a fairseq arch, or the LM's sizes."""
    if model.get("name_or_path"):
        name = str(model["name_or_path"])
        if name.startswith("pkg://"):
            return name.removeprefix("pkg://").split("/")[0]
        return Path(name.rstrip("/")).name
    if model.get("arch"):  # a fairseq architecture (and the LM's of older results)
        return str(model["arch"])
    # a model config class: TransformerXLConfig -> transformer_xl; the plain LM by its sizes
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", model.get("_target_", "").rsplit(".", 1)[-1].removesuffix("Config"))
    name = name.lower()
    if "n_layers" in model and name in ("", "transformer_lm"):
        return f"transformer_lm_L{model['n_layers']}_d{model.get('d_model')}"
    return name or None


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif not IGNORED_CONFIG.search(prefix + k):
            flat[prefix + k] = (json.dumps(v) if isinstance(v, (list, dict)) else
                                path_label(v) if PATH_CONFIG.search(prefix + k) else v)
    return flat


def _with_differing_config(runs: pd.DataFrame, config: pd.DataFrame) -> pd.DataFrame:
    """Add the config keys that differ within a setting other than by seed (else those runs would be averaged)."""
    keys = setting_columns(runs)
    differ = set()
    for _, index in runs.groupby(keys, dropna=False).groups.items():
        part = config.loc[index].astype(str)
        differ.update(part.columns[part.nunique(dropna=False) > 1])
    return runs.join(config[sorted(differ)]) if differ else runs


def _experiment(run_dir: Path) -> Optional[str]:
    """The ``experiment=`` preset the run was composed with (Hydra's ``runtime.choices``), or None."""
    path = run_dir / ".hydra" / "hydra.yaml"
    try:
        hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {} if path.is_file() else {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    choice = ((hydra.get("runtime") or {}).get("choices") or {}).get("experiment")
    return str(choice) if choice not in (None, "null") else None


def _shown(run_dir: Path) -> str:
    """A run folder as a table shows it: relative to the working directory when below it (tables stay portable)."""
    return str(run_dir.relative_to(Path.cwd().resolve())) if run_dir.is_relative_to(Path.cwd().resolve()) \
        else str(run_dir)


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        return " ".join(map(str, yaml.safe_load(path.read_text()) or [])) if path.exists() else ""
    except (OSError, yaml.YAMLError) as e:
        return f"(unreadable overrides.yaml: {e})"


def _log_tail(run_dir: Path) -> str:
    path = run_dir / "run.log"
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.exists() else []
    except OSError:
        return ""
    return lines[-1][-200:] if lines else ""


def seed_values(runs: pd.DataFrame, row: pd.Series, column: str) -> pd.Series:
    """``column`` of the runs behind summary ``row`` (those sharing its setting), per seed (NaN values dropped)."""
    match = pd.Series(True, index=runs.index)
    for key in setting_columns(runs):
        value = row.get(key)
        match &= runs[key].isna() if pd.isna(value) else runs[key].astype(object).eq(value)
    if column not in runs:
        return pd.Series(dtype=float)
    return runs[match].groupby("seed")[column].mean().dropna()


def _copies_of_a_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one setting with the same seed are no seeds of each other (a setting that tells them apart is not
    recorded, or a run was repeated): each gets its own ``copy`` number, so no row averages them, with a warning."""
    groups = runs.groupby([*setting_columns(runs), "seed"], dropna=False, sort=False)
    copy = groups.cumcount()
    if not copy.any():
        return runs
    for _, dup in groups:
        if len(dup) < 2:
            continue
        warnings.warn(f"collect: {len(dup)} runs share every setting and seed {dup['seed'].iloc[0]} "
                      f"({', '.join(dup['run'])}): not averaged, one row each (column copy)", stacklevel=2)
    return runs.assign(copy=copy)


def ordered_columns(columns: Iterable[str]) -> list[str]:
    """runs.csv column order: setting, seed, sparsity, metrics (val before test), pre/, dense/, dense_ft/, time/, ..."""
    def rank(c: str) -> tuple:
        if c in SETTING or c in ("seed", "baseline"):
            return (0, (SETTING + ["seed", "baseline"]).index(c), "")
        if c.startswith("target/"):
            return (1, 0, c)
        if c.startswith("sparsity"):
            return (2, c != "sparsity", c)
        for i, prefix in enumerate(("", "pre/", "dense/", "dense_ft/")):
            if c.count("/") == 1 + prefix.count("/") and c.startswith(prefix) and c.split("/")[-2] in ("val", "test"):
                return (3 + i, c.split("/")[-2] != "val", c)
        for i, prefix in enumerate(("time/", "stage/")):
            if c.startswith(prefix):
                return (7 + i, 0, c)
        return (9, ("overrides", "run").index(c) + 1 if c in ("overrides", "run") else 0, c)
    return sorted(columns, key=rank)


LOWER_IS_BETTER = ("ppl", "nll", "loss")


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1] in LOWER_IS_BETTER
