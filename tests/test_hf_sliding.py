"""HF causal models with their own sliding-window layers through the "ap" attention.

Tiny randomly initialised models built from configs, with sequences longer than the window: Gemma3 (sliding layers
with a full-attention layer between them), Mistral (every layer sliding, the window only in its config) and Qwen2
(``use_sliding_window``, sliding from ``max_window_layers`` on). A site of a sliding layer sees only the keys that layer
sees (transformers: ``kv_idx > q_idx - sliding_window``) and counts only those in calibration.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import transformers  # the hf extra (make test installs it)
from test_hf_causal import (MAX_LEN, assert_left_padded_generate_equals_alone, install_random_masks, logits,
                            model_pair, pad, random_sequences, real_slice)

from ap.core import AttentionSite, MaskError, SiteKind, calibrate, real_positions
from ap.models.hf import ap_attention, ap_mask, attach_sites

VOCAB, WINDOW, LENGTHS = 50, 4, (11, 3, 7)  # two rows longer than the window, one shorter
ATOL = 1e-5
LAYOUTS = ("unpadded", "right", "left")


def gemma3() -> transformers.PreTrainedModel:
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=64,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def mistral() -> transformers.PreTrainedModel:
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=WINDOW, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def qwen2() -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


MODELS: dict[str, Callable[[], transformers.PreTrainedModel]] = {"gemma3": gemma3, "mistral": mistral, "qwen2": qwen2}
WINDOWS = {"gemma3": [WINDOW, None, WINDOW], "mistral": [WINDOW, WINDOW], "qwen2": [None, WINDOW]}  # per layer


def models(name: str) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedModel, dict[str, AttentionSite]]:
    """``(reference on sdpa, copy switched to "ap", its sites)``, float32, eval mode."""
    return model_pair(MODELS[name], MAX_LEN)


def sequences() -> list[torch.Tensor]:
    return random_sequences(LENGTHS, VOCAB)


def batch_of(seqs: list[torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """``unpadded``: two rows of the longest sequence (no attention mask); else padded on that side."""
    if layout == "unpadded":
        return {"input_ids": seqs[0][None].repeat(2, 1)}
    return pad(seqs, layout)


def rows(seqs: list[torch.Tensor], layout: str) -> list[tuple[int, torch.Tensor, slice]]:
    """``(row, its sequence, its real slice)`` of ``batch_of(seqs, layout)``."""
    if layout == "unpadded":
        return [(i, seqs[0], slice(0, len(seqs[0]))) for i in range(2)]
    return [(i, s, real_slice(len(s), max(LENGTHS), layout)) for i, s in enumerate(seqs)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sites_carry_the_layers_own_windows(name):
    _, model, sites = models(name)
    assert [site.sliding_window for site in sites.values()] == WINDOWS[name]
    assert all(site.kind is SiteKind.DEC_SELF for site in sites.values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ap_path_equals_the_models_own_sdpa_path(name):
    ref, model, _ = models(name)
    seqs = sequences()
    for layout in LAYOUTS:
        batch = batch_of(seqs, layout)
        out, expected = logits(model, **batch), logits(ref, **batch)
        for i, s, real in rows(seqs, layout):
            torch.testing.assert_close(out[i, real], expected[i, real], atol=ATOL, rtol=0,
                                       msg=lambda m: f"{layout} row {i}: {m}")
            torch.testing.assert_close(out[i, real], logits(ref, input_ids=s[None])[0], atol=ATOL, rtol=0,
                                       msg=lambda m: f"{layout} row {i} vs alone: {m}")


def test_the_window_matters_and_a_site_without_it_is_refused():
    ref, model, sites = models("gemma3")
    s = sequences()[0]
    wide = copy.deepcopy(ref)  # the same model with a window wider than the sequence
    wide.config.sliding_window = 64
    for layer in wide.model.layers:
        layer.self_attn.sliding_window = 64 if layer.self_attn.sliding_window else None
    assert not torch.allclose(logits(ref, input_ids=s[None]), logits(wide, input_ids=s[None]), atol=1e-3)
    next(iter(sites.values())).sliding_window = None
    with pytest.raises(MaskError, match="sliding_window=4"):
        logits(model, input_ids=s[None])


def test_mask_check_refuses_a_window_the_site_does_not_apply():
    """Without the model's ``sliding_window`` keyword the builder's mask still tells: the site must reproduce it."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    real = torch.tensor([[True] * 8, [False] * 2 + [True] * 6])  # (B, tokens): one row left-padded
    mask = ap_mask(2, 8, 8, mask_function=sliding_window_causal_mask_function(WINDOW), attention_mask=real,
                   local_size=WINDOW)
    assert mask.shape == (4, 1, 8, 8)  # the model's own mask, then causality and padding
    causal = mask[2:]
    assert torch.equal(mask[:2], causal & (torch.arange(8)[:, None] - torch.arange(8)[None, :] < WINDOW))
    q = torch.randn(2, 2, 8, 4)
    module = torch.nn.Module()
    module.ap_site = AttentionSite("dec_self", 2, 8, 8, sliding_window=WINDOW)
    ap_attention(module, q, q, q, mask)  # the window the site applies is the model's
    for window in (None, WINDOW + 1):
        module.ap_site = AttentionSite("dec_self", 2, 8, 8, sliding_window=window)
        with pytest.raises(MaskError, match="sliding window"):
            ap_attention(module, q, q, q, mask)
    module.ap_site = AttentionSite("dec_self", 2, 8, 8, sliding_window=WINDOW)
    with pytest.raises(MaskError, match="sliding window"):
        ap_attention(module, q, q, q, causal)  # a full-attention layer's mask at a window site


