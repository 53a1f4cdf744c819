"""What the evaluator needs from a model: ours (any TP size) or a Hugging Face causal LM.

Both `sparsity_scaling.model.MiniCPM` and `sparsity_scaling.hf.HFCausalLM` satisfy
`SparsityTarget`; the metrics and searches are written against this protocol only.
"""

from __future__ import annotations

from typing import ContextManager, Iterator, Protocol, Sequence

import torch

from ..model.probe import Probe


class FFNLayer(Protocol):
    layer: int  # index of the layer (of the FFN, in a model with MoE experts), 0-based
    local_neurons: int  # neurons held by this rank (d_f / TP)
    neuron_offset: int  # global index of the first local neuron
    # Hugging Face MoE models' FFNs also have `block` (the decoder layer) and `expert`
    # (the expert's index, "shared", or None for a dense FFN); an expert sees its routed tokens only.

    def output_weight(self) -> torch.Tensor:
        """W_out restricted to the local neurons, fp32, shape [d_model, local_neurons]."""

    def output_weight_norms(self) -> torch.Tensor:
        """||W_out[:, i]|| for each local neuron, fp32, shape [local_neurons]."""


class SparsityTarget(Protocol):
    vocab_size: int

    @property
    def ffns(self) -> Sequence[FFNLayer]: ...

    def probing(self, probe: Probe) -> ContextManager[Probe]:
        """Every FFN calls probe.on_input / probe.on_activation during forward passes."""

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [batch, seq, vocab] (fp32, the whole vocabulary on every rank)."""

    def token_losses(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [batch, seq] (fp32) of next-token prediction."""

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's (local) parameters: their device, and the cost of a forward pass."""
