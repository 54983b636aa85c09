"""Tiled statistics and tile masks (``pruning.tiled=true``): per-tile accumulation equals tiling element-wise
statistics, thresholds give the same tiles, and a model with tile masks computes what it computes with the element
masks they stand for, in every backend, padded or not."""

from __future__ import annotations

import pytest
import torch

from ap.callback import check_stats_memory
from ap.core import PruningSpec, APError, AttentionStats, MaskError, MaskSet, find_sites, make_maskset, real_positions
from ap.core.attention import tile_sum
from ap.core.masks import expand_tiles
from ap.core.threshold import achieved_sparsity, build_masks
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig
from test_sites_stats import pad_batch

T, L = 4, 10  # tile, positions (not a multiple of the tile: edge tiles are partial)


def fill(stats: list[AttentionStats], kind: str, window: int | None = None, seed: int = 0) -> None:
    """The same random batches, padded on either side and unpadded, into every statistics object of ``stats``."""
    g = torch.Generator().manual_seed(seed)
    for s in stats:
        s.add_site("a", kind, 2, L, L)
        s.add_site("b", kind, 2, L, L)
    for lengths, side in (([L, L], None), ([3, L, 7], "left"), ([9, 5], "right")):
        probs = torch.rand(len(lengths), 2, L, L, generator=g)  # (B, H, L, L)
        if side is None:
            pos = real_positions(None, L)
            qp = kp = pos
        else:
            _, pad = pad_batch([torch.zeros(n) for n in lengths], side, L)
            qp = kp = real_positions(pad, L)
        for s in stats:
            for name in ("a", "b"):
                s.update(name, probs * (1.5 if name == "b" else 1.0), qp, kp, window=window)


def test_tiled_statistics_of_bf16_probabilities_sum_in_float64():
    """bf16 calibration (a bf16 model): tile sums are accumulated in float64 like element statistics, so tiles rank as
    the element-wise statistics rank them (summed in bf16 they were off by up to 0.4 %)."""
    g = torch.Generator().manual_seed(0)
    n = 256
    elem, tiled = AttentionStats(), AttentionStats(tile=64)
    for s in (elem, tiled):
        s.add_site("a", "dec_self", 3, n, n)
    pos = real_positions(None, n)
    for _ in range(3):
        probs = torch.rand(8, 3, n, n, generator=g).softmax(-1).to(torch.bfloat16)  # (B, H, L, L)
        for s in (elem, tiled):
            s.update("a", probs, pos, pos)
    torch.testing.assert_close(tiled.sum["a"], tile_sum(elem.sum["a"], 64), rtol=1e-12, atol=0.0)
    assert torch.equal(tiled.count["a"], tile_sum(elem.count["a"], 64))


@pytest.mark.parametrize("kind,window", [("dec_self", None), ("enc_self", None), ("dec_self", 3)])
def test_tiled_statistics_are_the_tile_sums_of_element_statistics(kind, window):
    elem, tiled = AttentionStats(), AttentionStats(tile=T)
    fill([elem, tiled], kind, window)
    for name in ("a", "b"):
        assert tiled.sum[name].shape == (2, 3, 3) and tiled.count[name].shape == (3, 3)
        torch.testing.assert_close(tiled.sum[name], tile_sum(elem.sum[name], T), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tiled.count[name], tile_sum(elem.count[name], T), rtol=0, atol=0)
    assert tiled.signature() == elem.signature() == {n: [kind, 2, L, L] for n in ("a", "b")}


@pytest.mark.parametrize("policy,scope,keep_sinks", [("ap", "layer", 0), ("ap", "head", 2), ("ap", "global", 0),
                                                     ("random", "layer", 0), ("sink_window", "layer", 0)])
