"""How the evaluator looks into, and masks, the FFNs during a forward pass.

A probe is set on the model (`with model.probing(probe): ...`). Every FFN then calls

    probe.on_input(ffn, x)       -> replacement for the FFN input x, or None
    probe.on_activation(ffn, t)  -> replacement for the activations t.activation, or None

where `t` is an `FFNTrace`. Under tensor parallelism each rank sees its own d_f / TP
neurons; `ffn.neuron_offset` is the global index of its first one. No monkeypatching: the
FFN forward is written to call these two methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FFNTrace:
    """What one FFN computed; features (local neurons) are the last dimension.

    Our model uses [seq, batch, features]; Hugging Face models their own leading dimensions
    ([batch, seq], or flattened tokens for OPT). Rules only rely on the last dimension.
    """

    layer: int
    input: torch.Tensor  # x: the FFN input (after RMSNorm), full d_h
    gate: torch.Tensor  # act(W_gate x)
    up: torch.Tensor  # W_in x
    activation: torch.Tensor  # a = act(W_gate x) * (W_in x): the input of W_out


class Probe:
    """Base class: observe and optionally replace values inside every FFN."""

    def on_input(self, ffn, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def on_activation(self, ffn, trace: FFNTrace) -> torch.Tensor | None:
        return None


class ActivationRecorder(Probe):
    """Keeps each layer's activations a (detached, on CPU) from the last forward pass."""

    def __init__(self):
        self.activations: dict[int, torch.Tensor] = {}

    def on_activation(self, ffn, trace):
        self.activations[trace.layer] = trace.activation.detach().cpu()
        return None


class ThresholdNeurons(Probe):
    """Zero a_i where |a_i| < threshold_i (thresholds per layer, over the local neurons)."""

    def __init__(self, thresholds: dict[int, torch.Tensor]):
        self.thresholds = thresholds

    def on_activation(self, ffn, trace):
        threshold = self.thresholds.get(trace.layer)
        if threshold is None:
            return None
        a = trace.activation
        return a * (a.abs() >= threshold.to(a.device, a.dtype))


class MaskNeurons(Probe):
    """Keep a_i where mask is True; a mask is [local neurons] or the activation's full shape."""

    def __init__(self, masks: dict[int, torch.Tensor]):
        self.masks = masks

    def on_activation(self, ffn, trace):
        mask = self.masks.get(trace.layer)
        if mask is None:
            return None
        return trace.activation * mask.to(trace.activation.device, trace.activation.dtype)
