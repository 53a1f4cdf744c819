"""Hugging Face interoperability: measure any local HF causal LM, export ours to Llama format.

    HFCausalLM     a local Hugging Face causal LM as a `SparsityTarget`
    export_llama   one of our checkpoints as a Llama directory, muP scalings folded in
    llama_model    the same Llama in memory (for decoding with a KV cache)
    load_target    our checkpoint (at any TP size), an HF directory or a GGUF file, as a `SparsityTarget`
    hf_tokenizer   the tokenizer of an HF directory or a GGUF file
    model_kind     what a model path is: our checkpoint or run, an HF directory, a GGUF file
"""

from .causal_lm import HFCausalLM
from .export import export_llama, llama_model
from .load import hf_tokenizer, load_target
from .paths import model_kind

__all__ = ["HFCausalLM", "export_llama", "hf_tokenizer", "llama_model", "load_target", "model_kind"]
