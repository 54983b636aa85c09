"""Calibration side effects and mask application in the native LM."""

import pytest
import torch

from ap.core import PruningSpec, MaskSet, calibrate, find_sites, make_maskset
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig


def model_and_batches():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=30, block_len=10, n_layers=2, n_heads=2, d_model=16, d_ff=32))
    return model, [torch.randint(0, 30, (3, 10)) for _ in range(4)]


@pytest.mark.parametrize("start_training", [True, False])
def test_calibration_leaves_weights_and_mode_unchanged(start_training):
    model, batches = model_and_batches()
    model.train(start_training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    stats = calibrate(model, batches, lambda x: modes.append(model.training) or model(x), max_batches=3)
    assert modes == [False, False, False], "calibration runs in eval mode"
    assert all(m.training == start_training for m in model.modules()), "previous mode restored"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights unchanged"
    assert all(s.recorder is None for s in find_sites(model).values())
    assert stats.batches == 3 and stats.tokens == 90
    assert stats.count["blocks.0.attn.site"][9, 0] == 9  # 3 batches x 3 rows, every valid entry counted once


def test_calibration_restores_mode_after_an_error():
    model, batches = model_and_batches()
    model.train()

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, batches, boom)
    assert all(m.training for m in model.modules()) and all(s.recorder is None for s in find_sites(model).values())


@pytest.mark.parametrize("top_training", [True, False])
def test_calibration_restores_every_modules_own_mode(top_training):
    """A submodule in the other mode than the top (e.g. a frozen encoder kept in eval) gets its own mode back."""
    model, batches = model_and_batches()
    model.train(top_training)
    model.blocks[0].train(not top_training)
    before = {name: m.training for name, m in model.named_modules()}
    assert len(set(before.values())) == 2
    seen = []
    calibrate(model, batches, lambda x: seen.append({m.training for m in model.modules()}) or model(x))
    assert seen == [{False}] * len(batches), "every module runs in eval mode"
    assert {name: m.training for name, m in model.named_modules()} == before


def test_stats_equal_explicit_probabilities():
    """The recorded mean equals the mean of the eager probabilities over the batches (causal: lower triangle)."""
    model, batches = model_and_batches()
    stats = calibrate(model, batches, lambda x: model(x))
    model.eval()
    site = model.blocks[0].attn.site
    captured = []
    site.recorder = lambda s, p, qp, kp: captured.append(p)
    with torch.no_grad():
        for x in batches:
            model(x)
    site.recorder = None
    expected = torch.cat(captured).double().mean(0)  # (H, T, T)
    torch.testing.assert_close(stats.mean("blocks.0.attn.site"), expected.tril())


def test_all_true_masks_equal_dense_and_pruning_changes_outputs():
    model, batches = model_and_batches()
    model.eval()
    x = batches[0]
    dense = model(x)[0]
    stats = calibrate(model, batches, lambda b: model(b))
    full = make_maskset(stats, model, PruningSpec(0.0))
    assert all(torch.equal(m, torch.ones_like(m).tril()) for m in full.masks.values())
    full.install(model)
    torch.testing.assert_close(model(x)[0], dense)
    make_maskset(stats, model, PruningSpec(0.8)).install(model)
    pruned = model(x)[0]
    assert not torch.allclose(pruned, dense)
    for backend in ("eager", "sdpa"):  # both backends apply the same mask
        for s in find_sites(model).values():
            s.backend = backend
        torch.testing.assert_close(model(x)[0], pruned)
    MaskSet.uninstall(model)
    torch.testing.assert_close(model(x)[0], dense)
