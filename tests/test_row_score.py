"""Levers on AP's masks: pruning.score=row (ranked relative to a uniform row: mean probability x the row's number of
valid keys) and pruning.keep_sinks (every row keeps its first keys and its diagonal)."""

import pytest
import torch

from ap.core import PruningSpec, APError, AttentionStats, achieved_sparsity, build_masks
from test_threshold_masks import ragged_stats


def same_shape_rows(n: int = 32, heads: int = 2) -> AttentionStats:
    """A causal site whose every row has the same shape: probability decaying with the distance to the query, so raw
    means are about 1/(i+1) and shrink along the rows."""
    stats = AttentionStats()
    stats.add_site("dec", "dec_self", heads, n, n)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    logits = torch.where(j <= i, -0.3 * (i - j).float(), float("-inf"))  # (n, n)
    probs = torch.softmax(logits, -1).expand(1, heads, n, n)  # (1, H, n, n)
    stats.update("dec", probs, torch.arange(n)[None], torch.arange(n)[None])
    return stats


def kept_per_row(mask: torch.Tensor) -> torch.Tensor:
    return mask[0].sum(-1).float() / torch.arange(1, mask.shape[-1] + 1)  # (Q,) kept fraction of each row


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_row_score_spreads_pruning_over_rows_where_the_mean_prunes_late_rows(target):
    stats = same_shape_rows()
    by_mean, by_row = (kept_per_row(build_masks(stats, PruningSpec(target, score=s))["dec"]) for s in ("mean", "row"))
    assert by_mean[:4].min() == 1.0 and by_mean[-8:].max() < 1 - target  # early rows whole, late rows starved
    assert by_row[-8:].mean() > by_mean[-8:].mean()  # late rows keep more
    assert (by_row[8:].max() - by_row[8:].min()) < (by_mean[8:].max() - by_mean[8:].min())


@pytest.mark.parametrize("scope", ["layer", "head", "global"])
@pytest.mark.parametrize("block_size", [0, 8])
def test_row_score_hits_the_target_like_the_papers(scope, block_size):
    stats = ragged_stats(n=48)
    for score in ("mean", "row"):
        masks = build_masks(stats, PruningSpec(0.7, scope=scope, score=score, block_size=block_size))
        assert abs(achieved_sparsity(masks, stats)["overall"] - 0.7) < (0.005 if not block_size else 0.05)
    with pytest.raises(APError, match="unknown pruning score"):
        build_masks(stats, PruningSpec(0.5, score="median"))


@pytest.mark.parametrize("policy", ["ap", "random"])
@pytest.mark.parametrize("block_size", [0, 8])
def test_kept_sinks_and_diagonal_under_every_policy(policy, block_size):
    stats = ragged_stats(n=48)
    target = 0.3 if block_size else 0.6  # (reachable with 3 sink keys and the diagonal kept in every row)
    masks = build_masks(stats, PruningSpec(target, policy=policy, keep_sinks=3, block_size=block_size))
    assert abs(achieved_sparsity(masks, stats)["overall"] - target) < (0.005 if not block_size else 0.05)
    for name, keep in masks.items():
        valid = stats.count[name] > 0  # (Q, K)
        rows = valid.any(-1)
        assert keep[:, rows][:, :, :3][valid[rows][:, :3].expand_as(keep[:, rows][:, :, :3])].all(), name
        if name != "x":  # self-attention: the diagonal too
            diag = torch.diagonal(keep, dim1=1, dim2=2)[:, rows]  # (H, rows)
            assert diag.all(), name
    plain = build_masks(stats, PruningSpec(target, policy=policy, block_size=block_size))
    assert not all(torch.equal(plain[n], masks[n]) for n in masks)  # without it, some sinks or diagonals go


def test_sink_window_keeps_at_least_the_asked_sinks():
    stats = same_shape_rows()
    few, more = (build_masks(stats, PruningSpec(0.8, policy="sink_window", keep_sinks=k))["dec"] for k in (0, 8))
    assert more[:, 16:, :8].all() and not few[:, 16:, :8].all()
