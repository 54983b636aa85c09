#!/usr/bin/env python
"""Attention speed: dense causal SDPA vs masked backends at block sparsity, plus the whole LM.

    python scripts/benchmark.py                                  # CPU, L = 1024 2048, sparsity 0.5 0.9
    python scripts/benchmark.py --lengths 2048 4096 --sparsity 0.9 --device cuda --backward
    python scripts/benchmark.py --lengths --masks outputs/lm_sample/ap90/<run>/masks.pt   # an LM run's own masks, whole model
    python scripts/benchmark.py --lengths --model data/smollm2 --sparsity 0.9 --model-lengths 2048 4096   # HF prefill
    python scripts/benchmark.py --model data/smollm2 --calibration --model-lengths 4096   # calibration vs evaluation

Masks are causal tile masks (``--tile`` = the flex tile): the diagonal tiles are kept, a ``sparsity`` share of the
other valid tiles is emptied, at random or AP-shaped (``--mask-shapes``: sinks and a band first; ``--masks``: a run's
masks instead, for the whole-LM rows). Attention inputs are strided views of one fused QKV tensor, as models pass
them. Every ratio is ``dense causal SDPA time / backend time`` measured in the same run (> 1 = faster than dense; the
attention rows call dense SDPA in turn with the backend, so the two times are neighbours); ``ideal`` = valid tiles /
kept tiles, ``of ideal`` = ratio / ideal. ``--profile`` adds the block backend's flash kernels alone (its ceiling
without gathers and scatters). Memory (``MB``): on CUDA the
peak allocated during one call above what was allocated before it; on CPU (no allocator statistics) the tensors a
training step saves for backward (the activation memory that grows with attention work), for forward+backward rows
only. Results: a table on stdout, CSV and PNG in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ap.core import attention  # noqa: E402
from ap.core import APError, MaskSet, find_sites  # noqa: E402
from ap.core.attention import (FLEX_BLOCK_SIZE, block_plan, empty_tiles, flex_block_mask,  # noqa: E402
                               register_backend)
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig  # noqa: E402


SINK_TILES = 1  # AP-shaped masks: the first key tile (attention sinks) ...
BAND_TILES = 4  # ... and the 4 key tiles before each query tile's diagonal (a local band)


def tile_layout(n: int, heads: int, sparsity: float, shape: str, seed: int = 0, fit: bool = False) -> torch.Tensor:
    """Kept tiles ``(H, n, n)`` bool of a causal mask over ``n`` query/key tiles: every diagonal tile, for
    ``shape="ap"`` (what AP keeps in causal LMs) also ``SINK_TILES`` sink columns and a band of ``BAND_TILES`` tiles
    (with ``fit``, only as many of them, drawn at random, as ``1 - sparsity`` of the valid tiles allows), then
    scattered tiles (other per head) until ``1 - sparsity`` of the valid (lower-triangle) tiles are kept."""
    if shape not in ("ap", "random"):
        raise ValueError(f"shape must be 'ap' or 'random', got {shape!r}")
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(n, n, dtype=torch.bool).tril()  # (n, n)
    i = torch.arange(n)
    keep = torch.zeros(heads, n, n, dtype=torch.bool)
    keep[:, i, i] = True
    structure = torch.zeros(n, n, dtype=torch.bool)  # sinks and band
    if shape == "ap":
        structure[:, :SINK_TILES] = True
        for d in range(1, BAND_TILES + 1):
            structure[i[d:], i[:-d]] = True
    structure &= valid & ~keep[0]
    target = round((1 - sparsity) * int(valid.sum()))
    for h in range(heads):
        s = structure.nonzero()  # (S, 2)
        if fit:
            s = s[torch.randperm(len(s), generator=g)[:max(0, target - n)]]
        keep[h, s[:, 0], s[:, 1]] = True
        free = (valid & ~keep[h]).nonzero()  # (F, 2)
        extra = max(0, target - int(keep[h].sum()))
        chosen = free[torch.randperm(len(free), generator=g)[:extra]]
        keep[h, chosen[:, 0], chosen[:, 1]] = True
    return keep


def tile_mask(length: int, heads: int, sparsity: float, tile: int, seed: int = 0,
              shape: str = "random") -> tuple[torch.Tensor, float]:
    """Bool ``(H, L, L)`` causal mask of ``tile_layout`` (``fit``: AP-shaped masks keep the asked share too), and the
    fraction of valid tiles it keeps."""
    n = -(-length // tile)
    tiles = tile_layout(n, heads, sparsity, shape, seed, fit=True)  # (H, n, n)
    full = tiles.repeat_interleave(tile, 1).repeat_interleave(tile, 2)[:, :length, :length]
    valid = int(torch.ones(n, n, dtype=torch.bool).tril().sum())
    return full & torch.ones(length, length, dtype=torch.bool).tril(), float(tiles.sum()) / (heads * valid)


def timed(fn: Callable[[], object], repeats: int, device: str, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_beside(fn: Callable[[], object], ref: Callable[[], object], repeats: int, device: str,
                 warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``fn()`` and of ``ref()``, called in turn (after ``warmup`` calls of each): a ratio of the two
    compares neighbouring calls, not a slow minute with a fast one (machines here drift by 20 % and more)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn(), ref()
    sync()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for f, out in ((ref, times[1]), (fn, times[0])):
            t0 = time.perf_counter()
            f()
            sync()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def memory_mb(fn: Callable[[], object], device: str, backward: bool) -> float:
    """MB a call needs (see the module doc); NaN for CPU forward-only rows."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not backward:
        return float("nan")
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # each storage once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def kernel_seconds(fn: Callable[[], object], ref: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds per call that PyTorch's CPU flash kernels (forward and backward) take inside ``fn()`` (the block
    backend's time without its gathers and scatters, ``--profile``), and of ``ref()`` timed between them."""
    from torch.profiler import profile

    fn(), ref()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref()
        times[1].append(time.perf_counter() - t0)
        with profile() as prof:
            fn()
        times[0].append(sum(e.cpu_time_total for e in prof.key_averages()  # with what the kernels call (zero-fills)
                            if e.key.startswith("aten::_scaled_dot_product_flash_attention_for_cpu")) / 1e6)
    return statistics.median(times[0]), statistics.median(times[1])


