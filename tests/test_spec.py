"""``PruningSpec``: one checked value from config to mask file and resume check; policies as registered functions."""

import pytest
import torch
from omegaconf import OmegaConf

from ap.config import PruningConfig
from ap.core import APError, AttentionStats, PruningSpec, build_masks, register_policy
from ap.core.threshold import POLICIES


def stats_of(n: int = 8) -> AttentionStats:
    """One bidirectional site ``x`` with random mean probabilities, every entry seen once."""
    stats = AttentionStats()
    stats.add_site("x", "enc_self", 2, n, n)
    stats.sum["x"] = torch.rand(2, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats.count["x"] = torch.ones(n, n, dtype=torch.float64)
    return stats


@pytest.mark.parametrize("kw, match", [
    ({"target": 1.0}, r"\[0, 1\)"), ({"target": {"cross": -0.1}}, r"\[0, 1\)"), ({"scope": "row"}, "scope"),
    ({"score": "median"}, "score"), ({"block_size": -1}, "block_size"), ({"keep_sinks": -2}, "keep_sinks"),
    ({"tile": 64, "block_size": 32}, "pruning.block_size=64"), ({"kinds": ("self",)}, "unknown site kind 'self'"),
    ({"tile": 8, "block_size": 8, "score": "row"}, "score=row needs element-wise"),
])
def test_validate_names_what_to_fix(kw, match):
    with pytest.raises(APError, match=match):
        PruningSpec(**kw).validate()


def test_unknown_policy_is_refused_where_policies_are_known():
    PruningSpec(policy="mine").validate()  # the core spec does not know the registry
    with pytest.raises(APError, match="unknown pruning policy 'mine'"):
        build_masks(stats_of(), PruningSpec(0.5, policy="mine"))


def test_config_spec_carries_every_setting():
    cfg = OmegaConf.merge(OmegaConf.structured(PruningConfig), {
        "policy": "random", "sparsity": 0.7, "kinds": ["cross", "enc_self"], "scope": "head", "seed": 3,
        "block_size": 16, "tiled": True, "keep_sinks": 2, "kind_sparsity": {"cross": 0.4}})
    spec = OmegaConf.to_object(cfg).spec()
    assert spec == PruningSpec(target={"enc_self": 0.7, "cross": 0.4}, kinds=("cross", "enc_self"), scope="head",
                               policy="random", score="mean", seed=3, block_size=16, keep_sinks=2, tile=16)


def test_difference_names_the_first_setting_that_differs_and_reads_older_meta():
    spec = PruningSpec(0.5, kinds=("dec_self",), block_size=8)
    meta = {"model": {"sites": {"s": ["dec_self", 2, 8, 8]}}, "sparsity": 0.5, "kinds": ["dec_self"],
            "scope": "layer", "policy": "ap", "block_size": 8}  # written before score/keep_sinks/tile were recorded
    assert spec.difference(meta) is None
    assert spec.difference({**meta, "scope": "head"}) == ("scope", "head", "layer")
    assert spec.difference({**meta, "keep_sinks": 4}) == ("keep_sinks", 4, 0)
    assert PruningSpec(0.9, kinds=("dec_self",), block_size=8).difference(meta) == ("sparsity", 0.5, 0.9)


def test_a_new_policy_is_one_registered_function():
    @register_policy("diagonal_first")
    def scores(units, gen):  # keep the units nearest the diagonal
        return {n: -(torch.arange(w.shape[1])[:, None] - torch.arange(w.shape[2])[None, :]).abs().double()
                .expand_as(w) for n, w in units.weights.items()}

    try:
        keep = build_masks(stats_of(), PruningSpec(0.5, policy="diagonal_first"))["x"]  # (2, 8, 8)
        dist = (torch.arange(8)[:, None] - torch.arange(8)[None, :]).abs()
        assert keep[:, dist == 0].all() and not keep[:, dist == 7].any()
        assert (~keep).float().mean() == pytest.approx(0.5, abs=1 / 64)
    finally:
        del POLICIES["diagonal_first"]