@pytest.mark.parametrize("kind", ["dec_self", "enc_self"])
def test_tiled_statistics_threshold_to_the_tiles_of_element_statistics(kind, policy, scope, keep_sinks):
    elem, tiled = AttentionStats(), AttentionStats(tile=T)
    fill([elem, tiled], kind, seed=1)
    kw = dict(scope=scope, policy=policy, block_size=T, keep_sinks=keep_sinks, seed=3)
    by_elem = build_masks(elem, PruningSpec(0.5, **kw))
    by_tile = build_masks(tiled, PruningSpec(0.5, **kw))
    causal = torch.ones(L, L, dtype=torch.bool).tril() if kind == "dec_self" else torch.ones(L, L, dtype=torch.bool)
    for name in by_elem:
        assert by_tile[name].shape == (2, 3, 3)
        assert torch.equal(expand_tiles(by_tile[name], T, L, L) & causal, by_elem[name])
    got, want = achieved_sparsity(by_tile, tiled), achieved_sparsity(by_elem, elem)
    assert got == pytest.approx(want) and 0.05 < got["overall"] < 0.7  # pruned something, as the element masks do


def test_tiled_statistics_refuse_other_tiles_row_scores_and_merging_with_element_statistics():
    tiled = AttentionStats(tile=T)
    fill([tiled], "dec_self")
    with pytest.raises(APError, match="pruning.block_size=4"):
        build_masks(tiled, PruningSpec(0.5, block_size=8))
    with pytest.raises(APError, match="score=row needs element-wise"):
        build_masks(tiled, PruningSpec(0.5, block_size=T, score="row"))
    with pytest.raises(APError, match="same pruning.block_size"):
        AttentionStats().merge(tiled)


def test_tiled_statistics_and_tile_masks_round_trip_through_their_files(tmp_path):
    model = TransformerLM(TransformerLMConfig(vocab_size=50, block_len=L, n_layers=2, n_heads=2, d_model=16, d_ff=32))
    names = list(find_sites(model))
    stats = AttentionStats(tile=T)
    g = torch.Generator().manual_seed(0)
    for name in names:
        stats.add_site(name, "dec_self", 2, L, L)
        stats.update(name, torch.rand(3, 2, L, L, generator=g), real_positions(None, L), real_positions(None, L))
    stats.save(tmp_path / "stats.pt")
    raw = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert raw["version"] == 2 and raw["tile"] == T and raw["shapes"][names[0]] == [2, L, L]
    again = AttentionStats.load(tmp_path / "stats.pt")
    assert again.tile == T and all(torch.equal(again.sum[n], stats.sum[n]) for n in names)
    again.validate(model)  # the signature is the sites' own shape, not the tiles'

    masks = make_maskset(stats, model, PruningSpec(0.5, block_size=T))
    assert masks.tile == T and masks.meta["achieved_blocks"]["block_size"] == T
    masks.save(tmp_path / "masks.pt")
    raw = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert raw["version"] == 2 and raw["meta"]["tile"] == T and raw["masks"][names[0]].shape == (2, 3, 3)
    loaded = MaskSet.load(tmp_path / "masks.pt")
    assert all(torch.equal(loaded.masks[n], masks.masks[n]) for n in names)
    assert loaded.element_mask(names[0]).shape == (2, L, L)

    raw["masks"][names[0]] = torch.ones(2, L, L, dtype=torch.bool)  # element mask in a tiled file
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(MaskError, match=r"\(2, 3, 3\) \(4-tiles of \(2, 10, 10\)\)"):
        MaskSet.load(tmp_path / "bad.pt")
    raw = torch.load(tmp_path / "masks.pt", weights_only=True)
    raw["version"] = 1  # tile masks claimed as element masks
    torch.save(raw, tmp_path / "bad1.pt")
    with pytest.raises(APError, match="damaged: version 1 with meta tile=4"):
        MaskSet.load(tmp_path / "bad1.pt")
    state = stats.state_dict()
    state["shapes"][names[0]] = [2, 20, 20]
    with pytest.raises(APError, match="does not tile"):
        AttentionStats.from_state_dict(state)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "block"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_tile_masks_compute_what_their_element_masks_compute(backend, padding):
    torch.manual_seed(0)
    length, tile = 40, 8
    model = TransformerLM(TransformerLMConfig(vocab_size=50, block_len=length, n_layers=2, n_heads=2, d_model=16,
                                             d_ff=32, dropout=0.0, backend=backend)).eval()
    sites = find_sites(model)
    tiles = {n: torch.rand(2, 5, 5) > 0.5 for n in sites}  # (H, Qb, Kb)
    for t in tiles.values():
        t |= torch.eye(5, dtype=torch.bool)  # every query keeps its own tile (no empty rows)
    x = torch.randint(0, 50, (2, length))

    def run(tile_masks: bool) -> torch.Tensor:
        for n, site in sites.items():
            if tile_masks:
                site.set_mask(tiles[n], tile=tile)
            else:
                site.set_mask(expand_tiles(tiles[n], tile, length, length))
        with torch.no_grad():
            return model(x)[0] if padding is None else forward_padded(model, x, padding)

    by_tiles, by_elements = run(True), run(False)
    torch.testing.assert_close(by_tiles, by_elements, rtol=1e-5, atol=1e-5)
    for site in sites.values():
        site.set_mask(None)
    with torch.no_grad():
        dense = model(x)[0] if padding is None else forward_padded(model, x, padding)
    assert not torch.allclose(dense, by_tiles, atol=1e-3)  # the masks do something


