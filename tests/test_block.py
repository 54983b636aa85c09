"""The block backend (block-sparse attention from fused kernels) against eager masked attention, in values and
gradients: the flash path (CPU, no dropout: PyTorch's CPU flash kernel per part, with a backward of its own) and the SDPA
path (GPU or attention dropout: SDPA per part, autograd)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ap.core import AttentionSite, MaskError, attention
from ap.core.attention import block_plan
from ap.core.attention.block import _sdpa_block
from ap.models.transformer_lm import TransformerLM, TransformerLMConfig


def grads(out, tensors):
    return torch.autograd.grad(out.pow(2).sum(), tensors)


def sdpa_path(q, k, v, mask, causal):
    """The SDPA path, called directly (the backend takes it on CPU only with dropout)."""
    keep = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril() if causal else mask
    return _sdpa_block(q, k, v, block_plan(keep, q.shape[1]), 0.0, q.shape[-1] ** -0.5)


def check_against_eager(q, k, v, mask, causal, atol=1e-5, path="flash"):
    ref, _ = attention(q, k, v, mask=mask, is_causal=causal, backend="eager")
    if path == "flash":
        out, _ = attention(q, k, v, mask=mask, is_causal=causal, backend="block")
    elif path == "sdpa math":  # the kernel SDPA runs on CPU with dropout
        with sdpa_kernel(SDPBackend.MATH):
            out = sdpa_path(q, k, v, mask, causal)
    else:
        out = sdpa_path(q, k, v, mask, causal)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    return out


@pytest.mark.parametrize("path", ["flash", "sdpa", "sdpa math"])
@pytest.mark.parametrize("causal,tq,tk", [(True, 150, 150), (False, 150, 150), (False, 70, 130)])
def test_block_equals_eager(causal, tq, tk, path):
    """Causal self, bidirectional self and cross shapes; lengths not multiples of the tile (rows near the end)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, tq, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, tk, 16, generator=g, requires_grad=True) for _ in range(2))
    tiles = torch.rand(3, -(-tq // 64), -(-tk // 64), generator=g) > 0.5  # (H, Qb, Kb) whole tiles, per head
    mask = tiles.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :tq, :tk].clone()  # (H, Tq, Tk)
    mask &= torch.rand(3, tq, tk, generator=g) > 0.2  # and element holes inside kept tiles
    mask[:, -1] = False  # the last row is empty: zeros, no NaN
    out = check_against_eager(q, k, v, mask, causal, path=path)
    assert out[:, :, -1].abs().max() == 0


@pytest.mark.parametrize("pattern", ["random tiles", "diagonal only"])
@pytest.mark.parametrize("length", [256, 300])
def test_block_equals_eager_on_causal_tile_masks(length, pattern):
    """The AP shape of a causal LM: whole kept tiles plus the causal diagonal. Query tiles keeping only the diagonal
    run with the kernel's causal flag (all of them: no gathers at all), the others with one bias shared by all rows
    of the part; at 300 the last query tile is cut by the sequence end and gets a bias of its own. Both paths; the SDPA
    path also with the math kernel (what CPU runs with dropout)."""
    g = torch.Generator().manual_seed(3)
    n = -(-length // 64)
    tiles = torch.eye(n, dtype=torch.bool).expand(4, n, n).clone()  # (H, Qb, Kb)
    if pattern == "random tiles":
        tiles |= torch.rand(4, n, n, generator=g) > 0.5
    mask = tiles.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :length, :length].clone()  # (H, L, L)
    plan = block_plan(mask & torch.ones(length, length, dtype=torch.bool).tril(), 4)
    causal = [p for p in plan.parts if p.causal]
    assert len(causal) == 1 and (causal[0].all_q and causal[0].all_k) == ((pattern, length) == ("diagonal only", 256))
    shared = [p for p in plan.parts if p.bias is not None and p.bias.shape[1] == 1 < p.q_rows.numel()]
    assert bool(shared) == (pattern == "random tiles")  # one bias for several query tiles
    last = [p for p in plan.parts if bool((p.q_rows % n == n - 1).any())]  # parts holding a head's last query tile
    if length == 300:  # cut by the sequence end: a bias of its own; the padding rows see every key (no -inf row)
        assert all(p.bias is not None and not p.causal and bool((p.bias[..., 300 % 64:, :] == 0).all()) for p in last)
    else:
        assert all(p.causal or p.bias.shape[1] == 1 for p in last)
    q, k, v = (torch.randn(2, 4, length, 16, generator=g, requires_grad=True) for _ in range(3))
    check_against_eager(q, k, v, mask, True)
    check_against_eager(q, k, v, mask, True, path="sdpa")
    with sdpa_kernel(SDPBackend.MATH):
        check_against_eager(q, k, v, mask, True, path="sdpa")


def test_block_row_with_nothing_kept_in_one_of_its_tiles():
    """Rows kept in a full tile but with no kept entry in a partial tile of the same query tile (and the reverse for
    other rows): one softmax over both tiles, equal to eager."""
    g = torch.Generator().manual_seed(4)
    mask = torch.zeros(1, 64, 128, dtype=torch.bool)
    mask[:, :, :64] = True  # a full tile
    mask[:, :, 64:] = torch.rand(1, 64, 64, generator=g) > 0.5  # a partial tile ...
    mask[:, :10, 64:] = False  # ... in which the first rows keep nothing
    q = torch.randn(1, 1, 64, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 1, 128, 8, generator=g, requires_grad=True) for _ in range(2))
    check_against_eager(q, k, v, mask, False)


