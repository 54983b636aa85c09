"""Thresholding policies and the MaskSet file contract."""

import argparse
import re
import warnings

import pytest
import torch
from torch import nn

from ap.core import (APError, AttentionSite, AttentionStats, MaskError, MaskSet, PruningSpec, achieved_sparsity,
                     block_sparsity, build_masks, make_maskset, real_positions)
from ap.core.threshold import achieved_by_kind
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
    masks = build_masks(stats, PruningSpec(target, scope=scope, policy=policy))
    achieved = achieved_sparsity(masks, stats)
    assert abs(achieved["overall"] - target) < 0.005
    if scope == "global" and policy == "ap":
        assert one_threshold(masks, stats, list(masks)), "one threshold over every site"
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
    keep = build_masks(stats, PruningSpec(0.7, scope="layer"))["enc"]
    mean, valid = stats.mean("enc"), (stats.count["enc"] > 0).expand_as(keep)
    best = mean.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)  # each row's protected entry
    candidates = valid & ~torch.zeros_like(valid).scatter_(-1, best, True)
    assert mean[candidates & ~keep].max() <= mean[candidates & keep].min()


def test_random_baseline_is_seeded_and_differs_from_ap():
    stats = ragged_stats()
    r0, r0b, r1 = (build_masks(stats, PruningSpec(0.5, policy="random", seed=s))["enc"] for s in (0, 0, 1))
    ap = build_masks(stats, PruningSpec(0.5))["enc"]
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1) and not torch.equal(r0, ap)


def test_per_kind_sparsity_and_bad_values():
    stats = ragged_stats()
    achieved = achieved_sparsity(build_masks(stats, PruningSpec({"cross": 0.3, "enc_self": 0.8})), stats)
    assert abs(achieved["x"] - 0.3) < 0.005 and abs(achieved["enc"] - 0.8) < 0.005 and achieved["dec"] == 0
    with pytest.raises(APError, match=r"\[0, 1\)"):
        build_masks(stats, PruningSpec(1.5))
    with pytest.raises(APError, match="scope"):
        build_masks(stats, PruningSpec(0.5, scope="row"))


def scaled_stats(n: int = 16) -> AttentionStats:
    """Unpadded sites whose scores differ in scale: ``lo`` and ``hi`` (enc_self, 0.1 vs 1) and ``x`` (cross, 10)."""
    g = torch.Generator().manual_seed(0)
    stats = AttentionStats()
    for name, kind, scale in (("lo", "enc_self", 0.1), ("hi", "enc_self", 1.0), ("x", "cross", 10.0)):
        stats.add_site(name, kind, 2, n, n)
        for _ in range(3):
            probs = scale * torch.rand(4, 2, n, n, generator=g, dtype=torch.float64)
            stats.update(name, probs, real_positions(None, n), real_positions(None, n))
    return stats


def one_threshold(masks, stats, names) -> bool:
    """Whether one score threshold separates the pruned from the kept candidates (row bests aside) of ``names``."""
    pruned, kept = [], []
    for n in names:
        mean, valid = stats.mean(n), (stats.count[n] > 0).expand_as(masks[n])
        best = mean.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
        cand = valid & ~torch.zeros_like(valid).scatter_(-1, best, True)
        pruned.append(mean[cand & ~masks[n]]), kept.append(mean[cand & masks[n]])
    return bool(torch.cat(pruned).max() <= torch.cat(kept).min())


def test_global_scope_is_one_threshold_over_every_site():
    """A float target: global shares one threshold across sites and kinds (low-scale sites lose most), layer doesn't."""
    stats = scaled_stats()
    glob = build_masks(stats, PruningSpec(0.5, scope="global"))
    a = achieved_sparsity(glob, stats)
    assert abs(a["overall"] - 0.5) < 0.005
    assert a["lo"] > 0.9 and 0.3 < a["hi"] < 0.6 and a["x"] < 0.1, a
    assert one_threshold(glob, stats, ["lo", "hi", "x"])
    layer = build_masks(stats, PruningSpec(0.5, scope="layer"))
    a = achieved_sparsity(layer, stats)
    assert all(abs(a[n] - 0.5) < 0.005 for n in ("lo", "hi", "x")), a
    assert not one_threshold(layer, stats, ["lo", "hi"])