def sparse_rows(args: argparse.Namespace, what: str, length: int, dense_fn: Callable[[], object],
                runs: Callable[[torch.Tensor, str], dict[str, Callable[[], object]]]) -> list[dict]:
    """Rows of every ``--sparsity`` and ``--mask-shapes`` shape: ``runs(mask (1, H, L, L), shape)`` gives the calls
    to time (forward rows run without gradients), each in turn with ``dense_fn`` (the row's ratio)."""
    rows, training = [], what.endswith("bwd")
    for shape in args.mask_shapes:
        for sparsity in args.sparsity:
            mask, kept = tile_mask(length, args.heads, sparsity, args.tile, shape=shape)
            mask = mask.to(args.device)[None]  # (1, H, L, L)
            calls = {n: f for n, f in runs(mask, shape).items() if not args.backends or n in args.backends}
            if args.profile and "block" in calls and args.device == "cpu":
                calls["block: kernels alone"] = calls["block"]
            for name, fn in calls.items():
                with torch.set_grad_enabled(training):
                    if name.endswith("kernels alone"):
                        (s, dense), mb = kernel_seconds(fn, dense_fn, args.repeats), float("nan")
                    else:
                        s, dense = timed_beside(fn, dense_fn, args.repeats, args.device)
                        mb = memory_mb(fn, args.device, training)
                rows.append({"what": what, "length": length, "sparsity": sparsity, "mask": shape, "backend": name,
                             "seconds": s, "ratio": dense / s, "ideal": 1 / kept, "mb": mb})
    return rows


