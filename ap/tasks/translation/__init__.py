"""Translation with fairseq: the data module (``data``), the task (``task``) and BLEU (``bleu``)."""

from .bleu import BLEU_MODES, compound_split, corpus_bleu, moses_detokenize, read_references
from .data import Batch, Batches, TranslationDataModule
from .task import TranslationTask

__all__ = ["BLEU_MODES", "Batch", "Batches", "TranslationDataModule", "TranslationTask", "compound_split",
           "corpus_bleu", "moses_detokenize", "read_references"]
