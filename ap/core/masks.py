"""``MaskSet``: a set of per-site keep-masks plus the metadata of how they were made (the ``masks.pt`` contract).

File format (``torch.load(path, weights_only=True)``)::

    {"format": "ap-masks", "version": 1,
     "meta": {"model": {"class": str, "sites": {site: [kind, n_heads, max_q, max_k]}},
              "sparsity": float | {kind: float}, "scope": str, "policy": str,
              "achieved": {"overall": float, site: float},   # fraction of valid entries pruned
              "achieved_kinds": {kind: float},               # the same per site kind (enc_self, dec_self, cross)
              "calibration": {"split": str, "batches": int, "tokens": int},
              "block_size": int, "created": ISO time, "config": {...}},
     "masks": {site: BoolTensor[n_heads, max_q, max_k]}}       # True = keep
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import APError, MaskError
from .sites import find_sites, model_signature

FORMAT, VERSION = "ap-masks", 1
REQUIRED_META = ("model", "sparsity", "scope", "policy", "achieved", "calibration", "block_size", "created", "config")


def signature_difference(expected: dict[str, list], actual: dict[str, list]) -> str | None:
    """The first difference between two site signatures ``{site: [kind, heads, max_q, max_k]}``, or None."""
    for name, spec in expected.items():
        if name not in actual:
            return f"site {name!r} is in the masks but not in the model"
        if list(actual[name]) != list(spec):
            fields = ("kind", "n_heads", "max_q", "max_k")
            diffs = ", ".join(f"{f} {a} (masks) vs {b} (model)" for f, a, b in zip(fields, spec, actual[name]) if a != b)
            return f"site {name!r}: {diffs}"
    extra = [n for n in actual if n not in expected]
    if extra:
        return f"site {extra[0]!r} is in the model but not in the masks"
    return None


@dataclass
class MaskSet:
    masks: dict[str, Tensor]  # site -> (H, Q, K) bool, True = keep
    meta: dict[str, Any] = field(default_factory=dict)

    # --- persistence -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "meta": self.meta, "masks": self.masks}

    @classmethod
    def from_dict(cls, data: Any, source: str = "mask data") -> "MaskSet":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise APError(f"{source} is not an ap mask file (expected format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise APError(f"{source} has mask-file version {data.get('version')}; this ap reads version {VERSION}")
        missing = [k for k in REQUIRED_META if k not in data["meta"]]
        if missing:
            raise APError(f"{source} lacks meta fields {missing}")
        for name, m in data["masks"].items():
            if m.dtype != torch.bool or m.dim() != 3:
                raise APError(f"{source}: mask of site {name!r} must be a 3-D bool tensor, got {m.dtype} {tuple(m.shape)}")
        return cls(dict(data["masks"]), dict(data["meta"]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MaskSet":
        path = Path(path)
        if not path.is_file():
            raise APError(f"mask file {path} not found (pruning.masks_path); a pruning run writes <run_dir>/masks.pt")
        return cls.from_dict(torch.load(path, weights_only=True, map_location="cpu"), source=str(path))

    # --- applying ----------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise ``MaskError`` naming the first difference if these masks were not made for ``model``'s sites."""
        diff = signature_difference(self.meta["model"]["sites"], model_signature(model)["sites"])
        if diff:
            raise MaskError(f"masks do not fit this model: {diff}")

    def install(self, model: nn.Module) -> None:
        """Validate and put every mask into its site (raises rather than leaving any site dense)."""
        self.validate(model)
        for name, site in find_sites(model).items():
            site.set_mask(self.masks[name])

    @staticmethod
    def uninstall(model: nn.Module) -> None:
        for site in find_sites(model).values():
            site.set_mask(None)

    # --- reporting ---------------------------------------------------------------------------------------------
    def report(self) -> str:
        """A per-site table of achieved sparsity (fraction of valid calibration entries pruned)."""
        achieved = self.meta["achieved"]
        kinds = {n: s[0] for n, s in self.meta["model"]["sites"].items()}
        width = max(len(n) for n in self.masks)
        lines = [f"{'site':<{width}}  {'kind':<8}  pruned"]
        lines += [f"{n:<{width}}  {kinds[n]:<8}  {achieved[n]:6.1%}" for n in self.masks]
        for kind, value in self.meta.get("achieved_kinds", {}).items():
            lines.append(f"{'all ' + kind:<{width}}  {kind:<8}  {value:6.1%}")
        lines.append(f"{'overall':<{width}}  {'':<8}  {achieved['overall']:6.1%}")
        return "\n".join(lines)

    def heatmaps(self, out_dir: str | Path, mean_probs: dict[str, Tensor] | None = None) -> list[Path]:
        """One PNG per site: the keep-mask of every head (and the calibrated mean probability, log scale, if given)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, keep in self.masks.items():
            n_heads = keep.shape[0]
            rows = 2 if mean_probs is not None else 1
            fig, axes = plt.subplots(rows, n_heads, figsize=(2.2 * n_heads, 2.3 * rows), squeeze=False)
            for h in range(n_heads):
                axes[0, h].imshow(keep[h].numpy(), cmap="Greys_r", interpolation="nearest", vmin=0, vmax=1)
                axes[0, h].set_title(f"head {h} kept", fontsize=8)
                if mean_probs is not None:
                    p = mean_probs[name][h]  # (Q, K); 0 where never valid (e.g. causal future) -> blank
                    axes[1, h].imshow(torch.where(p > 0, p.log10(), torch.nan).numpy(), cmap="viridis",
                                      interpolation="nearest")
                    axes[1, h].set_title(f"head {h} log10 mean p", fontsize=8)
            for ax in axes.flat:
                ax.set_xticks([]), ax.set_yticks([])
            fig.suptitle(f"{name}  ({self.meta['achieved'][name]:.1%} of valid entries pruned)", fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            paths.append(path)
        return paths