def attention_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for length in args.lengths:
        g = torch.Generator().manual_seed(0)
        # as a fused QKV projection hands them to attention: (B, H, L, D) views of one (B, L, 3, H, D) tensor
        qkv = torch.randn(args.batch, length, 3, args.heads, args.dim, generator=g).to(args.device)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D), strided
        dense_fn = lambda: attention(q, k, v, is_causal=True, backend="sdpa")  # noqa: E731
        dense = timed(dense_fn, args.repeats, args.device)
        rows.append({"what": "attention fwd", "length": length, "sparsity": 0.0, "backend": "sdpa causal (dense)",
                     "seconds": dense, "ratio": 1.0, "ideal": 1.0,
                     "mb": memory_mb(dense_fn, args.device, False)})

        def runs(mask: torch.Tensor, shape: str) -> dict[str, Callable[[], object]]:
            plan = block_plan(mask[0], args.heads, args.tile)
            out = {"block": lambda: attention(q, k, v, mask=plan, backend="block")}
            if shape == "random":  # masked dense kernels take as long whatever the shape
                block_mask = flex_block_mask(mask, args.tile if args.device == "cpu" else None)  # CUDA: 128-blocks
                out = {"eager masked": lambda: attention(q, k, v, mask=mask, backend="eager"),
                       "sdpa masked": lambda: attention(q, k, v, mask=mask, backend="sdpa"), **out,
                       "flex": lambda: attention(q, k, v, mask=block_mask, backend="flex")}
            return out

        rows += sparse_rows(args, "attention fwd", length, dense_fn, runs)
        if args.backward:
            rows += backward_rows(args, length, qkv)
    return rows


def backward_rows(args: argparse.Namespace, length: int, qkv: torch.Tensor) -> list[dict]:
    qkv = qkv.clone().requires_grad_()  # (B, L, 3, H, D): gradients flow into the fused tensor, as in a model

    def step(**kw) -> Callable[[], None]:
        return lambda: attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), **kw)[0].sum().backward()

    dense = timed(step(is_causal=True, backend="sdpa"), args.repeats, args.device)
    rows = [{"what": "attention fwd+bwd", "length": length, "sparsity": 0.0, "backend": "sdpa causal (dense)",
             "seconds": dense, "ratio": 1.0, "ideal": 1.0,
             "mb": memory_mb(step(is_causal=True, backend="sdpa"), args.device, True)}]

    def runs(mask: torch.Tensor, shape: str) -> dict[str, Callable[[], object]]:
        out = {"block": step(mask=block_plan(mask[0], args.heads, args.tile), backend="block")}
        if shape == "random":
            out = {"eager masked": step(mask=mask, backend="eager"), "sdpa masked": step(mask=mask, backend="sdpa"),
                   **out}
            if args.device == "cuda":  # flex has no CPU backward in torch 2.13
                out["flex"] = step(mask=flex_block_mask(mask), backend="flex")  # 128-blocks on CUDA
        return out

    return rows + sparse_rows(args, "attention fwd+bwd", length, step(is_causal=True, backend="sdpa"), runs)


@register_backend("skip (bound)")
def _skip_attention(q, k, v, mask, is_causal, dropout_p, scale, need_probs):  # noqa: ANN001
    """Attention replaced by its values (no work): what the model costs without attention, the speed-up bound."""
    return v, None


Case = tuple[float, dict[str, torch.Tensor], float, int]  # (sparsity, site -> mask, kept tile fraction, mask tile)


def lm_cases(args: argparse.Namespace, model: TransformerLM) -> list[Case]:
    """The cases (``Case``) to time: random causal tile masks per ``--sparsity``, or the masks of ``--masks``
    (sparsity = the share of valid entries they prune, as the run reported it)."""
    sites = find_sites(model)
    if args.masks is None:
        cases = []
        for sparsity in args.sparsity:
            mask, kept = tile_mask(model.cfg.block_len, model.cfg.n_heads, sparsity, args.tile)
            cases.append((sparsity, {name: mask for name in sites}, kept, 0))
        return cases
    return [mask_file_case(args.masks, model.cfg.block_len, args.tile)]


