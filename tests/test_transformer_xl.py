"""Transformer-XL with memory (model=transformer_xl): recurrence equals attention over the concatenated context with
the equivalent mask, AP masks over memory keys act where they should, calibration counts exactly the valid
(query, memory + segment key) pairs, and the pipeline runs with it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ap.core import PruningSpec, AttentionStats, MaskError, calibrate, find_sites
from ap.core.threshold import achieved_sparsity, build_masks
from ap.data.wikitext import read_tokens
from ap.models.transformer_xl import TransformerXL, TransformerXLConfig
from ap.run import run
from ap.tasks.lm import LMStreams
from conftest import TINY, compose_cfg

CFG = TransformerXLConfig(vocab_size=50, n_layers=2, n_heads=2, d_model=16, d_head=8, d_inner=32, dropout=0.0,
                          tgt_len=6, mem_len=6)


def segments(model: TransformerXL, x: torch.Tensor, **kw) -> tuple[torch.Tensor, list]:
    """Log-probs ``(B, S*T, V)`` of ``x`` read in segments of ``tgt_len`` with the memory carried along."""
    mems, outs = None, []
    t = model.cfg.tgt_len
    for s in range(0, x.shape[1], t):
        out = model(x[:, s:s + t], mems=mems, **kw)
        outs.append(out.log_probs)
        mems = out.mems
    return torch.cat(outs, dim=1), mems


@pytest.mark.parametrize("mem_len", [6, 4, 12])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("cutoffs,clamp_len", [([], -1), ([10, 30], 5)])
def test_memory_equals_the_concatenated_context_with_the_equivalent_mask(mem_len, backend, cutoffs, clamp_len):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, mem_len=mem_len, backend=backend, cutoffs=cutoffs, clamp_len=clamp_len)
    model = TransformerXL(cfg).eval()
    for p in model.parameters():  # non-zero u, v biases
        torch.nn.init.normal_(p, std=0.3)
    t, n_seg = cfg.tgt_len, 4
    x = torch.randint(0, 50, (2, n_seg * t))
    with torch.no_grad():
        recurrent, _ = segments(model, x)
        whole = TransformerXL(dataclasses.replace(cfg, tgt_len=n_seg * t, mem_len=0)).eval()
        whole.load_state_dict(model.state_dict())
        # query p of segment s sees the mem_len positions before the segment and the segment up to itself
        p = torch.arange(n_seg * t)
        lo = (p // t * t - mem_len).clamp(min=0)
        mask = (p[None, :] >= lo[:, None]) & (p[None, :] <= p[:, None])  # (4T, 4T)
        for site in find_sites(whole).values():
            site.set_mask(mask.expand(cfg.n_heads, -1, -1).clone())
        concatenated = whole(x).log_probs
        assert torch.allclose(recurrent, concatenated, atol=1e-5, rtol=0)
        for site in find_sites(whole).values():
            site.set_mask(None)
        assert not torch.allclose(recurrent[:, t:], whole(x).log_probs[:, t:], atol=1e-3)  # memory is not all of it


def test_a_pruned_memory_key_changes_only_the_outputs_that_attend_to_it():
    torch.manual_seed(1)
    model = TransformerXL(CFG).eval()
    x = torch.randint(0, 50, (2, 2 * CFG.tgt_len))
    with torch.no_grad():
        dense, _ = segments(model, x)
        last = find_sites(model)[f"layers.{CFG.n_layers - 1}.attn.site"]  # the last layer: nothing after it mixes rows
        keep = torch.ones(CFG.n_heads, CFG.tgt_len, CFG.mem_len + CFG.tgt_len, dtype=torch.bool)
        keep[0, 2, 1] = False  # head 0, query 2, memory slot 1
        last.set_mask(keep)
        pruned, _ = segments(model, x)
    t = CFG.tgt_len
    assert torch.equal(pruned[:, :t], dense[:, :t])  # first segment: the memory is empty, slot 1 is never reached
    changed = (pruned[:, t:] - dense[:, t:]).abs().amax(dim=(0, 2)) > 1e-6  # (T,) per query of the second segment
    assert changed.tolist() == [i == 2 for i in range(t)]


def test_calibration_counts_are_the_valid_pairs_with_an_unfilled_memory_at_the_start():
    cfg = dataclasses.replace(CFG, tgt_len=4, mem_len=6)
    model = TransformerXL(cfg)
    ids = torch.randint(0, 50, (3 * 13 + 1,))
    streams = LMStreams(ids, rows=3, tgt_len=4)  # 13 tokens per stream: segments of 4, 4, 4, 1
    mems = {}

    def forward(batch):
        x, y, s = batch
        out = model(x, y, mems=None if s == 0 else mems["m"])
        mems["m"] = out.mems

    stats = calibrate(model, [streams[s] for s in range(len(streams))], forward)
    t, m_len = cfg.tgt_len, cfg.mem_len
    expected = torch.zeros(t, m_len + t, dtype=torch.float64)
    filled = 0  # memory states at the start of each segment
    for length in (4, 4, 4, 1):
        for i in range(length):
            expected[i, m_len - filled: m_len + i + 1] += 3  # 3 streams
        filled = min(m_len, filled + length)
    for name in find_sites(model):
        assert torch.equal(stats.count[name], expected)
        assert stats.sum[name][:, expected == 0].abs().sum() == 0
        # every valid row's probabilities sum to one per observation: sum over keys = number of observations
        rows = stats.sum[name].sum(-1)  # (H, T)
        observations = torch.tensor([12.0, 9, 9, 9])  # rows 0-3: 4, 3, 3, 3 segments reach them, x 3 streams
        torch.testing.assert_close(rows, (expected > 0).any(-1).double() * observations.expand_as(rows))
    assert stats.tokens == 3 * 13


@pytest.mark.parametrize("score", ["mean", "row"])
def test_row_score_hits_the_target_sparsity_like_the_papers(score):
    torch.manual_seed(2)
    model = TransformerXL(CFG).eval()
    x = torch.randint(0, 50, (4, 5 * CFG.tgt_len))
    stats = AttentionStats()
    mems = {}

    def forward(s):
        out = model(x[:, s * CFG.tgt_len:(s + 1) * CFG.tgt_len], mems=mems.get("m"))
        mems["m"] = out.mems

    calibrate(model, range(5), forward, stats=stats)
    masks = build_masks(stats, PruningSpec(0.7, score=score))
    assert achieved_sparsity(masks, stats)["overall"] == pytest.approx(0.7, abs=0.01)
    for keep in masks.values():  # the causal future of the segment is never kept, the empty memory slots stay kept
        assert not keep[:, torch.arange(CFG.tgt_len)[:, None] + CFG.mem_len < torch.arange(CFG.mem_len +
                                                                                          CFG.tgt_len)].any()


def test_flex_refuses_the_relative_position_bias():
    """(block adds it per kept tile: tests/test_backend_defaults.py)"""
    model = TransformerXL(dataclasses.replace(CFG, backend="flex")).eval()
    with pytest.raises(MaskError, match="cannot add a score bias"):
        model(torch.randint(0, 50, (1, CFG.tgt_len)))


def test_streams_are_contiguous_rows_read_in_order():
    ids = torch.arange(31)
    streams = LMStreams(ids, rows=3, tgt_len=4)  # 10 tokens per stream (30 = 3 x 10; token 30 is the last target)
    x = torch.cat([streams[s][0] for s in range(len(streams))], dim=1)
    y = torch.cat([streams[s][1] for s in range(len(streams))], dim=1)
    assert len(streams) == 3 and torch.equal(x, ids[:30].view(3, 10)) and torch.equal(y, ids[1:31].view(3, 10))
    half = LMStreams(ids, rows=2, tgt_len=4, rank=1, world=2)
    assert torch.equal(half[0][0], ids[15:19][None])


def test_the_pipeline_prunes_transformer_xl_and_evaluates_with_memory(tiny_data, tmp_path):
    xl = ["model=transformer_xl", "model.n_layers=2", "model.n_heads=2", "model.d_model=32", "model.d_head=16",
          "model.d_inner=64", "model.tgt_len=8", "model.mem_len=8", "model.cutoffs=[20]", "model.dropout=0.0",
          f"data.dir={tiny_data}", *[o for o in TINY if not o.startswith(("model.", "data.block_len"))]]

    def tiny_cfg(*overrides: str, out):
        return compose_cfg([*xl, f"paths.output_dir={out}", *overrides])

    results = run(tiny_cfg("pruning=ap50", out=tmp_path / "ap"))
    assert results["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert results["config"]["model"]["eval_streams"] == 10
    masks = torch.load(tmp_path / "ap/masks.pt", weights_only=True)
    calibration = masks["meta"]["calibration"]  # the first 8 segments (calibration_batches) of 10 train streams
    assert (len(read_tokens(tiny_data / "wiki.train.tokens")) - 1) // 10 > 8 * 8
    assert calibration["batches"] == 8 and calibration["tokens"] == 8 * 10 * 8
    assert masks["meta"]["model"]["sites"]["layers.0.attn.site"] == ["dec_self", 2, 8, 16]
    assert json.loads((tmp_path / "ap/results.json").read_text())["metrics"]["test/ppl"] > 1
    no_mem = run(tiny_cfg("pruning=none", "model.eval_memory=false", out=tmp_path / "nomem"))
    assert no_mem["metrics"]["test/ppl"] != pytest.approx(results["dense_metrics"]["test/ppl"], rel=1e-4)


def test_sinks_are_refused_on_memory_keys():
    """keep_sinks and sink_window keep each row's first key slots; with memory those are the oldest memory slots
    (empty at a stream's start), not the stream's first tokens: refused, in the config check (before any training)
    and when masks are built; without memory (mem_len=0) they work."""
    from ap.config import check
    from ap.core import APError

    stats = {}
    for mem in (CFG.mem_len, 0):
        model = TransformerXL(dataclasses.replace(CFG, mem_len=mem)).eval()
        stats[mem] = AttentionStats()
        calibrate(model, range(2), lambda s: model(torch.randint(0, 50, (2, CFG.tgt_len))), stats=stats[mem])
    for kw in ({"keep_sinks": 2}, {"policy": "sink_window"}):
        with pytest.raises(APError, match="memory"):
            build_masks(stats[CFG.mem_len], PruningSpec(0.5, **kw))
        assert build_masks(stats[0], PruningSpec(0.5, **kw))  # no memory: the first keys are the sequence's first tokens
    for override in ("pruning.keep_sinks=4", "pruning=sink_window50"):
        with pytest.raises(APError, match="model.mem_len=0"):
            check(compose_cfg(["model=transformer_xl", override]))
        check(compose_cfg(["model=transformer_xl", "model.mem_len=0", override]))