def forward_padded(model: TransformerLM, x: torch.Tensor, side: str) -> torch.Tensor:
    """Logits of ``model`` on ``x`` whose row 0 has 5 padding tokens on ``side`` (every site gets the padding)."""
    pad = torch.zeros_like(x, dtype=torch.bool)  # (B, T) True = pad
    pad[0, :5] = side == "left"
    pad[0, -5:] = side == "right"
    sites = find_sites(model).values()
    for site in sites:
        site.forward = lambda q, k, v, _f=site.forward, **kw: _f(q, k, v, q_padding=pad, k_padding=pad, **kw)
    try:
        logits = model(x)[0]  # (B, T, V)
    finally:
        for site in sites:
            del site.forward  # back to the class's forward
    return logits.masked_fill(pad[..., None], 0.0)  # padded positions' outputs are arbitrary


def test_element_statistics_too_large_for_memory_name_the_tiled_option():
    model = TransformerLM(TransformerLMConfig(vocab_size=50, block_len=4096, n_layers=2, n_heads=4, d_model=16,
                                              d_ff=32))
    with pytest.raises(APError, match="pruning.tiled=true pruning.block_size=64"):
        check_stats_memory(model, 0, limit=2**30)  # 2 sites x 5 x 4096^2 x 8 bytes = 1.25 GiB
    check_stats_memory(model, 64, limit=2**30)  # per 64-tile: 0.3 MiB


def test_a_tiled_run_prunes_the_tiles_an_element_wise_run_prunes(tiny_cfg, tmp_path):
    """``pruning.tiled=true`` end to end: masks.pt holds tile masks (version 2) equal to the tiles of the element-wise
    run with the same block_size, and the fine-tuned metrics agree (the two runs share the dense stage)."""
    from ap.run import run

    common = ["pruning=ap70", "pruning.block_size=8", "task.dense.max_steps=5", "task.finetune.max_steps=3"]
    elem = run(tiny_cfg(*common, out=tmp_path / "elem"))
    tiled = run(tiny_cfg(*common, "pruning.tiled=true", out=tmp_path / "tiled"))
    a, b = MaskSet.load(tmp_path / "elem/masks.pt"), MaskSet.load(tmp_path / "tiled/masks.pt")
    assert a.tile == 0 and b.tile == 8 and b.meta["calibration"] == a.meta["calibration"]
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    for name in a.masks:
        assert b.masks[name].shape == (2, 4, 4)
        assert torch.equal(b.element_mask(name) & causal, a.masks[name])
    assert tiled["sparsity_achieved"] == pytest.approx(elem["sparsity_achieved"])
    assert tiled["stages"]["dense"]["status"] == "reused"  # the calibration key differs, the dense key does not
    for key in ("val/ppl", "test/ppl"):
        assert tiled["metrics"][key] == pytest.approx(elem["metrics"][key], rel=1e-4)


