"""AttentionSite position alignment and AttentionStats accumulation at real token positions."""

import argparse
import re

import pytest
import torch

from ap.core import APError, AttentionSite, AttentionStats, MaskError, real_positions


def pad_batch(xs: list[torch.Tensor], side: str, total: int):
    """Stack (T_i, ...) tensors into (B, total, ...) with padding on ``side``; returns (batch, padding (B, total))."""
    out = torch.zeros(len(xs), total, *xs[0].shape[1:], dtype=xs[0].dtype)
    pad = torch.ones(len(xs), total, dtype=torch.bool)
    for i, x in enumerate(xs):
        s = 0 if side == "right" else total - len(x)
        out[i, s:s + len(x)], pad[i, s:s + len(x)] = x, False
    return out, pad


def test_real_positions_ignore_padding_side():
    pad = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert real_positions(pad, 4).tolist() == [[-1, -1, 0, 1], [0, 1, -1, -1]]
    assert real_positions(None, 3, offset=2).tolist() == [[2, 3, 4]]


@pytest.mark.parametrize("kind", ["enc_self", "dec_self"])
def test_padding_side_never_shifts_mask_positions(kind):
    """The same sequence alone or in a left/right padded batch gets the same outputs, with a per-row varying mask."""
    g = torch.Generator().manual_seed(0)
    site = AttentionSite(kind, n_heads=2, max_q=8, max_k=8, backend="eager")
    mask = torch.rand(2, 8, 8, generator=g) > 0.4
    mask |= torch.eye(8, dtype=torch.bool)
    site.set_mask(mask)
    seqs = [torch.randn(t, 2, 4, generator=g) for t in (5, 8, 3)]  # (T, H, D) each
    alone = [site(*(s.transpose(0, 1)[None],) * 3)[0] for s in seqs]  # (H, T, D)
    dense = AttentionSite(kind, n_heads=2, max_q=8, max_k=8, backend="eager")
    assert not torch.allclose(dense(*(seqs[1].transpose(0, 1)[None],) * 3)[0], alone[1]), "the mask matters"
    for side in ("left", "right"):
        x, pad = pad_batch(seqs, side, 8)  # (B, 8, H, D)
        x = x.transpose(1, 2)  # (B, H, 8, D)
        for backend in ("eager", "sdpa"):
            site.backend = backend
            out = site(x, x, x, q_padding=pad, k_padding=pad)  # (B, H, 8, D)
            for i, ref in enumerate(alone):
                torch.testing.assert_close(out[i][:, ~pad[i]], ref)


def test_incremental_steps_equal_full_forward():
    """A causal site decoding one query at a time against a growing key cache applies the same mask rows."""
    g = torch.Generator().manual_seed(1)
    site = AttentionSite("dec_self", n_heads=2, max_q=6, max_k=6)
    site.set_mask(torch.tril(torch.rand(2, 6, 6, generator=g) > 0.5) | torch.eye(6, dtype=torch.bool))
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    full = site(q, k, v)
    assert not torch.allclose(AttentionSite("dec_self", n_heads=2, max_q=6, max_k=6)(q, k, v), full), "mask matters"
    steps = torch.cat([site(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]) for t in range(6)], dim=2)
    torch.testing.assert_close(steps, full)


def test_incremental_step_after_a_left_padded_prefix():
    """One new query against a left-padded key cache sits at the row's own next real position."""
    g = torch.Generator().manual_seed(3)
    site = AttentionSite("dec_self", n_heads=2, max_q=8, max_k=8)
    site.set_mask(torch.tril(torch.rand(2, 8, 8, generator=g) > 0.5) | torch.eye(8, dtype=torch.bool))
    seqs = [torch.randn(t, 2, 4, generator=g) for t in (3, 6)]  # (T, H, D)
    x, pad = pad_batch(seqs, "left", 6)  # (B, 6, H, D)
    x = x.transpose(1, 2)  # (B, H, 6, D)
    step = site(x[:, :, -1:], x, x, k_padding=pad)  # the last real token of each row as the new query
    for i, s in enumerate(seqs):
        alone = site(*(s.transpose(0, 1)[None],) * 3)  # (1, H, T, D)
        torch.testing.assert_close(step[i, :, 0], alone[0, :, -1])
    dense = AttentionSite("dec_self", n_heads=2, max_q=8, max_k=8)(x[:, :, -1:], x, x, k_padding=pad)
    assert not torch.allclose(dense, step), "the mask matters"