def test_global_scope_with_per_kind_targets_is_one_threshold_per_kind():
    stats = scaled_stats()
    masks = build_masks(stats, PruningSpec({"enc_self": 0.5, "cross": 0.5}, scope="global"))
    a, kinds = achieved_sparsity(masks, stats), achieved_by_kind(masks, stats)
    assert abs(kinds["enc_self"] - 0.5) < 0.005 and abs(a["x"] - 0.5) < 0.005
    assert a["lo"] > 0.85 and a["hi"] < 0.15, a  # lo and hi share the enc_self threshold
    assert one_threshold(masks, stats, ["lo", "hi"]) and not one_threshold(masks, stats, ["lo", "hi", "x"])


def test_kinds_and_sites_select_what_is_pruned():
    stats = scaled_stats()
    # one target over lo + hi; x stays dense
    masks = build_masks(stats, PruningSpec(0.5, scope="global", kinds=["enc_self"]))
    a = achieved_sparsity(masks, stats)
    assert a["x"] == 0 and abs(achieved_by_kind(masks, stats)["enc_self"] - 0.5) < 0.005 and a["lo"] > 0.85
    a = achieved_sparsity(build_masks(stats, PruningSpec({"enc_self": 0.5, "cross": 0.3}, kinds=iter(["cross"]))),
                          stats)
    assert a["lo"] == a["hi"] == 0 and abs(a["x"] - 0.3) < 0.005, "kinds restricts per-kind targets too"
    a = achieved_sparsity(build_masks(stats, PruningSpec(0.5, scope="global"), sites=iter(["lo", "x"])), stats)
    assert a["hi"] == 0 and abs((a["lo"] + a["x"]) / 2 - 0.5) < 0.005 and a["lo"] > 0.9
    with pytest.raises(APError, match="unknown site kind 'self'"):
        build_masks(stats, PruningSpec(0.5, kinds=["self"]))
    with pytest.raises(APError, match="unknown site kind 'encoder'"):
        build_masks(stats, PruningSpec({"encoder": 0.5}))


class ThreeSites(nn.Module):
    """Just the attention sites of an encoder-decoder: ``enc``, ``dec`` (n × n) and ``x`` (cross, n × ``x_keys``)."""

    def __init__(self, n: int = 16, x_keys: int = 16) -> None:
        super().__init__()
        self.enc = AttentionSite("enc_self", 2, n, n)
        self.dec = AttentionSite("dec_self", 2, n, n)
        self.x = AttentionSite("cross", 2, n, x_keys)


def three_site_stats(model: ThreeSites) -> AttentionStats:
    g = torch.Generator().manual_seed(0)
    stats = AttentionStats()
    for name, site in model.named_children():
        stats.add_site(name, site.kind, site.n_heads, site.max_q, site.max_k)
        for _ in range(3):
            probs = torch.rand(4, site.n_heads, site.max_q, site.max_k, generator=g)
            stats.update(name, probs, real_positions(None, site.max_q), real_positions(None, site.max_k))
    return stats


def test_maskset_records_the_pruned_kinds():
    model = ThreeSites()
    stats = three_site_stats(model)
    assert make_maskset(stats, model, PruningSpec(0.5)).meta["kinds"] == ["cross", "dec_self", "enc_self"]
    assert make_maskset(stats, model, PruningSpec(0.5, kinds="cross")).meta["kinds"] == ["cross"]
    ms = make_maskset(stats, model, PruningSpec(0.5, scope="global", kinds=iter(["dec_self", "enc_self"])))
    assert ms.meta["kinds"] == ["dec_self", "enc_self"] and ms.meta["achieved"]["x"] == 0
    assert abs(ms.meta["achieved_kinds"]["enc_self"] - 0.5) > 0.01, "one threshold over enc + dec, not one per kind"
    assert make_maskset(stats, model, PruningSpec({"cross": 0.2})).meta["kinds"] == ["cross"]
    lm = tiny_lm()
    with pytest.warns(UserWarning, match=r"site kinds \['cross'\] but this model's sites are \['dec_self'\]"):
        assert make_maskset(calibrated(lm), lm, PruningSpec(0.5, kinds=["cross"])).meta["kinds"] == []