@pytest.mark.parametrize("case", ["causal", "memory", "memory bias", "window", "padded causal", "padded enc_self",
                                  "cross", "bf16 causal"])
def test_chunked_calibration_gives_the_eager_tiled_statistics(case, monkeypatch):
    """Tiled calibration computes attention a chunk of query rows at a time (never the (B, H, Tq, Tk) probabilities)
    and hands the statistics per-row tile sums (padded calls: the chunk's probabilities): the statistics equal eager
    calibration's within 1e-6 and the outputs eager attention's, for causal, memory (Transformer-XL), sliding-window,
    padded and cross sites, with a score bias (Transformer-XL's relative term) and bf16 inputs (scores in float32)."""
    import ap.core.sites as sites_mod
    from ap.core import AttentionSite
    from ap.core.calibrate import recording

    monkeypatch.setattr(sites_mod, "CHUNK_ELEMENTS", 2 * 3 * 40 * 8)  # several chunks of 8 rows
    n_q, n_k = (24, 40) if case in ("memory", "memory bias", "cross") else (40, 40)
    kind = {"padded enc_self": "enc_self", "cross": "cross"}.get(case, "dec_self")
    window = 9 if case == "window" else None
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (n_q, n_k, n_k))
    pad = torch.zeros(2, n_k, dtype=torch.bool)
    pad[1, :7] = True  # the second row left-padded by 7
    kw = {"k_padding": pad, "q_padding": pad} if case == "padded causal" else \
        {"k_padding": pad} if case == "padded enc_self" else {}
    if case == "memory bias":
        kw["bias"] = torch.randn(1, 3, n_q, n_k, generator=g)
    if case == "bf16 causal":  # eager on the same values in float32; the chunked path computes in float32
        q, k, v = (x.bfloat16().float() for x in (q, k, v))
    stats, calls = {}, []  # (how the statistics got a call: "probs" or per-row "tiles", its query rows)
    record, row_tiles = AttentionStats.record, AttentionStats.update_row_tiles
    monkeypatch.setattr(AttentionStats, "record",
                        lambda self, *a, **kw: calls.append(("probs", a[1].shape[2])) or record(self, *a, **kw))
    monkeypatch.setattr(AttentionStats, "update_row_tiles",
                        lambda self, *a, **kw: calls.append(("tiles", a[1].shape[2])) or row_tiles(self, *a, **kw))
    for mode in ("eager", "chunked"):
        site = AttentionSite(kind, 3, n_q, n_k, sliding_window=window)
        site.name = "s"
        model = torch.nn.ModuleDict({"s": site})
        stats[mode] = AttentionStats(tile=8)
        with recording(model, stats[mode]):
            if mode == "eager":
                site.recorder.chunk_tile = 0  # (the recorder of tiled statistics chunks by default)
            inputs = (q, k, v) if mode == "eager" or case != "bf16 causal" else (x.bfloat16() for x in (q, k, v))
            out = site(*inputs, **kw)
        stats[mode].out = out.float()
    # eager: all rows at once; chunked: chunks of them, as per-row tile sums unless the call is padded
    assert calls[0] == ("probs", n_q) and len(calls) > 2 and sum(n for _, n in calls[1:]) == n_q
    assert {how for how, _ in calls[1:]} == {"probs" if "padded" in case else "tiles"}
    torch.testing.assert_close(stats["chunked"].sum["s"], stats["eager"].sum["s"], rtol=1e-6, atol=1e-9)
    assert torch.equal(stats["chunked"].count["s"], stats["eager"].count["s"])
    assert stats["chunked"].tokens == stats["eager"].tokens
    bf16 = case == "bf16 causal"
    torch.testing.assert_close(stats["chunked"].out, stats["eager"].out, rtol=1e-2 if bf16 else 1e-5,
                               atol=1e-2 if bf16 else 1e-6)
