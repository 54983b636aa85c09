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

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pandas as pd
import yaml
from matplotlib.figure import Figure

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
# the settings of the pruning: everything else in a setting is the model variant (its dense reference lines)
PRUNING_SETTING = ("policy", "pruning", "target", "kinds", "scope", "block_size", "reinit", "finetune")
# the paper's numbers (see the file's header)
PAPER_RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "paper_results.yaml"
LOWER_IS_BETTER = ("ppl", "nll", "loss")


class NoResults(Exception):
    """No results.json below the folders."""


class BadPaperResults(Exception):
    """A paper results file that cannot be read or does not follow the schema in its header."""


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
        rows.append({**row, "experiment": _experiment(run_dir), **info})
        configs.append(config)
    runs = pd.DataFrame(rows)
    if not runs.empty and runs["experiment"].isna().all():
        runs = runs.drop(columns="experiment")
    if not runs.empty:
        runs = _with_differing_config(runs, pd.DataFrame(configs, index=runs.index))
        runs = _copies_of_a_seed(runs)
        runs = runs[_ordered(runs.columns)].sort_values(["task", "task_name", "model", "policy", "target", "pruning",
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


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (NaN for one run) and n of every value column over the seeds of each setting."""
    keys, values = setting_columns(runs), value_columns(runs)
    grouped = runs.groupby(keys, dropna=False, sort=False)
    stats = grouped[values].agg(["mean", "std"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    stats["n"] = grouped.size()
    stats["seeds"] = grouped["seed"].agg(lambda s: ",".join(str(int(x)) if pd.notna(x) else "?" for x in sorted(s)))
    return stats.reset_index()


def path_label(value: Any) -> Any:
    """A file or folder setting as ``<name>~<6 hex of the whole path>``: short, and the same path always gives the
    same label (two folders of one name stay apart)."""
    if not isinstance(value, str) or not value:
        return value
    return f"{Path(value.rstrip('/')).name or value}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"


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


def plot_curves(runs: pd.DataFrame, out_dir: Path | str, paper: Optional[dict] = None) -> list[Path]:
    """One PNG per (task_name, metric): metric against achieved sparsity (see the module docstring), with the
    ``paper``'s (``load_paper_results``) points and claims that apply to the runs; their paths."""
    out_dir, paths = Path(out_dir), []
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    pruned = summary[summary["policy"].fillna("none") != "none"]
    # a line per policy and any other setting that is no sparsity
    line_keys = [c for c in setting_columns(runs) if c not in ("task", "task_name", "pruning", "target")
                 and not c.startswith("target/")]
    for task_name, points in pruned.groupby("task_name", sort=True):
        here = runs[runs["task_name"] == task_name]
        claims, paper_points = paper_for(here, paper)
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
                free = str(setting.get("finetune")) == "False"  # (a bool, or numpy's)
                _points(ax, x, line, metric, color, f"{label} ({'training-free' if free else 'fine-tuned'})", "-")
                if not free and f"pre/{metric}_mean" in line and line[f"pre/{metric}_mean"].notna().any():
                    _points(ax, x, line, f"pre/{metric}", color, f"{label} (before fine-tuning)", "--")
            for prefix, name, style in (("dense/", "dense", "-"), ("dense_ft/", "dense+ft", ":")):
                for j, (variant, value) in enumerate(_reference(here, prefix + metric).items()):
                    ax.axhline(value, color=f"{0.15 + 0.2 * (j % 4):.2f}", linestyle=style, linewidth=1,
                               label=name + (f" ({variant})" if variant else ""))
            for point in paper_points:
                if point["metric"] == metric:
                    ax.scatter(100 * point["sparsity"], point["value"], marker="*", s=160, color="k", zorder=5,
                               label=f"paper: {point['policy']} ({point['source']})")
            for claim in claims:
                ax.axvline(100 * claim["sparsity"], color="C3", linestyle="-.", linewidth=1,
                           label=f"paper's claim: {100 * claim['sparsity']:g} % at maintained quality "
                                 f"({claim['source']})")
            values = pd.concat([points[c] for c in (f"{metric}_mean", f"pre/{metric}_mean") if c in points]).dropna()
            if _lower_is_better(metric) and len(values) and values.min() > 0 \
                    and values.max() / values.min() > 10:
                ax.set_yscale("log")  # (perplexities from 20 to 2,000: AP and the baselines stay apart)
            ax.set(xlabel=_x_label(here), ylabel=f"{metric} ({'lower' if _lower_is_better(metric) else 'higher'} "
                                                 f"is better)", title=_title(task_name, metric, here, points))
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            path = out_dir / f"curve_{_safe(task_name)}_{_safe(metric)}.png"
            fig.savefig(path, dpi=120)
            paths.append(path)
    return paths


def _points(ax: Any, x: pd.Series, line: pd.DataFrame, column: str, color: str, label: str, style: str) -> None:
    """Mean over seeds; error bars (± std) only where a point has more than one seed."""
    y, std = line[f"{column}_mean"], line[f"{column}_std"]
    hollow = {"mfc": "none"} if style == "--" else {}
    if std.notna().any():
        ax.errorbar(x, y, yerr=std.fillna(0), color=color, marker="o", capsize=3, linestyle=style, label=label,
                    **hollow)
    else:
        ax.plot(x, y, color=color, marker="o", linestyle=style, label=label, **hollow)


def _lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1] in LOWER_IS_BETTER


def _x_label(runs: pd.DataFrame) -> str:
    """The x-axis: overall achieved sparsity; said so where runs prune only some attention kinds."""
    kinds = runs["kinds"].dropna().astype(str) if "kinds" in runs else pd.Series(dtype=str)
    if kinds.nunique() > 1:
        return "overall achieved sparsity (% of all valid attention entries pruned, every kind counted)"
    return "achieved sparsity (% of valid attention entries pruned)"


def _title(task_name: str, metric: str, runs: pd.DataFrame, points: pd.DataFrame) -> str:
    """Task, model(s), experiment and how many seeds stand behind the points."""
    what = [str(task_name), *sorted(runs["model"].dropna().astype(str).unique())]
    if "experiment" in runs and runs["experiment"].notna().any():
        what += sorted(runs["experiment"].dropna().astype(str).unique())
    n = sorted(set(points["n"].astype(int)))
    seeds = f"{n[0]} seed{'s' if n[0] > 1 else ''}" if len(n) == 1 else f"{n[0]}-{n[-1]} seeds"
    return f"{' · '.join(what)}\n{metric}, {seeds} per point"


def write_report(folders: Sequence[Path | str], out_dir: Optional[Path | str] = None,
                 paper: Optional[dict] = None) -> dict[str, Path]:
    """Load, summarise and plot the runs below ``folders`` into ``out_dir`` (default ``<first folder>/collected``),
    with the ``paper``'s values (``load_paper_results``; None: none) beside ours.

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
    paths["summary_md"].write_text(markdown(summary, failed, paper))
    paths.update({p.stem: p for p in plot_curves(runs, out, paper)})
    return paths


def markdown(summary: pd.DataFrame, failed: pd.DataFrame, paper: Optional[dict] = None) -> str:
    """``summary`` as "mean ± std" Markdown tables, one per task_name, each with AP against the other policies and
    the ``paper``'s values and claims that apply to it; then a section listing ``failed``."""
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
        claims, paper_points = paper_for(part, paper)
        for metric in dict.fromkeys(p["metric"] for p in paper_points):  # a "paper <metric>" column beside ours
            if metric in table:
                values = [next((f"{p['value']:g}" for p in paper_points if p["metric"] == metric
                                and p["policy"] == policy and abs(p["sparsity"] - target) < 1e-6), "")
                          for policy, target in zip(part["policy"].fillna("none"), part["target"].fillna(0.0))]
                table.insert(table.columns.get_loc(metric) + 1, f"paper {metric}", values)
        table["n"] = part["n"].astype(str)
        table["seeds"] = part["seeds"].astype(str)
        align = ["left" if c in shown and c != "target" else "right" for c in table.columns]
        text = (f"## {task_name}\n\n" + (f"All rows: {', '.join(common)}\n\n" if common else "")
                + f"{table.to_markdown(index=False, disable_numparse=True, colalign=align)}\n")
        versus = _versus(part)
        if versus:
            text += ("\nAP against the other policies at each target (after fine-tuning; before it in brackets):\n\n"
                     + versus + "\n")
        if claims:
            text += "\n" + "".join(f"- {_claim_line(claim, part)}\n" for claim in claims)
        if paper_points:
            text += f"\nPaper values ({paper['paper']}): " + "; ".join(map(_paper_point, paper_points)) + "\n"
        parts.append(text)
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
    parser.add_argument("--paper", default=None, metavar="FILE|none",
                        help="the paper's numbers to print beside ours (default: experiments/paper_results.yaml when "
                             "it exists; none: leave them out)")
    parser.add_argument("--wandb", action="store_true",
                        help="log the summary table and the curves to wandb (a job_type=collect run in the runs' "
                             "group)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    try:
        if missing:
            raise NoResults(f"no results.json below {', '.join(missing)}: no such folder")
        if args.paper is None:
            paper = load_paper_results(PAPER_RESULTS) if PAPER_RESULTS.is_file() else None
        else:
            paper = None if args.paper.lower() == "none" else load_paper_results(args.paper)
        paths = write_report(args.folders, args.out, paper)
    except (NoResults, BadPaperResults) as e:
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


# --- the paper's numbers ----------------------------------------------------------------------------------------

def load_paper_results(path: Path | str) -> dict[str, Any]:
    """The paper results file at ``path`` (schema in ``experiments/paper_results.yaml``'s header), checked:
    ``{"paper": str, "claims": [...], "points": [...]}``; raises ``BadPaperResults`` with a one-line reason."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadPaperResults(f"{path}: no such file (--paper none leaves the paper's numbers out)") from None
    except (OSError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())
        raise BadPaperResults(f"{path}: unreadable ({type(e).__name__}: {reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("paper"), str):
        raise BadPaperResults(f"{path}: not a mapping with a 'paper' string (see experiments/paper_results.yaml)")

    def entries(key: str, required: dict[str, type]) -> list[dict[str, Any]]:
        items = data.get(key) or []
        if not isinstance(items, list):
            raise BadPaperResults(f"{path}: '{key}' is no list")
        out = []
        for i, item in enumerate(items):
            where = f"{path}: {key}[{i}]"
            if not isinstance(item, dict):
                raise BadPaperResults(f"{where} is no mapping")
            for name, kind in required.items():
                value = item.get(name)
                if value is None or value == "" or value == []:
                    hint = " (every value needs its source: a table or figure of the paper)" if name == "source" else ""
                    raise BadPaperResults(f"{where}: '{name}' missing{hint}")
                if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise BadPaperResults(f"{where}: '{name}' is {value!r}, not a number")
            entry = dict(item)
            if isinstance(entry["presets"], str):  # (one preset may be written without a list)
                entry["presets"] = [entry["presets"]]
            if key == "claims" and isinstance(entry["metric"], str):
                entry["metric"] = [entry["metric"]]
            if not 0.0 <= float(entry["sparsity"]) <= 1.0:
                raise BadPaperResults(f"{where}: sparsity {entry['sparsity']} is not a fraction in [0, 1]")
            entry["sparsity"] = float(entry["sparsity"])
            out.append(entry)
        return out

    claims = entries("claims", {"task": str, "sparsity": float, "metric": list, "source": str, "presets": list})
    for claim in claims:
        claim.setdefault("tolerance", 0.02)
        claim.setdefault("text", "")
    points = entries("points", {"task": str, "metric": str, "policy": str, "sparsity": float, "value": float,
                                "source": str, "presets": list})
    return {"paper": data["paper"], "claims": claims, "points": points}


def paper_for(runs: pd.DataFrame, paper: Optional[dict]) -> tuple[list[dict], list[dict]]:
    """The ``paper``'s claims and points that apply to ``runs`` (rows of runs.csv or the summary): same task, run
    with one of the entry's presets."""
    if paper is None or "experiment" not in runs:
        return [], []
    experiments, tasks = set(runs["experiment"].dropna().astype(str)), set(runs["task"].dropna().astype(str))

    def applies(entry: dict) -> bool:
        return entry["task"] in tasks and bool(experiments & set(entry["presets"]))
    return [c for c in paper["claims"] if applies(c)], [p for p in paper["points"] if applies(p)]


def _paper_point(point: dict) -> str:
    at = "dense" if point["policy"] == "none" else f"{point['policy']} at {100 * point['sparsity']:g} %"
    return f"{point['metric']} {at}: {point['value']:g} ({point['source']})"


def _claim_line(claim: dict, part: pd.DataFrame) -> str:
    """The paper's claim and the highest target (then achieved sparsity) at which our AP keeps the claim's metric
    within its tolerance of our dense+ft baseline (dense where there is none), with the AP points above it that do
    not."""
    said = (f"**Paper** ({claim['source']}, {100 * claim['sparsity']:g} % of attention pruned): "
            f"{claim['text'] or 'at maintained quality'}.")
    metric = next((m for m in claim["metric"] if part.get(f"{m}_mean", pd.Series(dtype=float)).notna().any()), None)
    ap = part[part["policy"] == "ap"]
    if metric is None or ap.empty:
        return f"{said} **Ours**: no AP runs with {' or '.join(claim['metric'])}."
    name = "dense_ft" if ap.get(f"dense_ft/{metric}_mean", pd.Series(dtype=float)).notna().any() else "dense"
    reference = ap[f"{name}/{metric}_mean"]
    lower = metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER
    change = (ap[f"{metric}_mean"] - reference) / reference
    kept = change <= claim["tolerance"] if lower else change >= -claim["tolerance"]
    order = ap.assign(kept=kept).sort_values(["target", "sparsity_mean"], ascending=False)
    show_kinds = "kinds" in ap and ap["kinds"].astype(str).nunique() > 1

    def point(row: pd.Series) -> str:
        kinds = f", kinds={row['kinds']}" if show_kinds else ""
        return (f"{row['pruning']}{kinds}: {row[f'{metric}_mean']:.3f}, achieved sparsity "
                f"{100 * row['sparsity_mean']:.1f} %")
    within = f"{metric} within {100 * claim['tolerance']:g} % of {name.replace('_', '+')} ({reference.mean():.3f})"
    best = order[order["kept"]]
    if best.empty:
        return f"{said} **Ours**: no AP point keeps {within}; the lowest target: {point(order.iloc[-1])}."
    top = best.iloc[0]
    higher = (order["target"] > top["target"]) | ((order["target"] == top["target"])
                                                   & (order["sparsity_mean"] > top["sparsity_mean"]))
    above = order[~order["kept"] & higher].sort_values(["target", "sparsity_mean"])
    return (f"{said} **Ours**: AP keeps {within} up to a target of {100 * top['target']:g} % ({point(top)})"
            + (f"; not within it above: {'; '.join(point(r) for _, r in above.iterrows())}." if len(above)
               else "; no AP point above it."))


def _versus(part: pd.DataFrame) -> str:
    """AP beside every other policy at the same target (and other settings), as a Markdown table: each metric after
    fine-tuning, before it in brackets; "" when no setting has AP and another policy."""
    pruned = part[part["policy"].fillna("none") != "none"]
    keys = [c for c in setting_columns(part) if c not in ("policy", "pruning", "experiment", "task", "task_name")]
    metrics = _metrics(pruned[[c for c in pruned.columns if c.endswith("_mean")]]
                       .rename(columns=lambda c: c.removesuffix("_mean")))
    rows = []
    for key, group in pruned.groupby(keys, dropna=False, sort=True):
        policies = list(dict.fromkeys(sorted(group["policy"], key=lambda p: (p != "ap", p))))
        if "ap" not in policies or len(policies) < 2:
            continue
        row = dict(zip(keys, key))
        for metric in metrics:
            for policy in policies:
                at = group[group["policy"] == policy].iloc[0]
                pre = at.get(f"pre/{metric}_mean")
                row[f"{metric} {policy}"] = (f"{at[f'{metric}_mean']:.3f}"
                                             + (f" ({pre:.3f})" if pre is not None and pd.notna(pre) else ""))
        rows.append(row)
    if not rows:
        return ""
    table = pd.DataFrame(rows)
    shown = [k for k in keys if k == "target" or table[k].astype(str).nunique() > 1]
    table = table[shown + [c for c in table.columns if c not in keys]].fillna("")
    table["target"] = [_mean_std(t, float("nan"), percent=True) for t in table["target"]]
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=["left" if c in shown and c != "target" else "right" for c in table.columns])


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
    """Mean over seeds of a dense reference column per model variant (every setting but the pruning's: another
    memory length, data folder or dense checkpoint is another dense model), labelled by what tells the variants
    apart ("" for one variant). Runs of one seed and variant share their dense stage."""
    if column not in runs or runs[column].isna().all():
        return {}
    variant = [c for c in setting_columns(runs) if c not in PRUNING_SETTING and c != "copy"
               and not c.startswith(("target/", "pruning."))]
    per_seed = runs.groupby([*variant, "seed"], dropna=False)[column].mean()
    means = per_seed.groupby(level=list(range(len(variant))), dropna=False).mean()
    differ = [i for i, c in enumerate(variant) if runs[c].astype(str).nunique() > 1]
    out = {}
    for key, value in means.items():
        key = key if isinstance(key, tuple) else (key,)
        if pd.notna(value):
            out[", ".join(f"{variant[i]}={key[i]}" for i in differ)] = value
    return out


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