def test_block_plan_skips_empty_tiles_and_checks_shapes():
    keep = torch.zeros(2, 128, 128, dtype=torch.bool)
    keep[:, :64, :64] = True  # one kept tile of 4 per head
    plan = block_plan(keep, 2)
    assert plan.kept_tile_fraction == 0.25 and len(plan.parts) == 1  # one full tile per head: no bias, no gather
    assert plan.parts[0].bias is None and not plan.parts[0].causal and plan.parts[0].n == 1
    q = torch.randn(1, 2, 100, 8)
    with pytest.raises(MaskError, match="BlockPlan"):
        attention(q, q, q, mask=plan, backend="block")


def test_block_with_ragged_padding_in_a_site():
    """Left-padded rows: per-row masks are planned per call (batch rows folded into heads), equal to eager."""
    g = torch.Generator().manual_seed(2)
    site = AttentionSite("dec_self", 2, 96, 96, backend="block")
    site.set_mask(torch.rand(2, 96, 96, generator=g) > 0.3)
    pad = torch.zeros(3, 90, dtype=torch.bool)
    pad[1, :7], pad[2, :40] = True, True  # (B, T) left padding
    x = torch.randn(3, 2, 90, 8, generator=g, requires_grad=True)
    out = site(x, x, x, q_padding=pad, k_padding=pad)
    site.backend = "eager"
    ref = site(x, x, x, q_padding=pad, k_padding=pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads(out, (x,))[0], grads(ref, (x,))[0], atol=1e-5, rtol=1e-5)


def test_lm_trains_with_the_block_backend():
    """A whole LM: the same loss and gradients as eager masked attention; dropout runs."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=50, block_len=140, n_layers=2, n_heads=2, d_model=16,
                                              d_ff=32, dropout=0.0, backend="block"))
    g = torch.Generator().manual_seed(1)
    for block in model.blocks:
        block.attn.site.set_mask(torch.rand(2, 140, 140, generator=g) > 0.6)
    x = torch.randint(0, 50, (2, 140), generator=g)
    loss_block = model(x, x)[1]
    g_block = torch.autograd.grad(loss_block, list(model.parameters()))
    for block in model.blocks:
        block.attn.site.backend = "eager"
    loss_eager = model(x, x)[1]
    g_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    torch.testing.assert_close(loss_block, loss_eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_block, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for block in model.blocks:
        block.attn.site.backend, block.attn.dropout = "block", 0.1
    model.train()(x, x)[1].backward()  # attention dropout inside the fused calls


def test_plan_and_buffers_made_in_inference_mode_train_afterwards():
    """Lightning validates under torch.inference_mode before and between training: the plan a site caches there and
    the scratch buffers must still serve training (flash path, and the SDPA path that saves plan tensors)."""
    import importlib

    importlib.import_module("ap.core.attention.block")._scratch_local.__dict__.clear()  # buffers are first made below
    g = torch.Generator().manual_seed(5)
    site = AttentionSite("dec_self", 2, 128, 128, backend="block")
    site.set_mask(torch.rand(2, 128, 128, generator=g) > 0.5)
    x = torch.randn(1, 2, 128, 8, generator=g)
    with torch.inference_mode():
        site(x, x, x)
    xr = x.clone().requires_grad_()
    site(xr, xr, xr).sum().backward()
    site(xr, xr, xr, dropout_p=0.1).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_block_float64_gradcheck_broadcast_masks_and_bad_shapes():
    """float64 (the flash kernel's log-sum-exp is float64 then) passes gradcheck; masks broadcast over queries or keys
    are planned at full size; shapes the backend cannot run raise a MaskError naming the fix."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 70, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 70, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 70, 70, generator=g) > 0.4
    torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, mask=mask, backend="block")[0], (q, k, v),
                             fast_mode=True)  # (a random directional check: the full Jacobian takes ~30 s)
    x = torch.randn(2, 2, 150, 8, generator=g)
    for m in (torch.rand(1, 150, generator=g) > 0.5, torch.rand(2, 150, 1, generator=g) > 0.5):
        torch.testing.assert_close(attention(x, x, x, mask=m, backend="block")[0],
                                   attention(x, x, x, mask=m, backend="eager")[0], atol=1e-5, rtol=1e-5)
    for k_ in (torch.randn(2, 2, 150, 4), torch.randn(1, 2, 150, 8)):
        with pytest.raises(MaskError, match="use sdpa or eager"):
            attention(x, k_, k_, mask=m, backend="block")


def test_block_sdpa_path_with_nothing_kept_stays_in_the_graph():
    q = torch.randn(1, 2, 64, 8, requires_grad=True)
    out = sdpa_path(q, q, q, torch.zeros(2, 64, 64, dtype=torch.bool), False)
    assert out.abs().max() == 0 and out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.abs().max() == 0


