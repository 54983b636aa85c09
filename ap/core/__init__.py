"""Pure-torch attention-pruning core: no Lightning, Hydra, fairseq or transformers imports below this package."""

from .attention import BACKENDS, attention, causal_mask, register_backend
from .calibrate import calibrate, make_maskset, recording
from .errors import APError, MaskError
from .masks import MaskSet, signature_difference
from .sites import AttentionSite, SiteKind, find_sites, model_signature, real_positions
from .spec import PruningSpec
from .stats import AttentionStats
from .threshold import achieved_by_kind, achieved_sparsity, block_sparsity, build_masks, register_policy

__all__ = [
    "APError", "AttentionSite", "AttentionStats", "BACKENDS", "MaskError", "MaskSet", "PruningSpec", "SiteKind",
    "achieved_by_kind", "achieved_sparsity", "attention", "block_sparsity", "build_masks", "calibrate", "causal_mask",
    "find_sites", "make_maskset", "model_signature", "real_positions", "recording", "register_backend",
    "register_policy", "signature_difference",
]
