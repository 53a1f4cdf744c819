"""Hugging Face interoperability: measure any local HF causal LM, export ours to Llama format.

    HFCausalLM     a local Hugging Face causal LM as a `SparsityTarget`
    export_llama   one of our checkpoints as a Llama directory, muP scalings folded in
    llama_model    the same Llama in memory (for decoding with a KV cache)
    load_target    our checkpoint (at any TP size) or an HF directory, as a `SparsityTarget`
"""

from .causal_lm import HFCausalLM
from .export import export_llama, llama_model
from .load import load_target

__all__ = ["HFCausalLM", "export_llama", "llama_model", "load_target"]