@pytest.mark.parametrize("bias_grad", [False, True])
@pytest.mark.parametrize("causal,tq,tk,bias_batch", [(True, 150, 150, 2), (True, 128, 256, 1), (False, 70, 130, 2)])
def test_block_adds_a_score_bias_like_eager(causal, tq, tk, bias_batch, bias_grad):
    """A float score bias (Transformer-XL's relative-position term; memory sites are 128 x 256, bottom-right causal)
    is gathered per kept tile like the mask: values and gradients equal eager attention with the same bias. A constant
    bias runs the flash path (its backward takes the gathered bias), one that needs a gradient the SDPA path, which
    also returns the bias's gradient; lone causal-diagonal tiles take the triangle as -inf, not the causal flag."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, tq, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, tk, 16, generator=g, requires_grad=True) for _ in range(2))
    bias = torch.randn(bias_batch, 3, tq, tk, generator=g).requires_grad_(bias_grad)
    tiles = torch.rand(3, -(-tq // 64), -(-tk // 64), generator=g) > 0.4  # (H, Qb, Kb)
    mask = tiles.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :tq, :tk].clone()  # (H, Tq, Tk)
    off = tk - tq if causal else 0
    mask |= torch.arange(tk)[None, :] == torch.arange(tq)[:, None] + off  # the diagonal: every row keeps a key
    mask[1] &= torch.rand(tq, tk, generator=g) > 0.2  # element holes in one head
    ref, _ = attention(q, k, v, mask=mask, is_causal=causal, backend="eager", bias=bias)
    out, _ = attention(q, k, v, mask=mask, is_causal=causal, backend="block", bias=bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    inputs = (q, k, v, bias) if bias_grad else (q, k, v)
    for a, b in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, attention(q, k, v, mask=mask, is_causal=causal, backend="block")[0], atol=1e-3)
    with pytest.raises(MaskError, match="score bias"):
        attention(q, k, v, mask=mask, is_causal=causal, backend="block", bias=bias[..., :-1])


@pytest.mark.parametrize("layout", ["fused qkv", "shared kv head", "head-dim slice"])
@pytest.mark.parametrize("pattern", ["diagonal only", "random tiles"])
@pytest.mark.parametrize("length", [256, 300])
def test_block_reads_strided_inputs_in_place(layout, pattern, length, monkeypatch):
    """Inputs as models pass them: views of one fused QKV projection, one K/V head expanded over all query heads
    (stride 0) and a slice of a wider head dimension. Values and gradients equal eager attention, also for the
    every-query-tile-keeps-its-diagonal part that runs on per-batch-row views. With whole tiles (256) no input is
    copied (no scratch buffer for q, k or v in the forward); at 300 they are (zero-padded tiles). The output is laid
    out (B, L, H, D), as dense flash attention returns it, so a model's (B, L, H*D) reshape is a view."""
    from ap.core.attention import block

    g = torch.Generator().manual_seed(7)
    h, n = 4, -(-length // 64)
    tiles = torch.eye(n, dtype=torch.bool).expand(h, n, n).clone()  # (H, Qb, Kb)
    if pattern == "random tiles":
        tiles |= torch.rand(h, n, n, generator=g) > 0.6
    mask = tiles.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :length, :length].clone()
    if layout == "fused qkv":
        leaf = torch.randn(2, length, 3, h, 16, generator=g, requires_grad=True)  # (B, L, 3, H, D)
        q, k, v = leaf.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D) views
    elif layout == "shared kv head":
        leaf = torch.randn(3, 2, 1, length, 16, generator=g, requires_grad=True)  # q, k, v with one head
        q = leaf[0].expand(2, h, length, 16) * 1.0  # (B, H, L, D) materialised queries
        k, v = leaf[1].expand(2, h, length, 16), leaf[2].expand(2, h, length, 16)  # head stride 0
    else:
        leaf = torch.randn(3, 2, h, length, 32, generator=g, requires_grad=True)
        q, k, v = leaf[..., :16].unbind(0)  # (B, H, L, 16) of rows of 32
    requested = []
    scratch = block._scratch
    monkeypatch.setattr(block, "_scratch", lambda name, *a: requested.append(name) or scratch(name, *a))
    out, _ = attention(q, k, v, mask=mask, is_causal=True, backend="block")
    assert not {"q", "k", "v"} & set(requested) if length % 64 == 0 else {"q", "k", "v"} <= set(requested)
    assert out.transpose(1, 2).is_contiguous() == (length % 64 == 0)
    ref, _ = attention(q, k, v, mask=mask, is_causal=True, backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)  # a gradient that is not all ones
    (got,), (want,) = (torch.autograd.grad((o * w).sum(), leaf, retain_graph=True) for o in (out, ref))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the inference path (no log-sum-exp kept)
        torch.testing.assert_close(attention(q, k, v, mask=mask, is_causal=True, backend="block")[0], ref,
                                   atol=1e-5, rtol=1e-5)
