"""HF causal (decoder-only) models through the "ap" attention: padding on either side, AP masks, calibration, KV cache.

Tiny randomly initialised models built from configs: a Llama-style one with grouped-query heads and a GPT-2-style one.
Every row of a padded batch must equal the same sequence run alone (the sdpa implementation as reference).
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import transformers  # the hf extra (make test installs it)

from ap.core import AttentionSite, SiteKind, calibrate
from ap.models.hf import attach_sites

VOCAB, MAX_LEN, LENGTHS = 50, 16, (7, 3, 5)
SIDES = ("right", "left")
ATOL = 1e-5


def llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def gpt2() -> transformers.PreTrainedModel:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


MODELS: dict[str, Callable[[], transformers.PreTrainedModel]] = {"llama": llama, "gpt2": gpt2}


def model_pair(make: Callable[[], transformers.PreTrainedModel], max_len: int = MAX_LEN
               ) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedModel, dict[str, AttentionSite]]:
    """``(reference on sdpa, copy switched to "ap", its sites)``, float32, eval mode."""
    torch.manual_seed(0)
    ref = make().float().eval()
    model = copy.deepcopy(ref)
    return ref, model, attach_sites(model, max_len)


def models(name: str) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedModel, dict[str, AttentionSite]]:
    return model_pair(MODELS[name])


def random_sequences(lengths: tuple[int, ...] = LENGTHS, vocab: int = VOCAB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=g) for n in lengths]


def sequences() -> list[torch.Tensor]:
    return random_sequences()


def real_slice(n: int, width: int, side: str) -> slice:
    return slice(0, n) if side == "right" else slice(width - n, width)


def pad(seqs: list[torch.Tensor], side: str, width: int | None = None) -> dict[str, torch.Tensor]:
    """A padded batch with position_ids counting real tokens (as ``generate`` does for left padding)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    am = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, real_slice(len(s), width, side)] = s
        am[i, real_slice(len(s), width, side)] = 1
    return {"input_ids": ids, "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}


def install_random_masks(sites: dict[str, AttentionSite], keep: float = 0.5) -> None:
    """A random keep-mask per site with the diagonal kept (every query row keeps a key)."""
    g = torch.Generator().manual_seed(2)
    for site in sites.values():
        mask = torch.rand(site.n_heads, MAX_LEN, MAX_LEN, generator=g) < keep
        site.set_mask(mask | torch.eye(MAX_LEN, dtype=torch.bool))


@torch.no_grad()
def logits(model: transformers.PreTrainedModel, **batch: torch.Tensor) -> torch.Tensor:
    return model(**batch).logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_causal_self_attention_is_a_dec_self_site(name):
    _, model, sites = models(name)
    assert len(sites) == model.config.num_hidden_layers
    assert all(site.kind is SiteKind.DEC_SELF for site in sites.values())
    assert model.config._attn_implementation == "ap"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_rows_equal_the_sequence_alone(name):
    ref, model, _ = models(name)
    seqs = sequences()
    for side in SIDES:
        out = logits(model, **pad(seqs, side))
        for i, s in enumerate(seqs):
            alone = logits(ref, input_ids=s[None])[0]  # (T, V)
            torch.testing.assert_close(out[i, real_slice(len(s), out.shape[1], side)], alone, atol=ATOL, rtol=0,
                                       msg=lambda m: f"{side}-padded row {i}: {m}")
            torch.testing.assert_close(logits(model, input_ids=s[None])[0], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_rows_equal_the_sequence_alone_under_an_ap_mask(name):
    ref, model, sites = models(name)
    install_random_masks(sites)
    seqs = sequences()
    for side in SIDES:
        out = logits(model, **pad(seqs, side))
        for i, s in enumerate(seqs):
            alone = logits(model, input_ids=s[None])[0]  # masked, unpadded: masks at positions 0..n-1
            assert not torch.allclose(alone, logits(ref, input_ids=s[None])[0], atol=1e-3)  # the mask matters
            torch.testing.assert_close(out[i, real_slice(len(s), out.shape[1], side)], alone, atol=ATOL, rtol=0,
                                       msg=lambda m: f"{side}-padded row {i}: {m}")


def expected_count(lengths: list[int]) -> torch.Tensor:
    """Real causal (query, key) position pairs summed over rows: ``(MAX_LEN, MAX_LEN)``."""
    count = torch.zeros(MAX_LEN, MAX_LEN, dtype=torch.float64)
    for n in lengths:
        count[:n, :n] += torch.tril(torch.ones(n, n, dtype=torch.float64))
    return count


@pytest.mark.parametrize("name", sorted(MODELS))
def test_calibration_counts_real_positions_whatever_the_padding_side(name):
    _, model, sites = models(name)
    seqs = sequences()
    batches = [pad(seqs, "right"), pad(seqs[1:], "left"), pad(seqs[:2], "left", width=9)]
    stats = calibrate(model, batches, lambda b: model(**b))
    alone = calibrate(model, [{"input_ids": s[None]} for b in (seqs, seqs[1:], seqs[:2]) for s in b],
                      lambda b: model(**b))
    lengths = [len(s) for s in (*seqs, *seqs[1:], *seqs[:2])]
    assert set(stats.count) == set(sites)
    for site in sites:
        torch.testing.assert_close(stats.count[site], expected_count(lengths), atol=0, rtol=0)
        assert stats.count[site][max(LENGTHS):].sum() == 0 and stats.count[site][:, max(LENGTHS):].sum() == 0
        torch.testing.assert_close(stats.sum[site], alone.sum[site], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_steps_equal_the_full_forward_under_an_ap_mask(name):
    """A two-step forward with a KV cache equals the full forward at every real position (docs/design.md, "The site
    contract").

    Left padding: the second step is the last token (each row's cached keys start at its own real position). Right
    padding: the second step holds padding queries, all of them for the shortest row.
    """
    _, model, sites = models(name)
    install_random_masks(sites)
    seqs = sequences()
    for side in SIDES:
        batch = pad(seqs, side)
        full = logits(model, **batch)
        split = 4 if side == "right" else batch["input_ids"].shape[1] - 1
        with torch.no_grad():
            first = model(**{k: v[:, :split] for k, v in batch.items()}, use_cache=True)
            second = model(input_ids=batch["input_ids"][:, split:], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"][:, split:], cache=first.past_key_values,
                           use_cache=True).logits
        stepped = torch.cat([first.logits, second], dim=1)  # (B, T, V)
        for i, s in enumerate(seqs):
            real = real_slice(len(s), full.shape[1], side)
            torch.testing.assert_close(stepped[i, real], full[i, real], atol=ATOL, rtol=0,
                                       msg=lambda m: f"{side}-padded row {i}: {m}")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padded_generate_equals_generating_each_sequence_alone_under_an_ap_mask(name, cache):
    """Greedy search scores per step; a static cache holds unused key slots after the real keys."""
    _, model, sites = models(name)
    install_random_masks(sites)
    assert_left_padded_generate_equals_alone(model, sequences(), cache)


def assert_left_padded_generate_equals_alone(model: transformers.PreTrainedModel, seqs: list[torch.Tensor],
                                             cache: str) -> None:
    """Greedy search on a left-padded batch gives each sequence the tokens and scores it gets alone."""
    batch = pad(seqs, "left")
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_scores": True,
                "return_dict_in_generate": True, "cache_implementation": cache}
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **settings)
    for i, s in enumerate(seqs):
        alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **settings)
        assert out.sequences[i, batch["input_ids"].shape[1]:].tolist() == alone.sequences[0, len(s):].tolist()
        for step, scores in zip(out.scores, alone.scores):
            torch.testing.assert_close(step[i], scores[0], atol=ATOL, rtol=0)


