"""``policy=sink_window``: the static StreamingLLM pattern (sink keys + a local window) at a target sparsity."""

from functools import lru_cache

import pytest
import torch

from ap.core import PruningSpec, APError, AttentionStats, achieved_sparsity, build_masks, make_maskset, real_positions
from ap.core.threshold import SINKS
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig

KIND = {"dec": "dec_self", "enc": "enc_self", "x": "cross"}


def pattern(q: int, k: int, sinks: int, w: int, causal: bool) -> torch.Tensor:
    """``(q, k)`` bool: key ``j < sinks``, or within the window (``i - w < j <= i``; non-causal: ``|i - j| < w``)."""
    i, j = torch.arange(q)[:, None], torch.arange(k)[None, :]
    window = ((i - j) >= 0) & ((i - j) < w) if causal else (i - j).abs() < w
    keep = (j < sinks) | window
    return keep & (j <= i) if causal else keep


def full_stats(n: int = 16, heads: int = 2, names=("dec",), q: int | None = None) -> AttentionStats:
    """Hand-built statistics: every valid entry seen once (causal sites: the lower triangle), random sums."""
    g = torch.Generator().manual_seed(0)
    stats = AttentionStats()
    for name in names:
        rows = q or n
        stats.add_site(name, KIND[name], heads, rows, n)
        count = torch.ones(rows, n, dtype=torch.float64)
        stats.count[name] = count.tril() if name == "dec" else count
        stats.sum[name] = torch.rand(heads, rows, n, generator=g, dtype=torch.float64) * stats.count[name]
    return stats


