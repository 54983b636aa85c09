"""The paper's numbers and claims (``experiments/paper_results.yaml``) beside ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from .runs import LOWER_IS_BETTER, seed_values


# the paper's numbers (see the file's header)
PAPER_RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "paper_results.yaml"


class BadPaperResults(Exception):
    """A paper results file that cannot be read or does not follow the schema in its header."""


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


def paper_point(point: dict) -> str:
    at = "dense" if point["policy"] == "none" else f"{point['policy']} at {100 * point['sparsity']:g} %"
    return f"{point['metric']} {at}: {point['value']:g} ({point['source']})"


def claim_line(claim: dict, part: pd.DataFrame, runs: Optional[pd.DataFrame] = None) -> str:
    """The paper's claim and the highest target (then achieved sparsity; where runs prune different attention kinds,
    the highest achieved overall sparsity) at which our AP keeps the claim's metric
    within its tolerance of our dense+ft baseline (dense where there is none) on the mean over seeds, with the AP
    points above it that do not; with the ``runs`` behind ``part``, also in how many seeds that point keeps it
    (each seed against its own baseline)."""
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
    show_kinds = "kinds" in ap and ap["kinds"].astype(str).nunique() > 1
    # the claim is about all attention: where runs prune different kinds, the achieved overall sparsity ranks them
    rank = ["sparsity_mean", "target"] if show_kinds else ["target", "sparsity_mean"]
    order = ap.assign(kept=kept).sort_values(rank, ascending=False)

    def point(row: pd.Series) -> str:
        kinds = f", kinds={row['kinds']}" if show_kinds else ""
        return (f"{row['pruning']}{kinds}: {row[f'{metric}_mean']:.3f}, achieved sparsity "
                f"{100 * row['sparsity_mean']:.1f} %")
    within = f"{metric} within {100 * claim['tolerance']:g} % of {name.replace('_', '+')} ({reference.mean():.3f})"
    best = order[order["kept"]]
    if best.empty:
        return f"{said} **Ours**: no AP point keeps {within}; the lowest target: {point(order.iloc[-1])}."
    top = best.iloc[0]
    if runs is not None:  # the mean can hide a seed that does not hold it
        value, base = seed_values(runs, top, metric), seed_values(runs, top, f"{name}/{metric}")
        both = value.index.intersection(base.index)
        change = (value[both] - base[both]) / base[both]
        held = change <= claim["tolerance"] if lower else change >= -claim["tolerance"]
        seeds = f", within it in {int(held.sum())}/{len(both)} seeds against each seed's own {name.replace('_', '+')}"
    else:
        seeds = ""
    first, second = rank
    higher = (order[first] > top[first]) | ((order[first] == top[first]) & (order[second] > top[second]))
    above = order[~order["kept"] & higher].sort_values(rank)
    upto = (f"an overall sparsity of {100 * top['sparsity_mean']:.1f} %" if show_kinds
            else f"a target of {100 * top['target']:g} %")
    return (f"{said} **Ours**: AP keeps {within} up to {upto} ({point(top)}{seeds})"
            + (f"; not within it above: {'; '.join(point(r) for _, r in above.iterrows())}." if len(above)
               else "; no AP point above it."))
