"""Human-readable summaries of a run's ``results.json``."""

from __future__ import annotations

from typing import Any


def results_table(results: dict[str, Any]) -> str:
    """Dense vs pruned metrics, achieved sparsity and wall time per stage, as a fixed-width table."""
    rows = []
    if results.get("dense_metrics") and results["pruning"] != "none":
        rows.append(("dense", results["dense_metrics"], 0.0))
    if results.get("dense_finetuned_metrics"):
        rows.append(("dense+ft", results["dense_finetuned_metrics"], 0.0))  # same fine-tune steps, no masks
    if results.get("pruned_before_finetune_metrics"):
        rows.append((f"{results['pruning']} (no ft)", results["pruned_before_finetune_metrics"],
                     results["sparsity_achieved"]))
    label = results["pruning"] + (" (training-free)" if results.get("finetune") is False else "")
    rows.append((label, results["metrics"], results["sparsity_achieved"]))
    names = sorted({k for _, m, _ in rows for k in m if not k.endswith("/loss")}, key=lambda k: (k.startswith("test"), k))
    width = max(8, *(len(r[0]) for r in rows))
    lines = [f"{results['task_name']}: " + " vs ".join(r[0] for r in rows),
             f"{'model':<{width}}  " + "  ".join(f"{n:>10}" for n in names) + f"  {'pruned':>8}"]
    for label, metrics, sparsity in rows:
        cells = "  ".join(f"{metrics[n]:>10.3f}" if n in metrics else f"{'-':>10}" for n in names)
        lines.append(f"{label:<{width}}  {cells}  {sparsity:>8.1%}")
    if results.get("baseline"):
        why = ("" if results["baseline"] != "dense" else " (pruning.finetune=false: masks applied without training)"
               if results.get("finetune") is False else " (pruning.reinit: the pruned model was trained from scratch)")
        lines.append(f"baseline: {results['baseline']}{why}")
    if len(results.get("sparsity_per_kind") or {}) > 1:
        lines.append("pruned per kind: " + ", ".join(f"{k} {v:.1%}" for k, v in results["sparsity_per_kind"].items()))
    timing = results.get("timing", {})
    if timing:
        lines.append("wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timing.items()))
    return "\n".join(lines)
