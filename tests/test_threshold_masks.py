"""Thresholding policies and the MaskSet file contract."""

import pytest
import torch

from ap.core import (APError, AttentionStats, MaskError, MaskSet, achieved_sparsity, block_sparsity, build_masks,
                     make_maskset, real_positions)
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig


def ragged_stats(seed: int = 0, n: int = 48) -> AttentionStats:
    """Three sites (causal, bidirectional, cross) with ragged, right-padded lengths: entries have unequal counts.

    ``n`` positions keep single entries light enough (< 0.5 pt of a head) for the target to be reachable.
    """
    g = torch.Generator().manual_seed(seed)
    stats = AttentionStats()
    for name, kind in (("dec", "dec_self"), ("enc", "enc_self"), ("x", "cross")):
        stats.add_site(name, kind, 3, n, n)
        for _ in range(6):
            lengths = torch.randint(n // 6, n - 3, (5,), generator=g)  # the last rows stay unseen
            pad = torch.arange(n)[None, :] >= lengths[:, None]  # (B, n)
            probs = torch.rand(5, 3, n, n, generator=g) ** 4
            stats.update(name, probs, real_positions(pad, n), real_positions(pad, n))
    return stats


def weighted_fraction(keep, count):
    w = count.expand_as(keep)
    return float((w * ~keep).sum() / w.sum())


@pytest.mark.parametrize("scope", ["layer", "head", "global"])
@pytest.mark.parametrize("policy", ["ap", "random"])
@pytest.mark.parametrize("target", [0.5, 0.9])
def test_target_sparsity_is_hit_over_valid_entries(scope, policy, target):
    stats = ragged_stats()
    masks = build_masks(stats, target, scope=scope, policy=policy)
    achieved = achieved_sparsity(masks, stats)
    assert abs(achieved["overall"] - target) < 0.005
    for name, keep in masks.items():
        if scope != "global":
            assert abs(weighted_fraction(keep, stats.count[name]) - target) < 0.005, name
        if scope == "head":
            for h in range(3):
                assert abs(weighted_fraction(keep[h], stats.count[name]) - target) < 0.005
        valid = stats.count[name] > 0
        assert (keep & valid).any(-1)[:, valid.any(-1)].all(), "a row with valid entries lost every key"
        unseen = ~valid.any(-1)  # rows no calibration input reached: kept (causal sites: up to the diagonal)
        full = torch.ones_like(keep[0]).tril() if name == "dec" else torch.ones_like(keep[0])
        assert unseen.any() and (keep[:, unseen] == full[unseen]).all()
    assert not masks["dec"].triu(1).any(), "causal-future entries are never kept"
    assert stats.count["dec"].triu(1).sum() == 0, "causal-future entries are never counted"


def test_ap_prunes_the_lowest_mean_probabilities():
    stats = ragged_stats()
    keep = build_masks(stats, 0.7, scope="layer")["enc"]
    mean, valid = stats.mean("enc"), (stats.count["enc"] > 0).expand_as(keep)
    best = mean.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)  # each row's protected entry
    candidates = valid & ~torch.zeros_like(valid).scatter_(-1, best, True)
    assert mean[candidates & ~keep].max() <= mean[candidates & keep].min()


def test_random_baseline_is_seeded_and_differs_from_ap():
    stats = ragged_stats()
    r0, r0b, r1 = (build_masks(stats, 0.5, policy="random", seed=s)["enc"] for s in (0, 0, 1))
    ap = build_masks(stats, 0.5)["enc"]
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1) and not torch.equal(r0, ap)


def test_per_kind_sparsity_and_bad_values():
    stats = ragged_stats()
    achieved = achieved_sparsity(build_masks(stats, {"cross": 0.3, "enc_self": 0.8}), stats)
    assert abs(achieved["x"] - 0.3) < 0.005 and abs(achieved["enc"] - 0.8) < 0.005 and achieved["dec"] == 0
    with pytest.raises(APError, match=r"\[0, 1\)"):
        build_masks(stats, 1.5)
    with pytest.raises(APError, match="scope"):
        build_masks(stats, 0.5, scope="row")


def tiny_lm(**kw) -> TransformerLM:
    return TransformerLM(TransformerLMConfig(vocab_size=20, block_len=8, n_layers=2, n_heads=2, d_model=8, d_ff=16, **kw))


def calibrated(model):
    from ap.core import calibrate
    return calibrate(model, [torch.randint(0, 20, (4, 8)) for _ in range(3)], lambda x: model(x))


def test_maskset_round_trip_and_install(tmp_path):
    model = tiny_lm()
    ms = make_maskset(calibrated(model), model, 0.5, config={"name": "ap50"})
    path = ms.save(tmp_path / "masks.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ap-masks" and raw["version"] == 1
    for key in ("model", "sparsity", "scope", "policy", "achieved", "calibration", "block_size", "created", "config"):
        assert key in raw["meta"], key
    assert raw["meta"]["calibration"] == {"split": "train", "batches": 3, "tokens": 96}
    loaded = MaskSet.load(path)
    assert loaded.masks.keys() == ms.masks.keys()
    for n in ms.masks:
        assert torch.equal(loaded.masks[n], ms.masks[n]) and loaded.masks[n].dtype == torch.bool
    loaded.install(model)
    assert all(torch.equal(m.attn.site.mask, ms.masks[f"blocks.{i}.attn.site"]) for i, m in enumerate(model.blocks))
    assert "overall" in loaded.report()
    pngs = loaded.heatmaps(tmp_path / "heat", {n: torch.rand(2, 8, 8) for n in ms.masks})
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)


