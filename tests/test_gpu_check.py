"""scripts/gpu_check.py, the GPU battery: its dry mode (every command composes, the table is produced) and the pieces
its attention rows rely on (tile layouts, BlockMasks built from tiles), all on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
from ap.core.attention import (FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE_CUDA, attention, flex_block_mask,  # noqa: E402
                               flex_block_size)


def test_dry_run_composes_every_command_and_writes_the_table(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "gpu_check.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| section")]
    names = {ln.split(" | ")[1] for ln in rows}
    args = gpu_check.parse_args(["--dry-run"])
    assert {s.name for s in gpu_check.run_specs(args, "m", "s")} <= names  # every end-to-end run is in the table
    assert {"prefill 8k", "lm bf16 vs fp32 masks", "clm bf16 vs fp32 masks", "nccl 2 processes"} <= names
    assert {"ap 256 fwd", "ap 256 fwd+bwd", "random 256 fwd", "random 256 fwd+bwd"} <= names  # timed on CPU
    assert not [ln for ln in rows if "FAIL" in ln or "not run:" in ln]
    assert sum("dry: composes" in ln for ln in rows) == len(gpu_check.run_specs(args, "m", "s"))
    assert all("block" in ln and " ms " in ln for ln in rows if ln.startswith("| attention"))
    assert (tmp_path / "gpu_check.csv").read_text().count("\n") == len(rows) + 1


def test_a_command_that_does_not_compose_fails_its_row(tmp_path, monkeypatch):
    specs = gpu_check.run_specs
    monkeypatch.setattr(gpu_check, "run_specs", lambda *a: [*specs(*a), gpu_check.RunSpec(
        "broken", ["trainer=gpu", "pruning=ap101"], gpu_check._quality("val/ppl"))])
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--skip", "attention"]) == 1
    assert "| run | broken | FAIL: " in (tmp_path / "gpu_check.md").read_text()


def test_without_cuda_the_battery_asks_for_the_dry_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the battery runs for real")
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["ap", "random"])
def test_tile_layouts_keep_the_diagonal_and_the_asked_share(shape):
    tiles = gpu_check.tile_layout(32, 3, 0.6, shape, seed=1)  # (H, n, n)
    valid = torch.ones(32, 32, dtype=torch.bool).tril()
    assert not (tiles & ~valid).any() and tiles.diagonal(dim1=1, dim2=2).all()
    assert tiles.sum((1, 2)).tolist() == [round(0.4 * int(valid.sum()))] * 3
    assert not torch.equal(tiles[0], tiles[1])  # scattered tiles differ per head
    sinks_and_band = tiles[:, 1:, 0].all() and all(tiles[:, d:, :-d].diagonal(dim1=1, dim2=2).all() for d in (1, 4))
    assert sinks_and_band == (shape == "ap")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("block", [64, 128])
def test_block_masks_from_tiles_are_the_element_masks(block):
    """The BlockMask built from tiles (no element mask) gives eager masked attention's output, visits exactly the
    blocks with a kept tile, and marks full only wholly kept blocks below the diagonal."""
    from torch.nn.attention.flex_attention import flex_attention

    tiles = gpu_check.tile_layout(8, 2, 0.6, "ap", seed=2)  # (H, 8, 8) tiles of 64: L = 512
    keep = gpu_check.element_keep(tiles, 64)  # (H, 512, 512)
    bm = gpu_check.tile_block_mask(tiles, 64, block)
    q, k, v = torch.randn(3, 1, 2, 512, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    ref, _ = attention(q, k, v, mask=keep[None], backend="eager")
    out = flex_attention(q, k, v, block_mask=bm)  # unfused on CPU (warns once): mask_mod everywhere
    torch.testing.assert_close(out, ref)
    f = block // 64
    coarse = tiles.view(2, 8 // f, f, 8 // f, f)
    assert torch.equal(bm.to_dense()[0].bool(), coarse.any(4).any(2))
    n_full = int(bm.full_kv_num_blocks.sum())
    assert n_full == int((coarse.all(4).all(2) & torch.ones(8 // f, 8 // f, dtype=torch.bool).tril(-1)).sum()) > 0


def test_flex_blocks_are_128_on_cuda_and_64_on_cpu():
    """FlexAttention's CUDA kernels on Hopper tile 128 x 64 / 64 x 128: 64-blocks did not compile on an H200
    (torch 2.11); CPU keeps its faster 64."""
    assert flex_block_size("cuda") == FLEX_BLOCK_SIZE_CUDA == 128
    assert flex_block_size(torch.device("cpu")) == FLEX_BLOCK_SIZE == 64
    keep = torch.ones(256, 256, dtype=torch.bool).tril()
    assert flex_block_mask(keep).BLOCK_SIZE == (64, 64)
    assert flex_block_mask(keep, 128).BLOCK_SIZE == (128, 128)


def test_fitted_ap_layouts_keep_the_asked_share_from_sinks_and_band():
    """The benchmark's AP-shaped masks (fit=True): when sinks and band alone exceed the budget, only the asked share of
    them is kept (every kept off-diagonal tile is a sink or band tile); unfitted layouts keep them all."""
    valid = torch.ones(32, 32, dtype=torch.bool).tril()
    structure = torch.zeros(32, 32, dtype=torch.bool)
    structure[:, 0] = True
    for d in range(1, 5):
        structure |= torch.ones(32, 32, dtype=torch.bool).tril(-d) & ~torch.ones(32, 32, dtype=torch.bool).tril(-d - 1)
    fitted = gpu_check.tile_layout(32, 3, 0.9, "ap", seed=1, fit=True)  # (H, n, n)
    assert fitted.sum((1, 2)).tolist() == [round(0.1 * int(valid.sum()))] * 3
    assert fitted.diagonal(dim1=1, dim2=2).all()
    assert not (fitted & ~structure & ~torch.eye(32, dtype=torch.bool)).any()
    assert (gpu_check.tile_layout(32, 3, 0.9, "ap", seed=1).sum((1, 2)) > fitted.sum((1, 2))).all()