def mask_file_case(masks: MaskSet, length: int, tile: int) -> Case:
    """The case of a mask file at ``length``: its masks as stored (element or tile masks) and the share of valid
    ``tile``-tiles they keep (tile masks: their own tile, which must be ``tile``)."""
    if masks.tile and masks.tile != tile:
        raise SystemExit(f"--masks holds {masks.tile}-tile masks: pass --tile {masks.tile}")
    unit = 1 if masks.tile else tile  # count per mask unit: tile masks are already tiles
    n = -(-length // (masks.tile or 1))  # the mask grid: entries, or tiles of a tile mask
    valid = torch.ones(n, n, dtype=torch.bool).tril()  # causal entries (tiles) of the mask grid
    counts = [empty_tiles(m, valid.expand_as(m), unit) for m in masks.masks.values()]  # (empty, valid) per site
    kept = 1 - sum(e for e, _ in counts) / sum(t for _, t in counts)
    return float(masks.meta["achieved"]["overall"]), masks.masks, kept, masks.tile


def lm_model(args: argparse.Namespace) -> TransformerLM:
    """The demo-size LM (d 128, 4 layers, 4 heads, 8k vocabulary) at ``--lm-length``, or shaped like the model of
    ``--masks`` (its layers, heads and length; d 128; random weights: only the time is measured)."""
    shape = {"block_len": args.lm_length}
    if args.masks is not None:
        meta = args.masks.meta["model"]
        if meta.get("class") != f"{TransformerLM.__module__}.{TransformerLM.__name__}":
            raise SystemExit(f"--masks: the whole-LM benchmark times {TransformerLM.__name__} masks; "
                             f"{args.masks_path} was made for {meta.get('class')}")
        _, heads, max_q, _ = next(iter(meta["sites"].values()))
        shape = {"block_len": max_q, "n_layers": len(meta["sites"]), "n_heads": heads}
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=8000, dropout=args.lm_dropout, **shape))
    if args.masks is not None:
        args.masks.validate(model)  # raises naming the difference
    return model


def lm_rows(args: argparse.Namespace) -> list[dict]:
    """The whole LM (``lm_model``), same weights: inference (block and flex; also the stack without the output layer)
    and a training step (forward + backward, block; flex too on CUDA) against dense causal SDPA."""
    model = lm_model(args).to(args.device).eval()
    length = model.cfg.block_len
    x = torch.randint(0, 8000, (args.batch, length), device=args.device)
    sites = find_sites(model)
    rows = []

    def train_step() -> None:
        model.train()  # dropout (--lm-dropout) acts in training only
        model(x, x)[1].backward()
        model.eval()

    def use(masks: dict[str, torch.Tensor] | None, backend: str, tile: int = 0) -> None:
        for name, site in sites.items():
            site.set_mask(None if masks is None else masks[name].to(args.device), tile=tile)
            site.backend = backend

    train_backends = ["block", "flex"] if args.device == "cuda" else ["block"]  # flex: no CPU backward (torch 2.13)
    runs = [("LM inference", lambda: model(x), ["block", "flex"]),
            ("LM body inference", lambda: model.hidden(x), ["block"]),  # the stack without the output layer
            ("LM train step", train_step, train_backends)]
    cases = lm_cases(args, model)
    for what, fn, sparse_backends in runs:
        training = what == "LM train step"
        with torch.set_grad_enabled(training):
            dense = timed(fn, args.repeats, args.device)
            rows.append({"what": what, "length": length, "sparsity": 0.0, "backend": "sdpa causal (dense)",
                         "seconds": dense, "ratio": 1.0, "ideal": 1.0, "mb": memory_mb(fn, args.device, training)})
            if what == "LM inference":  # the bound on any attention speed-up: the model with attention skipped
                use(None, "skip (bound)")
                s = timed(fn, args.repeats, args.device)
                rows.append({"what": what, "length": length, "sparsity": 1.0, "backend": "skip (bound)",
                             "seconds": s, "ratio": dense / s, "ideal": float("inf"), "mb": float("nan")})
                use(None, "sdpa")
            rows += masked_rows(args, what, length, fn, dense, cases, sparse_backends, use, training)
    return rows


def masked_rows(args: argparse.Namespace, what: str, length: int, fn: Callable[[], object], dense: float,
                cases: list[Case], backends: list[str], use: Callable[..., None], training: bool) -> list[dict]:
    """``fn`` timed with each case's masks on each backend (``use(masks, backend, tile)`` installs them), against
    ``dense`` seconds; dense SDPA is installed again afterwards."""
    rows = []
    for sparsity, masks, kept, tile in cases:
        for backend in backends:
            use(masks, backend, tile)
            s = timed(fn, args.repeats, args.device)
            rows.append({"what": what, "length": length, "sparsity": sparsity, "backend": backend, "seconds": s,
                         "ratio": dense / s, "ideal": 1 / kept, "mb": memory_mb(fn, args.device, training)})
    use(None, "sdpa")
    return rows


