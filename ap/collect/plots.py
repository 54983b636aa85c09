"""Curves: each metric against achieved sparsity, one line per policy, dense references per model variant."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from matplotlib.figure import Figure

from .paper import paper_for
from .runs import lower_is_better, setting_columns
from .summary import PRUNING_SETTING, metric_columns, summarize


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
        per_kind = _per_kind(here)  # (one colour per kind, a line style per policy; no before-fine-tuning lines)
        for metric in metric_columns(here):
            if points.get(f"{metric}_mean", pd.Series(dtype=float)).notna().sum() == 0:
                continue
            fig = Figure(figsize=(6.4, 4.4), layout="constrained")
            ax = fig.add_subplot()
            varying = [k for k in line_keys if k != "policy" and points[k].astype(str).nunique() > 1]
            colours: dict[tuple, str] = {}
            for key, line in points.groupby(line_keys, dropna=False, sort=True):
                setting = dict(zip(line_keys, key))
                label = ", ".join([str(setting["policy"])] + [f"{k.rsplit('.', 1)[-1]}={setting[k]}" for k in varying])
                line = line.assign(x=_x(line, here)).sort_values("x")
                shade = tuple(str(v) for k, v in setting.items() if k != "policy") if per_kind else key
                color = colours.setdefault(shade, f"C{len(colours) % 10}")
                style = "--" if per_kind and str(setting["policy"]) != "ap" else "-"
                x = 100 * line["x"]
                free = str(setting.get("finetune")) == "False"  # (a bool, or numpy's)
                _points(ax, x, line, metric, color, f"{label} ({'training-free' if free else 'fine-tuned'})", style)
                # (per-kind grids: 8 lines already; their before-fine-tuning values are in summary.md)
                if not free and f"pre/{metric}_mean" in line and line[f"pre/{metric}_mean"].notna().any() \
                        and not per_kind:
                    _points(ax, x, line, f"pre/{metric}", color, f"{label} (before fine-tuning)", "--")
            data_lines = len(ax.get_legend_handles_labels()[0])  # (reference and paper entries come next)
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
            if lower_is_better(metric) and len(values) and values.min() > 0 \
                    and values.max() / values.min() > 10:
                ax.set_yscale("log")  # (perplexities from 20 to 2,000: AP and the baselines stay apart)
            ax.set(xlabel=_x_label(here), ylabel=f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} "
                                                 f"is better)", title=_title(task_name, metric, here, points))
            ax.grid(alpha=0.3)
            if data_lines > 6:  # many curves: the legend goes below the axes, where it hides no point
                fig.set_size_inches(6.4, 4.4 + 0.22 * len(ax.get_legend_handles_labels()[0]))
                fig.legend(loc="outside lower center", fontsize="small")
            else:
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


def _per_kind(runs: pd.DataFrame) -> bool:
    """Whether the runs prune different sets of attention kinds (encoder self, decoder self, cross)."""
    return "kinds" in runs and runs["kinds"].dropna().astype(str).nunique() > 1


def _x(points: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    """Each point's x (a fraction): the achieved sparsity; where the runs prune different kinds, the sparsity within
    the kinds a point prunes (the mean of their ``sparsity/<kind>``), so each kind's curve shows where it breaks."""
    if not _per_kind(runs):
        return points["sparsity_mean"]

    def within(row: pd.Series) -> float:
        kinds = [f"sparsity/{k}_mean" for k in str(row["kinds"]).split(",")]
        if not all(k in row and pd.notna(row[k]) for k in kinds):
            return row["sparsity_mean"]  # (results without per-kind sparsity)
        return sum(row[k] for k in kinds) / len(kinds)
    return points.apply(within, axis=1)


def _x_label(runs: pd.DataFrame) -> str:
    """The x-axis: achieved sparsity; within the pruned kinds where runs prune different attention kinds."""
    if _per_kind(runs):
        return "sparsity of the pruned kinds (% of their valid entries)"
    return "achieved sparsity (% of valid attention entries pruned)"


def _title(task_name: str, metric: str, runs: pd.DataFrame, points: pd.DataFrame) -> str:
    """Task, model(s), experiment and how many seeds stand behind the points."""
    what = [str(task_name), *sorted(runs["model"].dropna().astype(str).unique())]
    if "experiment" in runs and runs["experiment"].notna().any():
        what += sorted(runs["experiment"].dropna().astype(str).unique())
    n = sorted(set(points["n"].astype(int)))
    seeds = f"{n[0]} seed{'s' if n[0] > 1 else ''}" if len(n) == 1 else f"{n[0]}-{n[-1]} seeds"
    return f"{' · '.join(what)}\n{metric}, {seeds} per point"


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


def _safe(name: Any) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name))
