#!/usr/bin/env python
"""Tabulate every results.json below the given folders (e.g. a sweep): one row per run, sorted by sparsity.

    python scripts/collect_results.py multirun/2026-11-25_17-00-00 [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def collect(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        for path in sorted(folder.rglob("results.json")):
            r = json.loads(path.read_text())
            rows.append({"run": str(path.parent), "task": r["task"], "pruning": r["pruning"],
                         "sparsity": r["sparsity_achieved"], **r["metrics"]})
    return sorted(rows, key=lambda r: (r["task"], r["sparsity"], r["pruning"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    rows = collect(args.folders)
    if not rows:
        print(f"error: no results.json below {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    metrics = sorted({k for r in rows for k in r if "/" in k and not k.endswith("/loss")})
    print(f"{'pruning':<10} {'sparsity':>8} " + " ".join(f"{m:>10}" for m in metrics))
    for r in rows:
        print(f"{r['pruning']:<10} {r['sparsity']:>8.1%} " + " ".join(f"{r.get(m, float('nan')):>10.3f}" for m in metrics))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader(), writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