def test_mask_builder_covers_keys_a_sliding_cache_dropped():
    """A sliding-window cache passes keys from token ``kv_offset`` on; the mask starts at token 0."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    real = torch.tensor([[True] * 10, [False] * 3 + [True] * 7])  # (B, tokens)
    fn = sliding_window_causal_mask_function(WINDOW)
    full = ap_mask(2, 10, 10, mask_function=fn, attention_mask=real, local_size=WINDOW)  # (4, 1, 10, 10)
    step = ap_mask(2, 2, WINDOW + 1, q_offset=8, kv_offset=8 - WINDOW + 1, mask_function=fn, attention_mask=real,
                   local_size=WINDOW)
    assert torch.equal(step, full[:, :, 8:])


@pytest.mark.parametrize("name", ["gemma3"])
def test_an_ap_mask_changes_outputs_and_padded_rows_equal_the_sequence_alone(name):
    ref, model, sites = models(name)
    install_random_masks(sites)
    seqs = sequences()
    for layout in LAYOUTS:
        out = logits(model, **batch_of(seqs, layout))
        for i, s, real in rows(seqs, layout):
            alone = logits(model, input_ids=s[None])[0]  # masked, unpadded: masks at positions 0..n-1
            assert not torch.allclose(alone, logits(ref, input_ids=s[None])[0], atol=1e-3)  # the mask matters
            torch.testing.assert_close(out[i, real], alone, atol=ATOL, rtol=0, msg=lambda m: f"{layout} row {i}: {m}")


def expected_count(lengths: list[int], window: int | None) -> torch.Tensor:
    """Real (query, key) position pairs a layer sees, summed over rows: ``(MAX_LEN, MAX_LEN)``."""
    count = torch.zeros(MAX_LEN, MAX_LEN, dtype=torch.float64)
    for n in lengths:
        seen = torch.ones(n, n, dtype=torch.float64).tril()
        count[:n, :n] += seen if window is None else seen.triu(1 - window)
    return count


def test_calibration_counts_only_keys_inside_the_window():
    _, model, sites = models("gemma3")
    seqs = sequences()
    batches = [pad(seqs, "right"), pad(seqs[1:], "left"), pad(seqs[:2], "left", width=13)]
    stats = calibrate(model, batches, lambda b: model(**b))
    alone = calibrate(model, [{"input_ids": s[None]} for b in (seqs, seqs[1:], seqs[:2]) for s in b],
                      lambda b: model(**b))
    lengths = [len(s) for s in (*seqs, *seqs[1:], *seqs[:2])]
    for name, site in sites.items():
        count = expected_count(lengths, site.sliding_window)
        torch.testing.assert_close(stats.count[name], count, atol=0, rtol=0)
        torch.testing.assert_close(alone.count[name], count, atol=0, rtol=0)  # the unpadded fast path
        assert stats.sum[name][:, count == 0].abs().sum() == 0  # nothing recorded where nothing was seen
        torch.testing.assert_close(stats.sum[name], alone.sum[name], atol=1e-5, rtol=0)
        if site.sliding_window is not None:  # outside the band: never valid, though real causal pairs were there
            i, j = torch.arange(MAX_LEN)[:, None], torch.arange(MAX_LEN)[None, :]
            assert stats.count[name][i - j >= WINDOW].sum() == 0
            assert expected_count(lengths, None)[i - j >= WINDOW].sum() > 0


@pytest.mark.parametrize("layout", ["right", "left"])
def test_cached_steps_equal_the_full_forward_under_an_ap_mask(layout):
    """A two-step forward with Gemma3's own cache (sliding layers keep only the last ``window - 1`` keys) equals the
    full forward at every real position (docs/design.md, "The site contract")."""
    _, model, sites = models("gemma3")
    install_random_masks(sites)
    seqs = sequences()
    batch = pad(seqs, layout)
    full = logits(model, **batch)
    width = batch["input_ids"].shape[1]
    for split in ((6, 9) if layout == "right" else (width - 2, width - 1)):
        with torch.no_grad():
            first = model(**{k: v[:, :split] for k, v in batch.items()}, use_cache=True)
            assert first.cache.layers[0].is_sliding and first.cache.get_seq_length(0) == split
            second = model(input_ids=batch["input_ids"][:, split:], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"][:, split:], cache=first.cache, use_cache=True).logits
        stepped = torch.cat([first.logits, second], dim=1)  # (B, T, V)
        for i, s in enumerate(seqs):
            real = real_slice(len(s), width, layout)
            torch.testing.assert_close(stepped[i, real], full[i, real], atol=ATOL, rtol=0,
                                       msg=lambda m: f"split {split}, row {i}: {m}")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_generate_equals_generating_each_sequence_alone_under_an_ap_mask(cache):
    """Greedy search past the window: the sliding layers' caches drop (dynamic) or roll (static) their oldest keys."""
    _, model, sites = models("gemma3")
    install_random_masks(sites)
    assert_left_padded_generate_equals_alone(model, sequences(), cache)


