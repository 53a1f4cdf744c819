"""Corpus, tokenizer, Megatron indexed datasets and the deterministic sampler."""