@pytest.mark.parametrize("kind", ["enc_self", "dec_self", "cross"])
def test_a_batch_of_one_can_still_be_left_padded(kind):
    """Greedy search drops finished sentences until one row, left-padded to the batch's longest source, can remain:
    its mask entries are those of its real positions, as when the sentence runs alone (and for a decoding step)."""
    g = torch.Generator().manual_seed(4)
    site = AttentionSite(kind, n_heads=2, max_q=8, max_k=8)
    site.set_mask((torch.rand(2, 8, 8, generator=g) > 0.4) | torch.eye(8, dtype=torch.bool))
    s = torch.randn(5, 2, 4, generator=g)  # (T, H, D)
    x, pad = pad_batch([s], "left", 8)  # (1, 8, H, D)
    x = x.transpose(1, 2)  # (1, H, 8, D)
    alone = site(*(s.transpose(0, 1)[None],) * 3)  # (1, H, 5, D)
    for backend in ("eager", "sdpa", "block", "auto"):
        site.backend = backend
        out = site(x, x, x, q_padding=pad, k_padding=pad)  # (1, H, 8, D)
        torch.testing.assert_close(out[0][:, ~pad[0]], alone[0])
        if kind == "cross":  # one decoding step: the query at position 4 against the padded source
            step = site(x[:, :, -1:], x, x, k_padding=pad, q_offset=4)  # (1, H, 1, D)
            torch.testing.assert_close(step[0, :, 0], alone[0, :, 4])
    dense = AttentionSite(kind, n_heads=2, max_q=8, max_k=8)(*(s.transpose(0, 1)[None],) * 3)
    assert not torch.allclose(dense, alone), "the mask matters"


