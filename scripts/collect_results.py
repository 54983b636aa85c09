#!/usr/bin/env python
"""Tables and plots of every results.json below the given folders (sweeps, outputs/): see ap/collect.py.

    python scripts/collect_results.py multirun/2026-11-25_17-00-00 [more folders] [--out DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (also without `pip install -e .`)

from ap.collect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