@lru_cache
def ragged_stats(n: int = 96, seed: int = 0) -> AttentionStats:
    """Causal, bidirectional and cross sites with right-padded lengths: unequal counts, the last rows never seen.

    Cached: read-only (``build_masks`` does not change its statistics)."""
    g = torch.Generator().manual_seed(seed)
    stats = AttentionStats()
    for name, kind in KIND.items():
        stats.add_site(name, kind, 3, n, n)
        for _ in range(6):
            lengths = torch.randint(n // 6, n - 3, (5,), generator=g)
            pad = torch.arange(n)[None, :] >= lengths[:, None]  # (B, n)
            probs = torch.rand(5, 3, n, n, generator=g)
            stats.update(name, probs, real_positions(pad, n), real_positions(pad, n))
    return stats


def fraction(keep: torch.Tensor, count: torch.Tensor) -> float:
    w = count.expand_as(keep)
    return float((w * ~keep).sum() / w.sum())


def half_step(count: torch.Tensor, sinks: int, causal: bool) -> float:
    """Half the weight of the heaviest distance stripe (off the diagonal, outside the sinks), as a fraction of all
    valid weight: one window step prunes one stripe, so the closest window is at most this far off the target."""
    q, k = count.shape
    d = torch.arange(q)[:, None] - torch.arange(k)[None, :]
    d = d.clamp(min=0) if causal else d.abs()
    cand = count * (torch.arange(k)[None, :] >= sinks)
    return float(torch.bincount(d.reshape(-1), cand.reshape(-1))[1:].max()) / 2 / float(count.sum())


@pytest.mark.parametrize("name", ["dec", "enc"])
@pytest.mark.parametrize("sinks", [0, 2, 4])
def test_pattern_is_sinks_plus_window(name, sinks):
    """For every window w, the target that w achieves gives back exactly the sinks + window pattern on every head."""
    n, causal = 16, name == "dec"
    stats = full_stats(n, names=(name,))
    for w in range(1, n + 1):
        expected = pattern(n, n, sinks, w, causal)
        target = fraction(expected, stats.count[name])
        keep = build_masks(stats, PruningSpec(target, policy="sink_window"), sinks=sinks)[name]
        assert keep.dtype == torch.bool and keep.shape == (2, n, n)
        assert torch.equal(keep, expected.expand_as(keep)), (w, target)


@pytest.mark.parametrize("name", ["dec", "enc", "x"])
@pytest.mark.parametrize("scope", ["layer", "head"])
def test_target_is_met_within_one_window_step_over_valid_entries(name, scope):
    stats = ragged_stats()
    count, causal = stats.count[name], name == "dec"
    valid = count > 0
    for target in (0.1, 0.3, 0.5, 0.7):
        keep = build_masks(stats, PruningSpec(target, scope=scope, policy="sink_window"))[name]
        tol = half_step(count, SINKS, causal)
        assert tol < 0.02, "the check is meaningful: one stripe is a small part of the site"
        assert abs(fraction(keep, count) - target) <= tol + 1e-12, target
        assert abs(achieved_sparsity({name: keep}, stats)["overall"] - target) <= tol + 1e-12
        assert keep[:, ~valid].all() if not causal else keep[:, ~valid & torch.ones_like(valid).tril()].all(), \
            "entries never valid in calibration are not pruned (as for ap and random)"
        assert (keep[:, :, :SINKS] | ~valid[:, :SINKS]).all(), "sinks are kept"
        assert torch.equal(keep, keep[:1].expand_as(keep)), "every head has the same pattern"


def test_padding_positions_never_count():
    """Positions no input reaches (count 0) change neither the pattern on the real positions nor the sparsity."""
    n, extra = 24, 8
    short = full_stats(n, names=("dec", "enc"))
    padded = AttentionStats()
    for name in ("dec", "enc"):
        padded.add_site(name, KIND[name], 2, n + extra, n + extra)
        padded.count[name][:n, :n] = short.count[name]
        padded.sum[name][:, :n, :n] = short.sum[name]
    for target in (0.3, 0.6):
        a = build_masks(short, PruningSpec(target, policy="sink_window"))
        b = build_masks(padded, PruningSpec(target, policy="sink_window"))
        for name in ("dec", "enc"):
            assert torch.equal(b[name][:, :n, :n], a[name])
        assert achieved_sparsity(a, short) == achieved_sparsity(b, padded)
    # rows whose keys were reached rarely (count 1 instead of 100) buy little sparsity: a wider window is needed
    heavy = full_stats(n, names=("enc",))
    heavy.count["enc"][: n // 2, : n // 2] *= 100
    keep_heavy = build_masks(heavy, PruningSpec(0.5, policy="sink_window"))["enc"]
    keep_even = build_masks(full_stats(n, names=("enc",)), PruningSpec(0.5, policy="sink_window"))["enc"]
    assert keep_heavy.sum() < keep_even.sum()
    assert abs(fraction(keep_heavy, heavy.count["enc"]) - 0.5) <= half_step(heavy.count["enc"], SINKS, False)


@pytest.mark.parametrize("block_size", [0, 4])
def test_higher_target_keeps_a_subset(block_size):
    stats = ragged_stats()
    prev = None
    for target in (0.0, 0.2, 0.4, 0.6, 0.8, 0.95):
        masks = build_masks(stats, PruningSpec(target, policy="sink_window", block_size=block_size))
        if target == 0.0:
            assert all(m.all() if n != "dec" else torch.equal(m, torch.ones_like(m).tril()) for n, m in masks.items())
        if prev is not None:
            for n in masks:
                assert not (masks[n] & ~prev[n]).any(), (n, target)
            if target < 0.95:  # 0.95 is past the smallest pattern: the same masks as 0.8 (block) or a subset
                assert sum(int(m.sum()) for m in masks.values()) < sum(int(m.sum()) for m in prev.values()), target
        prev = masks


def test_unreachable_target_gives_sinks_and_diagonal_reported_truthfully():
    n = 16
    stats = full_stats(n, names=("dec", "enc"))
    masks = build_masks(stats, PruningSpec(0.99, policy="sink_window"), sinks=2)
    for name, causal in (("dec", True), ("enc", False)):
        expected = pattern(n, n, 2, 1, causal)
        assert torch.equal(masks[name], expected.expand_as(masks[name]))
        assert torch.diagonal(masks[name], dim1=1, dim2=2).all()
        assert achieved_sparsity(masks, stats)[name] == pytest.approx(fraction(expected, stats.count[name]))
    assert achieved_sparsity(masks, stats)["overall"] < 0.9


def test_cross_rows_past_the_keys_keep_their_nearest_key():
    """Cross-attention with more queries than keys and no sinks: a row the band misses keeps its nearest key."""
    stats = full_stats(12, names=("x",), q=20)
    keep = build_masks(stats, PruningSpec(0.9, policy="sink_window"), sinks=0)["x"]
    assert keep.any(-1).all(), "every query row keeps a key"
    assert keep[:, 19, 11].all() and keep[:, 19].sum(-1).eq(1).all()
    assert torch.diagonal(keep, dim1=1, dim2=2).all()
    with pytest.raises(APError, match="sinks"):
        build_masks(stats, PruningSpec(0.5, policy="sink_window"), sinks=-1)


def test_global_scope_is_one_window_for_every_site():
    """Sites of different lengths share one (sinks, window): the longer site loses more, the total hits the target."""
    stats = full_stats(32, names=("enc",))
    short = full_stats(12, names=("x",))
    stats.add_site("x", "cross", 2, 12, 12)
    stats.count["x"], stats.sum["x"] = short.count["x"], short.sum["x"]
    masks = build_masks(stats, PruningSpec(0.5, scope="global", policy="sink_window"))
    windows = [w for w in range(1, 33) if torch.equal(masks["enc"][0], pattern(32, 32, SINKS, w, False))]
    assert len(windows) == 1 and torch.equal(masks["x"][0], pattern(12, 12, SINKS, windows[0], False))
    a = achieved_sparsity(masks, stats)
    assert a["enc"] > a["x"] and abs(a["overall"] - 0.5) < 0.04, a
    layer = achieved_sparsity(build_masks(stats, PruningSpec(0.5, scope="layer", policy="sink_window")), stats)
    assert abs(layer["enc"] - 0.5) < 0.04 and abs(layer["x"] - 0.5) < 0.09, layer


@pytest.mark.parametrize("scope", ["layer", "head"])
def test_block_masks_are_the_pattern_on_tiles(scope):
    n, bs = 64, 8
    stats = full_stats(n, names=("dec",))
    keep = build_masks(stats, PruningSpec(0.7, scope=scope, policy="sink_window", block_size=bs))["dec"]  # (2, 64, 64)
    tiles = keep[:, ::bs, ::bs]  # (2, 8, 8): the top-left entry of each tile
    windows = [w for w in range(1, 9) if torch.equal(tiles[0], pattern(8, 8, 1, w, True))]  # 4 sinks: 1 tile
    assert len(windows) == 1, "the sink tile and a window of tiles around the diagonal tiles"
    tile_keep = tiles.repeat_interleave(bs, 1).repeat_interleave(bs, 2) & torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(keep, tile_keep), "tiles are kept or pruned whole (causal future aside)"
    step = (n // bs) * bs * bs / float(stats.count["dec"].sum())  # one stripe of tiles
    assert abs(achieved_sparsity({"dec": keep}, stats)["overall"] - 0.7) <= step / 2
    assert torch.diagonal(keep, dim1=1, dim2=2).all() and keep[:, :, 0].all()


def tiny_lm(block_len: int = 32) -> TransformerLM:
    return TransformerLM(TransformerLMConfig(vocab_size=20, block_len=block_len, n_layers=2, n_heads=2, d_model=8,
                                             d_ff=16))


def calibrated(model, seed: int):
    from ap.core import calibrate
    g = torch.Generator().manual_seed(seed)
    return calibrate(model, [torch.randint(0, 20, (4, 32), generator=g) for _ in range(2)], lambda x: model(x))


# One window step here is 32 of 528 entries: the closest window to 50 % prunes 47.9 %, within make_maskset's "out of
# reach" tolerance for sink_window (one stripe), not for ap/random (0.5 pt).
@pytest.mark.filterwarnings("error:.*out of reach")
def test_make_maskset_end_to_end_against_ap_and_random():
    model = tiny_lm()
    stats = calibrated(model, 0)
    sets = {p: make_maskset(stats, model, PruningSpec(0.5, policy=p)) for p in ("ap", "random", "sink_window")}
    sw = sets["sink_window"]
    assert sw.meta["policy"] == "sink_window"
    for name, keep in sw.masks.items():
        ref = sets["ap"].masks[name]
        assert keep.dtype == ref.dtype == torch.bool and keep.shape == ref.shape
        assert torch.equal(keep, pattern(32, 32, SINKS, int(keep[0, -1].sum()) - SINKS, True).expand_as(keep))
    got = {p: ms.meta["achieved"]["overall"] for p, ms in sets.items()}
    assert abs(got["ap"] - 0.5) < 0.005 and abs(got["random"] - 0.5) < 0.005
    assert abs(got["sink_window"] - got["ap"]) <= 32 / 528 / 2, got  # half of one 32-entry stripe of 528
    other = make_maskset(calibrated(model, 1), model, PruningSpec(0.5, policy="sink_window"))
    assert all(torch.equal(other.masks[n], sw.masks[n]) for n in sw.masks), "input-independent"
    sw.install(model)
    out = model(torch.randint(0, 20, (2, 32)))
    assert torch.isfinite(out if isinstance(out, torch.Tensor) else out[0]).all()
    with pytest.warns(UserWarning, match="out of reach"):
        make_maskset(stats, model, PruningSpec(0.9, policy="sink_window"))
