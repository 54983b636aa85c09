"""``MaskSet``: a set of per-site keep-masks plus the metadata of how they were made (the ``masks.pt`` contract).

File format (``torch.load(path, weights_only=True)``)::

    {"format": "ap-masks", "version": 1,
     "meta": {"model": {"class": str, "sites": {site: [kind, n_heads, max_q, max_k]}},
              "sparsity": float | {kind: float}, "kinds": [kind, ...],   # the site kinds pruned (sorted)
              "scope": str, "policy": str,
              "achieved": {"overall": float, site: float},   # fraction of valid entries pruned
              "achieved_kinds": {kind: float},               # the same per site kind (enc_self, dec_self, cross)
              "calibration": {"split": str, "batches": int, "tokens": int},
              "block_size": int, "spec": {...},              # PruningSpec.to_dict()
              "created": ISO time, "config": {...}},
     "masks": {site: BoolTensor[n_heads, max_q, max_k]}}       # True = keep

Version 2 (tile masks, from tiled statistics: ``pruning.tiled=true``) is the same with ``meta["tile"] = t > 0`` and
``masks: {site: BoolTensor[n_heads, ceil(max_q / t), ceil(max_k / t)]}``: True keeps every entry of the tile (causality
inside diagonal tiles is applied by the site, as for element masks). ``expand_tiles`` turns one into element masks.

Loading checks a file whole (every site of ``meta["model"]`` has a mask of exactly its shape), so a damaged or
hand-edited file fails at load, naming the site, not when an input first reaches a missing row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import APError, MaskError
from .files import load_user_file
from .sites import find_sites, model_signature

FORMAT, VERSION, TILED_VERSION = "ap-masks", 1, 2
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


def expand_tiles(tiles: Tensor, tile: int, max_q: int, max_k: int) -> Tensor:
    """A tile mask ``(H, ceil(Q/t), ceil(K/t))`` as the element mask ``(H, Q, K)`` it stands for."""
    return tiles.repeat_interleave(tile, 1).repeat_interleave(tile, 2)[:, :max_q, :max_k]


@dataclass
class MaskSet:
    masks: dict[str, Tensor]  # site -> (H, Q, K) bool, True = keep
    meta: dict[str, Any] = field(default_factory=dict)

    # --- persistence -------------------------------------------------------------------------------------------
    @property
    def tile(self) -> int:
        """0 for element masks ``(H, Q, K)``; ``t > 0`` for tile masks ``(H, ceil(Q/t), ceil(K/t))``."""
        return int(self.meta.get("tile", 0) or 0)

    def element_mask(self, name: str) -> Tensor:
        """Site ``name``'s mask per entry ``(H, Q, K)`` (tile masks expanded)."""
        if not self.tile:
            return self.masks[name]
        _, _, max_q, max_k = self.meta["model"]["sites"][name]
        return expand_tiles(self.masks[name], self.tile, max_q, max_k)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": TILED_VERSION if self.tile else VERSION, "meta": self.meta,
                "masks": self.masks}

    @classmethod
    def from_dict(cls, data: Any, source: str = "mask data") -> "MaskSet":
        """A ``MaskSet`` from the mask-file dict, checked whole: format, meta fields, and every mask against its site.

        Raises ``APError`` (``MaskError`` for a mask that does not fit its site) naming ``source`` and what is wrong.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            hint = ("; it is an ap statistics file: pass it as pruning.stats_path"
                    if isinstance(data, dict) and data.get("format") == "ap-stats" else "")
            raise APError(f"{source} is not an ap mask file (expected format {FORMAT!r}){hint}")
        if data.get("version") not in (VERSION, TILED_VERSION):
            raise APError(f"{source} has mask-file version {data.get('version')}; this ap reads versions {VERSION} "
                          f"(element masks) and {TILED_VERSION} (tile masks)")
        meta, masks = data.get("meta"), data.get("masks")
        if not isinstance(meta, dict) or not isinstance(masks, dict):
            raise APError(f"{source} is damaged: 'meta' and 'masks' must be dicts; rebuild masks with a pruning run")
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise APError(f"{source} lacks meta fields {missing}")
        tile = meta.get("tile", 0)
        if (data["version"] == TILED_VERSION) != (isinstance(tile, int) and tile > 0):
            raise APError(f"{source} is damaged: version {data['version']} with meta tile={tile!r} (tile masks are "
                          f"version {TILED_VERSION} with an int tile > 0); rebuild masks with a pruning run")
        ms = cls(dict(masks), dict(meta))
        ms.check(source)
        return ms

    def check(self, source: str = "masks") -> None:
        """Raise if the masks and ``meta["model"]["sites"]`` do not name the same sites with the same shapes.

        Each mask must be a bool ``(n_heads, max_q, max_k)`` tensor of its site's entry in the signature.
        """
        model = self.meta.get("model")
        sites = model.get("sites") if isinstance(model, dict) else None
        if not isinstance(sites, dict) or not all(isinstance(s, (list, tuple)) and len(s) == 4
                                                  and all(isinstance(x, int) for x in s[1:]) for s in sites.values()):
            raise APError(f"{source}: meta['model']['sites'] must map each site to [kind, n_heads, max_q, max_k]; "
                          f"rebuild the masks with a pruning run")
        for name in sites:
            if name not in self.masks:
                raise MaskError(f"{source}: site {name!r} is in meta['model'] but has no mask; rebuild the masks")
        for name, m in self.masks.items():
            if name not in sites:
                raise MaskError(f"{source}: mask of site {name!r} has no entry in meta['model']; rebuild the masks")
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.dim() != 3:
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise MaskError(f"{source}: mask of site {name!r} must be a 3-D bool tensor, got {got}")
            h, q, k = sites[name][1:]
            t = self.tile
            expected = (h, -(-q // t), -(-k // t)) if t else (h, q, k)
            if tuple(m.shape) != expected:
                what = f"{expected} ({t}-tiles of {(h, q, k)})" if t else f"{expected} (n_heads, max_q, max_k)"
                raise MaskError(f"{source}: mask of site {name!r} has shape {tuple(m.shape)} but its site is "
                                f"{what}; rebuild the masks")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, key: str = "pruning.masks_path") -> "MaskSet":
        """Read and check a mask file; any problem is one ``APError`` naming ``key`` (the config key) and ``path``."""
        data = load_user_file(path, key, "an ap mask file (<run_dir>/masks.pt of a pruning run)")
        return cls.from_dict(data, source=f"{key}={path}")

    # --- applying ----------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise ``MaskError`` naming the first difference if these masks were not made for ``model``'s sites."""
        self.check()
        diff = signature_difference(self.meta["model"]["sites"], model_signature(model)["sites"])
        if diff:
            raise MaskError(f"masks do not fit this model: {diff}")

    def install(self, model: nn.Module) -> None:
        """Validate and put every mask into its site (raises rather than leaving any site dense)."""
        self.validate(model)
        for name, site in find_sites(model).items():
            site.set_mask(self.masks[name], tile=self.tile)

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
        """One PNG per site: the keep-mask of every head (and the calibrated mean probability, log scale, if given;
        tile masks and tiled statistics are drawn per tile)."""
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