def test_unreachable_per_kind_target_warns_for_that_kind():
    """Cross-attention over 2 keys keeps each row's best key: at most 50 % of it can be pruned."""
    model = ThreeSites(x_keys=2)
    stats = three_site_stats(model)
    with pytest.warns(UserWarning, match=r"cross target sparsity 80\.0% is out of reach: achieved 50\.0%") as rec:
        make_maskset(stats, model, PruningSpec({"cross": 0.8, "enc_self": 0.5}))
    assert not any("enc_self" in str(w.message) for w in rec), "the reachable kind does not warn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_maskset(stats, model, PruningSpec({"cross": 0.4, "enc_self": 0.5}))  # reachable: no warning
        # the dense cross site does not count
        make_maskset(stats, model, PruningSpec(0.7, kinds=["enc_self", "dec_self"]))
    with pytest.warns(UserWarning, match=r"target sparsity 80\.0% is out of reach"):
        make_maskset(stats, model, PruningSpec(0.8, kinds=["cross"]))


def tiny_lm(**kw) -> TransformerLM:
    return TransformerLM(TransformerLMConfig(vocab_size=20, block_len=8, n_layers=2, n_heads=2, d_model=8, d_ff=16, **kw))


def calibrated(model):
    from ap.core import calibrate
    return calibrate(model, [torch.randint(0, 20, (4, 8)) for _ in range(3)], lambda x: model(x))


