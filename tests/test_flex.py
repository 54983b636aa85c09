"""The flex (FlexAttention block-sparse) backend equals eager masked attention. Slow: each new shape compiles (~20 s)."""

import pytest
import torch

from ap.core import PruningSpec, AttentionSite, MaskError, attention, calibrate, make_maskset
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig

pytestmark = pytest.mark.slow


def test_flex_equals_eager_with_masks_causality_and_empty_rows():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 160, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 160, 160, generator=g) > 0.8
    mask[:, :, :128] &= torch.rand(2, 160, 128, generator=g) > 0.5
    mask[1, 5] = False  # a row with no kept key outputs zeros
    for causal in (False, True):
        ref, _ = attention(q, k, v, mask=mask, is_causal=causal, backend="eager")
        out, _ = attention(q, k, v, mask=mask, is_causal=causal, backend="flex")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[:, 1, 5].abs().max() == 0


def test_flex_site_caches_block_masks_and_matches_eager_in_the_lm():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=50, block_len=160, n_layers=2, n_heads=2, d_model=32,
                                              d_ff=64, dropout=0.0))
    batches = [torch.randint(0, 50, (2, 160)) for _ in range(2)]
    masks = make_maskset(calibrate(model, batches, lambda x: model(x)), model, PruningSpec(0.9, block_size=32))
    masks.install(model)
    model.eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.site.backend = "sdpa"
        ref = model(batches[0])[0]
        for block in model.blocks:
            block.attn.site.backend = "flex"
        out = model(batches[0])[0]
        out_short = model(batches[0][:, :100])[0]  # another length: its own BlockMask
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_short, ref[:, :100], atol=1e-4, rtol=1e-4)
    assert len(model.blocks[0].attn.site._block_masks) == 2


def test_flex_refuses_what_it_cannot_do():
    site = AttentionSite("dec_self", 2, 8, 8, backend="flex")
    x = torch.randn(1, 2, 8, 4, requires_grad=True)
    with pytest.raises(MaskError, match="no backward on CPU"):
        site(x, x, x)
    with pytest.raises(MaskError, match="dropout"):
        attention(x.detach(), x.detach(), x.detach(), backend="flex", dropout_p=0.1)


def test_benchmark_script_writes_table_csv_and_plot(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark.py"), "--lengths", "256", "--sparsity", "0.75",
                           "--batch", "1", "--heads", "2", "--dim", "8", "--repeats", "1", "--tile", "64",
                           "--lm-length", "0", "--backward", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    assert len(rows) == 5 + 4  # forward: dense + 4 backends; fwd+bwd on CPU: dense + eager + sdpa masked + block
    block = next(r for r in rows if r["backend"] == "block" and r["what"] == "attention fwd+bwd")
    dense = next(r for r in rows if r["backend"].startswith("sdpa causal") and r["what"] == "attention fwd+bwd")
    assert 0 < float(block["mb"]) and 0 < float(dense["mb"])  # saved-for-backward memory is measured
    assert "flex" in proc.stdout and (tmp_path / "benchmark.png").stat().st_size > 1000
    # 256 positions in 64-wide tiles: 10 valid tiles; the 4 diagonal ones are always kept (> 25 %): ideal 10/4
    flex = next(r for r in rows if r["backend"] == "flex")
    assert float(flex["ideal"]) == 2.5 and float(flex["ratio"]) > 0


def test_benchmark_script_lm_rows(tmp_path):
    """The whole-LM section alone (no attention rows): inference, the stack without its output layer, a training step."""
    import csv
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark.py"), "--lengths", "--lm-length", "128",
                           "--lm-dropout", "0.1", "--sparsity", "0.9", "--batch", "1", "--repeats", "1",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    assert [(r["what"], r["backend"]) for r in rows] == [
        ("LM inference", "sdpa causal (dense)"), ("LM inference", "skip (bound)"), ("LM inference", "block"),
        ("LM inference", "flex"),
        ("LM body inference", "sdpa causal (dense)"), ("LM body inference", "block"),
        ("LM train step", "sdpa causal (dense)"), ("LM train step", "block")]
    assert all(float(r["seconds"]) > 0 for r in rows)


def test_auto_backend_runs_block_at_inference_on_cpu_and_matches_eager():
    from test_sites_stats import tile_mask_site

    site = tile_mask_site(0.9)
    q, k, v = (torch.randn(1, 2, 512, 8) for _ in range(3))
    with torch.no_grad():
        out = site(q, k, v)
        assert site._auto_logged == {("block", False)}, "on CPU auto runs block (faster than flex) at inference"
        assert [key[0] for key in site._block_masks] == ["block"]  # one block plan, no flex BlockMask
        site.backend = "eager"
        torch.testing.assert_close(out, site(q, k, v), atol=1e-5, rtol=1e-5)


def test_benchmark_script_times_a_runs_own_masks(tmp_path):
    """--masks: the whole LM shaped like the masks' model, timed with those masks; a mask file of another model fails
    with a one-line error naming it."""
    import csv
    import subprocess
    import sys

    from conftest import ROOT

    from ap.core import MaskSet, model_signature
    from ap.models.transformer_lm import TransformerLM, TransformerLMConfig

    model = TransformerLM(TransformerLMConfig(vocab_size=50, block_len=128, n_layers=2, n_heads=2))
    g = torch.Generator().manual_seed(0)
    masks = {name: (torch.rand(2, 128, 128, generator=g) > 0.7).tril() for name in model_signature(model)["sites"]}
    meta = {"model": model_signature(model), "sparsity": 0.7, "scope": "layer", "policy": "ap", "calibration": {},
            "achieved": {"overall": 0.7}, "block_size": 0, "created": "now", "config": {}}
    MaskSet(masks, meta).save(tmp_path / "masks.pt")
    cmd = [sys.executable, str(ROOT / "scripts/benchmark.py"), "--lengths", "--batch", "1", "--repeats", "1",
           "--masks", str(tmp_path / "masks.pt"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "benchmark.csv")))
    assert {(r["what"], r["length"]) for r in rows} == {(w, "128") for w in ("LM inference", "LM body inference",
                                                                              "LM train step")}
    assert {r["sparsity"] for r in rows if r["backend"] == "block"} == {"0.7"}

    meta["model"] = dict(meta["model"], **{"class": "fairseq.models.transformer.TransformerModel"})
    MaskSet(masks, meta).save(tmp_path / "other.pt")
    proc = subprocess.run(cmd[:-3] + [str(tmp_path / "other.pt"), "--out", str(tmp_path / "o2")], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "fairseq.models.transformer.TransformerModel" in proc.stderr
    assert not (tmp_path / "o2").exists()