def band_reference(q, k, v, window, q_pos, k_pos, mask=None):
    """Explicit softmax over real positions ``k_pos <= q_pos < k_pos + window`` (and ``mask``): ``(B, H, Tq, D)``."""
    gap = q_pos[:, None, :, None] - k_pos[:, None, None, :]  # (B, 1, Tq, Tk)
    keep = (gap >= 0) & (gap < window) & (k_pos >= 0)[:, None, None, :]
    keep = keep if mask is None else keep & mask
    att = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    return att.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num() @ v


@pytest.mark.parametrize("backend", ["eager", "sdpa", "block"])
def test_site_window_in_every_backend(backend):
    """The window at real positions: unpadded (fused paths), padded, a cached step with dropped keys, an AP mask."""
    g = torch.Generator().manual_seed(3)
    n, window, heads = 150, 70, 2
    site = AttentionSite("dec_self", heads, n, n, backend=backend, sliding_window=window)
    q, k, v = (torch.randn(2, heads, n, 16, generator=g) for _ in range(3))
    pos = torch.arange(n)[None]
    torch.testing.assert_close(site(q, k, v), band_reference(q, k, v, window, pos, pos), atol=ATOL, rtol=0)
    padding = torch.zeros(2, n, dtype=torch.bool)
    padding[1, :20] = True  # row 1 left-padded
    q_pos = k_pos = real_positions(padding, n)
    out = site(q, k, v, q_padding=padding, k_padding=padding)
    torch.testing.assert_close(out[0], band_reference(q, k, v, window, q_pos, k_pos)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :, 20:], band_reference(q, k, v, window, q_pos, k_pos)[1, :, 20:], atol=ATOL,
                               rtol=0)
    # a step of 3 queries after 130 cached keys of which the cache dropped the first 30: keys 30..132
    kept = k[:, :, :103], v[:, :, :103]
    out = site(q[:, :, :3], *kept, k_offset=30)
    expected = band_reference(q[:, :, :3], *kept, window, torch.arange(130, 133)[None], torch.arange(30, 133)[None])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    mask = torch.rand(heads, n, n, generator=g) < 0.5
    site.set_mask(mask | torch.eye(n, dtype=torch.bool))
    torch.testing.assert_close(site(q, k, v), band_reference(q, k, v, window, pos, pos, site.mask[None]), atol=ATOL,
                               rtol=0)
