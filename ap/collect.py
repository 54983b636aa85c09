"""Collect the ``results.json`` of many runs (a sweep's ``multirun/<time>/``, or single runs under ``outputs/``) into
tables and plots.

    python scripts/collect_results.py multirun/2026-11-25_17-00-00 [more folders] [--out DIR]
    python -m ap.collect ...                                                  # the same

Writes to ``--out`` (default ``<first folder>/collected``), overwriting an earlier collect there:

``runs.csv``
    one row per run: ``task``, ``task_name``, ``model``, ``seed``, ``policy``, ``pruning`` (label), ``target``
    (pruning.sparsity) and ``target/<kind>`` (pruning.kind_sparsity), ``kinds``, ``scope``, ``block_size``, ``reinit``;
    the achieved ``sparsity`` and ``sparsity/<kind>``; metrics after fine-tuning (``val/ppl``), before it
    (``pre/val/ppl``), of the dense model (``dense/val/ppl``) and of the dense+ft baseline (``dense_ft/val/ppl``);
    seconds per stage (``time/<stage>``); ``stage/<name>`` = ran | reused | given | skipped; any other config key that
    differs between runs which would otherwise be averaged together (dotted, e.g. ``model.n_layers``); overrides; run.
``failed.csv``
    run folders (``.hydra/config.yaml``, written when a job starts) without a readable ``results.json``: ``status``,
    ``error``, the job's ``overrides`` and the last line of its ``run.log``.
``summary.csv``
    mean, std and n over seeds of every value column per setting (the ``runs.csv`` columns above that are no
    measurement, except seed and run): ``<column>_mean``, ``<column>_std``, ``n``, ``seeds``.
``summary.md``
    the same as "mean ± std" tables, one per ``task_name`` (loss and time columns left out), then the runs without
    results. The CLI prints it.
``curve_<task_name>_<metric>.png``
    each metric (not loss) against achieved sparsity: one line per policy (mean ± std over seeds), solid after
    fine-tuning, dashed before it; dense and dense+ft as horizontal lines.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pandas as pd
import yaml
from matplotlib.figure import Figure

# columns that say which setting a run belongs to (with the seed and the run, the rest are measurements)
SETTING = ["task", "task_name", "model", "policy", "pruning", "target", "kinds", "scope", "block_size", "reinit",
           "finetune"]
# metric dicts of results.json -> column prefix
METRIC_SOURCES = {"metrics": "", "pruned_before_finetune_metrics": "pre/", "dense_metrics": "dense/",
                  "dense_finetuned_metrics": "dense_ft/"}
VALUE_PREFIXES = ("pre/", "dense/", "dense_ft/", "sparsity", "time/")
# config keys that never make two runs different settings: the seed, where files go, logging, the stage cache
IGNORED_CONFIG = re.compile(r"^(seed|ckpt_path|dense_finetune_baseline|pruning\.(seed|name|heatmaps)|paths\..*|"
                            r"logger\..*|cache\..*|trainer\.(enable_progress_bar|log_every_n_steps)|"
                            r"data\.num_workers)$|(_path|_ckpt|_dir|\.dir)$")


class NoResults(Exception):
    """No results.json below the folders."""


def load_runs(folders: Iterable[Path | str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every run below ``folders``: (one row per readable ``results.json``, one row per run without one).

    A run folder is one holding ``results.json`` or ``.hydra/config.yaml``; an unreadable ``results.json`` is listed
    with the failed runs, with its error.
    """
    rows, failed, configs = [], [], []
    for run_dir in _run_dirs(folders):
        path = run_dir / "results.json"
        info = {"run": str(run_dir), "overrides": _overrides(run_dir)}
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
        rows.append({**row, **info})
        configs.append(config)
    runs = pd.DataFrame(rows)
    if not runs.empty:
        runs = _with_differing_config(runs, pd.DataFrame(configs, index=runs.index))
        runs = runs[_ordered(runs.columns)].sort_values(["task", "task_name", "model", "policy", "target", "pruning",
                                                         "seed"], na_position="first", kind="stable")
    failed = pd.DataFrame(failed, columns=["run", "status", "error", "overrides", "log_tail"])
    return runs.reset_index(drop=True), failed


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """The columns that identify a setting (everything a mean over seeds keeps apart)."""
    return [c for c in runs.columns if c in SETTING or c.startswith("target/") or "." in c and "/" not in c]


