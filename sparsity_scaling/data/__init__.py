"""Corpus, tokenizer, Megatron indexed datasets and the deterministic sampler."""

from .pipeline import PreparedData, prepare_data

__all__ = ["PreparedData", "prepare_data"]
