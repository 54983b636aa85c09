"""``python -m ap.collect`` / ``scripts/collect_results.py``: write every table and curve of some run folders."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from .paper import PAPER_RESULTS, BadPaperResults, load_paper_results
from .plots import plot_curves
from .runs import NoResults, load_runs, run_dirs
from .summary import markdown, summarize


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
    paths["summary_md"].write_text(markdown(summary, failed, paper, runs))
    paths.update({p.stem: p for p in plot_curves(runs, out, paper)})
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="collect_results.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders searched for results.json (sweeps, outputs/)")
    parser.add_argument("--out", type=Path, help="output folder (default: <first folder>/collected)")
    parser.add_argument("--csv", type=Path, help="also write runs.csv to this file")
    parser.add_argument("--keep-runs", action="store_true",
                        help="also copy each run's results.json, .hydra/*.yaml and run.log to <out>/runs/, so the "
                             "tables can be collected again from <out>/runs (what experiments/results/ commits)")
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
        folders, out = args.folders, args.out
        if args.keep_runs:  # the tables then come from the copies: what collecting the archive again gives
            out = out if out is not None else folders[0] / "collected"
            keep_runs(folders, out / "runs")
            folders = [out / "runs"]
        paths = write_report(folders, out, paper)
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


KEPT_FILES = ("results.json", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "run.log")


def keep_runs(folders: Sequence[Path], dest: Path) -> list[Path]:
    """Copy what collecting reads of every run below ``folders`` (``KEPT_FILES``, a few kB a run: no weights, masks or
    statistics) to ``dest/<folder name>/<run path below it>``. Refuses a ``dest`` that already holds runs, so a
    committed archive is never mixed with or overwritten by another collection."""
    if dest.exists() and any(dest.iterdir()):
        raise NoResults(f"{dest} already holds runs: delete it (or pick another --out) to keep these runs there")
    names = [Path(f).resolve().name for f in folders]
    if len(set(names)) < len(names):
        raise NoResults(f"--keep-runs needs folders of distinct names (got {', '.join(names)})")
    kept = []
    for run_dir in run_dirs(folders):
        top = next(Path(f).resolve() for f in folders if run_dir.is_relative_to(Path(f).resolve()))
        target = dest / top.name / run_dir.relative_to(top)
        for name in KEPT_FILES:
            if (run_dir / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run_dir / name, target / name)
        kept.append(target)
    return kept


def log_to_wandb(folders: list[Path], paths: dict[str, Path]) -> None:
    """A ``job_type=collect`` wandb run in the group (and project) the runs logged to: summary table and curve PNGs."""
    import wandb

    settings = {}
    for run_dir in run_dirs(folders):
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


if __name__ == "__main__":
    sys.exit(main())