def hf_rows(args: argparse.Namespace) -> list[dict]:
    """Prefill of a whole HF causal LM (``--model``, e.g. data/smollm2) at ``--model-lengths``: the model's own SDPA
    (dense), attention skipped (the bound), and AP sites on the block backend (and flex on CUDA) with causal tile
    masks at ``--sparsity`` (the diagonal tiles kept, as AP block masks keep them) or, with ``--masks``, a
    ``task=clm`` run's masks of this model (at their length). One sequence, ``logits_to_keep=1`` (what prefill
    computes), no cache; ``--dtype`` weights (bfloat16 on GPUs)."""
    from transformers import AutoModelForCausalLM

    from ap.models.hf import attach_sites

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    sparse_backends = ["block", "flex"] if args.device == "cuda" else ["block"]  # flex on CPU: slower than block
    lengths = args.model_lengths
    if args.masks is not None:
        _, _, max_q, _ = next(iter(args.masks.meta["model"]["sites"].values()))
        lengths = [max_q]
    rows = []
    for length in lengths:
        sites = attach_sites(model, length, backend="sdpa")  # (also switches the model to the "ap" implementation)
        heads = next(iter(sites.values())).n_heads
        if args.masks is not None:
            args.masks.validate(model)  # raises naming the difference
            cases = [mask_file_case(args.masks, length, args.tile)]
        else:
            cases = []
            for sparsity in args.sparsity:
                mask, kept = tile_mask(length, heads, sparsity, args.tile)
                cases.append((sparsity, {name: mask for name in sites}, kept, 0))
        x = torch.randint(0, model.config.vocab_size, (1, length), device=args.device)

        def prefill() -> None:
            model(input_ids=x, use_cache=False, logits_to_keep=1)

        def use(masks: dict[str, torch.Tensor] | None, backend: str, tile: int = 0) -> None:
            for name, site in sites.items():
                site.set_mask(None if masks is None else masks[name].to(args.device), tile=tile)
                site.backend = backend

        what = f"{Path(args.model).name} prefill"
        with torch.no_grad():
            model.set_attn_implementation("sdpa")  # the model's own attention: the dense reference
            dense = timed(prefill, args.repeats, args.device)
            rows.append({"what": what, "length": length, "sparsity": 0.0, "backend": "sdpa causal (dense)",
                         "seconds": dense, "ratio": 1.0, "ideal": 1.0, "mb": memory_mb(prefill, args.device, False)})
            model.set_attn_implementation("ap")
            use(None, "skip (bound)")
            s = timed(prefill, args.repeats, args.device)
            rows.append({"what": what, "length": length, "sparsity": 1.0, "backend": "skip (bound)", "seconds": s,
                         "ratio": dense / s, "ideal": float("inf"), "mb": float("nan")})
            rows += masked_rows(args, what, length, prefill, dense, cases, sparse_backends, use, False)
    return rows