def value_columns(runs: pd.DataFrame) -> list[str]:
    """The measured columns: achieved sparsity, metrics, stage times."""
    keys = setting_columns(runs)
    return [c for c in runs.columns if c not in keys and c not in ("seed", "baseline", "run", "overrides")
            and not c.startswith("stage/") and pd.api.types.is_numeric_dtype(runs[c])]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (NaN for one run) and n of every value column over the seeds of each setting."""
    keys, values = setting_columns(runs), value_columns(runs)
    grouped = runs.groupby(keys, dropna=False, sort=False)
    stats = grouped[values].agg(["mean", "std"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    stats["n"] = grouped.size()
    stats["seeds"] = grouped["seed"].agg(lambda s: ",".join(str(int(x)) if pd.notna(x) else "?" for x in sorted(s)))
    return stats.reset_index()


def plot_curves(runs: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """One PNG per (task_name, metric): metric against achieved sparsity (see the module docstring); their paths."""
    out_dir, paths = Path(out_dir), []
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    pruned = summary[summary["policy"].fillna("none") != "none"]
    # a line per policy and any other setting that is no sparsity
    line_keys = [c for c in setting_columns(runs) if c not in ("task", "task_name", "pruning", "target")
                 and not c.startswith("target/")]
    for task_name, points in pruned.groupby("task_name", sort=True):
        here = runs[runs["task_name"] == task_name]
        for metric in _metrics(here):
            if points.get(f"{metric}_mean", pd.Series(dtype=float)).notna().sum() == 0:
                continue
            fig = Figure(figsize=(6.4, 4.4), layout="constrained")
            ax = fig.add_subplot()
            varying = [k for k in line_keys if k != "policy" and points[k].astype(str).nunique() > 1]
            for i, (key, line) in enumerate(points.groupby(line_keys, dropna=False, sort=True)):
                setting = dict(zip(line_keys, key))
                label = ", ".join([str(setting["policy"])] + [f"{k}={setting[k]}" for k in varying])
                line = line.sort_values("sparsity_mean")
                x, color = 100 * line["sparsity_mean"], f"C{i % 10}"
                ax.errorbar(x, line[f"{metric}_mean"], yerr=line[f"{metric}_std"].fillna(0), color=color, marker="o",
                            capsize=3, label=f"{label} (fine-tuned)")
                if f"pre/{metric}_mean" in line and line[f"pre/{metric}_mean"].notna().any():
                    ax.errorbar(x, line[f"pre/{metric}_mean"], yerr=line[f"pre/{metric}_std"].fillna(0), color=color,
                                marker="o", mfc="none", capsize=3, linestyle="--",
                                label=f"{label} (before fine-tuning)")
            for prefix, name, style in (("dense/", "dense", "-"), ("dense_ft/", "dense+ft", ":")):
                for model, value in _reference(here, prefix + metric).items():
                    ax.axhline(value, color="0.3", linestyle=style, linewidth=1,
                               label=name + (f" ({model})" if here["model"].nunique() > 1 else ""))
            ax.set(xlabel="achieved sparsity (% of attention entries pruned)", ylabel=metric,
                   title=f"{task_name}: {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            path = out_dir / f"curve_{_safe(task_name)}_{_safe(metric)}.png"
            fig.savefig(path, dpi=120)
            paths.append(path)
    return paths


def write_report(folders: Sequence[Path | str], out_dir: Optional[Path | str] = None) -> dict[str, Path]:
    """Load, summarise and plot the runs below ``folders`` into ``out_dir`` (default ``<first folder>/collected``).

    Returns ``{"runs", "failed", "summary_csv", "summary_md", <curve file stem>...: path}``; raises ``NoResults``.
    """
    runs, failed = load_runs(folders)
    if runs.empty:
        raise NoResults(f"no results.json below {', '.join(map(str, folders))}"
                        + (f" ({len(failed)} run folders without one, e.g. {failed['run'][0]})" if len(failed) else ""))
    out = Path(out_dir) if out_dir is not None else Path(folders[0]) / "collected"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    paths = {"runs": out / "runs.csv", "failed": out / "failed.csv", "summary_csv": out / "summary.csv",
             "summary_md": out / "summary.md"}
    runs.to_csv(paths["runs"], index=False)
    failed.to_csv(paths["failed"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text(markdown(summary, failed))
    paths.update({p.stem: p for p in plot_curves(runs, out)})
    return paths


def markdown(summary: pd.DataFrame, failed: pd.DataFrame) -> str:
    """``summary`` as "mean ± std" Markdown tables, one per task_name, and a section listing ``failed``."""
    parts = []
    for task_name, part in summary.groupby("task_name", dropna=False, sort=True):
        keys = setting_columns(summary)
        shown = [c for c in keys if c in ("pruning", "target") or part[c].astype(str).nunique() > 1]
        common = [f"{c}={part[c].iloc[0]}" for c in keys
                  if c not in shown and c != "task_name" and pd.notna(part[c].iloc[0])]
        table = part[shown].astype(object).where(part[shown].notna(), "")
        if "target" in table:
            table["target"] = [_mean_std(t, float("nan"), percent=True) for t in part["target"]]
        columns = [c.removesuffix("_mean") for c in part.columns if c.endswith("_mean") and part[c].notna().any()]
        kinds = [c for c in columns if c.startswith("sparsity/")]
        for col in columns:
            if col.endswith("loss") or col.startswith("time/") or (len(kinds) == 1 and col in kinds):
                continue  # (one kind: its sparsity is the overall one)
            percent = col.startswith("sparsity")
            table[col] = [_mean_std(m, s, percent) for m, s in zip(part[f"{col}_mean"], part[f"{col}_std"])]
        table["n"] = part["n"].astype(str)
        align = ["left" if c in shown and c != "target" else "right" for c in table.columns]
        parts.append(f"## {task_name}\n\n" + (f"All rows: {', '.join(common)}\n\n" if common else "")
                     + f"{table.to_markdown(index=False, disable_numparse=True, colalign=align)}\n")
    if len(failed):
        listing = failed[["run", "status", "error", "overrides"]].to_markdown(index=False, disable_numparse=True)
        parts.append(f"## Runs without results\n\n{listing}\n")
    return "\n".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="collect_results.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders searched for results.json (sweeps, outputs/)")
    parser.add_argument("--out", type=Path, help="output folder (default: <first folder>/collected)")
    parser.add_argument("--csv", type=Path, help="also write runs.csv to this file")
    parser.add_argument("--wandb", action="store_true",
                        help="log the summary table and the curves to wandb (a job_type=collect run in the runs' "
                             "group)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    try:
        if missing:
            raise NoResults(f"no results.json below {', '.join(missing)}: no such folder")
        paths = write_report(args.folders, args.out)
    except NoResults as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.csv:
        args.csv.write_text(paths["runs"].read_text())
    print(paths["summary_md"].read_text())
    print(f"written to {paths['runs'].parent}: " + ", ".join(p.name for p in paths.values()))
    if args.wandb:
        log_to_wandb(args.folders, paths)
    return 0


def log_to_wandb(folders: list[Path], paths: dict[str, Path]) -> None:
    """A ``job_type=collect`` wandb run in the group (and project) the runs logged to: summary table and curve PNGs."""
    import wandb

    settings = {}
    for run_dir in _run_dirs(folders):
        results = run_dir / "results.json"
        if results.is_file():
            node = ((json.loads(results.read_text()).get("config") or {}).get("logger") or {}).get("wandb") or {}
            settings = {k: node[k] for k in ("project", "group") if node.get(k)}
            if settings:
                break
    run = wandb.init(**settings, job_type="collect", name=f"{settings.get('group', 'runs')}/collect",
                     dir=str(paths["runs"].parent))
    run.log({"summary": wandb.Table(dataframe=pd.read_csv(paths["summary_csv"])),
             **{p.stem: wandb.Image(str(p)) for p in paths.values() if p.suffix == ".png"}})
    run.finish()


# --- reading one run -------------------------------------------------------------------------------------------------

def _run_dirs(folders: Iterable[Path | str]) -> list[Path]:
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
        "kinds": ",".join(pruning_cfg["kinds"]) if pruning_cfg.get("kinds") and policy != "none" else None,
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


def _model_name(model: dict[str, Any]) -> Optional[str]:
    """A short readable name: an HF checkpoint's folder or package, a fairseq arch, or the LM's sizes."""
    if model.get("name_or_path"):
        name = str(model["name_or_path"])
        if name.startswith("pkg://"):
            return name.removeprefix("pkg://").split("/")[0]
        return Path(name.rstrip("/")).name
    if model.get("arch"):
        return str(model["arch"])
    if "n_layers" in model:
        return f"transformer_lm_L{model['n_layers']}_d{model.get('d_model')}"
    return model.get("_target_", "").rsplit(".", 1)[-1] or None


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif not IGNORED_CONFIG.search(prefix + k):
            flat[prefix + k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return flat


def _with_differing_config(runs: pd.DataFrame, config: pd.DataFrame) -> pd.DataFrame:
    """Add the config keys that differ within a setting other than by seed (else those runs would be averaged)."""
    keys = setting_columns(runs)
    differ = set()
    for _, index in runs.groupby(keys, dropna=False).groups.items():
        part = config.loc[index].astype(str)
        differ.update(part.columns[part.nunique(dropna=False) > 1])
    return runs.join(config[sorted(differ)]) if differ else runs


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


# --- formatting --------------------------------------------------------------------------------------------------

def _ordered(columns: Iterable[str]) -> list[str]:
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


def _metrics(runs: pd.DataFrame) -> list[str]:
    """The final metrics (``val/ppl``, ``test/bleu``...) without losses, val first."""
    names = [c for c in runs.columns if c.count("/") == 1 and c.split("/")[0] in ("val", "test")
             and not c.endswith("loss") and runs[c].notna().any()]
    return sorted(names, key=lambda c: (c.startswith("test"), c))


def _reference(runs: pd.DataFrame, column: str) -> dict[str, float]:
    """Mean over seeds of a dense reference column, per model (runs of one seed share their dense stage)."""
    if column not in runs or runs[column].isna().all():
        return {}
    per_seed = runs.groupby(["model", "seed"], dropna=False)[column].mean()
    return {str(m): v for m, v in per_seed.groupby(level=0, dropna=False).mean().items() if pd.notna(v)}


def _mean_std(mean: float, std: float, percent: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    scale, unit, fmt = (100, " %", ".1f") if percent else (1, "", ".3f")
    text = f"{scale * mean:{fmt}}"
    return text + (f" ± {scale * std:{fmt}}" if std is not None and not math.isnan(std) else "") + unit


def _safe(name: Any) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name))


if __name__ == "__main__":
    sys.exit(main())