def test_maskset_round_trip_and_install(tmp_path):
    model = tiny_lm()
    ms = make_maskset(calibrated(model), model, PruningSpec(0.5), config={"name": "ap50"})
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
    ms = make_maskset(calibrated(model), model, PruningSpec(0.5))
    other = TransformerLM(TransformerLMConfig(vocab_size=20, block_len=8, n_layers=2, n_heads=4, d_model=8, d_ff=16))
    with pytest.raises(MaskError, match=r"blocks\.0\.attn\.site.*n_heads 2 \(masks\) vs 4 \(model\)"):
        ms.install(other)
    deeper = TransformerLM(TransformerLMConfig(vocab_size=20, block_len=8, n_layers=3, n_heads=2, d_model=8, d_ff=16))
    with pytest.raises(MaskError, match=r"blocks\.2\.attn\.site' is in the model but not in the masks"):
        ms.install(deeper)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(APError, match=r"pruning\.masks_path=.*junk\.pt could not be read as an ap mask file.*corrupt"):
        MaskSet.load(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(APError, match=r"pruning\.masks_path=.*other\.pt is not an ap mask file"):
        MaskSet.load(tmp_path / "other.pt")


def test_mask_file_is_checked_whole_when_loaded(tmp_path):
    """A mask one row short or a missing/extra site fails at load, naming the site (and shapes), never a KeyError."""
    model = tiny_lm()
    ms = make_maskset(calibrated(model), model, PruningSpec(0.5))
    name = "blocks.1.attn.site"
    short = MaskSet({**ms.masks, name: ms.masks[name][:, :-1]}, ms.meta)
    with pytest.raises(MaskError, match=re.escape(f"{name!r} has shape (2, 7, 8) but its site is (2, 8, 8)")):
        MaskSet.load(short.save(tmp_path / "short.pt"))
    with pytest.raises(MaskError, match=re.escape("(2, 7, 8)")):
        short.install(model)
    missing = MaskSet({n: m for n, m in ms.masks.items() if n != name}, ms.meta)
    with pytest.raises(MaskError, match=re.escape(f"site {name!r} is in meta['model'] but has no mask")):
        MaskSet.load(missing.save(tmp_path / "missing.pt"))
    with pytest.raises(MaskError, match=re.escape(f"site {name!r}")):
        missing.install(model)
    extra = MaskSet({**ms.masks, "ghost": ms.masks[name]}, ms.meta)
    with pytest.raises(MaskError, match="mask of site 'ghost' has no entry in meta"):
        MaskSet.load(extra.save(tmp_path / "extra.pt"))
    not_tensor = {**ms.to_dict(), "masks": {**ms.masks, name: [[True]]}}
    torch.save(not_tensor, tmp_path / "list.pt")
    with pytest.raises(MaskError, match=re.escape(f"mask of site {name!r} must be a 3-D bool tensor, got list")):
        MaskSet.load(tmp_path / "list.pt")
    assert all(m.attn.site.mask is None for m in model.blocks), "nothing was installed"


def _truncated(path):
    torch.save({"x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])


def _stats_file(path):
    stats = AttentionStats()
    stats.add_site("s", "enc_self", 2, 4, 4)
    stats.save(path)


BAD_MASK_FILES = {
    "garbage": (lambda p: p.write_bytes(b"\x00\x01 garbage bytes"), "could not be read as an ap mask file.*: corrupt"),
    "truncated": (_truncated, "could not be read as an ap mask file"),
    "foreign": (lambda p: torch.save({"a": 1}, p), "is not an ap mask file"),
    "object": (lambda p: torch.save(argparse.Namespace(a=1), p), "is not an ap mask file"),
    "stats": (_stats_file, "is not an ap mask file.*pass it as pruning.stats_path"),
    "no meta": (lambda p: torch.save({"format": "ap-masks", "version": 1, "masks": {}}, p), "'meta' and 'masks'"),
}


@pytest.mark.parametrize("kind", list(BAD_MASK_FILES))
@pytest.mark.parametrize("key", [None, "experiment.masks"])
def test_unreadable_mask_file_is_one_error_naming_key_and_path(tmp_path, kind, key):
    write, what = BAD_MASK_FILES[kind]
    path = tmp_path / "masks.pt"
    write(path)
    with pytest.raises(APError, match=what) as err:
        MaskSet.load(path) if key is None else MaskSet.load(path, key=key)
    msg = str(err.value)
    assert f"{key or 'pruning.masks_path'}={path}" in msg and "weights_only" not in msg, msg
    with pytest.raises(APError, match=re.escape(f"pruning.masks_path={tmp_path / 'none.pt'} does not exist")):
        MaskSet.load(tmp_path / "none.pt")


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
    keep = build_masks(stats, PruningSpec(0.8, scope=scope, policy=policy, block_size=bs))["dec"]  # (2, 64, 64)
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
    ap, rnd = (build_masks(stats, PruningSpec(0.6, policy=p, block_size=8))["dec"] for p in ("ap", "random"))
    mass = lambda keep: float((stats.mean("dec") * keep).sum())  # noqa: E731 - calibrated probability mass kept
    assert mass(ap) > 1.3 * mass(rnd)
    assert ap[:, 40:48, 32:40].all(), "the tile just below the diagonal (recent tokens) is kept"


def test_element_masks_leave_few_empty_tiles():
    """The diagnostic reported in masks.pt meta: element-wise AP90 empties far fewer 8x8 tiles than block AP90."""
    stats = causal_lm_stats()
    element = build_masks(stats, PruningSpec(0.9))
    blocks = build_masks(stats, PruningSpec(0.9, block_size=8))
    assert block_sparsity(element, stats, 8)["overall"] < block_sparsity(blocks, stats, 8)["overall"]
    with pytest.raises(APError, match="block_size"):
        build_masks(stats, PruningSpec(0.9, block_size=-1))


def test_unreachable_block_target_warns():
    """64 positions in 32-wide tiles: the two diagonal tiles alone hold 1056 of 2080 entries (> 10 %)."""
    stats = causal_lm_stats()
    model_free = TransformerLM(TransformerLMConfig(vocab_size=10, block_len=64, n_layers=1, n_heads=2, d_model=8))
    stats.sum["blocks.0.attn.site"], stats.count["blocks.0.attn.site"] = stats.sum.pop("dec"), stats.count.pop("dec")
    stats.kinds["blocks.0.attn.site"] = stats.kinds.pop("dec")
    with pytest.warns(UserWarning, match="out of reach"):
        ms = make_maskset(stats, model_free, PruningSpec(0.9, block_size=32))
    assert ms.meta["achieved"]["overall"] == pytest.approx(1 - 1056 / 2080)