def calibration_rows(args: argparse.Namespace) -> list[dict]:
    """Calibration of a whole HF causal LM (``--model``) on one sequence at ``--model-lengths`` with statistics per
    ``--tile`` tile, eager (the (H, L, L) probabilities of every site) and chunked (attention a chunk of query rows
    at a time, per-row tile sums handed to the statistics), against a dense evaluation of the same sequence (loss over every token,
    the model's attention through AP sites on SDPA); ratio = calibration time / evaluation time."""
    from transformers import AutoModelForCausalLM

    from ap.core.calibrate import recording
    from ap.core.stats import AttentionStats
    from ap.models.hf import attach_sites

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    rows = []
    for length in args.model_lengths:
        attach_sites(model, length, backend="sdpa")
        x = torch.randint(0, model.config.vocab_size, (1, length), device=args.device)

        def evaluate() -> None:
            model(input_ids=x, labels=x, use_cache=False)

        def calibrate(chunked: bool) -> Callable[[], None]:
            def run() -> None:
                with recording(model, AttentionStats(tile=args.tile)):
                    if not chunked:
                        next(m for m in model.modules() if getattr(m, "recorder", None)).recorder.chunk_tile = 0
                    model(input_ids=x, use_cache=False, logits_to_keep=1)  # as task=clm calibrates
            return run

        what = f"{Path(args.model).name} calibration"
        with torch.no_grad():
            dense = timed(evaluate, args.repeats, args.device, warmup=1)
            rows.append({"what": what, "length": length, "sparsity": 0.0, "backend": "evaluation (dense)",
                         "seconds": dense, "ratio": 1.0, "ideal": 1.0, "mb": float("nan")})
            for name, chunked in (("eager tiled", False), ("chunked tiled", True)):
                s = timed(calibrate(chunked), args.repeats, args.device, warmup=1)
                rows.append({"what": what, "length": length, "sparsity": 0.0, "backend": name, "seconds": s,
                             "ratio": s / dense, "ideal": 1.0, "mb": float("nan")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048], help="attention rows (none: LM only)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.9], help="share of valid tiles emptied")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--tile", type=int, default=FLEX_BLOCK_SIZE, help="mask tile = flex BLOCK_SIZE")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--mask-shapes", nargs="+", default=["random"], choices=["random", "ap"],
                        help="attention rows' tile masks: random kept tiles, or AP-shaped (sinks, band, then random; "
                             "block backend only)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="attention rows: only these (eager masked, sdpa masked, block, flex; default all)")
    parser.add_argument("--profile", action="store_true",
                        help="attention rows: also the block backend's flash kernels alone (CPU; torch.profiler)")
    parser.add_argument("--lm-length", type=int, default=2048, help="0 skips the whole-LM benchmark")
    parser.add_argument("--lm-dropout", type=float, default=0.0,
                        help="the LM's dropout (attention too) in the training step; the demo trains with 0.1")
    parser.add_argument("--masks", type=Path, default=None,
                        help="time the whole LM with this run's masks.pt (LM runs) instead of random tile masks")
    parser.add_argument("--model", type=str, default=None,
                        help="an HF causal LM folder: whole-model prefill rows instead of the LM rows (task=clm)")
    parser.add_argument("--model-lengths", type=int, nargs="+", default=[2048, 4096], help="prefill lengths (--model)")
    parser.add_argument("--calibration", action="store_true",
                        help="with --model: calibration (eager and chunked, per --tile tile) against a dense "
                             "evaluation; ratio = calibration time / evaluation time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations of --model (bfloat16 on GPUs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    args = parser.parse_args(argv)
    args.masks_path, args.masks = args.masks, None
    if args.masks_path is not None:
        try:
            args.masks = MaskSet.load(args.masks_path)
        except APError as e:
            raise SystemExit(f"--masks: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model and args.calibration:
        rows = calibration_rows(args)
    elif args.model:
        rows = attention_rows(args) + hf_rows(args)
    else:
        rows = attention_rows(args) + (lm_rows(args) if args.lm_length or args.masks is not None else [])

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B{args.batch} H{args.heads} D{args.dim}, tile {args.tile}; ratio = dense causal SDPA time / time")
    print(f"{'what':<18} {'L':>5} {'sparsity':>8} {'mask':<6} {'backend':<22} {'ms':>9} {'ratio':>6} {'ideal':>6} "
          f"{'of ideal':>8} {'MB':>8}")
    for r in rows:
        r.setdefault("mask", "")
        print(f"{r['what']:<18} {r['length']:>5} {r['sparsity']:>8.0%} {r['mask']:<6} {r['backend']:<22} "
              f"{1000 * r['seconds']:>9.2f} {r['ratio']:>6.2f} {r['ideal']:>6.2f} {r['ratio'] / r['ideal']:>8.2f} "
              f"{r['mb']:>8.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "benchmark.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["what", "length", "sparsity", "mask", "backend", "seconds", "ratio",
                                               "ideal", "mb"])
        writer.writeheader(), writer.writerows(rows)
    drawn = plot(rows, args.out / "benchmark.png")
    print(f"wrote {args.out / 'benchmark.csv'}" + (f" and {args.out / 'benchmark.png'}" if drawn else ""))
    return 0


def plot(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(r["what"], r["backend"], r["sparsity"], r["mask"]) for r in rows if r["sparsity"]})
    for (what, backend, sparsity, mask) in keys:
        pts = sorted((r["length"], r["ratio"]) for r in rows
                     if (r["what"], r["backend"], r["sparsity"], r["mask"]) == (what, backend, sparsity, mask))
        ax.plot(*zip(*pts), marker="o", label=f"{what}, {backend}, {sparsity:.0%}" + (f", {mask} mask" * bool(mask)))
    if not ax.lines:  # (calibration rows: no sparsity to draw)
        plt.close(fig)
        return False
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2), ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length"), ax.set_ylabel("speed-up vs dense causal SDPA")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
