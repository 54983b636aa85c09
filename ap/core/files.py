"""Reading files a user points ap at (mask files, statistics, checkpoints) with one actionable error instead of a trace.

``torch.load`` of a truncated, corrupt or foreign file ends in a traceback whose last line may advise re-loading with
``weights_only=False``: unsafe advice for a file we could not read. ``load_user_file`` turns every such failure into an
``APError`` naming the config key, the path and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import APError


def load_user_file(path: str | Path, key: str, expected: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a missing or unreadable file raises ``APError``.

    ``key`` is the config key that named the file (``pruning.masks_path``), ``expected`` what it should be
    (``"an ap mask file (masks.pt of a pruning run)"``).
    """
    path = Path(path)
    if not path.is_file():
        raise APError(f"{key}={path} does not exist; expected {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, not a torch file, or objects that weights_only refuses
        text = str(e)
        if "Unsupported global" in text:  # a pickle of arbitrary Python objects: never unpickled here
            raise APError(f"{key}={path} is not {expected}: it holds Python objects other than tensors and plain "
                          f"data (never loaded from a file ap did not write)") from None
        if "WeightsUnpickler error:" in text:  # torch's message advises weights_only=False: keep only the cause
            text = text.split("WeightsUnpickler error:", 1)[1]
        why = (text.strip().splitlines() or [""])[0][:120]
        raise APError(f"{key}={path} could not be read as {expected}: corrupt or not a torch file "
                      f"({type(e).__name__}: {why})") from None