def test_site_rejects_masks_it_cannot_apply():
    site = AttentionSite("enc_self", n_heads=2, max_q=4, max_k=4)
    with pytest.raises(MaskError, match="heads"):
        site.set_mask(torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(MaskError, match="bool"):
        site.set_mask(torch.zeros(2, 4, 4))
    site.set_mask(torch.ones(2, 4, 4, dtype=torch.bool))
    x = torch.randn(1, 2, 6, 3)
    with pytest.raises(MaskError, match="covers 4x4"):
        site(x, x, x)


def by_hand(probs_list, pads, causal, n=8):
    """Reference: per-entry mean over every batch with Python loops, entries indexed by real positions."""
    h = probs_list[0].shape[1]
    total, count = torch.zeros(h, n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for probs, pad in zip(probs_list, pads):
        for b in range(probs.shape[0]):
            real = (~pad[b]).nonzero().flatten().tolist()
            for qi, qt in enumerate(real):
                for ki, kt in enumerate(real):
                    if causal and ki > qi:
                        continue
                    total[:, qi, ki] += probs[b, :, qt, kt].double()
                    count[qi, ki] += 1
    return total / count.clamp(min=1), count


@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("kind", ["enc_self", "dec_self"])
def test_stats_equal_by_hand_mean_with_padding(side, kind):
    g = torch.Generator().manual_seed(2)
    stats = AttentionStats()
    stats.add_site("s", kind, 2, 8, 8)
    probs_list, pads = [], []
    for lengths in ([3, 8, 5], [6, 2], [8]):
        probs = torch.rand(len(lengths), 2, 8, 8, generator=g)  # arbitrary values: positions are what is tested
        if side == "none":
            lengths = [8] * len(lengths)
        _, pad = pad_batch([torch.zeros(t) for t in lengths], "left" if side == "none" else side, 8)
        stats.update("s", probs, real_positions(pad, 8), real_positions(pad, 8))
        probs_list.append(probs), pads.append(pad)
    mean, count = by_hand(probs_list, pads, causal=kind == "dec_self")
    torch.testing.assert_close(stats.count["s"], count)
    torch.testing.assert_close(stats.mean("s"), mean)
    if kind == "dec_self":  # causal-future entries never counted
        assert stats.count["s"].triu(1).sum() == 0 and stats.sum["s"].triu(1).abs().sum() == 0


def test_unpadded_fast_path_matches_general_path():
    probs = torch.rand(3, 2, 8, 8)
    a, b = AttentionStats(), AttentionStats()
    for s in (a, b):
        s.add_site("s", "dec_self", 2, 8, 8)
    a.update("s", probs, real_positions(None, 8), real_positions(None, 8))
    no_pad = torch.zeros(3, 8, dtype=torch.bool)
    b.update("s", probs, real_positions(no_pad, 8), real_positions(no_pad, 8))
    torch.testing.assert_close(a.sum["s"], b.sum["s"])
    torch.testing.assert_close(a.count["s"], b.count["s"])


def test_merge_and_save_round_trip(tmp_path):
    parts = [AttentionStats() for _ in range(3)]
    whole = AttentionStats()
    for i, probs in enumerate(torch.rand(4, 2, 2, 5, 5)):
        for s in (parts[i % 2], whole):
            s.add_site("s", "enc_self", 2, 5, 5)
            s.update("s", probs, real_positions(None, 5), real_positions(None, 5))
    merged = parts[2].merge(parts[0]).merge(parts[1])
    torch.testing.assert_close(merged.mean("s"), whole.mean("s"))
    merged.save(tmp_path / "stats.pt")
    loaded = AttentionStats.load(tmp_path / "stats.pt")
    torch.testing.assert_close(loaded.sum["s"], merged.sum["s"])
    torch.testing.assert_close(loaded.count["s"], whole.count["s"])
    assert loaded.signature() == {"s": ["enc_self", 2, 5, 5]}
    with pytest.raises(APError, match=re.escape(f"pruning.stats_path={tmp_path / 'missing.pt'} does not exist")):
        AttentionStats.load(tmp_path / "missing.pt")


def _truncated(path):
    torch.save({"x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])


def _masks_file(path):
    torch.save({"format": "ap-masks", "version": 1, "meta": {}, "masks": {}}, path)


def _stats_state(**change):
    stats = AttentionStats()
    stats.add_site("s", "enc_self", 2, 4, 4)
    return {**stats.state_dict(), **change}


BAD_STATS_FILES = {
    "garbage": (lambda p: p.write_bytes(b"\x00\x01 garbage bytes"), "could not be read as an ap statistics file.*corrupt"),
    "truncated": (_truncated, "could not be read as an ap statistics file"),
    "foreign": (lambda p: torch.save({"a": 1}, p), "is not an ap statistics file"),
    "object": (lambda p: torch.save(argparse.Namespace(a=1), p), "is not an ap statistics file"),
    "masks": (_masks_file, "is not an ap statistics file.*pass it as pruning.masks_path"),
    "no sum": (lambda p: torch.save({k: v for k, v in _stats_state().items() if k != "sum"}, p), "damaged"),
    "bad count": (lambda p: torch.save(_stats_state(count={"s": torch.zeros(4, 5)}), p), r"\(4, 5\)"),
    "bad kind": (lambda p: torch.save(_stats_state(kinds={"s": "self"}), p), "kind 'self'"),
    "lost site": (lambda p: torch.save(_stats_state(kinds={}), p), "site 's' lacks"),
}


@pytest.mark.parametrize("kind", list(BAD_STATS_FILES))
@pytest.mark.parametrize("key", [None, "experiment.stats"])
def test_unreadable_stats_file_is_one_error_naming_key_and_path(tmp_path, kind, key):
    write, what = BAD_STATS_FILES[kind]
    path = tmp_path / "stats.pt"
    write(path)
    with pytest.raises(APError, match=what) as err:
        AttentionStats.load(path) if key is None else AttentionStats.load(path, key=key)
    msg = str(err.value)
    assert f"{key or 'pruning.stats_path'}={path}" in msg and "weights_only" not in msg, msg


def tile_mask_site(empty_share: float, length: int = 512, tile: int = 64) -> AttentionSite:
    """A causal site whose mask keeps the diagonal tiles plus the first ``1 - empty_share`` of the other valid tiles."""
    n = length // tile
    tiles = torch.eye(n, dtype=torch.bool)
    below = torch.ones(n, n, dtype=torch.bool).tril(-1).nonzero()
    extra = round((1 - empty_share) * n * (n + 1) / 2) - n
    tiles[below[:max(0, extra), 0], below[:max(0, extra), 1]] = True
    site = AttentionSite("dec_self", 2, length, length, backend="auto")
    site.set_mask(tiles.repeat_interleave(tile, 0).repeat_interleave(tile, 1).tril().expand(2, -1, -1).clone())
    return site


def test_auto_backend_choices():
    """On CPU every masked, unpadded call runs block, whatever its sparsity and length (the alternative, SDPA with a
    bool mask, was slower everywhere scripts/benchmark.py measured); dense and padded calls run SDPA."""
    sparse, dense_ish = tile_mask_site(0.9), tile_mask_site(0.5)
    q_pos = k_pos = real_positions(None, 512)
    window = (0, 0, 512, 512, torch.device("cpu"))
    for site in (sparse, dense_ish):
        site.name = "s"
    mask = sparse._aligned_mask(q_pos, k_pos)
    assert sparse.choose_backend(mask, True, False, False, 0.0, q_pos, k_pos, window) == "block", "CPU inference"
    assert sparse.choose_backend(mask, True, False, True, 0.0, q_pos, k_pos, window) == "block", "CPU training"
    assert sparse.choose_backend(mask, True, False, True, 0.1, q_pos, k_pos, window) == "block", "with dropout"
    gpu = window[:4] + (torch.device("cuda"),)
    assert sparse.choose_backend(mask, True, False, True, 0.0, q_pos, k_pos, gpu) == "sdpa", "CUDA: from 8k keys"
    half = dense_ish._aligned_mask(q_pos, k_pos)
    assert dense_ish.choose_backend(half, True, False, True, 0.0, q_pos, k_pos, window) == "block", "few empty tiles"
    short = (0, 0, 64, 64, torch.device("cpu"))
    assert dense_ish.choose_backend(half[..., :64, :64], True, False, False, 0.0, q_pos[:, :64], k_pos[:, :64],
                                    short) == "block", "short"
    step = (511, 0, 1, 512, torch.device("cpu"))  # one query against 512 cached keys: a decoding step
    assert sparse.choose_backend(mask[..., -1:, :], True, False, False, 0.0, q_pos[:, -1:], k_pos, step) == "sdpa"
    assert sparse.choose_backend(mask, True, True, False, 0.0, q_pos, k_pos, window) == "sdpa", "padded batch"
    assert sparse.choose_backend(None, True, False, False, 0.0, q_pos, k_pos, window) == "sdpa", "no mask: dense"
    x = torch.randn(1, 2, 512, 8, requires_grad=True)  # training on CPU runs (block) and matches eager
    out = sparse(x, x, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    sparse.backend = "eager"
    ref = sparse(x, x, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.sum(), x)[0])


def test_auto_backend_on_cuda_counts_flex_blocks_and_never_picks_block(monkeypatch):
    """On CUDA (measured on an H200 by scripts/gpu_check.py) flex runs 128-blocks and block is slower than SDPA: auto
    picks flex only when >= 75 % of the valid 128-blocks are empty (a mask of scattered 64-tiles empties its 64-tiles,
    not its 128-blocks: SDPA), and SDPA, never block, with attention dropout. (The decision only reads the window's
    device: no CUDA needed.)"""
    import ap.core.sites as sites

    monkeypatch.setattr(sites, "AUTO_SPARSE_MIN_LEN_CUDA", 1024)
    n, length = 16, 1024  # 16 x 16 tiles of 64
    lower = torch.ones(n, n, dtype=torch.bool).tril(-1)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    # 13 of the 28 lower 128-blocks visited by one 64-tile each: 78.7 % of the 64-tiles, 41.7 % of the 128-blocks empty
    scattered = torch.eye(n, dtype=torch.bool) | (lower & (i % 2 == 0) & ((j == 0) | (j == i - 2)))
    aligned = torch.eye(n // 2, dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1)  # the diagonal
    # 128-blocks: 77.8 % of them empty
    q_pos = k_pos = real_positions(None, length)
    cpu, gpu = (0, 0, length, length, torch.device("cpu")), (0, 0, length, length, torch.device("cuda"))
    choices = {}
    for name, tiles in (("scattered", scattered), ("aligned", aligned)):
        site = AttentionSite("dec_self", 1, length, length, backend="auto")
        site.name = name
        site.set_mask(tiles.repeat_interleave(64, 0).repeat_interleave(64, 1).tril()[None].clone())
        mask = site._aligned_mask(q_pos, k_pos)
        choices[name] = [site.choose_backend(mask, True, False, training, p, q_pos, k_pos, w)
                         for w in (cpu, gpu) for training, p in ((False, 0.0), (True, 0.0), (True, 0.1))]
        choices[name].append(round(site._empty_tiles[gpu], 3))
    assert choices["scattered"][:3] == ["block"] * 3, "CPU: 64-tiles mostly empty"
    assert choices["scattered"][3:6] == ["sdpa"] * 3, "CUDA: most 128-blocks visited"
    assert choices["aligned"][3:6] == ["flex", "flex", "sdpa"], "CUDA: empty 128-blocks; dropout: SDPA, not block"
    assert choices["aligned"][6] >= 0.75 > choices["scattered"][6]
