"""ap: data-informed attention pruning (Rugina et al., arXiv 2012.02030)."""

__version__ = "0.1.0"
