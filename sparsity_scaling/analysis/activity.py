"""The one streaming pass behind every activation-pattern analysis.

A forward pass over the data with a sparsity rule applied in every FFN, exactly as the
evaluator's sparse pass applies it (so the activation ratio here is the evaluator's), that
counts, per layer and neuron, the tokens on which the neuron is active, and the active
neurons per vocabulary token and per position. Only counts are kept, so memory does not
grow with the number of tokens. Counts are summed over data-parallel ranks and the neuron
dimension gathered over tensor-parallel ranks, so every rank ends with the same `Activity`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..errors import SettingError, UserError
from ..metrics.comm import gather_neurons, sum_dp, sum_tp
from ..metrics.measure import EvalData, check_vocab, perplexity
from ..metrics.rules import Rule, SparsifyingProbe
from ..model import MiniCPM


@dataclass
class Activity:
    """Activation counts of one model on one dataset under one rule (all ranks' data)."""

    neuron_active: np.ndarray  # [layers, d_f]: tokens on which each neuron was active
    tokens: int  # tokens seen (by every layer)
    token_active: np.ndarray  # [vocab]: active (layer, neuron) entries on each token id
    token_count: np.ndarray  # [vocab]: occurrences of each token id
    position_active: np.ndarray  # [layers, positions]: active neurons at each position
    position_count: np.ndarray  # [positions]: tokens at each position
    loss: float  # mean token loss with the rule applied

    @property
    def width(self) -> int:
        return self.neuron_active.shape[1]

    @property
    def layers(self) -> int:
        return self.neuron_active.shape[0]

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    def frequency(self) -> np.ndarray:
        """[layers, d_f]: the share of tokens on which each neuron is active."""
        return self.neuron_active / self.tokens

    @property
    def activation_ratio(self) -> float:
        return float(self.neuron_active.sum() / (self.tokens * self.layers * self.width))

    def layer_ratios(self) -> list[float]:
        return (self.neuron_active.sum(1) / (self.tokens * self.width)).tolist()

    def token_ratios(self) -> np.ndarray:
        """[vocab]: mean activation ratio over the occurrences of each token (nan if none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.token_count > 0,
                            self.token_active / (self.token_count * self.layers * self.width), np.nan)

    def position_ratios(self) -> np.ndarray:
        """[layers, positions]: activation ratio of each layer at each position."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.position_count > 0, self.position_active / (self.position_count * self.width), np.nan)


class ActivityProbe(SparsifyingProbe):
    """Applies the rule like `SparsifyingProbe` and also counts by neuron, token and position.

    `tokens` must hold the current batch's input ids [batch, seq] before each forward pass,
    so that each entry of the mask can be attributed to its token.
    """

    def __init__(self, rule: Rule, target, positions: int):
        if rule.site == "input":
            raise SettingError("site", "input", "masks input features, not neurons; use another site")
        super().__init__(rule)
        ffns = target.ffns
        if any(getattr(f, "expert", None) is not None for f in ffns):
            raise UserError(f"{target.name}: MoE experts see only their routed tokens; the activation analyses need "
                            "FFNs that see every token (measure MoE models with `evaluate`)")
        if len({f.local_neurons for f in ffns}) != 1:
            raise UserError("layers of different FFN widths are not supported by the activation analyses")
        self.seq_first = isinstance(target, MiniCPM)  # ours: [seq, batch, d_f]; HF: batch first
        self.index = {f.layer: i for i, f in enumerate(ffns)}
        self.tokens: torch.Tensor | None = None
        self.neurons = torch.zeros(len(ffns), ffns[0].local_neurons, dtype=torch.float64)
        self.by_token = torch.zeros(target.vocab_size, dtype=torch.float64)
        self.by_position = torch.zeros(len(ffns), positions, dtype=torch.float64)

    def _count(self, layer, mask):
        super()._count(layer, mask)
        batch, seq = self.tokens.shape
        if self.seq_first:
            mask = mask.reshape(seq, batch, -1).transpose(0, 1)
        else:  # [batch, seq, d_f], or tokens flattened as [batch * seq, d_f] (OPT)
            mask = mask.reshape(batch, seq, -1)
        i = self.index[layer]
        self.neurons[i] += mask.sum((0, 1), dtype=torch.float64).cpu()
        per_token = mask.sum(-1, dtype=torch.float64).cpu()  # [batch, seq]: active local neurons
        self.by_token.index_add_(0, self.tokens.flatten(), per_token.flatten())
        self.by_position[i, :seq] += per_token.sum(0)


@torch.no_grad()
def measure_activity(target, data: EvalData, rule: Rule, label: str = "") -> Activity:
    """Stream `data` through `target` with `rule` applied; a collective under TP and DP."""
    import torch.distributed as dist

    check_vocab(data, target)
    positions = data.sequences.shape[1] - 1
    probe = ActivityProbe(rule, target, positions)
    device = next(target.parameters()).device
    token_count = torch.zeros(target.vocab_size, dtype=torch.float64)
    position_count = torch.zeros(positions, dtype=torch.float64)
    loss = torch.zeros(2, dtype=torch.float64)
    quiet = dist.is_initialized() and dist.get_rank() != 0
    bar = tqdm(total=data.my_tokens(), desc=label or "activity", unit="tok", unit_scale=True,
               file=sys.stderr, mininterval=2.0, disable=quiet, leave=False)
    with target.probing(probe), bar:
        for batch in data.my_batches():
            inputs = batch[:, :-1]
            probe.tokens = inputs
            losses = target.token_losses(inputs.to(device), batch[:, 1:].to(device))
            loss += torch.tensor([losses.double().sum().item(), losses.numel()], dtype=torch.float64)
            token_count += torch.bincount(inputs.flatten(), minlength=target.vocab_size).double()
            position_count[: inputs.shape[1]] += inputs.shape[0]
            bar.update(inputs.numel())
    neurons = sum_dp(gather_neurons(probe.neurons))  # [layers, d_f] on every rank
    by_token, by_position = (sum_dp(sum_tp(t)) for t in (probe.by_token, probe.by_position))
    for t in (token_count, position_count, loss):
        sum_dp(t)
    if loss[1] == 0:
        raise UserError(f"{label or 'data'}: no tokens to analyse")
    return Activity(
        neuron_active=neurons.round().long().numpy(), tokens=int(loss[1]),
        token_active=by_token.round().long().numpy(), token_count=token_count.round().long().numpy(),
        position_active=by_position.round().long().numpy(),
        position_count=position_count.round().long().numpy(), loss=float(loss[0] / loss[1]),
    )