def test_mask_builder_blanks_padded_queries_of_causal_masks_only():
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    from ap.models.hf import ap_mask

    real = torch.tensor([[True] * 4, [True, True, False, False], [False, True, True, True]])  # (B, tokens)
    causal = ap_mask(3, 4, 4, mask_function=causal_mask_function, attention_mask=real)  # (B, 1, q, k)
    assert causal.shape == (3, 1, 4, 4)
    assert torch.equal(causal.any(dim=-1)[:, 0], real)  # a padded query sees no key, a real one sees some
    assert torch.equal(causal.any(dim=-2)[:, 0], real)  # a padded key is seen by no query
    expected = sdpa_mask(3, 4, 4, attention_mask=real, allow_is_causal_skip=False) & real[:, None, :, None]
    assert torch.equal(causal, expected)
    step = ap_mask(3, 2, 4, q_offset=2, mask_function=causal_mask_function, attention_mask=real)  # cached keys 0, 1
    assert torch.equal(step, causal[:, :, 2:])
    unpadded = ap_mask(3, 4, 4, mask_function=causal_mask_function)  # never skipped: causality stays in the mask
    assert unpadded is not None and torch.equal(unpadded[:, 0], torch.ones(3, 4, 4, dtype=torch.bool).tril())
    # cross-attention: decoder queries, encoder padding: bidirectional, left as sdpa_mask builds it
    cross = ap_mask(3, 2, 4, mask_function=bidirectional_mask_function, attention_mask=real)
    assert torch.equal(cross, sdpa_mask(3, 2, 4, mask_function=bidirectional_mask_function, attention_mask=real))


def test_the_causal_mask_is_read_once_per_forward_and_again_for_a_new_mask(monkeypatch):
    """Every layer gets the same mask tensor: its positions are read by the first and reused by the others; another
    batch (a new mask) is read again, so padded and unpadded batches still equal the model's own attention."""
    from ap.models import hf

    ref, model, _ = models("llama")
    reads = []
    original = hf._causal_self_positions
    monkeypatch.setattr(hf, "_causal_self_positions", lambda *a: reads.append(a[0].shape) or original(*a))
    for side in ("left", "right"):
        batch = pad(sequences(), side)
        real = batch["attention_mask"].bool()  # (B, T): padded positions' outputs are arbitrary
        torch.testing.assert_close(logits(model, **batch)[real], logits(ref, **batch)[real], atol=1e-5, rtol=0)
    assert len(reads) == 2  # one per forward, not one per layer (2 layers)
