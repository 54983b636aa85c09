"""Every model defaults to ``model.backend=auto``: on CPU a pruned model's masked attention runs the block backend
(padded batches and decoding steps: SDPA), with the results of SDPA within float tolerance, per model family."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from ap.core import find_sites
from ap.models.hf import attach_sites
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig
from ap.models.transformer_xl import TransformerXL, TransformerXLConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def test_every_model_config_defaults_to_auto():
    files = sorted(CONF.glob("*.yaml"))
    assert len(files) >= 8
    assert {f.stem: OmegaConf.load(f).backend for f in files} == {f.stem: "auto" for f in files}
    assert TransformerLMConfig().backend == TransformerXLConfig().backend == "auto"


def install_tile_masks(model: torch.nn.Module, seed: int = 0) -> None:
    """Random 64-tile masks (about half the tiles kept, the diagonal always) on every site of ``model``."""
    g = torch.Generator().manual_seed(seed)
    for site in find_sites(model).values():
        qb, kb = -(-site.max_q // 64), -(-site.max_k // 64)
        tiles = torch.rand(site.n_heads, qb, kb, generator=g) > 0.5  # (H, Qb, Kb)
        tiles |= (torch.arange(kb)[None, :] == torch.arange(qb)[:, None] + (kb - qb))[None]  # the diagonal tiles
        site.set_mask(tiles, tile=64)


def auto_against_sdpa(model: torch.nn.Module, forward: Callable[[], torch.Tensor], want: str = "block",
                      train: bool = False) -> None:
    """``forward`` under each site's default backend, which must be auto and choose ``want``, equals it under sdpa
    (and, with ``train``, so do the parameter gradients)."""
    sites = find_sites(model).values()
    assert {s.backend for s in sites} == {"auto"}
    results = {}
    for backend in ("auto", "sdpa"):
        for s in sites:
            s.backend = backend
        model.zero_grad()
        with torch.set_grad_enabled(train):
            out = forward()
            if train:
                out.pow(2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None] if train else []
        results[backend] = (out.detach(), grads)
        if backend == "auto":
            assert {c for s in sites for c in s._auto_choice.values()} == {want}
    torch.testing.assert_close(results["auto"][0], results["sdpa"][0], atol=2e-5, rtol=1e-4)
    assert len(results["auto"][1]) == len(results["sdpa"][1])
    for a, b in zip(results["auto"][1], results["sdpa"][1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_transformer_lm(train):
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=50, block_len=192, n_layers=2, n_heads=2, d_model=32,
                                              d_ff=64, dropout=0.0))
    install_tile_masks(model)
    x = torch.randint(0, 50, (2, 192))
    auto_against_sdpa(model.train(train), lambda: model(x)[0], train=train)


@pytest.mark.parametrize("train", [False, True])
def test_transformer_xl_runs_its_score_bias_on_block(train):
    """The relative-position term is a score bias: block gathers it per kept tile (a bias that needs a gradient, as
    in training, runs block's SDPA path); memory sites are 64 queries x 128 keys."""
    torch.manual_seed(0)
    model = TransformerXL(TransformerXLConfig(vocab_size=50, n_layers=2, n_heads=2, d_model=16, d_head=8, d_inner=32,
                                              dropout=0.0, tgt_len=64, mem_len=64, cutoffs=[]))
    install_tile_masks(model)
    x = torch.randint(0, 50, (2, 128))

    def forward() -> torch.Tensor:
        first = model(x[:, :64])
        return model(x[:, 64:], mems=first.mems).log_probs  # the second segment attends to memory

    auto_against_sdpa(model.train(train), forward, train=train)


def test_hf_causal_lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    attach_sites(model, 128)
    install_tile_masks(model)
    x = torch.randint(0, 50, (2, 128))
    auto_against_sdpa(model, lambda: model(input_ids=x, use_cache=False).logits)


def test_hf_encoder_unpadded_block_and_padded_sdpa():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    attach_sites(model, 128)
    install_tile_masks(model)
    x = torch.randint(1, 50, (2, 128))
    auto_against_sdpa(model, lambda: model(input_ids=x).logits)
    for site in find_sites(model).values():
        site.backend = "auto"
        site._auto_choice.clear()
    padding = torch.ones(2, 128, dtype=torch.long)
    padding[1, 100:] = 0  # the second row is 100 tokens long
    auto_against_sdpa(model, lambda: model(input_ids=x, attention_mask=padding).logits, want="sdpa")