def test_masks_of_another_model_name_the_first_difference(tmp_path):
    model = tiny_lm()
    ms = make_maskset(calibrated(model), model, 0.5)
    other = TransformerLM(TransformerLMConfig(vocab_size=20, block_len=8, n_layers=2, n_heads=4, d_model=8, d_ff=16))
    with pytest.raises(MaskError, match=r"blocks\.0\.attn\.site.*n_heads 2 \(masks\) vs 4 \(model\)"):
        ms.install(other)
    deeper = TransformerLM(TransformerLMConfig(vocab_size=20, block_len=8, n_layers=3, n_heads=2, d_model=8, d_ff=16))
    with pytest.raises(MaskError, match=r"blocks\.2\.attn\.site' is in the model but not in the masks"):
        ms.install(deeper)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(Exception):
        MaskSet.load(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(APError, match="not an ap mask file"):
        MaskSet.load(tmp_path / "other.pt")


def causal_lm_stats(n: int = 64, seed: int = 0) -> AttentionStats:
    """A causal site whose attention decays with distance, plus noise: block structure the AP score should find."""
    g = torch.Generator().manual_seed(seed)
    stats = AttentionStats()
    stats.add_site("dec", "dec_self", 2, n, n)
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0).double()
    for _ in range(4):
        logits = -dist / 8 + 0.5 * torch.randn(3, 2, n, n, generator=g, dtype=torch.float64)
        probs = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        stats.update("dec", probs, real_positions(None, n), real_positions(None, n))
    return stats


@pytest.mark.parametrize("policy", ["ap", "random"])
@pytest.mark.parametrize("scope", ["layer", "head"])
def test_block_masks_prune_whole_tiles_and_hit_the_target(policy, scope):
    stats, bs = causal_lm_stats(), 8
    keep = build_masks(stats, 0.8, scope=scope, policy=policy, block_size=bs)["dec"]  # (2, 64, 64)
    valid = (stats.count["dec"] > 0).expand_as(keep)
    tiles = keep.view(2, 8, bs, 8, bs)
    tiles_valid = valid.view(2, 8, bs, 8, bs)
    kept_tile = (tiles & tiles_valid).any(dim=(2, 4), keepdim=True)
    assert torch.equal(tiles & tiles_valid, kept_tile.expand_as(tiles) & tiles_valid), "tiles are kept or pruned whole"
    one_tile = float(bs * bs) / float(valid[0].sum())  # largest tile share of one head's valid entries
    assert abs(achieved_sparsity({"dec": keep}, stats)["overall"] - 0.8) <= one_tile
    assert (keep & valid).any(-1).all(), "every query row keeps a key"
    assert torch.diagonal(keep, dim1=1, dim2=2).all(), "self-attention keeps its diagonal tiles"
    assert block_sparsity({"dec": keep}, stats, bs)["overall"] > 0.7


def test_block_ap_keeps_the_dense_band_and_beats_random():
    stats = causal_lm_stats()
    ap, rnd = (build_masks(stats, 0.6, policy=p, block_size=8)["dec"] for p in ("ap", "random"))
    mass = lambda keep: float((stats.mean("dec") * keep).sum())  # noqa: E731 - calibrated probability mass kept
    assert mass(ap) > 1.3 * mass(rnd)
    assert ap[:, 40:48, 32:40].all(), "the tile just below the diagonal (recent tokens) is kept"


def test_element_masks_leave_few_empty_tiles():
    """The diagnostic reported in masks.pt meta: element-wise AP90 empties far fewer 8x8 tiles than block AP90."""
    stats = causal_lm_stats()
    element = build_masks(stats, 0.9)
    blocks = build_masks(stats, 0.9, block_size=8)
    assert block_sparsity(element, stats, 8)["overall"] < block_sparsity(blocks, stats, 8)["overall"]
    with pytest.raises(APError, match="block_size"):
        build_masks(stats, 0.9, block_size=-1)


def test_unreachable_block_target_warns():
    """64 positions in 32-wide tiles: the two diagonal tiles alone hold 1056 of 2080 entries (> 10 %)."""
    stats = causal_lm_stats()
    model_free = TransformerLM(TransformerLMConfig(vocab_size=10, block_len=64, n_layers=1, n_heads=2, d_model=8))
    stats.sum["blocks.0.attn.site"], stats.count["blocks.0.attn.site"] = stats.sum.pop("dec"), stats.count.pop("dec")
    stats.kinds["blocks.0.attn.site"] = stats.kinds.pop("dec")
    with pytest.warns(UserWarning, match="out of reach"):
        ms = make_maskset(stats, model_free, 0.9, block_size=32)
    assert ms.meta["achieved"]["overall"] == pytest.approx(1 - 1056 / 2080)
