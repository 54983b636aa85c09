"""One attention function with named backends.

``attention(q, k, v, mask=..., is_causal=..., backend=...)`` is the only place where attention is computed. Backends are
registered by name (like HF transformers' ``AttentionInterface``):

- ``eager``: explicit ``softmax(q kᵀ · scale + mask) v``; the reference for correctness and the only backend that returns
  the probabilities (used for calibration).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; with no mask and ``is_causal`` it is the fused causal
  kernel (the honest dense baseline), with a bool mask it is a masked dense kernel (correct, not faster).
- ``auto`` (resolved per call by ``AttentionSite``): on CPU ``block`` for every masked, unpadded call (masked SDPA was
  slower at every sparsity and length ``scripts/benchmark.py`` measured); on CUDA ``flex`` (no attention dropout) when
  ``AUTO_SPARSE_MIN_EMPTY`` of the valid 128-blocks are empty from ``AUTO_SPARSE_MIN_LEN_CUDA`` keys
  (``scripts/gpu_check.py``), never ``block``; else ``sdpa``.
- ``block``: block-sparse attention from fused kernels, planned once per mask (``BlockPlan``): query tiles are grouped
  by their number of kept key tiles (and mask pattern); per group one fused call on the gathered kept tiles, so every
  query row's softmax is computed in one call and pruned tiles never are. On CPU without dropout (the flash path) the
  calls are PyTorch's CPU flash-attention kernel, with a backward that runs the kernel's flash backward per group (it
  saves what dense flash attention saves; gathers go to per-thread scratch buffers that are reused, not freed);
  otherwise (GPU, attention dropout) SDPA with autograd. Forward and backward everywhere; the fastest CPU path for
  block masks. Per-row masks (padded batches) are planned on every call.
- ``flex``: FlexAttention (compiled once per shape with ``dynamic=False``) with a ``BlockMask`` built from the
  bool mask and cached, so tiles with no kept entry are skipped and kept tiles apply the exact element mask. Forward
  on CPU and GPU; backward only on GPU (torch 2.13 has no CPU backward: asking for it raises). No attention dropout.

Semantics shared by all backends:
- ``mask`` is bool, broadcastable to ``(B, H, Tq, Tk)``, True = keep.
- ``bias`` (``eager`` and ``sdpa`` only; others raise): a float score term broadcastable to ``(B, H, Tq, Tk)`` added to
  the scaled ``q·k`` scores before masking, e.g. Transformer-XL's relative-position term.
- ``is_causal`` aligns the causal triangle to the bottom-right corner (query ``i`` sees keys ``j <= i + Tk - Tq``), so a
  single query step against a key cache of length ``Tk`` sees every cached key (incremental decoding).
- A query row with no kept key outputs zeros (and zero probabilities), never NaN.
"""

from .block import BLOCK_TILE, BlockPart, BlockPlan, block_backend, block_plan
from .common import causal_mask, empty_tiles, keep_with_causal, needs_grad, tile_row_sums, tile_sum
from .dense import eager_attention, sdpa_attention
from .flex import FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE_CUDA, flex_backend, flex_block_mask, flex_block_size
from .registry import BACKENDS, BIAS_BACKENDS, PROB_BACKENDS, Backend, attention, register_backend

__all__ = [
    "BACKENDS", "BIAS_BACKENDS", "BLOCK_TILE", "Backend", "BlockPart", "BlockPlan", "FLEX_BLOCK_SIZE",
    "FLEX_BLOCK_SIZE_CUDA", "PROB_BACKENDS", "attention", "block_backend", "block_plan", "causal_mask",
    "eager_attention", "empty_tiles", "flex_backend", "flex_block_mask", "flex_block_size", "keep_with_causal",
    "needs_grad", "register_backend", "sdpa_attention", "tile_row_sums", "tile_sum",
]
