"""Backends against an explicit reference masked softmax."""

import pytest
import torch

from ap.core import MaskError, attention, causal_mask


def reference(q, k, v, keep):
    """softmax over kept keys only, computed row by row with plain Python loops over (b, h, i)."""
    out = torch.zeros_like(q)
    b, h, tq, _ = q.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                kept = keep[bi, hi, i].nonzero().flatten()
                if len(kept) == 0:
                    continue
                s = (k[bi, hi, kept] @ q[bi, hi, i]) / q.shape[-1] ** 0.5
                out[bi, hi, i] = torch.softmax(s, 0) @ v[bi, hi, kept]
    return out


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_attention_equals_reference(qkv, backend, causal):
    q, k, v = qkv
    mask = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[:, :, 3] = False  # a fully masked row outputs zeros
    keep = mask & causal_mask(7, 7) if causal else mask
    out, _ = attention(q, k, v, mask=mask, is_causal=causal, backend=backend)
    torch.testing.assert_close(out, reference(q, k, v, keep))
    assert out[:, :, 3].abs().max() == 0


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_causal_is_bottom_right_aligned(qkv, backend):
    """Two queries against seven keys: the last query sees all keys (incremental decoding)."""
    q, k, v = qkv
    out, _ = attention(q[:, :, -2:], k, v, is_causal=True, backend=backend)
    keep = causal_mask(7, 7)[-2:].expand(2, 3, 2, 7)
    torch.testing.assert_close(out, reference(q[:, :, -2:], k, v, keep))


def test_eager_probs_and_gradients_match_sdpa(qkv):
    q, k, v = (t.clone().requires_grad_() for t in qkv)
    mask = torch.rand(1, 3, 7, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    out_e, probs = attention(q, k, v, mask=mask, is_causal=True, backend="eager", need_probs=True)
    grads_e = torch.autograd.grad(out_e.square().sum(), (q, k, v))
    out_s, _ = attention(q, k, v, mask=mask, is_causal=True, backend="sdpa")
    grads_s = torch.autograd.grad(out_s.square().sum(), (q, k, v))
    torch.testing.assert_close(out_e, out_s)
    for a, b in zip(grads_e, grads_s):
        torch.testing.assert_close(a, b)
    keep = mask & causal_mask(7, 7)
    assert probs.shape == (2, 3, 7, 7)
    assert probs[~keep.expand_as(probs)].abs().max() == 0
    rows = keep.any(-1).expand(2, 3, 7)
    torch.testing.assert_close(probs.sum(-1)[rows], torch.ones(int(rows.sum()), dtype=probs.dtype))


def test_bad_masks_and_backends_raise(qkv):
    q, k, v = qkv
    with pytest.raises(MaskError, match="bool"):
        attention(q, k, v, mask=torch.zeros(7, 7))  # an additive float mask is never accepted
    with pytest.raises(MaskError, match="unknown attention backend"):
        attention(q, k, v, backend="nope")
    with pytest.raises(MaskError, match="probabilities"):
        attention(q, k, v, backend="sdpa", need_probs=True)
