"""Settings → mean ± std over seeds (``summarize``) and the Markdown report (``markdown``)."""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from .paper import claim_line, paper_for, paper_point
from .runs import lower_is_better, seed_values, setting_columns, value_columns


# the settings of the pruning: everything else in a setting is the model variant (its dense reference lines)
PRUNING_SETTING = ("policy", "pruning", "target", "kinds", "scope", "block_size", "reinit", "finetune")


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (NaN for one run) and n of every value column over the seeds of each setting."""
    keys, values = setting_columns(runs), value_columns(runs)
    grouped = runs.groupby(keys, dropna=False, sort=False)
    stats = grouped[values].agg(["mean", "std"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    stats["n"] = grouped.size()
    stats["seeds"] = grouped["seed"].agg(lambda s: ",".join(str(int(x)) if pd.notna(x) else "?" for x in sorted(s)))
    return stats.reset_index()


def markdown(summary: pd.DataFrame, failed: pd.DataFrame, paper: Optional[dict] = None,
             runs: Optional[pd.DataFrame] = None) -> str:
    """``summary`` as "mean ± std" Markdown tables, one per task_name, each with AP against the other policies and
    the ``paper``'s values and claims that apply to it; then a section listing ``failed``. With the ``runs`` behind
    ``summary``, the comparisons also say in how many seeds they hold (seed by seed, not on the means)."""
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
        versus = _versus(part, runs)
        if versus:
            free = "finetune" in part and not part["finetune"].fillna(True).astype(bool).any()
            when = "training-free" if free else "after fine-tuning; before it in brackets"
            text += (f"\nAP against the other policies at each target ({when}):\n\n"
                     + versus + "\n")
        if claims:
            text += "\n" + "".join(f"- {claim_line(claim, part, runs)}\n" for claim in claims)
        if paper_points:
            text += f"\nPaper values ({paper['paper']}): " + "; ".join(map(paper_point, paper_points)) + "\n"
        parts.append(text)
    if len(failed):
        listing = failed[["run", "status", "error", "overrides"]].to_markdown(index=False, disable_numparse=True)
        parts.append(f"## Runs without results\n\n{listing}\n")
    return "\n".join(parts)


def _versus(part: pd.DataFrame, runs: Optional[pd.DataFrame] = None) -> str:
    """AP beside every other policy at the same target (and other settings), as a Markdown table: each metric after
    fine-tuning, before it in brackets, and with ``runs`` in how many of the seeds both ran AP is the better one
    (``AP better than <policy>``: ``k/n seeds``); "" when no setting has AP and another policy."""
    pruned = part[part["policy"].fillna("none") != "none"]
    keys = [c for c in setting_columns(part) if c not in ("policy", "pruning", "experiment", "task", "task_name")]
    metrics = metric_columns(pruned[[c for c in pruned.columns if c.endswith("_mean")]]
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
                value, pre = at[f"{metric}_mean"], at.get(f"pre/{metric}_mean")
                row[f"{metric} {policy}"] = ("" if pd.isna(value) else f"{value:.3f}"
                                             + (f" ({pre:.3f})" if pre is not None and pd.notna(pre) else ""))
            if runs is not None:
                ours = seed_values(runs, group[group["policy"] == "ap"].iloc[0], metric)
                for policy in policies[1:]:
                    theirs = seed_values(runs, group[group["policy"] == policy].iloc[0], metric)
                    both = ours.index.intersection(theirs.index)
                    diff = (ours[both] - theirs[both]) * (-1 if lower_is_better(metric) else 1)  # > 0: AP better
                    row[f"{metric}: AP better than {policy}"] = f"{int((diff > 0).sum())}/{len(both)} seeds"
        rows.append(row)
    if not rows:
        return ""
    table = pd.DataFrame(rows)
    shown = [k for k in keys if k == "target" or table[k].astype(str).nunique() > 1]
    table = table[shown + [c for c in table.columns if c not in keys]].fillna("")
    table["target"] = [_mean_std(t, float("nan"), percent=True) for t in table["target"]]
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=["left" if c in shown and c != "target" else "right" for c in table.columns])


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The final metrics (``val/ppl``, ``test/bleu``...) without losses, val first."""
    names = [c for c in runs.columns if c.count("/") == 1 and c.split("/")[0] in ("val", "test")
             and not c.endswith("loss") and runs[c].notna().any()]
    return sorted(names, key=lambda c: (c.startswith("test"), c))


def _mean_std(mean: float, std: float, percent: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    scale, unit, fmt = (100, " %", ".1f") if percent else (1, "", ".3f")
    text = f"{scale * mean:{fmt}}"
    return text + (f" ± {scale * std:{fmt}}" if std is not None and not math.isnan(std) else "") + unit
